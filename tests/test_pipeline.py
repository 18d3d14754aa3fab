"""The model and the sampling pipeline on tiny real-architecture weights loaded from real-layout files."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ridfr_core import backends

from ridfr_core.backends.ridfr import files as content_files

from ridfr_core.weights import checkpoints
from ridfr_core.backends.ridfr.controlnet import ContentControlNet, lq_to_latent_size
from ridfr_core.identity.adapter import Identity, encode_clip_features
from ridfr_core.backends.ridfr.denoiser import RIDFRDenoiser
from ridfr_core.pipeline import PipelineModules, RIDFRPipeline, load_models

STEPS = 3


@pytest.fixture(scope="module")
def pipeline(tiny_models, tmp_path_factory):
    models = load_models(tiny_models.checkpoint, tiny_models.content, tiny_models.adapter_v2, tiny_models.clip_vision,
                         config_dir=tiny_models.configs, cache_dir=tmp_path_factory.mktemp("cache"))
    return RIDFRPipeline(models)


def make_identity(pipeline, seed: int) -> Identity:
    generator = torch.Generator().manual_seed(seed)
    crops = torch.rand(1, 3, 224, 224, generator=generator)
    embedding = F.normalize(torch.randn(1, 512, generator=generator), dim=-1)
    return Identity(embedding, encode_clip_features(pipeline.models.clip_vision, crops))


@pytest.fixture(scope="module")
def lq():
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_fresh_content_module_leaves_the_unet_prediction_unchanged(tiny_models):
    content = ContentControlNet.from_unet(tiny_models.unet)
    assert torch.equal(content.conv_in.weight[:, :4], tiny_models.unet.conv_in.weight)
    assert torch.all(content.conv_in.weight[:, 4:] == 0)
    latents, text = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 64)
    lq_image = torch.rand(2, 3, 64, 64) * 2 - 1
    down, mid = content(latents, torch.tensor([10, 900]), text, lq_image)
    plain = tiny_models.unet(latents, torch.tensor([10, 900]), text).sample
    with_content = tiny_models.unet(latents, torch.tensor([10, 900]), text, down_block_additional_residuals=down,
                                    mid_block_additional_residual=mid).sample
    assert torch.equal(plain, with_content)


def test_trained_content_module_uses_the_lq_image(tiny_models):
    content = backends.load_content(tiny_models.content)
    denoiser = RIDFRDenoiser(tiny_models.unet, content)
    latents, text = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 64)
    a = denoiser(latents, 500, text, torch.zeros(1, 3, 64, 64))
    b = denoiser(latents, 500, text, torch.ones(1, 3, 64, 64))
    assert (a - b).abs().max() > 1e-4


def test_restore_shape_range_and_determinism(pipeline, lq):
    identity = make_identity(pipeline, 1)
    first = pipeline(lq, identity, steps=STEPS, seed=3)
    again = pipeline(lq, identity, steps=STEPS, seed=3)
    other_seed = pipeline(lq, identity, steps=STEPS, seed=4)
    assert first.shape == lq.shape and first.dtype == torch.float32
    assert 0 <= first.min() and first.max() <= 1 and first.std() > 0.01
    assert torch.equal(first, again)
    assert (first - other_seed).abs().max() > 1e-3


def test_identity_changes_the_output_and_scale_zero_equals_no_identity(pipeline, lq):
    a = pipeline(lq, make_identity(pipeline, 1), steps=STEPS, seed=3)
    b = pipeline(lq, make_identity(pipeline, 2), steps=STEPS, seed=3)
    assert (a - b).abs().max() > 1e-4
    scale_zero = pipeline(lq, make_identity(pipeline, 1), steps=STEPS, seed=3, identity_scale=0.0)
    without = pipeline(lq, None, steps=STEPS, seed=3)
    assert torch.equal(scale_zero, without)


def test_per_face_identity_scale(pipeline, lq):
    identity = make_identity(pipeline, 1)
    full = pipeline(lq, identity, steps=STEPS, seed=3)
    off = pipeline(lq, identity, steps=STEPS, seed=3, identity_scale=0.0)
    mixed = pipeline(lq, identity, steps=STEPS, seed=3, identity_scale=torch.tensor([1.0, 0.0]))
    assert torch.allclose(mixed[0], full[0], atol=1e-6) and torch.allclose(mixed[1], off[1], atol=1e-6)


def test_identity_guidance_differs_from_none(pipeline, lq):
    identity = make_identity(pipeline, 1)
    plain = pipeline(lq, identity, steps=STEPS, seed=3)
    guided = pipeline(lq, identity, steps=STEPS, seed=3, guidance=3.0)
    assert guided.shape == plain.shape and (guided - plain).abs().max() > 1e-4


def test_without_adapter_and_lora_equals_identity_scale_zero_without_lora(tiny_models, tmp_path, lq):
    """Scale 0 with the FaceID LoRA off is exactly the model with no identity module at all."""
    no_lora = RIDFRPipeline(load_models(tiny_models.checkpoint, tiny_models.content, tiny_models.adapter_v2,
                                        config_dir=tiny_models.configs, cache_dir=tmp_path, lora_strength=0.0))
    base = checkpoints.load_base(tiny_models.checkpoint, tiny_models.configs, cache_dir=tmp_path)
    bare = RIDFRPipeline(PipelineModules(base.unet, base.vae, backends.load_content(tiny_models.content),
                                     base.empty_prompt, base.scheduler_config))
    assert torch.equal(no_lora(lq, None, steps=STEPS, seed=5), bare(lq, None, steps=STEPS, seed=5))
    with_lora = RIDFRPipeline(load_models(tiny_models.checkpoint, tiny_models.content, tiny_models.adapter_v2,
                                          config_dir=tiny_models.configs, cache_dir=tmp_path))
    assert (with_lora(lq, None, steps=STEPS, seed=5) - bare(lq, None, steps=STEPS, seed=5)).abs().max() > 1e-4


def test_bad_inputs_are_named(pipeline, lq):
    with pytest.raises(ValueError, match=r"must be \(B,3,H,W\)"):
        pipeline(lq[:, :1], None, steps=1)
    with pytest.raises(ValueError, match="multiple of 8"):
        pipeline(torch.rand(1, 3, 60, 60), None, steps=1)
    three = Identity.cat([make_identity(pipeline, s) for s in (1, 2, 3)])
    with pytest.raises(ValueError, match="3 identities for 2 faces"):
        pipeline(lq, three, steps=1)


def test_half_precision_follows_full_precision(tiny_models, tmp_path, lq):
    """The reduced-precision path (fp16/bf16 on CUDA) runs every module in that dtype; bf16 runs on CPU."""
    def load():
        return load_models(tiny_models.checkpoint, tiny_models.content, tiny_models.adapter_v2,
                           tiny_models.clip_vision, config_dir=tiny_models.configs, cache_dir=tmp_path)

    full = RIDFRPipeline(load())
    half = RIDFRPipeline(load(), "cpu", torch.bfloat16)
    assert next(half.models.unet.parameters()).dtype == torch.bfloat16
    identity = make_identity(full, 1)
    reference = full(lq, identity, steps=STEPS, seed=3)
    reduced = half(lq, identity, steps=STEPS, seed=3)
    assert reduced.dtype == torch.float32 and torch.isfinite(reduced).all()
    assert (reduced - reference).abs().mean() < 0.05


# --- the re-stated diffusers computations match diffusers ---------------------------------------


def test_content_module_matches_diffusers_controlnet(tiny_models):
    """ControlNetModel.forward with the LQ image entering through conv_in instead of the hint encoder:
    diffusers' own forward, whose hint encoder is the LQ third of conv_in, gives the same residuals."""
    from diffusers import ControlNetModel

    content = backends.load_content(tiny_models.content)
    reference = ControlNetModel(**{**content_files.content_config(content), "in_channels": 4}).eval()
    weight = content.conv_in.weight
    reference.load_state_dict({**content.state_dict(), "conv_in.weight": weight[:, :4]}, strict=False)
    hint = torch.nn.Conv2d(3, weight.shape[0], 3, padding=1, bias=False)
    hint.weight.data.copy_(weight[:, 4:])
    reference.controlnet_cond_embedding = hint

    latents, text = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 64)
    lq_image = torch.rand(2, 3, 64, 64) * 2 - 1
    timesteps = torch.tensor([10, 900])
    with torch.no_grad():
        down, mid = content(latents, timesteps, text, lq_image, 0.7)
        expected = reference(latents, timesteps, text, lq_to_latent_size(lq_image, (8, 8)), conditioning_scale=0.7,
                             return_dict=False)
        per_face_down, per_face_mid = content(latents, timesteps, text, lq_image, torch.tensor([0.7, 0.0]))
    assert len(down) == len(expected[0])
    for ours, theirs in zip((*down, mid), (*expected[0], expected[1])):
        assert torch.allclose(ours, theirs, atol=1e-5)
    for ours, full in zip((*per_face_down, per_face_mid), (*down, mid)):
        assert torch.allclose(ours[0], full[0]) and torch.all(ours[1] == 0)


