"""RIDFR's two conditions as patches on a clone of ComfyUI's MODEL (RestorerID's content module, the
second backend, is in :mod:`.restorerid_patches`).

- Content: a DIFFUSION_MODEL wrapper runs the content ControlNet on the UNet's own input (the scaled
  noisy latent ``x`` and timestep ``t``, exactly what the UNet sees) plus the resized LQ faces, and adds
  its residuals to ``control`` (the skip connections and the mid block) before calling the UNet, summed
  with any ControlNet already there. Wrappers chain, so other packs' wrappers keep working.
- Identity: an ``attn2`` replacement on every cross-attention computes
  ``Attn(Q,K,V) + scale * Attn(Q,K',V')``, both terms with ComfyUI's ``optimized_attention`` (what
  ``ridfr_core.identity.adapter.identity_attention`` computes); an existing replacement at the same block (another
  pack's) computes the first term.
- The FaceID LoRA goes in as ordinary weight patches (``ModelPatcher.add_patches``).

The modules are registered with the patched MODEL (:func:`.memory.register_modules`), so ComfyUI loads them with it,
whole (never split between GPU and CPU by a partial load).
Patch objects are immutable (apart from caches of step-independent tensors: the resized LQ faces, the
identity K'/V' projections): ``ModelPatcher.clone`` deep-copies ``model_options``, and they return
themselves from ``__deepcopy__`` so that clones share the modules instead of copying them.

Batches: ComfyUI runs cond and uncond as chunks of one batch (``transformer_options["cond_or_uncond"]``),
each chunk holding all F faces. Conditions are per face and repeated per chunk; the uncond chunk gets
the null identity (FaceID-Plus' unconditional tokens), so CFG is identity guidance as in the diffusers
pipeline. ``transformer_options["ridfr"]`` (set by RIDFRSample) multiplies the scales at run time.
"""

from __future__ import annotations

import re

import torch

from .memory import register_modules
from .sockets import NodeError, module_of

LDM_ATTENTION = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(?:(\d+)\.)?1\.transformer_blocks\.(\d+)\.attn2\.")
BLOCK_NAMES = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}


def chunks_of(batch: int, faces: int, node: str, option: str) -> int:
    """How many cond/uncond chunks a model batch of ``batch`` holds for ``faces`` faces."""
    if faces == 0 or batch % faces:
        raise NodeError(node, option, f"the sampler runs a batch of {batch} latents but the condition is for {faces} "
                        f"face(s). Sample the latent from ContentCondition (one latent per face), or give one "
                        f"condition per latent.")
    return batch // faces


def merge_control(control: dict | None, down: tuple[torch.Tensor, ...], mid: torch.Tensor) -> dict:
    """ComfyUI's control dict with RIDFR's residuals added: ``output`` holds the skip-connection
    residuals in UNet input-block order (ComfyUI pops them from the end), ``middle`` the mid block's."""
    merged = {"input": [], "middle": [mid], "output": list(down)}
    if control:
        for name, residuals in control.items():
            if not residuals:  # e.g. a T2I-Adapter's empty 'middle'/'output' lists
                continue
            if not merged.get(name):
                merged[name] = list(residuals)
                continue
            if len(residuals) != len(merged[name]):
                raise NodeError("ContentCondition", None, f"another control ({len(residuals)} '{name}' residuals) "
                                f"does not match RIDFR's {len(merged[name])}; it is not an SD1.5 ControlNet.")
            merged[name] = [ours if theirs is None else theirs + ours for theirs, ours in zip(residuals, merged[name])]
    return merged


class SigmaRange:
    """The part of sampling a content condition is active in (ContentCondition's start/end percents)."""

    def __init__(self, model, start_percent: float, end_percent: float):
        sampling = model.get_model_object("model_sampling")
        self.sigma_start = sampling.percent_to_sigma(start_percent)
        self.sigma_end = sampling.percent_to_sigma(end_percent)

    def active(self, transformer_options: dict) -> bool:
        sigmas = transformer_options.get("sigmas")
        if sigmas is None:
            return True
        sigma = float(sigmas.reshape(-1)[0])
        return self.sigma_end <= sigma <= self.sigma_start


