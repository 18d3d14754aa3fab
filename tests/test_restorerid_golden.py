"""RestorerID end to end against the publisher's own code: ``../shared/restorerid-golden`` holds a tiny checkpoint
in the published layout, fixed inputs and every noise draw, and what RestorerID's classes and inference flow
(github YingJiacheng/RestorerID @157e288, ``pub_side.py``) computed from them. Our pipeline, fed the same, must
give the same prompts, identity tokens, structure features, eps and, through its own DDIM plan, the same image."""

from __future__ import annotations

import json

import pytest
import torch

from shared_data import SHARED
from ridfr_core.backends import RESTORERID
from ridfr_core.sampling.ldm_ddim import RESTORERID_DDIM
from ridfr_core.identity.adapter import Identity, clip_pixel_values, encode_clip_features
from ridfr_core.pipeline import RIDFRPipeline
from ridfr_core.backends.restorerid.prompts import PROMPT_TOKENS, RESTORERID_NEGATIVE, RESTORERID_POSITIVE
from ridfr_core.weights.checkpoints import token_ids

GOLDEN = SHARED / "restorerid-golden"
SD15 = __import__("pathlib").Path(__file__).resolve().parents[1] / "ridfr_core" / "configs" / "sd15"
IDENTITY_SCALE = 0.75  # what pub_side.py ran with
RTOL = 1e-4            # relative to each tensor's largest value; what we reach is printed by -s


