"""What each exact saving of the RestorerID backend is worth: one CFG step with and without it, side by side.

    python bench/bench_savings.py                       # full SD1.5 widths, 512 px faces, CPU, fp32
    python bench/bench_savings.py --size 256 --repeats 3

Random weights at the published widths (speed does not depend on their values). The savings, each exact (the
output stays the publisher's; the max difference between the variants is printed):

- ``lq_once``: the structure encoder, and the spade maps that depend on its output alone, run once per face
  instead of on both CFG copies (the old call: the LQ latent doubled);
- ``kv_once``: the text and identity keys/values of the UNet's cross-attention computed once per restoration
  (``RestorerIDDenoiser.prepare``) instead of at every step;
- ``encoder_sdpa``: the structure encoder's self-attention on 4-D tensors, so PyTorch takes its fused kernel
  instead of the unfused math it falls back to on 3-D input (the op alone, at each encoder width);
- ``no_op_step``: the last step of RestorerID's plan changes nothing and is skipped: one whole step per face.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_pipeline import restorerid_branch, timed_interleaved  # noqa: E402

from ridfr_core.backends.restorerid.denoiser import RestorerIDDenoiser  # noqa: E402
from ridfr_core.backends.restorerid.lq_branch import AttentionBlock  # noqa: E402
from ridfr_core.identity.adapter import build_identity_adapter  # noqa: E402
from ridfr_core.sampling.ldm_ddim import restorerid_plan  # noqa: E402
from ridfr_core.weights.checkpoints import load_config  # noqa: E402


def build_denoiser(dtype: torch.dtype) -> RestorerIDDenoiser:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**load_config("unet")).eval()
    adapter = build_identity_adapter(unet, shortcut=False).eval()
    denoiser = RestorerIDDenoiser(unet, restorerid_branch(unet), adapter)
    return denoiser.to(dtype).requires_grad_(False)


def encoder_attention_shapes(denoiser: RestorerIDDenoiser, latent: torch.Tensor) -> list[tuple[int, int, int]]:
    """(batch * heads, tokens, head width) of every self-attention of the structure encoder for ``latent``."""
    shapes = []

    def record(module, args):
        batch, channels, height, width = args[0].shape
        shapes.append((batch * module.heads, height * width, channels // module.heads))

    hooks = [m.register_forward_pre_hook(record) for m in denoiser.content.modules() if isinstance(m, AttentionBlock)]
    try:
        denoiser.content.features(latent, torch.tensor(500))
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def sdpa_3d_vs_4d(shapes, heads: int, dtype, repeats: int) -> dict[str, float]:
    """Seconds of the structure encoder's attention ops per step: 3-D input (unfused math) against 4-D."""
    tensors = [torch.randn(3, n, tokens, width, dtype=dtype) for n, tokens, width in shapes]

    def run(four_d: bool):
        for q, k, v in tensors:
            if four_d:
                q, k, v = (x.view(-1, heads, *x.shape[1:]) for x in (q, k, v))
            F.scaled_dot_product_attention(q, k, v)

    medians, _ = timed_interleaved({"3d": lambda: run(False), "4d": lambda: run(True)}, torch.device("cpu"), repeats)
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="face size in pixels (512: the published one)")
    parser.add_argument("--faces", type=int, default=1)
    parser.add_argument("--steps", type=int, default=50, help="steps per face the per-face figures assume")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    denoiser = build_denoiser(dtype)
    faces, hw, context = args.faces, args.size // 8, denoiser.unet.config.cross_attention_dim
    generator = torch.Generator().manual_seed(0)
    latents, lq = (torch.randn(faces, 4, hw, hw, generator=generator, dtype=dtype) for _ in range(2))
    text = torch.randn(2 * faces, 77, context, generator=generator, dtype=dtype)
    tokens = torch.randn(2 * faces, 4, context, generator=generator, dtype=dtype)
    model_in, lq_pair, t, scale = torch.cat([latents, latents]), torch.cat([lq, lq]), torch.tensor(500), 0.75
    prepared = denoiser.prepare(text, lq, tokens, 1.0, scale)
    variants = {
        "before": lambda: denoiser(model_in, t, text, lq_pair, tokens, 1.0, scale),
        "lq_once": lambda: denoiser(model_in, t, text, lq, tokens, 1.0, scale),
        "kv_once": lambda: denoiser(model_in, t, *denoiser.prepare(text, lq_pair, tokens, 1.0, scale)),
        "all": lambda: denoiser(model_in, t, *prepared),
    }
    with torch.no_grad():
        medians, outputs = timed_interleaved(variants, torch.device("cpu"), args.repeats)
        attention = sdpa_3d_vs_4d(encoder_attention_shapes(denoiser, lq_pair), 4, dtype, args.repeats)
    difference = max(float((out - outputs["before"]).abs().max()) for out in outputs.values())
    plan = restorerid_plan(args.steps, 1.0)
    active = sum(plan.changes_latents(i) for i in range(len(plan)))
    savings = {"lq_once": medians["before"] - medians["lq_once"], "kv_once": medians["before"] - medians["kv_once"],
               "encoder_sdpa": attention["3d"] - attention["4d"]}
    machine = f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    print(f"# one CFG step of {faces} face(s), full SD1.5 widths, {args.size}px, {dtype}, {machine}")
    print(f"step with every saving: {medians['all']:.2f}s; without lq_once/kv_once: {medians['before']:.2f}s "
          f"(max |difference| between the variants {difference:.1e})")
    print(f"encoder attention per step: 3-D {attention['3d']:.2f}s, 4-D {attention['4d']:.2f}s")
    before_step = medians["before"] + savings["encoder_sdpa"]
    for name, seconds in savings.items():
        print(f"  {name:13s} saves {seconds:6.2f}s per step ({100 * seconds / before_step:4.1f}% of the step "
              f"before), {seconds * active:7.1f}s per face at {args.steps} steps")
    print(f"  no_op_step    saves {medians['all'] * (len(plan) - active):.2f}s per face "
          f"({len(plan) - active} of {len(plan)} steps)")
    print(f"per face at {args.steps} steps, sampling: before {before_step * len(plan):.0f}s, "
          f"after {medians['all'] * active:.0f}s ({medians['all'] * active / (before_step * len(plan)):.3f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "machine": machine, "step_s": medians,
                                               "encoder_attention_s": attention, "savings_per_step_s": savings,
                                               "active_steps": active, "max_difference": difference}, indent=2))


if __name__ == "__main__":
    main()
