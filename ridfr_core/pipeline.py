"""Restoring aligned faces with diffusers: SD1.5 + a content backend + the identity adapter.

:func:`load_models` reads every weight file; :class:`RIDFRPipeline` samples with the denoiser the content
backend builds (:mod:`ridfr_core.backends`), by default with that backend's published settings: RIDFR
(UniPC 20, empty prompt) or RestorerID (DDIM 50, its prompts, CFG 4, wavelet colour fix).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from .backends import backend_of, load_content, sd15_part
from .backends.interface import ContentBackend
from .constants import FACE_SIZE
from .identity.adapter import Identity, IdentityAdapter, null_identity
from .sampling.colorfix import wavelet_color_fix
from .sampling.ldm_ddim import RESTORERID_DDIM, ddim_update, restorerid_plan
from .sampling.noise import RunNoise, face_seeds
from .sampling.schedulers import SAMPLERS, make_scheduler
from .weights import adapter_files, checkpoints

MAX_STEPS = 200  # as the RIDFRSample node; from 1000 steps on, "leading" spacing makes every timestep 1


@dataclass
class PipelineModules:
    """Every module a restoration needs. ``clip_vision`` is only used to encode identities; ``prompts``
    holds the text states of the backend's prompts (the empty prompt's is ``empty_prompt``)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    content: torch.nn.Module  # the content module of one of the backends
    empty_prompt: torch.Tensor
    scheduler_config: dict
    adapter: IdentityAdapter | None = None
    clip_vision: torch.nn.Module | None = None
    lora: dict = field(default_factory=dict)  # FaceID LoRA {UNet weight: (up, down)}, fused
    prompts: dict = field(default_factory=dict)
    null_tokens: torch.Tensor | None = None  # the null identity's tokens when already computed (the trainer's)

    @property
    def backend(self) -> ContentBackend:
        return backend_of(self.content)

    def prompt(self, text: str) -> torch.Tensor:
        return self.empty_prompt if text == "" else self.prompts[text]


def load_models(base: Path | str, content: Path | str, adapter: Path | str | None = None,
                clip_vision: Path | str | None = None, config_dir=None, cache_dir=None,
                lora_strength: float = 1.0, shortcut: bool | None = None,
                dtype: torch.dtype = torch.float32) -> PipelineModules:
    """All weights from local files (see :mod:`ridfr_core.weights`), every module cast to ``dtype`` whatever
    the files hold; the FaceID LoRA is fused (in float32) at ``lora_strength`` (1.0 is what FaceID-Plus was
    trained with) into the UNet loaded here. The backend is the content file's: RIDFR content weights or a
    RestorerID checkpoint (which may also be ``base``). ``adapter``/``clip_vision`` None: the content file's
    own copies where it holds them (a RestorerID checkpoint)."""
    content_module = load_content(content, cache_dir)
    backend = backend_of(content_module)
    sd = checkpoints.load_base(base, config_dir, cache_dir, prompts=backend.prompt_tokens, sd15_part=sd15_part)
    backend.check_fits(content_module, sd.unet, f"{backend.label.partition(' (')[0]} weights {content}")
    models = PipelineModules(sd.unet, sd.vae, content_module, sd.empty_prompt, sd.scheduler_config, prompts=sd.prompts)
    own = backend.bundled_parts(Path(content)) if None in (adapter, clip_vision) else set()
    if adapter is not None:
        shortcut = backend.faceid_shortcut(Path(adapter), shortcut)
        models.adapter, models.lora = adapter_files.load_identity_adapter(adapter, sd.unet, shortcut)
    elif "adapter" in own:
        models.adapter, models.lora = backend.bundled_adapter(Path(content), sd.unet)
    adapter_files.fuse_lora(sd.unet, models.lora, lora_strength)
    if clip_vision is not None:
        models.clip_vision = checkpoints.load_clip_vision(clip_vision, config_dir)
    elif "clip_vision" in own:
        models.clip_vision = backend.bundled_clip_vision(Path(content), config_dir)
    for module in (models.unet, models.vae, models.content, models.adapter, models.clip_vision):
        if module is not None:
            checkpoints.cast(module, dtype)
    return models


def place(module: torch.nn.Module, device, dtype: torch.dtype) -> torch.nn.Module:
    """Move, and cast every floating tensor to ``dtype`` (see :func:`~ridfr_core.weights.checkpoints.cast`)."""
    return checkpoints.cast(module.to(device), dtype)


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


