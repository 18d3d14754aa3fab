"""FFHQ alignment and paste-back.

RIDFR (like GFPGAN/CodeFormer) restores faces aligned to the FFHQ five-point template at 512 px.
Alignment is a similarity transform (rotation, uniform scale, translation) fitted to the five
detected landmarks; paste-back warps the restored crop and a feathered mask through the inverse
transform. The mask is exactly 0 near the crop border, so every photo pixel outside the warped mask
keeps its value bit for bit.

Coordinates: pixel (x, y) is the centre of column x, row y (OpenCV's convention).
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

from ..constants import FACE_SIZE
from .errors import FaceInputError

# facexlib's FFHQ 512 template (left eye, right eye, nose tip, left and right mouth corner).
FFHQ_TEMPLATE_512 = np.array(
    [[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
     [201.26117, 371.41043], [313.08905, 371.15118]], dtype=np.float32)
# facexlib's border colour for crop areas outside the photo.
BORDER_VALUE = (135, 133, 132)
UPSCALE_MODES = {"bicubic": cv2.INTER_CUBIC, "bilinear": cv2.INTER_LINEAR, "lanczos": cv2.INTER_LANCZOS4,
                 "nearest": cv2.INTER_NEAREST}


def ffhq_template(size: int = FACE_SIZE) -> np.ndarray:
    """The five-point template for a size x size crop."""
    return FFHQ_TEMPLATE_512 * (size / FACE_SIZE)


def estimate_alignment(kps: np.ndarray, size: int = FACE_SIZE) -> np.ndarray:
    """2x3 similarity matrix taking photo coordinates to the size x size FFHQ crop."""
    kps = np.asarray(kps, dtype=np.float32).reshape(-1, 2)
    if kps.shape != (5, 2) or not np.isfinite(kps).all():
        raise FaceInputError(f"landmarks: expected 5 finite (x, y) points, got shape {kps.shape}.")
    matrix, _ = cv2.estimateAffinePartial2D(kps, ffhq_template(size), method=cv2.LMEDS)
    if matrix is None:
        raise FaceInputError("landmarks: the five points are degenerate (collinear or coincident); cannot align.")
    return matrix


def warp_to_crop(image: np.ndarray, matrix: np.ndarray, size: int = FACE_SIZE) -> np.ndarray:
    """The aligned size x size crop of an HWC image."""
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=BORDER_VALUE)


def inverse_alignment(matrix: np.ndarray, upscale: float = 1.0) -> np.ndarray:
    """2x3 matrix taking crop coordinates back to the photo, upsampled by ``upscale``.

    A photo resized by s maps pixel x to s*x + (s-1)/2 (pixel centres, as cv2.resize does).
    """
    inverse = cv2.invertAffineTransform(matrix) * upscale
    inverse[:, 2] += (upscale - 1.0) / 2.0
    return inverse


def feather_mask(size: int = FACE_SIZE, border: float = 0.02, feather: float = 0.1) -> np.ndarray:
    """(size, size) float32 blend weight: 0 within ``border*size`` px of the crop edge, rising
    smoothly to 1 over the next ``feather*size`` px. Analytic, so it is exactly 0 at the edge
    (a blurred mask would leak tiny weights onto the untouched photo)."""
    centres = np.arange(size, dtype=np.float32) + 0.5
    to_edge = np.minimum(centres, size - centres)
    ramp = np.clip((to_edge - border * size) / max(feather * size, 1e-6), 0.0, 1.0)
    ramp = ramp * ramp * (3.0 - 2.0 * ramp)
    return np.minimum(ramp[:, None], ramp[None, :])


@lru_cache(maxsize=4)
def _default_mask(size: int) -> np.ndarray:
    """feather_mask(size), computed once per size for every face pasted (read-only)."""
    mask = feather_mask(size)
    mask.setflags(write=False)
    return mask


def upscale_image(image: np.ndarray, upscale: float, mode: str = "bicubic") -> np.ndarray:
    """The whole photo resized by ``upscale`` with ``mode`` (one of UPSCALE_MODES)."""
    if mode not in UPSCALE_MODES:
        raise FaceInputError(f"upscale_mode: {mode!r} is not one of {sorted(UPSCALE_MODES)}.")
    if not upscale > 0:
        raise FaceInputError(f"upscale: must be positive, got {upscale}; use 1 to keep the photo's size.")
    if upscale == 1.0:
        return image.copy()
    height, width = image.shape[:2]
    size = (int(round(width * upscale)), int(round(height * upscale)))
    return cv2.resize(image, size, interpolation=UPSCALE_MODES[mode])


def paste_face(photo: np.ndarray, crop: np.ndarray, matrix: np.ndarray, upscale: float = 1.0,
               mask: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Blend one restored crop into ``photo`` (already upsampled by ``upscale``) in place.

    Only the bounding box of the warped crop is touched, which keeps 8K photos cheap. Returns the
    blend mask in photo coordinates, (H, W) float32 in [0, 1]: written into ``out`` (an all-zero
    (H, W) float32 array, e.g. a row of a preallocated stack) when given, else a new array.
    """
    size = crop.shape[0]
    mask = _default_mask(size) if mask is None else mask
    inverse = inverse_alignment(matrix, upscale)
    height, width = photo.shape[:2]
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], np.float64) - [0.5, 0.5, 0]
    projected = corners @ inverse.T
    x0, y0 = np.maximum(np.floor(projected.min(axis=0)).astype(int) - 1, 0)
    x1 = min(int(np.ceil(projected[:, 0].max())) + 2, width)
    y1 = min(int(np.ceil(projected[:, 1].max())) + 2, height)
    full_mask = np.zeros((height, width), np.float32) if out is None else out
    if x0 >= x1 or y0 >= y1:
        return full_mask
    local = inverse.copy()
    local[:, 2] -= (x0, y0)
    box = (x1 - x0, y1 - y0)
    warped = cv2.warpAffine(crop.astype(np.float32), local, box, flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    weight = cv2.warpAffine(mask, local, box, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                            borderValue=0)
    region = photo[y0:y1, x0:x1]
    inside = weight > 0
    blended = region.astype(np.float32) * (1.0 - weight[..., None]) + warped.reshape(region.shape) * weight[..., None]
    if np.issubdtype(photo.dtype, np.integer):
        blended = np.clip(np.rint(blended), 0, np.iinfo(photo.dtype).max)
    region[inside] = blended[inside].astype(photo.dtype)
    full_mask[y0:y1, x0:x1] = weight
    return full_mask
