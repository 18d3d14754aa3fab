"""RIDFR's content weights: one ``.safetensors`` written by the trainer, whose metadata holds format, version
and the ControlNet's architecture."""

from __future__ import annotations

import json
from pathlib import Path

from ...weights.checkpoints import (CheckpointError, load_strict, on_meta, read_safetensors_metadata, read_state_dict,
                                    save_safetensors_atomic)
from .controlnet import ContentControlNet

CONTENT_FORMAT = "ridfr-content"
CONTENT_FORMAT_VERSION = 1


def content_config(controlnet: ContentControlNet) -> dict:
    return {k: v for k, v in controlnet.config.items() if not k.startswith("_")}


def save_content(controlnet: ContentControlNet, path: Path | str, extra: dict[str, str] | None = None) -> None:
    metadata = {"format": CONTENT_FORMAT, "format_version": str(CONTENT_FORMAT_VERSION),
                "config": json.dumps(content_config(controlnet)), **(extra or {})}
    save_safetensors_atomic(controlnet.state_dict(), path, metadata)


def load_ridfr_content(path: Path) -> ContentControlNet:
    what = "RIDFR content weights"
    metadata = read_safetensors_metadata(path, what)
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
