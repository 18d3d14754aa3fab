"""LDM's DDIM plan as RestorerID's inference runs it (StableSR's ``ddim_sampling_sr_t``), the default sampler of
the RestorerID backend.

It differs from every diffusers/ComfyUI spacing, so it is stated here once for the CLI and the nodes:

- the UNet and the structure encoder are queried at ``space_timesteps(1000, [S])`` (999, 979, 958, ..., 20, 0
  for S=50: rounded multiples of 999/(S-1));
- the update uses the cumulative alphas at ``range(0, 1000, 1000 // S)`` (980, 960, ..., 0, LDM's
  ``make_ddim_timesteps`` without its "+1"), so the first update starts from alpha_bar[980];
- the previous alpha of the last step is alpha_bar[0] itself, so the last step (t=0) changes nothing: its
  update is ``x - sqrt(1-a) eps + sqrt(1-a) eps`` with sigma 0. Theirs still queries the UNet at t=0 and
  draws a step noise it multiplies by 0; ours skips the step (:meth:`DDIMPlan.changes_latents`), which leaves
  the latents as theirs up to float32 rounding and draws nothing after the last noise that counts.

The arithmetic follows theirs in float32 (alphas from LDM's float64 schedule cast to float32, sigmas in
float64 cast to float32), so a port reproduces their latents to float32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RESTORERID_DDIM = "restorerid-ddim"
TRAIN_STEPS = 1000


def space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """The timesteps the UNet sees, ascending: ``count`` points spread evenly over ``0..num_timesteps-1``."""
    if count > num_timesteps:
        raise ValueError(f"cannot take {count} steps out of {num_timesteps}")
    stride = (num_timesteps - 1) / (count - 1) if count > 1 else 1
    steps, position = [], 0.0
    for _ in range(count):
        steps.append(round(position))
        position += stride
    return sorted(set(steps))


def ldm_alphas_cumprod(scheduler_config: dict) -> torch.Tensor:
    """alpha_bar of SD1.5's schedule as LDM computes it (float64 "linear" in sqrt(beta)), stored as float32."""
    if scheduler_config.get("beta_schedule", "scaled_linear") != "scaled_linear":
        raise ValueError("the RestorerID DDIM plan needs SD1.5's scaled_linear beta schedule.")
    start, end = scheduler_config.get("beta_start", 0.00085), scheduler_config.get("beta_end", 0.012)
    count = scheduler_config.get("num_train_timesteps", TRAIN_STEPS)
    betas = torch.linspace(start ** 0.5, end ** 0.5, count, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


@dataclass(frozen=True)
class DDIMPlan:
    """Per step, in sampling order: the UNet timestep, and the float32 coefficients of the update."""

    model_t: list[int]                # 999, 979, ..., 0
    alpha_t: list[int]                # the alpha indices the update uses: 980, 960, ..., 0
    alphas: torch.Tensor              # alpha_bar[alpha_t]
    alphas_prev: torch.Tensor
    sigmas: torch.Tensor
    sqrt_one_minus_alphas: torch.Tensor

    def __len__(self) -> int:
        return len(self.model_t)

    def changes_latents(self, index: int) -> bool:
        """False for a step whose update is the identity (the same alpha before and after, so sigma is 0 and
        the eps terms cancel): nothing needs computing for it."""
        return bool(self.alphas[index] != self.alphas_prev[index])


def restorerid_plan(steps: int, eta: float, scheduler_config: dict | None = None) -> DDIMPlan:
    """The plan of ``steps`` DDIM steps with ``eta`` (RestorerID: 50 and 1.0)."""
    alphacums = ldm_alphas_cumprod(scheduler_config or {})
    total = alphacums.shape[0]
    model_t = space_timesteps(total, steps)[::-1]
    if len(model_t) != steps:
        raise ValueError(f"RestorerID DDIM: {steps} steps give only {len(model_t)} distinct timesteps.")
    alpha_t = list(range(0, total, total // steps))[:steps]
    alphas = alphacums[alpha_t]
    prev = torch.cat([alphacums[:1], alphacums[alpha_t[:-1]]]).double()
    sigmas = eta * torch.sqrt((1 - prev) / (1 - alphas.double()) * (1 - alphas.double() / prev))
    order = list(range(steps))[::-1]   # sampling runs the alpha list backwards
    return DDIMPlan(model_t, [alpha_t[i] for i in order], alphas[order], prev.float()[order], sigmas.float()[order],
                    torch.sqrt(1 - alphas)[order])


def ddim_update(latents: torch.Tensor, eps: torch.Tensor, plan: DDIMPlan, index: int,
                noise: torch.Tensor | None) -> torch.Tensor:
    """One update of step ``index`` (sampling order): x0 from eps, then the DDIM step with its noise."""
    a_t, a_prev, sigma = plan.alphas[index], plan.alphas_prev[index], plan.sigmas[index]
    pred_x0 = (latents - plan.sqrt_one_minus_alphas[index] * eps) / a_t.sqrt()
    direction = (1.0 - a_prev - sigma ** 2).sqrt() * eps
    out = a_prev.sqrt() * pred_x0 + direction
    return out + sigma * noise if noise is not None else out
