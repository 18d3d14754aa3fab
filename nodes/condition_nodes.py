"""ContentCondition (LQ faces -> content patch) and IdentityCondition (identity -> attention patch)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from comfy_api.latest import io, ui

from ..ridfr_core.constants import LATENT_CHANNELS, LATENT_FACTOR, ON_NO_FACE
from .patches import IdentityTokens, SigmaRange, apply_content, apply_identity
from .restorerid_patches import add_balance_tokens, apply_structure
from .sockets import (FaceBatch, FacesSocket, IdentitySocket, NodeError, PhotoFaces, RIDFRModelsSocket, invalid_choice,
                    module_of)
from .vae_moments import encode_moments
from .validation import checked_by_comfyui, node_inputs, upstream_inputs

logger = logging.getLogger(__name__)
INPUT_MODES = ("aligned faces", "whole photo")
BACKEND_DEFAULT = "backend default"
AUTO_WEIGHT = (BACKEND_DEFAULT, "on", "off")
SWITCH_VALUES = {True: "on", False: "off"}


def aligned_faces(image: torch.Tensor, face_size: int, backend) -> FaceBatch:
    from ..ridfr_core.faces import FaceError, prepare_aligned

    try:
        lq = prepare_aligned(image.cpu().numpy(), face_size=face_size)
    except FaceError as error:
        raise NodeError("ContentCondition", "image", str(error)) from None
    return FaceBatch(lq=lq, photos=None, backend=backend)


def faces_in_photos(ridfr, image: torch.Tensor, face_size: int, on_no_face: str, track: bool = False) -> FaceBatch:
    """Every face of every photo, detected and aligned; with ``track`` the photos are frames of a video and
    each face gets its track (faces followed from frame to frame by box overlap)."""
    from ..ridfr_core.archive.tracking import track_faces
    from ..ridfr_core.faces import FaceError, detect_and_align

    analyzer = ridfr.face_analyzer()
    photos, first = [], 0
    for number, frame in enumerate(image):
        try:
            photo = detect_and_align(analyzer, frame.cpu().numpy(), on_no_face=on_no_face, face_size=face_size,
                                     name=f"photo {number}")
        except FaceError as error:
            raise NodeError("ContentCondition", "image", f"{error} Or set on_no_face to 'skip' for batches where "
                            "some photos show nobody.") from None
        photos.append(PhotoFaces(photo=photo, first=first))
        first += len(photo.faces)
    if first == 0:
        raise NodeError("ContentCondition", "image", f"no face in any of the {len(image)} photo(s); nothing to restore.")
    tracks = None
    if track:
        boxes = [np.array([face.bbox for face in entry.photo.faces]).reshape(-1, 4) for entry in photos]
        tracks = [number for frame in track_faces(boxes) for number in frame]
    return FaceBatch(lq=torch.cat([photo.photo.crops for photo in photos]), photos=photos, backend=ridfr.backend,
                     tracks=tracks)



def null_identity_tokens(ridfr) -> torch.Tensor:
    """(1,4,C) tokens of FaceID-Plus' null identity: the uncond side of identity guidance, and what RestorerID's
    IDBalance reads for faces without an identity (as in its training). Computed once per loaded model (it
    depends only on the frozen adapter and CLIP), then shared by Content and Identity Condition."""
    import comfy.model_management as mm
    from ..ridfr_core.identity.adapter import null_identity

    if "null_tokens" not in ridfr.derived:
        mm.load_models_gpu([ridfr.adapter, ridfr.clip_vision])
        with torch.no_grad():
            clip = module_of(ridfr.clip_vision)
            ridfr.derived["null_tokens"] = module_of(ridfr.adapter).identity_tokens(null_identity(clip)).float().cpu()
    return ridfr.derived["null_tokens"]


def lq_posterior(model, vae, lq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE posterior of the LQ faces (F,3,S,S) in [0,1], scaled like the UNet's input
    (``latent_format.process_in``). RestorerID's structure encoder reads a sample ``mean + std * eps``;
    ComfyUI's VAE Encode returns only the mean, so the moments are encoded (batched like it: .vae_moments)."""
    mean, logvar = encode_moments(vae, lq).chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    latent_format = model.get_model_object("latent_format")
    return latent_format.process_in(mean).cpu(), (std * latent_format.scale_factor).cpu()


VALIDATED = ("input_mode", "on_no_face", "start_percent", "end_percent")


