"""Checks of ``python -m ridfr_core.restore``'s options that cost nothing, run before any model loads.

Each raises ValueError naming the option, what was wrong and how to fix it, so a typo in ``--out``
or ``--steps`` is not found after minutes of loading and sampling, and a result never replaces
the photo it was made from.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .pipeline import MAX_STEPS
from .backends.restorerid.identity_scale import parse_identity_scale

MAX_UPSCALE = 8.0
DEVICES = ("auto", "cuda", "cpu")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # and "auto"
OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")  # formats that keep the ICC profile and EXIF


def check_finite(option: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{option}: {value} is not a finite number; give e.g. {option} 1.0.")


def check_steps(steps: int) -> None:
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"--steps: {steps} is outside 1..{MAX_STEPS}; RIDFR uses 20, RestorerID 50.")


def check_upscale(upscale: float) -> None:
    check_finite("--upscale", upscale)
    if not 0 < upscale <= MAX_UPSCALE:
        raise ValueError(f"--upscale: {upscale} is outside (0, {MAX_UPSCALE:g}]; 1 keeps the photo's size.")


def check_content_scale(scale: float) -> None:
    check_finite("--content-scale", scale)
    if scale < 0:
        raise ValueError(f"--content-scale: {scale} is negative; give a number >= 0 (1 is the trained strength, 0 "
                         "leaves the LQ face out), as ContentCondition's strength.")


def check_guidance(guidance: float) -> None:
    """The sampler node's range starts at 1 too: below it the null identity outweighs the references."""
    check_finite("--guidance", guidance)
    if guidance < 1:
        raise ValueError(f"--guidance: {guidance} is below 1; give 1 (no guidance, RIDFR's default) or more "
                         "(RestorerID uses 4). To weaken the identity, lower --identity-scale instead.")


def check_quality(quality: int) -> None:
    if not 1 <= quality <= 100:
        raise ValueError(f"--quality: {quality} is outside 1..100 (JPEG/WebP quality; PNG is always lossless).")


def check_device(device: str) -> None:
    if device not in DEVICES:
        raise ValueError(f"--device: {device!r} is not one of {', '.join(DEVICES)}.")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device cuda: torch {torch.__version__} sees no CUDA GPU; install a CUDA build of torch "
                         "(see README), or use --device auto or cpu.")


def check_dtype(dtype: str) -> None:
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"--dtype: {dtype!r} is not one of auto, {', '.join(DTYPES)}.")


def same_file(a: Path, b: Path) -> bool:
    """The same file after symlinks and ``..`` are resolved (or a hard link to it); a link that loops is no file."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    return a.exists() and b.exists() and os.path.samefile(a, b)


def check_output(out: str, inputs: list[str]) -> None:
    """A writable image path with a known extension that is none of the input files."""
    path = Path(out)
    if path.is_dir():
        raise ValueError(f"--out {out}: is a folder; give a file name, e.g. {path / 'restored.png'}.")
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"--out {out}: unsupported extension {path.suffix!r}; end it with .png (lossless) or "
                         ".jpg/.webp.")
    for source in inputs:
        if same_file(path, Path(source)):
            raise ValueError(f"--out {out}: is the input {source}; writing there would destroy the original. "
                             "Give another file name.")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the folders still to create are made inside the nearest existing one
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise ValueError(f"--out {out}: cannot write into {folder} (not a writable folder); give a path in a "
                         "folder you can write to.")


def check_restore_options(args, archive: bool = False) -> None:
    """Every cheap check of the parsed CLI arguments. ``archive``: --out is a folder (checked by
    :mod:`ridfr_core.archive.run` against every input)."""
    references = list(args.references) + [path for group in args.person for path in group.split(",") if path]
    if not archive:
        check_output(args.out, [args.lq, *references])
    check_quality(args.quality)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: {args.batch_size} is not a number of faces; give 1 or more (default 8).")
    if args.steps is not None:  # None: the backend's default
        check_steps(args.steps)
    check_upscale(args.upscale)
    check_device(args.device)
    check_dtype(args.dtype)
    if args.identity_scale is not None:
        parse_identity_scale(args.identity_scale)
    check_content_scale(args.content_scale)
    if args.guidance is not None:  # None: the backend's
        check_guidance(args.guidance)
