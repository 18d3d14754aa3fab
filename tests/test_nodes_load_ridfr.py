"""LoadRIDFR decides the rest from the content file, in-process against a real ComfyUI (COMFYUI_PATH) with tiny
weights in the published layouts: 'auto' takes the SD1.5 base (MODEL, CLIP, VAE) from RestorerIDFull.ckpt itself,
read once, and FaceID Plus v1 / PlusV2 and CLIP ViT-H as the backend was trained; the files it needs are what the
download dialog offers; Identity Condition's defaults give each backend its published identity strength."""

from __future__ import annotations

import importlib

import pytest
import torch

from comfy_host import PACK_MODULE, RESTORERID_ADAPTER, RESTORERID_FILE, requires_comfyui
from test_nodes import FACE, comfy_eps, content_condition, env, face_identity, lq_faces, random_identity, run  # noqa: F401

pytestmark = requires_comfyui
CLIP_FILE = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
AS_SHIPPED = {"content_weights": RESTORERID_FILE, "ipadapter": "auto", "clip_vision": "auto", "insightface": "auto",
              "face_device": "cpu", "base": "auto"}


def load(env, **changes):
    """LoadRIDFR as the shipped workflows set it (every choice 'auto'), with ``changes``."""
    return run(env, "LoadRIDFR", **{**AS_SHIPPED, **changes})


def pack(module: str):
    return importlib.import_module(f"{PACK_MODULE}.nodes.{module}")


def unet_weights(model) -> dict[str, torch.Tensor]:
    return model.model.diffusion_model.state_dict()


@pytest.fixture(scope="module")
def restorerid(env):
    return load(env)


def test_files_needed_follow_the_content_file(env):
    files_needed = pack("model_files").files_needed
    assert files_needed(AS_SHIPPED) == [  # the tiny checkpoint holds its SD1.5 but not the FaceID Adapter or CLIP
        ("ridfr", RESTORERID_FILE), ("ipadapter", RESTORERID_ADAPTER), ("clip_vision", CLIP_FILE),
        ("insightface/models", "buffalo_l")]
    assert files_needed({**AS_SHIPPED, "content_weights": env.tiny.content.name}) == [
        ("ridfr", env.tiny.content.name), ("checkpoints", env.tiny.checkpoint.name),  # the only checkpoint there
        ("ipadapter", "ip-adapter-faceid-plusv2_sd15.bin"), ("clip_vision", CLIP_FILE), ("insightface/models", "buffalo_l")]
    chosen = {**AS_SHIPPED, "ipadapter": RESTORERID_ADAPTER, "base": env.tiny.checkpoint.name}
    assert files_needed(chosen)[:3] == [("ridfr", RESTORERID_FILE), ("checkpoints", env.tiny.checkpoint.name),
                                        ("ipadapter", RESTORERID_ADAPTER)]


def test_restorerid_base_comes_from_its_checkpoint(env, restorerid):
    """MODEL, CLIP and VAE of 'auto' are the SD1.5 inside RestorerIDFull.ckpt (here the same weights as the tiny
    SD1.5 checkpoint, which ComfyUI's own loader reads for comparison), its extra parts left aside."""
    ridfr, model, clip, vae = restorerid
    assert ridfr.backend is importlib.import_module(f"{PACK_MODULE}.ridfr_core.backends").RESTORERID
    ours, plain = unet_weights(model), unet_weights(env.model)
    assert ours.keys() == plain.keys() and all(torch.equal(value, plain[key]) for key, value in ours.items())
    text = clip.encode_from_tokens_scheduled(clip.tokenize("best quality"))[0][0]
    torch.testing.assert_close(text, env.clip.encode_from_tokens_scheduled(env.clip.tokenize("best quality"))[0][0])
    probe = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(vae.encode(probe), env.vae.encode(probe))


def test_auto_identity_files_are_the_ones_the_backend_was_trained_with(env, restorerid):
    """RestorerID: FaceID Plus v1 (no shortcut) and CLIP ViT-H from their files, as when named; RIDFR: PlusV2."""
    module_of = env.pack.nodes.sockets.module_of
    named = load(env, ipadapter=RESTORERID_ADAPTER, clip_vision=CLIP_FILE)[0]
    for auto, explicit in ((restorerid[0].adapter, named.adapter), (restorerid[0].clip_vision, named.clip_vision)):
        got, expected = module_of(auto).state_dict(), module_of(explicit).state_dict()
        assert got.keys() == expected.keys() and all(torch.equal(got[key], expected[key]) for key in got)
    assert not module_of(restorerid[0].adapter).shortcut
    ridfr = load(env, content_weights=env.tiny.content.name)[0]
    assert ridfr.backend.name == "ridfr" and module_of(ridfr.adapter).shortcut


