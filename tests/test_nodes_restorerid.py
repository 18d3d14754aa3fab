"""RestorerID's LQ branch as ComfyUI patches (nodes/restorerid_patches.py), in-process against a real ComfyUI
with tiny weights in the published checkpoint layout (``RestorerIDFull.ckpt``, FaceID Plus v1): loading,
the patched MODEL against ridfr_core's diffusers backend over a sampled trajectory, cond/uncond identity
routing, unpatching bit for bit, IDBalance, KSampler and RIDFRSample."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from comfy_host import RESTORERID_ADAPTER, RESTORERID_FILE, pack_core, requires_comfyui
from tiny_models import SCHEDULER
from test_nodes import FACE, comfy_eps, content_condition, env, face_identity, lq_faces, random_identity, run  # noqa: F401 (env: fixture)

pytestmark = requires_comfyui


@pytest.fixture(scope="module")
def ridfr(env):
    """LoadRIDFR with the RestorerID checkpoint and FaceID Plus v1."""
    return run(env, "LoadRIDFR", content_weights=RESTORERID_FILE, ipadapter=RESTORERID_ADAPTER,
               clip_vision=env.tiny.clip_vision.name, insightface="buffalo_l", face_device="cpu")[0]


def content(env, ridfr, faces, strength=1.0, model=None, **options):
    return content_condition(env, faces, **{"ridfr": ridfr, "strength": strength, "model": model or env.model,
                                            "vae": env.vae, **options})


def identity_condition(env, ridfr, model, identity, weight=0.7, lora_strength=1.0):
    return run(env, "IdentityCondition", model=model, ridfr=ridfr, identity=identity, weight=weight,
               lora_strength=lora_strength, auto_weight="off")[0]


def with_branch(env, ridfr, change):
    """The same LoadedRIDFR with a changed copy of the LQ branch."""
    branch = copy.deepcopy(env.pack.nodes.sockets.module_of(ridfr.content))
    with torch.no_grad():
        change(branch)
    return dataclasses.replace(ridfr, content=env.pack.nodes.memory.whole_module_patcher(branch))


def prompt(env, text):
    return env.clip.encode_from_tokens_scheduled(env.clip.tokenize(text))


def rounded_vae(env):
    """The diffusers VAE with the weights ComfyUI reads (the checkpoint stores the VAE in fp16)."""
    vae = copy.deepcopy(env.tiny.vae)
    with torch.no_grad():
        for param in vae.parameters():
            param.copy_(param.half().float())
    return vae.eval()


@pytest.fixture(scope="module")
def denoiser(env):
    """ridfr_core's diffusers backend over the same files: RestorerIDDenoiser with FaceID Plus v1 and its LoRA."""
    from ridfr_core import backends
    from ridfr_core.weights import adapter_files
    from ridfr_core.backends.restorerid.denoiser import RestorerIDDenoiser

    unet = copy.deepcopy(env.tiny.unet)
    adapter, lora = adapter_files.load_identity_adapter(env.tiny.root / "ipadapter" / RESTORERID_ADAPTER, unet)
    adapter_files.fuse_lora(unet, lora, 1.0)
    branch = backends.load_content(env.tiny.root / "ridfr" / RESTORERID_FILE)
    return RestorerIDDenoiser(unet, branch, adapter).eval()


# ------------------------------------------------------------------------------------------------


def test_load_ridfr_tells_the_backends_apart_and_wants_faceid_plus_v1(env, ridfr):
    backends = pack_core("backends")

    assert ridfr.backend is backends.RESTORERID and env.ridfr.backend is backends.RIDFR
    assert isinstance(env.pack.nodes.sockets.module_of(ridfr.content), pack_core("backends.restorerid.lq_branch").LQBranch)
    with pytest.raises(ValueError, match=r"LoadRIDFR \(ipadapter\): 'ip-adapter-faceid-plusv2_sd15.bin' is IP-Adapter "
                                         r"FaceID PlusV2.*choose ip-adapter-faceid-plus_sd15.bin"):
        run(env, "LoadRIDFR", content_weights=RESTORERID_FILE, ipadapter=env.tiny.adapter_v2.name,
            clip_vision=env.tiny.clip_vision.name, insightface="buffalo_l", face_device="cpu")


