"""Throughput of an archive run (``python -m ridfr_core.restore --lq FOLDER``) and where its time goes.

    python bench/bench_archive.py                   # tiny models on CPU, 16 photos of one face each
    python bench/bench_archive.py --photos 64 --batch-sizes 1 8 16 --steps 2

Tiny models with the real file layouts (tests/tiny_models.py) and the scripted face detector of the
tests (one face per photo), so nothing is downloaded: the figures show the archive machinery and the
batching (faces of several photos per sampler call), not SD1.5's speed. For each batch size it prints
files/s, faces/s and the split into I/O (read + write), detection (with matching and alignment) and
sampling; "other" is pasting back, the manifest and the progress bars. Bad inputs (corrupt, empty,
non-image, no face, huge) are covered by tests/test_archive_cli.py.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny-model builders of the tests

from onnx_fakes import (SCRIPTED_ANCHOR, SCRIPTED_BBOX, build_projection_arcface, build_scripted_scrfd,  # noqa: E402
                        scripted_kps_offsets)
from tiny_models import build_tiny_models  # noqa: E402

from ridfr_core.archive.inputs import collect_inputs  # noqa: E402
from ridfr_core.archive.manifest import manifest_path  # noqa: E402
from ridfr_core.archive.run import reference_people, restore_with_models  # noqa: E402
from ridfr_core.restore import parse_args, resolve_models, restorer_from_args  # noqa: E402


def models_folder(root: Path) -> tuple[Path, Path]:
    """(models folder laid out like ComfyUI's, tiny architecture configs)."""
    tiny = build_tiny_models(root / "tiny")
    pack = root / "insightface" / "models" / "buffalo_l"
    build_scripted_scrfd(pack / "det_10g.onnx", SCRIPTED_ANCHOR, SCRIPTED_BBOX, scripted_kps_offsets())
    build_projection_arcface(pack / "w600k_r50.onnx")
    models = root / "models"
    for folder, path in (("checkpoints", tiny.checkpoint), ("ipadapter", tiny.adapter_v2),
                         ("ridfr", tiny.content), ("clip_vision", tiny.clip_vision)):
        (models / folder).mkdir(parents=True)
        (models / folder / path.name).symlink_to(path)
    (models / "insightface").symlink_to(root / "insightface")
    return models, tiny.configs


def photo(seed: int, size: int) -> Image.Image:
    small = np.random.default_rng(seed).integers(40, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BICUBIC)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=16)
    parser.add_argument("--size", type=int, default=640, help="photo side in pixels")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    options = parser.parse_args()
    torch.set_flush_denormal(True)  # random tiny weights give denormals, 10-100x slower on CPU
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        models, configs = models_folder(root)
        for number in range(options.photos):
            path = root / "album" / f"{number // 8:02d}" / f"photo{number:03d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            photo(number, options.size).save(path, quality=90)
        photo(0, options.size).save(root / "reference.png")
        restorer = None

        def make_restorer(paths):
            nonlocal restorer
            restorer = restorer or restorer_from_args(args, paths, config_dir=configs)
            return restorer

        print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; "
              f"{options.photos} photos {options.size}px, one face each, tiny models, {options.steps} steps, CPU")
        print("| batch | files/s | faces/s | I/O | detection | sampling | other | wall |")
        print("|---|---|---|---|---|---|---|---|")
        for run, batch in enumerate([options.batch_sizes[0], *options.batch_sizes]):  # run 0 warms up
            out = root / f"out{run}"
            args = parse_args(["--lq", str(root / "album"), "--out", str(out), "--id", str(root / "reference.png"),
                               "--models", str(models), "--steps", str(options.steps),
                               "--device", "cpu", "--batch-size", str(batch)])
            paths = resolve_models(models, {}, need_insightface=True)
            items = collect_inputs(args.lq, exclude=out)
            make_restorer(paths)
            start = time.perf_counter()
            timings = restore_with_models(args, paths, make_restorer, reference_people(args), items, out,
                                          manifest_path(out), 0)
            wall = time.perf_counter() - start
            if run == 0:
                continue
            other = wall - timings.io - timings.detection - timings.sampling
            print(f"| {batch} | {len(items) / wall:.2f} | {timings.faces / wall:.2f} | {timings.io:.1f} s "
                  f"({timings.io / wall:.0%}) | {timings.detection:.1f} s ({timings.detection / wall:.0%}) | "
                  f"{timings.sampling:.1f} s ({timings.sampling / wall:.0%}) | {other:.1f} s ({other / wall:.0%}) | "
                  f"{wall:.1f} s |")


if __name__ == "__main__":
    main()
