"""Offline loading: tiny models written in the published layouts load back exactly; full-size layouts
map key for key; every wrong file gets an error that names it and says what to do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

from layouts import faceid_plus_state, text_encoder_to_ldm, unet_to_ldm, vae_to_ldm
from ridfr_core import backends
from ridfr_core.backends.ridfr import files as content_files
from ridfr_core.weights import adapter_files, checkpoints
from ridfr_core.weights.checkpoints import CheckpointError
from ridfr_core.backends.ridfr.controlnet import ContentControlNet

SD15 = checkpoints.CONFIG_DIR


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("kind", ["checkpoint", "checkpoint_ckpt"])
def test_single_file_base_loads_exactly(tiny_models, tmp_path, kind):
    """The fp16 .safetensors (as the registry's SD1.5 file) and the fp32 .ckpt both give float32 modules."""
    base = checkpoints.load_base(getattr(tiny_models, kind), tiny_models.configs, cache_dir=tmp_path)
    assert {p.dtype for p in (*base.unet.parameters(), *base.vae.parameters())} == {torch.float32}
    assert same_state(base.unet, tiny_models.unet)
    assert same_state(base.vae, tiny_models.vae)
    assert torch.equal(base.empty_prompt, checkpoints.encode_prompt(tiny_models.text_encoder, []))
    assert base.empty_prompt.shape == (1, 77, 64)


def test_prompts_are_cached_per_file_and_text(tiny_models, tmp_path):
    from ridfr_core.backends.restorerid.prompts import PROMPT_TOKENS, RESTORERID_NEGATIVE, RESTORERID_POSITIVE

    checkpoints.load_base(tiny_models.checkpoint, tiny_models.configs, cache_dir=tmp_path)
    cached = list(tmp_path.glob("prompt_*.safetensors"))
    assert len(cached) == 1
    save_file({"prompt": torch.full((1, 77, 64), 7.0)}, str(cached[0]))  # proves the cache is read
    base = checkpoints.load_base(tiny_models.checkpoint, tiny_models.configs, cache_dir=tmp_path,
                                 prompts=PROMPT_TOKENS)
    assert torch.all(base.empty_prompt == 7.0)
    assert len(list(tmp_path.glob("prompt_*.safetensors"))) == 3
    for text in (RESTORERID_POSITIVE, RESTORERID_NEGATIVE):
        assert torch.equal(base.prompts[text], checkpoints.encode_prompt(tiny_models.text_encoder, PROMPT_TOKENS[text]))
    assert not torch.equal(base.prompts[RESTORERID_POSITIVE], base.prompts[RESTORERID_NEGATIVE])


def test_diffusers_folder_loads(tiny_models, tmp_path):
    tiny_models.unet.save_pretrained(tmp_path / "unet")
    tiny_models.vae.save_pretrained(tmp_path / "vae")
    tiny_models.text_encoder.save_pretrained(tmp_path / "text_encoder")
    base = checkpoints.load_base(tmp_path, tiny_models.configs)
    assert same_state(base.unet, tiny_models.unet)
    assert torch.equal(base.empty_prompt, checkpoints.encode_prompt(tiny_models.text_encoder, []))


def test_identity_adapter_v2_bin_and_v1_safetensors(tiny_models, tmp_path):
    base = checkpoints.load_base(tiny_models.checkpoint, tiny_models.configs, cache_dir=tmp_path)
    v2, lora_v2 = adapter_files.load_identity_adapter(tiny_models.adapter_v2, base.unet)
    v1, lora_v1 = adapter_files.load_identity_adapter(tiny_models.adapter_v1, base.unet)
    assert v2.shortcut and not v1.shortcut
    assert same_state(v1, v2)
    published = torch.load(tiny_models.adapter_v2, weights_only=True)
    assert published["ip_adapter"]["1.to_k_ip.weight"].dtype == torch.float16  # as h94 publishes them
    assert {p.dtype for p in v2.parameters()} == {torch.float32}  # one dtype, not fp16 K/V beside an fp32 projection
    names = list(base.unet.attn_processors)
    assert torch.equal(v2.attn_processors[names[1].replace(".", "__")].to_k_ip[0].weight,
                       published["ip_adapter"]["1.to_k_ip.weight"].float())
    # the LoRA delta of attention #0's query is up @ down
    up, down = lora_v2[names[0].removesuffix(".processor") + ".to_q.weight"]  # kept low-rank
    delta = up @ down
    ip = {k: v.float() for k, v in published["ip_adapter"].items()}
    assert torch.allclose(delta, ip["0.to_q_lora.up.weight"] @ ip["0.to_q_lora.down.weight"])
    assert len(lora_v2) == 4 * len(names)


def test_v2_shortcut_adds_the_normalised_id_tokens(tiny_models, tmp_path):
    """FaceID-Plus v2: tokens = norm(proj(ArcFace)) + perceiver output (shortcut scale 1); v1 has no shortcut."""
    from ridfr_core.identity.adapter import Identity

    base = checkpoints.load_base(tiny_models.checkpoint, tiny_models.configs, cache_dir=tmp_path)
    v2, _ = adapter_files.load_identity_adapter(tiny_models.adapter_v2, base.unet)
    v1, _ = adapter_files.load_identity_adapter(tiny_models.adapter_v1, base.unet)
    generator = torch.Generator().manual_seed(0)
    identity = Identity(torch.randn(2, 512, generator=generator), torch.randn(2, 257, 48, generator=generator))
    with torch.no_grad():
        proj = v1.image_proj
        id_tokens = proj.norm(proj.proj(identity.id_embeds).reshape(2, 4, -1))
        tokens_v1, tokens_v2 = v1.identity_tokens(identity), v2.identity_tokens(identity)
    assert tokens_v1.shape == (2, 4, 64)
    assert torch.allclose(tokens_v2 - tokens_v1, id_tokens, atol=1e-5)


def test_clip_vision_and_content_load(tiny_models):
    clip = checkpoints.load_clip_vision(tiny_models.clip_vision, tiny_models.configs)
    stored_clip = load_file(str(tiny_models.clip_vision))
    assert clip.state_dict().keys() == stored_clip.keys()
    assert all(torch.equal(stored_clip[k], v) for k, v in clip.state_dict().items())
    content = backends.load_content(tiny_models.content)
    assert isinstance(content, ContentControlNet)
    assert content.conv_in.in_channels == 7
    assert "controlnet_cond_embedding.conv_in.weight" not in content.state_dict()
    stored = load_file(str(tiny_models.content))
    assert all(torch.equal(stored[k], v) for k, v in content.state_dict().items())


# --- full-size published layouts --------------------------------------------------------------


def meta(factory):
    with torch.device("meta"):
        return factory()


def test_full_size_sd15_single_file_layout_maps_every_key():
    unet_config, vae_config = checkpoints.load_config("unet"), checkpoints.load_config("vae")
    unet = meta(lambda: UNet2DConditionModel(**unet_config))
    vae = meta(lambda: AutoencoderKL(**vae_config))
    text = meta(lambda: CLIPTextModel(CLIPTextConfig(**checkpoints.load_config("text_encoder"))))
    ldm = {**unet_to_ldm(unet.state_dict(), unet_config), **vae_to_ldm(vae.state_dict(), vae_config),
           **text_encoder_to_ldm(text.state_dict())}
    # the key counts of the published v1-5-pruned checkpoints
    assert sum(k.startswith("model.diffusion_model.") for k in ldm) == 686
    assert sum(k.startswith("first_stage_model.") for k in ldm) == 248
    assert sum(k.startswith("cond_stage_model.") for k in ldm) == 196  # + position_ids in the files
    for model, converted in ((unet, convert_ldm_unet_checkpoint(ldm, unet_config)),
                             (vae, convert_ldm_vae_checkpoint(ldm, vae_config))):
        expected = model.state_dict()
        assert converted.keys() == expected.keys()
        assert all(converted[k].shape == expected[k].shape for k in expected)


def test_fixture_writers_give_the_publishers_sd15_key_names(golden_state):
    """The LDM names our tiny fixtures are written with are exactly those RestorerID's own classes saved
    (SD1.5's UNet, VAE and text encoder; the golden file has SD1.5's layer counts at tiny widths)."""
    from golden import GOLDEN_CONFIGS
    from ridfr_core.backends.restorerid.files import without_restorerid_extras

    published = {k: tuple(v.shape) for k, v in without_restorerid_extras(golden_state).items()
                 if k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model."))}
    unet = meta(lambda: UNet2DConditionModel(**GOLDEN_CONFIGS["unet"]))
    vae = meta(lambda: AutoencoderKL(**GOLDEN_CONFIGS["vae"]))
    text = meta(lambda: CLIPTextModel(CLIPTextConfig(**GOLDEN_CONFIGS["text_encoder"])))
    ours = {**unet_to_ldm(unet.state_dict(), GOLDEN_CONFIGS["unet"]), **vae_to_ldm(vae.state_dict(), GOLDEN_CONFIGS["vae"]),
            **text_encoder_to_ldm(text.state_dict())}
    ours.pop("cond_stage_model.transformer.text_model.embeddings.position_ids", None)  # older transformers only
    assert {k: tuple(v.shape) for k, v in ours.items()} == published


def test_golden_sd15_and_clip_vision_load_under_the_installed_libraries(golden_state, golden_models_dir, tmp_path):
    """The SD1.5 inside the publisher-made file and the CLIP tower under its published names load strictly
    (every tensor used) whatever the installed transformers/diffusers call them."""
    from golden import PUBLISHER_OUTPUTS
    from ridfr_core.backends.restorerid.prompts import PROMPT_TOKENS, RESTORERID_NEGATIVE, RESTORERID_POSITIVE

    configs = golden_models_dir / "ridfr" / "configs"
    base = checkpoints.load_base(golden_models_dir / "ridfr" / "RestorerIDFull.ckpt", configs, cache_dir=tmp_path,
                                 prompts=PROMPT_TOKENS, sd15_part=backends.sd15_part)
    publisher = torch.load(PUBLISHER_OUTPUTS, weights_only=True)  # the text states their code computed
    torch.testing.assert_close(base.prompts[RESTORERID_POSITIVE], publisher["text_pos"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(base.prompts[RESTORERID_NEGATIVE], publisher["text_neg"], rtol=1e-4, atol=1e-5)
    conv_in = golden_state["model.diffusion_model.input_blocks.0.0.weight"]
    assert torch.equal(base.unet.conv_in.weight, conv_in)
    assert torch.equal(base.vae.encoder.conv_in.weight, golden_state["first_stage_model.encoder.conv_in.weight"])
    clip = checkpoints.load_clip_vision(golden_models_dir / "clip_vision" / "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors",
                                        configs)
    assert torch.equal(clip.visual_projection.weight, golden_state["Adapter.image_encoder.visual_projection.weight"])
    assert clip.vision_model.encoder.layers[31].mlp.fc2.weight.shape == (32, 64)


def test_text_encoder_of_an_unknown_layout_names_the_file(tiny_models, tmp_path):
    state = load_file(str(tiny_models.checkpoint))
    renamed = {k.replace("text_model.encoder.layers.", "text_model.blocks."): v for k, v in state.items()}
    path = write(tmp_path, "renamed.safetensors", renamed)
    assert "text encoder" in load_error(path, tiny_models)


def test_full_size_faceid_plus_layout_maps_every_key():
    unet = meta(lambda: UNet2DConditionModel(**checkpoints.load_config("unet")))
    published = faceid_plus_state(checkpoints.load_config("unet"), 1280, rank=128, device="meta")
    assert len(published["ip_adapter"]) == 32 * 8 + 16 * 2
    state = {part: {k: torch.empty(v.shape) for k, v in sd.items()} for part, sd in published.items()}
    adapter, lora = adapter_files.identity_adapter_from_state(state["image_proj"], state["ip_adapter"], unet,
                                                            Path("ip-adapter-faceid-plusv2_sd15.bin"), True)
    assert adapter.image_proj.proj_out.out_features == 768
    assert adapter.image_proj.proj_in.in_features == 1280
    assert len(adapter.attn_processors) == 16
    unet_params = dict(unet.named_parameters())
    assert len(lora) == 128 and all((up @ down).shape == unet_params[k].shape for k, (up, down) in lora.items())


def test_full_size_clip_vision_layout():
    model = meta(lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**checkpoints.load_config("clip_vision"))))
    state = model.state_dict()
    assert len(state) == 32 * 16 + 8  # 32 blocks of 16 tensors, embeddings, layer norms, projection
    assert state["vision_model.embeddings.position_embedding.weight"].shape == (257, 1280)
    assert state["visual_projection.weight"].shape == (1024, 1280)


# --- wrong inputs -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ldm_state(tiny_models):
    return load_file(str(tiny_models.checkpoint))


def write(tmp_path: Path, name: str, state: dict, metadata=None) -> Path:
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


def load_error(path, tiny_models) -> str:
    with pytest.raises(CheckpointError) as info:
        checkpoints.load_base(path, tiny_models.configs, cache_dir=path.parent / "cache")
    assert str(path) in str(info.value)
    return str(info.value)


def test_sdxl_sd2_inpainting_checkpoints_are_named(tiny_models, ldm_state, tmp_path):
    sdxl = write(tmp_path, "sdxl.safetensors", {**ldm_state, "conditioner.embedders.0.x": torch.zeros(1)})
    assert "SDXL" in load_error(sdxl, tiny_models)
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    sd2 = write(tmp_path, "sd2.safetensors", {**ldm_state, key: torch.zeros(ldm_state[key].shape[0], 1024)})
    assert "SD2.x" in load_error(sd2, tiny_models)
    conv = "model.diffusion_model.input_blocks.0.0.weight"
    inpaint = write(tmp_path, "inpaint.safetensors", {**ldm_state, conv: torch.zeros(32, 9, 3, 3)})
    assert "inpainting" in load_error(inpaint, tiny_models)
    unet_only = write(tmp_path, "unet.safetensors", tiny_models.unet.state_dict())
    assert "diffusers" in load_error(unet_only, tiny_models)


def test_truncated_corrupt_missing_and_unexpected(tiny_models, ldm_state, tmp_path):
    data = tiny_models.checkpoint.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    assert "truncated" in load_error(truncated, tiny_models)
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a zip" * 100)
    assert "corrupt" in load_error(corrupt, tiny_models)
    missing_key = "model.diffusion_model.out.2.weight"
    missing = write(tmp_path, "missing.safetensors", {k: v for k, v in ldm_state.items() if k != missing_key})
    assert "missing keys" in load_error(missing, tiny_models)
    assert "not found" in load_error(tmp_path / "absent.safetensors", tiny_models)


def test_pickled_code_is_refused(tiny_models, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # unpickling would create the marker file

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": Payload()}}, evil)
    message = load_error(evil, tiny_models)
    assert "would run code" in message and "safetensors" in message and str(evil) in message
    assert not marker.exists()


def test_a_safetensors_file_under_a_ckpt_name_is_said_to_be_one(tiny_models, tmp_path):
    """A RIDFR .safetensors renamed RestorerIDFull.ckpt: torch would call it a pickle holding Python objects."""
    renamed = tmp_path / "RestorerIDFull.ckpt"
    renamed.write_bytes(tiny_models.content.read_bytes())
    with pytest.raises(CheckpointError) as info:
        backends.load_content(renamed)
    assert str(info.value) == (f"content weights: {renamed} is a safetensors file (format 'ridfr-content') with a "
                               "'.ckpt' name; rename it to RestorerIDFull.safetensors and use that name.")


def test_content_file_errors(tiny_models, tmp_path):
    with pytest.raises(CheckpointError, match="is neither RIDFR content weights"):
        backends.load_content(tiny_models.checkpoint)
    state = load_file(str(tiny_models.content))
    config = json.dumps(content_files.content_config(backends.load_content(tiny_models.content)))
    future = write(tmp_path, "future.safetensors", state,
                   {"format": "ridfr-content", "format_version": "99", "config": config})
    with pytest.raises(CheckpointError, match="update the RIDFR node pack"):
        backends.load_content(future)
    extra = write(tmp_path, "extra.safetensors", {**state, "surprise.weight": torch.zeros(1)},
                  {"format": "ridfr-content", "format_version": "1", "config": config})
    with pytest.raises(CheckpointError, match="unexpected keys: surprise.weight"):
        backends.load_content(extra)
    with pytest.raises(CheckpointError, match="python -m ridfr_core.train"):
        backends.load_content(tmp_path / "nothing.safetensors")
    for name, bad_config in (("no_config", None), ("four_channels", json.dumps({**json.loads(config), "in_channels": 4}))):
        metadata = {"format": "ridfr-content", "format_version": "1", **({"config": bad_config} if bad_config else {})}
        bad = write(tmp_path, f"{name}.safetensors", state, metadata)
        with pytest.raises(CheckpointError, match="no usable architecture") as info:
            backends.load_content(bad)
        assert str(bad) in str(info.value)


def test_adapter_file_errors(tiny_models, tmp_path):
    base = checkpoints.load_base(tiny_models.checkpoint, tiny_models.configs, cache_dir=tmp_path)
    plain = tmp_path / "ip-adapter_sd15.bin"
    torch.save({"image_proj": {"proj.weight": torch.zeros(4, 4)}, "ip_adapter": {"1.to_k_ip.weight": torch.zeros(1)}},
               plain)
    with pytest.raises(CheckpointError, match="plain IP-Adapter"):
        adapter_files.load_identity_adapter(plain, base.unet)
    published = torch.load(tiny_models.adapter_v2, weights_only=True)
    wide = faceid_plus_state({**checkpoints.load_config("unet", tiny_models.configs), "cross_attention_dim": 128}, 48, 4)
    sdxl_like = tmp_path / "ip-adapter-faceid-plusv2_sdxl.bin"
    torch.save(wide, sdxl_like)
    with pytest.raises(CheckpointError, match="another base model"):
        adapter_files.load_identity_adapter(sdxl_like, base.unet)
    incomplete = tmp_path / "incomplete.bin"
    ip = dict(published["ip_adapter"])
    del ip["3.to_v_ip.weight"]
    torch.save({"image_proj": published["image_proj"], "ip_adapter": ip}, incomplete)
    with pytest.raises(CheckpointError, match="lacks '3.to_k_ip.weight'/'3.to_v_ip.weight'"):
        adapter_files.load_identity_adapter(incomplete, base.unet)
    with pytest.raises(CheckpointError, match="no image_proj/ip_adapter"):
        adapter_files.load_identity_adapter(tiny_models.checkpoint, base.unet)
    ip = dict(published["ip_adapter"])
    ip["0.to_q_lora.up.weight"] = torch.zeros(2 * ip["0.to_q_lora.up.weight"].shape[0], ip["0.to_q_lora.up.weight"].shape[1])
    other_lora = tmp_path / "other-lora.bin"
    torch.save({"image_proj": published["image_proj"], "ip_adapter": ip}, other_lora)
    with pytest.raises(CheckpointError, match="LoRA '0.to_q_lora.down.weight'.*different base model"):
        adapter_files.load_identity_adapter(other_lora, base.unet)


def test_clip_vision_errors(tiny_models, tmp_path):
    open_clip = write(tmp_path, "open_clip.safetensors", {"visual.transformer.resblocks.0.attn.in_proj_weight":
                                                          torch.zeros(3, 3)})
    with pytest.raises(CheckpointError, match="open_clip layout"):
        checkpoints.load_clip_vision(open_clip, tiny_models.configs)
    state = load_file(str(tiny_models.clip_vision))
    narrow = write(tmp_path, "vit_l.safetensors", {**state, "vision_model.embeddings.class_embedding": torch.zeros(1024)})
    with pytest.raises(CheckpointError, match="ViT-H/14"):
        checkpoints.load_clip_vision(narrow, tiny_models.configs)
