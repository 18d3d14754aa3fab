"""Reading RestorerID checkpoints: which tensors are the LQ branch, and a one-time conversion to our format.

The published ``RestorerIDFull.ckpt`` is a PyTorch Lightning checkpoint of the whole model (SD1.5, VAE,
text encoder, FaceID LoRA and K/V copies, the structure encoder, spade and IDBalance, maybe the CLIP/
projection adapter). It is read with ``torch.load(weights_only=True)`` (memory-mapped, so only the LQ
branch is copied into memory); the LQ branch is then written once, as a ``.safetensors`` with metadata,
into the cache, and later loads read that file.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from ...weights.checkpoints import (CheckpointError, cache_folder, cache_key, load_strict, on_meta, read_safetensors_metadata,
                          read_state_dict, save_safetensors_atomic)
from .lq_branch import ENCODER_PREFIX, MODULATION_KEY, LQBranch, branch_state_from_checkpoint

RESTORERID_FORMAT = "restorerid-lq-branch"
RESTORERID_FORMAT_VERSION = 1
WHAT = "RestorerID weights"
KEY_GROUPS = (  # (group, pattern) in match order; the first three are the LQ branch
    ("encoder", re.compile(r"^structcond_stage_model\.")),
    ("spade", re.compile(r"^model\.diffusion_model\..*\.spade\.")),
    ("IDBalance", re.compile(r"^model\.diffusion_model\..*\.IDBalance\.")),
    ("faceid_lora", re.compile(r"^model\.diffusion_model\..*_lora\.(down|up)\.weight$")),
    ("faceid_kv", re.compile(r"^model\.diffusion_model\..*\.to_[kv]_ip\.weight$")),
    ("unet", re.compile(r"^model\.diffusion_model\.")),
    ("vae", re.compile(r"^first_stage_model\.")),
    ("text_encoder", re.compile(r"^cond_stage_model\.")),
    ("adapter", re.compile(r"^Adapter\.")),
)
LQ_BRANCH_GROUPS = ("encoder", "spade", "IDBalance")
SD_EXTRA_GROUPS = ("encoder", "spade", "IDBalance", "faceid_lora", "faceid_kv", "adapter")  # not part of SD1.5
logger = logging.getLogger(__name__)


def key_group(key: str) -> str:
    """Which part of a RestorerID checkpoint a key belongs to ("other" for e.g. the DDPM schedule buffers)."""
    return next((group for group, pattern in KEY_GROUPS if pattern.match(key)), "other")


def is_restorerid_state(keys) -> bool:
    keys = list(keys)
    return any(k.startswith(ENCODER_PREFIX) for k in keys) and any(MODULATION_KEY.match(k) for k in keys)


def missing_branch_parts(keys) -> str | None:
    """What of RestorerID's low-quality branch a checkpoint lacks when it holds the other half of it, and the fix."""
    keys = list(keys)
    encoder = any(k.startswith(ENCODER_PREFIX) for k in keys)
    modulations = sum(1 for k in keys if MODULATION_KEY.match(k))
    if modulations and not encoder:
        lacks = (f"holds RestorerID's spade/IDBalance modules ({modulations} tensors) but lacks the structure encoder "
                 f"of its low-quality branch (no {ENCODER_PREFIX}* keys)")
    elif encoder and not modulations:
        lacks = (f"holds RestorerID's structure encoder ({ENCODER_PREFIX}*) but lacks the spade/IDBalance modules of "
                 "its low-quality branch (no model.diffusion_model.*.spade.* or *.IDBalance.* keys)")
    else:
        return None
    return (f"{lacks}; it is not a complete RestorerIDFull.ckpt (pruned or damaged): download it again "
            "(YingJiacheng/RestorerID on Hugging Face).")


