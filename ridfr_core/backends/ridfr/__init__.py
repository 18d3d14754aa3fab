"""RIDFR's own content backend (the paper): a ControlNet copied from the UNet encoder whose first conv sees the
noisy latent and the LQ face resized to the latent size, published settings UniPC 20 steps, empty prompt."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..interface import ContentBackend
from .controlnet import ContentControlNet, lq_to_latent_size
from .denoiser import RIDFRDenoiser
from .files import CONTENT_FORMAT, load_ridfr_content, save_content


@dataclass(frozen=True)
class RIDFRBackend(ContentBackend):
    def load(self, path: Path, cache_dir=None, state=None) -> ContentControlNet:
        return load_ridfr_content(path)

    def owns(self, content: torch.nn.Module) -> bool:
        return isinstance(content, ContentControlNet)

    def make_denoiser(self, unet, content, adapter=None) -> RIDFRDenoiser:
        return RIDFRDenoiser(unet, content, adapter)

    def content_input(self, content, lq: torch.Tensor, vae, latent_hw: tuple[int, int], posterior_noise=None
                      ) -> torch.Tensor:
        """The LQ image resized to the latent size (paper Sec. 3.2)."""
        return lq_to_latent_size(lq, latent_hw)

    def new_content(self, unet) -> ContentControlNet:
        """The paper's stage 1 starts from a copy of the UNet encoder (the FaceID LoRA is not fused yet)."""
        return ContentControlNet.from_unet(unet)

    def enable_gradient_checkpointing(self, denoiser) -> None:
        denoiser.content.enable_gradient_checkpointing()
        denoiser.unet.enable_gradient_checkpointing()  # gradients flow through the frozen UNet to the residuals

    def save_trained(self, content, path: Path, metadata: dict[str, str], init: Path | None = None) -> None:
        save_content(content, path, metadata)


RIDFR = RIDFRBackend(name="ridfr", label="RIDFR (content ControlNet)", sampler="unipc", steps=20, guidance=1.0,
                     positive_prompt="", negative_prompt="", color_fix=False, identity_scale=1.0,
                     file_format=CONTENT_FORMAT, faceid_v2=True)
