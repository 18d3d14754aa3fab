"""Checking and fetching registered model files: resumable, verified, then moved into place atomically.

huggingface_hub does the talking to the hub (metadata and its LFS sha256, ``HF_ENDPOINT``, tokens, offline
mode, its cache, its HTTP session and progress bar). What no library does is kept here: a partial download
that survives the process and keeps every byte that arrived (``.<name>.<sha256 prefix>.part`` beside the
target, resumed next time; :mod:`.transfer`), the sha256 check before anything gets its real name, unpacking
an archive into a folder, and a record of what was verified (``models/.ridfr-downloads/verified.json``) so
that ``list`` and later runs say "intact" without hashing gigabytes each time. The ``.part`` sits in the
target's own folder, so the final rename never crosses filesystems (a models folder linked to another disk).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from ..io.atomic import probe_writable, write_json_atomic
from .registry import ModelFile
from .transfer import append_missing

STAGING = ".ridfr-downloads"
RECORDS = "verified.json"
SHA256 = re.compile(r"[0-9a-f]{64}")


class DownloadError(Exception):
    """A file that could not be fetched or placed; the message names it and says what to do."""


@dataclass(frozen=True)
class Source:
    """Where the bytes of a file come from and what they must hash to."""

    url: str
    sha256: str
    size: int
    headers: dict
    cached: Path | None = None  # the same file already in the Hugging Face cache


def human(size: float) -> str:
    for unit in ("B", "KB", "MB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# What is there


def _records(models: Path) -> dict:
    path = models / STAGING / RECORDS
    return json.loads(path.read_text()) if path.is_file() else {}


def _remember(models: Path, relative: str, sha256: str) -> None:
    """Record a verified file (its hash, size and mtime), written atomically; locked (as huggingface_hub
    locks its downloads) so that a concurrent download's record is not lost."""
    from huggingface_hub.utils import WeakFileLock

    stat = (models / relative).stat()
    with WeakFileLock(models / STAGING / f"{RECORDS}.lock"):
        records = {**_records(models), relative: {"sha256": sha256, "size": stat.st_size,
                                                  "mtime_ns": stat.st_mtime_ns}}
        write_json_atomic(models / STAGING / RECORDS, records, sort_keys=True)