def test_identity_processor_matches_diffusers_ip_adapter_processor():
    """The per-face-scale processor is diffusers' IPAdapterAttnProcessor2_0 at each face's scale."""
    from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0

    from ridfr_core.identity.adapter import IdentityAttnProcessor

    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=64, heads=2, dim_head=16).eval()
    ours = IdentityAttnProcessor(32, 64, num_tokens=(4,))
    theirs = IPAdapterAttnProcessor2_0(32, 64, num_tokens=(4,), scale=0.6)
    theirs.load_state_dict(ours.state_dict())
    hidden, text, tokens = torch.randn(2, 16, 32), torch.randn(2, 77, 64), torch.randn(2, 4, 64)
    states = (text, [tokens])
    with torch.no_grad():
        expected = theirs(attn, hidden, states)
        assert torch.allclose(ours(attn, hidden, (*states, 0.6)), expected, atol=1e-6)
        theirs.scale = [0.0]
        expected_off = theirs(attn, hidden, states)
        mixed = ours(attn, hidden, (*states, torch.tensor([0.6, 0.0])))
    assert torch.allclose(mixed[0], expected[0], atol=1e-6) and torch.allclose(mixed[1], expected_off[1], atol=1e-6)
    with pytest.raises(ValueError, match="must be the tuple"):
        ours(attn, hidden, text)


def test_steps_are_bounded_and_a_nan_result_is_an_error_not_a_black_image(pipeline, lq):
    with pytest.raises(ValueError, match=r"steps must be between 1 and 200, got 1000"):
        pipeline(lq, None, steps=1000)  # "leading" spacing would make every timestep 1
    with pytest.raises(ValueError, match="NaN/inf; no weights are broken"):
        pipeline(lq, make_identity(pipeline, 1), steps=1, content_scale=float("nan"))


def test_seeds_beyond_64_bits_wrap_as_in_the_nodes(pipeline, lq):
    assert torch.equal(pipeline(lq, None, steps=1, seed=2 ** 64 + 3), pipeline(lq, None, steps=1, seed=3))
    assert torch.equal(pipeline(lq, None, steps=1, seed=2 ** 64 - 1), pipeline(lq, None, steps=1, seed=[2 ** 64 - 1, 0]))
