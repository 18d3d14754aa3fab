"""The content backends and the one registry the rest of the core asks.

Each backend is a package (``ridfr/``, ``restorerid/``) holding everything it is: its module, its file
format and conversion, its denoiser, its defaults and pre/post-processing; each exposes one
:class:`~.interface.ContentBackend` instance. A third backend is one more package and one more entry in
:data:`BACKENDS`. The functions below answer "which backend" for a loaded module or a file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..weights.checkpoints import CheckpointError, read_safetensors_metadata, read_state_dict
from .interface import ContentBackend
from .restorerid import RESTORERID
from .ridfr import RIDFR

__all__ = ["BACKENDS", "RESTORERID", "RIDFR", "ContentBackend", "backend_of", "content_backend", "file_backend",
           "load_content", "sd15_part"]

BACKENDS: dict[str, ContentBackend] = {backend.name: backend for backend in (RIDFR, RESTORERID)}
WHAT = "content weights"


def backend_of(content: torch.nn.Module) -> ContentBackend:
    for backend in BACKENDS.values():
        if backend.owns(content):
            return backend
    raise TypeError(f"{type(content).__name__} is not the content module of any backend ({', '.join(BACKENDS)}).")


def backend_of_format(metadata: dict[str, str]) -> ContentBackend | None:
    return next((backend for backend in BACKENDS.values() if metadata.get("format") == backend.file_format), None)


def backend_of_keys(keys: list[str]) -> ContentBackend | None:
    return next((backend for backend in BACKENDS.values() if backend.recognises_keys(keys)), None)


def sd15_part(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint without any backend's extra modules: what a RestorerID file holds of SD1.5 serves as a base."""
    for backend in BACKENDS.values():
        state = backend.sd15_part(state)
    return state


def file_backend(path: Path | str, quick: bool = False) -> ContentBackend | None:
    """The backend of a content file, None for neither. ``quick`` reads only safetensors metadata (our
    formats) and answers None for anything else."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata, keys = handle.metadata() or {}, (None if quick else list(handle.keys()))
        except (SafetensorError, OSError):
            return None
        backend = backend_of_format(metadata)
        return backend if backend is not None or quick else backend_of_keys(keys)
    if quick:
        return None
    return backend_of_keys(list(read_state_dict(path, WHAT)))


def load_content(path: Path | str, cache_dir=None, state: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """The content module of a file of any backend, told apart by the file's contents (``state``: the file's
    tensors, when the caller has read them for other parts too)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{WHAT}: file not found: {path}. Put RIDFR weights (`python -m ridfr_core.train`) or "
                              "RestorerIDFull.ckpt in models/ridfr.")
    if state is not None:
        keys = list(state)
    elif path.suffix == ".safetensors":
        backend = backend_of_format(read_safetensors_metadata(path, WHAT))
        if backend is not None:
            return backend.load(path, cache_dir)
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    else:
        state = read_state_dict(path, WHAT)
        keys = list(state)
    backend = backend_of_keys(keys)
    if backend is None:
        raise unrecognised_file(path, keys)
    return backend.load(path, cache_dir, state)


def content_backend(path: Path | str) -> ContentBackend:
    """The backend of a content file, checked before anything loads: CheckpointError saying what the file
    lacks (or that it is no content file) where it is none's."""
    path = Path(path)
    backend = file_backend(path)
    if backend is not None:
        return backend
    if path.suffix == ".safetensors":
        read_safetensors_metadata(path, WHAT)  # a damaged file: says so
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    else:
        keys = list(read_state_dict(path, WHAT))
    raise unrecognised_file(path, keys)


def unrecognised_file(path: Path, keys: list[str]) -> CheckpointError:
    """The error for a content file no backend recognises: what it lacks where it holds part of a backend's file."""
    for backend in BACKENDS.values():
        lacks = backend.partial_file(keys)
        if lacks:
            return CheckpointError(f"{WHAT}: {path} {lacks}")
    return CheckpointError(f"{WHAT}: {path} is neither RIDFR content weights (a .safetensors written by "
                           "ridfr_core.train) nor a RestorerID checkpoint (RestorerIDFull.ckpt). Base checkpoints go "
                           "in models/checkpoints, IP-Adapters in models/ipadapter.")
