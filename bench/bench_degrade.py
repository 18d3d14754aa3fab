"""Images/s per CPU core of ridfr_core.data.degrade at 512x512 (one thread, as a data-loader worker runs).

    python bench/bench_degrade.py [--size 512] [--count 200]
"""

import argparse
import time

import cv2
import numpy as np

from ridfr_core.data.degrade import DegradationConfig, degrade, downsample_reference


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--count", type=int, default=200)
    args = parser.parse_args()
    cv2.setNumThreads(1)  # a DataLoader worker should not fan out; measure what one core does
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    image = cv2.GaussianBlur(image, (0, 0), 2)  # photo-like spectrum so JPEG cost is realistic
    config = DegradationConfig()
    for name, step in (
        ("degrade (Eq. 7)", lambda: degrade(image, rng, config)),
        ("downsample_reference", lambda: downsample_reference(image, rng)),
    ):
        step()
        start = time.perf_counter()
        for _ in range(args.count):
            step()
        seconds = (time.perf_counter() - start) / args.count
        print(f"{name:22s} {args.size}x{args.size}: {seconds * 1e3:6.2f} ms/image, {1 / seconds:7.1f} images/s per core")


if __name__ == "__main__":
    main()
