"""Reference photos of one person -> one identity condition for FaceID-Plus.

Each reference gives an ArcFace embedding and the 224 px ArcFace-aligned crop that CLIP encodes.
Several references are combined by a quality-weighted mean (embeddings normalised before and
after), and their pairwise ArcFace similarity tells the user whether they show one person.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from ..identity.embeddings import has_zero_vector, l2_normalise
from .analysis import ALIGNED_MODE_HINT, FaceAnalyzer, clip_face_crop
from .align import ffhq_template
from .errors import FaceInputError, NoFaceError
from .images import as_image_list, rgb_to_tensor, to_rgb_uint8

logger = logging.getLogger(__name__)

# Below this ArcFace cosine two good photos are unlikely to show one person (buffalo_l scale).
SAME_PERSON_SIMILARITY = 0.3
# insightface's ArcFace template: where the five landmarks sit in the recogniser's 112 px input.
ARCFACE_TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                 [41.5493, 92.3655], [70.7299, 92.2041]])


@dataclass
class ReferenceFace:
    """One reference: normalised ArcFace ``embedding`` (512,), ``clip_crop`` (224,224,3) uint8 RGB,
    detection score, landmark spread in pixels, and where it came from (``kps`` in that image)."""

    embedding: np.ndarray
    clip_crop: np.ndarray
    det_score: float
    face_scale: float
    kps: np.ndarray

    @property
    def weight(self) -> float:
        return quality_weight(self.det_score, self.face_scale)


def quality_weight(det_score: float, face_scale: float) -> float:
    """Detection confidence times how much of ArcFace's 112 px input the face fills: a face smaller
    than that is upsampled into the recogniser and its embedding is less reliable."""
    return float(det_score) * float(np.clip(face_scale / ARCFACE_SPREAD_112, 0.1, 1.0))


def landmark_spread(kps: np.ndarray) -> float:
    """Mean distance of the five landmarks to their centroid: a face size that does not depend on
    the detector's box conventions and also exists for aligned crops."""
    kps = np.asarray(kps, np.float64)
    return float(np.linalg.norm(kps - kps.mean(axis=0), axis=1).mean())


ARCFACE_SPREAD_112 = landmark_spread(ARCFACE_TEMPLATE_112)


def encode_references(analyzer: FaceAnalyzer, images, face_index: int | list[int | None] | None = None,
                      aligned: bool = False) -> list[ReferenceFace]:
    """One :class:`ReferenceFace` per reference image.

    ``images``: a list of images or a (B,H,W,C) batch (any layout :func:`to_rgb_uint8` accepts).
    ``face_index``: which face of a reference with several (None = largest; one int for all, or one
    per image). ``aligned``: the references are FFHQ-aligned face crops; landmarks come from the
    template and nothing is detected (det_score 1).
    """
    images = as_image_list(images, "references")
    indices = face_index if isinstance(face_index, (list, tuple)) else [face_index] * len(images)
    if len(indices) != len(images):
        raise FaceInputError(f"face_index: {len(indices)} indices for {len(images)} reference images; "
                             "give one index for all or one per image.")
    references = []
    for number, (image, index) in enumerate(zip(images, indices)):
        name = f"reference {number}"
        rgb = to_rgb_uint8(image, name)
        if aligned:
            kps, det_score = aligned_landmarks(rgb), 1.0
            embedding = analyzer.embed(rgb, kps)
        else:
            try:
                face = analyzer.detect_one(rgb, index=index, name=name)
            except NoFaceError as error:
                raise NoFaceError(f"{error} For references, use a clearer photo of the person, or set "
                                  "aligned references if they are already aligned face crops.") from None
            kps, det_score, embedding = face.kps, face.det_score, face.embedding
        references.append(ReferenceFace(embedding=embedding, clip_crop=clip_face_crop(rgb, kps),
                                        det_score=det_score, face_scale=landmark_spread(kps), kps=kps))
    return references


def aligned_landmarks(rgb: np.ndarray) -> np.ndarray:
    """The FFHQ template landmarks of an aligned square crop of any size."""
    height, width = rgb.shape[:2]
    if abs(height - width) > 1:
        raise FaceInputError(f"aligned mode: expected a square FFHQ-aligned face crop, got {width}x{height}. "
                             "Turn aligned mode off to detect the face in a photo.")
    return ffhq_template(width).astype(np.float64)


