"""LoadRIDFR: the one place where the content file decides the rest.

The content file (models/ridfr) tells the backend apart; each "auto" choice follows it as the CLI does (see
:mod:`.model_files`): with RestorerID's ``RestorerIDFull.ckpt`` the SD1.5 base (MODEL, CLIP, VAE), FaceID Plus v1
and CLIP ViT-H come from that one file, read once; with RIDFR content weights, SD1.5 from models/checkpoints,
FaceID PlusV2 and CLIP ViT-H from their folders. The base is loaded by ComfyUI's own checkpoint loader, so the
MODEL is ComfyUI's like any checkpoint's and no second copy of the file is put on disk.

``models/ridfr/configs`` (optional): architecture configs like ``ridfr_core/configs/sd15`` (``unet.json``,
``clip_vision.json``) for SD1.5-family models of other sizes, such as the tests' tiny ones; without it
the UNet layout the adapter is laid out for and the CLIP vision architecture are SD1.5's and ViT-H's.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import folder_paths
from comfy_api.latest import io

from .memory import whole_module_patcher
from .model_files import (ADAPTER_FOLDER, AUTO, BASE_FOLDER, CLIP_FOLDER, CONTENT_FOLDER, FACE_FOLDER,  # noqa: F401
                          Chosen, chosen_files, content_backend_name, face_model_packs, files_needed,
                          missing_model_files, register_model_folders, weight_files)
from .sockets import LoadedRIDFR, NodeError, RIDFRModelsSocket, invalid_choice
from .validation import checked_by_comfyui, node_inputs

ARCHITECTURE_FOLDER = "configs"  # inside a models/ridfr folder
FACE_DEVICES = ("auto", "cpu", "cuda")
RUNTIME_PACKAGES = {"diffusers": "diffusers", "transformers": "transformers", "accelerate": "accelerate",
                    "cv2": "opencv", "scipy": "scipy"}
FACE_PACKAGES = {"insightface": "insightface", "onnxruntime": "onnxruntime"}
VALIDATED = "content_weights"  # the one input validate_inputs names


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


def how_to_get(file: Chosen, available: list[str]) -> str:
    from ..ridfr_core.models import all_files
    from ..ridfr_core.models.registry import HELD_BY

    registered = next((entry for entry in all_files() if entry.folder == file.folder and entry.name == file.name), None)
    if registered is None:
        found = ", ".join(available) or "nothing"
        return f"not a file RIDFR knows; put it there or pick one that is there (found: {found})"
    if not registered.downloadable:
        return registered.how_to_get
    licence = f"; licence: {registered.licence.name}, {registered.licence.terms}" if registered.licence else ""
    held = [why for holder, _, why in HELD_BY.values() if holder == registered]
    holds = f"; it holds {', '.join(held)}: the 'auto' choices take those from it" if held else ""
    return f"{registered.what}, from {registered.source}{licence}{holds}"


def download_hint(missing: list[tuple[Chosen, list[str]]], values: dict) -> str:
    """How to fetch the registered files among ``missing`` at once, or '' when none can be downloaded."""
    from ..ridfr_core.models import BACKENDS, download_command

    backend = content_backend_name(values)
    if backend is None:
        names = {file.name for file in BACKENDS["restorerid"]} - {file.name for file in BACKENDS["ridfr"]}
        backend = "restorerid" if any(file.name in names for file, _ in missing) else "ridfr"
    command = download_command(backend, folder_paths.models_dir, [f"{file.folder}/{file.name}" for file, _ in missing])
    if command is None:
        return ""
    return (f"\nDownload them in ComfyUI with 'Download missing RIDFR models' (offered when the workflow is "
            f"loaded), or with ComfyUI's Python in the RIDFR folder: {command}")


def load_problems(values: dict, skip: set[str] = frozenset()) -> str | None:
    """Everything LoadRIDFR cannot load with ``values``, in one message (every missing file, then missing
    packages), or None. ``skip``: plain choices that ComfyUI checks itself."""
    problems = []
    missing = missing_model_files(values)
    if missing:
        lines = [f"  - models/{file.folder}/{file.name} ({file.option}{': auto' if file.auto else ''}): "
                 f"{how_to_get(file, found)}" for file, found in missing]
        problems.append(f"LoadRIDFR: {len(missing)} model file(s) missing:\n" + "\n".join(lines) + download_hint(missing, values)
                        + "\nThen press R (refresh) or pick files that are there.")
    error = None if "face_device" in skip else invalid_choice("LoadRIDFR", "face_device", values.get("face_device"),
                                                               FACE_DEVICES)
    if error:
        problems.append(error)
    packages = missing_packages(RUNTIME_PACKAGES) + missing_packages(FACE_PACKAGES)
    if packages:
        problems.append(f"LoadRIDFR: missing Python packages: {', '.join(packages)}. With ComfyUI's Python, in the RIDFR "
                        "folder: pip install -r requirements.txt && python install.py (it keeps the onnxruntime and "
                        "OpenCV you have).")
    return "\n".join(problems) or None


def file_path(file: Chosen) -> Path:
    return Path(folder_paths.get_full_path_or_raise(file.folder, file.name))


def load_base(file: Chosen, backend, state, content_path: Path):
    """(MODEL, CLIP, VAE) with ComfyUI's own loader: from the tensors of the content file already in memory, or
    from the chosen checkpoint."""
    import comfy.sd

    embeddings = folder_paths.get_folder_paths("embeddings")
    if file.from_content:
        loaded = comfy.sd.load_state_dict_guess_config(backend.sd15_part(state), output_vae=True, output_clip=True,
                                                      embedding_directory=embeddings)
        if loaded is None:
            raise NodeError("LoadRIDFR", "base", f"ComfyUI found no SD1.5 in {content_path.name}; choose a checkpoint "
                            "as base.")
        return loaded[:3]
    try:
        return comfy.sd.load_checkpoint_guess_config(str(file_path(file)), output_vae=True, output_clip=True,
                                                     embedding_directory=embeddings)[:3]
    except RuntimeError as error:
        raise NodeError("LoadRIDFR", "base", f"{file.name}: {error}") from None


def load_identity(files: dict[str, Chosen], backend, state, content_path: Path, configs):
    """(IdentityAdapter, FaceID LoRA, CLIP vision): each from its file or from the content file's tensors."""
    from diffusers import UNet2DConditionModel
    from ..ridfr_core.weights import adapter_files, checkpoints

    unet_layout = checkpoints.on_meta(lambda: UNet2DConditionModel(**checkpoints.load_config("unet", configs)))
    if files["ipadapter"].from_content:
        adapter, lora = backend.bundled_adapter(content_path, unet_layout, state)
    else:
        adapter_path = file_path(files["ipadapter"])
        try:
            shortcut = backend.faceid_shortcut(adapter_path)
        except checkpoints.CheckpointError as error:
            raise NodeError("LoadRIDFR", "ipadapter", str(error)) from None
        adapter, lora = adapter_files.load_identity_adapter(adapter_path, unet_layout, shortcut)
    if files["clip_vision"].from_content:
        clip = backend.bundled_clip_vision(content_path, configs, state)
    else:
        clip = checkpoints.load_clip_vision(file_path(files["clip_vision"]), configs)
    return adapter, lora, clip


