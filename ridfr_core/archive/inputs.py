"""What ``--lq`` names in an archive run -> the input files, each with the path its output gets.

``--lq`` is a folder (searched recursively), a glob (``"scans/**/*.jpg"``), a text file listing one
path per line (relative to the list's folder; ``#`` starts a comment) or one video. Outputs mirror the
inputs' tree below their common folder, so ``albums/1990/a.jpg`` -> ``OUT/1990/a.jpg``.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

from ..io.images import IMAGE_SUFFIXES

VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".m4v", ".avi", ".webm"}
LIST_SUFFIXES = {".txt", ".lst"}


@dataclass(frozen=True)
class ArchiveInput:
    """One input file and its path below the output folder (posix, also its key in the manifest)."""

    source: Path
    relative: str

    @property
    def kind(self) -> str:
        """'image', 'video', or 'other' (a file neither restored nor failed, e.g. notes.txt in an album)."""
        suffix = self.source.suffix.lower()
        return "image" if suffix in IMAGE_SUFFIXES else "video" if suffix in VIDEO_SUFFIXES else "other"


def is_archive_input(lq: str) -> bool:
    """True unless ``--lq`` is one image file (the single-photo job)."""
    path = Path(lq)
    return path.is_dir() or glob.has_magic(lq) or path.suffix.lower() in LIST_SUFFIXES | VIDEO_SUFFIXES


def collect_inputs(lq: str, exclude: Path | None = None) -> list[ArchiveInput]:
    """The inputs ``--lq`` names, sorted by output path; files inside ``exclude`` (the output folder)
    and hidden files are left out. Raises ValueError naming --lq when it names nothing."""
    path = Path(lq)
    if path.is_dir():
        files, root = [p for p in path.rglob("*") if is_file_entry(p)], path
    elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        files = listed_files(path)
        root = common_folder(files)
    elif path.is_file():
        files, root = [path], path.parent
    elif glob.has_magic(lq):
        root = glob_root(lq)
        files = globbed_files(root, Path(lq).relative_to(root).as_posix() if root != Path(".") else lq)
    else:
        raise ValueError(f"--lq: {lq} is neither a file, a folder nor a glob that matches files; give a photo, "
                         "a folder of photos, a glob like 'scans/**/*.jpg', a text file listing paths, or a video.")
    exclude = real_path(exclude) if exclude is not None else None
    if exclude is not None and real_path(root) == exclude:
        raise ValueError(f"--out {exclude}: is the input folder, so the outputs would overwrite the inputs; choose "
                         "another output folder.")
    chosen = [file for file in files if not is_hidden(file.relative_to(root))
              and (exclude is None or not real_path(file).is_relative_to(exclude))]
    if not chosen:
        raise ValueError(f"--lq: {lq} holds no files to restore.")
    if not any(file.exists() for file in chosen):
        names = ", ".join(file.relative_to(root).as_posix() for file in chosen[:3]) + (" ..." if len(chosen) > 3 else "")
        raise ValueError(f"--lq: {lq}: none of its {len(chosen)} entries can be opened ({names}: missing files, "
                         "broken links or links that loop); fix or remove them, or give another --lq.")
    items = {file.relative_to(root).as_posix(): file for file in chosen}
    return [ArchiveInput(items[relative], relative) for relative in sorted(items)]


def real_path(path: Path) -> Path:
    """``path`` with its links resolved as far as they go: a link that loops (``a.jpg -> a.jpg``) stays as it
    is, where ``Path.resolve`` raises RuntimeError on Python < 3.13."""
    return Path(os.path.realpath(path))


def is_file_entry(path: Path) -> bool:
    """A file, or a broken link (its target missing, or a loop) that names one: it gets its manifest line with
    the error, and the other inputs are restored; not a folder."""
    return path.is_file() or (path.is_symlink() and not path.exists())


def globbed_files(root: Path, pattern: str) -> list[Path]:
    """The files ``pattern`` matches below ``root``, each real file once: pathlib's ``**`` does not descend
    into linked folders (as ``--lq FOLDER`` does not), so a link back to a parent is no endless tree."""
    if pattern == "**" or pattern.endswith("/**"):
        pattern += "/*"  # glob.glob's "dir/**" lists files too; pathlib's only folders
    files, seen = [], set()
    for file in sorted(root.glob(pattern), key=lambda found: (len(found.parts), found)):  # the shortest name kept
        real = os.path.realpath(file)
        if is_file_entry(file) and real not in seen:
            seen.add(real)
            files.append(file)
    return files


def listed_files(list_file: Path) -> list[Path]:
    """The paths in a list file; a missing one stays in (it is reported as that input's error)."""
    try:
        text = list_file.read_text(encoding="utf-8-sig")  # -sig: the BOM Windows editors put first
    except UnicodeDecodeError as error:
        raise ValueError(f"--lq {list_file}: the list file is not UTF-8 text ({error.reason} at byte {error.start}); "
                         "save it as UTF-8 with one path per line.") from None
    except OSError as error:
        raise ValueError(f"--lq {list_file}: cannot read the list file ({error.strerror or error}).") from None
    files = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            entry = Path(line).expanduser()
            files.append(entry if entry.is_absolute() else list_file.parent / entry)
    return [Path(os.path.normpath(file.absolute())) for file in files]


def common_folder(files: list[Path]) -> Path:
    if not files:
        return Path(".")
    return Path(os.path.commonpath([file.absolute().parent for file in files]))


def glob_root(pattern: str) -> Path:
    """The folder before the first wildcard: the tree below it is mirrored."""
    parts = Path(pattern).parts
    fixed = next(index for index, part in enumerate(parts) if glob.has_magic(part))
    return Path(*parts[:fixed]) if fixed else Path(".")


def is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)
