"""One image convention for the whole face front-end: numpy HWC uint8 RGB.

Users hand us whatever their loader produced: grayscale, RGBA PNGs, 16-bit TIFFs, float tensors from
ComfyUI. :func:`to_rgb_uint8` turns each of these into HWC uint8 RGB or says why it cannot.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import FaceInputError

MIN_SIDE = 16
MAX_PIXELS = 16384 * 16384


def to_rgb_uint8(image, name: str = "image") -> np.ndarray:
    """HWC uint8 RGB copy-free where possible.

    Accepted: numpy or torch, (H,W) grayscale, (H,W,1), (H,W,3) RGB or (H,W,4) RGBA; uint8, uint16
    (16-bit, scaled by 1/257), float in [0,1] (clipped; ComfyUI's IMAGE convention), bool. RGBA is
    composited over white, so transparent backgrounds do not turn into black blobs the detector
    reads as hair. Channels-first (C,H,W) input is refused with a hint, since it is ambiguous with
    tiny HWC images. Sides under 16 px or more than 16384^2 pixels are refused.
    """
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.dtype in (torch.bfloat16, torch.float16):
            image = image.float()
        image = image.numpy()
    if not isinstance(image, np.ndarray):
        raise FaceInputError(f"{name}: expected a numpy array or torch tensor, got {type(image).__name__}.")
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3:
        raise FaceInputError(
            f"{name}: expected one HWC image, got shape {tuple(image.shape)}; pass batches image by image.")
    if image.shape[2] not in (1, 3, 4):
        if image.shape[0] in (1, 3, 4):
            raise FaceInputError(
                f"{name}: shape {tuple(image.shape)} looks channels-first; pass HWC, e.g. tensor.permute(1, 2, 0).")
        raise FaceInputError(f"{name}: {image.shape[2]} channels; expected 1 (gray), 3 (RGB) or 4 (RGBA).")
    height, width = image.shape[:2]
    if min(height, width) < MIN_SIDE:
        raise FaceInputError(f"{name}: {width}x{height} px is too small to hold a face (minimum side {MIN_SIDE} px).")
    if height * width > MAX_PIXELS:
        raise FaceInputError(
            f"{name}: {width}x{height} px is larger than 16384x16384; downscale it before face detection.")
    image = _to_unit_range_or_uint8(image, name)
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.shape[2] == 4:
        image = _composite_over_white(image)
    return np.ascontiguousarray(image)


def _to_unit_range_or_uint8(image: np.ndarray, name: str) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if image.dtype == np.bool_:
        return image.astype(np.uint8) * 255
    if np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            raise FaceInputError(f"{name}: contains NaN or infinite values.")
        return np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise FaceInputError(
        f"{name}: pixel type {image.dtype} is not supported; use uint8, uint16 or float in [0, 1].")


def _composite_over_white(rgba: np.ndarray) -> np.ndarray:
    alpha = rgba[:, :, 3:4].astype(np.float32) / 255.0
    rgb = rgba[:, :, :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
    return np.rint(rgb).astype(np.uint8)


def rgb_to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """List of HWC uint8 RGB images of one size -> (B,3,H,W) float in [0,1]."""
    stacked = np.stack(images).astype(np.float32) / 255.0
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()


def tensor_to_rgb(images: torch.Tensor) -> list[np.ndarray]:
    """(B,3,H,W) float in [0,1] -> list of HWC uint8 RGB images."""
    array = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [np.rint(a * 255.0).astype(np.uint8) for a in array]


def as_image_list(images, name: str = "images") -> list:
    """A list of single images from a list, a (B,H,W,C) batch, or one (H,W[,C]) image."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise FaceInputError(f"{name}: the list is empty.")
        return list(images)
    if isinstance(images, (np.ndarray, torch.Tensor)):
        if images.ndim == 4:
            if images.shape[0] == 0:
                raise FaceInputError(f"{name}: the batch is empty.")
            return [image for image in images]
        return [images]
    raise FaceInputError(f"{name}: expected an image, a batch or a list of images, got {type(images).__name__}.")
