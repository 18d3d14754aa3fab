"""Is the data loader fast enough that the GPU never waits? Samples/s per loader worker vs the GPU.

    python bench/bench_dataloader.py [--stage content|align] [--data FOLDER] [--workers 1,2,4]

Measures one worker in-process (one core, as a DataLoader worker runs: OpenCV and torch
single-threaded), then real spawned DataLoader workers, on 512 px faces with the default Eq. 7
degradation. Stage ``align`` also reads two ID feature rows per sample from a memory-mapped identity
cache with real CLIP ViT-H shapes (random values: only the I/O matters here).

GPU side (an assumption, no GPU was available when this was written): SD1.5 UNet + content
ControlNet training at 512 px costs about 4.5 TFLOP per sample in the content stage (frozen UNet
forward + input-gradient backward, ControlNet forward + backward, gradient-checkpointing recompute,
VAE encoder); at 40% of an H100's ~990 dense fp16 TFLOPS that is ~90 samples/s, so 64 samples/s
(8 steps/s at batch 8) is used as a generous per-GPU upper bound. Stage align runs both ID
references through the model, so it needs half as many samples/s. Override with --gpu-samples-per-second.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from ridfr_core.data.datasets import (AlignDataset, FaceDataset, IdentityGroup, NoiseSpec, StepBatchSampler, list_images,
                             make_loader)
from ridfr_core.data.degrade import DegradationConfig
from ridfr_core.identity.cache import IdentityCache

SHARED_FACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces" / "celebref-mini"
NOISE = NoiseSpec(latent_channels=4, latent_size=64, num_train_timesteps=1000)
CLIP_TOKENS, CLIP_WIDTH = 257, 1280


def face_groups(data: Path | None, scratch: Path, resolution: int) -> tuple[Path, list[IdentityGroup]]:
    """Identity folders from --data (or the shared CelebRef-HQ sample); synthetic photos if neither exists."""
    if data is None and SHARED_FACES.is_dir():
        return SHARED_FACES, [IdentityGroup(p.name, sorted((p / "refs").glob("*.jpg"))) for p in sorted(SHARED_FACES.iterdir())]
    if data is not None:
        folders = sorted(p for p in data.iterdir() if p.is_dir())
        return data, [IdentityGroup(p.name, list_images(p, recursive=False)) for p in folders]
    rng = np.random.default_rng(0)
    groups = []
    for person in range(8):
        folder = scratch / "synthetic" / f"{person:03d}"
        folder.mkdir(parents=True)
        for photo in range(6):
            noise = cv2.GaussianBlur(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8), (0, 0), 3)
            Image.fromarray(noise).save(folder / f"{photo}.jpg", quality=92)
        groups.append(IdentityGroup(folder.name, sorted(folder.glob("*.jpg"))))
    return scratch / "synthetic", groups


class RandomFeatures:
    """Stands in for ArcFace + CLIP: the cache's shapes and dtypes with random values."""

    description = {"arcface": "random", "clip_vision": "random"}

    def __call__(self, images):
        return torch.randn(len(images), 512), torch.randn(len(images), CLIP_TOKENS, CLIP_WIDTH)


def in_process_rate(dataset, count: int) -> float:
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    dataset[0]
    start = time.perf_counter()
    for position in range(1, count + 1):
        dataset[position]
    return count / (time.perf_counter() - start)


def loader_rate(dataset, workers: int, batch_size: int, batches: int) -> float:
    """Samples/s of spawned workers after start-up (the first batch pays for spawning)."""
    sampler = StepBatchSampler(batch_size, 1, 1, 0, 0, batches + 1)
    iterator = iter(make_loader(dataset, sampler, workers, pin_memory=False))
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("content", "align"), default="align")
    parser.add_argument("--data", type=Path, help="identity folders (default: the shared CelebRef-HQ sample)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--samples", type=int, default=40, help="samples timed in-process")
    parser.add_argument("--workers", default="1,2", help="DataLoader worker counts to time")
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--gpu-samples-per-second", type=float, default=None,
                        help="GPU training rate to keep fed (default: 64 content / 32 align, see the docstring)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root, groups = face_groups(args.data, Path(scratch), args.resolution)
        paths = [p for g in groups for p in g.paths]
        if args.stage == "content":
            dataset = FaceDataset(paths, args.resolution, DegradationConfig(), NOISE, seed=0)
        else:
            cache = IdentityCache(Path(scratch) / "cache")
            cache.build(root, paths, RandomFeatures(), variants=4, min_size=64, max_size=512, seed=0)
            dataset = AlignDataset(groups, IdentityCache(cache.folder), root, args.resolution, DegradationConfig(),
                                   NOISE, seed=0)
        gpu_rate = args.gpu_samples_per_second or (64.0 if args.stage == "content" else 32.0)
        print(f"stage {args.stage}: {len(paths)} photos from {root}, {args.resolution} px, default degradation")
        single = in_process_rate(dataset, args.samples)
        print(f"one worker, in-process: {single:6.1f} samples/s ({1e3 / single:.1f} ms/sample)")
        for workers in (int(w) for w in args.workers.split(",")):
            rate = loader_rate(dataset, workers, args.batch_size, args.batches)
            print(f"DataLoader, {workers} spawned worker(s): {rate:6.1f} samples/s ({rate / workers:6.1f} per worker)")
        needed = math.ceil(gpu_rate / single)
        print(f"GPU estimate {gpu_rate:.0f} samples/s per GPU -> {needed} worker(s) per GPU keep it fed "
              f"(num_workers default 4); this machine has {os.cpu_count()} core(s).")


if __name__ == "__main__":
    main()
