"""The training run folder (``--out``): writable, holding one run only, and which checkpoint is intact.

A new run never mixes with an old one in the same folder (refused unless ``--overwrite``), a damaged
newest checkpoint gives way to the previous intact one, and the temporary files of a killed run
(hidden, as large as the weights) are removed when the folder is used again.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from .io.atomic import TEMP_FILE, probe_writable
from .weights.checkpoints import CheckpointError, read_safetensors_metadata

PARTIAL_CHECKPOINT = re.compile(r"^\.step-\d{8}\.partial$")
CHECKPOINT_FILES = ("state.json", "config.json", "optimizer.json", "lr_scheduler.json", "content.safetensors",
                    "optimizer.safetensors")


class RunFolderError(ValueError):
    """``--out`` cannot be used as asked; the message says what to do instead."""


def require_writable(out: Path) -> None:
    try:
        probe_writable(out)
    except OSError as error:
        raise RunFolderError(f"out: cannot write to {out} ({error.strerror or error}); pass a writable --out "
                             "folder.") from None


def previous_run(out: Path, stage: str, weights: str) -> list[Path]:
    """What an earlier run of ``stage`` left in ``out``: checkpoints, samples, logs, exported weights (named
    ``weights``). The identity cache and the data report are not a run's: they are reused."""
    found = [out / weights] if (out / weights).exists() else []
    for folder in (out / "checkpoints", out / "samples", out / "logs" / stage):
        if folder.is_dir():
            found += sorted(p for p in folder.iterdir() if not PARTIAL_CHECKPOINT.match(p.name))
    return found


def check_new_run(out: Path, stage: str, weights: str, resume: str, overwrite: bool, init_content: str | None) -> None:
    """Refuse to start a new run (``--resume none``) over an earlier one unless ``overwrite``."""
    if overwrite and resume != "none":
        raise RunFolderError(f"--overwrite starts a new run in {out}: pass it with --resume none.")
    if resume != "none":
        return
    found = previous_run(out, stage, weights)
    if not found:
        return
    if not overwrite:
        examples = ", ".join(str(p.relative_to(out)) for p in found[:3]) + (" ..." if len(found) > 3 else "")
        raise RunFolderError(f"--resume none: {out} already holds a '{stage}' run ({examples}). Continue it with "
                             "--resume auto, start again with --overwrite (deletes that run), or pass another --out.")
    if init_content and any(Path(init_content).resolve() == p.resolve() for p in found):
        raise RunFolderError(f"--overwrite would delete --init-content {init_content}; copy it out of {out} first.")


def clear_previous_run(out: Path, stage: str, weights: str) -> None:
    for path in previous_run(out, stage, weights):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def remove_leftovers(out: Path) -> None:
    """Temporary files and half-written checkpoints of a run that was killed while writing them."""
    for folder in (out, out / "checkpoints"):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if PARTIAL_CHECKPOINT.match(path.name):
                shutil.rmtree(path, ignore_errors=True)
            elif TEMP_FILE.match(path.name) and path.is_file():
                path.unlink(missing_ok=True)


def checkpoint_problem(folder: Path) -> str | None:
    """Why a finished checkpoint folder cannot be resumed from (a file missing, truncated or not
    valid JSON), or None. Reads the headers only, not the weights."""
    for name in CHECKPOINT_FILES:
        if not (folder / name).is_file():
            return f"{name} is missing"
    for path in sorted(folder.iterdir()):
        if path.suffix == ".json":
            try:
                value = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
                return f"{path.name} is not valid JSON ({error})"
            if path.name == "state.json" and not (isinstance(value, dict) and isinstance(value.get("step"), int)):
                return "state.json holds no step number"
        elif path.suffix == ".safetensors":
            try:
                read_safetensors_metadata(path, path.name)
            except CheckpointError as error:
                return f"{path.name} is truncated or unreadable ({error.__cause__})"
    return None
