"""Every model file a backend needs: where it goes in a ComfyUI-style ``models/`` folder, where it comes
from, how big it is and under which licence. The one place that knows these names (the CLI, the nodes'
workflows and the downloader read them from here).

Hub files carry no pinned hash: the downloader checks them against the sha256 the hub publishes for the
LFS object. Files from elsewhere (the insightface release zip) carry a pinned size and sha256.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

HUB_URL = "https://huggingface.co"


@dataclass(frozen=True)
class Licence:
    name: str
    url: str
    terms: str


SD_LICENCE = Licence("CreativeML Open RAIL-M", "https://huggingface.co/spaces/CompVis/stable-diffusion-license",
                     "commercial use allowed; the licence's use restrictions apply")
CLIP_LICENCE = Licence("MIT (OpenCLIP ViT-H/14, LAION-2B)", "https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                       "free use, keep the copyright notice")
FACEID_LICENCE = Licence("IP-Adapter-FaceID model card", "https://huggingface.co/h94/IP-Adapter-FaceID",
                         "non-commercial research use only (trained on insightface's recognition model)")
INSIGHTFACE_LICENCE = Licence("insightface pretrained models", "https://github.com/deepinsight/insightface#license",
                              "non-commercial research use only")
DIFFBIR_LICENCE = Licence("DiffBIR model card", "https://huggingface.co/lxq007/DiffBIR",
                          "check the model card before use (DiffBIR's code is Apache-2.0)")
MUSIQ_LICENCE = Licence("MUSIQ checkpoints: Apache-2.0 (Google Research)",
                        "https://github.com/google-research/google-research/tree/master/musiq",
                        "free use, keep the notice; the .pth is IQA-PyTorch's conversion of Google's release "
                        "(IQA-PyTorch's own code is PolyForm Noncommercial 1.0.0)")
RESTORERID_LICENCE = Licence("RestorerID weights", "https://huggingface.co/YingJiacheng/RestorerID",
                             "non-commercial research use only (built on IP-Adapter-FaceID and insightface)")


@dataclass(frozen=True)
class ModelFile:
    """One file (or, with ``members``, one unpacked archive folder) under ``models/<folder>/<name>``.

    Exactly one source: ``repo`` + ``path`` (a Hugging Face hub file), ``url`` (a pinned download) or
    ``how_to_get`` (not downloadable, e.g. weights you train yourself).
    """

    folder: str
    name: str
    what: str
    licence: Licence | None = None
    repo: str | None = None
    path: str | None = None
    revision: str = "main"
    url: str | None = None
    sha256: str | None = None
    size: int | None = None  # exact bytes when pinned
    approx_size: float | None = None  # bytes, for planning disk space before the hub says exactly
    members: dict[str, tuple[int, str]] = field(default_factory=dict)  # archive: {file: (size, sha256)}
    needed: tuple[str, ...] = ()  # the members that are used; the others may be absent
    how_to_get: str | None = None

    @property
    def relative(self) -> str:
        return f"{self.folder}/{self.name}"

    @property
    def downloadable(self) -> bool:
        return self.how_to_get is None

    @property
    def source(self) -> str:
        if self.repo:
            return f"{HUB_URL}/{self.repo} ({self.path})"
        return self.url or self.how_to_get or ""

    def frontend_entry(self) -> dict | None:
        """ComfyUI frontend's ``properties.models`` entry (missing-models dialog), for single hub files."""
        if not self.repo:
            return None
        return {"name": self.name, "url": f"{HUB_URL}/{self.repo}/resolve/{self.revision}/{self.path}",
                "directory": self.folder}


SD15 = ModelFile(
    "checkpoints", "v1-5-pruned-emaonly-fp16.safetensors", "Stable Diffusion 1.5 (EMA weights, fp16)", SD_LICENCE,
    repo="Comfy-Org/stable-diffusion-v1-5-archive", path="v1-5-pruned-emaonly-fp16.safetensors", approx_size=2.13e9)
CLIP_VIT_H = ModelFile(
    "clip_vision", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", "CLIP ViT-H/14 image encoder", CLIP_LICENCE,
    repo="h94/IP-Adapter", path="models/image_encoder/model.safetensors", approx_size=2.53e9)
BUFFALO_L = ModelFile(
    "insightface/models", "buffalo_l", "insightface buffalo_l pack (SCRFD detector, ArcFace)", INSIGHTFACE_LICENCE,
    url="https://github.com/deepinsight/insightface/releases/download/v0.7/buffalo_l.zip",
    sha256="80ffe37d8a5940d59a7384c201a2a38d4741f2f3c51eef46ebb28218a7b0ca2f", size=288_621_354,
    members={
        "1k3d68.onnx": (143_607_619, "df5c06b8a0c12e422b2ed8947b8869faa4105387f199c477af038aa01f9a45cc"),
        "2d106det.onnx": (5_030_888, "f001b856447c413801ef5c42091ed0cd516fcd21f2d6b79635b1e733a7109dbf"),
        "det_10g.onnx": (16_923_827, "5838f7fe053675b1c7a08b633df49e7af5495cee0493c7dcf6697200b85b5b91"),
        "genderage.onnx": (1_322_532, "4fde69b1c810857b88c64a335084f1c3fe8f01246c9a191b48c7bb756d6652fb"),
        "w600k_r50.onnx": (174_383_860, "4c06341c33c2ca1f86781dab0e829f88ad5b64be9fba56e56bc9ebdefc619e43"),
    }, needed=("det_10g.onnx", "w600k_r50.onnx"))
