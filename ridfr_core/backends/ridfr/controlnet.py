"""Content Injection Module: a ControlNet whose input conv sees the noisy latent and the LQ image.

RIDFR (paper Sec. 3.2) drops ControlNet's hint encoder: the low-quality image, bicubic-resized to
the latent size in pixel space, is concatenated with the 4-channel noisy latent and the first conv
takes 7 channels. This avoids the colour shift of adding an encoded hint and the information loss of
encoding the LQ image into latent space. Everything else is diffusers' ``ControlNetModel``.

Inputs and outputs are deliberately small so that the diffusers pipeline and the ComfyUI patch drive
the same module: ``(noisy latent, timestep, text states, LQ image) -> (down residuals, mid residual)``.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, UNet2DConditionModel

from ...constants import LATENT_CHANNELS

LQ_CHANNELS = 3


def lq_to_latent_size(lq: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """(B,3,H,W) LQ image in [-1,1] -> bicubic-resized to the latent's (h, w), as the paper does.

    Antialiasing keeps a 512->64 reduction from aliasing; the result is constant over the
    denoising steps, so callers compute it once.
    """
    if tuple(lq.shape[-2:]) == tuple(latent_hw):
        return lq
    return F.interpolate(lq.float(), size=latent_hw, mode="bicubic", align_corners=False, antialias=True).to(lq.dtype)


def controlnet_config_from_unet(unet: UNet2DConditionModel) -> dict:
    """The UNet's config restricted to what ``ControlNetModel`` takes, with the 7-channel input."""
    accepted = inspect.signature(ControlNetModel.__init__).parameters
    config = {k: v for k, v in unet.config.items() if k in accepted and k != "in_channels"}
    return {**config, "in_channels": LATENT_CHANNELS + LQ_CHANNELS}


class ContentControlNet(ControlNetModel):
    """diffusers ``ControlNetModel`` with a 7-channel ``conv_in`` and no ``controlnet_cond_embedding``.

    Build it with :meth:`from_unet` (training start) or ``ContentControlNet(**config)`` + a state dict
    (loading, see :mod:`ridfr_core.weights.checkpoints`). ``config["in_channels"]`` must be 7.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.config.in_channels != LATENT_CHANNELS + LQ_CHANNELS:
            raise ValueError(
                f"ContentControlNet: in_channels is {self.config.in_channels}, RIDFR's content module "
                f"takes {LATENT_CHANNELS + LQ_CHANNELS} (noisy latent + LQ RGB)."
            )
        del self.controlnet_cond_embedding  # the LQ image enters through conv_in instead

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, load_weights_from_unet: bool = True) -> "ContentControlNet":
        """Copy the UNet encoder; the latent channels of ``conv_in`` copy the UNet's, the LQ channels start at 0.

        With the zero-initialised output convs of ControlNet the fresh module adds nothing, so training
        starts from the base model's prediction exactly.
        """
        controlnet = cls(**controlnet_config_from_unet(unet))
        if load_weights_from_unet:
            controlnet.load_unet_encoder(unet)
        controlnet.to(unet.device)
        return controlnet if unet.dtype == torch.float32 else controlnet.to(dtype=unet.dtype)

    @torch.no_grad()
    def load_unet_encoder(self, unet: UNet2DConditionModel) -> None:
        self.conv_in.weight.zero_()
        self.conv_in.weight[:, :LATENT_CHANNELS].copy_(unet.conv_in.weight)
        self.conv_in.bias.copy_(unet.conv_in.bias)
        for name in ("time_proj", "time_embedding", "down_blocks", "mid_block"):
            getattr(self, name).load_state_dict(getattr(unet, name).state_dict())

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        lq_image: torch.Tensor,
        conditioning_scale: float | torch.Tensor = 1.0,
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Residuals for the UNet's skip connections and mid block.

        ``sample``: (B,4,h,w) noisy latent; ``timestep``: scalar or (B,); ``encoder_hidden_states``:
        (B,77,768) text states (RIDFR uses the empty prompt); ``lq_image``: (B,3,H,W) in [-1,1], resized
        here to (h,w) unless it already is; ``conditioning_scale``: float or (B,) per-face strength.
        """
        batch = sample.shape[0]
        timesteps = torch.as_tensor(timestep, device=sample.device)
        if timesteps.ndim == 0:
            timesteps = timesteps[None]
        timesteps = timesteps.expand(batch)
        emb = self.time_embedding(self.time_proj(timesteps).to(sample.dtype))

        lq = lq_to_latent_size(lq_image.to(sample.dtype), sample.shape[-2:])
        hidden = self.conv_in(torch.cat([sample, lq], dim=1))

        down_samples: tuple[torch.Tensor, ...] = (hidden,)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                hidden, res = block(hidden, temb=emb, encoder_hidden_states=encoder_hidden_states)
            else:
                hidden, res = block(hidden, temb=emb)
            down_samples += res
        if getattr(self.mid_block, "has_cross_attention", False):
            hidden = self.mid_block(hidden, emb, encoder_hidden_states=encoder_hidden_states)
        else:
            hidden = self.mid_block(hidden, emb)

        scale = conditioning_scale
        if isinstance(scale, torch.Tensor):
            scale = scale.to(sample.device, sample.dtype).view(-1, 1, 1, 1)
        down = tuple(zero_conv(s) * scale for s, zero_conv in zip(down_samples, self.controlnet_down_blocks))
        return down, self.controlnet_mid_block(hidden) * scale
