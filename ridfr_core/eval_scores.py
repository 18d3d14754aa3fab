"""Scoring restored faces against their ground truth the way the RIDFR paper does (Sec. 4): PSNR/SSIM,
identity similarity with independent recognisers, no-reference quality (pyiqa), a summary, per-case CSV and
a grid (``python -m ridfr_core.eval score``)."""

from __future__ import annotations

import csv
import glob
import json
import platform
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

from . import metrics
from .io.images import IMAGE_SUFFIXES, list_images, read_rgb, write_rgb

DEFAULT_RECOGNISERS = ("dlib", "facenet", "arcface")
DEFAULT_IQA = ("lpips", "musiq", "maniqa", "clipiqa")


def image_with_stem(folder: Path, stem: str) -> Path | None:
    """``folder/<stem>.<image suffix>``, or None; two such files (case.jpg and case.png) are an error."""
    matches = sorted(p for p in Path(folder).glob(f"{glob.escape(stem)}.*")
                     if p.stem == stem and p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return unique_stems(matches)[0] if matches else None


def unique_stems(paths: list[Path]) -> list[Path]:
    """``paths``, refusing two images of one case (or reference) that differ only in their extension."""
    seen: dict[tuple[Path, str], Path] = {}
    for path in paths:
        other = seen.setdefault((path.parent, path.stem), path)
        if other != path:
            raise ValueError(f"{other} and {path.name} are both '{path.stem}': which one is meant is ambiguous; "
                             "remove or rename one of them.")
    return paths


def _restorations(restored_dir: Path, case: str) -> list[Path]:
    """restored/<case>/*.png (one per reference) or restored/<case>.<ext> (a single one)."""
    folder = restored_dir / case
    if folder.is_dir():
        return unique_stems(list_images(folder))
    single = image_with_stem(restored_dir, case)
    return [single] if single else []


def _reference_for(refs_dir: Path | None, case: str, restored: Path) -> Path | None:
    if refs_dir is None:
        return None
    folder = refs_dir / case
    if folder.is_dir():
        matching = [p for p in list_images(folder) if p.stem == restored.stem]
        return (matching or list_images(folder) or [None])[0]
    return image_with_stem(refs_dir, case)


def _finite_mean(values) -> float:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def evaluate(
    restored_dir: Path,
    gt_dir: Path,
    out_dir: Path,
    refs_dir: Path | None = None,
    lq_dir: Path | None = None,
    recognisers: Sequence[str] = DEFAULT_RECOGNISERS,
    arcface_model: str | None = None,
    iqa: Sequence[str] = DEFAULT_IQA,
    device: str = "cpu",
    channel: str = "y",
    grid_rows: int = 8,
    scorers: dict | None = None,
) -> dict:
    """Score every case in ``gt_dir``; returns the summary also written to ``out_dir``. ``scorers``: more
    no-reference metrics, ``{name: score(restored uint8 RGB) -> float}`` (e.g. our own MUSIQ)."""
    restored_dir, gt_dir = Path(restored_dir), Path(gt_dir)
    for option, folder in (("--restored", restored_dir), ("--gt", gt_dir)):
        if not folder.is_dir():
            raise ValueError(f"{option} {folder}: not a folder; give the folder holding the {option[2:]} images.")
    gt_paths = unique_stems(list_images(gt_dir))
    if not gt_paths:
        raise ValueError(f"--gt {gt_dir}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    restorations = {gt.stem: _restorations(restored_dir, gt.stem) for gt in gt_paths}
    missing = [case for case, paths in restorations.items() if not paths]
    if missing:
        raise ValueError(
            f"--restored {restored_dir}: no restoration for {len(missing)} of {len(gt_paths)} ground-truth faces "
            f"(first: {missing[:3]}); expected restored/<case>.png or restored/<case>/<ref>.png."
        )

    loaded_recognisers, skipped = metrics.load_recognisers(recognisers, arcface_model)
    iqa_metrics, iqa_skipped, iqa_info = metrics.load_pyiqa_metrics(iqa, device)
    skipped.update(iqa_skipped)
    multi_reference = any(len(paths) >= 2 for paths in restorations.values())
    if not multi_reference:
        for recogniser in loaded_recognisers:
            skipped[f"identity_variance_{recogniser.name}"] = (
                "one restoration per case; Identity Variance needs restored/<case>/<ref>.png for >= 2 references"
            )

    rows = []
    for gt_path in gt_paths:
        case, gt = gt_path.stem, read_rgb(gt_path)
        images = [read_rgb(p) for p in restorations[case]]
        for path, image in zip(restorations[case], images):
            if image.shape != gt.shape:
                raise ValueError(f"--restored {path}: size {image.shape[:2]} differs from ground truth {gt.shape[:2]}.")
        row = {"case": case, "restorations": len(images)}
        row[f"psnr_{channel}"] = _finite_mean(metrics.psnr(image, gt, channel) for image in images)
        row[f"ssim_{channel}"] = _finite_mean(metrics.ssim(image, gt, channel) for image in images)
        for recogniser in loaded_recognisers:
            embeddings = recogniser.embed(images + [gt])
            row[f"ids_hq_{recogniser.name}"] = float(np.mean(metrics.identity_similarity(embeddings[:-1], embeddings[-1:])))
            if multi_reference:
                row[f"identity_variance_{recogniser.name}"] = (
                    metrics.identity_variance(embeddings[:-1]) if len(images) >= 2 else float("nan")
                )
        for name, score in iqa_metrics.items():
            row[name] = _finite_mean(score(image, gt) for image in images)
        for name, score in (scorers or {}).items():
            row[name] = _finite_mean(score(image) for image in images)
        rows.append(row)

    columns = [key for key in rows[0] if key not in ("case", "restorations")]
    means = {column: _finite_mean(row[column] for row in rows) for column in columns}
    summary = {
        "cases": len(rows),
        "restorations": sum(row["restorations"] for row in rows),
        "metrics": means,
        "skipped": skipped,
        "conventions": {
            f"psnr_{channel}/ssim_{channel}": (
                "on BT.601 luma (16..235), 0..255 data range" if channel == "y" else "on RGB, 0..255 data range"
            ) + "; SSIM Gaussian window sigma 1.5; PSNR of identical images (inf) left out of the mean",
            "ids_hq_*": "cosine of the restored and ground-truth embeddings, averaged over a case's restorations",
            "identity_variance_*": "per case: mean squared distance of the unit embeddings of its restorations "
            "(one per reference) to their mean (paper Table 4 I.V.); averaged over cases",
        },
        "recognisers": {r.name: r.description for r in loaded_recognisers},
        "pyiqa": iqa_info,
        "environment": {"python": platform.python_version(), "opencv": cv2.__version__, "numpy": np.__version__},
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(out_dir / "per_case.csv", rows)
    _write_csv(out_dir / "summary.csv", [{"metric": k, "mean": v} for k, v in means.items()])
    (out_dir / "summary.json").write_text(json.dumps(_json_safe(summary), indent=1))
    write_grid(out_dir / "grid.png", gt_paths[:grid_rows], restorations, refs_dir, lq_dir)
    print(format_table(summary))
    return summary


def _json_safe(value):
    """JSON has no inf/nan: write them as strings rather than emit invalid JSON."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    return value


def _write_csv(path: Path, rows: list[dict]):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def format_table(summary: dict) -> str:
    lines = [f"{summary['cases']} cases, {summary['restorations']} restorations", f"{'metric':34s} {'mean':>10s}"]
    lines += [f"{name:34s} {value:10.4f}" for name, value in summary["metrics"].items()]
    lines += [f"{name:34s} skipped: {reason}" for name, reason in summary["skipped"].items()]
    return "\n".join(lines)


def write_grid(path: Path, gt_paths, restorations, refs_dir, lq_dir, tile: int = 256):
    """One row per case: LQ | restored | GT | reference (grey where not given)."""
    header = np.full((32, 4 * tile, 3), 255, np.uint8)
    for column, label in enumerate(("LQ", "restored", "GT", "reference")):
        cv2.putText(header, label, (column * tile + 8, 23), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 0, 0), 2)
    rows = [header]
    for gt_path in gt_paths:
        restored = restorations[gt_path.stem][0]
        lq = image_with_stem(lq_dir, gt_path.stem) if lq_dir else None
        sources = (lq, restored, gt_path, _reference_for(Path(refs_dir) if refs_dir else None, gt_path.stem, restored))
        tiles = [
            cv2.resize(read_rgb(p), (tile, tile), interpolation=cv2.INTER_AREA) if p else np.full((tile, tile, 3), 128, np.uint8)
            for p in sources
        ]
        rows.append(np.concatenate(tiles, axis=1))
    write_rgb(path, np.concatenate(rows, axis=0))


def restore_cases(data_dir: Path, restored_dir: Path, restore: Callable, refs_per_case: int = 1):
    """Restore every lq/<case> with the first ``refs_per_case`` references of refs/<case>/."""
    if refs_per_case < 1:
        raise ValueError(f"--refs-per-case {refs_per_case}: restore each case with at least 1 reference.")
    for lq_path in unique_stems(list_images(data_dir / "lq")):
        lq = read_rgb(lq_path)
        references = list_images(data_dir / "refs" / lq_path.stem)[:refs_per_case]
        if not references:
            raise ValueError(f"{data_dir / 'refs' / lq_path.stem}: no reference images for case {lq_path.stem}.")
        for ref_path in references:
            write_rgb(restored_dir / lq_path.stem / f"{ref_path.stem}.png", np.asarray(restore(lq, read_rgb(ref_path))))


def run_evaluation(data_dir: Path, out_dir: Path, restore: Callable, refs_per_case: int = 1, **score_options) -> dict:
    """Restore a degraded split (``degrade`` output) and score it, all under ``out_dir``."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    restore_cases(data_dir, out_dir / "restored", restore, refs_per_case)
    return evaluate(
        out_dir / "restored", data_dir / "gt", out_dir / "scores",
        refs_dir=data_dir / "refs", lq_dir=data_dir / "lq", **score_options,
    )
