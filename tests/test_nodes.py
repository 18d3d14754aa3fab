"""Node-level tests of the ComfyUI pack, in-process against a real ComfyUI (COMFYUI_PATH) with tiny real
weights: the patched MODEL against ridfr_core's diffusers backend, sampling, batching, errors."""

from __future__ import annotations

import copy
import gc
import importlib
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from comfy_host import PACK_MODULE, REPO_ROOT, add_models_folder, import_comfy, requires_comfyui

pytestmark = requires_comfyui
FACE = 64  # tiny models: 64 px faces, 8x8 latents


class Env:
    pass


@pytest.fixture(scope="module")
def env(comfy_models):
    tiny_models = comfy_models
    pack = import_comfy(tiny_models.configs)
    models = tiny_models.root
    add_models_folder(models)
    import comfy.sd

    result = Env()
    result.tiny, result.pack = tiny_models, pack
    result.nodes = {node.define_schema().node_id: node for node in pack.nodes.NODES}
    result.model, result.clip, result.vae = comfy.sd.load_checkpoint_guess_config(
        str(models / "checkpoints" / tiny_models.checkpoint.name))[:3]
    result.ridfr = run(result, "LoadRIDFR", content_weights=tiny_models.content.name,
                       ipadapter=tiny_models.adapter_v2.name, clip_vision=tiny_models.clip_vision.name,
                       insightface="buffalo_l", face_device="cpu")[0]
    result.text = result.clip.encode_from_tokens_scheduled(result.clip.tokenize(""))[0][0]
    return result


def validate(env, node_id: str, **inputs):
    """``validate_inputs`` as ComfyUI calls it for a submitted prompt holding this node with ``inputs`` (None:
    a linked input): the prompt passes the pack's on_prompt handler, and the method runs in the prompt's
    execution context with the parameters it names."""
    import inspect

    from comfy_execution.utils import CurrentNodeContext

    validation = importlib.import_module(f"{PACK_MODULE}.nodes.validation")
    submitted = {name: ["0", 0] if value is None else value for name, value in inputs.items()
                 if not isinstance(value, torch.Tensor)}
    request = validation.remember_prompt({"prompt": {"7": {"class_type": node_id, "inputs": submitted}}})
    node = env.nodes[node_id]
    wanted = inspect.signature(node.validate_inputs).parameters
    with CurrentNodeContext(request["prompt_id"], "7"):
        return node.validate_inputs(**{k: v for k, v in inputs.items() if k in wanted})


def run(env, node_id: str, **inputs):
    node = env.nodes[node_id]
    if "validate_inputs" in vars(node):  # overridden (the base class raises NotImplementedError)
        verdict = validate(env, node_id, **inputs)
        assert verdict is True, verdict
    return node.execute(**inputs).args


def content_condition(env, image, **options):
    """ContentCondition as a workflow sets it (LoadRIDFR's modules, aligned faces, full strength over every
    step, the tiny models' face size), with ``options`` changed."""
    inputs = dict(model=env.model, ridfr=env.ridfr, image=image, input_mode="aligned faces", strength=1.0,
                  start_percent=0.0, end_percent=1.0, face_size=FACE, on_no_face="error")
    return run(env, "ContentCondition", **{**inputs, **options})


def random_identity(count: int = 1, seed: int = 0):
    from ridfr_core.identity.adapter import Identity

    generator = torch.Generator().manual_seed(seed)
    return Identity(F.normalize(torch.randn(count, 512, generator=generator), dim=-1),
                    torch.randn(count, 257, 48, generator=generator))


def face_identity(env, identity, scales=None):
    return env.pack.nodes.sockets.FaceIdentity(identity, identity.id_embeds[0].numpy(), scales, "test")


