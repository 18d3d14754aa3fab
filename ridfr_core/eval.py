"""Evaluate ID-specific face restoration the way the RIDFR paper does (Sec. 4), reproducibly.

    python -m ridfr_core.eval split   --celebref ROOT --out SPLIT_DIR [--num-test-ids 100 --seed 0]
    python -m ridfr_core.eval degrade --split SPLIT_DIR/split.json --out DATA_DIR [--seed 0]
    python -m ridfr_core.eval score   --restored DIR --gt DIR [--refs DIR --lq DIR] --out DIR
    python -m ridfr_core.eval run     (--data DATA_DIR | --celebref ROOT) --out DIR [--models DIR | --restorer mod:fn]
    python -m ridfr_core.eval compare --data DATA_DIR --content A --content B --models DIR --out DIR
    python -m ridfr_core.eval --restored DIR --gt DIR --out DIR      (same as "score")

Layout (what ``degrade`` writes and ``score`` reads), one *case* = one LQ face:
    gt/<case>.png, lq/<case>.png, refs/<case>/<ref>.<ext> (links to the references of that identity)
    restored/<case>.png              one restoration per case, or
    restored/<case>/<ref>.png        one per reference, which also gives Identity Variance.
``score`` writes per_case.csv, summary.csv, summary.json (with every skipped metric and why) and
grid.png (LQ | restored | GT | reference).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .constants import FACE_SIZE
from .data.degrade import DegradationConfig
from .eval_scores import DEFAULT_IQA, DEFAULT_RECOGNISERS, evaluate, run_evaluation
from .eval_split import build_split, degrade_split, write_split
from .io.images import image_size, list_images


# -------------------------------------------------------------------------------------- run

def load_restorer(spec: str) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Import ``module:function`` lazily; the function maps (lq, reference) uint8 RGB -> restored."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"--restorer {spec}: expected module:function, e.g. my_package.restore:restore_face.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"--restorer {spec}: cannot import {module_name} ({error}); give module:function for a callable "
            "restore(lq, reference) -> restored, or restore first and use the 'score' command."
        ) from error
    if not callable(getattr(module, function_name, None)):
        raise ValueError(f"--restorer {spec}: {module_name} has no callable {function_name!r}.")
    return getattr(module, function_name)


def check_face_size(data_dir: Path, size: int) -> None:
    """Every LQ face of ``data_dir`` is ``size`` x ``size``: checked from the file headers, before any
    restoration, since a restorer for another size fails (or is scored against the wrong size) at the end."""
    lq_paths = list_images(data_dir / "lq")
    if not lq_paths:
        raise ValueError(f"--data {data_dir}: no lq/ images; give a folder written by the 'degrade' command.")
    for path in lq_paths:
        if image_size(path) != (size, size):
            width, height = image_size(path)
            raise ValueError(f"--data {data_dir}: {path.name} is {width}x{height}, but --size is {size} (RIDFR restores "
                             f"{FACE_SIZE}x{FACE_SIZE} faces). Degrade again with --size {size}, or pass --size "
                             f"{width} with a restorer made for that size.")


# -------------------------------------------------------------------------------------- CLI

def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _add_score_options(parser: argparse.ArgumentParser):
    parser.add_argument("--recognisers", type=_names, default=list(DEFAULT_RECOGNISERS),
                        help="comma-separated: dlib, facenet, arcface (default: all; unusable ones are reported)")
    parser.add_argument("--arcface-model", help="insightface ArcFace .onnx or model folder (e.g. antelopev2); "
                        "not the buffalo_l model RIDFR is conditioned on")
    parser.add_argument("--iqa", type=_names, default=list(DEFAULT_IQA),
                        help="comma-separated pyiqa metrics: lpips, musiq, maniqa, clipiqa ('' for none)")
    parser.add_argument("--device", default="cpu", help="torch device for pyiqa metrics (and --preprocess)")
    parser.add_argument("--channel", choices=("y", "rgb"), default="y", help="PSNR/SSIM on luma (default) or RGB")
    parser.add_argument("--grid-rows", type=int, default=8)


def _add_degrade_options(parser: argparse.ArgumentParser, size_help: str = "face size in pixels"):
    parser.add_argument("--seed", type=int, default=0, help="degradation seed (each case derives its own)")
    parser.add_argument("--config", type=Path, help="JSON file with DegradationConfig options (default: built-in)")
    parser.add_argument("--size", type=int, default=FACE_SIZE, help=f"{size_help} (default {FACE_SIZE}, as RIDFR)")


def _add_split_options(parser: argparse.ArgumentParser):
    parser.add_argument("--num-test-ids", type=int, default=100)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--glob", default="*", help="images inside each identity folder (default '*')")
    parser.add_argument("--max-images-per-id", type=int, help="cap cases per identity (quick runs)")


def _degradation_config(path: Path | None) -> DegradationConfig:
    if path is None:
        return DegradationConfig()
    return DegradationConfig.from_dict(_read_json(path, "--config", "a JSON object of DegradationConfig options"))


def _read_json(path: Path, option: str, what: str):
    try:
        return json.loads(Path(path).read_text())
    except OSError as error:
        raise ValueError(f"{option} {path}: cannot read it ({error.strerror or error}); give {what}.") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"{option} {path}: not valid JSON ({error}); give {what}.") from error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ridfr_core.eval", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    split = commands.add_parser("split", help="hold out test identities of a CelebRef-HQ folder")
    split.add_argument("--celebref", type=Path, required=True, help="folder with one sub-folder per identity")
    split.add_argument("--out", type=Path, required=True)
    _add_split_options(split)

    degrade_command = commands.add_parser("degrade", help="write gt/, lq/, refs/ for a split")
    degrade_command.add_argument("--split", type=Path, required=True, help="split.json written by 'split'")
    degrade_command.add_argument("--out", type=Path, required=True)
    _add_degrade_options(degrade_command)

    score = commands.add_parser("score", help="score restored faces against ground truth")
    score.add_argument("--restored", type=Path, required=True)
    score.add_argument("--gt", type=Path, required=True)
    score.add_argument("--refs", type=Path, help="references, refs/<case>/<ref> or refs/<case>.<ext> (for the grid)")
    score.add_argument("--lq", type=Path, help="degraded inputs (for the grid)")
    score.add_argument("--out", type=Path, required=True)
    _add_score_options(score)

    run = commands.add_parser("run", help="split + degrade (with --celebref), restore, score")
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="a folder written by 'degrade'")
    source.add_argument("--celebref", type=Path, help="a CelebRef-HQ folder: split and degrade it first")
    run.add_argument("--out", type=Path, required=True)
    run.add_argument("--models", type=Path, default=Path("models"),
                     help="model folder of RIDFR's restorer, laid out as for python -m ridfr_core.restore "
                          "(either backend)")
    run.add_argument("--steps", type=int, help="sampling steps of RIDFR's restorer (default: the backend's)")
    run.add_argument("--restorer", help="module:function restore(lq, reference) -> restored, instead of RIDFR's")
    run.add_argument("--refs-per-case", type=int, default=1, help=">= 2 also gives Identity Variance")
    run.add_argument("--preprocess", type=Path, metavar="FILE", help="restoration model (SwinIR, Real-ESRGAN, ... "
                     "any spandrel reads) run on every LQ face before the restorer, as the paper does with SwinIR; "
                     "on --device; recorded in OUT/preprocess.json")
    _add_split_options(run)
    _add_degrade_options(run, "face size: the data is degraded at it (--celebref) or must have it (--data)")
    _add_score_options(run)

    compare = commands.add_parser("compare", help="two or more content files on the same split, as one table "
                                  "(IDS by dlib/FaceNet, Identity Variance, MUSIQ, PSNR/SSIM)")
    compare.add_argument("--data", type=Path, required=True, help="a folder written by 'degrade'")
    compare.add_argument("--content", action="append", required=True, help="a content file (a path or a name in "
                         "MODELS/ridfr); repeat, e.g. RestorerIDFull.ckpt and its alignment-trained .safetensors")
    compare.add_argument("--models", type=Path, default=Path("models"), help="the other model files (as for restore)")
    compare.add_argument("--out", type=Path, required=True)
    compare.add_argument("--steps", type=int, help="sampling steps (default: the backend's)")
    compare.add_argument("--refs-per-case", type=int, default=2, help="restorations per case, one per reference "
                         "(>= 2: Identity Variance)")
    compare.add_argument("--size", type=int, default=FACE_SIZE, help=f"face size the data must have ({FACE_SIZE})")
    compare.add_argument("--recognisers", type=_names, default=["dlib", "facenet"],
                         help="comma-separated: dlib, facenet (default both; not the ArcFace the models read)")
    compare.add_argument("--device", default="cpu")
    compare.add_argument("--channel", choices=("y", "rgb"), default="y")
    compare.add_argument("--grid-rows", type=int, default=8)
    return parser


def main(argv: Sequence[str] | None = None, config_dir=None) -> int:
    """The CLI; ``config_dir``: model architectures other than SD1.5's for RIDFR's restorer (tiny test models)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("--") and argv[0] not in ("--help",):
        argv.insert(0, "score")  # `python -m ridfr_core.eval --restored ...` is the score command
    args = build_parser().parse_args(argv)
    try:
        if args.command == "split":
            split = build_split(args.celebref, args.num_test_ids, args.split_seed, args.glob, args.max_images_per_id)
            print(f"{len(split['cases'])} cases from {len(split['test_ids'])} identities -> {write_split(split, args.out)}")
            return 0
        if args.command == "degrade":
            split = _read_json(args.split, "--split", "the split.json written by the 'split' command")
            print(f"-> {degrade_split(split, args.out, args.seed, _degradation_config(args.config), args.size)}")
            return 0
        if args.command == "compare":
            from .eval_compare import compare

            check_face_size(args.data, args.size)
            compare(args.data, args.out, args.models, args.content, args.steps, args.refs_per_case, args.recognisers,
                    config_dir, device=args.device, channel=args.channel, grid_rows=args.grid_rows)
            return 0
        score_options = dict(
            recognisers=args.recognisers, arcface_model=args.arcface_model, iqa=args.iqa,
            device=args.device, channel=args.channel, grid_rows=args.grid_rows,
        )
        if args.command == "score":
            evaluate(args.restored, args.gt, args.out, refs_dir=args.refs, lq_dir=args.lq, **score_options)
            return 0
        data_dir = args.data
        if data_dir is not None:
            check_face_size(data_dir, args.size)
        if args.restorer:
            restore = load_restorer(args.restorer)
        else:  # RIDFR's restorer: its options and model files checked before the split, the degradation or a load
            from .restore import AlignedFaceRestorer, architecture_dir, resolve_models
            from .restore_checks import check_steps

            if args.steps is not None:
                check_steps(args.steps)
            resolve_models(args.models, {}, need_insightface=True)
            restore = AlignedFaceRestorer(args.models, args.steps, config_dir or architecture_dir(args.models))
        if args.preprocess:
            from .preprocess import preprocessed_restorer

            restore = preprocessed_restorer(restore, args.preprocess, args.device, args.out)
        if data_dir is None:
            split = build_split(args.celebref, args.num_test_ids, args.split_seed, args.glob, args.max_images_per_id)
            write_split(split, args.out / "split")
            data_dir = args.out / "data"
            degrade_split(split, data_dir, args.seed, _degradation_config(args.config), args.size)
        run_evaluation(data_dir, args.out, restore, args.refs_per_case, **score_options)
        return 0
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
