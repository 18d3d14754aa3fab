"""One run at a time per output folder (archive restorations, training runs): a second run on the same
``--out`` would redo the work and interleave its files with the first's.

The lock is filelock's (an OS lock, released by the system even when the run is killed); beside it a small
record says which process holds it, so the run that is refused can name it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from .atomic import write_json_atomic

LOCK_NAME = ".ridfr-run.lock"            # kept after the run: removing it would race the next run
HOLDER_NAME = ".ridfr-run.holder.json"   # who holds the lock; removed before the lock is released


class FolderInUse(ValueError):
    """Another run holds the folder; the message names it."""


class FolderLock:
    """Holds ``folder``'s lock from creation to :meth:`release` (or the end of a ``with`` block); raises
    :class:`FolderInUse` naming the holder when another run has it. ``option`` names the folder's option."""

    def __init__(self, folder: Path, option: str = "--out"):
        from filelock import FileLock, Timeout

        self.folder = Path(folder)
        self.lock = FileLock(self.folder / LOCK_NAME, timeout=0)
        try:
            self.lock.acquire()
        except Timeout:
            raise FolderInUse(f"{option} {self.folder}: another run is writing into this folder ({holder(self.folder)}); "
                              f"let it finish, or give another {option}.") from None
        write_json_atomic(self.folder / HOLDER_NAME, {"pid": os.getpid(), "host": socket.gethostname(),
                                                      "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                      "command": " ".join(sys.argv)})

    def release(self) -> None:
        (self.folder / HOLDER_NAME).unlink(missing_ok=True)
        self.lock.release()

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def holder(folder: Path) -> str:
    """The process that holds ``folder``'s lock, as its record says, or where the lock is."""
    try:
        record = json.loads((folder / HOLDER_NAME).read_text())
        return f"process {record['pid']} on {record['host']} since {record['since']}: {record['command']}"
    except (OSError, ValueError, KeyError, TypeError):  # written a moment after the lock is taken
        return f"it holds {folder / LOCK_NAME}"
