"""RIDFR's modules under ComfyUI's memory management (nodes/memory.py, nodes/vae_moments.py), in-process against a
real ComfyUI with tiny weights. The ``meta`` device stands in for a GPU: ComfyUI's real ModelPatcher and
load_models_gpu place weights there exactly as they would on a small card, so a module split between devices or run
on the wrong one fails here as it would there (meta tensors cannot be copied back: the models of this module are
spent afterwards, so it loads its own)."""

from __future__ import annotations

import copy

import pytest
import torch

from comfy_host import RESTORERID_ADAPTER, RESTORERID_FILE, requires_comfyui
from test_nodes import FACE, content_condition, env, face_identity, lq_faces, random_identity, run  # noqa: F401 (env: fixture)

pytestmark = requires_comfyui
META = torch.device("meta")


def devices(patcher) -> set[str]:
    return {param.device.type for param in patcher.model.parameters()}


@pytest.fixture
def meta_gpu(monkeypatch):
    """ComfyUI as started with ``--novram`` on a GPU (the meta device): every model it loads gets a budget of almost
    nothing, so it streams its own layers and leaves the rest where it was."""
    import comfy.model_management as mm

    cpu_free = mm.get_free_memory
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.NO_VRAM)
    monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: (
        ((1 << 30, 1 << 30) if torch_free_too else 1 << 30) if dev == META else cpu_free(dev, torch_free_too)))
    yield
    mm.current_loaded_models[:] = [loaded for loaded in mm.current_loaded_models if loaded.device != META]


def on_meta_gpu(patched):
    """The MODEL and every module patched into it as if they had been loaded on the meta GPU. (ComfyUI keeps the
    sigma table on the CPU and copies the timesteps there, which a meta tensor cannot do: it goes to meta too.)"""
    import comfy.model_management as mm

    mm.unload_all_models()  # what the nodes loaded on the CPU before: a real GPU would have had it from the start
    for patcher in [patched, *patched.get_nested_additional_models()]:
        patcher.load_device = META
    patched.model.model_sampling.to(META)
    return patched


@pytest.fixture
def fresh(env):
    """A MODEL, VAE and LoadRIDFR for one test (the meta GPU spends whatever it loads): {"ridfr": ..., "restorerid": ...}."""
    import comfy.sd

    result = copy.copy(env)
    result.model, _, result.vae = comfy.sd.load_checkpoint_guess_config(
        str(env.tiny.root / "checkpoints" / env.tiny.checkpoint.name))[:3]
    result.ridfr = run(env, "LoadRIDFR", content_weights=env.tiny.content.name, ipadapter=env.tiny.adapter_v2.name,
                       clip_vision=env.tiny.clip_vision.name, insightface="buffalo_l", face_device="cpu")[0]
    result.restorerid = run(env, "LoadRIDFR", content_weights=RESTORERID_FILE, ipadapter=RESTORERID_ADAPTER,
                            clip_vision=env.tiny.clip_vision.name, insightface="buffalo_l", face_device="cpu")[0]
    return result