def configs_from_checkpoint(state: dict) -> dict:
    """SD1.5's configs at the checkpoint's widths (read from tensor shapes). Head counts are not in shapes:
    make_tiny_ckpt.py keeps SD1.5's 8 UNet heads and gives both CLIP towers 2."""
    def sd15(name, **changes):
        return {**json.loads((SD15 / f"{name}.json").read_text()), **changes}

    width = state["model.diffusion_model.input_blocks.0.0.weight"].shape[0]
    context = state["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    vae = state["first_stage_model.encoder.conv_in.weight"].shape[0]
    text = state["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"].shape[1]
    text_mlp = state["cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    vision = state["Adapter.image_encoder.vision_model.embeddings.class_embedding"].shape[0]
    vision_mlp = state["Adapter.image_encoder.vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    return {"unet": sd15("unet", block_out_channels=[width * m for m in (1, 2, 4, 4)], cross_attention_dim=context),
            "vae": sd15("vae", block_out_channels=[vae * m for m in (1, 2, 4, 4)]),
            "text_encoder": sd15("text_encoder", hidden_size=text, intermediate_size=text_mlp, num_attention_heads=2,
                                 projection_dim=text),
            "clip_vision": sd15("clip_vision", hidden_size=vision, intermediate_size=vision_mlp, num_attention_heads=2,
                                projection_dim=state["Adapter.image_encoder.visual_projection.weight"].shape[0]),
            "scheduler": json.loads((SD15 / "scheduler.json").read_text())}


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    files = [GOLDEN / name for name in ("RestorerIDFull-tiny.ckpt", "inputs.pt", "publisher.pt")]
    if not all(f.is_file() for f in files):
        pytest.skip(f"publisher-made reference data not found in {GOLDEN} (../shared absent)")
    ckpt = files[0]
    state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
    configs = tmp_path_factory.mktemp("golden_configs")
    for name, config in configs_from_checkpoint(state).items():
        (configs / f"{name}.json").write_text(json.dumps(config))
    # the checkpoint is RestorerID weights, base, FaceID adapter and CLIP vision at once
    pipeline = RIDFRPipeline.from_files(ckpt, ckpt, config_dir=configs, cache_dir=tmp_path_factory.mktemp("cache"))
    inputs = torch.load(files[1], weights_only=True)
    return pipeline, inputs, torch.load(files[2], weights_only=True)


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    theirs = torch.as_tensor(theirs).float()
    return float((ours.float().cpu() - theirs).abs().max() / theirs.abs().max().clamp_min(1e-12))


def check(name: str, ours, theirs, errors: dict):
    assert tuple(ours.shape) == tuple(torch.as_tensor(theirs).shape), name
    errors[name] = relative_error(ours, theirs)
    assert errors[name] < RTOL, f"{name}: relative error {errors[name]:.2e}"


def ours_identity(pipeline, inputs) -> Identity:
    """Their CLIP crop is a BGR array (cv2); ours is the same face in RGB, which the backend hands CLIP as BGR."""
    rgb = torch.from_numpy(inputs["ref_crop"].numpy()[..., ::-1].copy()).permute(2, 0, 1)[None].float() / 255
    clip = encode_clip_features(pipeline.models.clip_vision, rgb, bgr=RESTORERID.clip_bgr)
    return Identity(inputs["id_embeds"], clip.float())


class RecordedNoise:
    """The publisher's draws, in the order its inference makes them: x_T; the posterior eps (zero for the
    posterior mean); each step's noise."""

    def __init__(self, inputs, posterior: bool):
        self.seeds = [0]
        self.start_noise = inputs["x_T"]
        self.posterior_noise = inputs["post_noise"] if posterior else torch.zeros_like(inputs["post_noise"])
        self.queue = list(inputs["step_noise"])

    def start(self, shape):
        return self.start_noise.clone()

    def posterior(self, shape):
        return self.posterior_noise.reshape(shape)

    def next(self, shape):
        return self.queue.pop(0).reshape(shape)


def test_prompts_identity_features_and_eps_match_the_publisher(golden):
    pipeline, inputs, pub = golden
    models, errors = pipeline.models, {}
    assert token_ids(PROMPT_TOKENS[RESTORERID_POSITIVE]).tolist() == pub["ids_pos"].tolist()
    assert token_ids(PROMPT_TOKENS[RESTORERID_NEGATIVE]).tolist() == pub["ids_neg"].tolist()
    text_pos, text_neg = models.prompts[RESTORERID_POSITIVE], models.prompts[RESTORERID_NEGATIVE]
    check("text_pos", text_pos, pub["text_pos"], errors)
    check("text_neg", text_neg, pub["text_neg"], errors)
    rgb = torch.from_numpy(inputs["ref_crop"].numpy()[..., ::-1].copy()).permute(2, 0, 1)[None].float() / 255
    check("clip_pixels", clip_pixel_values(rgb.flip(1)), pub["clip_pixels"], errors)
    identity = ours_identity(pipeline, inputs)
    check("clip_embeds", identity.clip_embeds, pub["clip_embeds"], errors)
    ref_c = pipeline.identity_tokens(identity, 1)
    null = pipeline.null_tokens(1)
    check("ref_c", ref_c, pub["ref_c"], errors)
    check("uncon_ref_c", null, pub["uncon_ref_c"], errors)
    with torch.no_grad():
        for t in (999, 500, 0):
            features = models.content.features(inputs["z_lq"], torch.tensor([t]))
            assert sorted(features) == sorted(pub[f"feats_{t}"])
            for width, theirs in pub[f"feats_{t}"].items():
                check(f"feats_{t}[{width}]", features[width], theirs, errors)
        for t in (999, 500):
            x, z = inputs["x_t"], inputs["z_lq"]
            cond = pipeline.denoiser(x, torch.tensor(t), text_pos, z, ref_c, 1.0, IDENTITY_SCALE)
            check(f"eps_cond_{t}", cond, pub[f"eps_cond_{t}"], errors)
            both = pipeline.denoiser(torch.cat([x, x]), torch.tensor(t), torch.cat([text_pos, text_neg]),
                                     torch.cat([z, z]), torch.cat([ref_c, null]), 1.0, IDENTITY_SCALE)
            e_c, e_u = both.chunk(2)
            check(f"eps_cfg_{t}", e_u + RESTORERID.guidance * (e_c - e_u), pub[f"eps_cfg_{t}"], errors)
    print("\nrelative errors:", {k: f"{v:.1e}" for k, v in errors.items()})


@pytest.mark.parametrize("eta", [0, 1])
@pytest.mark.parametrize("posterior", ["sample", "mean"])
def test_full_restoration_matches_the_publisher(golden, eta, posterior):
    """The CLI's defaults for this backend (its DDIM plan, CFG 4, prompts, posterior sample, colour fix then
    clamp) give the publisher's latents and image; 50 steps. Their last step (t=0) changes nothing, so ours
    skips it: the UNet is queried at every other timestep of theirs."""
    pipeline, inputs, pub = golden
    key, errors, model_t, finals = f"eta{eta}_{posterior}", {}, [], []
    decode = pipeline.decode

    def recording_decode(latents):
        finals.append(latents)
        return decode(latents)

    pipeline.decode = recording_decode
    hook = pipeline.denoiser.register_forward_pre_hook(lambda module, args: model_t.append(int(args[1])))
    try:
        assert RESTORERID.sampler == RESTORERID_DDIM and RESTORERID.steps == int(inputs["steps"])
        image = pipeline(inputs["lq01"], ours_identity(pipeline, inputs), identity_scale=IDENTITY_SCALE,
                         noise=RecordedNoise(inputs, posterior == "sample"), eta=eta)
    finally:
        pipeline.decode = decode
        hook.remove()
    assert pub[f"{key}_model_t"][-1] == 0 and model_t == pub[f"{key}_model_t"][:-1]
    check(f"{key}_final", finals[0], pub[f"{key}_final"], errors)
    check(f"{key}_image", image, pub[f"{key}_image"], errors)
    print(f"\n{key} relative errors:", {k: f"{v:.1e}" for k, v in errors.items()},
          "max abs image error", f"{(image - pub[f'{key}_image']).abs().max():.1e}")


def test_cli_takes_every_part_from_the_checkpoint_unless_told(golden, scripted_models_root, face_data, tmp_path,
                                                             caplog):
    """RestorerIDFull.ckpt alone serves as RestorerID weights, SD1.5 base, FaceID adapter and CLIP vision, even
    where other (here unreadable) files sit in the usual folders; a file named with an option is used instead."""
    import logging

    from ridfr_core.restore import main, resolve_models

    pipeline = golden[0]
    models = tmp_path / "models"
    (models / "ridfr").mkdir(parents=True)
    (models / "ridfr" / "RestorerIDFull.ckpt").symlink_to(GOLDEN / "RestorerIDFull-tiny.ckpt")
    configs = models / "ridfr" / "configs"
    configs.mkdir()
    state = torch.load(GOLDEN / "RestorerIDFull-tiny.ckpt", map_location="cpu", weights_only=True, mmap=True)
    for name, config in configs_from_checkpoint(state["state_dict"]).items():
        (configs / f"{name}.json").write_text(json.dumps(config))
    (models / "insightface").symlink_to(scripted_models_root)
    for folder, name in (("checkpoints", "v1-5-pruned-emaonly-fp16.safetensors"),
                         ("ipadapter", "ip-adapter-faceid-plus_sd15.bin"),
                         ("clip_vision", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors")):
        (models / folder).mkdir()
        (models / folder / name).write_bytes(b"not weights")
    paths = resolve_models(models, {}, need_insightface=True)
    assert paths["base"] == paths["content"] and paths["adapter"] is None and paths["clip_vision"] is None
    assert pipeline.models.adapter is not None and pipeline.models.clip_vision is not None

    identity = face_data / "celebref-mini" / "00005"
    common = ["--lq", str(next(identity.glob("lq_*.png"))), "--aligned", "--aligned-references",
              "--id", str(sorted((identity / "refs").glob("*.jpg"))[0]), "--models", str(models), "--steps", "2",
              "--device", "cpu"]
    with caplog.at_level(logging.INFO):
        assert main([*common, "--out", str(tmp_path / "restored.png")]) == 0
    assert (tmp_path / "restored.png").is_file()
    for part in ("base", "adapter", "clip_vision"):
        assert f"{part}: from RestorerIDFull.ckpt itself" in caplog.text
    assert "identity scale: auto" in caplog.text
    assert main([*common, "--out", str(tmp_path / "other.png"), "--base", "v1-5-pruned-emaonly-fp16.safetensors"]) == 2
