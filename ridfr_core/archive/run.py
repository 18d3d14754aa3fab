"""The archive job of ``python -m ridfr_core.restore`` (``--lq`` a folder, glob, list or video), on one
process or, under ``accelerate launch``, split across processes with accelerate's own splitting.

Every process skips the inputs the manifest marks finished, takes its share of the rest
(``PartialState.split_between_processes``), appends its records to its own manifest part, and the main
process merges the parts once all are done. The exit code is 1 when any input failed.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from pathlib import Path

from ..io.atomic import TEMP_FILE, probe_writable
from ..io.folder_lock import FolderLock
from ..io.images import IMAGE_SUFFIXES, read_rgb
from ..restore_checks import same_file
from .inputs import VIDEO_SUFFIXES, ArchiveInput, collect_inputs
from .manifest import finished_inputs, latest_records, manifest_path, merge_parts, part_path
from .people import people_folders
from .restoring import ArchiveJob, PhotoBatches, Timings, restore_video

logger = logging.getLogger(__name__)
INTERRUPTED = 130


class ArchiveStopped(ValueError):
    """Another process of the run failed; this one stops too instead of waiting for it."""


def reference_people(args) -> list[tuple[str, list]]:
    """(name, reference photo paths) per person: --id (one person), each --person, each --people sub-folder."""
    people = [("id", list(args.references))] if args.references else []
    people += [(f"person {number}", [path for path in group.split(",") if path])
               for number, group in enumerate(args.person, 1)]
    if args.people:
        people += [(name, [str(path) for path in photos]) for name, photos in people_folders(args.people)]
    if not people:
        raise ValueError("--id: give at least one reference photo (--id, --person for each person, or --people DIR).")
    return people


def check_outputs(items: list[ArchiveInput], out: Path) -> None:
    """--out is a folder (or will be), and never the input folder: no input is overwritten."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file; for an archive give a folder (it mirrors the input tree).")
    if not out.exists() and out.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES:
        raise ValueError(f"--out {out}: names a {out.suffix} file, but the outputs of an archive or video go into a "
                         f"folder that mirrors the input tree; give a folder, e.g. --out {out.with_suffix('')}.")
    for item in items:
        if same_file(out / item.relative, item.source):
            raise ValueError(f"--out: {out} would overwrite the input {item.source}; choose another output folder.")


def settings_record(args, restorer) -> dict:
    backend = restorer.pipeline.backend
    sampling = restorer.sampling
    scale = restorer.identity_scale
    chosen = backend.sampling_settings(sampling.get("steps"), sampling.get("guidance"), sampling.get("sampler"),
                                       sampling.get("color_fix"))
    return {"backend": backend.name, **chosen, "identity_scale": "auto" if scale.metric is not None else scale.fixed,
            "content_scale": sampling.get("content_scale"),
            "seed": args.seed, "unmatched": args.unmatched, "upscale": args.upscale, "preprocess": args.preprocess}


class Progress:
    """tqdm bars over this process's files (with the ETA) and faces restored (with the rate)."""

    def __init__(self, files: int, process: int):
        from tqdm.auto import tqdm

        prefix = f"[{process}] " if process else ""
        self.files = tqdm(total=files, unit="file", desc=f"{prefix}files", position=2 * process, dynamic_ncols=True)
        self.faces = tqdm(unit="face", desc=f"{prefix}faces", position=2 * process + 1, dynamic_ncols=True)

    def __call__(self, files: int, faces: int) -> None:
        self.files.update(files)
        self.faces.update(faces)

    def close(self) -> None:
        self.files.close()
        self.faces.close()


def on_every_process(state, step):
    """``step()`` on this process; when it raised on any process, every process raises: the others would
    otherwise wait in the next collective (``wait_for_everyone``) until its timeout. Also a barrier."""
    error, result = None, None
    try:
        result = step()
    except Exception as raised:
        error = raised
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        mine = f"process {state.process_index}: {type(error).__name__}: {error}" if error is not None else None
        failed = [text for text in gather_object([mine]) if text]
        if error is None and failed:
            raise ArchiveStopped(f"stopped because {'; '.join(failed)}. Rerun the same command to resume.")
    if error is not None:
        raise error
    return result


