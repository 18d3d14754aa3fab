"""Seeded noise, the same on every device and independent of the batch a face is sampled in."""

from __future__ import annotations

import torch

SEED_RANGE = 2 ** 64  # any int is a seed, wrapped to 64 bits as the nodes' seed widget does


def face_seed(seed: int, index: int) -> int:
    """The seed of face ``index`` of a photo (or track ``index`` of a video, or sample ``index`` of best-of-N):
    ``seed + index``, however the faces are batched."""
    return (seed + index) % SEED_RANGE


def face_seeds(seed: int, count: int) -> list[int]:
    return [face_seed(seed, i) for i in range(count)]


def seeded_noise(shape: tuple[int, ...], seed: int | list[int], device, dtype) -> torch.Tensor:
    """Noise drawn on the CPU from a local generator (one seed per face, or :func:`face_seeds`), so results are
    the same on every device and never touch the global RNG."""
    seeds = seed if isinstance(seed, list) else face_seeds(seed, shape[0])
    if len(seeds) != shape[0]:
        raise ValueError(f"seed: {len(seeds)} seeds for {shape[0]} faces; give one int or one seed per face.")
    noise = [torch.randn(shape[1:], generator=torch.Generator().manual_seed(s % SEED_RANGE)) for s in seeds]
    return torch.stack(noise).to(device, dtype)
