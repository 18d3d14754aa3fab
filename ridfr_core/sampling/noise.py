"""Seeded noise, the same on every device and independent of the batch a face is sampled in.

Face ``i`` of a photo (track ``i`` of a video, sample ``i`` of best-of-N) has the seed ``seed + i``, so any
face can be sampled again alone with the seed reported for it. Each face seed makes three independent
streams: the start noise from ``Generator(face seed)`` (what ComfyUI draws for a one-face batch with that
seed), and the VAE posterior's eps and the step noise from generators whose seeds are hashed from (face
seed, stream) with NumPy's ``SeedSequence``. A plain ``face seed + 1`` would make face i's step noise face
i+1's start noise; hashed seeds share no draws with another face's streams.
"""

from __future__ import annotations

import numpy as np
import torch

SEED_RANGE = 2 ** 64  # any int is a seed, wrapped to 64 bits as the nodes' seed widget does
STREAMS = {"posterior": 1, "steps": 2}  # the hashed streams of a face seed (the start noise is the seed's own)


def face_seed(seed: int, index: int) -> int:
    """The seed of face ``index`` of a photo (or track ``index`` of a video, or sample ``index`` of best-of-N):
    ``seed + index``, however the faces are batched."""
    return (seed + index) % SEED_RANGE


def face_seeds(seed: int, count: int) -> list[int]:
    return [face_seed(seed, i) for i in range(count)]


def stream_seed(seed: int, stream: str) -> int:
    """The 64-bit seed of a face seed's ``stream`` ("posterior" or "steps"): a SeedSequence hash of both."""
    words = np.random.SeedSequence([seed % SEED_RANGE, STREAMS[stream]]).generate_state(2, np.uint32)
    return int(words[0]) | int(words[1]) << 32


def generators(seeds: list[int], stream: str) -> list[torch.Generator]:
    """One CPU generator per face seed for ``stream``."""
    return [torch.Generator().manual_seed(stream_seed(seed, stream)) for seed in seeds]


def draw(shape: tuple[int, ...], streams: list[torch.Generator]) -> torch.Tensor:
    """(len(streams), *shape[1:]) noise, face i's from its own generator."""
    return torch.stack([torch.randn(shape[1:], generator=generator) for generator in streams])


def seeded_noise(shape: tuple[int, ...], seed: int | list[int], device, dtype) -> torch.Tensor:
    """Start noise drawn on the CPU from a local generator (one seed per face, or :func:`face_seeds`), so results
    are the same on every device and never touch the global RNG."""
    seeds = seed if isinstance(seed, list) else face_seeds(seed, shape[0])
    if len(seeds) != shape[0]:
        raise ValueError(f"seed: {len(seeds)} seeds for {shape[0]} faces; give one int or one seed per face.")
    noise = [torch.randn(shape[1:], generator=torch.Generator().manual_seed(s % SEED_RANGE)) for s in seeds]
    return torch.stack(noise).to(device, dtype)


class RunNoise:
    """The random draws of one restoration, three streams per face seed (see the module): the start noise, the
    VAE posterior's eps (backends that sample it) and each step's noise, in the order RestorerID draws them."""

    def __init__(self, seeds: list[int]):
        self.seeds = [s % SEED_RANGE for s in seeds]
        self.posterior_streams = generators(self.seeds, "posterior")
        self.steps = generators(self.seeds, "steps")

    def start(self, shape: tuple[int, ...]) -> torch.Tensor:
        return seeded_noise(shape, self.seeds, "cpu", torch.float32)

    def posterior(self, shape: tuple[int, ...]) -> torch.Tensor:
        return draw(shape, self.posterior_streams)

    def next(self, shape: tuple[int, ...]) -> torch.Tensor:
        return draw(shape, self.steps)