def ridfr_content(model, ridfr, lq_faces: torch.Tensor, vae, strength: float, sigmas: SigmaRange):
    """RIDFR: the content ControlNet's residuals from the LQ faces resized to the latent size."""
    return apply_content(model, ridfr, lq_faces, strength, sigmas)


def restorerid_content(model, ridfr, lq_faces: torch.Tensor, vae, strength: float, sigmas: SigmaRange):
    """RestorerID: the structure encoder reads a sample of the LQ faces' VAE posterior at every step."""
    mean, std = lq_posterior(model, vae, lq_faces)
    return apply_structure(model, ridfr, mean, strength, sigmas, null_identity_tokens(ridfr), std)


@dataclass(frozen=True)
class ComfyBackend:
    """How a content backend (``ridfr_core.backends``) patches ComfyUI's MODEL: the node-side twin of its core
    package. A third backend adds its entry to :data:`COMFY_BACKENDS`."""

    needs_vae: bool                            # its content input is the LQ faces' VAE latent
    condition: Callable                        # (model, ridfr, lq_faces, vae, strength, sigmas) -> patched MODEL
    identity_reader: Callable | None = None    # (patched, tokens): a module of it that also reads the tokens


COMFY_BACKENDS = {"ridfr": ComfyBackend(False, ridfr_content),
                  "restorerid": ComfyBackend(True, restorerid_content, add_balance_tokens)}


def content_problems(input_mode, on_no_face, start_percent, end_percent, skip: set[str] = frozenset()) -> str | None:
    """What is wrong with ContentCondition's choices (None for a linked input: known when it runs; ``skip``:
    plain choices that ComfyUI checks itself)."""
    for option, value, choices in (("on_no_face", on_no_face, ON_NO_FACE), ("input_mode", input_mode, INPUT_MODES)):
        error = None if option in skip else invalid_choice("ContentCondition", option, value, choices)
        if error:
            return error
    for option, value in (("start_percent", start_percent), ("end_percent", end_percent)):
        if value is not None and not 0.0 <= value <= 1.0:
            return f"ContentCondition ({option}): {value} is outside 0..1."
    if start_percent is not None and end_percent is not None and start_percent > end_percent:
        return (f"ContentCondition (start_percent): {start_percent} is after end_percent {end_percent}; the "
                "condition would never be active.")
    return None


