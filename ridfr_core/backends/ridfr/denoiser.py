"""RIDFR's denoiser: the UNet with the content ControlNet's residuals and decoupled identity attention."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from ...identity.adapter import ID_TOKENS, IdentityAdapter, identity_context, install_identity_processors
from .controlnet import ContentControlNet


class RIDFRDenoiser(torch.nn.Module):
    """eps(z_t, t, c_text, I_LQ, c_ID): the UNet with content residuals and decoupled identity attention.

    Installing the adapter replaces the UNet's cross-attention processors with the adapter's own
    modules (shared, not copied), so the UNet passed in belongs to this denoiser from then on.
    """

    def __init__(self, unet: UNet2DConditionModel, content: ContentControlNet, adapter: IdentityAdapter | None = None):
        super().__init__()
        self.unet, self.content, self.adapter = unet, content, adapter
        if adapter is not None:
            install_identity_processors(unet, adapter)

    def prepare(self, text_states: torch.Tensor, lq_image: torch.Tensor, id_tokens: torch.Tensor | None = None,
                content_scale: float | torch.Tensor = 1.0, identity_scale: float | torch.Tensor = 1.0) -> tuple:
        """The arguments after ``(latents, timestep)`` for every step of one restoration, from one LQ image per
        face (``text_states`` may hold several copies of the faces end to end, as CFG does): the ControlNet
        reads the LQ image beside each copy."""
        copies = text_states.shape[0] // lq_image.shape[0]
        return text_states, lq_image.repeat(copies, 1, 1, 1), id_tokens, content_scale, identity_scale

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor | int,
        text_states: torch.Tensor,
        lq_image: torch.Tensor,
        id_tokens: torch.Tensor | None = None,
        content_scale: float | torch.Tensor = 1.0,
        identity_scale: float | torch.Tensor = 1.0,
    ) -> torch.Tensor:
        """``lq_image`` (B,3,H,W) in [-1,1] (any size; resized to the latent); ``id_tokens`` (B,4,C) or
        None for no identity; scales are floats or per-face (B,) tensors. Returns eps (B,4,h,w)."""
        # the frozen UNet runs in its own dtype whatever it is handed: in training, accelerate returns the trained
        # content module's residuals in float32, and CPU autocast (unlike CUDA's) leaves GroupNorm's inputs alone
        unet_dtype = self.unet.dtype
        down, mid = self.content(latents, timestep, text_states, lq_image, content_scale)
        down, mid = [residual.to(unet_dtype) for residual in down], mid.to(unet_dtype)
        latents, text_states = latents.to(unet_dtype), text_states.to(unet_dtype)
        hidden = text_states
        if self.adapter is not None:
            if id_tokens is None:
                id_tokens, identity_scale = text_states.new_zeros(latents.shape[0], ID_TOKENS, text_states.shape[-1]), 0.0
            hidden = identity_context(text_states, id_tokens, identity_scale)
        elif id_tokens is not None:
            raise ValueError("RIDFRDenoiser: identity tokens given but no identity adapter is loaded.")
        return self.unet(latents, timestep, hidden, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample
