"""Atomic file writes: outputs, checkpoints and records are written beside their target under a hidden
temporary name, flushed to disk and renamed into place, so a crash, a full disk or a power cut leaves the
old file (or none), never a half-written one."""

from __future__ import annotations

import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TEMP_FILE = re.compile(r"^\..+\.tmp-\d+(\.\w+)?$")  # what temp_path names (leftovers of a kill are cleared)


def temp_path(path: Path) -> Path:
    """A hidden name beside ``path`` that ends in the same suffix, so writers that pick the format from the
    name (PyAV's containers) write the same kind of file."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` to write to; when the block ends without error the file is
    fsynced and renamed onto ``path``, and in any case no temporary file is left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        with open(tmp, "rb") as handle:  # on disk before the rename, or a power cut can leave a truncated file
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path | str, value, sort_keys: bool = False) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value, indent=1, sort_keys=sort_keys))


def fsync_folder(folder: Path) -> None:
    """Make the files (and the renames) in ``folder`` durable, where the OS allows it."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def probe_writable(folder: Path) -> None:
    """Create ``folder`` and a temporary file in it; OSError where nothing can be written there."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder):
        pass