def file_state(models: Path, relative: str, sha256: str | None = None, size: int | None = None) -> str:
    """``missing``, ``intact`` (matches the pinned hash, or the hash verified on download and unchanged
    since), ``unverified`` (present, nothing to compare with yet) or ``different``."""
    path = models / relative
    if not path.is_file():
        return "missing"
    stat = path.stat()
    if size is not None and stat.st_size != size:
        return "different"
    record = _records(models).get(relative)
    if record and (record["size"], record["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns) and \
            record["sha256"] == (sha256 or record["sha256"]):
        return "intact"
    expected = sha256 or (record or {}).get("sha256")
    if expected is None:
        return "unverified"
    return "intact" if sha256_of(path) == expected else "different"


def state(file: ModelFile, models: Path) -> str:
    """The state of a registered file; an archive folder is ``incomplete`` when a needed member is missing."""
    if not file.members:
        return file_state(models, file.relative, file.sha256, file.size)
    states = {name: file_state(models, f"{file.relative}/{name}", sha, size)
              for name, (size, sha) in file.members.items()}
    if "different" in states.values():
        return "different"
    if set(states.values()) == {"missing"}:
        return "missing"
    return "incomplete" if any(states[name] == "missing" for name in file.needed) else "intact"


# ----------------------------------------------------------------------------------------------
# Where it comes from


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def hub_source(file: ModelFile) -> Source:
    """Metadata from the hub (``HF_ENDPOINT``, token) or, offline, the copy in the Hugging Face cache."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError
    from huggingface_hub.utils import build_hf_headers

    where = f"{file.repo}/{file.path}"
    if _offline():
        cached = try_to_load_from_cache(file.repo, file.path, revision=file.revision)
        blob = Path(cached).resolve() if isinstance(cached, str) else None
        if blob is None or not SHA256.fullmatch(blob.name):
            raise DownloadError(f"{file.relative}: offline mode (HF_HUB_OFFLINE) is on and {where} is not in the "
                                "Hugging Face cache; unset HF_HUB_OFFLINE to download it.")
        return Source(str(blob), blob.name, blob.stat().st_size, {}, cached=blob)
    url = hf_hub_url(file.repo, file.path, revision=file.revision)
    try:
        meta = get_hf_file_metadata(url)
    except GatedRepoError:
        raise DownloadError(f"{file.relative}: {file.repo} is gated: accept its terms on the hub and log in "
                            "(`hf auth login`, or set HF_TOKEN), then run again.") from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "?"
        raise DownloadError(f"{file.relative}: the hub answered {status} for {url} ({_reason(error)}); check "
                            "HF_ENDPOINT and your network, or report a moved file.") from None
    except Exception as error:  # the transport's own errors (connection refused, DNS, timeouts)
        raise DownloadError(f"{file.relative}: cannot reach {url} ({_reason(error)}); check your network or "
                            "HF_ENDPOINT.") from None
    if not meta.etag or not SHA256.fullmatch(meta.etag) or meta.size is None:
        raise DownloadError(f"{file.relative}: the hub gives no sha256 and size for {where}, so it cannot be "
                            "verified; not downloaded.")
    headers = build_hf_headers()
    if urlparse(meta.location).netloc != urlparse(url).netloc:
        headers.pop("authorization", None)  # never send the token to a CDN
    cached = try_to_load_from_cache(file.repo, file.path, revision=meta.commit_hash)
    return Source(meta.location, meta.etag, meta.size, headers, Path(cached) if isinstance(cached, str) else None)


def source_of(file: ModelFile) -> Source:
    if file.repo:
        return hub_source(file)
    if _offline():
        raise DownloadError(f"{file.relative}: offline mode (HF_HUB_OFFLINE) is on; unset it to download {file.url}.")
    return Source(file.url, file.sha256, file.size, {})


# ----------------------------------------------------------------------------------------------
# Getting it


def ensure_writable(folder: Path) -> None:
    try:
        probe_writable(folder)
    except OSError as error:
        raise DownloadError(f"cannot write to {folder} ({error.strerror or error}); give --models a folder you "
                            "can write to, or fix its permissions.") from None


def part_path(target: Path, sha256: str) -> Path:
    """Where the download of ``target`` collects its bytes: beside it (same filesystem, so the final rename is
    atomic and never fails with EXDEV), hidden, under a name that no ComfyUI model list shows."""
    return target.with_name(f".{target.name}.{sha256[:16]}.part")


def adopt_staged_part(staged: Path, part: Path) -> None:
    """Earlier versions collected the bytes in ``models/.ridfr-downloads/<sha256>.part`` (and could never move a
    finished one onto another disk): continue from it instead of downloading those bytes again."""
    if staged.is_file() and not part.exists():
        shutil.move(staged, part)  # a copy where the disks differ


def transfer(source: Source, part: Path, label: str, extra_space: int = 0, tqdm_class=None) -> None:
    """Append the missing bytes to ``part`` (resuming what an earlier run left), with a progress bar
    (``tqdm_class``: huggingface_hub's by default; ComfyUI's download route passes one that reports)."""
    have = part.stat().st_size if part.is_file() else 0
    if have > source.size:
        part.unlink()
        have = 0
    free = shutil.disk_usage(part.parent).free
    if source.size - have + extra_space > free:
        raise DownloadError(f"{label}: needs {human(source.size - have + extra_space)} on {part.parent}, only "
                            f"{human(free)} free; free some space and run again.")
    if source.cached is not None and have == 0:
        shutil.copyfile(source.cached, part)  # already in the Hugging Face cache
        return
    try:
        append_missing(source.url, source.headers, part, source.size, label.rsplit("/", 1)[-1], tqdm_class)
    except Exception as error:  # network, server or disk (ENOSPC): what arrived is kept, resumed next time
        got = part.stat().st_size if part.is_file() else 0
        raise DownloadError(f"{label}: download stopped after {human(got)} of {human(source.size)} "
                            f"({_reason(error)}); run the same command again to resume.") from None


def verify(part: Path, source: Source, label: str) -> None:
    """Size and sha256 before the file gets its real name; a mismatch is deleted, never placed."""
    size = part.stat().st_size
    digest = sha256_of(part) if size == source.size else None
    if digest != source.sha256:
        part.unlink()
        found = f"sha256 {digest}" if digest else f"{size} bytes"
        again = (f"The copy in the Hugging Face cache ({source.cached}) is damaged: delete it and run again"
                 if source.cached else "Run again to download it anew; if this repeats, the source changed or "
                 "something on the way alters it")
        raise DownloadError(f"{label}: the download has {found}, expected sha256 {source.sha256} "
                            f"({source.size} bytes); it was deleted and not put in place. {again}.")


def unpack(archive: Path, file: ModelFile, models: Path) -> None:
    """Extract the registered members into a temporary folder beside the target, check them, rename it."""
    target = models / file.relative
    work = Path(tempfile.mkdtemp(prefix=f".{file.name}.", dir=target.parent))
    try:
        with zipfile.ZipFile(archive) as bundle:
            for info in bundle.infolist():
                name = PurePosixPath(info.filename).name  # flat: the pack's files, wherever the zip keeps them
                if name in file.members and not info.is_dir():
                    with bundle.open(info) as src, open(work / name, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
        for name, (size, sha) in file.members.items():
            member = work / name
            if not member.is_file() or member.stat().st_size != size or sha256_of(member) != sha:
                raise DownloadError(f"{file.relative}: {name} in {archive.name} is missing or not the expected "
                                    "file; nothing was put in place.")
        if target.is_dir():
            target.rmdir()  # only ever empty here: a folder with files is 'incomplete' or 'different'
        os.rename(work, target)
    except (OSError, zipfile.BadZipFile) as error:
        raise DownloadError(f"{file.relative}: cannot unpack {archive} ({_reason(error)}); nothing was put in "
                            "place. Free space or fix permissions and run again.") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for name, (_, sha) in file.members.items():
        _remember(models, f"{file.relative}/{name}", sha)


def fetch(file: ModelFile, models: Path, tqdm_class=None) -> str:
    """Make ``file`` present and intact under its real name; returns what was done. Never overwrites a file
    that is there: one that differs from the published file is reported and left alone. ``tqdm_class``:
    the progress bar of the transfer (see :func:`transfer`)."""
    from huggingface_hub.utils import WeakFileLock

    current, target = state(file, models), models / file.relative
    if current == "intact":
        return "already there, intact"
    refuse_present(target, current)
    source = source_of(file)  # first: offline or unreachable, nothing is created
    staging = models / STAGING
    ensure_writable(staging)
    ensure_writable(target.parent)
    # One download of a file at a time (huggingface_hub locks the same way): a second one waits, then finds the
    # file in place, instead of appending to the same .part or moving it while the first still writes.
    with WeakFileLock(staging / f"{source.sha256}.lock"):
        try:
            return place(file, models, source, state(file, models), tqdm_class)
        except FileNotFoundError as error:
            raise DownloadError(f"{file.relative}: {error.filename} disappeared during the download (deleted by "
                                f"something else?); nothing was put in place. Run the same command again.") from None


def refuse_present(target: Path, current: str) -> None:
    if current in ("different", "incomplete"):
        what = "some of its files are missing" if current == "incomplete" else "it is not the published file"
        raise DownloadError(f"{target} exists but {what}; it was left as it is. Move it away and run again to "
                            "download it.")


def place(file: ModelFile, models: Path, source: Source, current: str, tqdm_class=None) -> str:
    """Verify what is there, or download, verify and move into place (under the file's download lock)."""
    target = models / file.relative
    if current == "intact":
        return "already there, intact (placed by a concurrent download)"
    refuse_present(target, current)
    if current == "unverified":
        if sha256_of(target) != source.sha256:
            raise DownloadError(f"{target} exists but is not the published file (sha256 differs from "
                                f"{source.sha256}); it was left as it is. Move it away and run again to download it.")
        _remember(models, file.relative, source.sha256)
        return "already there, now verified"
    part = part_path(target, source.sha256)
    adopt_staged_part(models / STAGING / f"{source.sha256}.part", part)
    unpacked = sum(size for size, _ in file.members.values())
    transfer(source, part, file.relative, extra_space=unpacked, tqdm_class=tqdm_class)
    verify(part, source, file.relative)
    if file.members:
        unpack(part, file, models)
        part.unlink()
    else:
        try:
            os.replace(part, target)
        except OSError as error:
            raise DownloadError(f"{file.relative}: downloaded and verified, but cannot move it to {target} "
                                f"({error.strerror or error}); it waits in {part}; fix the folder and run again.") \
                from None
        _remember(models, file.relative, source.sha256)
    return "copied from the Hugging Face cache, verified" if source.cached else f"downloaded {human(source.size)}, verified"
