"""Image files in and out, shared by the CLI, the trainer and the evaluation (no torch import).

PIL decodes: OpenCV returns a grey-padded image for a truncated JPEG, PIL raises, and a broken
file must be reported, not scored or trained on. Every reader sees the same pixels: EXIF
orientation applied (cameras store photos sideways) and 16-bit PNGs scaled to 8 bits.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .atomic import atomic_path

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
DEFAULT_QUALITY = 95
MAX_JPEG_EXIF = 65_000  # one JPEG APP1 segment holds at most 65,533 bytes
EXIF_ORIENTATION = 0x0112
# PIL errors for a file that is not a usable image; DecompressionBombError is a plain Exception.
UNREADABLE = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class ImageReadError(ValueError):
    """A file that is missing, truncated or not an image; the message names it."""


def read_rgb(path: Path | str, what: str = "image") -> np.ndarray:
    """HWC uint8 RGB (a writable array), upright. ``what`` names the option or role of the file in the error message."""
    try:
        with Image.open(path) as image:
            sixteen_bit_colour = image.format == "PNG" and image.tile and image.tile[0].args in ("RGB;16B", "RGBA;16B")
            image.load()  # a truncated file raises here
            rgb = png16_rgb(path) if sixteen_bit_colour else to_rgb8(image)
            exif = image.getexif()
    except UNREADABLE as error:
        raise ImageReadError(f"{what}: cannot read image {path} ({type(error).__name__}: {error}); give a "
                             "PNG, JPEG or WebP file.") from error
    return upright(rgb, exif)


def upright(rgb: np.ndarray, exif: Image.Exif) -> np.ndarray:
    """The pixels turned as the EXIF orientation says (PIL's ``exif_transpose``, also for 16-bit PNGs, whose
    pixels OpenCV decodes)."""
    if exif.get(EXIF_ORIENTATION, 1) == 1:
        return rgb
    picture = Image.fromarray(rgb)
    picture.info["exif"] = exif.tobytes()
    return np.array(ImageOps.exif_transpose(picture))


def scale_16_to_8(values: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255, rounded (PIL's convert("RGB") clips a 16-bit grey image to white instead)."""
    return np.clip(np.round(values.astype(np.float32) / 257.0), 0, 255).astype(np.uint8)


def to_rgb8(image: Image.Image) -> np.ndarray:
    if image.mode.startswith("I;16") or image.mode == "I":  # 16-bit greyscale PNG
        grey = scale_16_to_8(np.asarray(image))
        return np.repeat(grey[..., None], 3, axis=-1)
    return np.array(image.convert("RGB"))


def png16_rgb(path: Path | str) -> np.ndarray:
    """A 16-bit colour PNG rounded to 8 bits (PIL keeps only the high byte, which truncates)."""
    data = cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_UNCHANGED)
    if data is None or data.dtype != np.uint16 or data.ndim != 3:
        raise ValueError("OpenCV could not decode this 16-bit PNG")
    return scale_16_to_8(data[..., 2::-1])  # BGR(A) -> RGB


def image_size(path: Path | str) -> tuple[int, int]:
    """(width, height) from the header, upright (EXIF orientation 5-8 swaps them)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            turned = image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
    except UNREADABLE as error:
        raise ImageReadError(f"cannot read image {path} ({type(error).__name__}: {error}).") from error
    return (height, width) if turned else (width, height)


def read_metadata(path: Path | str) -> dict:
    """ICC profile and EXIF of an image, to write back with the result. The orientation is set to 1
    because :func:`read_rgb` has already turned the pixels upright."""
    try:
        with Image.open(path) as image:
            exif = image.getexif()
            icc = image.info.get("icc_profile")
    except UNREADABLE:
        return {}
    metadata = {"icc_profile": icc} if icc else {}
    if exif:
        if EXIF_ORIENTATION in exif:
            exif[EXIF_ORIENTATION] = 1
        metadata["exif"] = exif.tobytes()
    return metadata


def write_rgb(path: Path | str, image: np.ndarray, quality: int = DEFAULT_QUALITY, metadata: dict | None = None) -> None:
    """Atomic. PNG is lossless; JPEG and WebP are written at ``quality`` (JPEG without chroma
    subsampling). ``metadata`` (from :func:`read_metadata`) carries the source's ICC profile and EXIF over."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    options = dict(metadata or {})
    if path.suffix.lower() in (".jpg", ".jpeg", ".webp"):
        options.update(quality=quality, subsampling=0)
    if path.suffix.lower() in (".jpg", ".jpeg") and len(options.get("exif", b"")) > MAX_JPEG_EXIF:
        logger.warning("%s: the EXIF (%d bytes) does not fit in a JPEG and is left out.", path, len(options.pop("exif")))
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        raise ValueError(f"unknown image extension {path.suffix!r}")
    with atomic_path(path) as tmp:  # a failed write leaves the old file as it was
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(tmp, format=image_format, **options)


def list_images(folder: Path | str, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (and below, with ``recursive``), sorted by path."""
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in Path(folder).glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
