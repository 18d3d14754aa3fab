"""The diffusers backend of RestorerID: SD1.5's UNet stepped block by block with the LQ branch's modulation.

diffusers' ``ResnetBlock2D`` has no place for a per-step condition, so :class:`RestorerIDDenoiser` runs
the UNet's own blocks in the order of ``UNet2DConditionModel.forward`` and calls a modulated ResBlock
(:func:`modulated_resnet`) where RestorerID has one. Everything travels as arguments: no state is set on
the UNet, and with ``content_scale=0`` the result is exactly the plain UNet's.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from diffusers import UNet2DConditionModel

from ...weights.checkpoints import CheckpointError
from ...identity.adapter import (FixedKeysValues, IdentityAdapter, fixed_keys_values, identity_context,
                                 install_identity_processors)
from .lq_branch import LQBranch, modulate


def resnet_names(unet: UNet2DConditionModel) -> dict[str, str]:
    """{diffusers resnet path: LDM ResBlock name} for an SD1.5-shaped UNet (``down_blocks.0.resnets.0`` ->
    ``input_blocks.1``, ``mid_block.resnets.1`` -> ``middle_block.2``, ``up_blocks.0.resnets.0`` ->
    ``output_blocks.0``)."""
    layers = unet.config.layers_per_block
    names = {}
    for level in range(len(unet.down_blocks)):
        for j in range(layers):
            names[f"down_blocks.{level}.resnets.{j}"] = f"input_blocks.{1 + level * (layers + 1) + j}"
    names["mid_block.resnets.0"], names["mid_block.resnets.1"] = "middle_block.0", "middle_block.2"
    for level in range(len(unet.up_blocks)):
        for j in range(layers + 1):
            names[f"up_blocks.{level}.resnets.{j}"] = f"output_blocks.{level * (layers + 1) + j}"
    return names


def check_branch_fits(branch: LQBranch, unet: UNet2DConditionModel, source: str = "RestorerID weights") -> None:
    """Every modulated block exists in this UNet with the same width; else a clear error."""
    resnets = {ldm: path for path, ldm in resnet_names(unet).items()}
    modules = dict(unet.named_modules())
    for name, channels in branch.config["blocks"].items():
        if name not in resnets:
            raise CheckpointError(f"{source}: modulates UNet block {name}, which this base model does not have; "
                             "RestorerID needs a Stable Diffusion 1.5 base.")
        width = modules[resnets[name]].conv2.out_channels
        if width != channels:
            raise CheckpointError(f"{source}: block {name} is {channels} channels wide in the RestorerID file but "
                             f"{width} in the base UNet; the file is not for this (SD1.5) base model.")


def modulated_resnet(resnet, x: torch.Tensor, temb: torch.Tensor, modulation, features, id_tokens, strength):
    """diffusers ``ResnetBlock2D.forward`` (SD1.5 configuration) with RestorerID's modulation around the skip."""
    h = resnet.conv1(resnet.nonlinearity(resnet.norm1(x)))
    h = h + resnet.time_emb_proj(resnet.nonlinearity(temb))[:, :, None, None]
    h = resnet.conv2(resnet.dropout(resnet.nonlinearity(resnet.norm2(h))))
    skip = resnet.conv_shortcut(x) if resnet.conv_shortcut is not None else x
    return modulate(modulation, h, skip, features, id_tokens, strength)