def lq_faces(count: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(count, FACE, FACE, 3, generator=torch.Generator().manual_seed(seed))


def diffusers_denoiser(env):
    from ridfr_core import backends
    from ridfr_core.weights import adapter_files
    from ridfr_core.backends.ridfr.denoiser import RIDFRDenoiser

    unet = copy.deepcopy(env.tiny.unet)
    adapter, lora = adapter_files.load_identity_adapter(env.tiny.adapter_v2, unet)
    adapter_files.fuse_lora(unet, lora, 1.0)
    return RIDFRDenoiser(unet, backends.load_content(env.tiny.content), adapter).eval()


def comfy_eps(model, x_d, sigma, text, cond_or_uncond):
    """One call of the patched ComfyUI model, as eps on the diffusers-scaled latent ``x_d``."""
    import comfy.model_management
    import comfy.patcher_extension as ext

    comfy.model_management.load_models_gpu([model])
    options = ext.copy_nested_dicts(model.model_options["transformer_options"])
    options["wrappers"] = ext.copy_nested_dicts(model.wrappers)
    options["cond_or_uncond"], options["sigmas"] = cond_or_uncond, sigma.expand(x_d.shape[0])
    x_k = x_d * (sigma ** 2 + 1) ** 0.5
    with torch.no_grad():
        denoised = model.model.apply_model(x_k, sigma.expand(x_d.shape[0]), c_crossattn=text,
                                           transformer_options=options)
    return (x_k - denoised) / sigma


# ------------------------------------------------------------------------------------------------


def test_every_input_and_output_has_a_tooltip(env):
    assert set(env.nodes) >= {"LoadRIDFR", "FaceIDEncode", "ContentCondition", "RIDFRSample"}
    for node_id, node in env.nodes.items():
        schema = node.define_schema()
        for item in schema.inputs + schema.outputs:
            assert item.tooltip, f"{node_id}.{item.id or item.display_name} has no tooltip"


@pytest.mark.parametrize("prompt", ["", "RESTORERID_POSITIVE", "RESTORERID_NEGATIVE"])
def test_backend_prompts_match_ridfr_core(env, prompt):
    """ComfyUI's CLIP encoding of each backend prompt is the embedding ridfr_core conditions on (its token id
    tables against ComfyUI's SD1.5 tokenizer; up to ComfyUI keeping CLIP in fp16)."""
    from ridfr_core.backends.restorerid import prompts
    from ridfr_core.weights.checkpoints import encode_prompt

    text = getattr(prompts, prompt) if prompt else ""
    comfy = env.clip.encode_from_tokens_scheduled(env.clip.tokenize(text))[0][0]
    assert env.clip.tokenize(text)["l"][0][1:len(prompts.PROMPT_TOKENS[text]) + 1] == [
        (token, 1.0) for token in prompts.PROMPT_TOKENS[text]]
    torch.testing.assert_close(comfy.float(), encode_prompt(env.tiny.text_encoder, prompts.PROMPT_TOKENS[text]), atol=3e-3,
                               rtol=0)


@pytest.mark.parametrize("cfg_batch", [False, True], ids=["cond", "cond+uncond"])
def test_one_step_matches_the_diffusers_backend(env, cfg_batch):
    """Same tiny weights and inputs: ComfyUI's patched MODEL and ridfr_core.RIDFRDenoiser agree."""
    from ridfr_core.identity.adapter import null_identity

    faces_in = lq_faces(2)
    identity = random_identity(2)
    scales = torch.tensor([1.0, 0.0])  # one face matched, one restored without identity
    model, faces, _, _ = content_condition(env, faces_in, strength=0.8)
    model, = run(env, "IdentityCondition", model=model, ridfr=env.ridfr, identity=face_identity(env, identity, scales),
                 weight=0.7, lora_strength=1.0)

    denoiser = diffusers_denoiser(env)
    sampling = model.get_model_object("model_sampling")
    sigma = sampling.sigmas[400:401].float()
    t = sampling.timestep(sigma).float()
    x_d = torch.randn(2, 4, FACE // 8, FACE // 8, generator=torch.Generator().manual_seed(3))
    lq = faces.lq * 2 - 1
    with torch.no_grad():
        tokens = denoiser.adapter.identity_tokens(identity)
        null_tokens = denoiser.adapter.identity_tokens(null_identity(env.pack.nodes.sockets.module_of(env.ridfr.clip_vision))).expand(2, -1, -1)
    text = env.text.expand(2, -1, -1)
    if cfg_batch:
        x_d, text, lq = torch.cat([x_d, x_d + 0.1]), torch.cat([text, text]), torch.cat([lq, lq])
        tokens, scales = torch.cat([tokens, null_tokens]), torch.cat([scales, scales])
    with torch.no_grad():
        expected = denoiser(x_d, t.expand(x_d.shape[0]), text, lq, tokens, 0.8, 0.7 * scales)
    got = comfy_eps(model, x_d, sigma, text, [0, 1] if cfg_batch else [0])
    assert expected.abs().mean() > 0.05
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=2e-4)


def test_content_percent_range_and_strength_zero_leave_the_model_alone(env):
    x_d = torch.randn(1, 4, FACE // 8, FACE // 8)
    sampling = env.model.get_model_object("model_sampling")
    sigma = sampling.sigmas[900:901].float()  # early in sampling (high noise)
    base = comfy_eps(env.model, x_d, sigma, env.text, [0])
    common = dict(model=env.model, ridfr=env.ridfr, image=lq_faces(1), input_mode="aligned faces", face_size=FACE,
                  on_no_face="error")
    late, *_ = run(env, "ContentCondition", strength=1.0, start_percent=0.5, end_percent=1.0, **common)
    off, *_ = run(env, "ContentCondition", strength=0.0, start_percent=0.0, end_percent=1.0, **common)
    on, *_ = run(env, "ContentCondition", strength=1.0, start_percent=0.0, end_percent=1.0, **common)
    torch.testing.assert_close(comfy_eps(late, x_d, sigma, env.text, [0]), base)
    torch.testing.assert_close(comfy_eps(off, x_d, sigma, env.text, [0]), base)
    assert (comfy_eps(on, x_d, sigma, env.text, [0]) - base).abs().max() > 1e-3


def test_identity_patch_wraps_another_packs_attention_replacement(env):
    import comfy.ldm.modules.attention as attention

    calls = []

    def other_pack(q, k, v, extra_options):
        calls.append(extra_options["block"])
        return attention.optimized_attention(q, k, v, extra_options["n_heads"])

    other = env.model.clone()
    other.set_model_attn2_replace(other_pack, "input", 1)
    patched, = run(env, "IdentityCondition", model=other, ridfr=env.ridfr,
                   identity=face_identity(env, random_identity()), weight=1.0, lora_strength=1.0)
    comfy_eps(patched, torch.randn(1, 4, 8, 8), torch.tensor([1.0]), env.text, [0])
    assert calls == [("input", 1)]
    assert ("input", 1) in other.model_options["transformer_options"]["patches_replace"]["attn2"]  # clone untouched


def test_ksampler_samples_the_patched_model_deterministically(env):
    import nodes as comfy_nodes

    model, faces, latent, _ = content_condition(env, lq_faces(2))
    model, = run(env, "IdentityCondition", model=model, ridfr=env.ridfr, identity=face_identity(env, random_identity()),
                 weight=1.0, lora_strength=1.0)
    positive = [[env.text, {}]]
    outputs = [comfy_nodes.common_ksampler(model, 5, 3, 2.0, "uni_pc", "normal", positive, positive, latent)[0]
               for _ in range(2)]
    assert outputs[0]["samples"].shape == (2, 4, 8, 8)
    torch.testing.assert_close(outputs[0]["samples"], outputs[1]["samples"])
    images = env.vae.decode(outputs[0]["samples"])
    assert images.shape == (2, FACE, FACE, 3) and images.std() > 0.01


def test_latent_batch_mismatch_names_the_node(env):
    model, *_ = content_condition(env, lq_faces(2))
    with pytest.raises(ValueError, match=r"ContentCondition \(image\): the sampler runs a batch of 3 latents"):
        comfy_eps(model, torch.randn(3, 4, 8, 8), torch.tensor([1.0]), env.text.expand(3, -1, -1), [0])
    identity = face_identity(env, random_identity(3), torch.ones(3))
    model, = run(env, "IdentityCondition", model=env.model, ridfr=env.ridfr, identity=identity, weight=1.0,
                 lora_strength=1.0)
    with pytest.raises(ValueError, match=r"IdentityCondition \(identity\): 3 identities for 2 faces"):
        comfy_eps(model, torch.randn(2, 4, 8, 8), torch.tensor([1.0]), env.text.expand(2, -1, -1), [0])


def sample(env, faces_model, faces, seed=0, steps=3):
    return run(env, "RIDFRSample", model=faces_model, clip=env.clip, vae=env.vae, faces=faces, seed=seed, steps=steps,
               guidance=1.0, sampler_name="uni_pc", scheduler="normal", settings="custom")


def test_ridfr_sample_is_seeded_locally_and_leaks_nothing(env):
    import comfy.model_management as mm

    model, faces, _, _ = content_condition(env, lq_faces(2))
    torch.manual_seed(123)
    global_state = torch.get_rng_state()
    first = sample(env, model, faces)
    assert torch.equal(torch.get_rng_state(), global_state), "RIDFRSample touched the global RNG"
    loaded, tensors = len(mm.current_loaded_models), count_tensors()
    second = sample(env, model, faces)
    torch.testing.assert_close(first[0], second[0])
    assert first[0].shape == (2, FACE, FACE, 3) and first[2].shape == (2, FACE, FACE)
    assert not torch.equal(sample(env, model, faces, seed=1)[0], first[0])
    del second
    gc.collect()
    assert len(mm.current_loaded_models) == loaded
    assert count_tensors() <= tensors + 8


def count_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if type(obj) is torch.Tensor or type(obj) is torch.nn.Parameter)


def photo_with_scripted_face(scripted_kps_size=640) -> torch.Tensor:
    generator = np.random.default_rng(0)
    photo = generator.uniform(0.2, 0.8, (scripted_kps_size, scripted_kps_size, 3)).astype(np.float32)
    return torch.from_numpy(photo)[None]


def test_whole_photo_mode_restores_and_pastes_back(env):
    photo = photo_with_scripted_face()
    model, faces, latent, lq = content_condition(env, photo, input_mode="whole photo")
    assert faces.count == 1 and latent["samples"].shape == (1, 4, 8, 8) and lq.shape == (1, FACE, FACE, 3)
    restored, pasted, masks, _ = sample(env, model, faces)
    assert pasted.shape == photo.shape and masks.shape == (1, 640, 640)
    outside = masks[0] == 0
    assert outside.float().mean() > 0.5 and (masks[0] > 0.99).any()
    np.testing.assert_allclose(pasted[0][outside].numpy(), photo[0][outside].numpy(), atol=1 / 255 + 1e-6)
    again, masks_again = run(env, "PasteFaces", faces=faces, images=restored)
    torch.testing.assert_close(again, pasted)


def test_no_face_in_a_photo_errors_or_is_skipped(env):
    black = torch.zeros(1, 640, 640, 3)
    with pytest.raises(ValueError, match=r"ContentCondition \(image\): photo 0: no face found.*on_no_face to 'skip'"):
        content_condition(env, black, input_mode="whole photo")
    both = torch.cat([black, photo_with_scripted_face()])
    _, faces, _, _ = content_condition(env, both, input_mode="whole photo", on_no_face="skip")
    assert faces.count == 1 and [len(p.photo.faces) for p in faces.photos] == [0, 1]
    with pytest.raises(ValueError, match=r"FaceIDEncode \(references\): reference 0: .*no face"):
        run(env, "FaceIDEncode", ridfr=env.ridfr, references=black, references_are_aligned=False, on_no_face="error")


def test_face_id_encode_combines_references_and_reports(env):
    photos = torch.cat([photo_with_scripted_face(), torch.zeros(1, 640, 640, 3), photo_with_scripted_face() * 0.9])
    identity, crops, report = run(env, "FaceIDEncode", ridfr=env.ridfr, references=photos,
                                  references_are_aligned=False, on_no_face="skip")
    assert len(identity.adapter_input) == 1 and identity.adapter_input.clip_embeds.shape == (1, 257, 48)
    assert crops.shape == (2, 224, 224, 3)
    assert "2 reference(s)" in report and "Skipped (no face): reference(s) [1]" in report


def test_match_identities_gives_each_face_its_person(env):
    photo = photo_with_scripted_face()
    _, faces, _, _ = content_condition(env, photo, input_mode="whole photo")
    person, _, _ = run(env, "FaceIDEncode", ridfr=env.ridfr, references=faces.lq.permute(0, 2, 3, 1),
                       references_are_aligned=True, on_no_face="error")
    stranger = face_identity(env, random_identity(seed=9))
    matched, report = run(env, "MatchIdentities", ridfr=env.ridfr, faces=faces, identity_1=stranger, identity_2=person,
                          threshold=0.5, one_face_per_identity=True)
    assert "face 0: identity_2" in report
    torch.testing.assert_close(matched.adapter_input.id_embeds, person.adapter_input.id_embeds)
    assert matched.face_scales.tolist() == [1.0]


def test_video_frames_are_tracked_one_person_and_one_seed_per_face(env):
    """Frames 0 and 1 show one look of the face, frame 3 another, frame 2 nobody: per frame, frame 3 would be
    person 2; tracked, the face is person 1 throughout (2 of 3 votes) and keeps its seed."""
    look, other = photo_with_scripted_face(), photo_with_scripted_face().flip(1) * 0.8 + 0.1
    frames = torch.cat([look, look, torch.zeros_like(look), other])
    common = dict(model=env.model, ridfr=env.ridfr, image=frames, input_mode="whole photo", strength=1.0,
                  start_percent=0.0, end_percent=1.0, face_size=FACE, on_no_face="skip")
    model, faces, _, _ = run(env, "ContentCondition", **common, track_faces=True)
    assert faces.tracks == [0, 0, 0] and faces.seed_offsets() == [0, 0, 0]
    first, second = (run(env, "FaceIDEncode", ridfr=env.ridfr, references=faces.lq[index:index + 1].permute(0, 2, 3, 1),
                         references_are_aligned=True, on_no_face="error")[0] for index in (0, 2))
    matched, report = run(env, "MatchIdentities", ridfr=env.ridfr, faces=faces, identity_1=first, identity_2=second,
                          threshold=0.5, one_face_per_identity=True)
    assert report.startswith("track 0: identity_1 (67% of 3 frame(s)")
    torch.testing.assert_close(matched.adapter_input.id_embeds, first.adapter_input.id_embeds.expand(3, -1))
    restored = sample(env, model, faces, steps=1)[0]
    torch.testing.assert_close(restored[0], restored[1])  # same face, same seed: no flicker

    untracked_model, untracked, _, _ = run(env, "ContentCondition", **common)
    assert untracked.tracks is None and untracked.seed_offsets() == [0, 1, 2]
    assert not torch.equal(*sample(env, untracked_model, untracked, steps=1)[0][:2])


def test_load_ridfr_rejects_unknown_files_with_the_folder(env):
    error = validate(env, "LoadRIDFR", content_weights="nope.safetensors", ipadapter=env.tiny.adapter_v2.name,
                     clip_vision="gone.safetensors", insightface="buffalo_l", face_device="cpu")
    assert error.startswith("LoadRIDFR: 2 model file(s) missing:")
    assert "models/ridfr/nope.safetensors (content_weights): not a file RIDFR knows" in error
    assert "models/clip_vision/gone.safetensors (clip_vision)" in error and "ipadapter" not in error


def test_pack_imports_without_insightface_and_says_what_to_install(env, comfy_models):
    script = f"""
import sys
sys.modules["insightface"] = None
sys.path[:0] = [{str(REPO_ROOT / 'tests')!r}]
from comfy_host import import_comfy
pack = import_comfy(__import__("pathlib").Path({str(comfy_models.configs)!r}))
print(pack.nodes.loading.missing_packages(pack.nodes.loading.FACE_PACKAGES))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "['insightface']" in result.stdout


def test_identity_patch_is_independent_of_the_batch_layout_and_honours_attention_overrides(env):
    """Cached K'/V' and per-layout rows: the cond rows of a cond+uncond batch equal a cond-only batch, the
    uncond rows (null identity) differ; ComfyUI's optimized_attention_override still sees attn2."""
    model, = run(env, "IdentityCondition", model=env.model, ridfr=env.ridfr,
                 identity=face_identity(env, random_identity(2), torch.tensor([1.0, 0.5])), weight=1.0,
                 lora_strength=1.0)
    cross_calls = []

    def override(func, *args, **kwargs):
        cross_calls.append(args[1].shape[1] == env.text.shape[1])
        return func(*args, **kwargs)

    model.model_options["transformer_options"]["optimized_attention_override"] = override
    x_d, sigma = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5)), torch.tensor([2.0])
    text = env.text.expand(2, -1, -1)
    cond = comfy_eps(model, x_d, sigma, text, [0])
    both = comfy_eps(model, torch.cat([x_d, x_d]), sigma, torch.cat([text, text]), [0, 1])
    torch.testing.assert_close(both[:2], cond)
    assert (both[2:] - cond).abs().max() > 1e-4
    assert any(cross_calls), "the identity patch bypassed optimized_attention_override for attn2"
    weightless, = run(env, "IdentityCondition", model=env.model, ridfr=env.ridfr,
                      identity=face_identity(env, random_identity(2), torch.ones(2)), weight=0.0, lora_strength=0.0)
    torch.testing.assert_close(comfy_eps(weightless, x_d, sigma, text, [0]), comfy_eps(env.model, x_d, sigma, text, [0]))