def evaluate_on_meta_gpu(patched, faces: int, cond_or_uncond=(0, 1), extra_options=None):
    """ComfyUI's sampling preparation (PREPARE_SAMPLING wrappers, load_models_gpu with the sampler's memory
    estimate) then one call of the patched UNet, as a sampler step makes it."""
    import comfy.patcher_extension as ext
    import comfy.sampler_helpers

    batch = faces * len(cond_or_uncond)
    shape = (batch, 4, FACE // 8, FACE // 8)
    comfy.sampler_helpers.prepare_sampling(patched, shape, {}, model_options=patched.model_options)
    options = ext.copy_nested_dicts(patched.model_options["transformer_options"])
    options["wrappers"] = ext.copy_nested_dicts(patched.wrappers)
    options["cond_or_uncond"] = list(cond_or_uncond)
    options.update(extra_options or {})
    context = torch.zeros(batch, 77, patched.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features,
                          device=META)
    with torch.no_grad():
        return patched.model.apply_model(torch.zeros(shape, device=META), torch.ones(batch, device=META),
                                         c_crossattn=context, transformer_options=options)


def test_a_small_budget_loads_ridfr_modules_whole_where_comfyui_would_split_them(fresh, meta_gpu):
    import comfy.model_patcher

    memory = fresh.pack.nodes.memory
    for module in (fresh.ridfr.content, fresh.ridfr.adapter, fresh.ridfr.clip_vision, fresh.restorerid.content):
        split = []
        for budget in (0.3, 0.6, 0.9):  # of the module's size, as LoadedModel.model_load passes it
            plain = comfy.model_patcher.ModelPatcher(copy.deepcopy(module.model), load_device=META,
                                                     offload_device=torch.device("cpu"))
            plain.partially_load(META, int(budget * plain.model_size()))
            split.append(devices(plain) == {"meta", "cpu"})
            whole = memory.whole_module_patcher(copy.deepcopy(module.model.module))
            whole.load_device = META
            whole.partially_load(META, int(budget * whole.model_size()))
            assert devices(whole) == {"meta"} and whole.loaded_size() == whole.model_size()
            assert whole.partially_unload(torch.device("cpu"), 1) == 0  # ComfyUI then unloads it whole
        assert any(split), "ComfyUI's plain ModelPatcher no longer splits plain modules at these budgets"


@pytest.mark.parametrize("workflow", ["one identity (1, 3, 5)", "one identity per face (2)", "restorerid (4)"])
def test_every_workflows_patches_run_under_novram(fresh, meta_gpu, workflow):
    """The patches of the five example workflows (RIDFR content with one identity for all faces: workflows 1, 3 and 5;
    one identity per face, MatchIdentities: 2; RestorerID's LQ branch, IDBalance and identity: 4), sampled with the
    UNet streamed by ComfyUI and RIDFR's modules whole on the GPU."""
    restorerid = workflow.startswith("restorerid")
    ridfr = fresh.restorerid if restorerid else fresh.ridfr
    per_face = workflow.startswith("one identity per face")
    identity = face_identity(fresh, random_identity(2 if per_face else 1), torch.tensor([1.0, 0.0]) if per_face else None)
    model, faces = content_condition(fresh, lq_faces(2), model=fresh.model, ridfr=ridfr,
                                     **({"vae": fresh.vae} if restorerid else {}))[:2]
    patched = run(fresh, "IdentityCondition", model=model, ridfr=ridfr, identity=identity, weight=0.7, lora_strength=1.0,
                  auto_weight="off")[0]
    extra = {}
    if restorerid:
        extra[fresh.pack.nodes.restorerid_sampler.POSTERIOR_EPS] = torch.zeros(2, 4, FACE // 8, FACE // 8)  # CPU noise
    out = evaluate_on_meta_gpu(on_meta_gpu(patched), faces.count, extra_options=extra)
    assert out.shape == (4, 4, FACE // 8, FACE // 8) and out.device == META
    assert patched.model.model_lowvram, "the UNet was not streamed: the budget did not force a partial load"
    ours = patched.get_nested_additional_models()
    assert ours and all(devices(patcher) == {"meta"} for patcher in ours)


def test_clip_vision_runs_whole_under_novram(fresh, meta_gpu):
    import comfy.model_management as mm

    clip = fresh.ridfr.clip_vision
    clip.load_device = META
    mm.load_model_gpu(clip)
    assert devices(clip) == {"meta"}
    module = fresh.pack.nodes.sockets.module_of(clip)
    size = module.config.image_size
    with torch.no_grad():
        assert module(pixel_values=torch.zeros(1, 3, size, size, device=META)).image_embeds.device == META


def encoder_batches(vae) -> tuple[list[int], object]:
    sizes = []
    hook = vae.first_stage_model.encoder.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    return sizes, hook


def test_24_faces_are_vae_encoded_in_batches_that_fit_the_free_memory(env, monkeypatch):
    import comfy.model_management as mm

    vae_moments = env.pack.nodes.vae_moments
    faces = torch.rand(24, 3, FACE, FACE, generator=torch.Generator().manual_seed(5))
    expected = vae_moments.moments_of(env.vae, faces)
    per_face = env.vae.memory_used_encode(faces.shape, env.vae.vae_dtype)
    requested = []
    load = mm.load_models_gpu
    monkeypatch.setattr(mm, "load_models_gpu", lambda models, memory_required=0, **kw: (
        requested.append(memory_required), load(models, memory_required=memory_required, **kw))[1])
    monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: 5 * per_face)
    sizes, hook = encoder_batches(env.vae)
    try:
        got = vae_moments.encode_moments(env.vae, faces)
    finally:
        hook.remove()
    assert requested == [per_face] and sizes == [5, 5, 5, 5, 4]
    torch.testing.assert_close(got, expected)


def test_a_vae_encode_that_runs_out_of_memory_is_tiled(env):
    vae_moments = env.pack.nodes.vae_moments
    faces = torch.rand(3, 3, FACE, FACE, generator=torch.Generator().manual_seed(6))
    expected = torch.cat([vae_moments.moments_of(env.vae, face[None]) for face in faces])

    def out_of_memory_for_batches(module, args):
        if args[0].shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated for a batch of faces)")

    sizes, hook = encoder_batches(env.vae)
    oom = env.vae.first_stage_model.encoder.register_forward_pre_hook(out_of_memory_for_batches)
    try:
        got = vae_moments.encode_moments(env.vae, faces)
    finally:
        hook.remove(), oom.remove()
    assert sizes[0] == 3 and set(sizes[1:]) == {1}
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
