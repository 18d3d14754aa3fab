"""What to download, in which order, and what not to download: one logic for ``python -m ridfr_core.models
download`` and ComfyUI's "Download missing RIDFR models" dialog.

A file that another file of the same download holds (:data:`~.registry.HELD_BY`: RestorerIDFull.ckpt holds
SD1.5, FaceID Plus v1 and CLIP ViT-H, usually) is fetched only after that holder, and only when the holder's
keys lack its part. Where the files are is the caller's to say (``locate``): a ``--models`` folder for the
CLI, ComfyUI's model folders for the dialog.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .fetch import DownloadError, fetch, human
from .registry import HELD_BY, ModelFile

Locate = Callable[[ModelFile], "Path | None"]  # the file where the caller keeps it, None when it is not there


@dataclass(frozen=True)
class Outcome:
    """What became of one file of a download: ``text`` says it; ``failed`` when it could not be fetched."""

    file: ModelFile
    text: str
    failed: bool = False


def size_text(file: ModelFile) -> str:
    if file.size is not None:
        return human(file.size)
    return f"~{human(file.approx_size)}" if file.approx_size else "size from the hub"


def holders(files: Iterable[ModelFile]) -> set[str]:
    return {holder.relative for holder, _, _ in HELD_BY.values()} & {file.relative for file in files}


def in_download_order(files: Iterable[ModelFile]) -> list[ModelFile]:
    """``files`` once each, the ones that hold others' parts first (their keys decide what else is needed)."""
    files = list({file.relative: file for file in files}.values())
    first = holders(files)
    return [file for file in files if file.relative in first] + [file for file in files if file.relative not in first]


def holder_of(file: ModelFile, files: Iterable[ModelFile]) -> tuple[ModelFile, str, str] | None:
    """(holder, part, why) when one of ``files`` may hold ``file``'s part, else None."""
    held = HELD_BY.get(file.relative)
    return held if held is not None and held[0].relative in holders(files) else None


def parts_held(path: Path) -> set[str] | None:
    """The parts ("base", "adapter", "clip_vision") a content file holds by its keys; None when unreadable (its
    loader will say why; the separate files are fetched meanwhile)."""
    from ..backends import file_backend

    try:
        backend = file_backend(path)
        return backend.bundled_parts(path) if backend is not None else set()
    except (ValueError, OSError):  # CheckpointError is a ValueError
        return None


def not_needed(file: ModelFile, files: Iterable[ModelFile], locate: Locate) -> str | None:
    """Why ``file`` need not be fetched (a holder among ``files`` is there and holds its part), else None."""
    held = holder_of(file, files)
    path = locate(held[0]) if held else None
    if path is None:
        return None
    holder, part, why = held
    return f"not needed: {holder.name} holds {why}" if part in (parts_held(path) or set()) else None


def fetch_in_order(files: Iterable[ModelFile], models: Path, locate: Locate, tqdm_class=None,
                   started: Callable[[ModelFile], None] | None = None) -> Iterator[Outcome]:
    """Fetch ``files`` into ``models`` in download order, skipping what a holder fetched before them holds; one
    :class:`Outcome` per file, a failure included (the others are still fetched). ``started(file)``: called
    before each fetch (ComfyUI's progress)."""
    files = in_download_order(files)
    for file in files:
        if not file.downloadable:
            there = locate(file) is not None
            yield Outcome(file, f"{'present' if there else 'still missing'} ({file.how_to_get})")
            continue
        skip = not_needed(file, files, locate)  # decided once the holder (fetched first) is here
        if skip:
            yield Outcome(file, skip)
            continue
        if started is not None:
            started(file)
        try:
            yield Outcome(file, fetch(file, models, tqdm_class))
        except DownloadError as error:
            yield Outcome(file, f"error: {error}", failed=True)
