"""The diffusers sampling backend: SD1.5 + a content module + identity adapter.

:class:`RIDFRDenoiser` is the one function RIDFR trains and samples with: noise prediction from the
noisy latent, timestep, empty-prompt states, LQ image and identity tokens. The trainer calls it for
the diffusion and alignment losses. :class:`RIDFRPipeline` restores aligned faces with either content
backend (:mod:`ridfr_core.backends`): RIDFR (UniPC 20, empty prompt) or RestorerID (DDIM 50, its
prompts, CFG 4, wavelet colour fix), each by default with its published settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel, UniPCMultistepScheduler
from diffusers.models.attention_processor import AttnProcessor2_0

from .backends import RESTORERID, SAMPLERS, Backend, backend_of, content_input, make_denoiser
from .colorfix import wavelet_color_fix
from .constants import FACE_SIZE
from .content import ContentControlNet
from .ddim_plan import RESTORERID_DDIM, RunNoise, ddim_update, restorerid_plan
from .identity import ID_TOKENS, Identity, IdentityAdapter, identity_context, null_identity

MAX_STEPS = 200  # as the RIDFRSample node; from 1000 steps on, "leading" spacing makes every timestep 1


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
            hidden = identity_context(text_states, id_tokens, identity_scale)
        elif id_tokens is not None:
            raise ValueError("RIDFRDenoiser: identity tokens given but no identity adapter is loaded.")
        return self.unet(latents, timestep, hidden, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample


@dataclass
class PipelineModules:
    """Every module a restoration needs. ``clip_vision`` is only used to encode identities; ``prompts``
    holds the text states of the backend's prompts (the empty prompt's is ``empty_prompt``)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    content: torch.nn.Module  # ContentControlNet or restorerid.LQBranch
    empty_prompt: torch.Tensor
    scheduler_config: dict
    adapter: IdentityAdapter | None = None
    clip_vision: torch.nn.Module | None = None
    lora_deltas: dict = field(default_factory=dict)
    prompts: dict = field(default_factory=dict)

    @property
    def backend(self) -> Backend:
        return backend_of(self.content)

    def prompt(self, text: str) -> torch.Tensor:
        return self.empty_prompt if text == "" else self.prompts[text]


def load_models(base: Path | str, content: Path | str, adapter: Path | str | None = None,
                clip_vision: Path | str | None = None, config_dir=None, cache_dir=None,
                lora_strength: float = 1.0, shortcut: bool | None = None) -> PipelineModules:
    """All weights from local files (see :mod:`ridfr_core.checkpoints`); the FaceID LoRA is fused at
    ``lora_strength`` (1.0 is what FaceID-Plus was trained with) into the UNet loaded here. The backend
    is the content file's: RIDFR content weights or a RestorerID checkpoint (which may also be ``base``).
    With a RestorerID checkpoint, ``adapter``/``clip_vision`` None mean the checkpoint's own copies."""
    from . import adapter_files, checkpoints, content_files

    content_module = content_files.load_content(content, cache_dir)
    backend = backend_of(content_module)
    sd = checkpoints.load_base(base, config_dir, cache_dir, prompts=(backend.positive_prompt, backend.negative_prompt))
    if backend is RESTORERID:
        from .restorerid_unet import check_branch_fits

        check_branch_fits(content_module, sd.unet, f"RestorerID weights {content}")
    models = PipelineModules(sd.unet, sd.vae, content_module, sd.empty_prompt, sd.scheduler_config, prompts=sd.prompts)
    own = {}
    if backend is RESTORERID and None in (adapter, clip_vision):
        from .restorerid_adapter import own_identity_parts

        own = dict.fromkeys(own_identity_parts(Path(content)), True)
        own["state"] = checkpoints.read_state_dict(content, "RestorerID weights") if own else None  # memory-mapped
    if adapter is not None:
        if backend is RESTORERID:
            shortcut = restorerid_identity_shortcut(Path(adapter), shortcut)
        models.adapter, models.lora_deltas = adapter_files.load_identity_adapter(adapter, sd.unet, shortcut)
    elif "adapter" in own:
        from .restorerid_adapter import identity_adapter_from_checkpoint

        models.adapter, models.lora_deltas = identity_adapter_from_checkpoint(own["state"], sd.unet, Path(content))
    adapter_files.apply_weight_deltas(sd.unet, models.lora_deltas, lora_strength)
    if clip_vision is not None:
        models.clip_vision = checkpoints.load_clip_vision(clip_vision, config_dir)
    elif "clip_vision" in own:
        from .restorerid_adapter import clip_vision_from_checkpoint

        models.clip_vision = clip_vision_from_checkpoint(own["state"], Path(content), config_dir)
    return models


def restorerid_identity_shortcut(adapter: Path, shortcut: bool | None) -> bool:
    """RestorerID was trained with FaceID Plus v1 (no shortcut); its v2 file has other weights."""
    from .checkpoints import CheckpointError

    if shortcut or (shortcut is None and "v2" in adapter.name.lower()):
        raise CheckpointError(f"IP-Adapter FaceID Plus: {adapter} is the v2 model, but RestorerID was trained with "
                              "v1: use ip-adapter-faceid-plus_sd15.bin (h94/IP-Adapter-FaceID) with RestorerID weights.")
    return False


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