class RestorerIDDenoiser(torch.nn.Module):
    """eps(z_t, t, c_text, z_LQ, c_ID) for RestorerID, with the signature of :class:`RIDFRDenoiser`.

    ``lq_latent`` is the LQ faces' VAE latent (scaled), the same for every step: one per face, while
    ``latents`` may hold several copies of the faces end to end (CFG), whose structure maps are then computed
    once. ``id_tokens`` feed both the decoupled attention (times ``identity_scale``) and IDBalance. As with
    RIDFR, installing the adapter makes the UNet's cross-attention processors the adapter's own."""

    def __init__(self, unet: UNet2DConditionModel, content: LQBranch, adapter: IdentityAdapter | None = None):
        super().__init__()
        check_branch_fits(content, unet)
        self.unet, self.content, self.adapter = unet, content, adapter
        self.gradient_checkpointing = False  # training: recompute each block in the backward pass
        self.modulated = resnet_names(unet)
        if adapter is not None:
            install_identity_processors(unet, adapter)

    def prepare(self, text_states: torch.Tensor, lq_latent: torch.Tensor, id_tokens: torch.Tensor | None = None,
                content_scale: float | torch.Tensor = 1.0, identity_scale: float | torch.Tensor = 1.0) -> tuple:
        """The arguments after ``(latents, timestep)`` for every step of one restoration, with the text and
        identity keys/values of the UNet's cross-attention computed once, in place of the text states."""
        if self.adapter is not None and id_tokens is not None:
            text_states = fixed_keys_values(self.unet, text_states.to(self.unet.dtype), id_tokens, identity_scale)
        return text_states, lq_latent, id_tokens, content_scale, identity_scale

    def forward(self, latents: torch.Tensor, timestep, text_states: torch.Tensor | FixedKeysValues,
                lq_latent: torch.Tensor, id_tokens: torch.Tensor | None = None,
                content_scale: float | torch.Tensor = 1.0, identity_scale: float | torch.Tensor = 1.0) -> torch.Tensor:
        """``text_states``: the text encoder's states, or :meth:`prepare`'s keys/values of them (which hold the
        identity scale themselves)."""
        unet, batch = self.unet, latents.shape[0]
        timesteps = torch.as_tensor(timestep, device=latents.device)
        timesteps = (timesteps[None] if timesteps.ndim == 0 else timesteps).expand(batch)
        # the frozen UNet runs in its own dtype whatever it is handed, the LQ branch in its own (see modulate)
        latents = latents.to(unet.dtype)
        # the copies of a face share its timestep, so its maps are those of the first copy's
        features = self.content.features(lq_latent.to(next(self.content.parameters()).dtype),
                                         timesteps[:lq_latent.shape[0]])
        if isinstance(text_states, FixedKeysValues):
            context = text_states
        elif self.adapter is not None:
            if id_tokens is None:
                raise ValueError("RestorerIDDenoiser: RestorerID needs identity tokens for every face (the null "
                                 "identity's for faces restored without one).")
            context = identity_context(text_states.to(unet.dtype), id_tokens, identity_scale)
        elif id_tokens is not None:
            raise ValueError("RestorerIDDenoiser: identity tokens given but no identity adapter is loaded.")
        else:
            context = text_states.to(unet.dtype)

        def resnet(path: str, module, h):
            return checkpointed(modulated_resnet, module, h, emb, self.content.modulation(self.modulated[path]), features,
                                id_tokens, content_scale)

        def attention(module, h):
            return checkpointed(lambda x: module(x, encoder_hidden_states=context, return_dict=False)[0], h)

        def checkpointed(function, *args):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)
            return function(*args)

        emb = unet.time_embedding(unet.time_proj(timesteps).to(latents.dtype))
        h = unet.conv_in(latents)
        skips = [h]
        for level, block in enumerate(unet.down_blocks):
            for j, module in enumerate(block.resnets):
                h = resnet(f"down_blocks.{level}.resnets.{j}", module, h)
                if getattr(block, "attentions", None):
                    h = attention(block.attentions[j], h)
                skips.append(h)
            for down in block.downsamplers or []:
                h = down(h)
                skips.append(h)
        h = resnet("mid_block.resnets.0", unet.mid_block.resnets[0], h)
        h = attention(unet.mid_block.attentions[0], h)
        h = resnet("mid_block.resnets.1", unet.mid_block.resnets[1], h)
        for level, block in enumerate(unet.up_blocks):
            for j, module in enumerate(block.resnets):
                h = resnet(f"up_blocks.{level}.resnets.{j}", module, torch.cat([h, skips.pop()], dim=1))
                if getattr(block, "attentions", None):
                    h = attention(block.attentions[j], h)
            for up in block.upsamplers or []:
                h = up(h, skips[-1].shape[-2:] if skips else None)
        return unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))
