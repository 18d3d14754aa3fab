"""Training steps/s on one process vs two (``accelerate launch --multi_gpu --num_processes 2``, gloo on CPU), the
same total batch, side by side (README "Make alignment-trained weights").

    python bench/bench_train_processes.py                         # content stage, tiny models, 128 px, batch 8
    python bench/bench_train_processes.py --size 256 --steps 30 --repeats 3

Tiny models with the real file layouts (tests/tiny_models.py) and random smooth 'faces', so nothing is
downloaded: the figures show what the second process adds (data-parallel split of the batch, one gradient
all-reduce and one loss gather per step), not SD1.5's speed. Three set-ups: one process on every core, one
process on half of them, and two processes on half each (the ideal is 2x the second). Steps/s come from the wall
times of the run's TensorBoard loss events, after ``--warmup`` steps, so start-up, model loading and the final
checkpoint are not counted. The set-ups alternate in each repeat and the median is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny-model builders of the tests

from tiny_models import build_tiny_models  # noqa: E402


def faces(folder: Path, count: int, size: int) -> Path:
    folder.mkdir(parents=True)
    for number in range(count):
        small = np.random.default_rng(number).integers(40, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(folder / f"face{number:03d}.png")
    return folder


def steps_per_second(out: Path, warmup: int) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs" / "content"))
    events.Reload()
    times = {event.step: event.wall_time for event in events.Scalars("train/loss")}
    first, last = warmup, max(times)
    return (last - first) / (times[last] - times[first])


def train(processes: int, threads: int, args: list[str], out: Path) -> None:
    if processes == 1:
        command = [sys.executable, "-m", "ridfr_core.train"]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--num_cpu_threads_per_process", str(threads), "-m", "ridfr_core.train"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run([*command, *args, "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{processes} process(es) failed:\n{result.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="training resolution")
    parser.add_argument("--batch-size", type=int, default=8, help="total batch per step")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the rate")
    parser.add_argument("--repeats", type=int, default=2)
    options = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        tiny = build_tiny_models(root / "tiny")
        settings = {"resolution": options.size, "min_image_size": 32, "batch_size": options.batch_size,
                    "mixed_precision": "no", "num_workers": 0, "validation_count": 0, "log_every": 1,
                    "checkpoint_every": 0}
        args = ["--stage", "content", "--data", str(faces(root / "faces", 32, options.size)), "--base",
                str(tiny.checkpoint), "--config-dir", str(tiny.configs), "--cache-dir", str(root / "prompts"),
                "--init-content", str(tiny.content), "--max-steps", str(options.steps)]
        args += [part for key, value in settings.items() for part in ("--set", f"{key}={json.dumps(value)}")]
        half = max(cores // 2, 1)
        setups = [(1, cores), (1, half), (2, half)]  # (processes, threads each)
        rates: dict[tuple[int, int], list[float]] = {setup: [] for setup in setups}
        for repeat in range(options.repeats):
            for processes, threads in setups:
                out = root / f"run-{processes}x{threads}-{repeat}"
                train(processes, threads, args, out)
                rates[processes, threads].append(steps_per_second(out, options.warmup))
        median = {setup: statistics.median(values) for setup, values in rates.items()}
        print(f"machine: {platform.processor() or platform.machine()}, {cores} cores, load average "
              f"{os.getloadavg()[0]:.1f}; content stage, tiny models, {options.size} px, batch {options.batch_size} "
              f"in total, {options.steps} steps ({options.warmup} warm-up), median of {options.repeats}")
        print("| processes | threads each | steps/s | samples/s | runs (steps/s) |")
        print("|---|---|---|---|---|")
        for (processes, threads), rate in median.items():
            runs = ", ".join(f"{value:.2f}" for value in rates[processes, threads])
            print(f"| {processes} | {threads} | {rate:.2f} | {rate * options.batch_size:.1f} | {runs} |")
        two = median[2, half]
        print(f"2 processes / 1 process on every core: {two / median[1, cores]:.2f}x; "
              f"2 processes / 1 process on {half} core(s): {two / median[1, half]:.2f}x")


if __name__ == "__main__":
    main()
