"""What the processes of a training run share (``accelerate launch``, one process per GPU, or per CPU process over
gloo): the accelerator, and each step's losses gathered from every process, which stop every process alike when
one saw a non-finite loss."""

from __future__ import annotations

import os

import torch

from .options import ConfigError, TrainConfig


def make_accelerator(config: TrainConfig):
    from accelerate import Accelerator

    has_gpu = torch.cuda.is_available() or torch.backends.mps.is_available() or (
        hasattr(torch, "xpu") and torch.xpu.is_available())
    if config.mixed_precision != "no" and not has_gpu:
        # Half-precision training is for GPUs: CPU half kernels are slow (fp16 several times slower than fp32).
        # The tests still drive CPU training steps in fp16/bf16 with their own Accelerator, to catch dtype bugs.
        raise ConfigError(f"mixed_precision: '{config.mixed_precision}' needs a GPU; on CPU use "
                          "--set mixed_precision=no.")
    # cpu: without a GPU, the processes of `accelerate launch --multi_gpu` train together over gloo
    accelerator = Accelerator(mixed_precision=config.mixed_precision, project_dir=config.out, cpu=not has_gpu)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:  # each process would train alone, all writing into one --out
        raise ConfigError(f"the launcher started {launched} processes, but accelerate runs this one alone "
                          f"({accelerator.distributed_type}, device {accelerator.device}): no distributed backend for "
                          "this device. Launch one process, or use CUDA GPUs or CPUs.")
    return accelerator


class NonFiniteLoss(FloatingPointError):
    """A loss that is NaN or inf on some process, raised on every process alike (``main``: this is the
    main process, which reports it)."""

    def __init__(self, message: str, main: bool):
        super().__init__(message)
        self.main = main


def losses_of_every_process(accelerator, local: dict[str, torch.Tensor], skipped: int, step: int
                            ) -> tuple[dict[str, float], int]:
    """Every process's mean losses and skipped images of ``step``, gathered (one collective and one device sync per
    step) -> the mean losses over processes (equal micro-batches: what one process with the whole batch computes)
    and the step's skipped images over processes. A non-finite loss on any process raises on every process, at
    the same step, instead of leaving the others waiting in the next all-reduce."""
    device = next(iter(local.values())).device
    mine = torch.stack([value.float() for value in local.values()] + [torch.tensor(float(skipped), device=device)])
    rows = accelerator.gather(mine).view(accelerator.num_processes, -1).cpu()
    losses = rows[:, :-1]
    bad = [rank for rank in range(accelerator.num_processes) if not torch.isfinite(losses[rank]).all()]
    if bad:
        shown = {key: float(value) for key, value in zip(local, losses[bad[0]])}
        raise NonFiniteLoss(f"step {step}: loss is {shown} on process {', '.join(map(str, bad))}; lower "
                            "learning_rate, use mixed_precision=bf16/no, or check --init-content and --base for NaN "
                            "weights. The last checkpoint is intact.", accelerator.is_main_process)
    return dict(zip(local, losses.mean(0).tolist())), int(rows[:, -1].sum())
