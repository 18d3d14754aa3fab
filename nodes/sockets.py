"""The values that travel between RIDFR nodes (ComfyUI sockets RIDFR_MODELS, RIDFR_IDENTITY, RIDFR_FACES).

They hold loaded modules and tensors only, are never mutated after a node returns them (ComfyUI may
hand one output to several nodes and cache it), and carry no reference to a node class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from comfy_api.latest import io

RIDFRModelsSocket = io.Custom("RIDFR_MODELS")
IdentitySocket = io.Custom("RIDFR_IDENTITY")
FacesSocket = io.Custom("RIDFR_FACES")


class NodeError(ValueError):
    """A user-facing error: ``NodeError("ContentCondition", "image", "what was wrong; how to fix it")``."""

    def __init__(self, node: str, option: str | None, message: str):
        where = f"{node} ({option})" if option else node
        super().__init__(f"{where}: {message}")


def invalid_choice(node: str, option: str, value, choices) -> str | None:
    """``validate_inputs`` message for a value outside ``choices``, or None when it is fine. ``None`` is
    a linked input (ComfyUI validates before upstream nodes run and passes None for those), accepted
    here like ComfyUI's own combo check accepts links."""
    if value is None or value in choices:
        return None
    return f"{node} ({option}): '{value}' is not one of {', '.join(map(str, choices))}."


class ModuleHolder(torch.nn.Module):
    """The root module ComfyUI's ModelPatcher manages; ``.module`` is the RIDFR module itself."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module


def module_of(patcher) -> torch.nn.Module:
    return patcher.model.module


@dataclass(eq=False)
class LoadedRIDFR:
    """Output of LoadRIDFR. Each module is wrapped in a ComfyUI ModelPatcher so that ComfyUI's model
    management moves it to the GPU with the diffusion model and offloads it under memory pressure."""

    content: object            # ModelPatcher around ContentControlNet (RIDFR) or restorerid.LQBranch (RestorerID)
    backend: object            # ridfr_core.backends.Backend of the content module (published sampling defaults)
    adapter: object            # ModelPatcher around ridfr_core.identity.adapter.IdentityAdapter
    lora: dict                 # {diffusers UNet param name: (up, down)}: the FaceID LoRA, low-rank
    clip_vision: object        # ModelPatcher around transformers CLIPVisionModelWithProjection
    face_models: Path          # insightface model pack folder (…/models/<pack>)
    face_device: str           # onnxruntime device: auto, cpu or cuda
    derived: dict = field(default_factory=dict)  # constants computed once from these modules (null identity)

    def face_analyzer(self):
        """The insightface sessions of this model pack, made at first use and held here until ComfyUI frees
        memory (:meth:`release_face_analyzer` runs when it unloads the CLIP vision model)."""
        from ..ridfr_core.faces.analysis import FaceAnalyzer

        if "face_analyzer" not in self.derived:
            self.derived["face_analyzer"] = FaceAnalyzer(self.face_models, device=self.face_device)
        return self.derived["face_analyzer"]

    def release_face_analyzer(self, *_detach_args) -> None:
        self.derived.pop("face_analyzer", None)


@dataclass(eq=False)
class FaceIdentity:
    """An identity condition. ``adapter_input`` has B=1 (one person, for every face) or one entry per face
    (after MatchIdentities); ``face_scales`` (B,) multiplies the identity weight per face (0 = restore
    that face without identity) or is None (1 for all); ``embedding`` is the combined ArcFace
    embedding used to recognise this person in a photo (None for per-face identities)."""

    adapter_input: object      # ridfr_core.identity.adapter.Identity: what the identity adapter turns into tokens
    embedding: np.ndarray | None
    face_scales: torch.Tensor | None
    label: str


@dataclass(eq=False)
class PhotoFaces:
    """One photo of a whole-photo batch: the photo with its detected and aligned faces, whose crops are
    ``FaceBatch.lq[first:first + len(photo.faces)]``."""

    photo: object              # ridfr_core.faces.FacesInPhoto
    first: int


@dataclass(eq=False)
class FaceBatch:
    """Output of ContentCondition: the aligned LQ faces that were conditioned on, (F,3,S,S) in [0,1],
    in whole-photo mode where they came from (for pasting the restored faces back), and the backend of
    the content module that conditioned on them (RIDFRSample's defaults); for video frames each face's track."""

    lq: torch.Tensor
    photos: list[PhotoFaces] | None
    backend: object            # ridfr_core.backends.Backend
    tracks: list[int] | None = None  # with track_faces: the track of each face across the frames

    def seed_offsets(self) -> list[int]:
        """Face i samples with seed + offset: its track (one noise per face through a video), else i."""
        return list(self.tracks) if self.tracks is not None else list(range(self.count))

    @property
    def count(self) -> int:
        return self.lq.shape[0]

    @property
    def size(self) -> int:
        return self.lq.shape[-1]


def image_to_nchw(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE (B,H,W,C) in [0,1] -> (B,3,H,W) float."""
    return image[..., :3].permute(0, 3, 1, 2).float()


def nchw_to_image(tensor: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) in [0,1] -> ComfyUI IMAGE (B,H,W,3) float32 on the CPU."""
    return tensor.detach().float().cpu().clamp(0, 1).permute(0, 2, 3, 1).contiguous()