def take_output_folder(out: Path):
    """Create --out, lock it against a second run (which would restore everything again and interleave the
    manifest), merge the manifest parts and remove the temporary files of a run that was killed."""
    try:
        probe_writable(out)
    except OSError as error:
        raise ValueError(f"--out {out}: cannot create or write to this folder ({error.strerror or error}); give a "
                         "folder you can write to.") from None
    lock = FolderLock(out)
    merge_parts(out)  # the parts of a run that crashed
    for path in out.rglob(".*"):
        if TEMP_FILE.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)
    return lock


def restore_share(job: ArchiveJob, items: list[ArchiveInput]) -> None:
    """Restore this process's inputs in order; photos are batched, a video is restored on its own."""
    photos = PhotoBatches(job)
    for item in items:
        if item.kind == "image":
            photos.add(item)
        elif item.kind == "video":
            photos.flush()
            restore_video(job, item)
        else:
            suffix = item.source.suffix or "no suffix"
            job.record(item, "skipped", time.perf_counter(), error=f"not a photo or video ({suffix})")
            job.progress(1, 0)
    photos.flush()


def summary(items: list[ArchiveInput], records: dict[str, dict], already: set[str]) -> tuple[str, list[dict]]:
    """(one line per kind of outcome, the failed records) for the inputs of this run."""
    counts, failed = Counter(), []
    for item in items:
        record = records.get(item.relative)
        status = "already done" if item.relative in already else record["status"] if record else "not reached"
        counts[status] += 1
        if status in ("error", "not reached"):
            failed.append(record or {"input": item.relative, "error": "not reached"})
    text = ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))
    return f"{len(items)} inputs: {text}", failed


def run_archive(args, paths: dict, make_restorer) -> int:
    """The archive job; ``make_restorer(paths)`` loads the models (only where inputs are left to do)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    if args.aligned:
        raise ValueError("--aligned: archives are restored as whole photos (faces are detected); give one aligned "
                         "face crop per run with --aligned, or leave the option out.")
    if args.candidates > 1:
        raise ValueError("--candidates: best-of-N ranks the samples of one photo; archives sample each face once. "
                         "Leave --candidates out, or restore single photos with it.")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: {args.batch_size} is not a number of faces; give 1 or more (default 8).")
    state = PartialState(cpu=args.device == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU"))
    out = Path(args.out)
    items = collect_inputs(args.lq, exclude=out)
    check_outputs(items, out)
    people = reference_people(args)
    lock = on_every_process(state, lambda: take_output_folder(out) if state.is_main_process else None)
    try:
        already = finished_inputs(out)
        pending = [item for item in items if item.relative not in already]
        record_to = manifest_path(out) if state.num_processes == 1 else part_path(out, state.process_index)
        try:
            with state.split_between_processes(pending) as share:
                on_every_process(state, lambda: restore_with_models(args, paths, make_restorer, people, share, out,
                                                                    record_to, state.process_index) if share else None)
        except KeyboardInterrupt:
            print(f"interrupted; rerun the same command to resume (finished inputs are in {manifest_path(out)}).",
                  file=sys.stderr)
            return INTERRUPTED
        on_every_process(state, lambda: merge_parts(out) if state.is_main_process else None)
    finally:
        if lock is not None:
            lock.release()
    text, failed = summary(items, latest_records(manifest_path(out)), already)
    if state.is_main_process:
        print(text)
        for record in failed:
            print(f"  failed: {record['input']}: {record.get('error')}", file=sys.stderr)
        print(f"manifest: {manifest_path(out)}")
    return 1 if failed else 0


def restore_with_models(args, paths, make_restorer, people, share, out, record_to, process) -> Timings:
    """Load the models, encode the people, restore ``share``; returns where the time went."""
    restorer = make_restorer(paths)
    identities = []
    for name, photos in people:
        identity, report = restorer.identity([read_rgb(path, f"reference of {name}") for path in photos],
                                             args.aligned_references)
        logger.info("%s: %s", name, report.summary())
        identities.append(identity)
    progress = Progress(len(share), process)
    job = ArchiveJob(restorer, identities, [name for name, _ in people], out, record_to,
                     settings_record(args, restorer), progress, process=process, seed=args.seed,
                     batch_size=args.batch_size, unmatched=args.unmatched, upscale=args.upscale, quality=args.quality)
    try:
        restore_share(job, share)
    finally:
        progress.close()
        log_timings(job.timings)
    return job.timings


def log_timings(timings: Timings) -> None:
    logger.info("time: I/O %.1f s, detection %.1f s, sampling %.1f s (%d faces)", timings.io, timings.detection,
                timings.sampling, timings.faces)