class ContentPatch:
    """DIFFUSION_MODEL wrapper: ``(executor, x, timesteps, context, y, control, transformer_options)``."""

    def __init__(self, content, lq_faces: torch.Tensor, strength: float, sigmas: SigmaRange):
        self.content = content            # ModelPatcher around ContentControlNet
        self.lq = lq_faces * 2 - 1        # (F,3,S,S) in [-1,1]
        self.strength, self.sigmas = strength, sigmas
        self._resized = {}                # (latent hw, repeats, device, dtype) -> LQ input, constant over steps

    def __deepcopy__(self, memo):
        return self

    def lq_input(self, latent_hw: tuple[int, int], repeats: int, device, dtype) -> torch.Tensor:
        """The LQ faces resized to the latent and repeated per cond/uncond chunk (computed once per shape)."""
        from ..ridfr_core.backends.ridfr.controlnet import lq_to_latent_size

        key = (latent_hw, repeats, device, dtype)
        if key not in self._resized:
            lq = lq_to_latent_size(self.lq.to(device, torch.float32), latent_hw)
            self._resized[key] = lq.repeat(repeats, 1, 1, 1).to(dtype)
        return self._resized[key]

    def residuals(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, transformer_options: dict):
        module = module_of(self.content)
        param = next(module.parameters())
        repeats = chunks_of(x.shape[0], self.lq.shape[0], "ContentCondition", "image")
        lq = self.lq_input(tuple(x.shape[-2:]), repeats, param.device, param.dtype)
        down, mid = module(x.to(param.device, param.dtype), timesteps.to(param.device),
                           context.to(param.device, param.dtype), lq, self.strength)
        return tuple(d.to(x.device, x.dtype) for d in down), mid.to(x.device, x.dtype)

    def __call__(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        if self.strength != 0 and self.sigmas.active(transformer_options):
            control = merge_control(control, *self.residuals(x, timesteps, context, transformer_options))
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)


class IdentityTokens:
    """The identity tokens (B,4,C) for the cond chunks, the null-identity tokens (1,4,C) for uncond
    chunks, and the per-face scale (B,), shared by every attention patch of one IdentityCondition."""

    def __init__(self, tokens: torch.Tensor, null_tokens: torch.Tensor, face_scales: torch.Tensor, weight: float):
        self.tokens, self.null_tokens = tokens, null_tokens
        self.matched = face_scales != 0               # faces that have a person (MatchIdentities: scale 0 = nobody)
        self.face_scales = face_scales * weight
        self.inactive = not bool(self.face_scales.any())  # weight 0, or no face matched anybody
        self._layouts = {}
        self._balance = {}

    def layout(self, batch: int, cond_or_uncond: list[int] | None, device, dtype):
        """(rows, scales) for a model batch: ``rows`` (batch,) indexes ``cat([tokens, null_tokens])`` (the
        null identity for uncond chunks), ``scales`` (batch,) the per-face scales. Cached per batch layout,
        since every attention patch of every step asks for the same one."""
        kinds = tuple(cond_or_uncond or [0])
        key = (batch, kinds, device, dtype)
        if key not in self._layouts:
            self._layouts[key] = self._layout(batch, kinds, device, dtype)
        return self._layouts[key]

    def balance_tokens(self, batch: int, cond_or_uncond: list[int] | None, device) -> torch.Tensor:
        """(batch, 4, C) tokens for RestorerID's IDBalance: the identity's on cond rows of faces that have a
        person, the null identity's elsewhere (uncond rows, unmatched faces), as RestorerID feeds it.
        Independent of the weight, which scales the identity attention only."""
        kinds = tuple(cond_or_uncond or [0])
        key = (batch, kinds, device)
        if key not in self._balance:
            rows, _ = self._layout(batch, kinds, "cpu", torch.float32)
            faces, count = batch // len(kinds), self.tokens.shape[0]
            matched = self.matched.expand(faces) if self.matched.shape[0] == 1 else self.matched
            rows = torch.where(matched.repeat(len(kinds)), rows, torch.full_like(rows, count))
            self._balance[key] = torch.cat([self.tokens, self.null_tokens])[rows].to(device)
        return self._balance[key]

    def _layout(self, batch: int, kinds: tuple[int, ...], device, dtype):
        chunks, count = len(kinds), self.tokens.shape[0]
        faces = batch // chunks
        if batch % chunks or count not in (1, faces):
            raise NodeError("IdentityCondition", "identity", f"{count} identities for {faces} faces per "
                            "batch: use one identity for all faces, or MatchIdentities for one per face.")
        scales = self.face_scales.expand(faces) if self.face_scales.shape[0] == 1 else self.face_scales
        if scales.shape[0] != faces:
            raise NodeError("IdentityCondition", "identity", f"{scales.shape[0]} per-face scales for {faces} faces.")
        cond_rows = torch.arange(faces) if count == faces else torch.zeros(faces, dtype=torch.long)
        rows = torch.cat([cond_rows if kind == 0 else torch.full((faces,), count) for kind in kinds])
        return rows.to(device), scales.repeat(chunks).to(device, dtype).view(-1, 1, 1)


