"""The manifest: one JSON line per input and attempt, in ``OUT/manifest.jsonl``.

A line is appended (and synced) as soon as an input is finished, so a crash loses at most the inputs
in flight; a torn last line is ignored on reading, and the latest line of an input counts. Under
accelerate each process appends to its own part, ``OUT/manifest.part<N>.jsonl``, and the main process
merges the parts into the manifest at the end (or, after a crash, at the start of the next run).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MANIFEST_NAME = "manifest.jsonl"
PART_GLOB = "manifest.part*.jsonl"
# A finished input: restored, no face to restore (written unchanged) or not a photo or video at all.
FINISHED = ("done", "no_face", "skipped")


def manifest_path(out: Path) -> Path:
    return out / MANIFEST_NAME


def part_path(out: Path, process: int) -> Path:
    return out / f"manifest.part{process}.jsonl"


def append_record(path: Path, record: dict) -> None:
    """Append one line and sync it to disk before the next input starts."""
    append_lines(path, [json.dumps(record, ensure_ascii=False)])


def append_lines(path: Path, lines: list[str]) -> None:
    """Append and sync; a line cut short by a crash is ended first, so it cannot swallow the next one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as stream:
        torn = stream.tell() > 0 and stream.seek(-1, os.SEEK_END) is not None and stream.read(1) != b"\n"
        stream.write(("\n" if torn else "").encode() + "".join(line + "\n" for line in lines).encode("utf-8"))
        stream.flush()
        os.fsync(stream.fileno())


def read_records(path: Path) -> list[dict]:
    """The manifest's records in order; a line cut short by a crash is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "input" in record:
            records.append(record)
    return records


def latest_records(path: Path) -> dict[str, dict]:
    """{input: its latest record}."""
    return {record["input"]: record for record in read_records(path)}


def finished_inputs(out: Path) -> set[str]:
    """Inputs a rerun skips: finished, and their output (if any) still there."""
    return {name for name, record in latest_records(manifest_path(out)).items()
            if record.get("status") in FINISHED and (not record.get("output") or (out / record["output"]).is_file())}


def merge_parts(out: Path) -> int:
    """Append every part's records to the manifest and delete the parts; returns the number of records.
    A crash between the two steps only repeats records, and the latest one counts."""
    merged = 0
    for part in sorted(out.glob(PART_GLOB)):
        records = read_records(part)
        append_lines(manifest_path(out), [json.dumps(record, ensure_ascii=False) for record in records])
        part.unlink()
        merged += len(records)
    return merged
