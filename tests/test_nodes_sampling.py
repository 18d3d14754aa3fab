"""RIDFRSample's seeds and the identity patch's memory in a real ComfyUI: the largest seed, per-face noise for every
sampler (a face restores the same alone as in a batch), the null identity computed once per loaded model, the
FaceID LoRA patched low-rank, the face-analysis sessions released when ComfyUI frees memory."""

from __future__ import annotations

import pytest
import torch

from comfy_host import requires_comfyui
from test_nodes import (FACE, content_condition, env, face_identity, lq_faces, random_identity, run,  # noqa: F401
                        sample)

pytestmark = requires_comfyui


def test_ridfr_sample_takes_the_largest_seed(env):
    model, faces, _, _ = content_condition(env, lq_faces(2))
    restored = sample(env, model, faces, seed=0xFFFFFFFFFFFFFFFF, steps=1)[0]
    assert restored.shape == (2, FACE, FACE, 3)


@pytest.mark.parametrize("sampler_name", ["ddpm", "euler_ancestral", "dpmpp_2m_sde", "uni_pc"])
def test_a_face_restores_the_same_alone_as_in_a_batch(env, sampler_name):
    """Face i samples with seed + i for its start noise and for every step's noise (ancestral and SDE
    samplers draw noise each step), so the second face of a batch restores as it does alone with seed + 1."""
    faces_in = lq_faces(2)
    settings = dict(clip=env.clip, vae=env.vae, steps=3, guidance=1.0, sampler_name=sampler_name, scheduler="normal",
                    settings="custom")
    model, faces, _, _ = content_condition(env, faces_in)
    together = run(env, "RIDFRSample", model=model, faces=faces, seed=5, **settings)[0]
    model, face, _, _ = content_condition(env, faces_in[1:])
    alone = run(env, "RIDFRSample", model=model, faces=face, seed=6, **settings)[0]
    torch.testing.assert_close(alone[0], together[1], atol=2e-3, rtol=0)
    assert not torch.allclose(together[0], together[1], atol=2e-3)


def test_null_identity_is_computed_once_per_loaded_model(env):
    """Content and Identity Condition both need the null identity's tokens: CLIP ViT-H and the adapter run
    for it once per LoadRIDFR output, not once per node."""
    conditions = env.pack.nodes.condition_nodes
    first = conditions.null_identity_tokens(env.ridfr)
    assert conditions.null_identity_tokens(env.ridfr) is first and first.shape[:2] == (1, 4)


def test_faceid_lora_is_patched_low_rank(env):
    """The FaceID LoRA reaches ComfyUI as its own LoRA patches holding the file's (up, down) factors, one per
    UNet weight it changes, not as dense UNet-sized deltas."""
    from comfy.weight_adapter.lora import LoRAAdapter

    identity = face_identity(env, random_identity(1))
    patched = run(env, "IdentityCondition", model=env.model, ridfr=env.ridfr, identity=identity, weight=1.0,
                  lora_strength=0.5)[0]
    patches = [patch for patches in patched.patches.values() for patch in patches]
    assert len(patches) == len(env.ridfr.lora) > 0
    factors = {(up.data_ptr(), down.data_ptr()) for up, down in env.ridfr.lora.values()}
    for strength, adapter, *_ in patches:
        assert strength == 0.5 and isinstance(adapter, LoRAAdapter)
        up, down, alpha = adapter.weights[:3]
        assert (up.data_ptr(), down.data_ptr()) in factors and alpha is None and up.shape[1] == down.shape[0]


def test_face_analysis_sessions_go_when_comfyui_frees_memory(env):
    """The insightface sessions are made once per loaded model and dropped when ComfyUI unloads its models
    (as its /free endpoint and memory pressure do), then made again at the next use."""
    import comfy.model_management as mm

    first = env.ridfr.face_analyzer()
    assert env.ridfr.face_analyzer() is first
    mm.load_models_gpu([env.ridfr.clip_vision])
    mm.unload_all_models()
    assert "face_analyzer" not in env.ridfr.derived
    assert env.ridfr.face_analyzer() is not first