class IdentityAttentionPatch:
    """``attn2`` replacement ``(q, k, v, extra_options) -> out`` for one cross-attention of the UNet.
    ``q, k, v`` come already projected by the attention's to_q/to_k/to_v, heads not yet split."""

    def __init__(self, adapter, processor_name: str, tokens: IdentityTokens, wrapped=None):
        self.adapter = adapter            # ModelPatcher around IdentityAdapter
        self.processor_name = processor_name
        self.tokens = tokens
        self.wrapped = wrapped            # a replacement that was already there (another pack's), or None
        self._projected = {}              # (device, dtype) -> K', V' of cat([tokens, null_tokens]): constant

    def __deepcopy__(self, memo):
        return self

    def projected(self, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """to_k_ip / to_v_ip of the identity and null tokens, once (the adapter is frozen)."""
        key = (device, dtype)
        if key not in self._projected:
            processor = module_of(self.adapter).attn_processors[self.processor_name]
            weight = processor.to_k_ip[0].weight
            tokens = torch.cat([self.tokens.tokens, self.tokens.null_tokens]).to(weight.device, weight.dtype)
            with torch.no_grad():
                self._projected[key] = (processor.to_k_ip[0](tokens).to(device, dtype),
                                        processor.to_v_ip[0](tokens).to(device, dtype))
        return self._projected[key]

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules import attention

        heads, precision = extra_options["n_heads"], extra_options.get("attn_precision")
        if self.wrapped is not None:
            out = self.wrapped(q, k, v, extra_options)
        else:  # what CrossAttention itself runs (transformer_options: other packs' attention overrides)
            out = attention.optimized_attention(q, k, v, heads, attn_precision=precision,
                                                transformer_options=extra_options)
        if self.tokens.inactive:
            return out
        rows, scales = self.tokens.layout(q.shape[0], extra_options.get("cond_or_uncond"), q.device, q.dtype)
        id_keys, id_values = self.projected(q.device, q.dtype)
        # Attn(Q, K', V') with ComfyUI's attention function (xformers, sage, split... as the user chose)
        id_out = attention.optimized_attention(q, id_keys[rows], id_values[rows], heads, attn_precision=precision)
        return out + scales * id_out


def diffusers_to_comfy_keys(model) -> dict[str, str]:
    """{diffusers UNet parameter name: ComfyUI state-dict key (``diffusion_model.…``)} for this MODEL."""
    import comfy.utils

    unet_config = model.model.model_config.unet_config
    return {diffusers: f"diffusion_model.{ldm}" for diffusers, ldm in comfy.utils.unet_to_diffusers(unet_config).items()}


def attention_block(key_map: dict[str, str], processor_name: str) -> tuple[str, int, int]:
    """Diffusers processor name -> ComfyUI's attn2 patch key (block, number, transformer index)."""
    ldm = key_map.get(processor_name.removesuffix(".processor") + ".to_k.weight", "").removeprefix("diffusion_model.")
    match = LDM_ATTENTION.match(ldm)
    if match is None:
        raise NodeError("IdentityCondition", "model", f"the MODEL has no cross-attention matching the adapter's "
                        f"'{processor_name}'; the adapter and the checkpoint are not both SD1.5.")
    return BLOCK_NAMES[match[1]], int(match[2] or 0), int(match[3])


def apply_identity(model, ridfr, tokens: IdentityTokens, lora_strength: float):
    """A clone of ``model`` with the identity attention, the FaceID LoRA (as ComfyUI's own low-rank LoRA patches)
    and the adapter registered."""
    from comfy.weight_adapter.lora import LoRAAdapter

    patched = model.clone()
    key_map = diffusers_to_comfy_keys(model)
    replaced = patched.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})
    for name in module_of(ridfr.adapter).attn_processors:
        block, number, index = attention_block(key_map, name.replace("__", "."))
        wrapped = replaced.get((block, number, index), replaced.get((block, number)))
        patched.set_model_attn2_replace(IdentityAttentionPatch(ridfr.adapter, name, tokens, wrapped),
                                        block, number, index)
    if lora_strength != 0 and ridfr.lora:
        missing = [name for name in ridfr.lora if name not in key_map]
        if missing:
            raise NodeError("IdentityCondition", "model", f"the FaceID LoRA targets {missing[0]}, which this MODEL "
                            "does not have; use an SD1.5 checkpoint.")
        patches = {key_map[name]: LoRAAdapter(set(), (up, down, None, None, None, None))  # alpha None: scale 1
                   for name, (up, down) in ridfr.lora.items()}
        applied = patched.add_patches(patches, strength_patch=lora_strength)
        if len(applied) != len(patches):
            raise NodeError("IdentityCondition", "model", f"only {len(applied)} of {len(patches)} FaceID LoRA weights "
                            "fit this MODEL; use an SD1.5 checkpoint.")
    register_modules(patched, f"ridfr_identity_{id(tokens)}", [ridfr.adapter])
    return patched


def apply_content(model, ridfr, lq_faces: torch.Tensor, strength: float, sigmas: SigmaRange):
    """A clone of ``model`` whose UNet gets RIDFR's content residuals in the sigma range."""
    import comfy.patcher_extension

    patched = model.clone()
    patch = ContentPatch(ridfr.content, lq_faces, strength, sigmas)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, f"ridfr_content_{id(patch)}", patch)
    register_modules(patched, f"ridfr_content_{id(patch)}", [ridfr.content])
    return patched
