"""The VAE posterior of the LQ faces, encoded as ComfyUI's own ``VAE.encode`` encodes: memory requested from
ComfyUI's model management, the faces in batches that fit the free memory, tiles when a batch runs out of memory.

ComfyUI's encode returns only the posterior mean; RestorerID's structure encoder reads a sample of the posterior,
so the moments (mean and log-variance: the encoder and ``quant_conv``) are what is encoded here.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)
TILE, OVERLAP = 256, 32  # pixels: a 512 px face in 9 tiles when whole faces do not fit


def moments_of(vae, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 2C, h, w) posterior moments of pixels (B,3,H,W) in [0,1], on the VAE's output device, float32."""
    engine = vae.first_stage_model
    with torch.no_grad():
        moments = engine.encoder(vae.process_input(pixels).to(vae.device, vae.vae_dtype))
        if getattr(engine, "quant_conv", None) is not None:
            moments = engine.quant_conv(moments)
    return moments.to(vae.output_device).float()


def tiled_moments(vae, pixels: torch.Tensor) -> torch.Tensor:
    """The moments encoded tile by tile, one face at a time (ComfyUI's tiled encode, with the moments blended where
    tiles overlap)."""
    import comfy.utils

    channels = 2 * vae.latent_channels
    steps = pixels.shape[0] * comfy.utils.get_tiled_scale_steps(pixels.shape[3], pixels.shape[2], TILE, TILE, OVERLAP)
    return comfy.utils.tiled_scale(pixels, lambda tile: moments_of(vae, tile), TILE, TILE, OVERLAP,
                                   upscale_amount=1 / vae.downscale_ratio, out_channels=channels,
                                   output_device=vae.output_device, pbar=comfy.utils.ProgressBar(steps))


def encode_moments(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Posterior moments (F, 2C, h, w) of the faces (F,3,S,S) in [0,1]."""
    import comfy.model_management as mm

    try:
        memory = vae.memory_used_encode(pixels.shape, vae.vae_dtype)  # per face
        mm.load_models_gpu([vae.patcher], memory_required=memory, force_full_load=getattr(vae, "disable_offload", False))
        batch = max(1, int(mm.get_free_memory(vae.device) / max(1, memory)))
        return torch.cat([moments_of(vae, pixels[first:first + batch]) for first in range(0, pixels.shape[0], batch)])
    except mm.OOM_EXCEPTION:
        logger.warning("RIDFR: out of memory VAE-encoding %d faces in batches; encoding them in tiles.", pixels.shape[0])
    # outside the except block, so that the failed batch's tensors can be freed first (as ComfyUI does)
    return tiled_moments(vae, pixels)
