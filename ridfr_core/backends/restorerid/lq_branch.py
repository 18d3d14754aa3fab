"""RestorerID's low-quality (LQ) branch: the second member of the content-module family.

RestorerID (Ying et al., 2024) keeps SD1.5 and IP-Adapter-FaceID-Plus frozen and adds:

- a time-aware *structure encoder* (an encoder-only UNet) run on the VAE latent of the LQ face at every
  step; it returns one 256-channel map per latent width (64/32/16/8 for a 512 face);
- in 22 UNet ResBlocks, a *spade* modulation of the residual branch, ``GN(h)(1+gamma) + beta`` from the map
  at that width, before the skip connection is added;
- after the skip connection, an *IDBalance* (FIR-Adapter) that lets the map attend to the 4 FaceID tokens
  and adds ``GN(y) gamma' + beta'`` (zero-initialised convs, so an untrained one changes nothing).

Module and parameter names follow the published LDM layout so checkpoints map one-to-one; every width is
read from tensor shapes (:meth:`LQBranch.from_state`). The modulation math lives in :func:`modulate` so
that the diffusers backend (:mod:`.denoiser`) and the ComfyUI patch compute the same
thing; ``strength`` blends from the plain UNet (0) to the trained modulation (1).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn

from ...identity.adapter import identity_attention

ENCODER_PREFIX = "structcond_stage_model."
# input/output ResBlocks are sub-module 0 of their block (input_blocks.1.0); the middle ones are the block's
# children 0 and 2 themselves (middle_block.2)
MODULATION_KEY = re.compile(r"^model\.diffusion_model\.(?:((?:input|output)_blocks\.\d+)\.0|(middle_block\.[02]))\."
                            r"(spade|IDBalance)\.(.+)$")
ENCODER_HEADS = 4       # structcond_stage_model.num_heads (legacy QKV order); not visible in shapes
IDBALANCE_HEADS = 8     # IDBalance cross-attention heads (dim_head = width // 8)
GROUPS = 32


class GroupNorm32(nn.GroupNorm):
    """LDM's ``normalization``: GroupNorm over 32 groups, computed in float32 (its weights too, which a
    half-precision model holds in fp16/bf16), returned in the input's dtype."""

    def __init__(self, channels: int):
        super().__init__(GROUPS, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class ResBlock(nn.Module):
    """The LDM ResBlock of the structure encoder (no scale-shift norm, no up/down sampling)."""

    def __init__(self, channels: int, out_channels: int, emb_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb).to(x.dtype)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """LDM's spatial self-attention with the legacy head split (heads first, then q/k/v per head)."""

    def __init__(self, channels: int, heads: int = ENCODER_HEADS):
        super().__init__()
        self.heads = heads
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        batch, channels, *spatial = x.shape
        qkv = self.qkv(self.norm(x.reshape(batch, channels, -1)))
        # (batch, heads, tokens, head width): 4-D, so SDPA takes its fused kernel (on 3-D input PyTorch falls back
        # to the unfused math, which holds the whole tokens x tokens matrix: 4x slower at 64x64 on CPU)
        q, k, v = qkv.reshape(batch, self.heads, 3 * channels // self.heads, -1).transpose(2, 3).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(batch, channels, -1)
        return (x.reshape(batch, channels, -1) + self.proj_out(out)).reshape(batch, channels, *spatial)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.op(x)


class EncoderBlock(nn.ModuleList):
    """LDM's ``TimestepEmbedSequential``: children named 0, 1, ... so the keys match the checkpoint."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if not isinstance(layer, nn.Conv2d) else layer(x)
        return x


class StructureEncoder(nn.Module):
    """``structcond_stage_model``: the LQ latent and the timestep -> {latent width: feature map}.

    A map is taken where the resolution is about to halve (the activation entering each downsample)
    and after the middle block, then passed through its ``fea_tran`` ResBlock to the common width."""

    def __init__(self, layout: dict):
        super().__init__()
        self.model_channels = layout["model_channels"]
        emb = layout["emb_channels"]
        self.time_embed = nn.Sequential(nn.Linear(self.model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        blocks = []
        for kind, c_in, c_out in layout["input_blocks"]:
            if kind == "conv":
                blocks.append(EncoderBlock([nn.Conv2d(c_in, c_out, 3, padding=1)]))
            elif kind == "down":
                blocks.append(EncoderBlock([Downsample(c_in)]))
            else:
                layers = [ResBlock(c_in, c_out, emb)] + ([AttentionBlock(c_out)] if kind == "res+attn" else [])
                blocks.append(EncoderBlock(layers))
        self.input_blocks = nn.ModuleList(blocks)
        middle = layout["middle_channels"]
        self.middle_block = EncoderBlock([ResBlock(middle, middle, emb), AttentionBlock(middle),
                                          ResBlock(middle, middle, emb)])
        self.fea_tran = nn.ModuleList(ResBlock(c_in, layout["out_channels"], emb) for c_in in layout["fea_tran"])

    def forward(self, latent: torch.Tensor, timesteps: torch.Tensor) -> dict[int, torch.Tensor]:
        t_emb = get_timestep_embedding(timesteps, self.model_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        emb = self.time_embed(t_emb.to(latent.dtype))
        taps, h = [], latent
        for block in self.input_blocks:
            before, h = h, block(h, emb)
            if h.shape[-1] != before.shape[-1]:
                taps.append(before)
        taps.append(self.middle_block(h, emb))
        if len(taps) != len(self.fea_tran):
            raise ValueError(f"RestorerID structure encoder: {len(taps)} feature maps for {len(self.fea_tran)} "
                             "fea_tran blocks; the checkpoint's encoder layout is not RestorerID's.")
        return {tap.shape[-1]: tran(tap, emb) for tap, tran in zip(taps, self.fea_tran)}


def conv_mlp(in_channels: int, hidden: int, out_channels: int) -> tuple[nn.Sequential, nn.Conv2d, nn.Conv2d]:
    shared = nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU())
    return shared, nn.Conv2d(hidden, out_channels, 3, padding=1), nn.Conv2d(hidden, out_channels, 3, padding=1)


class Spade(nn.Module):
    """``GN(h) * (1 + gamma(s)) + beta(s)`` on the ResBlock's residual branch."""

    def __init__(self, channels: int, feature_channels: int, hidden: int):
        super().__init__()
        self.param_free_norm = GroupNorm32(channels)
        self.mlp_shared, self.mlp_gamma, self.mlp_beta = conv_mlp(feature_channels, hidden, channels)

    def forward(self, h: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """``features``: one map per face; ``h`` may hold several copies of the faces (see :func:`modulate`)."""
        actv = self.mlp_shared(features)
        normed = by_copy(self.param_free_norm(h), features.shape[0])
        return (normed * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)).flatten(0, 1)


class CrossAttention(nn.Module):
    """LDM's CrossAttention (q from the feature map, k/v from the identity tokens)."""

    def __init__(self, query_dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(context_dim, query_dim, bias=False)
        self.to_v = nn.Linear(context_dim, query_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(query_dim, query_dim), nn.Dropout(0.0))

    def attend(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The attention of ``to_q``'s output ``query``, so that copies of the same map share its projection."""
        return self.to_out(identity_attention(query, self.to_k(context), self.to_v(context), self.heads))


class IDBalance(nn.Module):
    """The FIR-Adapter: the feature map attends to the identity tokens, then ``GN(y) gamma' + beta'``."""

    def __init__(self, channels: int, feature_channels: int, hidden: int, context_dim: int):
        super().__init__()
        self.param_free_norm = GroupNorm32(channels)
        self.norm = nn.LayerNorm(feature_channels)
        self.crossattn = CrossAttention(feature_channels, context_dim, IDBALANCE_HEADS)
        self.mlp_shared, self.mlp_gamma, self.mlp_beta = conv_mlp(feature_channels, hidden, channels)

    def forward(self, y: torch.Tensor, features: torch.Tensor, id_tokens: torch.Tensor) -> torch.Tensor:
        """``features``: one map per face; ``y`` and ``id_tokens`` may hold several copies of the faces, each
        with its own tokens (CFG: the faces' identity, then the null identity)."""
        faces, channels, height, width = features.shape
        copies = y.shape[0] // faces
        tokens = features.flatten(2).transpose(1, 2)
        query = self.crossattn.to_q(self.norm(tokens)).repeat(copies, 1, 1)
        tokens = tokens.repeat(copies, 1, 1) + self.crossattn.attend(query, id_tokens.to(tokens.dtype))
        actv = self.mlp_shared(tokens.transpose(1, 2).reshape(-1, channels, height, width))
        return self.param_free_norm(y) * self.mlp_gamma(actv) + self.mlp_beta(actv)


class BlockModulation(nn.Module):
    """The two modules RestorerID adds to one UNet ResBlock."""

    def __init__(self, channels: int, feature_channels: int, hidden: int, context_dim: int):
        super().__init__()
        self.spade = Spade(channels, feature_channels, hidden)
        self.IDBalance = IDBalance(channels, feature_channels, hidden, context_dim)


def by_copy(x: torch.Tensor, faces: int) -> torch.Tensor:
    """(copies * faces, ...) -> (copies, faces, ...): the copies of a batch of faces laid end to end (CFG)."""
    if x.shape[0] % faces:
        raise ValueError(f"RestorerID LQ branch: {x.shape[0]} samples are not whole copies of {faces} LQ faces.")
    return x.view(-1, faces, *x.shape[1:])


def modulate(block: BlockModulation, residual: torch.Tensor, skip: torch.Tensor, features: dict[int, torch.Tensor],
             id_tokens: torch.Tensor | None, strength: float | torch.Tensor = 1.0) -> torch.Tensor:
    """A ResBlock's output from its residual branch ``h`` and skip ``x``: ``y = x + spade(h)``, then
    ``y + IDBalance(y)`` (skipped when ``id_tokens`` is None). ``features`` hold one map per LQ face; the
    batch of ``h`` may be several copies of those faces end to end (CFG's conditional and unconditional
    halves read the same LQ face), so what depends on the map alone is computed once per face. ``strength``
    (float or per-sample (B,)) blends each term from the plain UNet (0) to the trained modulation (1). The
    modules compute in their own dtype and hand back the UNet's (in training the LQ branch is float32 beside a
    half-precision UNet)."""
    if isinstance(strength, torch.Tensor):
        strength = strength.to(residual.device, residual.dtype).view(-1, 1, 1, 1)
    elif strength == 0:
        return skip + residual
    dtype, own = residual.dtype, block.spade.mlp_gamma.weight.dtype
    feature = features[residual.shape[-1]].to(own)
    spaded = block.spade(residual.to(own), feature).to(dtype)
    out = skip + (spaded if _is_one(strength) else residual + strength * (spaded - residual))
    if id_tokens is None:
        return out
    balance = block.IDBalance(out.to(own), feature, id_tokens).to(dtype)
    return out + (balance if _is_one(strength) else strength * balance)


def _is_one(strength) -> bool:
    return not isinstance(strength, torch.Tensor) and strength == 1


def resblock_path(name: str) -> str:
    """A modulated block's name -> the LDM path of its ResBlock (``input_blocks.1`` -> ``input_blocks.1.0``,
    ``middle_block.2`` -> ``middle_block.2``), as in the checkpoint and ComfyUI's ``diffusion_model``."""
    return name if name.startswith("middle_block.") else f"{name}.0"


def block_key(name: str) -> str:
    """``input_blocks.1`` -> ``input_blocks__1`` (ModuleDict keys cannot hold dots)."""
    return name.replace(".", "__")


class LQBranch(nn.Module):
    """RestorerID's trained LQ branch: the structure encoder plus one modulation per modulated ResBlock,
    keyed by the ResBlock's LDM name (``input_blocks.1`` ... ``middle_block.2`` ... ``output_blocks.11``)."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        self.encoder = StructureEncoder(config["encoder"])
        self.modulations = nn.ModuleDict({
            block_key(name): BlockModulation(channels, config["feature_channels"], config["hidden"],
                                             config["context_dim"])
            for name, channels in config["blocks"].items()})

    def modulation(self, name: str) -> BlockModulation:
        return self.modulations[block_key(name)]

    @staticmethod
    def config_from_state(state: dict[str, torch.Tensor]) -> dict:
        """The architecture, read from the shapes of a state dict in our key layout."""
        blocks = {}
        for key, value in state.items():
            if key.startswith("modulations.") and key.endswith(".spade.mlp_gamma.weight"):
                blocks[key.split(".")[1].replace("__", ".")] = value.shape[0]
        any_block = block_key(next(iter(blocks)))
        spade = f"modulations.{any_block}.spade.mlp_shared.0.weight"
        return {"encoder": encoder_layout(state, "encoder."), "blocks": dict(sorted(blocks.items(), key=_block_order)),
                "feature_channels": state[spade].shape[1], "hidden": state[spade].shape[0],
                "context_dim": state[f"modulations.{any_block}.IDBalance.crossattn.to_k.weight"].shape[1]}

    def features(self, lq_latent: torch.Tensor, timesteps: torch.Tensor) -> dict[int, torch.Tensor]:
        """The encoder's maps for this step (re-run every step: they depend on the timestep)."""
        timesteps = torch.as_tensor(timesteps, device=lq_latent.device)
        if timesteps.ndim == 0:
            timesteps = timesteps[None]
        return self.encoder(lq_latent, timesteps.expand(lq_latent.shape[0]))


def _block_order(item) -> tuple[int, int]:
    part, index = item[0].split(".")
    return ("input_blocks", "middle_block", "output_blocks").index(part), int(index)


def encoder_layout(state: dict[str, torch.Tensor], prefix: str) -> dict:
    """The structure encoder's block list, read from key names and shapes (LDM ``EncoderUNetModelWT``)."""
    def shape(key):
        return state[prefix + key].shape

    blocks, index = [], 0
    while f"{prefix}input_blocks.{index}.0.weight" in state or f"{prefix}input_blocks.{index}.0.op.weight" in state \
            or f"{prefix}input_blocks.{index}.0.in_layers.2.weight" in state:
        if f"{prefix}input_blocks.{index}.0.weight" in state:
            out_ch, in_ch = shape(f"input_blocks.{index}.0.weight")[:2]
            blocks.append(("conv", in_ch, out_ch))
        elif f"{prefix}input_blocks.{index}.0.op.weight" in state:
            channels = shape(f"input_blocks.{index}.0.op.weight")[0]
            blocks.append(("down", channels, channels))
        else:
            out_ch, in_ch = shape(f"input_blocks.{index}.0.in_layers.2.weight")[:2]
            kind = "res+attn" if f"{prefix}input_blocks.{index}.1.qkv.weight" in state else "res"
            blocks.append((kind, in_ch, out_ch))
        index += 1
    fea_tran, index = [], 0
    while f"{prefix}fea_tran.{index}.in_layers.2.weight" in state:
        fea_tran.append(shape(f"fea_tran.{index}.in_layers.2.weight")[1])
        index += 1
    return {"model_channels": shape("time_embed.0.weight")[1], "emb_channels": shape("time_embed.0.weight")[0],
            "input_blocks": blocks, "middle_channels": shape("middle_block.0.in_layers.2.weight")[0],
            "fea_tran": fea_tran, "out_channels": shape("fea_tran.0.in_layers.2.weight")[0]}


def branch_state_from_checkpoint(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """RestorerID checkpoint keys (LDM layout) -> :class:`LQBranch` keys; everything else is dropped."""
    out = {}
    for key, value in state.items():
        if key.startswith(ENCODER_PREFIX):
            out["encoder." + key[len(ENCODER_PREFIX):]] = value
            continue
        match = MODULATION_KEY.match(key)
        if match:
            out[f"modulations.{block_key(match[1] or match[2])}.{match[3]}.{match[4]}"] = value
    return out