def test_the_content_file_is_read_once(env, monkeypatch):
    """The LQ branch, the SD1.5 base and the identity parts come from one read of RestorerIDFull.ckpt (which parts
    it holds was read from its key names at validation, memory-mapped, and is remembered while it is unchanged)."""
    pack("model_files").files_needed(AS_SHIPPED)
    reads = []
    real_load = torch.load

    def counting_load(source, *args, **kwargs):
        reads.append(str(source))
        return real_load(source, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    env.nodes["LoadRIDFR"].execute(**AS_SHIPPED)
    assert sum(path.endswith(RESTORERID_FILE) for path in reads) == 1, reads


def test_identity_condition_defaults_to_each_backends_published_strength(env, restorerid, tmp_path, monkeypatch):
    """'backend default': RestorerID's per-face MUSIQ scale (here absent: a clear error naming the file and the
    download, never a silent fixed scale), RIDFR's fixed weight."""
    import folder_paths

    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path))  # a models folder without MUSIQ weights
    ridfr, model, _, vae = restorerid
    patched, faces, _, _ = content_condition(env, lq_faces(2, seed=9), ridfr=ridfr, model=model, vae=vae)
    identity = face_identity(env, random_identity(1, seed=10))
    node = env.nodes["IdentityCondition"]
    with pytest.raises(ValueError, match=r"IdentityCondition \(auto_weight\): RestorerID's identity scale .*MUSIQ.*"
                                         r"pyiqa/musiq_koniq_ckpt-e95806b9.pth.*Download missing RIDFR models.*"
                                         r"ridfr_core.models download --backend restorerid"):
        node.execute(model=patched, ridfr=ridfr, identity=identity, weight=1.0, lora_strength=1.0, faces=faces)
    with pytest.raises(ValueError, match=r"IdentityCondition \(faces\): auto_weight scores the low-quality faces"):
        node.execute(model=patched, ridfr=ridfr, identity=identity, weight=1.0, lora_strength=1.0)
    off = node.execute(model=patched, ridfr=ridfr, identity=identity, weight=0.6, lora_strength=1.0,
                       auto_weight="off").result[0]
    x_d, sigma = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(14)), torch.tensor([2.0])
    assert comfy_eps(off, x_d, sigma, env.text.expand(2, -1, -1), [0]).abs().mean() > 0
    # RIDFR weights: the default is the fixed weight, no MUSIQ and no faces needed
    plain, ridfr_faces, _, _ = content_condition(env, lq_faces(2, seed=9))
    default = node.execute(model=plain, ridfr=env.ridfr, identity=identity, weight=1.0, lora_strength=1.0).result[0]
    fixed = node.execute(model=plain, ridfr=env.ridfr, identity=identity, weight=1.0, lora_strength=1.0,
                         auto_weight="off").result[0]
    torch.testing.assert_close(comfy_eps(default, x_d, sigma, env.text.expand(2, -1, -1), [0]),
                               comfy_eps(fixed, x_d, sigma, env.text.expand(2, -1, -1), [0]))


def test_auto_weight_scores_each_face_with_musiq(env, restorerid, tmp_path, monkeypatch):
    """With the MUSIQ weights: each face's identity weight is weight x exp(0.1 (9.5 - its MUSIQ)), shown on the
    node; the same as a fixed weight with those per-face scales."""
    import folder_paths
    from test_musiq import random_state

    from ridfr_core.backends.restorerid.identity_scale import scale_from_musiq
    from ridfr_core.musiq import load_musiq

    weights = tmp_path / "pyiqa" / "musiq_koniq_ckpt-e95806b9.pth"
    weights.parent.mkdir()
    torch.save(random_state(), weights)
    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path))
    ridfr, model, _, vae = restorerid
    patched, faces, _, _ = content_condition(env, lq_faces(2, seed=9), ridfr=ridfr, model=model, vae=vae)
    identity = face_identity(env, random_identity(1, seed=10))
    node = env.nodes["IdentityCondition"]
    output = node.execute(model=patched, ridfr=ridfr, identity=identity, weight=1.0, lora_strength=1.0, faces=faces)
    expected = torch.tensor([scale_from_musiq(float(score)) for score in load_musiq(weights)(faces.lq)])
    shown = output.ui.as_dict()["text"][0]
    assert all(f"identity scale {scale:.3f}" in shown for scale in expected.tolist()), shown
    assert expected[0] != pytest.approx(float(expected[1]))
    per_face = face_identity(env, identity.adapter_input, scales=expected)
    fixed = node.execute(model=patched, ridfr=ridfr, identity=per_face, weight=1.0, lora_strength=1.0,
                         auto_weight="off").result[0]
    x_d, sigma = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(14)), torch.tensor([2.0])
    text = env.text.expand(2, -1, -1)
    torch.testing.assert_close(comfy_eps(output.result[0], x_d, sigma, text, [0]), comfy_eps(fixed, x_d, sigma, text, [0]))
