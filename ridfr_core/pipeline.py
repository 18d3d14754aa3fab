"""The diffusers sampling backend: SD1.5 + content ControlNet + identity adapter, stepped with UniPC.

:class:`RIDFRDenoiser` is the one function RIDFR trains and samples with: noise prediction from the
noisy latent, timestep, empty-prompt states, LQ image and identity tokens. The trainer calls it for
the diffusion and alignment losses; :class:`RIDFRPipeline` runs it in a UniPC loop on aligned faces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel, UniPCMultistepScheduler
from diffusers.models.attention_processor import AttnProcessor2_0

from .content import ContentControlNet, lq_to_latent_size
from .identity import ID_TOKENS, Identity, IdentityAdapter, null_identity

DEFAULT_STEPS = 20
MAX_STEPS = 200  # as the RIDFRSample node; from 1000 steps on, "leading" spacing makes every timestep 1
FACE_SIZE = 512


class RIDFRDenoiser(torch.nn.Module):
    """eps(z_t, t, c_text, I_LQ, c_ID): the UNet with content residuals and decoupled identity attention.

    Installing the adapter replaces the UNet's cross-attention processors with the adapter's own
    modules (shared, not copied), so the UNet passed in belongs to this denoiser from then on.
    """

    def __init__(self, unet: UNet2DConditionModel, content: ContentControlNet, adapter: IdentityAdapter | None = None):
        super().__init__()
        self.unet, self.content, self.adapter = unet, content, adapter
        if adapter is not None:
            identity_processors = adapter.processors_by_unet_name()
            unet.set_attn_processor({name: identity_processors.get(name, AttnProcessor2_0())
                                     for name in unet.attn_processors})

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
        down, mid = self.content(latents, timestep, text_states, lq_image, content_scale)
        hidden = text_states
        if self.adapter is not None:
            if id_tokens is None:
                id_tokens, identity_scale = text_states.new_zeros(latents.shape[0], ID_TOKENS, text_states.shape[-1]), 0.0
            self.adapter.set_scale(identity_scale)
            hidden = (text_states, [id_tokens.to(text_states.dtype)])
        elif id_tokens is not None:
            raise ValueError("RIDFRDenoiser: identity tokens given but no identity adapter is loaded.")
        return self.unet(latents, timestep, hidden, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample


@dataclass
class RIDFRModels:
    """Every module a restoration needs. ``clip_vision`` is only used to encode identities."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    content: ContentControlNet
    empty_prompt: torch.Tensor
    scheduler_config: dict
    adapter: IdentityAdapter | None = None
    clip_vision: torch.nn.Module | None = None
    lora_deltas: dict = field(default_factory=dict)


def load_models(base: Path | str, content: Path | str, adapter: Path | str | None = None,
                clip_vision: Path | str | None = None, config_dir=None, cache_dir=None,
                lora_strength: float = 1.0, shortcut: bool | None = None) -> RIDFRModels:
    """All weights from local files (see :mod:`ridfr_core.checkpoints`); the FaceID LoRA is fused at
    ``lora_strength`` (1.0 is what FaceID-Plus was trained with) into the UNet loaded here."""
    from . import checkpoints

    sd = checkpoints.load_base(base, config_dir, cache_dir)
    models = RIDFRModels(sd.unet, sd.vae, checkpoints.load_content(content), sd.empty_prompt, sd.scheduler_config)
    if adapter is not None:
        models.adapter, models.lora_deltas = checkpoints.load_identity_adapter(adapter, sd.unet, shortcut)
        checkpoints.apply_weight_deltas(sd.unet, models.lora_deltas, lora_strength)
    if clip_vision is not None:
        models.clip_vision = checkpoints.load_clip_vision(clip_vision, config_dir)
    return models


def place(module: torch.nn.Module, device, dtype: torch.dtype) -> torch.nn.Module:
    """Move, and cast only when needed (diffusers warns on every dtype cast)."""
    module.to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
    return module


