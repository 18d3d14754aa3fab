"""Restoring an archive's photos and videos: faces of several photos share one sampler call, video faces
are tracked so that each keeps one identity and seed; every input ends in one manifest record.

Seeds: face f of a photo gets ``seed + f`` (as the single-photo CLI does, whatever the batching), the
faces of video track t get ``seed + t`` in every frame.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from ..faces import FaceError, align_photo, detect_and_align, paste_restored
from ..faces.matching import MATCH_SIMILARITY
from ..io.atomic import atomic_path
from ..io.images import DEFAULT_QUALITY, read_metadata, read_rgb, write_rgb
from ..sampling.noise import face_seed
from .inputs import ArchiveInput
from .manifest import append_record
from .tracking import match_tracks, track_faces
from .video import VideoSource, write_video

logger = logging.getLogger(__name__)
# Frames held while their faces fill a sampler batch (frames showing nobody must not pile up in memory).
MAX_PENDING_FRAMES = 32


@dataclass
class Timings:
    """Seconds spent on reading/writing files, face detection (with matching and alignment) and sampling."""

    io: float = 0.0
    detection: float = 0.0
    sampling: float = 0.0
    faces: int = 0

    @contextmanager
    def measure(self, part: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, part, getattr(self, part) + time.perf_counter() - start)


@dataclass
class ArchiveJob:
    """Everything one process needs to restore its share of the inputs and report them."""

    restorer: object               # ridfr_core.restore.Restorer
    identities: list               # ridfr_core.identity.adapter.Identity per person
    names: list[str]               # the people's names, as the report gives them
    out: Path
    manifest: Path                 # this process's manifest (or manifest part)
    settings: dict                 # what the manifest records as the settings
    progress: Callable[[int, int], None]  # called with (files, faces) finished
    process: int = 0               # accelerate's process index
    seed: int = 0
    batch_size: int = 8
    unmatched: str = "restore_without_identity"
    upscale: float = 1.0
    quality: int = DEFAULT_QUALITY  # of JPEG and WebP outputs
    timings: Timings = field(default_factory=Timings)

    @cached_property
    def embeddings(self) -> np.ndarray:
        return torch.cat([identity.id_embeds for identity in self.identities]).float().cpu().numpy()

    def sample(self, crops: torch.Tensor, identity_index: list, seeds: list[int],
               scales_used: list | None = None) -> torch.Tensor:
        """Restored crops, ``batch_size`` faces per sampler call; identity scale 0 for faces of nobody.
        ``scales_used`` collects the identity scale each face got (RestorerID's "auto": per face)."""
        restored = []
        with self.timings.measure("sampling"):
            for start in range(0, len(crops), self.batch_size):
                part = slice(start, start + self.batch_size)
                scales = torch.tensor([0.0 if index is None else 1.0 for index in identity_index[part]])
                run = self.restorer.around_sampling(self.restorer.restore_fn(self.identities, seeds[part], scales_used))
                restored.append(run(crops[part], scales, identity_index[part]).float().clamp(0, 1))
        self.timings.faces += len(crops)
        return torch.cat(restored) if restored else crops[:0]

    def record(self, item: ArchiveInput, status: str, started: float, **fields) -> None:
        output = fields.pop("output", None)
        record = {"input": item.relative, "source": str(item.source), "status": status, "output": output,
                  **fields, "settings": self.settings, "seconds": round(time.perf_counter() - started, 3),
                  "process": self.process}
        append_record(self.manifest, record)

    def fail(self, item: ArchiveInput, started: float, error: BaseException) -> None:
        self.record(item, "error", started, error=f"{type(error).__name__}: {error}")
        self.progress(1, 0)


@dataclass
class PendingPhoto:
    item: ArchiveInput
    photo: object                  # ridfr_core.faces.FacesInPhoto
    chosen: list[int]              # faces that get restored
    started: float


class PhotoBatches:
    """Photos wait here after detection until their faces fill a sampler batch."""

    def __init__(self, job: ArchiveJob):
        self.job, self.pending, self.faces = job, [], 0

    def add(self, item: ArchiveInput) -> None:
        job, started = self.job, time.perf_counter()
        try:
            with job.timings.measure("io"):
                image = read_rgb(item.source, "--lq")
            with job.timings.measure("detection"):
                photo = detect_and_align(job.restorer.analyzer, image, job.embeddings, MATCH_SIMILARITY,
                                         on_no_face="skip", name=item.relative)
            chosen = photo.to_restore(job.unmatched)
        except Exception as error:  # one bad file never stops the run: it gets its manifest line
            job.fail(item, started, error)
            return
        entry = PendingPhoto(item, photo, chosen, started)
        if not chosen:  # nothing to sample: written at once, not held in memory
            self.finish(entry, photo.crops[:0])
            return
        self.pending.append(entry)
        self.faces += len(chosen)
        if self.faces >= job.batch_size:
            self.flush()

    def flush(self) -> None:
        pending, self.pending, self.faces = self.pending, [], 0
        if not pending:
            return
        job = self.job
        crops = torch.cat([entry.photo.crops[entry.chosen] for entry in pending])
        identity_index = [entry.photo.identity_index[face] for entry in pending for face in entry.chosen]
        seeds = [face_seed(job.seed, face) for entry in pending for face in entry.chosen]
        scales: list[float] = []
        try:
            restored = job.sample(crops, identity_index, seeds, scales)
        except Exception as error:
            for entry in pending:
                job.fail(entry.item, entry.started, error)
            return
        first = 0
        for entry in pending:
            count = len(entry.chosen)
            part, used, first = restored[first:first + count], scales[first:first + count], first + count
            self.finish(entry, part, dict(zip(entry.chosen, used)))

    def finish(self, entry: PendingPhoto, restored: torch.Tensor, scales: dict | None = None) -> None:
        """Paste, write and record one photo; ``scales``: {face: identity scale it was restored with}."""
        job, photo = self.job, entry.photo
        try:
            result = paste_restored(photo, restored, entry.chosen, job.upscale)
            target = job.out / entry.item.relative
            with job.timings.measure("io"):
                write_rgb(target, result.image, job.quality, read_metadata(entry.item.source))  # atomic
        except Exception as error:
            job.fail(entry.item, entry.started, error)
            return
        faces = [face_record(face, photo.faces[face].bbox, photo.identity_index[face], photo.similarity[face], job,
                             restored=face in entry.chosen, seed=face_seed(job.seed, face),
                             **({"identity_scale": scales[face]} if scales and face in scales else {}))
                 for face in range(len(photo.faces))]
        job.record(entry.item, "no_face" if photo.skipped else "done", entry.started, output=entry.item.relative,
                   faces=faces)
        job.progress(1, len(entry.chosen))


def face_record(number: int, box, identity: int | None, similarity: np.ndarray, job: ArchiveJob, **more) -> dict:
    """A face in the manifest: where, who (None: nobody) and how sure (ArcFace cosine to that person, or
    to the most similar one when nobody matched)."""
    best = similarity[identity] if identity is not None else (similarity.max() if similarity.size else np.nan)
    return {"face": number, "box": [round(float(v), 1) for v in box],
            "person": job.names[identity] if identity is not None else None,
            "similarity": round(float(best), 3), **more}


def restore_video(job: ArchiveJob, item: ArchiveInput) -> None:
    """Detect faces in every frame, track them, match each track once, restore frame batches, encode. The
    video is opened once and closed before a failure is reported, whatever failed."""
    started = time.perf_counter()
    try:
        with VideoSource(item.source) as video:
            detections = detect_video(job, video)
            tracks = track_faces([np.array([face.bbox for face in faces]).reshape(-1, 4) for faces in detections])
            people = identify_tracks(job, detections, tracks)
            with closing(restored_frames(job, video, detections, tracks, people)) as frames, job.timings.measure("io"):
                with atomic_path(job.out / item.relative) as partial:
                    write_video(video, partial, frames)
    except Exception as error:
        job.fail(item, started, error)
        return
    report = [{"track": track, "person": job.names[who.identity] if who.identity is not None else None,
               "votes": round(who.votes, 3), "similarity": round(who.similarity, 3), "frames": who.frames,
               "seed": face_seed(job.seed, track)} for track, who in people.items()]
    job.record(item, "done" if people else "no_face", started, output=item.relative, frames=len(video.pts),
               fps=float(video.rate), audio_streams=len(video.audio_streams), rotation=video.rotation, tracks=report)
    job.progress(1, 0)


def detect_video(job: ArchiveJob, video: VideoSource) -> list:
    """The faces of each frame."""
    detections = []
    with closing(video.frames()) as frames:
        while True:
            with job.timings.measure("io"):
                decoded = next(frames, None)
            if decoded is None:
                return detections
            name = f"{video.path} frame {len(detections)}"
            with job.timings.measure("detection"):
                try:
                    faces = job.restorer.analyzer.detect(decoded[0], embed=True, name=name)
                except FaceError as error:  # e.g. a face too blank to recognise: this frame stays as it is
                    logger.warning("%s: %s; the frame is kept as it is.", name, error)
                    faces = []
            detections.append(faces)


def identify_tracks(job: ArchiveJob, detections, tracks):
    """{track: TrackIdentity}: each frame's faces matched to the people, then one vote per track."""
    width = job.embeddings.shape[1]
    embeddings = [np.array([face.embedding for face in faces]).reshape(len(faces), width) for faces in detections]
    return match_tracks(embeddings, job.embeddings, tracks, MATCH_SIMILARITY)


def restored_frames(job: ArchiveJob, video: VideoSource, detections, tracks, people) -> Iterator[np.ndarray]:
    """The frames in order with their faces restored; frames wait until their faces fill a batch."""
    pending, faces = [], 0
    with closing(video.frames()) as frames:
        for number, (frame, _) in enumerate(frames):
            identity_index = [people[track].identity for track in tracks[number]]
            photo = align_photo(frame, detections[number], identity_index, name=f"{video.path} frame {number}")
            chosen = photo.to_restore(job.unmatched)
            pending.append((photo, chosen, [face_seed(job.seed, tracks[number][face]) for face in chosen]))
            faces += len(chosen)
            if faces >= job.batch_size or len(pending) >= MAX_PENDING_FRAMES:
                yield from restore_frames(job, pending)
                pending, faces = [], 0
    yield from restore_frames(job, pending)


def restore_frames(job: ArchiveJob, pending) -> Iterator[np.ndarray]:
    if not pending:
        return
    crops = torch.cat([photo.crops[chosen] for photo, chosen, _ in pending])
    identity_index = [photo.identity_index[face] for photo, chosen, _ in pending for face in chosen]
    restored = job.sample(crops, identity_index, [seed for *_, seeds in pending for seed in seeds])
    first = 0
    for photo, chosen, _ in pending:
        part, first = restored[first:first + len(chosen)], first + len(chosen)
        job.progress(0, len(chosen))
        yield paste_restored(photo, part, chosen, job.upscale).image
