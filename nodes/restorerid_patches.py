"""RestorerID's LQ branch as patches on a clone of ComfyUI's MODEL.

- Each modulated ResBlock is replaced, for the time of sampling, by an object patch
  (``ModelPatcher.add_object_patch``) that reuses the block's own layers under the same names (so weight
  patches, LoRAs, lowvram casting and offloading of ComfyUI still apply) and computes the residual
  branch ``h`` and the skip ``x`` separately. It is not a ``TimestepBlock``, so ComfyUI's
  ``forward_timestep_embed`` hands it to :func:`modulated_forward` (a ``forward_timestep_embed_patch``),
  which receives the per-call ``transformer_options`` and combines ``h`` and ``x`` with
  ``ridfr_core.backends.restorerid.lq_branch.modulate``. Unpatching puts the original ResBlocks back.
- :class:`StructurePatch` (a DIFFUSION_MODEL wrapper) runs the structure encoder on the LQ faces' VAE
  latent (a posterior sample when RestorerID's sampler hands it the eps, as RestorerID's inference takes;
  else the posterior mean) and the UNet's timestep each step and passes the maps to the ResBlocks in a copy of
  ``transformer_options`` (nothing is stored on shared objects between calls).
- :class:`BalanceTokensPatch` (added by IdentityCondition) puts the identity tokens IDBalance reads into
  the same copy, one row per batch row: the identity's for cond rows (the null identity's for faces that
  matched nobody), the null identity's for uncond rows. Without it, StructurePatch gives IDBalance the null
  identity's tokens (what RestorerID was trained with for faces without a reference), as ridfr_core does.
"""

from __future__ import annotations

import torch

from .memory import register_modules
from .patches import SigmaRange, chunks_of
from .restorerid_sampler import POSTERIOR_EPS
from .sockets import NodeError, module_of

STRUCTURE_FEATURES = "ridfr_restorerid"    # transformer_options key: StructureStep of this call
BALANCE_TOKENS = "ridfr_balance_tokens"    # transformer_options key: (batch, 4, C) identity tokens for IDBalance


def block_path(name: str) -> str:
    """LDM ResBlock name -> the MODEL attribute path (``input_blocks.1`` -> ``diffusion_model.input_blocks.1.0``)."""
    from ..ridfr_core.backends.restorerid.lq_branch import resblock_path

    return f"diffusion_model.{resblock_path(name)}"


class ModulatedResBlock(torch.nn.Module):
    """A ResBlock whose output :func:`modulated_forward` computes; holds the original block's layers."""

    def __init__(self, block, name: str):
        super().__init__()
        self.in_layers, self.emb_layers = block.in_layers, block.emb_layers
        self.out_layers, self.skip_connection = block.out_layers, block.skip_connection
        self.name = name

    def branches(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual ``h``, skip) as ComfyUI's ResBlock computes them (no up/down, no scale-shift norm)."""
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[..., None, None]
        return self.out_layers(h), self.skip_connection(x)

    def forward(self, x, *args):
        raise RuntimeError(f"RestorerID: UNet block {self.name} was called without the RIDFR patch; another node "
                           "removed forward_timestep_embed patches from this MODEL.")


class StructureStep:
    """What the modulated ResBlocks need in one UNet call: the branch, its maps for this step, the strength."""

    def __init__(self, branch, features: dict[int, torch.Tensor], strength: float):
        self.branch, self.features, self.strength = branch, features, strength


def modulated_forward(layer: ModulatedResBlock, x, emb, context, transformer_options, *args):
    """``forward_timestep_embed_patch`` handler for :class:`ModulatedResBlock`."""
    from ..ridfr_core.backends.restorerid.lq_branch import modulate

    residual, skip = layer.branches(x, emb)
    step = transformer_options.get(STRUCTURE_FEATURES)
    if step is None or step.strength == 0:  # outside the percent range: the plain ResBlock
        return skip + residual
    param = next(step.branch.parameters())
    out = modulate(step.branch.modulation(layer.name), residual.to(param.device, param.dtype),
                   skip.to(param.device, param.dtype), step.features, transformer_options.get(BALANCE_TOKENS),
                   step.strength)
    return out.to(x.device, x.dtype)