def make_scheduler(backend: Backend, sampler: str, scheduler_config: dict):
    """UniPC or diffusers' DDIM from the base model's noise schedule (RestorerID's own plan is
    :mod:`ridfr_core.ddim_plan`). With RestorerID, diffusers' DDIM starts at t=999 (trailing spacing)."""
    if sampler == "unipc":
        return UniPCMultistepScheduler.from_config(scheduler_config)
    if sampler == "ddim":
        spacing = "trailing" if backend is RESTORERID else scheduler_config.get("timestep_spacing", "leading")
        return DDIMScheduler.from_config({**scheduler_config, "timestep_spacing": spacing})
    raise ValueError(f"sampler: '{sampler}' is not one of {', '.join(SAMPLERS)}.")


class RIDFRPipeline:
    """Restore aligned faces: ``pipeline(lq_faces, identity, seed=0) -> faces``, with the backend's published
    sampler, steps, prompts, guidance and colour fix unless given."""

    def __init__(self, models: PipelineModules, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        self.device = torch.device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.models = models
        for module in (models.unet, models.vae, models.content, models.adapter, models.clip_vision):
            if module is not None:
                place(module, self.device, self.dtype).requires_grad_(False).eval()
        self.backend = models.backend
        self.denoiser = make_denoiser(models.unet, models.content, models.adapter)
        self._null_tokens: torch.Tensor | None = None

    @classmethod
    def from_files(cls, base, content, adapter=None, clip_vision=None, device="cpu", dtype=None, **kwargs):
        return cls(load_models(base, content, adapter, clip_vision, **kwargs), device, dtype)

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
        if self.backend is RESTORERID and self.models.adapter is not None:
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
        ``sampler`` and ``color_fix`` default to the backend's published settings. Every random draw
        comes from ``noise`` (default: :class:`~ridfr_core.ddim_plan.RunNoise` of the faces' seeds); ``eta``:
        DDIM's (default the backend's: RestorerID 1)."""
        backend = self.backend
        steps = backend.steps if steps is None else steps
        guidance = backend.guidance if guidance is None else guidance
        sampler = sampler or backend.sampler
        color_fix = backend.color_fix if color_fix is None else color_fix
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
        noise = noise or RunNoise(seed if isinstance(seed, list) else [seed + i for i in range(batch)])
        if len(noise.seeds) != batch:
            raise ValueError(f"seed: {len(noise.seeds)} seeds for {batch} faces; give one int or one seed per face.")

        posterior_noise = noise.next(shape) if backend.sample_posterior else None
        lq = content_input(models.content, lq_faces.to(self.device, self.dtype) * 2 - 1, models.vae, latent_hw,
                           posterior_noise)
        text = models.prompt(backend.positive_prompt).to(self.device, self.dtype).expand(batch, -1, -1)
        if isinstance(identity_scale, torch.Tensor):
            identity_scale = identity_scale.to(self.device, self.dtype)
        id_tokens, null = self.conditions(identity, batch, identity_scale)
        use_guidance = guidance != 1.0 and (id_tokens is not None or backend.negative_prompt != backend.positive_prompt)
        if use_guidance:
            negative = models.prompt(backend.negative_prompt).to(self.device, self.dtype).expand(batch, -1, -1)
            text, lq = torch.cat([text, negative]), torch.cat([lq, lq])
            if id_tokens is not None:
                id_tokens = torch.cat([id_tokens, null if null is not None else self.null_tokens(batch).to(self.dtype)])
            if isinstance(identity_scale, torch.Tensor):
                identity_scale = torch.cat([identity_scale, identity_scale])
            if isinstance(content_scale, torch.Tensor):
                content_scale = torch.cat([content_scale, content_scale])

        def guided_eps(latents, t):
            model_in = torch.cat([latents, latents]) if use_guidance else latents
            eps = self.denoiser(model_in.to(self.dtype), t, text, lq, id_tokens, content_scale, identity_scale)
            if use_guidance:
                cond, uncond = eps.chunk(2)
                eps = uncond + guidance * (cond - uncond)
            return eps

        latents = noise.start(shape).to(self.device)
        if sampler == RESTORERID_DDIM:  # latents stay float32 between steps, as in RestorerID's sampler
            plan = restorerid_plan(steps, eta, models.scheduler_config)
            for index, t in enumerate(plan.model_t):
                eps = guided_eps(latents, torch.tensor(t, device=self.device)).float()
                latents = ddim_update(latents, eps, plan, index, noise.next(shape).to(self.device))
                if progress is not None:
                    progress(index + 1, steps)
        else:
            scheduler = make_scheduler(backend, sampler, models.scheduler_config)
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
        """Images in [0,1] scale, not clamped (the colour fix of RestorerID reads the raw decode)."""
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