def test_content_condition_needs_the_vae_for_restorerid(env, ridfr):
    with pytest.raises(ValueError, match=r"ContentCondition \(vae\): the RestorerID weights condition on the VAE "
                                         r"latent.*connect the checkpoint's VAE"):
        content(env, ridfr, lq_faces(1), vae=None)


def test_lq_posterior_is_the_scaled_posterior_ridfr_core_samples(env, ridfr):
    """Mean and std as ridfr_core reads them: with a posterior eps, mean + std * eps is ridfr_core's sample."""
    content_input = pack_core("backends").RESTORERID.content_input

    faces = lq_faces(2).permute(0, 3, 1, 2)
    got, std = env.pack.nodes.condition_nodes.lq_posterior(env.model, env.vae, faces)
    branch = env.pack.nodes.sockets.module_of(ridfr.content)
    expected = content_input(branch, faces * 2 - 1, rounded_vae(env), (FACE // 8, FACE // 8))
    assert expected.abs().mean() > 0.01
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    eps = torch.randn(got.shape, generator=torch.Generator().manual_seed(3))
    sample = content_input(branch, faces * 2 - 1, rounded_vae(env), (FACE // 8, FACE // 8), eps)
    assert (sample - expected).abs().mean() > 1e-3
    torch.testing.assert_close(got + std * eps, sample, atol=1e-4, rtol=1e-4)


def test_unpatching_restores_the_unet_bit_for_bit_and_the_original_model_is_untouched(env, ridfr):
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    unet = env.model.model.diffusion_model
    x_d, sigma = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(11)), torch.tensor([3.0])
    text = env.text.expand(2, -1, -1)
    weights = {name: value.clone() for name, value in unet.state_dict().items()}
    options, wrappers = copy.deepcopy(env.model.model_options), copy.deepcopy(env.model.wrappers)
    base = comfy_eps(env.model, x_d, sigma, text, [0])

    patched, faces, _, _ = content(env, ridfr, lq_faces(2))
    modulated = comfy_eps(patched, x_d, sigma, text, [0])
    assert type(unet.input_blocks[1][0]).__name__ == "ModulatedResBlock"  # the object patch is in place
    assert list(unet.state_dict()) == list(weights)  # same parameter names: weight patches and LoRAs still apply
    assert (modulated - base).abs().max() > 1e-3
    off, _, _, _ = content(env, ridfr, lq_faces(2), strength=0.0)
    assert torch.equal(comfy_eps(off, x_d, sigma, text, [0]), base)

    assert torch.equal(comfy_eps(env.model, x_d, sigma, text, [0]), base)
    assert type(unet.input_blocks[1][0]) is ResBlock and type(unet.middle_block[2]) is ResBlock
    assert all(torch.equal(value, weights[name]) for name, value in unet.state_dict().items())
    assert env.model.object_patches == {} and env.model.model_options == options and env.model.wrappers == wrappers


def test_idbalance_at_zero_equals_the_spade_only_path(env, ridfr):
    """IDBalance (zero-initialised gamma'/beta' convs) adds nothing when zero, whatever tokens it reads, so the
    result is the spade-only path's; with trained weights it reads the identity IdentityCondition provides (here
    at weight 0, so only IDBalance sees the identity), and without one the null identity, as RestorerID trained."""
    from ridfr_core.identity.adapter import null_identity

    def zero_idbalance(branch):
        for name, param in branch.named_parameters():
            if ".IDBalance.mlp_gamma." in name or ".IDBalance.mlp_beta." in name:
                param.zero_()

    x_d, sigma = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(12)), torch.tensor([2.0])
    identity = face_identity(env, random_identity())
    null = face_identity(env, null_identity(env.pack.nodes.sockets.module_of(ridfr.clip_vision)))
    results = {}
    for label, models in (("zero", with_branch(env, ridfr, zero_idbalance)), ("trained", ridfr)):
        content_only, _, _, _ = content(env, models, lq_faces(1))
        balanced = identity_condition(env, models, content_only, identity, weight=0.0, lora_strength=0.0)
        as_null = identity_condition(env, models, content_only, null, weight=0.0, lora_strength=0.0)
        results[label] = [comfy_eps(patched, x_d, sigma, env.text, [0]) for patched in (content_only, balanced, as_null)]
    torch.testing.assert_close(results["zero"][1], results["zero"][0], atol=1e-6, rtol=0)
    assert (results["trained"][1] - results["trained"][0]).abs().max() > 1e-4
    torch.testing.assert_close(results["trained"][2], results["trained"][0], atol=1e-6, rtol=0)


def test_cond_and_uncond_rows_get_their_identity_tokens_in_attention_and_idbalance(env, ridfr, denoiser):
    """Under CFG the uncond rows see the null identity (identity attention and IDBalance), the cond rows the
    person's, except faces that matched nobody; checked against ridfr_core's diffusers backend."""
    from ridfr_core.identity.adapter import null_identity

    module_of = env.pack.nodes.sockets.module_of
    model, faces, _, _ = content(env, ridfr, lq_faces(2), strength=0.9)
    people = random_identity(2)
    scales = torch.tensor([1.0, 0.0])  # the second face matched nobody
    patched = identity_condition(env, ridfr, model, face_identity(env, people, scales))
    x_d, sigma = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(13)), torch.tensor([4.0])
    text, negative = env.text.expand(2, -1, -1), prompt(env, "low quality")[0][0].expand(2, -1, -1)
    both = comfy_eps(patched, torch.cat([x_d, x_d]), sigma, torch.cat([text, negative]), [0, 1])
    torch.testing.assert_close(both[:2], comfy_eps(patched, x_d, sigma, text, [0]))
    null = null_identity(module_of(ridfr.clip_vision))
    as_null = identity_condition(env, ridfr, model, face_identity(env, null.broadcast_to(2), scales))
    torch.testing.assert_close(both[2:], comfy_eps(as_null, x_d, sigma, negative, [0]))
    assert (both[0] - both[2]).abs().max() > 1e-3

    lq = content_latent(env, ridfr, faces)
    with torch.no_grad():
        tokens = denoiser.adapter.identity_tokens(people)
        null_tokens = denoiser.adapter.identity_tokens(null.broadcast_to(2))
        cond_tokens = torch.where((scales == 0).view(-1, 1, 1), null_tokens, tokens)
        t = patched.get_model_object("model_sampling").timestep(sigma).float()
        expected = denoiser(torch.cat([x_d, x_d]), t.expand(4), torch.cat([text, negative]), torch.cat([lq, lq]),
                            torch.cat([cond_tokens, null_tokens]), 0.9, 0.7 * torch.cat([scales, scales]))
    torch.testing.assert_close(both, expected, atol=2e-5, rtol=2e-5)


def content_latent(env, ridfr, faces):
    content_input = pack_core("backends").RESTORERID.content_input

    return content_input(env.pack.nodes.sockets.module_of(ridfr.content), faces.lq * 2 - 1, rounded_vae(env),
                         (FACE // 8, FACE // 8))


@pytest.mark.parametrize("sampler_name, eta", [("ddim", 0.0), ("ddpm", 1.0)])
def test_comfyui_sampler_follows_the_diffusers_trajectory(env, ridfr, denoiser, sampler_name, eta):
    """ComfyUI's samplers with the simple schedule (trailing timesteps 999, 749, ...) over the patched MODEL
    against diffusers' DDIM (trailing) over ridfr_core.RestorerIDDenoiser: "ddim" (Euler on the ODE) is DDIM
    with eta 0, "ddpm" is DDIM with eta 1 (RestorerID's published sampler; the same step noise on both
    sides). CFG 4 with the negative prompt and the null identity, the LQ branch re-run at every step."""
    import comfy.k_diffusion.sampling
    import comfy.sample
    import comfy.samplers
    from diffusers import DDIMScheduler
    from ridfr_core.identity.adapter import null_identity
    from ridfr_core.sampling.noise import seeded_noise

    steps, guidance = 4, 4.0
    model, faces, latent, _ = content(env, ridfr, lq_faces(2, seed=4))
    people = random_identity(1, seed=6)
    patched = identity_condition(env, ridfr, model, face_identity(env, people))
    positive, negative = prompt(env, "best quality"), prompt(env, "cartoon")
    noise = seeded_noise(tuple(latent["samples"].shape), 5, "cpu", torch.float32)
    step_noise = [seeded_noise(tuple(noise.shape), 100 * i, "cpu", torch.float32) for i in range(1, steps + 1)]
    if sampler_name == "ddpm":
        drawn = iter(step_noise)
        sampler = comfy.samplers.KSAMPLER(comfy.k_diffusion.sampling.sample_ddpm,
                                          extra_options={"noise_sampler": lambda sigma, sigma_next: next(drawn)})
    else:
        sampler = comfy.samplers.sampler_object(sampler_name)
    sigmas = comfy.samplers.calculate_sigmas(patched.get_model_object("model_sampling"), "simple", steps)
    comfy = comfy.sample.sample_custom(patched, noise, guidance, sampler, sigmas, positive, negative,
                                       latent["samples"], seed=5, disable_pbar=True)
    comfy = patched.get_model_object("latent_format").process_in(comfy)

    lq = content_latent(env, ridfr, faces)
    scheduler = DDIMScheduler.from_config({**SCHEDULER, "timestep_spacing": "trailing", "set_alpha_to_one": True})
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps.tolist() == [999, 749, 499, 249]
    text = torch.cat([positive[0][0], negative[0][0]]).repeat_interleave(2, dim=0)
    with torch.no_grad():
        tokens = denoiser.adapter.identity_tokens(people.broadcast_to(2))
        null_tokens = denoiser.adapter.identity_tokens(null_identity(env.pack.nodes.sockets.module_of(ridfr.clip_vision)
                                                                     ).broadcast_to(2))
        latents = noise.clone()
        for t, variance_noise in zip(scheduler.timesteps, step_noise):
            eps = denoiser(torch.cat([latents, latents]), t, text, torch.cat([lq, lq]),
                           torch.cat([tokens, null_tokens]), 1.0, 0.7)
            cond, uncond = eps.chunk(2)
            latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents, eta=eta,
                                     variance_noise=variance_noise if eta else None).prev_sample
    assert latents.abs().mean() > 0.1
    torch.testing.assert_close(comfy, latents, atol=1e-3, rtol=1e-4)


def test_ksampler_samples_the_patched_model_deterministically(env, ridfr):
    import nodes as comfy_nodes

    model, faces, latent, _ = content(env, ridfr, lq_faces(2))
    model = identity_condition(env, ridfr, model, face_identity(env, random_identity()))
    positive, negative = prompt(env, "best quality"), prompt(env, "cartoon")
    outputs = [comfy_nodes.common_ksampler(model, 3, 3, 4.0, "ddpm", "simple", positive, negative, latent)[0]
               for _ in range(2)]
    assert outputs[0]["samples"].shape == (2, 4, 8, 8) and outputs[0]["samples"].std() > 0.1
    torch.testing.assert_close(outputs[0]["samples"], outputs[1]["samples"])


def test_ridfr_sample_uses_the_backend_defaults_and_the_colour_fix(env, ridfr):
    """'backend defaults' resolves to RestorerID's published settings; the wavelet colour fix gives the
    restored faces the colours (lowest frequencies) of the LQ faces."""
    settings = env.pack.nodes.sampling_nodes.SamplerSettings(pack_core("backends").RESTORERID, "backend defaults", 3,
                                                             1.0, "euler", "karras")
    sampling_nodes = env.pack.nodes.sampling_nodes
    assert (settings.steps, settings.guidance, settings.sampler_name, settings.scheduler) == (
        50, 4.0, sampling_nodes.SAMPLER_NAME, sampling_nodes.SCHEDULER_NAME)  # RestorerID's own DDIM plan
    tinted = lq_faces(2) * 0.3 + torch.tensor([0.6, 0.2, 0.1])
    model, faces, _, _ = content(env, ridfr, tinted)
    restored, photo, masks, report = run(env, "RIDFRSample", model=model, clip=env.clip, vae=env.vae, faces=faces,
                                         seed=0, steps=2, guidance=4.0, sampler_name="ddpm", scheduler="simple",
                                         settings="custom")
    assert report.startswith("2 face(s) sampled with the widgets: ddpm / simple, 2 steps, CFG 4; seed 0")
    assert restored.shape == (2, FACE, FACE, 3) and torch.equal(photo, restored)
    torch.testing.assert_close(restored.mean(dim=(1, 2)), tinted.mean(dim=(1, 2)), atol=0.02, rtol=0)


def cli_modules(env, ridfr):
    """What the CLI's load_models gives for the same files: the UNet with FaceID Plus v1's LoRA fused, the LQ
    branch, the VAE as ComfyUI reads it and the text states of RestorerID's prompts."""
    from ridfr_core import backends
    from ridfr_core.weights import adapter_files, checkpoints
    from ridfr_core.pipeline import PipelineModules

    backend = pack_core("backends").RESTORERID
    unet = copy.deepcopy(env.tiny.unet)
    adapter, lora = adapter_files.load_identity_adapter(env.tiny.root / "ipadapter" / RESTORERID_ADAPTER, unet)
    adapter_files.fuse_lora(unet, lora, 1.0)
    prompts = {text: checkpoints.encode_prompt(env.tiny.text_encoder, ids) for text, ids in backend.prompt_tokens.items()}
    branch = backends.load_content(env.tiny.root / "ridfr" / RESTORERID_FILE)
    clip_vision = copy.deepcopy(env.pack.nodes.sockets.module_of(ridfr.clip_vision))
    return PipelineModules(unet, rounded_vae(env), branch, prompts[""], SCHEDULER, adapter, clip_vision, prompts=prompts)


def test_ridfr_sample_backend_defaults_give_the_cli_image(env, ridfr):
    """Workflow 4's path with a fixed identity weight (Identity Condition at 0.75, RIDFR Sample 'backend defaults') gives
    the image ridfr_core's pipeline (the CLI's) gives for the same seeds and identity: RestorerID's own DDIM plan
    (50 steps, eta 1), the posterior sample and the step noise drawn from each face's seed, CFG 4 with its
    prompts, and the colour fix on the unclamped decode."""
    from ridfr_core.pipeline import RIDFRPipeline

    model, faces, _, _ = content(env, ridfr, lq_faces(2, seed=7) * 0.6 + 0.2)
    people = random_identity(1, seed=8)
    patched = identity_condition(env, ridfr, model, face_identity(env, people), weight=0.75)
    restored, _, _, _ = run(env, "RIDFRSample", model=patched, clip=env.clip, vae=env.vae, faces=faces, seed=3, steps=1,
                         guidance=1.0, sampler_name="euler", scheduler="normal", settings="backend defaults")
    pipeline = RIDFRPipeline(cli_modules(env, ridfr))
    expected = pipeline(faces.lq, people, seed=3, identity_scale=0.75).permute(0, 2, 3, 1)
    other_seed = pipeline(faces.lq, people, seed=4, identity_scale=0.75).permute(0, 2, 3, 1)
    assert (other_seed - expected).abs().max() > 0.01  # the seed matters, so agreeing is not trivial
    print(f"\nComfyUI vs CLI, restored faces: max abs difference {(restored - expected).abs().max():.1e}")
    torch.testing.assert_close(restored, expected, atol=2e-4, rtol=0)  # 1.7e-5 seen on CPU
