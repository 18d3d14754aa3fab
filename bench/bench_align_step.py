"""Cost of one Alignment Learning step on RestorerID at full width, to size a run (README "Make
alignment-trained weights").

    python bench/bench_align_step.py --size 256 --steps 2        # measured on this CPU
    python bench/bench_align_step.py --size 512 --count-only      # FLOPs and activation memory at full size

Full-size SD1.5 UNet, VAE encoder, FaceID Plus (v1) adapter and RestorerID's LQ branch (widths from the
published layout, ``../shared/notes/restorerid-layout.json``), random weights (speed does not depend on their
values). One step as the trainer takes it: VAE-encode target and LQ (no grad), identity tokens, one forward of
the denoiser on the doubled batch (ID1 and ID2), the loss of Eq. 6 and its backward into IDBalance only.
FLOPs are counted with ``torch.utils.flop_counter`` (the same count on any device), activation memory is the
bytes autograd saves for the backward (``saved_tensors_hooks``); with ``--count-only`` both are computed on
the meta device, so 512 px costs no memory. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from ridfr_core.backends.restorerid import RESTORERID
from ridfr_core.backends.restorerid.denoiser import RestorerIDDenoiser
from ridfr_core.backends.restorerid.lq_branch import LQBranch, branch_state_from_checkpoint
from ridfr_core.identity.adapter import build_identity_adapter
from ridfr_core.weights.checkpoints import load_config

LAYOUT = Path(__file__).resolve().parents[2] / "shared" / "notes" / "restorerid-layout.json"


def build(device: str):
    keys = json.loads(LAYOUT.read_text())["keys"]
    meta = {k: torch.empty(shape, device="meta") for k, shape in keys.items()}
    with torch.device(device):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**load_config("unet")).requires_grad_(False)
        vae = AutoencoderKL(**load_config("vae")).requires_grad_(False)
        branch = LQBranch(LQBranch.config_from_state(branch_state_from_checkpoint(meta))).requires_grad_(False)
        adapter = build_identity_adapter(unet, 1280, shortcut=False)
    trainable = RESTORERID.trainable_parameters(branch)
    for param in trainable:
        param.requires_grad_(True)
    return RestorerIDDenoiser(unet, branch, adapter), vae, trainable


def step(denoiser, vae, batch: int, size: int, device: str, saved: list):
    """One training step's work; ``saved`` collects the bytes autograd keeps for the backward."""
    with torch.no_grad():
        images = torch.randn(2 * batch, 3, size, size, device=device)
        latents = vae.encode(images).latent_dist.mode().contiguous() * 0.18215  # target and LQ (see the trainer)
        tokens = torch.randn(2 * batch, 4, 768, device=device)  # ID1, ID2 tokens (the projection costs ~nothing)
    target, lq = latents[:batch], latents[batch:]
    noise = torch.randn_like(target)
    timesteps = torch.randint(0, 1000, (batch,), device=device)
    noisy = target + noise  # the schedule's scaling costs nothing
    twice = lambda x: torch.cat([x, x])  # noqa: E731
    text = torch.randn(2 * batch, 77, 768, device=device)

    def keep(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        eps1, eps2 = denoiser(twice(noisy), twice(timesteps), text, twice(lq), tokens, 1.0, 0.75).chunk(2)
        loss = (F.mse_loss(eps1, noise) + F.mse_loss(eps2, noise)) / 2 + F.mse_loss(eps1, eps2)
    loss.backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1, help="faces per step (each runs twice: ID1, ID2)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up")
    parser.add_argument("--count-only", action="store_true", help="FLOPs and activation bytes on the meta device")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="as the trainer's default")
    args = parser.parse_args()
    device = "meta" if args.count_only else "cpu"
    denoiser, vae, trainable = build(device)
    denoiser.gradient_checkpointing = args.gradient_checkpointing
    saved: list[int] = []
    with FlopCounterMode(display=False) as counter:
        step(denoiser, vae, args.batch, args.size, device, saved)
    result = {"size": args.size, "batch": args.batch, "gradient_checkpointing": args.gradient_checkpointing,
              "tflop_per_step": counter.get_total_flops() / 1e12,
              "activation_gib_fp32": sum(saved) / 2 ** 30, "trained_params_m": sum(p.numel() for p in trainable) / 1e6}
    if not args.count_only:
        times = []
        for _ in range(args.steps):
            for param in trainable:
                param.grad = None
            start = time.perf_counter()
            step(denoiser, vae, args.batch, args.size, device, [])
            times.append(time.perf_counter() - start)
        result |= {"cpu_seconds_per_step": min(times), "cpu_threads": torch.get_num_threads(),
                   "cpu_tflops_achieved": result["tflop_per_step"] / min(times),
                   "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
