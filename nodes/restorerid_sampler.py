"""RestorerID's own DDIM plan as a ComfyUI sampler (``KSAMPLER``), so a workflow samples as the CLI does.

ComfyUI's built-ins cannot express the plan (:mod:`ridfr_core.sampling.ldm_ddim`): the UNet is queried at
t = 999, 979, ..., 0 while the update uses the alphas at 980, 960, ..., 0. The sigmas handed to the sampler
are those of the query timesteps (so ComfyUI feeds the UNet exactly the latent and t RestorerID does); the
update itself is ridfr_core's, in the variance-preserving latent. Every random draw comes from the faces'
seeds as ridfr_core's ``RunNoise`` makes them: the start noise (RIDFRSample), and per face the VAE posterior's
eps (handed to Content Condition's patch in ``transformer_options``) and each step's noise.
"""

from __future__ import annotations

import torch

POSTERIOR_EPS = "ridfr_posterior_eps"  # transformer_options key: (F,4,h,w) eps of the LQ latent's posterior sample
SAMPLER_NAME, SCHEDULER_NAME = "restorerid_ddim", "restorerid"


def restorerid_sigmas(model, steps: int) -> torch.Tensor:
    """ComfyUI sigmas of the plan's query timesteps, then 0 (ComfyUI's end marker; the last step runs at t=0)."""
    from ..ridfr_core.sampling.ldm_ddim import restorerid_plan

    timesteps = torch.tensor(restorerid_plan(steps, 0.0).model_t, dtype=torch.float32)
    sigmas = model.get_model_object("model_sampling").sigma(timesteps)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


@torch.no_grad()
def sample_restorerid_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, seeds=(0,), eta=1.0):
    """k-diffusion-style sampler function: ``x`` is ComfyUI's scaled start noise at ``sigmas[0]``."""
    from ..ridfr_core.sampling.ldm_ddim import ddim_update, restorerid_plan
    from ..ridfr_core.sampling.noise import RunNoise

    extra_args = dict(extra_args or {})
    steps, shape = len(sigmas) - 1, tuple(x.shape)
    plan = restorerid_plan(steps, eta)
    noise = RunNoise(list(seeds))
    if len(noise.seeds) != shape[0]:
        raise ValueError(f"RestorerID DDIM: {len(noise.seeds)} seeds for {shape[0]} latents.")
    options = dict(extra_args.get("model_options", {}))
    options["transformer_options"] = {**options.get("transformer_options", {}), POSTERIOR_EPS: noise.posterior(shape)}
    extra_args["model_options"] = options
    ones = x.new_ones([shape[0]])
    latents = (x / torch.sqrt(1 + sigmas[0] ** 2)).float()  # ComfyUI's noise scaling undone: x_T itself
    for index in range(steps):
        sigma = sigmas[index]
        model_in = latents * torch.sqrt(1 + sigma ** 2)  # ComfyUI divides this back out before the UNet
        denoised = model(model_in.to(x.dtype), sigma * ones, **extra_args)
        eps = ((model_in - denoised.float()) / sigma).float()
        latents = ddim_update(latents, eps, plan, index, noise.next(shape).to(latents.device))
        if callback is not None:
            callback({"x": model_in, "i": index, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
    return latents.to(x.dtype)


def restorerid_sampler(seeds: list[int], eta: float = 1.0):
    """A ComfyUI SAMPLER for ``comfy.sample.sample_custom`` with the faces' seeds (face i: its own seed)."""
    import comfy.samplers

    return comfy.samplers.KSAMPLER(sample_restorerid_ddim, extra_options={"seeds": list(seeds), "eta": eta})
