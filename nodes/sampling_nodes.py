"""RIDFRSample (ComfyUI's own sampler over the patched MODEL, decode, paste back) and PasteFaces."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from comfy_api.latest import io

from ..ridfr_core.constants import LATENT_CHANNELS, LATENT_FACTOR
from .restorerid_sampler import SAMPLER_NAME, SCHEDULER_NAME, restorerid_sampler, restorerid_sigmas
from .sockets import FacesSocket, NodeError, image_to_nchw, invalid_choice, nchw_to_image
from .validation import checked_by_comfyui, node_inputs

SETTINGS = ("backend defaults", "custom")
# ComfyUI's sampler for each backend's published one. diffusers' trailing DDIM with eta 1 is ComfyUI's "ddpm"
# step over its "simple" schedule; RestorerID's own DDIM plan (queried at 999, 979, ..., updated with the alphas
# at 980, 960, ...) is no ComfyUI built-in: restorerid_sampler.py implements it.
COMFY_SAMPLERS = {"unipc": ("uni_pc", "normal"), "ddim": ("ddpm", "simple"),
                  "restorerid-ddim": (SAMPLER_NAME, SCHEDULER_NAME)}


def paste_back(faces, restored: torch.Tensor, node: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(photos IMAGE, masks MASK (F,H,W)) with the restored faces (F,3,S,S) pasted into their photos; in
    aligned mode the restored faces themselves with full masks."""
    from ..ridfr_core.faces import FaceError, paste_restored

    if restored.shape[0] != faces.count:
        raise NodeError(node, "images", f"{restored.shape[0]} restored images for {faces.count} faces; decode the "
                        "latent that was sampled for these faces (one image per face).")
    if restored.shape[-1] != faces.size or restored.shape[-2] != faces.size:
        restored = F.interpolate(restored, size=(faces.size, faces.size), mode="bicubic", antialias=True).clamp(0, 1)
    if faces.photos is None:
        return nchw_to_image(restored), torch.ones(faces.count, faces.size, faces.size)
    photos, masks = [], []
    for entry in faces.photos:
        part = restored[entry.first:entry.first + len(entry.photo.faces)]
        try:
            result = paste_restored(entry.photo, part)
        except FaceError as error:
            raise NodeError(node, "faces", str(error)) from None
        photos.append(torch.from_numpy(result.image).float() / 255.0)
        masks.append(torch.from_numpy(result.masks))
    return torch.stack(photos), torch.cat(masks)


def unclamped(vae):
    """The same VAE (shared weights) whose decode is not clamped to [0, 1] (RestorerID's colour fix reads that)."""
    import copy

    raw = copy.copy(vae)
    raw.process_output = lambda image: (image + 1.0) / 2.0
    return raw


def encode_prompt(clip, text: str):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def sampling_problems(sampler_name, scheduler, settings, skip: set[str] = frozenset()) -> str | None:
    """What is wrong with RIDFRSample's choices; None = linked (e.g. a sampler selector node), known when it runs;
    ``skip``: the choices ComfyUI checks itself."""
    import comfy.samplers

    if scheduler is not None and "scheduler" not in skip and scheduler not in comfy.samplers.KSampler.SCHEDULERS:
        return f"RIDFRSample (scheduler): '{scheduler}' is not a ComfyUI scheduler."
    if sampler_name is not None and "sampler_name" not in skip and sampler_name not in comfy.samplers.KSampler.SAMPLERS:
        return f"RIDFRSample (sampler_name): '{sampler_name}' is not a ComfyUI sampler."
    return None if "settings" in skip else invalid_choice("RIDFRSample", "settings", settings, SETTINGS)


class SamplerSettings:
    """What RIDFRSample samples with: the backend's published settings, or the node's widgets. The
    strengths are not here: Content Condition and Identity Condition set them, each in one place."""

    def __init__(self, backend, settings: str, steps: int, guidance: float, sampler_name: str, scheduler: str):
        if settings == "backend defaults":
            steps, guidance = backend.steps, backend.guidance
            sampler_name, scheduler = COMFY_SAMPLERS[backend.sampler]
        self.steps, self.guidance = steps, guidance
        self.sampler_name, self.scheduler = sampler_name, scheduler
        self.source = f"{backend.label}'s published settings" if settings == "backend defaults" else "the widgets"

    def describe(self, faces, seed: int) -> str:
        """What was sampled with, for the report output (shown on the canvas by a preview node)."""
        offsets = "seed + its track" if faces.tracks is not None else "seed + its index"
        return (f"{faces.count} face(s) sampled with {self.source}: {self.sampler_name} / {self.scheduler}, "
                f"{self.steps} steps, CFG {self.guidance:g}; seed {seed} (each face: {offsets}); prompts and "
                f"colour fix of {faces.backend.label}{' (wavelet colour fix on)' if faces.backend.color_fix else ''}.")


