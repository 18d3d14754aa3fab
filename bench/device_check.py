"""Every figure a GPU can tell about RIDFR, in one run that writes one table (``bench/device_check.sh``).

    bench/device_check.sh                    # CUDA: full SD1.5 size, 512 px faces, about 8 minutes on an H100
    bench/device_check.sh --tiny             # CPU, tiny sizes: checks that the whole script works (CI)

Parts (``--parts``, default all):

- ``pipeline``: :class:`~ridfr_core.pipeline.RIDFRPipeline` per face for the RIDFR backend (UniPC 20, no guidance)
  and the RestorerID backend (its DDIM plan, 50 steps, CFG 4, MUSIQ of each face), in each of ``--dtypes`` at
  each of ``--batches``: seconds per face, faces/s and peak memory (CUDA: ``max_memory_allocated``; CPU: the
  process' peak RSS). Random weights at the published widths; identity encoding (CLIP) is inside the time.
- ``comfyui``: a real ComfyUI server (``COMFYUI_PATH``; on CUDA unless ``--tiny``) runs example workflows 1
  (RIDFR) and 4 (RestorerID) from a models folder in the published layouts (random weights; tiny ones with
  ``--tiny``): the first run (loading included) and a second one, and the server's peak memory;
- ``reserve``: workflow 4 again on a server started with ``--reserve-vram 4`` (ComfyUI keeps 4 GB free).

Each part stops starting new measurements when ``--budget-s`` is spent (the rows left are marked skipped).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PARTS = ("pipeline", "comfyui", "reserve")


@dataclass
class Settings:
    """What a run measures: full size on CUDA, or tiny sizes on the CPU (``tiny``)."""

    tiny: bool
    device: str
    dtypes: list[str]
    batches: list[int]
    size: int
    steps: dict[str, int | None]   # backend -> steps (None: its published number)
    budget_s: float
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def make(cls, tiny: bool, dtypes=None, batches=None, budget_s=None) -> "Settings":
        if tiny:
            return cls(True, "cpu", dtypes or ["fp32"], batches or [1, 2], 128, {"ridfr": 2, "restorerid": 2},
                       budget_s or 600)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(False, device, dtypes or ["fp16", "bf16"], batches or [1, 4, 16], 512,
                   {"ridfr": None, "restorerid": None}, budget_s or 480)

    def out_of_time(self) -> bool:
        return time.perf_counter() - self.started > self.budget_s


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory_gb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def restore_faces(pipeline, models, musiq, lq: torch.Tensor, crops: torch.Tensor, steps: int | None) -> str:
    """One restoration as the CLI runs it for faces of one person: CLIP of the reference, MUSIQ of each LQ face
    (RestorerID's adaptive identity scale; with random MUSIQ weights the fixed 0.75 is used), the pipeline with
    the backend's settings. Returns a note when random weights overflowed into a non-finite image (the time
    still counts: the whole restoration ran)."""
    from ridfr_core.identity.adapter import Identity, encode_clip_features
    from ridfr_core.pipeline import NonFiniteOutput

    clip = encode_clip_features(models.clip_vision, crops, bgr=pipeline.backend.clip_bgr)
    identity = Identity(torch.nn.functional.normalize(torch.ones(1, 512), dim=-1), clip.float())
    if musiq is not None:
        musiq(lq.float().clamp(0, 1))
    try:
        pipeline(lq, identity, steps=steps, identity_scale=0.75 if musiq is not None else 1.0)
    except NonFiniteOutput:
        return "non-finite image (random weights)"
    return ""


def pipeline_rows(settings: Settings) -> list[dict]:
    from bench_pipeline import build_models
    from ridfr_core.musiq import Musiq
    from ridfr_core.pipeline import RIDFRPipeline

    rows, device = [], settings.device
    for backend in ("ridfr", "restorerid"):
        with torch.device(device):
            models = build_models("tiny" if settings.tiny else "sd15", backend)
            musiq = Musiq().eval() if backend == "restorerid" else None
        for name in settings.dtypes:
            pipeline = RIDFRPipeline(models, device, DTYPES[name])
            for batch in settings.batches:
                row = {"part": "pipeline", "what": backend, "dtype": name, "batch": batch}
                rows.append(row)
                if settings.out_of_time():
                    row["note"] = "skipped: out of time"
                    continue
                generator = torch.Generator().manual_seed(batch)
                lq = torch.rand(batch, 3, settings.size, settings.size, generator=generator).to(device, DTYPES[name])
                crops = torch.rand(1, 3, 224, 224, generator=generator)
                with torch.no_grad():
                    restore_faces(pipeline, models, musiq, lq, crops, 2)  # warm-up (kernels, allocator)
                    if device == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    sync(device)
                    start = time.perf_counter()
                    note = restore_faces(pipeline, models, musiq, lq, crops, settings.steps[backend])
                    sync(device)
                    seconds = time.perf_counter() - start
                steps = settings.steps[backend] or pipeline.backend.steps
                row.update(seconds_per_face=seconds / batch, faces_per_s=batch / seconds,
                           peak_gb=peak_memory_gb(device), note=f"{steps} steps, {settings.size}px {note}".strip())
                print(format_row(row), flush=True)
        del models, musiq
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def format_row(row: dict) -> str:
    def number(key, fmt):
        return format(row[key], fmt) if row.get(key) is not None else "-"

    return (f"| {row['part']} | {row['what']} | {row.get('dtype', '-')} | {row.get('batch', '-')} | "
            f"{number('seconds_per_face', '.3f')} | {number('faces_per_s', '.2f')} | {number('peak_gb', '.2f')} | "
            f"{row.get('note', '')} |")


def table(rows: list[dict], settings: Settings, machine: str) -> str:
    memory = "peak VRAM" if settings.device == "cuda" else "peak RSS"
    head = (f"device_check ({'tiny, ' if settings.tiny else ''}{machine}, torch {torch.__version__})\n\n"
            f"| part | backend / workflow | dtype | batch | s per face | faces/s | {memory} (GB) | note |\n"
            "|---|---|---|---|---|---|---|---|")
    return "\n".join([head, *map(format_row, rows)]) + "\n"


def machine_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny sizes, 2 steps: check that it all runs")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="default: fp16 bf16 (tiny: fp32)")
    parser.add_argument("--batches", nargs="+", type=int, help="default: 1 4 16 (tiny: 1 2)")
    parser.add_argument("--budget-s", type=float, help="stop starting measurements after this (default 480)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ridfr-device-check"),
                        help="models folder and ComfyUI base directory for the comfyui parts")
    parser.add_argument("--out", type=Path, default=Path("device_check.md"), help="where the table is written")
    args = parser.parse_args(argv)
    settings = Settings.make(args.tiny, args.dtypes, args.batches, args.budget_s)
    machine = machine_name(settings.device)
    rows = []
    if "pipeline" in args.parts:
        rows += pipeline_rows(settings)
    if {"comfyui", "reserve"} & set(args.parts):
        from device_comfyui import comfyui_rows

        rows += comfyui_rows(settings, args.workdir, "comfyui" in args.parts, "reserve" in args.parts)
    text = table(rows, settings, machine)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"machine": machine, "tiny": settings.tiny, "rows": rows},
                                                        indent=2))
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