class ContentCondition(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ContentCondition",
            display_name="Content Condition (RIDFR)",
            category="RIDFR",
            description="Patches a clone of the MODEL so that the content module sees the low-quality faces at "
                        "every step: RIDFR's content ControlNet (the noisy latent + the LQ image, resized to latent "
                        "size) or RestorerID's LQ branch (the LQ faces' VAE latent modulates 22 UNet ResBlocks). "
                        "Works with RIDFR Sample and with a plain KSampler (use the latent output).",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.5 MODEL (any fine-tune; LoRAs and other patches compose)."),
                RIDFRModelsSocket.Input("ridfr", tooltip="The modules from Load RIDFR."),
                io.Image.Input("image", tooltip="Low-quality faces: aligned face crops (a batch) or whole photos, "
                                                "see input_mode."),
                io.Combo.Input("input_mode", options=list(INPUT_MODES), default="aligned faces",
                               tooltip="'aligned faces': each image is an FFHQ-aligned face crop (the paper's "
                                       "setting; nothing is detected). 'whole photo': every face is detected, "
                                       "aligned and later pasted back."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.05,
                               tooltip="Scale of the content condition, 1.0 as trained: RIDFR's content residuals, "
                                       "or RestorerID's ResBlock modulation (0 = the plain UNet)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the sampling at which the content condition starts."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the sampling at which the content condition stops."),
                io.Int.Input("face_size", default=512, min=64, max=1024, step=64,
                             tooltip="Size of the aligned face crops that are restored (RIDFR is trained at 512)."),
                io.Combo.Input("on_no_face", options=list(ON_NO_FACE), default="error",
                               tooltip="Whole-photo mode, a photo without a face: stop with an error, or pass it "
                                       "through unchanged."),
                io.Boolean.Input("track_faces", default=False, optional=True,
                                 tooltip="Whole-photo mode, an IMAGE batch of video frames: follow each face from "
                                         "frame to frame, so Match Identities gives it one person (a vote over its "
                                         "frames) and RIDFR Sample one seed; no flicker. Off: independent photos."),
                io.Vae.Input("vae", optional=True,
                             tooltip="The checkpoint's VAE. Needed with RestorerID weights (they condition on the "
                                     "LQ faces' VAE latent); unused with RIDFR weights."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The MODEL with the content patch."),
                FacesSocket.Output(display_name="faces", tooltip="The aligned faces (and where they came from) for "
                                                                 "RIDFR Sample, Match Identities and Paste Faces."),
                io.Latent.Output(display_name="latent", tooltip="An empty latent with one sample per face, for "
                                                                "KSampler."),
                io.Image.Output(display_name="lq_faces", tooltip="The aligned low-quality faces."),
            ],
        )

    @classmethod
    def validate_inputs(cls, on_no_face) -> bool | str:
        # One parameter, so that ComfyUI shows a message once; the other inputs come from the prompt.
        values = node_inputs(on_no_face=on_no_face)
        skip = checked_by_comfyui(("input_mode", "on_no_face"), "on_no_face")
        return content_problems(*(values.get(name) for name in VALIDATED), skip) or True

    @classmethod
    def execute(cls, model, ridfr, image, input_mode, strength, start_percent, end_percent, face_size,
                on_no_face, vae=None, track_faces=False) -> io.NodeOutput:
        problem = content_problems(input_mode, on_no_face, start_percent, end_percent)  # linked inputs now known
        if problem:
            raise ValueError(problem)
        if face_size % LATENT_FACTOR:
            raise NodeError("ContentCondition", "face_size", f"{face_size} is not a multiple of {LATENT_FACTOR}.")
        backend = COMFY_BACKENDS[ridfr.backend.name]
        if backend.needs_vae and vae is None:
            raise NodeError("ContentCondition", "vae", f"the {ridfr.backend.label.partition(' (')[0]} weights condition "
                            "on the VAE latent of the low-quality faces: connect the checkpoint's VAE to the vae input.")
        if input_mode == "aligned faces":
            faces = aligned_faces(image, face_size, ridfr.backend)
        else:
            faces = faces_in_photos(ridfr, image, face_size, on_no_face, track_faces)
        sigmas = SigmaRange(model, start_percent, end_percent)
        patched = backend.condition(model, ridfr, faces.lq, vae, strength, sigmas)
        latent = torch.zeros(faces.count, LATENT_CHANNELS, face_size // LATENT_FACTOR, face_size // LATENT_FACTOR)
        lq_faces = faces.lq.permute(0, 2, 3, 1).contiguous()
        return io.NodeOutput(patched, faces, {"samples": latent}, lq_faces)


class IdentityCondition(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IdentityCondition",
            display_name="Identity Condition (RIDFR)",
            category="RIDFR",
            description="Patches a clone of the MODEL with the IP-Adapter FaceID Plus identity attention and its "
                        "LoRA (with RestorerID weights, also the identity tokens of its IDBalance). With cfg > 1 "
                        "the negative side is the null identity (identity guidance).",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.5 MODEL, usually the output of Content Condition."),
                RIDFRModelsSocket.Input("ridfr", tooltip="The modules from Load RIDFR."),
                IdentitySocket.Input("identity", tooltip="From FaceID Encode (one person for every face) or Match "
                                                         "Identities (one per face)."),
                io.Float.Input("weight", default=1.0, min=0.0, max=3.0, step=0.05,
                               tooltip="Identity scale, the one identity strength of the workflow: how strongly the "
                                       "restored face follows the reference (0 = no identity). 1.0 keeps each "
                                       "backend's published strength (RestorerID: its per-face adaptive scale, see "
                                       "auto_weight)."),
                io.Float.Input("lora_strength", default=1.0, min=0.0, max=2.0, step=0.05,
                               tooltip="Strength of the FaceID LoRA that FaceID Plus was trained with (1.0)."),
                io.Combo.Input("auto_weight", options=list(AUTO_WEIGHT), default=BACKEND_DEFAULT, optional=True,
                               tooltip="RestorerID's adaptive identity scale, as its inference always applies it: per "
                                       "face weight x exp(0.1 x (9.5 - MUSIQ of the LQ face)), so a worse face leans "
                                       "more on the reference. 'backend default': on with RestorerID weights (its "
                                       "published behaviour), off with RIDFR weights. It needs the faces input and "
                                       "the MUSIQ weights (models/pyiqa/musiq_koniq_ckpt-e95806b9.pth, offered by "
                                       "the download dialog). The values used are shown on the node."),
                FacesSocket.Input("faces", optional=True,
                                  tooltip="The faces output of Content Condition: the LQ faces auto_weight scores."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The MODEL with the identity patch.")],
        )

    @classmethod
    def validate_inputs(cls, auto_weight=BACKEND_DEFAULT) -> bool | str:
        # One parameter, so that ComfyUI shows a message once; the Load RIDFR behind the ridfr input tells the backend.
        from .model_files import content_backend_name

        values = node_inputs(auto_weight=auto_weight)
        loader = upstream_inputs("ridfr", "LoadRIDFR")
        backend = content_backend_name(loader) if loader else None
        return identity_problems(auto_weight, backend, "faces" in values) or True

    @classmethod
    def execute(cls, model, ridfr, identity, weight, lora_strength, auto_weight=BACKEND_DEFAULT, faces=None
                ) -> io.NodeOutput:
        import comfy.model_management as mm

        problem = identity_problems(auto_weight, ridfr.backend.name, faces is not None)  # linked inputs now known
        if problem:
            raise ValueError(problem)

        mm.load_models_gpu([ridfr.adapter, ridfr.clip_vision])
        with torch.no_grad():
            tokens = module_of(ridfr.adapter).identity_tokens(identity.adapter_input).float().cpu()
        null_tokens = null_identity_tokens(ridfr)
        scales = identity.face_scales if identity.face_scales is not None else torch.ones(1)
        shown = None
        if uses_auto_weight(auto_weight, ridfr.backend.name):
            auto, shown = adaptive_scales(ridfr, faces)
            scales = scales.float() * auto
        tokens = IdentityTokens(tokens, null_tokens, scales.float(), weight)
        patched = apply_identity(model, ridfr, tokens, lora_strength)
        identity_reader = COMFY_BACKENDS[ridfr.backend.name].identity_reader
        if identity_reader is not None:
            identity_reader(patched, tokens)
        return io.NodeOutput(patched, ui=ui.PreviewText(shown) if shown else None)


def uses_auto_weight(auto_weight, backend_name: str) -> bool:
    """Whether IdentityCondition scales the identity by MUSIQ ('on', or 'backend default' for a backend published
    with it; True/False from workflows saved when auto_weight was a switch)."""
    from ..ridfr_core.backends import BACKENDS
    from ..ridfr_core.backends.restorerid.identity_scale import auto_by_default

    choice = SWITCH_VALUES.get(auto_weight, auto_weight)
    return choice == "on" or (choice == BACKEND_DEFAULT and auto_by_default(BACKENDS[backend_name]))


def identity_problems(auto_weight, backend_name: str | None, faces_connected: bool) -> str | None:
    """What stops IdentityCondition from giving the identity strength its choices ask for (``backend_name``
    None: not known yet, checked when it runs): RestorerID's adaptive scale needs the faces and the MUSIQ weights
    and never falls back to a fixed scale unasked."""
    import folder_paths
    from ..ridfr_core.models import download_command
    from ..ridfr_core.models.registry import MUSIQ_KONIQ

    if not isinstance(auto_weight, bool):
        error = invalid_choice("IdentityCondition", "auto_weight", auto_weight, AUTO_WEIGHT)
        if error:
            return error
    if backend_name is None or not uses_auto_weight(auto_weight, backend_name):
        return None
    if not faces_connected:
        return ("IdentityCondition (faces): auto_weight scores the low-quality faces: connect Content Condition's faces "
                "output (or set auto_weight to 'off' for a fixed weight).")
    path = Path(folder_paths.models_dir) / MUSIQ_KONIQ.relative
    if not path.is_file():
        command = download_command("restorerid", folder_paths.models_dir, [MUSIQ_KONIQ.relative])
        return (f"IdentityCondition (auto_weight): RestorerID's identity scale (auto_weight '{auto_weight}') scores each "
                f"low-quality face with MUSIQ, whose weights are not at {path}. Download them in ComfyUI with 'Download "
                f"missing RIDFR models' (offered when the workflow is loaded) or with ComfyUI's Python in the RIDFR "
                f"folder: {command}; or set auto_weight to 'off' for a fixed weight.")
    return None


def adaptive_scales(ridfr, faces) -> tuple[torch.Tensor, str]:
    """(per-face RestorerID identity scales (F,), the text the node shows) from the LQ faces' MUSIQ."""
    import folder_paths
    from ..ridfr_core.backends.restorerid.identity_scale import AUTO, IdentityScale, musiq_of_scale

    chosen = IdentityScale.choose(AUTO, ridfr.backend, Path(folder_paths.models_dir))
    scales = chosen.for_faces(faces.lq).float()
    return scales, "\n".join(f"face {index}: MUSIQ {musiq_of_scale(float(scale)):.1f} -> identity scale {scale:.3f}"
                              for index, scale in enumerate(scales))
