"""What the core asks of a content backend: one class, one instance per backend (see :mod:`ridfr_core.backends`).

A content backend is the trained module that brings the low-quality face into SD1.5 (RIDFR's 7-channel
ControlNet, RestorerID's LQ branch). Everything that differs between backends is answered here: which
files are its own, how they load, the denoiser built around the UNet, the form of the LQ input, the
settings it was published with, which FaceID Plus file it was trained with and what fine-tuning trains.
The pipeline, the CLI, evaluation, the trainer and the ComfyUI nodes ask these questions instead of
testing which backend they hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..weights.adapter_files import is_faceid_v2_file


@dataclass(frozen=True)
class TrainingRecipe:
    """How a backend's content module was trained, so fine-tuning keeps the conditions it knows.

    ``identity_dropout`` / ``content_dropout``: per sample, the identity tokens become the null identity's /
    the content input becomes zeros (classifier-free-guidance training); ``identity_scale``: the decoupled
    attention's scale while training; ``parts``: what fine-tuning trains by default (see
    :meth:`ContentBackend.trainable_parameters`)."""

    prompt: str = ""
    identity_dropout: float = 0.0
    content_dropout: float = 0.0
    identity_scale: float = 1.0
    parts: tuple[str, ...] = ()


@dataclass(frozen=True)
class ContentBackend:
    """A content backend and the sampling settings it was published with. Subclasses implement the methods."""

    name: str
    label: str
    sampler: str                  # a name of ridfr_core.sampling.schedulers.SAMPLERS
    steps: int
    guidance: float               # classifier-free guidance; the uncond side has the null identity
    positive_prompt: str
    negative_prompt: str
    color_fix: bool               # wavelet colour fix against the LQ face
    identity_scale: float         # the fixed scale ("auto" rules live with the backend that has one)
    file_format: str              # the "format" metadata of its .safetensors files
    faceid_v2: bool               # trained with FaceID Plus v2 (the shortcut design) or v1
    ddim_eta: float = 0.0
    ddim_spacing: str | None = None     # None: the base model's timestep spacing
    prompt_tokens: dict[str, list[int]] = field(default_factory=lambda: {"": []})  # CLIP ids of its prompts
    null_identity_tokens: bool = False  # faces without an identity still read the null identity's tokens
    clip_bgr: bool = False              # CLIP sees the reference crop in BGR order (as the backend was trained)
    sample_posterior: bool = False      # its LQ latent is a sample of the VAE posterior, not the mode
    color_fix_unclamped: bool = False   # colour fix on the unclamped decode, then clamp
    training: TrainingRecipe = field(default_factory=TrainingRecipe)

    # --- files ------------------------------------------------------------------------------------------
    def recognises_keys(self, keys: list[str]) -> bool:
        """Whether a file that is not in our format (a publisher's checkpoint) holds this backend's weights."""
        return False

    def partial_file(self, keys: list[str]) -> str | None:
        """What a file this backend does not recognise lacks, where it holds some of this backend's own parts
        (a pruned or damaged publisher's checkpoint), so the error names the missing part; None otherwise."""
        return None

    def load(self, path: Path, cache_dir=None, state: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
        """The content module of a file this backend recognised (``state``: its tensors, when already read)."""
        raise NotImplementedError

    def sd15_part(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A checkpoint of this backend reduced to plain SD1.5, so it can serve as the base (default: as is)."""
        return state

    def owns(self, content: torch.nn.Module) -> bool:
        raise NotImplementedError

    def bundled_parts(self, path: Path) -> set[str]:
        """Which of "base", "adapter" and "clip_vision" the content file holds itself (by key names), to be
        used instead of separate files (default: none)."""
        return set()

    def bundled_adapter(self, path: Path, unet, state: dict[str, torch.Tensor] | None = None) -> tuple:
        """(IdentityAdapter, FaceID LoRA deltas) from the content file itself (see :meth:`bundled_parts`;
        ``state``: its tensors, when already read)."""
        raise NotImplementedError

    def bundled_clip_vision(self, path: Path, config_dir=None, state: dict[str, torch.Tensor] | None = None
                            ) -> torch.nn.Module:
        raise NotImplementedError

    # --- sampling ---------------------------------------------------------------------------------------
    def sampling_settings(self, steps: int | None = None, guidance: float | None = None, sampler: str | None = None,
                          color_fix: bool | None = None) -> dict:
        """The settings of a restoration: each one given, or (None) the backend's published one."""
        given = {"steps": steps, "guidance": guidance, "sampler": sampler, "color_fix": color_fix}
        return {name: getattr(self, name) if value is None else value for name, value in given.items()}

    def check_fits(self, content: torch.nn.Module, unet, source: str) -> None:
        """Raise a CheckpointError naming ``source`` when ``content`` cannot drive this UNet."""

    def make_denoiser(self, unet, content: torch.nn.Module, adapter=None) -> torch.nn.Module:
        """eps(latents, t, text, content_input, id_tokens, content_scale, identity_scale)."""
        raise NotImplementedError

    def content_input(self, content: torch.nn.Module, lq: torch.Tensor, vae, latent_hw: tuple[int, int],
                      posterior_noise: torch.Tensor | None = None) -> torch.Tensor:
        """The LQ faces (B,3,H,W) in [-1,1] as the content module reads them, computed once per restoration
        (``posterior_noise``: the eps of a VAE posterior sample, for backends with ``sample_posterior``)."""
        raise NotImplementedError

    def faceid_shortcut(self, adapter: Path, shortcut: bool | None = None) -> bool:
        """The FaceID Plus design to load ``adapter`` with (v2 = shortcut; the file name tells, as in the
        IP-Adapter pack), refused when it is not the version this backend was trained with."""
        return is_faceid_v2_file(adapter) if shortcut is None else shortcut

    def base_file(self, content: Path) -> Path | None:
        """The file that holds the SD1.5 base this content file goes with, when no base is given (None: none)."""
        return content if "base" in self.bundled_parts(content) else None

    # --- training ---------------------------------------------------------------------------------------
    def trainable_parameters(self, content: torch.nn.Module, parts: tuple[str, ...] = ()) -> list[torch.nn.Parameter]:
        """The parameters fine-tuning trains (``parts``: a backend's named subsets; empty = its default)."""
        if parts:
            raise ValueError(f"{self.label}: trains as a whole; it has no parts to choose ({', '.join(parts)}).")
        return list(content.parameters())

    def new_content(self, unet) -> torch.nn.Module:
        """A content module to train from scratch next to ``unet`` (stage 'content')."""
        raise ValueError(f"{self.label}: is not trained from scratch here; start from its published weights "
                         "(--init FILE).")

    def enable_gradient_checkpointing(self, denoiser: torch.nn.Module) -> None:
        """Recompute activations in the backward pass instead of keeping them (default: the UNet's own)."""
        denoiser.unet.enable_gradient_checkpointing()

    def save_trained(self, content: torch.nn.Module, path: Path, metadata: dict[str, str], init: Path | None = None
                     ) -> None:
        """Write trained content weights in this backend's ``.safetensors`` format with ``metadata`` added
        (``init``: the file training started from)."""
        raise NotImplementedError