class LoadRIDFR(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        packs = list(face_model_packs())

        def choice(option, folder_list, tooltip):
            return io.Combo.Input(option, options=[AUTO, *folder_list], default=AUTO, tooltip=tooltip)

        return io.Schema(
            node_id="LoadRIDFR",
            display_name="Load RIDFR",
            category="RIDFR",
            description="Loads the content module (RIDFR's content ControlNet or RestorerID's public LQ branch, "
                        "told apart by the file) and what goes with it: the SD1.5 base (MODEL, CLIP, VAE), the "
                        "IP-Adapter FaceID Plus identity module, CLIP ViT-H and the insightface face models. 'auto' "
                        "takes each from the content file where it holds it (RestorerIDFull.ckpt: its own SD1.5, "
                        "FaceID Plus v1, CLIP ViT-H), else the file the content module was trained with.",
            inputs=[
                io.Combo.Input("content_weights", options=weight_files(CONTENT_FOLDER),
                               tooltip="The content module in models/ridfr: RestorerID's public RestorerIDFull.ckpt "
                                       "(its LQ branch is converted once to a .safetensors in RIDFR_CACHE or "
                                       "~/.cache/ridfr; a converted or fine-tuned file works here too) or RIDFR "
                                       "content weights (.safetensors written by ridfr_core.train). The 'auto' "
                                       "choices below follow it."),
                choice("ipadapter", weight_files(ADAPTER_FOLDER),
                       "IP-Adapter FaceID Plus for SD1.5 in models/ipadapter. auto: the one the content module was "
                       "trained with: RestorerID's checkpoint's own copy (else ip-adapter-faceid-plus_sd15.bin, v1); "
                       "PlusV2 (ip-adapter-faceid-plusv2_sd15.bin) with RIDFR weights."),
                choice("clip_vision", weight_files(CLIP_FOLDER),
                       "CLIP ViT-H/14 image encoder in models/clip_vision. auto: the content file's own when it holds "
                       "it, else CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors."),
                io.Combo.Input("insightface", options=[AUTO, *packs], default=AUTO,
                               tooltip="insightface model pack in models/insightface/models/. auto: buffalo_l (which "
                                       "FaceID Plus was trained with), else antelopev2."),
                io.Combo.Input("face_device", options=list(FACE_DEVICES), default="auto",
                               tooltip="Where face detection and ArcFace run (onnxruntime): auto uses CUDA when "
                                       "onnxruntime-gpu is installed."),
                choice("base", weight_files(BASE_FOLDER),
                       "The SD1.5 base (MODEL, CLIP and VAE outputs), in models/checkpoints. auto: the one inside "
                       "RestorerIDFull.ckpt (the non-EMA SD1.5 RestorerID was trained against: the publisher's image); "
                       "with RIDFR weights v1-5-pruned-emaonly-fp16.safetensors (or the only checkpoint there). Any "
                       "SD1.5 fine-tune works."),
            ],
            outputs=[RIDFRModelsSocket.Output(display_name="ridfr", tooltip="The loaded RIDFR modules."),
                     io.Model.Output(display_name="MODEL", tooltip="The SD1.5 base, for Content Condition."),
                     io.Clip.Output(display_name="CLIP", tooltip="The base's text encoder, for RIDFR Sample or "
                                                                 "CLIP Text Encode."),
                     io.Vae.Output(display_name="VAE", tooltip="The base's VAE, for Content Condition and RIDFR "
                                                               "Sample or VAE Decode.")],
        )

    @classmethod
    def validate_inputs(cls, content_weights) -> bool | str:
        # One parameter, so that ComfyUI shows the message once; the other inputs come from the prompt.
        values = node_inputs(content_weights=content_weights)
        return load_problems(values, checked_by_comfyui(("face_device",), VALIDATED)) or True

    @classmethod
    def execute(cls, content_weights, ipadapter, clip_vision, insightface, face_device, base=AUTO) -> io.NodeOutput:
        from comfy.patcher_extension import CallbacksMP
        from ..ridfr_core.backends import backend_of, load_content
        from ..ridfr_core.weights import checkpoints

        values = {"content_weights": content_weights, "ipadapter": ipadapter, "clip_vision": clip_vision,
                  "insightface": insightface, "face_device": face_device, "base": base}
        problem = load_problems(values)  # linked inputs are known now
        if problem:
            raise ValueError(problem)
        files = {file.option: file for file in chosen_files(values)}
        content_path = file_path(files["content_weights"])
        configs = architecture_configs()
        try:
            # read once: the content module and the parts the file holds come from the same tensors
            own = any(file.from_content for file in files.values())
            state = checkpoints.read_state_dict(content_path, "content weights") if own else None
            content = load_content(content_path, state=state)
            backend = backend_of(content)
            model, clip_text, vae = load_base(files["base"], backend, state, content_path)
            adapter, lora, clip = load_identity(files, backend, state, content_path, configs)
        except checkpoints.CheckpointError as error:
            raise NodeError("LoadRIDFR", None, str(error)) from None
        del state
        face_models = face_model_packs().get(files["insightface"].name)
        for module in (content, adapter, clip):
            module.requires_grad_(False).to(dtype=compute_dtype(module))
        loaded = LoadedRIDFR(content=whole_module_patcher(content), backend=backend, adapter=whole_module_patcher(adapter),
                             lora=lora, clip_vision=whole_module_patcher(clip), face_models=face_models,
                             face_device=face_device)
        # the face-analysis sessions are no ModelPatcher: they go when ComfyUI unloads the CLIP vision model
        loaded.clip_vision.add_callback(CallbacksMP.ON_DETACH, loaded.release_face_analyzer)
        return io.NodeOutput(loaded, model, clip_text, vae)