def per_face_noise_sampler(seeds: list[int], shape: tuple[int, ...], device):
    """k-diffusion ``noise_sampler(sigma, sigma_next)`` drawing each step's noise per face from the face's step
    stream (ridfr_core's ``RunNoise``, as the CLI draws it): ComfyUI's default draws a batch from one
    generator, so a face would restore differently alone than beside others."""
    from ..ridfr_core.sampling.noise import RunNoise

    run_noise = RunNoise(seeds)

    def noise(sigma, sigma_next):
        return run_noise.next(shape).to(device)

    return noise


def comfy_sampler(name: str, noise_sampler):
    """ComfyUI's sampler ``name``, given the per-face noise wherever its function draws noise each step."""
    import inspect

    import comfy.k_diffusion.sampling as k_diffusion
    import comfy.samplers

    function = getattr(k_diffusion, f"sample_{name}", None)
    takes_options = name != "dpm_fast"  # ComfyUI's dpm_fast wrapper passes no options (and it runs with eta 0)
    if takes_options and function is not None and "noise_sampler" in inspect.signature(function).parameters:
        return comfy.samplers.ksampler(name, {"noise_sampler": noise_sampler})
    return comfy.samplers.sampler_object(name)  # no noise after the start (or none we can give per face)


def sample_faces(model, clip, faces, seed: int, settings: SamplerSettings) -> torch.Tensor:
    """Latents (F,4,S/8,S/8) for the faces, sampled by ComfyUI from noise drawn with local generators, per face
    for the start noise and for each step's (face i uses seed + i, as ridfr_core's pipeline does; tracked video
    faces seed + their track), so a face restores the same alone as in a batch with every sampler."""
    import comfy.sample
    import comfy.samplers
    import comfy.utils
    import latent_preview
    from ..ridfr_core.sampling.noise import face_seed, seeded_noise

    side = faces.size // LATENT_FACTOR
    latent = torch.zeros(faces.count, LATENT_CHANNELS, side, side)
    seeds = [face_seed(seed, offset) for offset in faces.seed_offsets()]
    noise = seeded_noise(tuple(latent.shape), seeds, "cpu", torch.float32)
    positive = encode_prompt(clip, faces.backend.positive_prompt)
    negative = encode_prompt(clip, faces.backend.negative_prompt)
    callback = latent_preview.prepare_callback(model, settings.steps)
    if settings.sampler_name == SAMPLER_NAME:  # RestorerID's own plan, its draws from the faces' seeds
        sampler, sigmas = restorerid_sampler(seeds, faces.backend.ddim_eta), restorerid_sigmas(model, settings.steps)
    else:
        sigmas = comfy.samplers.KSampler(model, steps=settings.steps, device=model.load_device,
                                         sampler=settings.sampler_name, scheduler=settings.scheduler, denoise=1.0,
                                         model_options=model.model_options).sigmas
        sampler = comfy_sampler(settings.sampler_name,
                                per_face_noise_sampler(seeds, tuple(latent.shape), model.load_device))
    return comfy.sample.sample_custom(model, noise, settings.guidance, sampler, sigmas, positive, negative, latent,
                                      callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)


