"""Which detected face is which person: ArcFace similarity to each identity's combined embedding."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from ..identity.embeddings import has_zero_vector, l2_normalise
from .errors import FaceInputError

# Degraded faces score lower against clean references than two clean photos do; 0.2 still
# separates people on buffalo_l while accepting blurred faces.
MATCH_SIMILARITY = 0.2


@dataclass
class FaceMatches:
    """``identity[f]``: the identity index of face f, or None (no identity above ``threshold``).
    ``similarity`` (F,K): ArcFace cosine of every face to every identity."""

    identity: list[int | None]
    similarity: np.ndarray
    threshold: float

    def summary(self, names: list[str] | None = None) -> str:
        lines = []
        def label(identity: int) -> str:
            return names[identity] if names else f"identity {identity}"

        for face, identity in enumerate(self.identity):
            if identity is not None:
                lines.append(f"face {face}: {label(identity)} (similarity {self.similarity[face, identity]:.2f})")
                continue
            closest = int(self.similarity[face].argmax()) if self.similarity.shape[1] else None
            best = float(self.similarity[face, closest]) if closest is not None else float("nan")
            if best >= self.threshold and closest in self.identity:  # one face per person: another face won
                lines.append(f"face {face}: no match ({label(closest)} at {best:.2f} went to face "
                             f"{self.identity.index(closest)}, which resembles them more)")
            else:
                lines.append(f"face {face}: no match (best similarity {best:.2f} < {self.threshold})")
        return "\n".join(lines)


def match_faces(face_embeddings, identity_embeddings, threshold: float = MATCH_SIMILARITY,
                one_face_per_identity: bool = True) -> FaceMatches:
    """Assign each face (F,512) to the most similar identity (K,512) above ``threshold``.

    ``one_face_per_identity``: a person appears once in a photo, so faces and identities are paired
    by the assignment with the highest total similarity over the pairs at or above ``threshold``
    (Hungarian; a pair below it counts as no match, so its score cannot pull the others apart);
    otherwise every face takes its own best identity, and several faces may share one.
    """
    faces = _as_unit_rows(face_embeddings, "face_embeddings")
    identities = _as_unit_rows(identity_embeddings, "identity_embeddings")
    if faces.shape[1] != identities.shape[1] and len(faces) and len(identities):
        raise FaceInputError(f"embeddings: faces are {faces.shape[1]}-d but identities {identities.shape[1]}-d; "
                             "use the same ArcFace model for both.")
    similarity = faces @ identities.T if len(faces) and len(identities) else np.zeros((len(faces), len(identities)))
    assigned: list[int | None] = [None] * len(faces)
    if similarity.size:
        if one_face_per_identity:
            rows, cols = linear_sum_assignment(-np.where(similarity >= threshold, similarity, 0.0))
        else:
            rows, cols = np.arange(len(faces)), similarity.argmax(axis=1)
        for face, identity in zip(rows, cols):
            if similarity[face, identity] >= threshold:
                assigned[int(face)] = int(identity)
    return FaceMatches(identity=assigned, similarity=similarity, threshold=threshold)


def _as_unit_rows(embeddings, name: str) -> np.ndarray:
    if hasattr(embeddings, "detach"):
        embeddings = embeddings.detach().cpu().numpy()
    array = np.asarray(embeddings, np.float64)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2:
        raise FaceInputError(f"{name}: expected (N, 512) embeddings, got shape {array.shape}.")
    if has_zero_vector(array):
        raise FaceInputError(f"{name}: contains an all-zero embedding.")
    return l2_normalise(array)
