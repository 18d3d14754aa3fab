"""Whole photos: detect every face, align to FFHQ 512, restore all faces in one batch, paste back.

The restorer is a callback, so this module does not depend on the diffusion pipeline::

    restore_fn(aligned, identity_scales, identity_index) -> restored
      aligned: (B,3,S,S) float RGB in [0,1]; identity_scales: (B,) float tensor;
      identity_index: list of B ints (which identity each face gets) or None (no identity, scale 0);
      restored: (B,3,S,S) float RGB in [0,1].

Everything outside the pasted faces' masks is the input photo (upsampled when asked), pixel for pixel.
Photos in and out are HWC uint8 RGB numpy arrays.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from ..constants import FACE_SIZE, ON_NO_FACE
from .align import estimate_alignment, paste_face, upscale_image, warp_to_crop
from .analysis import ALIGNED_MODE_HINT, DETECTION_SIZES, DetectedFace, FaceAnalyzer
from .errors import FaceInputError, NoFaceError
from .images import as_image_list, rgb_to_tensor, tensor_to_rgb, to_rgb_uint8
from .matching import MATCH_SIMILARITY, match_faces

logger = logging.getLogger(__name__)

RestoreFn = Callable[[torch.Tensor, torch.Tensor, list], torch.Tensor]
UNMATCHED_FACES = ("restore_without_identity", "keep_original")


@dataclass
class PhotoRestoration:
    """The result for one photo.

    ``image``: (H',W',3) uint8 RGB, the photo upsampled by ``upscale`` with the faces pasted in.
    ``masks``: (F,H',W') float32 blend weight of each face in ``image`` coordinates (all zero for a
    face kept as it was). ``aligned``/``restored``: (F,3,S,S) float crops, what the restorer saw and
    returned (a kept face's restored crop is its aligned crop). ``identity_index``: per face.
    ``skipped``: no face was found and ``on_no_face='skip'`` returned the photo unchanged.
    """

    image: np.ndarray
    masks: np.ndarray
    aligned: torch.Tensor
    restored: torch.Tensor
    faces: list[DetectedFace]
    identity_index: list[int | None]
    restored_faces: list[bool]
    skipped: bool = False


@dataclass
class FacesInPhoto:
    """One photo's faces, ready for a restorer: the photo (HWC uint8 RGB), the detected faces, their
    alignment matrices (F,2,3) and aligned crops (F,3,S,S) float in [0,1], and the identity each face gets
    (None: matched to nobody). ``skipped``: no face was found and the no-face policy was 'skip'."""

    image: np.ndarray
    faces: list[DetectedFace]
    matrices: np.ndarray
    crops: torch.Tensor
    identity_index: list[int | None]
    skipped: bool = False
    similarity: np.ndarray | None = None  # (F,K) ArcFace cosine of each face to each identity, when matched

    def to_restore(self, unmatched: str = "restore_without_identity") -> list[int]:
        """Indices of the faces a restorer gets: all, or only the matched ones with 'keep_original'."""
        check_unmatched(unmatched)
        return [face for face, index in enumerate(self.identity_index)
                if index is not None or unmatched == "restore_without_identity"]


def check_unmatched(unmatched: str) -> None:
    if unmatched not in UNMATCHED_FACES:
        raise FaceInputError(f"unmatched: {unmatched!r} is not one of {UNMATCHED_FACES}.")


def align_faces(rgb: np.ndarray, faces: list[DetectedFace], size: int = FACE_SIZE):
    """(matrices (F,2,3), crops list of (S,S,3) uint8 RGB) of ``faces`` in the photo ``rgb``."""
    matrices = [estimate_alignment(face.kps, size) for face in faces]
    return np.array(matrices).reshape(-1, 2, 3), [warp_to_crop(rgb, matrix, size) for matrix in matrices]


def align_photo(image, faces: list[DetectedFace], identity_index: list[int | None] | None = None,
                face_size: int = FACE_SIZE, name: str = "photo") -> FacesInPhoto:
    """The aligned crops of ``faces`` (detected in ``image``); identity 0 for every face by default."""
    rgb = to_rgb_uint8(image, name)
    identity_index = [0] * len(faces) if identity_index is None else list(identity_index)
    if len(identity_index) != len(faces):
        raise FaceInputError(f"identity_index: {len(identity_index)} entries for {len(faces)} faces; give one per face.")
    matrices, crops = align_faces(rgb, faces, face_size)
    aligned = rgb_to_tensor(crops) if crops else torch.zeros(0, 3, face_size, face_size)
    return FacesInPhoto(rgb, list(faces), matrices, aligned, identity_index)


def detect_and_align(analyzer: FaceAnalyzer, image, identity_embeddings=None, match_threshold: float = MATCH_SIMILARITY,
                     one_face_per_identity: bool = True, on_no_face: str = "error",
                     detection_sizes: tuple[int, ...] = DETECTION_SIZES, face_size: int = FACE_SIZE,
                     name: str = "photo") -> FacesInPhoto:
    """Detect every face of one photo, match it to an identity and align it.

    ``identity_embeddings`` (K,512): each identity's combined ArcFace embedding; faces are matched
    to them (see :func:`match_faces`). None: identity 0 for every face. ``on_no_face``: 'error' raises
    NoFaceError, 'skip' returns the photo with no faces (``skipped``), e.g. for video frames showing nobody.
    """
    if on_no_face not in ON_NO_FACE:
        raise FaceInputError(f"on_no_face: {on_no_face!r} is not one of {ON_NO_FACE}.")
    rgb = to_rgb_uint8(image, name)
    faces = analyzer.detect(rgb, sizes=detection_sizes, embed=identity_embeddings is not None, name=name)
    if not faces:
        message = f"{name}: no face found (tried detection sizes {list(detection_sizes)}). {ALIGNED_MODE_HINT}"
        if on_no_face == "error":
            raise NoFaceError(message)
        logger.warning("%s Skipped.", message)
        photo = align_photo(rgb, [], face_size=face_size, name=name)
        photo.skipped = True
        return photo
    if identity_embeddings is None:
        return align_photo(rgb, faces, None, face_size, name)
    matches = match_faces(np.stack([face.embedding for face in faces]), identity_embeddings, match_threshold,
                          one_face_per_identity)
    logger.info("%s: %s", name, matches.summary())
    photo = align_photo(rgb, faces, matches.identity, face_size, name)
    photo.similarity = matches.similarity
    return photo


def paste_restored(photo: FacesInPhoto, restored: torch.Tensor, restored_faces: list[int] | None = None,
                   upscale: float = 1.0, upscale_mode: str = "bicubic") -> PhotoRestoration:
    """The photo (upsampled by ``upscale``, ``upscale_mode``: bicubic, bilinear, lanczos, nearest) with the
    restored crops of ``restored_faces`` (default: all; ``restored`` holds one crop each, in that order)
    pasted back; the other faces are kept as they were."""
    chosen = list(range(len(photo.faces))) if restored_faces is None else list(restored_faces)
    if restored.shape[0] != len(chosen):
        raise FaceInputError(f"{restored.shape[0]} restored crops for {len(chosen)} faces; give one per face.")
    crops = photo.crops.clone()
    if chosen:
        crops[chosen] = restored.detach().float().cpu().clamp(0, 1)
    canvas = upscale_image(photo.image, upscale, upscale_mode)
    masks = np.zeros((len(photo.faces),) + canvas.shape[:2], np.float32)
    pasted = dict(zip(chosen, tensor_to_rgb(crops[chosen]) if chosen else []))
    for face in sorted(chosen, key=lambda f: photo.faces[f].size):  # larger faces end on top where faces overlap
        paste_face(canvas, pasted[face], photo.matrices[face], upscale, out=masks[face])
    return PhotoRestoration(image=canvas, masks=masks, aligned=photo.crops, restored=crops, faces=photo.faces,
                            identity_index=photo.identity_index,
                            restored_faces=[face in pasted for face in range(len(photo.faces))],
                            skipped=photo.skipped)


def restore_in_photo(photo: FacesInPhoto, restore_fn: RestoreFn, identity_scale: float = 1.0,
                     unmatched: str = "restore_without_identity", upscale: float = 1.0,
                     upscale_mode: str = "bicubic") -> PhotoRestoration:
    """Restore the faces of one aligned photo in one ``restore_fn`` call and paste them back."""
    chosen = photo.to_restore(unmatched)
    restored = photo.crops[:0]
    if chosen:
        restored = _call_restorer(restore_fn, photo.crops[chosen], [photo.identity_index[f] for f in chosen],
                                  identity_scale).cpu()
    return paste_restored(photo, restored, chosen, upscale, upscale_mode)


def restore_photo(image, faces: list[DetectedFace], restore_fn: RestoreFn,
                  identity_index: list[int | None] | None = None, identity_scale: float = 1.0,
                  unmatched: str = "restore_without_identity", upscale: float = 1.0,
                  upscale_mode: str = "bicubic", face_size: int = FACE_SIZE) -> PhotoRestoration:
    """Align ``faces`` (detected in ``image``), restore them in one ``restore_fn`` call, paste back.

    ``identity_index``: per face, an identity index or None (default: identity 0 for every face).
    ``unmatched``: faces with None are restored with identity scale 0 ('restore_without_identity')
    or left as they are ('keep_original').
    """
    photo = align_photo(image, faces, identity_index, face_size)
    return restore_in_photo(photo, restore_fn, identity_scale, unmatched, upscale, upscale_mode)


def restore_faces_in_photo(analyzer: FaceAnalyzer, image, restore_fn: RestoreFn, identity_embeddings=None,
                           match_threshold: float = MATCH_SIMILARITY, one_face_per_identity: bool = True,
                           unmatched: str = "restore_without_identity", on_no_face: str = "error",
                           identity_scale: float = 1.0, upscale: float = 1.0, upscale_mode: str = "bicubic",
                           detection_sizes: tuple[int, ...] = DETECTION_SIZES, name: str = "photo") -> PhotoRestoration:
    """Detect, match, restore and paste back every face of one photo (see :func:`detect_and_align`)."""
    check_unmatched(unmatched)
    photo = detect_and_align(analyzer, image, identity_embeddings, match_threshold, one_face_per_identity,
                             on_no_face, detection_sizes, name=name)
    return restore_in_photo(photo, restore_fn, identity_scale, unmatched, upscale, upscale_mode)


def prepare_aligned(images, face_size: int = FACE_SIZE) -> torch.Tensor:
    """The paper's setting: each image already is an FFHQ-aligned face crop, so nothing is detected.

    Crops of another size are resized (bicubic) to ``face_size``. Returns (B,3,S,S) float in [0,1].
    """
    crops = []
    for number, image in enumerate(as_image_list(images, "aligned faces")):
        rgb = to_rgb_uint8(image, f"aligned face {number}")
        height, width = rgb.shape[:2]
        if abs(height - width) > 1:
            raise FaceInputError(f"aligned face {number}: {width}x{height} is not square; aligned mode expects "
                                 "FFHQ-aligned face crops. Use photo mode to detect faces in a photo.")
        if (height, width) != (face_size, face_size):
            rgb = cv2.resize(rgb, (face_size, face_size), interpolation=cv2.INTER_CUBIC)
        crops.append(rgb)
    return rgb_to_tensor(crops)


def restore_aligned(images, restore_fn: RestoreFn, identity_index: list[int | None] | None = None,
                    identity_scale: float = 1.0, face_size: int = FACE_SIZE) -> torch.Tensor:
    """Restore aligned face crops (see :func:`prepare_aligned`) in one ``restore_fn`` call."""
    crops = prepare_aligned(images, face_size)
    identity_index = [0] * len(crops) if identity_index is None else list(identity_index)
    if len(identity_index) != len(crops):
        raise FaceInputError(f"identity_index: {len(identity_index)} entries for {len(crops)} aligned faces; "
                             "give one per face.")
    return _call_restorer(restore_fn, crops, identity_index, identity_scale)


def _call_restorer(restore_fn: RestoreFn, aligned: torch.Tensor, identity_index: list[int | None],
                   identity_scale: float) -> torch.Tensor:
    """``restore_fn`` on a batch (scale 0 for faces without an identity), its output checked and
    clamped to [0, 1] (float, on the device the restorer returned it on)."""
    scales = torch.tensor([identity_scale if index is not None else 0.0 for index in identity_index])
    output = restore_fn(aligned, scales, identity_index)
    expected = tuple(aligned.shape)
    if not isinstance(output, torch.Tensor) or tuple(output.shape) != expected:
        got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise FaceInputError(f"restore_fn returned {got} for {len(aligned)} faces; expected a tensor {expected} "
                             "(B,3,S,S) float RGB in [0, 1], one crop per input crop.")
    return output.detach().float().clamp(0, 1)
