"""LoadRIDFR and the model folders it reads.

Folders (added with ``folder_paths.add_model_folder_path``, so paths from extra_model_paths.yaml and
other packs stay): ``models/ridfr`` (the content module: RIDFR content weights, or RestorerID's
``RestorerIDFull.ckpt`` / its converted ``.safetensors``), ``models/ipadapter`` (IP-Adapter FaceID
Plus/PlusV2, shared with the IP-Adapter pack), ``models/clip_vision`` (ComfyUI's own) and
``models/insightface`` (``models/<buffalo_l|antelopev2>/*.onnx``, shared with the IP-Adapter and
InstantID packs). The base SD1.5 model comes from ComfyUI's checkpoint loader as MODEL.

``models/ridfr/configs`` (optional): architecture configs like ``ridfr_core/configs/sd15`` (``unet.json``,
``clip_vision.json``) for SD1.5-family models of other sizes, such as the tests' tiny ones; without it
the UNet layout the adapter is laid out for and the CLIP vision architecture are SD1.5's and ViT-H's.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import folder_paths
from comfy_api.latest import io

from .memory import whole_module_patcher
from .sockets import LoadedRIDFR, NodeError, RIDFRModelsSocket, invalid_choice
from .validation import node_inputs

CONTENT_FOLDER, ADAPTER_FOLDER, CLIP_FOLDER, FACE_FOLDER = "ridfr", "ipadapter", "clip_vision", "insightface"
ARCHITECTURE_FOLDER = "configs"  # inside a models/ridfr folder
WEIGHT_EXTENSIONS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
FACE_DEVICES = ("auto", "cpu", "cuda")
RUNTIME_PACKAGES = {"diffusers": "diffusers", "transformers": "transformers", "accelerate": "accelerate",
                    "cv2": "opencv", "scipy": "scipy"}
FACE_PACKAGES = {"insightface": "insightface", "onnxruntime": "onnxruntime"}


def register_model_folders() -> None:
    for name in (CONTENT_FOLDER, ADAPTER_FOLDER, FACE_FOLDER):
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name))


def weight_files(folder: str) -> list[str]:
    try:
        names = folder_paths.get_filename_list(folder)
    except KeyError:
        return []
    return [name for name in names if name.lower().endswith(WEIGHT_EXTENSIONS)]


def face_model_packs() -> dict[str, Path]:
    """{pack name: folder} for every ``<insightface folder>/models/<pack>`` holding .onnx files."""
    packs: dict[str, Path] = {}
    try:
        roots = folder_paths.get_folder_paths(FACE_FOLDER)
    except KeyError:
        roots = []
    for root in roots:
        models = Path(root) / "models"
        if models.is_dir():
            for pack in sorted(models.iterdir()):
                if pack.is_dir() and pack.name not in packs and any(pack.glob("**/*.onnx")):
                    packs[pack.name] = pack
    return packs


def missing_packages(packages: dict[str, str]) -> list[str]:
    return [pip_name for module, pip_name in packages.items() if importlib.util.find_spec(module) is None]


def architecture_configs() -> str | None:
    """The first ``<models/ridfr folder>/configs`` holding a ``unet.json``, or None for SD1.5's own."""
    try:
        roots = folder_paths.get_folder_paths(CONTENT_FOLDER)
    except KeyError:
        return None
    for root in roots:
        if (Path(root) / ARCHITECTURE_FOLDER / "unet.json").is_file():
            return str(Path(root) / ARCHITECTURE_FOLDER)
    return None


def compute_dtype(module):
    """The dtype ComfyUI computes an SD1.5 UNet in, chosen the way ComfyUI chooses it for its own: the
    weight dtype (``--fp16-unet`` and the like, or what the device does best), unless ComfyUI
    casts those weights for compute (``unet_manual_cast``: always for float8, which is storage only, and
    for half precision on devices without it, e.g. the CPU). RIDFR's modules are small, so they are kept
    in that compute dtype instead of being stored in float8."""
    import comfy.model_management as mm

    weight = mm.unet_dtype(model_params=sum(p.numel() for p in module.parameters()))
    return mm.unet_manual_cast(weight, mm.get_torch_device()) or weight


