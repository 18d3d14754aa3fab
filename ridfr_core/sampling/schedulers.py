"""The samplers a restoration can use, built from the base model's noise schedule."""

from __future__ import annotations

from diffusers import DDIMScheduler, UniPCMultistepScheduler

SAMPLERS = ("unipc", "ddim")


def make_scheduler(sampler: str, scheduler_config: dict, ddim_spacing: str | None = None):
    """UniPC or DDIM; ``ddim_spacing`` overrides the base model's timestep spacing (RestorerID's DDIM starts at
    t=999, the last training step, hence "trailing")."""
    if sampler == "unipc":
        return UniPCMultistepScheduler.from_config(scheduler_config)
    if sampler == "ddim":
        spacing = ddim_spacing or scheduler_config.get("timestep_spacing", "leading")
        return DDIMScheduler.from_config({**scheduler_config, "timestep_spacing": spacing})
    raise ValueError(f"sampler: '{sampler}' is not one of {', '.join(SAMPLERS)}.")
