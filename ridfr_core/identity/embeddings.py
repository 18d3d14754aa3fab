"""L2 normalisation of face embeddings (ArcFace, dlib, FaceNet), the one place it is done, so that
similarities everywhere are cosines computed the same way."""

from __future__ import annotations

import numpy as np

TINY_NORM = 1e-12  # below this an embedding counts as all-zero: it has no direction


def l2_normalise(vectors) -> np.ndarray:
    """Unit vectors along the last axis (float64); an all-zero vector stays zero."""
    vectors = np.asarray(vectors, np.float64)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), TINY_NORM)


def has_zero_vector(vectors) -> bool:
    return bool((np.linalg.norm(np.asarray(vectors, np.float64), axis=-1) <= TINY_NORM).any())