def missing_model_files(values: dict) -> list[tuple[str, str, str, list[str]]]:
    """(option, models/ subfolder, file name, what that folder holds) for each chosen model that is not there.
    A linked input (None) is known only when the node runs."""
    checks = [("content_weights", CONTENT_FOLDER, weight_files), ("ipadapter", ADAPTER_FOLDER, weight_files),
              ("clip_vision", CLIP_FOLDER, weight_files),
              ("insightface", FACE_FOLDER + "/models", lambda folder: list(face_model_packs()))]
    missing = []
    for option, folder, listing in checks:
        value = values.get(option)
        if value is not None:
            available = listing(folder)
            if value not in available:
                missing.append((option, folder, value, available))
    return missing


def how_to_get(folder: str, name: str, available: list[str]) -> str:
    from ..ridfr_core.models import all_files

    file = next((file for file in all_files() if file.folder == folder and file.name == name), None)
    if file is None:
        found = ", ".join(available) or "nothing"
        return f"not a file RIDFR knows; put it there or pick one that is there (found: {found})"
    if not file.downloadable:
        return file.how_to_get
    licence = f"; licence: {file.licence.name}, {file.licence.terms}" if file.licence else ""
    return f"{file.what}, from {file.source}{licence}"


def download_hint(missing: list[tuple[str, str, str, list[str]]], values: dict) -> str:
    """How to fetch the registered files among ``missing`` at once, or '' when none can be downloaded."""
    from ..ridfr_core.models import BACKENDS, download_command

    names = {file.name for file in BACKENDS["restorerid"]} - {file.name for file in BACKENDS["ridfr"]}
    backend = "restorerid" if {values.get("content_weights"), values.get("ipadapter")} & names else "ridfr"
    command = download_command(backend, folder_paths.models_dir, [f"{folder}/{name}" for _, folder, name, _ in missing])
    if command is None:
        return ""
    return (f"\nDownload them in ComfyUI with 'Download missing RIDFR models' (offered when the workflow is "
            f"loaded), or with ComfyUI's Python in the RIDFR folder: {command}")


def load_problems(values: dict) -> str | None:
    """Everything LoadRIDFR cannot load with ``values``, in one message (every missing file, then missing
    packages), or None."""
    problems = []
    missing = missing_model_files(values)
    if missing:
        lines = [f"  - models/{folder}/{name} ({option}): {how_to_get(folder, name, available)}"
                 for option, folder, name, available in missing]
        problems.append(f"LoadRIDFR: {len(missing)} model file(s) missing:\n" + "\n".join(lines) + download_hint(missing, values)
                        + "\nThen press R (refresh) or pick files that are there.")
    error = invalid_choice("LoadRIDFR", "face_device", values.get("face_device"), FACE_DEVICES)
    if error:
        problems.append(error)
    packages = missing_packages(RUNTIME_PACKAGES) + missing_packages(FACE_PACKAGES)
    if packages:
        problems.append(f"LoadRIDFR: missing Python packages: {', '.join(packages)}. With ComfyUI's Python, in the RIDFR "
                        "folder: pip install -r requirements.txt && python install.py (it keeps the onnxruntime and "
                        "OpenCV you have).")
    return "\n".join(problems) or None


