"""``python -m ridfr_core.eval compare``: two (or more) content files restore the same degraded split and are
scored side by side, e.g. RestorerID's public weights against their alignment-trained version.

Each file restores every case once per reference (``--refs-per-case``, >= 2), so the table holds, per file:
identity similarity to the ground truth by recognisers independent of the ArcFace the models are conditioned
on (dlib, FaceNet), the paper's Identity Variance over the restorations of one LQ face from different
references of the same person (Table 4), MUSIQ (no-reference quality, our own implementation of pyiqa's
KonIQ model, from ``<models>/pyiqa``), PSNR and SSIM. Everything else is the ``run`` command's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


COMPARE_RECOGNISERS = ("dlib", "facenet")


def musiq_scorer(models: Path) -> tuple[dict, dict]:
    """({"musiq": score(image)}, {}) with the weights in ``models``, else ({}, {"musiq": why})."""
    from .backends.restorerid.identity_scale import load_musiq

    metric, why = load_musiq(models)
    if metric is None:
        return {}, {"musiq": why}

    def score(image: np.ndarray) -> float:
        with torch.no_grad():
            return float(metric(torch.from_numpy(image).permute(2, 0, 1)[None].float().div(255)).item())

    return {"musiq": score}, {}


def labels_of(contents: list[str]) -> list[str]:
    """A column name per content file: its stem, numbered when two stems are the same."""
    stems = [Path(content).stem for content in contents]
    return [f"{index + 1}_{stem}" if stems.count(stem) > 1 else stem for index, stem in enumerate(stems)]


def compare(data_dir: Path, out_dir: Path, models: Path, contents: list[str], steps: int | None = None,
            refs_per_case: int = 2, recognisers=COMPARE_RECOGNISERS, config_dir=None, **score_options) -> dict:
    """Restore and score ``data_dir`` with each content file; write ``comparison.json``/``.csv`` and print the
    table. Restorations and per-file scores go to ``out_dir/<label>/``."""
    from .eval_scores import run_evaluation
    from .restore import AlignedFaceRestorer

    if len(contents) < 2:
        raise ValueError(f"--content: give two or more content files to compare (got {len(contents)}).")
    if refs_per_case < 2:
        raise ValueError(f"--refs-per-case {refs_per_case}: Identity Variance needs >= 2 references per case.")
    scorers, skipped = musiq_scorer(Path(models))
    summaries = {}
    for label, content in zip(labels_of(contents), contents):
        restorer = AlignedFaceRestorer(models, steps, config_dir, content=content)
        summaries[label] = run_evaluation(data_dir, out_dir / label, restorer, refs_per_case, recognisers=recognisers,
                                          iqa=(), scorers=scorers, **score_options)
        summaries[label]["content"] = str(content)
        summaries[label]["skipped"].update(skipped)
    table = comparison_table(summaries)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "comparison.json").write_text(json.dumps(
        {"files": {label: s["content"] for label, s in summaries.items()}, "metrics": table,
         "skipped": {label: s["skipped"] for label, s in summaries.items()}}, indent=1, default=str))
    labels = list(summaries)
    lines = ["metric," + ",".join(labels)] + [
        f"{metric}," + ",".join(f"{values[label]:.6g}" for label in labels) for metric, values in table.items()]
    (out_dir / "comparison.csv").write_text("\n".join(lines) + "\n")
    print(format_comparison(table, labels))
    return table


def comparison_table(summaries: dict[str, dict]) -> dict[str, dict[str, float]]:
    """{metric: {label: mean}} over the metrics every file was scored with."""
    metrics = [name for name in next(iter(summaries.values()))["metrics"]
               if all(name in summary["metrics"] for summary in summaries.values())]
    return {name: {label: summary["metrics"][name] for label, summary in summaries.items()} for name in metrics}


def format_comparison(table: dict[str, dict[str, float]], labels: list[str]) -> str:
    width = max([34] + [len(label) + 2 for label in labels])
    lines = [f"{'metric':34s}" + "".join(f"{label:>{width}s}" for label in labels)]
    lines += [f"{metric:34s}" + "".join(f"{values[label]:>{width}.4f}" for label in labels)
              for metric, values in table.items()]
    return "\n".join(lines)
