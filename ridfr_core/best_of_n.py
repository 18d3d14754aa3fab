"""Best-of-N: restore each face with N seeds in one batch and keep the sample that looks most like the
person, judged by a recogniser that is *not* the ArcFace the restoration is conditioned on.

RIDFR injects ArcFace (insightface) embeddings; its samples are pushed towards what that ArcFace scores
highly, so ranking them with it again would select for the conditioning signal rather than for the person.
dlib's ResNet and FaceNet (the evaluation's recognisers, :mod:`ridfr_core.metrics`) were trained apart
from it. Scores are cosine similarities to the unit mean of the person's reference embeddings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .identity.embeddings import l2_normalise
from .sampling.noise import face_seed

if TYPE_CHECKING:  # metrics loads scikit-image and SciPy: only when a recogniser is loaded
    from .metrics import Recogniser

logger = logging.getLogger(__name__)

RANKING_RECOGNISERS = ("dlib", "facenet")
# Names under which users may know the recogniser RIDFR is conditioned on (insightface model packs).
INJECTED_RECOGNISER = ("arcface", "insightface", "buffalo_l", "antelopev2")
MAX_CANDIDATES = 16


class RankingError(ValueError):
    """A ranking set-up that cannot work; the message names the option and the fix."""


def ranking_problem(name: str, where: str) -> str | None:
    """Why ``name`` cannot rank restorations (None when it can); ``where`` names the option or node input."""
    if name.lower() in INJECTED_RECOGNISER:
        return (f"{where}: '{name}' is the ArcFace that RIDFR is conditioned on; its own samples are pushed towards "
                "what it scores highly, so it cannot judge them. Rank with an independent recogniser: "
                f"{' or '.join(RANKING_RECOGNISERS)}.")
    if name not in RANKING_RECOGNISERS:
        return f"{where}: unknown recogniser '{name}'; choose {' or '.join(RANKING_RECOGNISERS)}."
    return None


def recogniser_unavailable(name: str, where: str) -> str | None:
    """Why the installed packages cannot run ``name`` (a RANKING_RECOGNISERS entry), with the install
    command; None when they can. Cheap: nothing is loaded."""
    from . import metrics

    reason = {"dlib": metrics.dlib_unavailable_reason, "facenet": metrics.facenet_unavailable_reason}[name]()
    return f"{where}: {name} cannot be used: {reason}." if reason else None


def load_ranking_recogniser(name: str, where: str) -> Recogniser:
    from . import metrics

    problem = ranking_problem(name, where)
    if problem:
        raise RankingError(problem)
    recognisers, skipped = metrics.load_recognisers([name])
    if skipped:
        raise RankingError(f"{where}: {name} cannot be used: {next(iter(skipped.values()))}.")
    return recognisers[0]


def best_of_n(candidates: int, rank_with: str, batch_size: int = 8) -> BestOfN | None:
    """The CLI's ``--candidates``/``--rank-with``: None for a single sample; checked before models load.
    ``batch_size``: faces per sampler call (the candidates of all faces are sampled in such batches)."""
    if not 1 <= candidates <= MAX_CANDIDATES:
        raise RankingError(f"--candidates {candidates}: give 1..{MAX_CANDIDATES} samples per face (each is a full "
                           "sampling run kept in memory until ranked; 4 is plenty).")
    problem = ranking_problem(rank_with, "--rank-with")
    if problem:
        raise RankingError(problem)
    if candidates == 1:
        return None
    return BestOfN(candidates, load_ranking_recogniser(rank_with, "--rank-with"), batch_size)


def reference_embedding(recogniser: Recogniser, references: list[np.ndarray]) -> np.ndarray:
    """The person's identity for ranking: unit mean of the unit embeddings of their reference photos."""
    mean = recogniser.embed(references).mean(axis=0)
    return l2_normalise(mean)


def similarity(recogniser: Recogniser, faces: list[np.ndarray], reference: np.ndarray) -> np.ndarray:
    return recogniser.embed(faces) @ reference


def rank(recogniser: Recogniser, images: list[np.ndarray], references: list[np.ndarray]):
    """(order best first, scores in input order) of ``images`` against one person's reference photos."""
    scores = similarity(recogniser, images, reference_embedding(recogniser, references))
    return np.argsort(-scores, kind="stable"), scores


@dataclass
class FaceRanking:
    """One face's candidates: the seed each was sampled with, its score (None: not ranked because the face
    has no person), and which one was kept."""

    face: int
    person: int | None
    seeds: list[int]
    scores: list[float] | None
    kept: int


@dataclass
class RankingReport:
    recogniser: str
    faces: list[FaceRanking]

    def summary(self) -> str:
        lines = [f"best of {len(self.faces[0].seeds) if self.faces else 0} ranked by {self.recogniser} "
                 "(cosine to the person's references; independent of the injected ArcFace):"]
        for row in self.faces:
            if row.scores is None:
                lines.append(f"  face {row.face}: no person matched, not ranked; kept seed {row.seeds[row.kept]}")
                continue
            scores = ", ".join(f"seed {seed}: {score:.4f}" for seed, score in zip(row.seeds, row.scores))
            lines.append(f"  face {row.face} (person {row.person + 1}): {scores}; kept seed {row.seeds[row.kept]}")
        return "\n".join(lines)


@dataclass(eq=False)
class BestOfN:
    """How many candidates to sample per face and the recogniser that ranks them."""

    candidates: int
    recogniser: Recogniser
    batch_size: int = 8  # faces per sampler call, as archives batch them

    def around(self, restore_fn_with_seeds, people: list[list[np.ndarray]], seed: int):
        """A faces callback (see :mod:`ridfr_core.faces.photo`) that samples every face ``candidates`` times,
        ``batch_size`` samples per call of ``restore_fn_with_seeds(seeds)``, and returns the best-ranked
        sample of each.

        The samples are candidate-major: sample ``k * F + f`` is candidate k of face f, sampled with seed
        ``seed + k * F + f``, so candidate 0 of each face is exactly what a single sample gives, and every
        reported seed reproduces its sample. ``people``: each person's reference photos (uint8 RGB), indexed
        like ``identity_index``.
        """
        from .faces.images import tensor_to_rgb

        references = [reference_embedding(self.recogniser, photos) for photos in people]
        count = self.candidates

        def run(faces: torch.Tensor, scales: torch.Tensor, identity_index: list) -> torch.Tensor:
            total = faces.shape[0]
            faces, scales, identity_index = faces.repeat(count, 1, 1, 1), scales.repeat(count), list(identity_index)
            everyone = identity_index * count
            parts = []
            for start in range(0, count * total, self.batch_size):
                part = slice(start, start + self.batch_size)
                seeds = [face_seed(seed, index) for index in range(start, min(start + self.batch_size, count * total))]
                parts.append(restore_fn_with_seeds(seeds)(faces[part], scales[part], everyone[part]))
            restored = torch.cat(parts).reshape(count, total, *parts[0].shape[1:])
            kept, rows = [], []
            for face, person in enumerate(identity_index):
                seeds = [face_seed(seed, candidate * total + face) for candidate in range(count)]
                scores = None
                if person is not None:
                    scores = similarity(self.recogniser, tensor_to_rgb(restored[:, face]), references[person]).tolist()
                best = int(np.argmax(scores)) if scores else 0
                rows.append(FaceRanking(face, person, seeds, scores, best))
                kept.append(restored[best, face])
            logger.info("%s", RankingReport(self.recogniser.description, rows).summary())
            return torch.stack(kept)
        return run
