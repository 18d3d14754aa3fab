"""The samplers a restoration can use, built from the base model's noise schedule."""

from __future__ import annotations

from diffusers import DDIMScheduler, UniPCMultistepScheduler

from .ldm_ddim import RESTORERID_DDIM

SAMPLERS = ("unipc", "ddim", RESTORERID_DDIM)  # the last: LDM's DDIM plan as RestorerID runs it (ldm_ddim.py)


def make_scheduler(sampler: str, scheduler_config: dict, ddim_spacing: str | None = None):
    """diffusers' UniPC or DDIM (the LDM plan is :mod:`.ldm_ddim`'s); ``ddim_spacing`` overrides the base model's timestep spacing (RestorerID's DDIM starts at
    t=999, the last training step, hence "trailing")."""
    if sampler == "unipc":
        return UniPCMultistepScheduler.from_config(scheduler_config)
    if sampler == "ddim":
        spacing = ddim_spacing or scheduler_config.get("timestep_spacing", "leading")
        return DDIMScheduler.from_config({**scheduler_config, "timestep_spacing": spacing})
    raise ValueError(f"sampler: '{sampler}' is not one of {', '.join(SAMPLERS)}.")
