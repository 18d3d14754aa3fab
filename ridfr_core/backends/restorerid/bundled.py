"""The identity parts a RestorerID checkpoint carries itself, read from its keys.

``RestorerIDFull.ckpt`` is the whole LightningModule: besides SD1.5 and the LQ branch it holds h94's FaceID
LoRA and IP K/V copied into the UNet (``Combineckpt.py``: index ``k`` of ``ip-adapter-faceid-plus_sd15.bin``
went to the k-th attention in the order input 1,2,4,5,7,8 / output 3..11 / middle, attn1 then attn2), and
usually the identity ``Adapter`` (CLIP ViT-H vision tower and the FaceID image projection). Each part is
used when its keys are there; what is missing comes from the separate h94 files.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from safetensors import safe_open

from ...weights.adapter_files import identity_adapter_from_state
from ...weights.checkpoints import CheckpointError, load_config, load_strict, on_meta, read_state_dict
from .files import RESTORERID_FORMAT, WHAT

UNET_PREFIX = "model.diffusion_model."
PROJ_PREFIX = "Adapter.image_proj_model."
VISION_PREFIX = "Adapter.image_encoder."
ATTENTION_KEY = re.compile(r"^model\.diffusion_model\.(input_blocks|output_blocks|middle_block)\.(\d+)(?:\.1)?"
                           r"\.transformer_blocks\.0\.(attn[12])\.(to_(?:q|k|v|out)_lora\.(?:down|up)|to_[kv]_ip)"
                           r"\.weight$")
BLOCK_ORDER = ("input_blocks", "output_blocks", "middle_block")  # h94's numbering, as Combineckpt.py copies it


def h94_ip_adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The UNet's FaceID LoRA and IP K/V keys renumbered as h94's ``ip_adapter`` dict (``{k}.to_q_lora...``)."""
    found = {}
    for key, value in state.items():
        match = ATTENTION_KEY.match(key)
        if match:
            kind, number, attn, name = match.groups()
            found.setdefault((BLOCK_ORDER.index(kind), int(number)), {})[(attn, name)] = value
    out = {}
    for position, block in enumerate(sorted(found)):
        for (attn, name), value in found[block].items():
            out[f"{2 * position + (attn == 'attn2')}.{name}.weight"] = value
    return out


PROJ_KEYS = ("proj.0.weight", "proj.2.weight", "norm.weight", "perceiver_resampler.proj_in.weight",
             "perceiver_resampler.proj_out.weight", "perceiver_resampler.norm_out.weight")  # FaceID Plus' projection
VISION_KEYS = ("vision_model.embeddings.class_embedding", "vision_model.embeddings.patch_embedding.weight",
               "vision_model.post_layernorm.weight", "visual_projection.weight")


def has_identity_adapter(keys) -> bool:
    """The checkpoint holds FaceID Plus' image projection and the IP K/V it feeds (checked by keys; a
    checkpoint pruned to a piece of the Adapter does not count)."""
    keys = set(keys)
    return all(PROJ_PREFIX + k in keys for k in PROJ_KEYS) and any(k.endswith(".to_k_ip.weight") for k in keys)


def has_clip_vision(keys) -> bool:
    keys = set(keys)
    return all(VISION_PREFIX + k in keys for k in VISION_KEYS)


def identity_adapter_from_checkpoint(state: dict[str, torch.Tensor], unet, path: Path):
    """(IdentityAdapter, FaceID LoRA deltas) from the checkpoint's own copies (FaceID Plus v1: no shortcut)."""
    image_proj = {k[len(PROJ_PREFIX):]: v for k, v in state.items() if k.startswith(PROJ_PREFIX)}
    attn = h94_ip_adapter_state(state)
    if not image_proj or not any(k.endswith("to_k_ip.weight") for k in attn):
        raise CheckpointError(f"{WHAT}: {path} holds no FaceID image projection or IP K/V; pass "
                              "ip-adapter-faceid-plus_sd15.bin (h94/IP-Adapter-FaceID) as the adapter.")
    return identity_adapter_from_state(image_proj, attn, unet, path, shortcut=False)


def clip_vision_from_checkpoint(state: dict[str, torch.Tensor], path: Path, config_dir=None):
    """CLIP ViT-H/14 (``CLIPVisionModelWithProjection``) from the checkpoint's ``Adapter.image_encoder.*``."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    vision = {k[len(VISION_PREFIX):]: v for k, v in state.items() if k.startswith(VISION_PREFIX)}
    if not vision:
        raise CheckpointError(f"{WHAT}: {path} holds no CLIP vision tower ({VISION_PREFIX}*); pass "
                              "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors as the CLIP vision file.")
    model = on_meta(lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**load_config("clip_vision", config_dir))))
    load_strict(model, vision, path, "RestorerID weights (CLIP vision)",
                ignore=("vision_model.embeddings.position_ids",))
    return model.eval()


def own_identity_parts(path: Path) -> set[str]:
    """Which of "adapter" and "clip_vision" a RestorerID weights file holds itself, from its key names only."""
    path = Path(path)
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as handle:
            if (handle.metadata() or {}).get("format") == RESTORERID_FORMAT:
                return set()  # our conversion keeps the LQ branch only
            keys = list(handle.keys())
    else:
        keys = list(read_state_dict(path, WHAT))  # memory-mapped: names, no tensor data
    return {part for part, found in (("adapter", has_identity_adapter(keys)), ("clip_vision", has_clip_vision(keys)))
            if found}


def checkpoint_parts(path: Path) -> set[str]:
    """The parts a RestorerID checkpoint holds, by key names: "base" (UNet, VAE, text encoder) and
    :func:`own_identity_parts`'s. Raises CheckpointError for an unreadable file."""
    keys = list(read_state_dict(path, WHAT))
    base = all(any(k.startswith(prefix) for k in keys)
               for prefix in (UNET_PREFIX, "first_stage_model.", "cond_stage_model.transformer."))
    return own_identity_parts(path) | ({"base"} if base else set())