class StructurePatch:
    """DIFFUSION_MODEL wrapper: ``(executor, x, timesteps, context, y, control, transformer_options)``."""

    def __init__(self, content, lq_latent: torch.Tensor, strength: float, sigmas: SigmaRange,
                 null_tokens: torch.Tensor, lq_std: torch.Tensor | None = None):
        self.content = content            # ModelPatcher around ridfr_core.backends.restorerid.lq_branch.LQBranch
        self.lq_latent = lq_latent        # (F,4,h,w): the LQ faces' VAE posterior mean, scaled as the UNet's input
        self.lq_std = lq_std              # (F,4,h,w): the posterior's std, same scale
        self.strength, self.sigmas = strength, sigmas
        self.null_tokens = null_tokens    # (1,4,C): IDBalance's tokens where no IdentityCondition gives any

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        strength = self.strength
        if strength != 0 and self.sigmas.active(transformer_options):
            branch = module_of(self.content)
            param = next(branch.parameters())
            repeats = chunks_of(x.shape[0], self.lq_latent.shape[0], "ContentCondition", "image")
            lq = self.lq_latent
            eps = transformer_options.get(POSTERIOR_EPS)
            if eps is not None and self.lq_std is not None:
                lq = lq + self.lq_std * eps.to(lq.device, lq.dtype)
            lq = lq.to(param.device, param.dtype).repeat(repeats, 1, 1, 1)
            if lq.shape[-2:] != x.shape[-2:]:
                raise NodeError("ContentCondition", "image", f"the sampled latent is {tuple(x.shape[-2:])} but the "
                                f"faces' latent is {tuple(lq.shape[-2:])}; sample the latent from ContentCondition.")
            with torch.no_grad():
                features = branch.features(lq, timesteps.to(param.device))  # float32: t up to 999
            transformer_options = {**transformer_options, STRUCTURE_FEATURES: StructureStep(branch, features, strength)}
            if BALANCE_TOKENS not in transformer_options:  # an IdentityCondition's wrapper may still set them
                null = self.null_tokens.to(x.device).expand(x.shape[0], -1, -1)
                transformer_options[BALANCE_TOKENS] = null
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)


class BalanceTokensPatch:
    """DIFFUSION_MODEL wrapper putting IDBalance's per-row identity tokens into ``transformer_options``."""

    def __init__(self, tokens):
        self.tokens = tokens              # patches.IdentityTokens

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        tokens = self.tokens.balance_tokens(x.shape[0], transformer_options.get("cond_or_uncond"), x.device)
        transformer_options = {**transformer_options, BALANCE_TOKENS: tokens}
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)


def modulated_blocks(model, branch) -> dict[str, ModulatedResBlock]:
    """{MODEL attribute path: replacement} for every block the branch modulates; a clear error when the
    MODEL is not an SD1.5 UNet or already carries a RestorerID condition."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    replacements = {}
    for name, channels in branch.config["blocks"].items():
        path = block_path(name)
        try:
            block = model.get_model_object(path)
        except (AttributeError, IndexError, KeyError):
            block = None
        if isinstance(block, ModulatedResBlock):
            raise NodeError("ContentCondition", "model", "this MODEL already has a RestorerID content condition; "
                            "use one Content Condition per MODEL.")
        if type(block) is not ResBlock or block.updown or block.use_scale_shift_norm or block.emb_layers is None:
            raise NodeError("ContentCondition", "model", f"the MODEL has no plain ResBlock at {name}, which the "
                            "RestorerID weights modulate; RestorerID needs a Stable Diffusion 1.5 checkpoint.")
        if block.out_channels != channels:
            raise NodeError("ContentCondition", "model", f"UNet block {name} is {block.out_channels} channels wide "
                            f"but the RestorerID weights expect {channels}; use a Stable Diffusion 1.5 checkpoint.")
        replacements[path] = ModulatedResBlock(block, name)
    return replacements


def apply_structure(model, ridfr, lq_latent: torch.Tensor, strength: float, sigmas: SigmaRange,
                    null_tokens: torch.Tensor, lq_std: torch.Tensor | None = None):
    """A clone of ``model`` whose ResBlocks RestorerID's LQ branch modulates (``model`` itself is untouched);
    IDBalance reads the null identity's ``null_tokens`` unless an IdentityCondition gives the faces' own."""
    import comfy.patcher_extension

    patched = model.clone()
    for path, replacement in modulated_blocks(model, module_of(ridfr.content)).items():
        patched.add_object_patch(path, replacement)
    patched.set_model_forward_timestep_embed_patch((ModulatedResBlock, modulated_forward))
    patch = StructurePatch(ridfr.content, lq_latent, strength, sigmas, null_tokens, lq_std)
    key = f"ridfr_restorerid_{id(patch)}"
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, key, patch)
    register_modules(patched, key, [ridfr.content])
    return patched


def add_balance_tokens(patched, tokens) -> None:
    """Give IDBalance the identity tokens (IdentityCondition with RestorerID weights)."""
    import comfy.patcher_extension

    patch = BalanceTokensPatch(tokens)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, f"ridfr_balance_{id(patch)}",
                                 patch)