class RIDFRSample(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import comfy.samplers

        return io.Schema(
            node_id="RIDFRSample",
            display_name="RIDFR Sample",
            category="RIDFR",
            description="Restores the faces of Content Condition with ComfyUI's sampler, decodes them and, for "
                        "whole photos, pastes them back. With settings 'backend defaults' it samples as the content "
                        "module was published: RIDFR with UniPC 20 steps, no CFG; RestorerID with its own DDIM plan "
                        "(eta 1, 50 steps, a sampler of this pack), CFG 4. The identity and content strengths are "
                        "Identity Condition's weight and Content Condition's strength. Prompts (RIDFR: empty; "
                        "RestorerID: its positive/negative prompts) and RestorerID's wavelet colour fix always "
                        "follow the content module.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL from Content Condition (and Identity Condition)."),
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP, to encode the content module's prompts (RIDFR: "
                                              "the empty prompt; RestorerID: its positive and negative prompts)."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE, to decode the restored faces."),
                FacesSocket.Input("faces", tooltip="The faces output of the Content Condition that patched the model."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed; face i uses seed + i (with track_faces: seed + its track, so a "
                                     "face keeps its noise through the frames)."),
                io.Int.Input("steps", default=20, min=1, max=200,
                             tooltip="Sampling steps (settings 'custom' only; backend defaults: RIDFR 20, "
                                     "RestorerID 50)."),
                io.Float.Input("guidance", default=1.0, min=1.0, max=10.0, step=0.1,
                               tooltip="CFG against the null identity (and RestorerID's negative prompt); 1.0 turns "
                                       "it off and is twice as fast (settings 'custom' only; backend defaults: RIDFR "
                                       "1.0, RestorerID 4.0)."),
                io.Combo.Input("sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS), default="uni_pc",
                               tooltip="ComfyUI sampler (settings 'custom' only; backend defaults: RIDFR uni_pc, "
                                       "RestorerID its own DDIM plan, which no ComfyUI sampler expresses; ddpm + "
                                       "simple is the nearest built-in)."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="normal",
                               tooltip="ComfyUI noise schedule (settings 'custom' only; backend defaults: RIDFR "
                                       "normal, RestorerID its own plan: queried at t = 999, 979, ..., 0)."),
                io.Combo.Input("settings", options=list(SETTINGS), default="backend defaults",
                               tooltip="'backend defaults': steps, guidance, sampler and scheduler as the content "
                                       "module was published (the four widgets above are greyed out and unused; "
                                       "the report output says what was used); 'custom': the widgets above."),
            ],
            outputs=[
                io.Image.Output(display_name="restored_faces", tooltip="The restored aligned faces."),
                io.Image.Output(display_name="photo", tooltip="Whole-photo mode: the photos with the restored faces "
                                                              "pasted back; aligned mode: the restored faces."),
                io.Mask.Output(display_name="masks", tooltip="Where each face was pasted (one mask per face)."),
                io.String.Output(display_name="report", tooltip="The settings the faces were sampled with (with "
                                                                "'backend defaults': the backend's, not the widgets)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, scheduler) -> bool | str:
        # One parameter, so that ComfyUI shows a message once; the other inputs come from the prompt.
        values = node_inputs(scheduler=scheduler)
        skip = checked_by_comfyui(("settings", "sampler_name", "scheduler"), "scheduler")
        return sampling_problems(values.get("sampler_name"), scheduler, values.get("settings"), skip) or True

    @classmethod
    def execute(cls, model, clip, vae, faces, seed, steps, guidance, sampler_name, scheduler,
                settings) -> io.NodeOutput:
        from ..ridfr_core.sampling.colorfix import wavelet_color_fix

        problem = sampling_problems(sampler_name, scheduler, settings)  # linked inputs now known
        if problem:
            raise ValueError(problem)
        chosen = SamplerSettings(faces.backend, settings, steps, guidance, sampler_name, scheduler)
        samples = sample_faces(model, clip, faces, seed, chosen)
        if faces.backend.color_fix and faces.backend.color_fix_unclamped:  # fix the raw decode, then clamp
            restored = wavelet_color_fix(image_to_nchw(unclamped(vae).decode(samples)), faces.lq)
        else:
            restored = image_to_nchw(vae.decode(samples))
            if faces.backend.color_fix:
                restored = wavelet_color_fix(restored, faces.lq)
        photos, masks = paste_back(faces, restored, "RIDFRSample")
        return io.NodeOutput(nchw_to_image(restored), photos, masks, chosen.describe(faces, seed))


class PasteFaces(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PasteFaces",
            display_name="Paste Faces (RIDFR)",
            category="RIDFR",
            description="Pastes restored faces (e.g. KSampler + VAE Decode) back into the photos Content Condition "
                        "found them in.",
            inputs=[
                FacesSocket.Input("faces", tooltip="The faces output of Content Condition."),
                io.Image.Input("images", tooltip="The restored faces, one per face, in the same order."),
            ],
            outputs=[
                io.Image.Output(display_name="photo", tooltip="The photos with the faces pasted back (aligned mode: "
                                                              "the faces)."),
                io.Mask.Output(display_name="masks", tooltip="Where each face was pasted (one mask per face)."),
            ],
        )

    @classmethod
    def execute(cls, faces, images) -> io.NodeOutput:
        photos, masks = paste_back(faces, image_to_nchw(images), "PasteFaces")
        return io.NodeOutput(photos, masks)