FACEID_PLUS_V2 = ModelFile(
    "ipadapter", "ip-adapter-faceid-plusv2_sd15.bin", "IP-Adapter-FaceID-Plus v2 for SD1.5", FACEID_LICENCE,
    repo="h94/IP-Adapter-FaceID", path="ip-adapter-faceid-plusv2_sd15.bin", approx_size=1.56e8)
FACEID_PLUS_V1 = ModelFile(
    "ipadapter", "ip-adapter-faceid-plus_sd15.bin", "IP-Adapter-FaceID-Plus (v1) for SD1.5", FACEID_LICENCE,
    repo="h94/IP-Adapter-FaceID", path="ip-adapter-faceid-plus_sd15.bin", approx_size=1.56e8)
RIDFR_CONTENT = ModelFile(
    "ridfr", "ridfr-sd15.safetensors", "RIDFR content weights",
    how_to_get="no public weights: train them with `python -m ridfr_core.train` and put the .safetensors here")
# Size estimated from the layout RestorerID's code builds (1.95 G parameters, fp32 but for the fp16 identity
# Adapter; not checked against the hub from here): shown as "~6.5 GB"; the download takes the hub's exact size.
RESTORERID = ModelFile(
    "ridfr", "RestorerIDFull.ckpt", "RestorerID weights", RESTORERID_LICENCE,
    repo="YingJiacheng/RestorerID", path="RestorerIDFull.ckpt", approx_size=6.46e9)

# RestorerID's adaptive identity scale scores each LQ face with pyiqa's MUSIQ (KonIQ-10k); ridfr_core.musiq
# reads this file. The name's suffix is torch.hub's sha256 prefix.
MUSIQ_KONIQ = ModelFile(
    "pyiqa", "musiq_koniq_ckpt-e95806b9.pth", "MUSIQ KonIQ-10k quality model (RestorerID's `auto` identity scale)",
    MUSIQ_LICENCE,
    url="https://github.com/chaofengc/IQA-PyTorch/releases/download/v0.1-weights/musiq_koniq_ckpt-e95806b9.pth",
    sha256="e95806b9eae5f3814c410f574ba8e552362bd5bc63d758ed5b97860f5d6185aa", size=108_610_983)

# Estimated from DiffBIR's face SwinIR configuration (15.8 M fp32 parameters); the hub gives the exact size.
FACE_SWINIR = ModelFile(
    "upscale_models", "face_swinir_v1.ckpt", "DiffBIR's stage-1 face SwinIR (the paper's pre-processing, optional)",
    DIFFBIR_LICENCE, repo="lxq007/DiffBIR", path="face_swinir_v1.ckpt", approx_size=6.4e7)

BACKENDS: dict[str, tuple[ModelFile, ...]] = {
    "ridfr": (SD15, RIDFR_CONTENT, FACEID_PLUS_V2, CLIP_VIT_H, BUFFALO_L),
    "restorerid": (RESTORERID, SD15, FACEID_PLUS_V1, CLIP_VIT_H, BUFFALO_L, MUSIQ_KONIQ),  # the checkpoint first
}
# Files needed only where a file fetched with them lacks what they hold: {file: (holder, part, why)}.
# RestorerIDFull.ckpt is RestorerID's whole model: the SD1.5 it was trained against, the FaceID LoRA and K/V
# merged into the UNet and usually the identity Adapter (CLIP ViT-H/14 and FaceID image projection); which
# parts it holds is read from its key names once it is here (the backend's bundled_parts), so it is fetched
# first and these only for a part it lacks (ridfr_core.models.plan, for the CLI and ComfyUI's dialog alike).
HELD_BY = {
    SD15.relative: (RESTORERID, "base", "the SD1.5 RestorerID was trained against"),
    FACEID_PLUS_V1.relative: (RESTORERID, "adapter", "FaceID Plus v1's LoRA, K/V and image projection"),
    CLIP_VIT_H.relative: (RESTORERID, "clip_vision", "the CLIP ViT-H/14 vision tower"),
}
LICENCE_FLAG = "--accept-licences"


def all_files() -> list[ModelFile]:
    """Every registered file once (backends share some), with the optional pre-processing model."""
    files = [file for backend in BACKENDS.values() for file in backend] + [FACE_SWINIR]
    return list({file.relative: file for file in files}.values())


def frontend_models(widget_values: list) -> list[dict]:
    """A node's ``properties.models``: the frontend entry of each registered hub file a widget names."""
    entries = {file.name: file.frontend_entry() for file in all_files() if file.frontend_entry()}
    return [entries[value] for value in widget_values if isinstance(value, str) and value in entries]


def registered_file(files: tuple[ModelFile, ...], relative: str) -> ModelFile | None:
    """The file of ``files`` at ``relative`` (``folder/name``), else the one kept in that path's folder."""
    path = PurePosixPath(relative)
    exact = [file for file in files if PurePosixPath(file.relative) == path]
    return (exact or [file for file in files if file.folder == str(path.parent)] or [None])[0]


def download_command(backend: str, models: Path | str, missing: list[str]) -> str | None:
    """The command that fetches the downloadable ones of ``missing`` (paths relative to ``models``:
    ``folder/name``, or any name in a registered folder), or None when none of them can be downloaded."""
    files = BACKENDS[backend]
    if not any(file and file.downloadable for file in (registered_file(files, path) for path in missing)):
        return None
    return (f"python -m ridfr_core.models download --backend {backend} --models {shlex.quote(str(models))} "
            f"{LICENCE_FLAG}")
