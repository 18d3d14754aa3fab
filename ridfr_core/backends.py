"""The content-module family: RIDFR's 7-channel ControlNet and RestorerID's LQ branch behind one interface.

The pipeline, the evaluation and the nodes ask this module three things of a loaded content module:
which backend it is (:func:`backend_of`, with its published sampling defaults), the denoiser that
combines it with the UNet and the identity adapter (:func:`make_denoiser`), and the step-independent
form of the LQ faces it conditions on (:func:`content_input`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .content import ContentControlNet, lq_to_latent_size
from .ddim_plan import RESTORERID_DDIM
from .prompts import RESTORERID_NEGATIVE, RESTORERID_POSITIVE
from .restorerid import LQBranch


@dataclass(frozen=True)
class Backend:
    """A content backend and the sampling settings it was published with."""

    name: str
    label: str
    sampler: str                  # one of SAMPLERS
    steps: int
    guidance: float               # classifier-free guidance; the uncond side has the null identity
    positive_prompt: str
    negative_prompt: str
    color_fix: bool               # wavelet colour fix against the LQ face
    identity_scale: float         # fixed fallback; RestorerID's default is "auto" (MUSIQ, see quality.py)
    ddim_eta: float = 0.0
    clip_bgr: bool = False        # CLIP sees the reference crop in BGR order (RestorerID: cv2 images throughout)
    sample_posterior: bool = False  # the LQ latent is a sample of the VAE posterior (RestorerID), not its mode
    color_fix_unclamped: bool = False  # colour fix on the unclamped decode, then clamp (RestorerID's order)


RIDFR = Backend("ridfr", "RIDFR (content ControlNet)", "unipc", 20, 1.0, "", "", False, 1.0)
RESTORERID = Backend("restorerid", "RestorerID (LQ branch)", RESTORERID_DDIM, 50, 4.0, RESTORERID_POSITIVE,
                     RESTORERID_NEGATIVE, True, 0.75, ddim_eta=1.0, clip_bgr=True, sample_posterior=True,
                     color_fix_unclamped=True)
BACKENDS = {backend.name: backend for backend in (RIDFR, RESTORERID)}
SAMPLERS = ("unipc", "ddim", RESTORERID_DDIM)  # the last: RestorerID's own DDIM plan (ddim_plan.py)


def backend_of(content: torch.nn.Module) -> Backend:
    if isinstance(content, LQBranch):
        return RESTORERID
    if isinstance(content, ContentControlNet):
        return RIDFR
    raise TypeError(f"{type(content).__name__} is not a content module (RIDFR ControlNet or RestorerID LQ branch).")


def make_denoiser(unet, content: torch.nn.Module, adapter=None) -> torch.nn.Module:
    """eps(latents, t, text, content_input, id_tokens, content_scale, identity_scale) for either backend."""
    if backend_of(content) is RESTORERID:
        from .restorerid_unet import RestorerIDDenoiser

        return RestorerIDDenoiser(unet, content, adapter)
    from .pipeline import RIDFRDenoiser

    return RIDFRDenoiser(unet, content, adapter)


@torch.no_grad()
def content_input(content: torch.nn.Module, lq: torch.Tensor, vae, latent_hw: tuple[int, int],
                  posterior_noise: torch.Tensor | None = None) -> torch.Tensor:
    """The LQ faces (B,3,H,W) in [-1,1] as the backend reads them, computed once per restoration: RIDFR
    takes the image resized to the latent size; RestorerID the scaled VAE latent: ``mean + std * eps`` with
    ``posterior_noise`` eps (a posterior sample, as RestorerID's ``get_first_stage_encoding``), else the mean."""
    if backend_of(content) is RIDFR:
        return lq_to_latent_size(lq, latent_hw)
    param = next(vae.parameters())
    posterior = vae.encode(lq.to(param.device, param.dtype)).latent_dist
    latent = posterior.mode()
    if posterior_noise is not None:
        latent = latent + posterior.std * posterior_noise.to(latent.device, latent.dtype)
    return latent * vae.config.scaling_factor