class LoadRIDFR(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        packs = list(face_model_packs())
        return io.Schema(
            node_id="LoadRIDFR",
            display_name="Load RIDFR",
            category="RIDFR",
            description="Loads the content module (RIDFR's content ControlNet or RestorerID's public LQ branch, "
                        "told apart by the file), the IP-Adapter FaceID Plus identity module, CLIP ViT-H and the "
                        "insightface face models. Connect the SD1.5 MODEL from a checkpoint loader to "
                        "ContentCondition / IdentityCondition.",
            inputs=[
                io.Combo.Input("content_weights", options=weight_files(CONTENT_FOLDER),
                               tooltip="The content module in models/ridfr: RIDFR content weights (.safetensors "
                                       "written by ridfr_core.train) or RestorerID's RestorerIDFull.ckpt (its LQ "
                                       "branch is converted once to a .safetensors in RIDFR_CACHE or "
                                       "~/.cache/ridfr; a converted file works here too)."),
                io.Combo.Input("ipadapter", options=weight_files(ADAPTER_FOLDER),
                               tooltip="IP-Adapter FaceID for SD1.5 in models/ipadapter: PlusV2 "
                                       "(ip-adapter-faceid-plusv2_sd15.bin) or Plus with RIDFR weights; Plus v1 "
                                       "(ip-adapter-faceid-plus_sd15.bin) with RestorerID weights."),
                io.Combo.Input("clip_vision", options=weight_files(CLIP_FOLDER),
                               tooltip="CLIP ViT-H/14 image encoder "
                                       "(CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors) in models/clip_vision."),
                io.Combo.Input("insightface", options=packs, default="buffalo_l" if "buffalo_l" in packs else None,
                               tooltip="insightface model pack in models/insightface/models/ (buffalo_l, which "
                                       "FaceID Plus was trained with, or antelopev2)."),
                io.Combo.Input("face_device", options=list(FACE_DEVICES), default="auto",
                               tooltip="Where face detection and ArcFace run (onnxruntime): auto uses CUDA when "
                                       "onnxruntime-gpu is installed."),
            ],
            outputs=[RIDFRModelsSocket.Output(display_name="ridfr", tooltip="The loaded RIDFR modules.")],
        )

    @classmethod
    def validate_inputs(cls, content_weights) -> bool | str:
        # One parameter, so that ComfyUI shows the message once; the other inputs come from the prompt.
        return load_problems(node_inputs(content_weights=content_weights)) or True

    @classmethod
    def execute(cls, content_weights, ipadapter, clip_vision, insightface, face_device) -> io.NodeOutput:
        from diffusers import UNet2DConditionModel
        from comfy.patcher_extension import CallbacksMP
        from ..ridfr_core.backends import backend_of, load_content
        from ..ridfr_core.weights import adapter_files, checkpoints

        configs = architecture_configs()
        try:
            content = load_content(folder_paths.get_full_path_or_raise(CONTENT_FOLDER, content_weights))
            backend = backend_of(content)
            adapter_path = Path(folder_paths.get_full_path_or_raise(ADAPTER_FOLDER, ipadapter))
            try:
                shortcut = backend.faceid_shortcut(adapter_path)
            except checkpoints.CheckpointError as error:
                raise NodeError("LoadRIDFR", "ipadapter", str(error)) from None
            unet_layout = checkpoints.on_meta(
                lambda: UNet2DConditionModel(**checkpoints.load_config("unet", configs)))
            adapter, lora = adapter_files.load_identity_adapter(adapter_path, unet_layout, shortcut)
            clip = checkpoints.load_clip_vision(folder_paths.get_full_path_or_raise(CLIP_FOLDER, clip_vision), configs)
        except checkpoints.CheckpointError as error:
            raise NodeError("LoadRIDFR", None, str(error)) from None
        face_models = face_model_packs().get(insightface)
        if face_models is None:
            raise NodeError("LoadRIDFR", "insightface", f"model pack '{insightface}' is not in models/insightface/"
                            "models/ any more; put buffalo_l there or pick another pack.")
        for module in (content, adapter, clip):
            module.requires_grad_(False).to(dtype=compute_dtype(module))
        loaded = LoadedRIDFR(content=whole_module_patcher(content), backend=backend, adapter=whole_module_patcher(adapter),
                             lora=lora, clip_vision=whole_module_patcher(clip), face_models=face_models,
                             face_device=face_device)
        # the face-analysis sessions are no ModelPatcher: they go when ComfyUI unloads the CLIP vision model
        loaded.clip_vision.add_callback(CallbacksMP.ON_DETACH, loaded.release_face_analyzer)
        return io.NodeOutput(loaded)
