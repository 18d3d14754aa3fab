"""Image files in and out, shared by the CLI, the trainer and the evaluation (no torch import).

PIL decodes: OpenCV returns a grey-padded image for a truncated JPEG, PIL raises, and a broken
file must be reported, not scored or trained on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


class ImageReadError(ValueError):
    """A file that is missing, truncated or not an image; the message names it."""


def read_rgb(path: Path | str, what: str = "image") -> np.ndarray:
    """HWC uint8 RGB. ``what`` names the option or role of the file in the error message."""
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise ImageReadError(f"{what}: cannot read image {path} ({type(error).__name__}: {error}); give a "
                             "PNG, JPEG or WebP file.") from error


def write_rgb(path: Path | str, image: np.ndarray) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(path)


def list_images(folder: Path | str, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (and below, with ``recursive``), sorted by path."""
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in Path(folder).glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
