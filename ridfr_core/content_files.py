"""Content weights of either backend: RIDFR's own (a ``.safetensors`` in our format, written by the trainer)
and RestorerID's (the published checkpoint or its conversion, :mod:`.restorerid_files`), told apart by the
file's contents."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open

from .checkpoints import (CheckpointError, load_strict, on_meta, read_safetensors_metadata, read_state_dict,
                          save_safetensors_atomic)
from .content import ContentControlNet

CONTENT_FORMAT = "ridfr-content"
CONTENT_FORMAT_VERSION = 1


def content_config(controlnet: ContentControlNet) -> dict:
    return {k: v for k, v in controlnet.config.items() if not k.startswith("_")}


def save_content(controlnet: ContentControlNet, path: Path | str, extra: dict[str, str] | None = None) -> None:
    metadata = {"format": CONTENT_FORMAT, "format_version": str(CONTENT_FORMAT_VERSION),
                "config": json.dumps(content_config(controlnet)), **(extra or {})}
    save_safetensors_atomic(controlnet.state_dict(), path, metadata)


def content_backend(path: Path | str, quick: bool = False) -> str | None:
    """"ridfr" or "restorerid" for a content file, None for neither. ``quick`` reads only safetensors
    metadata (our formats) and answers None for anything else."""
    from . import restorerid_files

    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata, keys = handle.metadata() or {}, (None if quick else list(handle.keys()))
        except (SafetensorError, OSError):
            return None
        formats = {CONTENT_FORMAT: "ridfr", restorerid_files.RESTORERID_FORMAT: "restorerid"}
        if metadata.get("format") in formats or quick:
            return formats.get(metadata.get("format"))
    elif quick:
        return None
    else:
        keys = list(read_state_dict(path, "content weights"))
    return "restorerid" if restorerid_files.is_restorerid_state(keys) else None


def load_content(path: Path | str, cache_dir=None):
    """A content module of either backend, told apart by the file's contents: RIDFR content weights (our
    format, :class:`ContentControlNet`) or RestorerID weights (the published checkpoint or its conversion,
    :class:`~ridfr_core.restorerid.LQBranch`)."""
    from . import restorerid_files

    path = Path(path)
    what = "content weights"
    if not path.is_file():
        raise CheckpointError(f"{what}: file not found: {path}. Put RIDFR weights (`python -m ridfr_core.train`) or "
                              "RestorerIDFull.ckpt in models/ridfr.")
    if path.suffix == ".safetensors":
        metadata = read_safetensors_metadata(path, what)
        if metadata.get("format") == CONTENT_FORMAT:
            return load_ridfr_content(path, metadata)
        if metadata.get("format") == restorerid_files.RESTORERID_FORMAT:
            return restorerid_files.load_lq_branch(path, cache_dir)
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
        state = None
    else:
        state = read_state_dict(path, what)
        keys = list(state)
    if restorerid_files.is_restorerid_state(keys):
        return restorerid_files.load_lq_branch(path, cache_dir, state)
    raise CheckpointError(f"{what}: {path} is neither RIDFR content weights (a .safetensors written by "
                          "ridfr_core.train) nor a RestorerID checkpoint (RestorerIDFull.ckpt). Base checkpoints go "
                          "in models/checkpoints, IP-Adapters in models/ipadapter.")


def load_ridfr_content(path: Path, metadata: dict[str, str]) -> ContentControlNet:
    what = "RIDFR content weights"
    version = metadata.get("format_version", "")
    if not version.isdigit() or int(version) > CONTENT_FORMAT_VERSION:
        raise CheckpointError(f"{what}: {path} has format version {version!r}, this RIDFR reads up to "
                              f"{CONTENT_FORMAT_VERSION}: update the RIDFR node pack.")
    try:
        config = json.loads(metadata["config"])
        controlnet = on_meta(lambda: ContentControlNet(**config))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{what}: {path} has no usable architecture in its metadata 'config' ({err}); "
                              "the file was not written by ridfr_core.train or was edited: write it again.") from err
    load_strict(controlnet, read_state_dict(path, what), path, what)
    return controlnet.eval()