def seeded_noise(shape: tuple[int, ...], seed: int | list[int], device, dtype) -> torch.Tensor:
    """Noise drawn on the CPU from a local generator (one seed per face, or seed+i), so results are the
    same on every device and never touch the global RNG."""
    seeds = seed if isinstance(seed, list) else [seed + i for i in range(shape[0])]
    if len(seeds) != shape[0]:
        raise ValueError(f"seed: {len(seeds)} seeds for {shape[0]} faces; give one int or one seed per face.")
    seeds = [s % 2 ** 64 for s in seeds]  # any int is a seed, wrapped to 64 bits as the nodes' seed widget does
    noise = [torch.randn(shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds]
    return torch.stack(noise).to(device, dtype)


class RIDFRPipeline:
    """Restore aligned faces: ``pipeline(lq_faces, identity, steps=20, seed=0) -> faces``."""

    def __init__(self, models: RIDFRModels, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        self.device = torch.device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.models = models
        for module in (models.unet, models.vae, models.content, models.adapter, models.clip_vision):
            if module is not None:
                place(module, self.device, self.dtype).requires_grad_(False).eval()
        self.denoiser = RIDFRDenoiser(models.unet, models.content, models.adapter)
        self._null_tokens: torch.Tensor | None = None

    @classmethod
    def from_files(cls, base, content, adapter=None, clip_vision=None, device="cpu", dtype=None, **kwargs):
        return cls(load_models(base, content, adapter, clip_vision, **kwargs), device, dtype)

    def identity_tokens(self, identity: Identity, batch: int) -> torch.Tensor:
        return self.models.adapter.identity_tokens(identity.broadcast_to(batch))

    def null_tokens(self, batch: int) -> torch.Tensor:
        if self._null_tokens is None:
            if self.models.clip_vision is None:
                raise ValueError("RIDFRPipeline: identity guidance (guidance != 1) needs the CLIP vision model for the "
                                 "null identity: pass clip_vision=<CLIP-ViT-H-14 file> to load_models/from_files.")
            self._null_tokens = self.models.adapter.identity_tokens(null_identity(self.models.clip_vision))
        return self._null_tokens.expand(batch, -1, -1)

    @torch.no_grad()
    def __call__(
        self,
        lq_faces: torch.Tensor,
        identity: Identity | None = None,
        steps: int = DEFAULT_STEPS,
        seed: int | list[int] = 0,
        identity_scale: float | torch.Tensor = 1.0,
        content_scale: float | torch.Tensor = 1.0,
        guidance: float = 1.0,
        progress=None,
    ) -> torch.Tensor:
        """``lq_faces`` (B,3,H,W) RGB in [0,1], H and W multiples of 8 (512 for the paper's setting);
        returns restored faces of the same shape in [0,1]. ``guidance`` > 1 is classifier-free guidance
        against the null identity; ``identity_scale`` may be a (B,) tensor (0 = restore without identity)."""
        if lq_faces.ndim != 4 or lq_faces.shape[1] != 3:
            raise ValueError(f"RIDFRPipeline: lq_faces must be (B,3,H,W) RGB, got {tuple(lq_faces.shape)}.")
        if lq_faces.shape[-1] % 8 or lq_faces.shape[-2] % 8:
            raise ValueError(f"RIDFRPipeline: face size {tuple(lq_faces.shape[-2:])} is not a multiple of 8; "
                             f"align faces to {FACE_SIZE}x{FACE_SIZE}.")
        if not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"RIDFRPipeline: steps must be in 1..{MAX_STEPS}, got {steps}.")
        models, batch = self.models, lq_faces.shape[0]
        scale_factor = 2 ** (len(models.vae.config.block_out_channels) - 1)
        latent_hw = (lq_faces.shape[-2] // scale_factor, lq_faces.shape[-1] // scale_factor)

        lq = lq_to_latent_size(lq_faces.to(self.device, torch.float32) * 2 - 1, latent_hw).to(self.dtype)
        text = models.empty_prompt.to(self.device, self.dtype).expand(batch, -1, -1)
        id_tokens = None
        if identity is not None:
            if models.adapter is None:
                raise ValueError("RIDFRPipeline: an identity was given but no IP-Adapter FaceID Plus is loaded; "
                                 "pass adapter=<ip-adapter-faceid-plusv2_sd15.bin> to load_models/from_files.")
            id_tokens = self.identity_tokens(identity, batch).to(self.dtype)
        if isinstance(identity_scale, torch.Tensor):
            identity_scale = identity_scale.to(self.device, self.dtype)
        use_guidance = guidance != 1.0 and id_tokens is not None
        if use_guidance:
            text, lq = torch.cat([text, text]), torch.cat([lq, lq])
            id_tokens = torch.cat([id_tokens, self.null_tokens(batch).to(self.dtype)])
            if isinstance(identity_scale, torch.Tensor):
                identity_scale = torch.cat([identity_scale, identity_scale])
            if isinstance(content_scale, torch.Tensor):
                content_scale = torch.cat([content_scale, content_scale])

        scheduler = UniPCMultistepScheduler.from_config(models.scheduler_config)
        scheduler.set_timesteps(steps, device=self.device)
        latents = seeded_noise((batch, 4, *latent_hw), seed, self.device, self.dtype) * scheduler.init_noise_sigma
        for index, t in enumerate(scheduler.timesteps):
            model_in = torch.cat([latents, latents]) if use_guidance else latents
            eps = self.denoiser(model_in, t, text, lq, id_tokens, content_scale, identity_scale)
            if use_guidance:
                cond, uncond = eps.chunk(2)
                eps = uncond + guidance * (cond - uncond)
            latents = scheduler.step(eps, t, latents).prev_sample
            if progress is not None:
                progress(index + 1, steps)
        return require_finite(self.decode(latents), models)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.models.vae
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        return ((images.float() + 1) / 2).clamp(0, 1)


class NonFiniteOutput(ValueError):
    """Sampling produced NaN/inf, which would be written as a black image."""


def require_finite(images: torch.Tensor, models: RIDFRModels) -> torch.Tensor:
    """``images`` if finite; else an error naming the modules with NaN/inf weights (the usual cause)."""
    if torch.isfinite(images).all():
        return images
    modules = {"base UNet (SD1.5 checkpoint, with the IP-Adapter's LoRA fused in)": models.unet, "VAE": models.vae,
               "RIDFR content module": models.content, "IP-Adapter": models.adapter,
               "CLIP vision": models.clip_vision}
    broken = [name for name, module in modules.items() if module is not None
              and not all(torch.isfinite(parameter).all() for parameter in module.parameters())]
    cause = (f"these weights hold NaN/inf values: {'; '.join(broken)}. The file is damaged or was trained into "
             "NaN; download or train it again" if broken else
             "no weights are broken, so sampling overflowed: use finite scales and guidance, or sample in float32 "
             "instead of float16 (the CLI's --device cpu)")
    raise NonFiniteOutput(f"RIDFRPipeline: the restored faces are NaN/inf; {cause}.")


def restore(models: RIDFRModels, lq_faces: torch.Tensor, identity: Identity | None = None, device="cpu",
            **kwargs) -> torch.Tensor:
    """One-call restoration of aligned faces; see :meth:`RIDFRPipeline.__call__` for the options."""
    return RIDFRPipeline(models, device)(lq_faces, identity, **kwargs)
