"""Peak memory of the CLI with full-size files in the published layouts and dtypes, against the weights it keeps.

    python bench/bench_memory.py --ckpt /tmp/ridfr-vs-publisher/RestorerIDFull.ckpt

From a full-size ``RestorerIDFull.ckpt`` in the published layout (random weights; ``bench_vs_publisher.py``
writes one with the publisher's own classes) this writes, into ``--workdir``, the other files a user has
in their published layouts and dtypes: SD1.5 as ``v1-5-pruned-emaonly-fp16.safetensors`` (LDM keys, fp16), the
FaceID Plus v1 ``ip-adapter-faceid-plus_sd15.bin`` (h94's ``image_proj``/``ip_adapter`` dicts, fp16, a torch
zip), ``CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors`` (transformers layout, fp16); plus insightface stand-ins
(tests/onnx_fakes.py: no ArcFace weights can be had here). Then each set-up restores one aligned 512 px face
(``--steps`` steps, fixed identity scale) in a fresh process and reports its peak RSS:

- ``checkpoint``: the checkpoint alone serves as base, LQ branch, adapter and CLIP (the CLI's default), the
  LQ branch converted at this first load;
- ``checkpoint, cached``: the same again, the LQ branch now read from its cache;
- ``separate files``: the checkpoint as LQ branch only, with ``--base``/``--adapter``/``--clip-vision``.

The weights a restoration keeps, in the compute dtype (float32 on the CPU): UNet (FaceID LoRA fused into it),
VAE, LQ branch, FaceID projection and IP K/V, CLIP ViT-H. The text encoder runs once for the prompts (cached).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from ridfr_core.backends.restorerid.bundled import PROJ_PREFIX, VISION_PREFIX, h94_ip_adapter_state  # noqa: E402
from ridfr_core.backends.restorerid.files import key_group, without_restorerid_extras  # noqa: E402

KEPT_GROUPS = ("unet", "encoder", "spade", "IDBalance", "faceid_kv", "vae", "adapter")  # what inference holds
SD15, FACEID, CLIP = ("v1-5-pruned-emaonly-fp16.safetensors", "ip-adapter-faceid-plus_sd15.bin",
                      "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors")


def write_published_files(ckpt: Path, models: Path) -> dict[str, Path]:
    """The models folder: the checkpoint (linked), and SD1.5, FaceID and CLIP files cut from it, each in its own
    published layout and dtype."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
    files = {"content": models / "ridfr" / ckpt.name, "base": models / "checkpoints" / SD15,
             "adapter": models / "ipadapter" / FACEID, "clip_vision": models / "clip_vision" / CLIP}
    for path in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    if not files["content"].exists():
        files["content"].symlink_to(ckpt.resolve())
    if not files["base"].is_file():
        save_file({k: v.half().contiguous() for k, v in without_restorerid_extras(state).items()
                   if v.is_floating_point()}, str(files["base"]))
    if not files["adapter"].is_file():
        image_proj = {k[len(PROJ_PREFIX):]: v.half() for k, v in state.items() if k.startswith(PROJ_PREFIX)}
        ip_adapter = {k: v.half() for k, v in h94_ip_adapter_state(state).items()}
        torch.save({"image_proj": image_proj, "ip_adapter": ip_adapter}, files["adapter"])
    if not files["clip_vision"].is_file():
        save_file({k[len(VISION_PREFIX):]: v.half().contiguous() for k, v in state.items()
                   if k.startswith(VISION_PREFIX)}, str(files["clip_vision"]))
    return files


def kept_weights_gb(ckpt: Path, bytes_per_value: int = 4) -> float:
    state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
    return sum(v.numel() for k, v in state.items() if key_group(k) in KEPT_GROUPS) * bytes_per_value / 2**30


def insightface_stand_ins(models: Path) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from onnx_fakes import (SCRIPTED_ANCHOR, SCRIPTED_BBOX, build_projection_arcface, build_scripted_scrfd,
                            scripted_kps_offsets)

    pack = models / "insightface" / "models" / "buffalo_l"
    if not (pack / "w600k_r50.onnx").is_file():
        build_scripted_scrfd(pack / "det_10g.onnx", SCRIPTED_ANCHOR, SCRIPTED_BBOX, scripted_kps_offsets())
        build_projection_arcface(pack / "w600k_r50.onnx")


def child(argv: list[str], report: Path) -> None:
    """Run the CLI in this process, then write its peak RSS."""
    from ridfr_core.restore import main as cli

    code = cli(argv)
    report.write_text(json.dumps({"code": code, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                  / 2**20}))


def run_cli(argv: list[str], workdir: Path) -> dict:
    report = workdir / "child.json"
    env = {**os.environ, "RIDFR_CACHE": str(workdir / "cache")}
    subprocess.run([sys.executable, __file__, "--child", str(report), "--", *argv], check=True, env=env)
    return json.loads(report.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, default=Path(tempfile.gettempdir()) / "ridfr-vs-publisher"
                        / "RestorerIDFull.ckpt", help="a full-size RestorerIDFull.ckpt (bench_vs_publisher.py)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "ridfr-memory")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("argv", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.argv, args.child)
    if not args.ckpt.is_file():
        sys.exit(f"bench_memory: no checkpoint at {args.ckpt}; run bench/bench_vs_publisher.py first (it writes one) "
                 "or pass --ckpt.")
    args.workdir.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(args.workdir).free < 6 * 2**30:
        sys.exit(f"bench_memory: {args.workdir} has under 6 GB free for the SD1.5, FaceID and CLIP files.")
    models = args.workdir / "models"
    files = write_published_files(args.ckpt, models)
    insightface_stand_ins(models)
    rng = np.random.default_rng(0)
    for name in ("face.png", "reference.png"):
        Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(args.workdir / name)
    shutil.rmtree(args.workdir / "cache", ignore_errors=True)
    common = ["--lq", str(args.workdir / "face.png"), "--aligned", "--id", str(args.workdir / "reference.png"),
              "--aligned-references", "--models", str(models), "--content", files["content"].name, "--steps",
              str(args.steps), "--identity-scale", "0.75", "--device", "cpu", "--out", str(args.workdir / "out.png")]
    separate = ["--base", str(files["base"]), "--adapter", str(files["adapter"]), "--clip-vision",
                str(files["clip_vision"])]
    weights = kept_weights_gb(args.ckpt)
    sizes = {name: path.resolve().stat().st_size / 2**30 for name, path in files.items()}
    print(f"# CLI peak RSS, full-size files, CPU float32, {args.steps} steps; weights kept: {weights:.2f} GB")
    print("files: " + ", ".join(f"{path.name} {sizes[name]:.2f} GB" for name, path in files.items()))
    print("| set-up | peak RSS | / weights |\n|---|---|---|")
    results = {}
    for label, argv in (("checkpoint", common), ("checkpoint, cached", common), ("separate files", common + separate)):
        results[label] = run_cli(argv, args.workdir)
        print(f"| {label} | {results[label]['peak_rss_gb']:.2f} GB | {results[label]['peak_rss_gb'] / weights:.2f} |",
              flush=True)
    (args.workdir / "memory.json").write_text(json.dumps({"weights_gb": weights, "files_gb": sizes,
                                                          "runs": results}, indent=2))


if __name__ == "__main__":
    main()
