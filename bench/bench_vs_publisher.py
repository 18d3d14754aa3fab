"""RIDFR's RestorerID backend against the publisher's own code, stage by stage, interleaved in one run.

    RESTORERID_SRC=/path/to/RestorerID python bench/bench_vs_publisher.py --size 512 --steps 2 --repeats 2

Both sides load the same full-size checkpoint in the published layout (``RestorerIDFull.ckpt``: SD1.5, the LQ
branch, the FaceID LoRA and K/V copies, the fp16 Adapter with CLIP ViT-H; random weights, written once to
``--workdir`` by the publisher's own classes) and restore the same face from the same random draws. The
publisher's side runs their code (``RESTORERID_SRC``, a checkout of github YingJiacheng/RestorerID) in their
environment (``--publisher-python``, the venv of ``../shared/restorerid-golden/README.md``) through
``publisher_side.py``; ours runs here. Every stage is timed in turn on both sides in each repeat, so load from
elsewhere falls on both alike:

- ``musiq``: the LQ face's MUSIQ (theirs: pyiqa's ``create_metric('musiq')``, ours: ``ridfr_core.musiq``; both
  read the same random weights file);
- ``identity``: CLIP ViT-H and the FaceID projection (theirs also re-encodes the null identity each face, ours
  caches it), ours with the per-restoration keys/values of the cross-attention;
- ``prompts``: theirs runs the text encoder on both prompts per face; ours reads them cached at load (0);
- ``encode``: the LQ face's VAE posterior sample; ``step``: one guided DDIM step (CFG, both copies);
- ``decode`` and ``color_fix``; then a whole restoration of ``--steps`` steps on each side, whose images
  are compared.

Per face at 50 steps is extrapolated from the step figures: theirs runs 50 steps, ours 49 (the last is a
no-op and skipped). Peak memory is each process' peak RSS (load included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ridfr_core.backends import RESTORERID  # noqa: E402
from ridfr_core.identity.adapter import Identity, encode_clip_features  # noqa: E402
from ridfr_core.musiq import Musiq, load_musiq  # noqa: E402
from ridfr_core.pipeline import RIDFRPipeline  # noqa: E402
from ridfr_core.sampling.colorfix import wavelet_color_fix  # noqa: E402
from ridfr_core.sampling.ldm_ddim import ddim_update, restorerid_plan  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STAGES = ("musiq", "identity", "prompts", "encode", "step", "decode", "color_fix")
IDENTITY_SCALE = 0.75  # MUSIQ is timed, but with random weights its score means nothing: a fixed scale


class PublisherSide:
    """``publisher_side.py`` in the publisher's venv, one JSON line per request."""

    def __init__(self, python: str, source: str):
        env = {**os.environ, "RESTORERID_SRC": source, "OMP_NUM_THREADS": str(torch.get_num_threads())}
        self.process = subprocess.Popen([python, str(REPO / "bench" / "publisher_side.py")], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env, cwd=source)

    def __call__(self, cmd: str, **args) -> dict:
        self.process.stdin.write(json.dumps({"cmd": cmd, "args": args}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"publisher side exited during '{cmd}' (see its messages above)")
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise RuntimeError(f"publisher side, '{cmd}': {reply['error']}")
        return reply

    def close(self) -> None:
        self.process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
        self.process.stdin.close()
        self.process.wait(60)


class RecordedNoise:
    """The draws both sides share: x_T, then the posterior's eps, then each step's noise (``RunNoise``'s order)."""

    def __init__(self, inputs: dict):
        self.seeds, self.start_noise = [0], inputs["x_T"]
        self.queue = [inputs["post_noise"], *inputs["step_noise"]]

    def start(self, shape):
        return self.start_noise.clone()

    def next(self, shape):
        return self.queue.pop(0).reshape(shape)


def make_inputs(size: int, steps: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    latent = (1, 4, size // 8, size // 8)
    return {"lq01": torch.randint(0, 256, (1, 3, size, size), generator=generator).float() / 255,
            "ref_crop": torch.randint(0, 256, (224, 224, 3), generator=generator, dtype=torch.uint8),
            "id_embeds": torch.nn.functional.normalize(torch.randn(1, 512, generator=generator), dim=-1),
            "x_T": torch.randn(latent, generator=generator), "post_noise": torch.randn(latent, generator=generator),
            "step_noise": torch.randn(steps, *latent, generator=generator), "identity_scale": IDENTITY_SCALE}


class Ours:
    """The same stages with RIDFR's pipeline and its parts (the step is the pipeline's loop body)."""

    def __init__(self, pipeline: RIDFRPipeline, inputs: dict, musiq_path: Path, steps: int):
        self.pipeline, self.inputs, self.steps = pipeline, inputs, steps
        self.musiq_model = load_musiq(musiq_path)
        self.plan = restorerid_plan(steps, RESTORERID.ddim_eta)
        self.state = {"latents": inputs["x_T"].clone()}

    def musiq(self):
        self.musiq_model(self.inputs["lq01"])

    def identity(self):
        """CLIP of the BGR crop, the identity tokens, and the restoration's conditions (keys/values once)."""
        pipeline, models = self.pipeline, self.pipeline.models
        rgb = torch.from_numpy(self.inputs["ref_crop"].numpy()[..., ::-1].copy()).permute(2, 0, 1)[None].float() / 255
        clip = encode_clip_features(models.clip_vision, rgb, bgr=RESTORERID.clip_bgr)
        self.state["identity"] = Identity(self.inputs["id_embeds"], clip.float())
        tokens = pipeline.identity_tokens(self.state["identity"], 1)
        text = torch.cat([models.prompt(RESTORERID.positive_prompt), models.prompt(RESTORERID.negative_prompt)])
        self.state["conditions"] = pipeline.denoiser.prepare(
            text, self.state.get("lq_latent"), torch.cat([tokens, pipeline.null_tokens(1)]), 1.0, IDENTITY_SCALE)

    def prompts(self):
        """Computed once when the checkpoint is loaded (and cached on disk): nothing per face."""

    def encode(self):
        models = self.pipeline.models
        self.state["lq_latent"] = RESTORERID.content_input(models.content, self.inputs["lq01"] * 2 - 1, models.vae,
                                                           self.inputs["x_T"].shape[-2:], self.inputs["post_noise"])

    def step(self, index: int):
        text, _, tokens, content_scale, identity_scale = self.state["conditions"]
        latents = self.state["latents"]
        t = torch.tensor(self.plan.model_t[index])
        eps = self.pipeline.denoiser(torch.cat([latents, latents]), t, text, self.state["lq_latent"], tokens,
                                     content_scale, identity_scale).float()
        cond, uncond = eps.chunk(2)
        self.state["step_out"] = ddim_update(latents, uncond + RESTORERID.guidance * (cond - uncond), self.plan,
                                             index, self.inputs["step_noise"][0])

    def decode(self):
        self.state["decoded"] = self.pipeline.decode(self.state["latents"])

    def color_fix(self):
        self.state["image"] = wavelet_color_fix(self.state["decoded"], self.inputs["lq01"])

    def restore(self) -> torch.Tensor:
        return self.pipeline(self.inputs["lq01"], self.state["identity"], steps=self.steps,
                             identity_scale=IDENTITY_SCALE, noise=RecordedNoise(self.inputs), eta=RESTORERID.ddim_eta)


def pyiqa_musiq(path: Path):
    import pyiqa

    return pyiqa.create_metric("musiq", pretrained_model_path=str(path), device="cpu", as_loss=False)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="face size in pixels (512: the published one)")
    parser.add_argument("--steps", type=int, default=2, help="steps of the whole restorations compared (50: theirs)")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats of each stage, after a warm-up")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "ridfr-vs-publisher",
                        help="where the full-size checkpoint (6.5 GB) and the inputs are written, and kept")
    parser.add_argument("--publisher-python", default=os.environ.get("RESTORERID_PYTHON", "/work/pubvenv/bin/python"))
    parser.add_argument("--publisher-adapter-dtype", choices=["float32", "float16"], default="float32",
                        help="their Adapter's compute dtype; they build it in float16 (a GPU's choice), float32 "
                             "matches ours on the CPU and makes the outputs comparable")
    parser.add_argument("--tokenizer", default=os.path.join(os.environ.get("COMFYUI_PATH", "/work/comfyui-064"),
                                                            "comfy", "sd1_tokenizer"),
                        help="CLIP tokenizer files (vocab.json, merges.txt) for their text encoder")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    source = os.environ.get("RESTORERID_SRC")
    if not source or not Path(source, "ldm").is_dir():
        sys.exit("bench_vs_publisher: set RESTORERID_SRC to a checkout of github YingJiacheng/RestorerID.")
    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt, musiq_path, inputs_path = (args.workdir / name for name in ("RestorerIDFull.ckpt", "musiq_koniq.pth",
                                                                      "inputs.pt"))
    theirs = PublisherSide(args.publisher_python, source)
    try:
        run(args, theirs, ckpt, musiq_path, inputs_path)
    finally:
        theirs.close()


def run(args, theirs: PublisherSide, ckpt: Path, musiq_path: Path, inputs_path: Path) -> None:
    if not ckpt.is_file():
        if shutil.disk_usage(args.workdir).free < 8 * 2**30:
            sys.exit(f"bench_vs_publisher: {args.workdir} has under 8 GB free for the full-size checkpoint.")
        print(f"writing a full-size RestorerIDFull.ckpt with random weights to {ckpt} (their classes) ...", flush=True)
        theirs("make_checkpoint", path=str(ckpt))
    torch.manual_seed(0)
    torch.save(Musiq().state_dict(), musiq_path)
    inputs = make_inputs(args.size, max(args.steps, 1))
    torch.save(inputs, inputs_path)
    loaded_theirs = theirs("load", path=str(ckpt), adapter_dtype=args.publisher_adapter_dtype,
                           tokenizer_dir=args.tokenizer)
    theirs("inputs", path=str(inputs_path))
    theirs("schedule", steps=args.steps)
    start = time.perf_counter()
    pipeline = RIDFRPipeline.from_files(ckpt, ckpt, cache_dir=args.workdir / "cache", device="cpu",
                                        dtype=torch.float32)
    pipeline.null_tokens(1)  # once per pipeline: computed at the first face
    loaded_ours = time.perf_counter() - start
    ours = Ours(pipeline, inputs, musiq_path, args.steps)
    reference_musiq = pyiqa_musiq(musiq_path)
    our_index = args.steps // 2
    their_index = args.steps - 1 - our_index  # theirs counts down

    ours_fns = {**{stage: getattr(ours, stage) for stage in STAGES}, "step": lambda: ours.step(our_index)}
    theirs_fns = {stage: (lambda stage=stage: theirs("run", stage=stage)["seconds"]) for stage in STAGES}
    theirs_fns["musiq"] = lambda: timed(lambda: reference_musiq(inputs["lq01"]))
    theirs_fns["step"] = lambda: theirs("run", stage="step", index=their_index)["seconds"]
    order = ("musiq", "identity", "prompts", "encode", "step", "decode", "color_fix")
    times = {side: {stage: [] for stage in STAGES} for side in ("ours", "theirs")}
    with torch.no_grad():
        theirs("run", stage="sample")  # their decode stage needs final latents; also the warm-up of the sampler
        for repeat in range(args.repeats + 1):  # the first round warms up
            for stage in order:
                ours_s, theirs_s = timed(ours_fns[stage]), theirs_fns[stage]()
                if repeat:
                    times["ours"][stage].append(ours_s)
                    times["theirs"][stage].append(theirs_s)
                print(f"  round {repeat} {stage:9s} ours {ours_s:8.2f}s  theirs {theirs_s:8.2f}s", flush=True)
        scores = ours.musiq_model(inputs["lq01"]), reference_musiq(inputs["lq01"]).flatten()
        musiq_difference = float((scores[0] - scores[1]).abs().max())
        whole = {"ours": timed(lambda: ours.state.update(restored=ours.restore()))}
        their_whole = [theirs("run", stage=stage)["seconds"] for stage in ("encode", "sample", "decode", "color_fix")]
        whole["theirs"] = sum(their_whole)
    image_path = args.workdir / "publisher_image.pt"
    theirs("save", path=str(image_path), names=["image"])
    their_image = torch.load(image_path, weights_only=True)["image"]
    difference = float((ours.state["restored"] - their_image).abs().max())
    report(args, times, whole, difference, musiq_difference, loaded_ours, loaded_theirs, theirs("memory"))


def report(args, times, whole, difference, musiq_difference, loaded_ours, loaded_theirs, their_memory) -> None:
    medians = {side: {stage: float(np.median(values)) for stage, values in stages.items()}
               for side, stages in times.items()}
    plan = restorerid_plan(50, RESTORERID.ddim_eta)
    active = sum(plan.changes_latents(i) for i in range(len(plan)))
    steps = {"ours": active, "theirs": len(plan)}
    per_face = {side: sum(s for stage, s in medians[side].items() if stage != "step")
                + steps[side] * medians[side]["step"] for side in medians}
    machine = f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads, {os.cpu_count()} cores"
    print(f"\n# RestorerID, full SD1.5 widths, {args.size}px, fp32 (their Adapter {args.publisher_adapter_dtype}), "
          f"CPU: {machine}; medians of {args.repeats} interleaved repeats")
    print("| stage | ours | theirs | ours / theirs |\n|---|---|---|---|")
    for stage in STAGES:
        ours_s, theirs_s = medians["ours"][stage], medians["theirs"][stage]
        ratio = f"{ours_s / theirs_s:.3f}" if theirs_s > 0 else "-"
        print(f"| {stage} | {ours_s:.2f} s | {theirs_s:.2f} s | {ratio} |")
    print(f"| per face, 50 steps (extrapolated: ours {active} steps, theirs {len(plan)}) | {per_face['ours']:.0f} s | "
          f"{per_face['theirs']:.0f} s | {per_face['ours'] / per_face['theirs']:.3f} |")
    print(f"| whole restoration, {args.steps} steps, measured (identity and prompts excluded) | {whole['ours']:.1f} s "
          f"| {whole['theirs']:.1f} s | {whole['ours'] / whole['theirs']:.3f} |")
    print(f"| peak RSS (load included) | {peak_rss_gb():.2f} GB | {their_memory['peak_rss_gb']:.2f} GB | "
          f"{peak_rss_gb() / their_memory['peak_rss_gb']:.3f} |")
    print(f"load: ours {loaded_ours:.0f} s, theirs {loaded_theirs['seconds']:.0f} s; output max |ours - theirs| "
          f"{difference:.2e} (images in [0, 1]); MUSIQ scores max difference {musiq_difference:.2e}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine,
                                         "medians_s": medians, "per_face_50_steps_s": per_face,
                                         "whole_s": whole, "max_image_difference": difference,
                                         "peak_rss_gb": {"ours": peak_rss_gb(), "theirs": their_memory["peak_rss_gb"]}},
                                        indent=2))


if __name__ == "__main__":
    main()