def without_restorerid_extras(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A RestorerID checkpoint reduced to plain SD1.5 (UNet, VAE, text encoder), so it can serve as the base."""
    return {k: v for k, v in state.items() if key_group(k) not in SD_EXTRA_GROUPS}


def check_complete(branch_state: dict[str, torch.Tensor], path: Path) -> None:
    """Every modulated block has both modules (the encoder and modulations are there: the checkpoint was
    recognised by them), else a clear error naming the file."""
    blocks = {}
    for key in branch_state:
        if key.startswith("modulations."):
            blocks.setdefault(key.split(".")[1], set()).add(key.split(".")[2])
    partial = sorted(name.replace("__", ".") for name, parts in blocks.items() if parts != {"spade", "IDBalance"})
    if partial:
        raise CheckpointError(f"{WHAT}: {path}: UNet block(s) {', '.join(partial)} have spade or IDBalance but not "
                         "both; the file is damaged or not RestorerID's: download it again.")


def build_branch(branch_state: dict[str, torch.Tensor], path: Path) -> LQBranch:
    config = LQBranch.config_from_state(branch_state)
    branch = on_meta(lambda: LQBranch(config))
    load_strict(branch, branch_state, path, WHAT)
    return branch.eval()


def converted_path(path: Path, cache_dir) -> Path:
    return cache_folder(cache_dir) / f"restorerid_lq_{cache_key(path)}.safetensors"


def branch_metadata(branch_state: dict[str, torch.Tensor], source: str) -> dict[str, str]:
    """Our format's metadata; ``source``: the name of the publisher's checkpoint the weights come from."""
    return {"format": RESTORERID_FORMAT, "format_version": str(RESTORERID_FORMAT_VERSION), "source": source,
            "config": json.dumps(LQBranch.config_from_state(branch_state))}


def source_name(path: Path) -> str:
    """The publisher's checkpoint a RestorerID file comes from: itself, or what our file records."""
    if path.suffix == ".safetensors" and read_safetensors_metadata(path, WHAT).get("format") == RESTORERID_FORMAT:
        return read_safetensors_metadata(path, WHAT).get("source", path.name)
    return path.name


def save_lq_branch(branch: LQBranch, path: Path, source: str, extra: dict[str, str]) -> None:
    """Trained LQ-branch weights in our format, loaded like the converted public ones."""
    state = {k: v.detach().contiguous() for k, v in branch.state_dict().items()}
    save_safetensors_atomic(state, path, {**extra, **branch_metadata(state, source)})


def convert_checkpoint(state: dict[str, torch.Tensor], path: Path, target: Path) -> dict:
    """The LQ-branch tensors of a full RestorerID checkpoint, also written to ``target`` (our format)."""
    branch_state = {k: v.contiguous() for k, v in branch_state_from_checkpoint(state).items()}
    check_complete(branch_state, path)
    metadata = branch_metadata(branch_state, path.name)
    groups = partition(state)
    logger.info("RestorerID: kept the LQ branch of %s (%s tensors); left the rest (%s) to the SD1.5, FaceID and "
                "CLIP files.", path.name, ", ".join(f"{group} {len(groups.get(group, []))}" for group in LQ_BRANCH_GROUPS),
                ", ".join(f"{group} {len(keys)}" for group, keys in groups.items() if group not in LQ_BRANCH_GROUPS))
    try:
        save_safetensors_atomic(branch_state, target, metadata)
        logger.info("RestorerID: converted the LQ branch of %s once to %s; later loads read that file.", path, target)
    except OSError as err:
        logger.warning("RestorerID: could not cache the converted LQ branch at %s (%s); it is converted again "
                       "at the next load.", target, err)
    return branch_state


def partition(keys) -> dict[str, list[str]]:
    """The checkpoint's keys by part (see :data:`KEY_GROUPS`)."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(key_group(key), []).append(key)
    return groups


def load_lq_branch(path: Path, cache_dir=None, state: dict[str, torch.Tensor] | None = None) -> LQBranch:
    """RestorerID's LQ branch from our converted file, from the cache, or (converting it) from the full
    checkpoint, whose tensors the caller may already have read (``state``)."""
    if path.suffix == ".safetensors" and read_safetensors_metadata(path, WHAT).get("format") == RESTORERID_FORMAT:
        version = read_safetensors_metadata(path, WHAT).get("format_version", "")
        if not version.isdigit() or int(version) > RESTORERID_FORMAT_VERSION:
            raise CheckpointError(f"{WHAT}: {path} has format version {version!r}, this RIDFR reads up to "
                             f"{RESTORERID_FORMAT_VERSION}: update the RIDFR node pack.")
        return build_branch(read_state_dict(path, WHAT), path)
    cached = converted_path(path, cache_dir)
    if cached.is_file():
        try:
            return build_branch(read_state_dict(cached, WHAT), cached)
        except CheckpointError as err:  # a damaged cache entry is converted again below
            logger.warning("RestorerID: ignoring the damaged cache file %s (%s).", cached, err)
    state = state if state is not None else read_state_dict(path, WHAT)
    return build_branch(convert_checkpoint(state, path, cached), path)
