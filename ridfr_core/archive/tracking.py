"""Faces followed across video frames, so each face keeps one identity and one seed (no flicker).

Faces of consecutive frames are linked by the overlap (IoU) of their boxes; each track is matched to a
person once, by a vote of the per-frame matches over all its frames.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from ..faces.matching import MATCH_SIMILARITY, match_faces

# Boxes of one face in consecutive frames overlap far more than this, even in fast motion at 25 fps.
MIN_TRACK_IOU = 0.3
# A face hidden for a few frames (a hand, a detector miss) keeps its track.
MAX_TRACK_GAP = 5


def box_iou(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """(N,M) intersection over union of boxes (N,4) and (M,4), each (x1, y1, x2, y2)."""
    first, second = np.asarray(first, np.float64).reshape(-1, 4), np.asarray(second, np.float64).reshape(-1, 4)
    top_left = np.maximum(first[:, None, :2], second[None, :, :2])
    bottom_right = np.minimum(first[:, None, 2:], second[None, :, 2:])
    inter = np.clip(bottom_right - top_left, 0, None).prod(axis=2)
    area = lambda boxes: np.clip(boxes[:, 2:] - boxes[:, :2], 0, None).prod(axis=1)  # noqa: E731
    union = area(first)[:, None] + area(second)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def track_faces(boxes_per_frame: list[np.ndarray], min_iou: float = MIN_TRACK_IOU,
                max_gap: int = MAX_TRACK_GAP) -> list[list[int]]:
    """Track number of every face of every frame (numbered 0, 1, ... in order of first appearance).

    A face continues the track whose last box (missing from at most ``max_gap`` frames since) overlaps it most,
    pairs chosen by the assignment with the highest total IoU; the others start new tracks."""
    last_box: dict[int, np.ndarray] = {}
    last_seen: dict[int, int] = {}
    tracks: list[list[int]] = []
    for frame, boxes in enumerate(boxes_per_frame):
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        live = [track for track, seen in last_seen.items() if frame - seen - 1 <= max_gap]
        ids = [-1] * len(boxes)
        if live and len(boxes):
            overlap = box_iou(boxes, np.stack([last_box[track] for track in live]))
            for face, column in zip(*linear_sum_assignment(-overlap)):
                if overlap[face, column] >= min_iou:
                    ids[face] = live[column]
        for face, box in enumerate(boxes):
            if ids[face] < 0:
                ids[face] = len(last_box)
            last_box[ids[face]], last_seen[ids[face]] = box, frame
        tracks.append(ids)
    return tracks


@dataclass(frozen=True)
class TrackIdentity:
    """The person a track was matched to (None: nobody), the share of its frames that voted for that,
    the mean ArcFace similarity to that person over its frames (to the best person for None), and its
    number of frames."""

    identity: int | None
    votes: float
    similarity: float
    frames: int


def vote_identities(track_of_face: list[int], identity_of_face: list[int | None],
                    similarity_of_face: np.ndarray) -> dict[int, TrackIdentity]:
    """One identity per track: the most common per-frame match over its faces (ties: higher mean similarity).

    The three inputs list the faces of all frames in one order: their track, their per-frame match and
    their similarities (F,K) to the K people."""
    similarity_of_face = np.asarray(similarity_of_face, np.float64).reshape(len(track_of_face), -1)
    result = {}
    for track in sorted(set(track_of_face)):
        faces = [face for face, owner in enumerate(track_of_face) if owner == track]
        votes = Counter(identity_of_face[face] for face in faces)
        mean = similarity_of_face[faces].mean(axis=0) if similarity_of_face.shape[1] else np.zeros(0)

        def strength(identity):
            return votes[identity], (mean[identity] if identity is not None else -np.inf)

        winner = max(votes, key=strength)
        similarity = float(mean[winner] if winner is not None else (mean.max() if mean.size else float("nan")))
        result[track] = TrackIdentity(winner, votes[winner] / len(faces), similarity, len(faces))
    return result


def match_tracks(embeddings_per_frame: list[np.ndarray], people: np.ndarray, tracks: list[list[int]],
                 threshold: float = MATCH_SIMILARITY, one_face_per_identity: bool = True) -> dict[int, TrackIdentity]:
    """{track: TrackIdentity}: each frame's faces (F_i,512) matched to the people (K,512) as in a photo, then
    one vote per track over its frames (see :func:`vote_identities`)."""
    track_of_face, identity_of_face, similarity_of_face = [], [], []
    for embeddings, frame_tracks in zip(embeddings_per_frame, tracks):
        if len(frame_tracks):
            matches = match_faces(embeddings, people, threshold, one_face_per_identity)
            track_of_face += list(frame_tracks)
            identity_of_face += matches.identity
            similarity_of_face.append(matches.similarity)
    if not track_of_face:
        return {}
    return vote_identities(track_of_face, identity_of_face, np.concatenate(similarity_of_face))


def describe_tracks(tracks: dict[int, TrackIdentity], names: list[str]) -> str:
    """One report line per track."""
    return "\n".join(f"track {track}: {names[who.identity] if who.identity is not None else 'no match'} "
                     f"({who.votes:.0%} of {who.frames} frame(s), mean similarity {who.similarity:.2f})"
                     for track, who in tracks.items())