@dataclass
class ConsistencyReport:
    """Pairwise ArcFace cosine ``similarity`` (N,N) of the references, the combination ``weights``,
    and the references that look like someone else (``outliers``) with human-readable ``warnings``."""

    similarity: np.ndarray
    weights: np.ndarray
    outliers: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def mean_similarity(self) -> float:
        """Mean similarity over distinct pairs (1.0 for a single reference)."""
        count = len(self.similarity)
        if count < 2:
            return 1.0
        return float(self.similarity[~np.eye(count, dtype=bool)].mean())

    def summary(self) -> str:
        count = len(self.similarity)
        lines = [f"{count} reference(s), mean pairwise ArcFace similarity {self.mean_similarity:.2f}, "
                 f"weights {np.round(self.weights / self.weights.sum(), 2).tolist()}"]
        return "\n".join(lines + [f"Warning: {warning}" for warning in self.warnings])


def check_consistency(embeddings, weights=None, threshold: float = SAME_PERSON_SIMILARITY) -> ConsistencyReport:
    """How well the references agree: a reference whose mean similarity to the others is below
    ``threshold`` is reported as probably another person."""
    normed = _normalise(np.asarray(embeddings, np.float64).reshape(len(embeddings), -1))
    count = len(normed)
    weights = np.ones(count) if weights is None else np.asarray(weights, np.float64)
    similarity = normed @ normed.T
    report = ConsistencyReport(similarity=similarity, weights=weights)
    if count == 2 and similarity[0, 1] < threshold:
        report.warnings.append(f"the two references have ArcFace similarity {similarity[0, 1]:.2f} "
                               f"(< {threshold}); they may show different people.")
    elif count >= 3:
        to_others = (similarity.sum(axis=1) - 1.0) / (count - 1)
        low = [int(i) for i in np.flatnonzero(to_others < threshold)]
        if len(low) == count:
            report.warnings.append(f"no reference resembles the others (mean similarities "
                                   f"{np.round(to_others, 2).tolist()}); are they all the same person?")
        else:
            report.outliers = low
            report.warnings += [f"reference {i} looks like someone else (mean similarity {to_others[i]:.2f} to the "
                                f"others, < {threshold}); consider removing it." for i in low]
    for warning in report.warnings:
        logger.warning(warning)
    return report


def _normalise(vectors: np.ndarray) -> np.ndarray:
    if has_zero_vector(vectors):
        raise FaceInputError("embeddings: an all-zero ArcFace embedding cannot be normalised.")
    return l2_normalise(vectors)


def combine_identity(embeddings, clip_features: torch.Tensor, weights=None):
    """One :class:`ridfr_core.identity.adapter.Identity` (B=1) from N references.

    ``embeddings`` (N,512): normalised, weighted-averaged, re-normalised (a direction, like each
    input). ``clip_features`` (N,257,C): weighted average. ``weights`` (N,) >= 0, default equal.
    """
    from ..identity.adapter import Identity  # diffusers is heavy: only load it when an identity is built

    embeddings = np.asarray(embeddings, np.float64)
    embeddings = embeddings.reshape(1, -1) if embeddings.ndim == 1 else embeddings
    count = len(embeddings)
    weights = np.ones(count) if weights is None else np.asarray(weights, np.float64).reshape(-1)
    if clip_features.ndim == 2:
        clip_features = clip_features[None]
    if not (len(clip_features) == len(weights) == count):
        raise FaceInputError(f"references: {count} ArcFace embeddings, {len(clip_features)} CLIP feature sets and "
                             f"{len(weights)} weights; give one of each per reference.")
    if count == 0:
        raise FaceInputError("references: no reference faces to combine.")
    if (weights < 0).any() or weights.sum() <= 0:
        raise FaceInputError(f"weights: must be non-negative with a positive sum, got {weights.tolist()}.")
    shares = weights / weights.sum()
    mean_embedding = _normalise((_normalise(embeddings) * shares[:, None]).sum(axis=0, keepdims=True))
    clip_shares = torch.as_tensor(shares, dtype=clip_features.dtype, device=clip_features.device)
    mean_clip = (clip_features * clip_shares.view(-1, 1, 1)).sum(dim=0, keepdim=True)
    return Identity(torch.from_numpy(mean_embedding.astype(np.float32)).to(clip_features.device), mean_clip)


def build_identity(references: list[ReferenceFace], clip_vision, bgr: bool = False):
    """(Identity with B=1, ConsistencyReport) for one person's references: CLIP-encodes the 224 crops
    with ``clip_vision`` (in BGR order with ``bgr``, the backend's ``clip_bgr``) and combines everything
    with the references' quality weights."""
    from ..identity.adapter import encode_clip_features

    if not references:
        raise FaceInputError(f"references: none given. {ALIGNED_MODE_HINT}")
    embeddings = np.stack([reference.embedding for reference in references])
    weights = np.array([reference.weight for reference in references])
    report = check_consistency(embeddings, weights)
    clip_features = encode_clip_features(clip_vision, rgb_to_tensor([r.clip_crop for r in references]), bgr)
    return combine_identity(embeddings, clip_features.float(), weights), report