def test_content_residuals_merge_with_a_t2i_adapter_control(env):
    """A T2I-Adapter's control has empty 'middle'/'output' lists; RIDFR's residuals must still apply."""
    merge = env.pack.nodes.patches.merge_control
    down, mid = tuple(torch.full((1, 1), float(i)) for i in range(3)), torch.full((1, 1), 9.0)
    merged = merge({"input": [torch.ones(1, 1)], "middle": [], "output": []}, down, mid)
    assert [t.item() for t in merged["output"]] == [0.0, 1.0, 2.0] and merged["middle"][0].item() == 9.0
    assert len(merged["input"]) == 1
    summed = merge({"input": [], "middle": [torch.ones(1, 1)], "output": [None, torch.ones(1, 1), None]}, down, mid)
    assert [t.item() for t in summed["output"]] == [0.0, 2.0, 2.0] and summed["middle"][0].item() == 10.0
    with pytest.raises(ValueError, match="not an SD1.5 ControlNet"):
        merge({"output": [torch.ones(1, 1)]}, down, mid)


def test_validate_inputs_accepts_linked_inputs_and_checks_ranges(env):
    """ComfyUI validates before upstream nodes run and passes None for linked inputs; it also skips its own
    min/max checks for the inputs validate_inputs names."""
    nodes = env.nodes
    assert validate(env, "ContentCondition", input_mode=None, on_no_face=None, start_percent=None,
                    end_percent=0.5) is True
    assert validate(env, "RIDFRSample", sampler_name=None, scheduler=None, settings=None) is True
    assert validate(env, "FaceIDEncode", on_no_face=None) is True
    assert validate(env, "LoadRIDFR", content_weights=None, ipadapter=None, clip_vision=None, insightface=None,
                    face_device=None) is True
    error = validate(env, "ContentCondition", input_mode="aligned faces", on_no_face="error", start_percent=0.0,
                     end_percent=1.5)
    assert error.startswith("ContentCondition (end_percent): 1.5 is outside 0..1")
    error = nodes["FaceIDEncode"].validate_inputs(on_no_face="maybe")
    assert error.startswith("FaceIDEncode (on_no_face): 'maybe' is not one of error, skip")
    with pytest.raises(ValueError, match=r"ContentCondition \(input_mode\): 'photo' is not one of"):
        nodes["ContentCondition"].execute(model=env.model, ridfr=env.ridfr, image=lq_faces(1), input_mode="photo",
                                          strength=1.0, start_percent=0.0, end_percent=1.0, face_size=FACE,
                                          on_no_face="error")
