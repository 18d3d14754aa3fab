"""Writers for the published key layouts the loaders read, built from the reference module structures.

The tests make models in these layouts (tiny, or full-size on the meta device for key-set checks)
without downloading anything: the original LDM Stable Diffusion layout (from the diffusers->LDM
correspondence of the original conversion script), and IP-Adapter FaceID Plus as its reference code
(``ip_adapter/resampler.py``, ``attention_processor.py``) lays out ``image_proj`` and ``ip_adapter``.
"""

from __future__ import annotations

import torch
from torch import nn

UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
}
UNET_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
               ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]


def unet_prefix_map(config: dict) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) for a UNet2DConditionModel config (any depth, SD1.5-style blocks)."""
    layers = config["layers_per_block"]
    n_blocks = len(config["block_out_channels"])
    pairs = []
    for i, block in enumerate(config["down_block_types"]):
        for j in range(layers):
            ldm = 1 + i * (layers + 1) + j
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{ldm}.0."))
            if "CrossAttn" in block:
                pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{ldm}.1."))
        if i < n_blocks - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (layers + 1)}.0.op."))
    for i, block in enumerate(config["up_block_types"]):
        for j in range(layers + 1):
            ldm = i * (layers + 1) + j
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{ldm}.0."))
            if "CrossAttn" in block:
                pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{ldm}.1."))
        if i < n_blocks - 1:
            slot = 2 if "CrossAttn" in block else 1
            pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{i * (layers + 1) + layers}.{slot}."))
    pairs += [("mid_block.attentions.0.", "middle_block.1."), ("mid_block.resnets.0.", "middle_block.0."),
              ("mid_block.resnets.1.", "middle_block.2.")]
    return pairs


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    prefixes = unet_prefix_map(config)
    out = {}
    for key, value in state.items():
        new = key
        for hf, ldm in UNET_TOP.items():
            if new.startswith(hf):
                new = ldm + new[len(hf):]
        for hf, ldm in prefixes:
            if new.startswith(hf):
                rest = new[len(hf):]
                if "resnets" in hf:
                    for hf_part, ldm_part in UNET_RESNET:
                        rest = rest.replace(hf_part, ldm_part)
                new = ldm + rest
                break
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    n_blocks = len(config["block_out_channels"])
    pairs = [("conv_shortcut", "nin_shortcut"), ("conv_norm_out", "norm_out"), ("mid_block.attentions.0.", "mid.attn_1.")]
    for i in range(n_blocks):
        for j in range(config["layers_per_block"]):
            pairs.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}."))
        for j in range(config["layers_per_block"] + 1):
            pairs.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n_blocks - 1 - i}.block.{j}."))
        if i < n_blocks - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.", f"down.{i}.downsample."))
            pairs.append((f"up_blocks.{i}.upsamplers.0.", f"up.{n_blocks - 1 - i}.upsample."))
    pairs += [(f"mid_block.resnets.{i}.", f"mid.block_{i + 1}.") for i in range(2)]
    attn = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]
    out = {}
    for key, value in state.items():
        new = key
        for hf, ldm in pairs:
            new = new.replace(hf, ldm)
        if "attentions" in key:
            for hf, ldm in attn:
                new = new.replace(hf, ldm)
            if value.ndim == 2:  # LDM keeps the VAE attention projections as 1x1 convs
                value = value.reshape(*value.shape, 1, 1)
        out["first_stage_model." + new] = value
    return out


def text_encoder_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The published names, ``cond_stage_model.transformer.text_model.*``, whichever names the installed
    transformers gives its CLIPTextModel (5.x dropped the ``text_model.`` level)."""
    return {"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v for k, v in state.items()}


# --- IP-Adapter FaceID Plus, as the reference code builds it ------------------------------------


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int = 64):
        super().__init__()
        inner = heads * dim_head
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class FacePerceiverResampler(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, embedding_dim: int, output_dim: int):
        super().__init__()
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList([nn.ModuleList([PerceiverAttention(dim, heads), feed_forward(dim)])
                                     for _ in range(depth)])


class MLPProjModel(nn.Module):
    """``image_proj`` of ip-adapter-faceid-plus*: ID MLP + norm + perceiver over CLIP features."""

    def __init__(self, cross_attention_dim: int, id_embeddings_dim: int, clip_embeddings_dim: int, num_tokens=4):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(id_embeddings_dim, id_embeddings_dim * 2), nn.GELU(),
                                  nn.Linear(id_embeddings_dim * 2, cross_attention_dim * num_tokens))
        self.norm = nn.LayerNorm(cross_attention_dim)
        self.perceiver_resampler = FacePerceiverResampler(cross_attention_dim, 4, cross_attention_dim // 64,
                                                          clip_embeddings_dim, cross_attention_dim)


class LoRALinear(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, rank: int):
        super().__init__()
        self.down = nn.Linear(dim_in, rank, bias=False)
        self.up = nn.Linear(rank, dim_out, bias=False)


class LoRAProcessor(nn.Module):
    """The reference LoRA(IP)AttnProcessor parameters: LoRA on q/k/v/out, and K'/V' on cross-attention."""

    def __init__(self, hidden: int, cross: int | None, rank: int, ip_dim: int | None):
        super().__init__()
        context = cross or hidden
        self.to_q_lora = LoRALinear(hidden, hidden, rank)
        self.to_k_lora = LoRALinear(context, hidden, rank)
        self.to_v_lora = LoRALinear(context, hidden, rank)
        self.to_out_lora = LoRALinear(hidden, hidden, rank)
        if ip_dim is not None:
            self.to_k_ip = nn.Linear(ip_dim, hidden, bias=False)
            self.to_v_ip = nn.Linear(ip_dim, hidden, bias=False)


def faceid_plus_state(unet_config: dict, clip_dim: int, rank: int, seed: int = 0, lora: bool = True,
                      device: str = "cpu") -> dict[str, dict[str, torch.Tensor]]:
    """``{"image_proj": ..., "ip_adapter": ...}`` for a UNet config, random weights in the published layout."""
    torch.manual_seed(seed)
    cross = unet_config["cross_attention_dim"]
    channels = unet_config["block_out_channels"]
    with torch.device(device):
        image_proj = MLPProjModel(cross, 512, clip_dim)
        processors = []
        blocks = [(t, channels[i]) for i, t in enumerate(unet_config["down_block_types"])]
        ups = [(t, list(reversed(channels))[i]) for i, t in enumerate(unet_config["up_block_types"])]
        per_down = unet_config["layers_per_block"]
        for kind, hidden in blocks:
            if "CrossAttn" in kind:
                processors += [(hidden, False), (hidden, True)] * per_down
        for kind, hidden in ups:
            if "CrossAttn" in kind:
                processors += [(hidden, False), (hidden, True)] * (per_down + 1)
        processors += [(channels[-1], False), (channels[-1], True)]
        adapter = nn.ModuleList([LoRAProcessor(h, cross if is_cross else None, rank, cross if is_cross else None)
                                 for h, is_cross in processors])
    ip_state = adapter.state_dict()
    if not lora:
        ip_state = {k: v for k, v in ip_state.items() if "_lora." not in k}
    if device != "meta":
        for value in list(image_proj.state_dict().values()) + list(ip_state.values()):
            if value.ndim > 1:
                value.normal_(0, 0.02)
    return {"image_proj": image_proj.state_dict(), "ip_adapter": ip_state}