class RIDFRPipeline:
    """Restore aligned faces: ``pipeline(lq_faces, identity, seed=0) -> faces``, with the backend's published
    sampler, steps, prompts, guidance and colour fix unless given."""

    def __init__(self, models: PipelineModules, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        self.device = torch.device(device)
        self.dtype = dtype or default_dtype(self.device)
        self.models = models
        for module in (models.unet, models.vae, models.content, models.adapter, models.clip_vision):
            if module is not None:
                place(module, self.device, self.dtype).requires_grad_(False).eval()
        self.backend = models.backend
        self.denoiser = self.backend.make_denoiser(models.unet, models.content, models.adapter)
        self._null_tokens: torch.Tensor | None = models.null_tokens

    @classmethod
    def from_files(cls, base, content, adapter=None, clip_vision=None, device="cpu", dtype=None, **kwargs):
        dtype = dtype or default_dtype(torch.device(device))
        return cls(load_models(base, content, adapter, clip_vision, dtype=dtype, **kwargs), device, dtype)

    def identity_tokens(self, identity: Identity, batch: int) -> torch.Tensor:
        return self.models.adapter.identity_tokens(identity.broadcast_to(batch))

    def null_tokens(self, batch: int) -> torch.Tensor:
        if self._null_tokens is None:
            if self.models.clip_vision is None:
                raise ValueError("RIDFRPipeline: identity guidance and RestorerID need the CLIP vision model for the "
                                 "null identity: pass clip_vision=<CLIP-ViT-H-14 file> to load_models/from_files.")
            self._null_tokens = self.models.adapter.identity_tokens(null_identity(self.models.clip_vision))
        return self._null_tokens.expand(batch, -1, -1)

    def conditions(self, identity: Identity | None, batch: int, identity_scale):
        """(identity tokens or None, null tokens or None). RestorerID's IDBalance always reads tokens: faces
        without an identity (none given, or scale 0) get the null identity's, as in its training."""
        id_tokens = null = None
        if identity is not None:
            if self.models.adapter is None:
                raise ValueError("RIDFRPipeline: an identity was given but no IP-Adapter FaceID Plus is loaded; "
                                 "pass adapter=<ip-adapter-faceid-plus(v2)_sd15.bin> to load_models/from_files.")
            id_tokens = self.identity_tokens(identity, batch).to(self.dtype)
        if self.backend.null_identity_tokens and self.models.adapter is not None:
            null = self.null_tokens(batch).to(self.dtype)
            if id_tokens is None:
                id_tokens = null
            elif isinstance(identity_scale, torch.Tensor):
                id_tokens = torch.where((identity_scale == 0).view(-1, 1, 1), null, id_tokens)
        return id_tokens, null

    @torch.no_grad()
    def __call__(
        self,
        lq_faces: torch.Tensor,
        identity: Identity | None = None,
        steps: int | None = None,
        seed: int | list[int] = 0,
        identity_scale: float | torch.Tensor = 1.0,
        content_scale: float | torch.Tensor = 1.0,
        guidance: float | None = None,
        sampler: str | None = None,
        color_fix: bool | None = None,
        progress=None,
        noise: RunNoise | None = None,
        eta: float | None = None,
    ) -> torch.Tensor:
        """``lq_faces`` (B,3,H,W) RGB in [0,1], H and W multiples of 8 (512 for the paper's setting);
        returns restored faces of the same shape in [0,1]. ``guidance`` > 1 is classifier-free guidance
        whose negative side has the null identity (and, for RestorerID, its negative prompt);
        ``identity_scale`` may be a (B,) tensor (0 = restore without identity). ``steps``, ``guidance``,
        ``sampler``, ``color_fix`` and DDIM's ``eta`` default to the backend's published settings. Every random
        draw comes from ``noise`` (default: :class:`~ridfr_core.sampling.noise.RunNoise` of the faces' seeds)."""
        backend = self.backend
        steps, guidance, sampler, color_fix = backend.sampling_settings(steps, guidance, sampler, color_fix).values()
        eta = backend.ddim_eta if eta is None else eta
        if lq_faces.ndim != 4 or lq_faces.shape[1] != 3:
            raise ValueError(f"RIDFRPipeline: lq_faces must be (B,3,H,W) RGB, got {tuple(lq_faces.shape)}.")
        if lq_faces.shape[-1] % 8 or lq_faces.shape[-2] % 8:
            raise ValueError(f"RIDFRPipeline: face size {tuple(lq_faces.shape[-2:])} is not a multiple of 8; "
                             f"align faces to {FACE_SIZE}x{FACE_SIZE}.")
        if not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"RIDFRPipeline: steps must be between 1 and {MAX_STEPS}, got {steps}.")
        if sampler not in SAMPLERS:
            raise ValueError(f"RIDFRPipeline: sampler '{sampler}' is not one of {', '.join(SAMPLERS)}.")
        models, batch = self.models, lq_faces.shape[0]
        scale_factor = 2 ** (len(models.vae.config.block_out_channels) - 1)
        latent_hw = (lq_faces.shape[-2] // scale_factor, lq_faces.shape[-1] // scale_factor)
        shape = (batch, 4, *latent_hw)
        noise = noise or RunNoise(seed if isinstance(seed, list) else face_seeds(seed, batch))
        if len(noise.seeds) != batch:
            raise ValueError(f"seed: {len(noise.seeds)} seeds for {batch} faces; give one int or one seed per face.")

        posterior_noise = noise.posterior(shape) if backend.sample_posterior else None
        lq = backend.content_input(models.content, lq_faces.to(self.device, self.dtype) * 2 - 1, models.vae, latent_hw,
                                   posterior_noise)
        text = models.prompt(backend.positive_prompt).to(self.device, self.dtype).expand(batch, -1, -1)
        if isinstance(identity_scale, torch.Tensor):
            identity_scale = identity_scale.to(self.device, self.dtype)
        id_tokens, null = self.conditions(identity, batch, identity_scale)
        use_guidance = guidance != 1.0 and (id_tokens is not None or backend.negative_prompt != backend.positive_prompt)
        if use_guidance:
            negative = models.prompt(backend.negative_prompt).to(self.device, self.dtype).expand(batch, -1, -1)
            text = torch.cat([text, negative])  # the LQ input stays one per face: the denoiser shares it
            if id_tokens is not None:
                id_tokens = torch.cat([id_tokens, null if null is not None else self.null_tokens(batch).to(self.dtype)])
            if isinstance(identity_scale, torch.Tensor):
                identity_scale = torch.cat([identity_scale, identity_scale])
            if isinstance(content_scale, torch.Tensor):
                content_scale = torch.cat([content_scale, content_scale])

        conditions = self.denoiser.prepare(text, lq, id_tokens, content_scale, identity_scale)

        def guided_eps(latents, t):
            model_in = torch.cat([latents, latents]) if use_guidance else latents
            eps = self.denoiser(model_in.to(self.dtype), t, *conditions)
            if use_guidance:
                cond, uncond = eps.chunk(2)
                eps = uncond + guidance * (cond - uncond)
            return eps

        latents = noise.start(shape).to(self.device)
        if sampler == RESTORERID_DDIM:  # latents stay float32 between steps, as in RestorerID's sampler
            plan = restorerid_plan(steps, eta, models.scheduler_config)
            for index, t in enumerate(plan.model_t):
                if plan.changes_latents(index):  # the last step of RestorerID's plan changes nothing
                    eps = guided_eps(latents, torch.tensor(t, device=self.device)).float()
                    latents = ddim_update(latents, eps, plan, index, noise.next(shape).to(self.device))
                if progress is not None:
                    progress(index + 1, steps)
        else:
            scheduler = make_scheduler(sampler, models.scheduler_config, backend.ddim_spacing)
            scheduler.set_timesteps(steps, device=self.device)
            step_options = {"eta": eta, "generator": noise.steps} if sampler == "ddim" and eta else {}
            latents = latents.to(self.dtype) * scheduler.init_noise_sigma
            for index, t in enumerate(scheduler.timesteps):
                latents = scheduler.step(guided_eps(latents, t), t, latents, **step_options).prev_sample
                if progress is not None:
                    progress(index + 1, steps)
        decoded = require_finite(self.decode(latents), models)
        if color_fix and backend.color_fix_unclamped:  # RestorerID: fix the raw decode, then clamp
            return wavelet_color_fix(decoded, lq_faces)
        restored = decoded.clamp(0, 1)
        return wavelet_color_fix(restored, lq_faces) if color_fix else restored

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0,1] scale, not clamped (RestorerID's colour fix reads the raw decode)."""
        vae = self.models.vae
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        return (images.float() + 1) / 2


class NonFiniteOutput(ValueError):
    """Sampling produced NaN/inf, which would be written as a black image."""


def require_finite(images: torch.Tensor, models: PipelineModules) -> torch.Tensor:
    """``images`` if finite; else an error naming the modules with NaN/inf weights (the usual cause)."""
    if torch.isfinite(images).all():
        return images
    modules = {"base UNet (SD1.5 checkpoint, with the IP-Adapter's LoRA fused in)": models.unet, "VAE": models.vae,
               f"{models.backend.label.partition(' (')[0]} content module": models.content,
               "IP-Adapter": models.adapter,
               "CLIP vision": models.clip_vision}
    broken = [name for name, module in modules.items() if module is not None
              and not all(torch.isfinite(parameter).all() for parameter in module.parameters())]
    cause = (f"these weights hold NaN/inf values: {'; '.join(broken)}. The file is damaged or was trained into "
             "NaN; download or train it again" if broken else
             "no weights are broken, so sampling overflowed: use finite scales and guidance, or sample in float32 "
             "instead of float16 (the CLI's --device cpu)")
    raise NonFiniteOutput(f"RIDFRPipeline: the restored faces are NaN/inf; {cause}.")

