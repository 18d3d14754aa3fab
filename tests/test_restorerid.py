"""RestorerID's LQ branch as the second content backend: layout, loading, modulation math, pipeline, CLI."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from shared_data import SHARED
from restorerid_layout import tiny_branch
from ridfr_core import backends
from ridfr_core.weights import checkpoints
from ridfr_core.backends import RESTORERID
from ridfr_core.weights.checkpoints import CheckpointError
from ridfr_core.identity.adapter import Identity
from ridfr_core.pipeline import RIDFRPipeline
from ridfr_core.sampling.noise import RunNoise, face_seed
from ridfr_core.backends.restorerid.lq_branch import LQBranch, branch_state_from_checkpoint, modulate
from ridfr_core.backends.restorerid.files import LQ_BRANCH_GROUPS, partition
from ridfr_core.backends.restorerid.denoiser import RestorerIDDenoiser

LAYOUT = SHARED / "notes" / "restorerid-layout.json"


def test_full_size_key_partition_matches_the_published_layout():
    """At full size, our LQ branch has exactly the names and shapes RestorerID's code gives its checkpoint."""
    if not LAYOUT.is_file():
        pytest.skip(f"RestorerID layout notes not found at {LAYOUT} (shared resources absent)")
    keys = {k: tuple(v) for k, v in json.loads(LAYOUT.read_text())["keys"].items()}
    groups = partition(keys)
    assert {group: len(groups.get(group, [])) for group in
            ("encoder", "spade", "IDBalance", "faceid_lora", "faceid_kv", "adapter")} == {
        "encoder": 200, "spade": 176, "IDBalance": 330, "faceid_lora": 256, "faceid_kv": 32, "adapter": 576}
    spade_blocks = {k.split(".spade.")[0] for k in groups["spade"]}
    assert len(spade_blocks) == 22 == len({k.split(".IDBalance.")[0] for k in groups["IDBalance"]})

    meta = {k: torch.empty(shape, device="meta") for k, shape in keys.items()}
    branch_state = branch_state_from_checkpoint(meta)
    assert len(branch_state) == sum(len(groups[g]) for g in LQ_BRANCH_GROUPS)
    config = LQBranch.config_from_state(branch_state)
    with torch.device("meta"):
        branch = LQBranch(config)
    assert {k: tuple(v.shape) for k, v in branch.state_dict().items()} == {
        k: tuple(v.shape) for k, v in branch_state.items()}
    widths = {name: channels for name, channels in config["blocks"].items()}
    assert widths["input_blocks.1"] == 320 and widths["middle_block.2"] == 1280 and widths["output_blocks.11"] == 320
    assert config["feature_channels"] == 256 and config["hidden"] == 128 and config["context_dim"] == 768
    assert config["encoder"]["model_channels"] == 256 and config["encoder"]["fea_tran"] == [256, 256, 512, 512]


def test_checkpoint_gives_only_the_lq_branch_and_is_converted_once(restorerid_checkpoint, tiny_models, tmp_path):
    expected = tiny_branch(tiny_models.unet, seed=11).state_dict()
    branch = backends.load_content(restorerid_checkpoint, cache_dir=tmp_path)
    assert isinstance(branch, LQBranch) and backends.file_backend(restorerid_checkpoint).name == "restorerid"
    assert branch.state_dict().keys() == expected.keys()
    assert all(torch.equal(branch.state_dict()[k], v) for k, v in expected.items())
    converted = list(tmp_path.glob("restorerid_lq_*.safetensors"))
    assert len(converted) == 1
    assert checkpoints.read_safetensors_metadata(converted[0], "x")["format"] == "restorerid-lq-branch"
    # the converted file loads on its own (e.g. moved into models/ridfr) and is what later loads read
    again = backends.load_content(converted[0])
    assert all(torch.equal(again.state_dict()[k], v) for k, v in expected.items())
    assert backends.file_backend(converted[0], quick=True).name == "restorerid"
    save_file({k: torch.zeros_like(v) for k, v in again.state_dict().items()}, str(converted[0]),
              metadata=checkpoints.read_safetensors_metadata(converted[0], "x"))
    cached = backends.load_content(restorerid_checkpoint, cache_dir=tmp_path)
    assert all(not v.any() for v in cached.state_dict().values())  # proves the cache is read


def test_bad_restorerid_files_are_clear_errors(restorerid_checkpoint, tmp_path):
    state = torch.load(restorerid_checkpoint, weights_only=True)["state_dict"]
    no_encoder = tmp_path / "no_encoder.safetensors"
    save_file({k: v.contiguous() for k, v in state.items() if not k.startswith("structcond_stage_model.")}, no_encoder)
    with pytest.raises(CheckpointError, match=r"lacks the structure encoder of its low-quality branch \(no "
                                              r"structcond_stage_model\.\* keys\); it is not a complete "
                                              r"RestorerIDFull.ckpt") as info:
        backends.load_content(no_encoder, cache_dir=tmp_path)
    assert str(no_encoder) in str(info.value)
    no_modulation = tmp_path / "no_modulation.safetensors"
    save_file({k: v.contiguous() for k, v in state.items() if ".spade." not in k and ".IDBalance." not in k},
              no_modulation)
    with pytest.raises(CheckpointError, match="holds RestorerID's structure encoder .* but lacks the spade/IDBalance"):
        backends.load_content(no_modulation, cache_dir=tmp_path)
    half = tmp_path / "half.safetensors"
    save_file({k: v.contiguous() for k, v in state.items() if ".input_blocks.1.0.IDBalance." not in k}, half)
    with pytest.raises(CheckpointError, match="input_blocks.1 have spade or IDBalance but not both"):
        backends.load_content(half, cache_dir=tmp_path)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "RestorerIDFull.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": Payload()}, evil)
    with pytest.raises(CheckpointError, match="would run code"):
        backends.load_content(evil, cache_dir=tmp_path)
    assert not marker.exists()


def tiny_inputs(batch: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=generator), torch.randn(batch, 4, 8, 8, generator=generator),
            torch.randn(batch, 77, 64, generator=generator))


def test_strength_zero_is_the_plain_unet_and_the_unet_is_left_alone(tiny_models):
    branch = tiny_branch(tiny_models.unet, seed=3)
    before = {k: v.clone() for k, v in tiny_models.unet.state_dict().items()}
    denoiser = RestorerIDDenoiser(tiny_models.unet, branch)
    latents, lq_latent, text = tiny_inputs()
    with torch.no_grad():
        plain = tiny_models.unet(latents, 500, text).sample
        assert torch.equal(denoiser(latents, 500, text, lq_latent, content_scale=0.0), plain)
        modulated = denoiser(latents, 500, text, lq_latent)
        half = denoiser(latents, 500, text, lq_latent, content_scale=torch.tensor([0.0, 1.0]))
    assert (modulated - plain).abs().max() > 1e-3
    assert torch.equal(half[0], plain[0]) and torch.allclose(half[1], modulated[1], atol=1e-6)
    assert all(torch.equal(v, before[k]) for k, v in tiny_models.unet.state_dict().items())


def test_zero_idbalance_equals_the_spade_only_path(tiny_models):
    branch = tiny_branch(tiny_models.unet, seed=4, idbalance=False)
    latents, lq_latent, _ = tiny_inputs()
    tokens = torch.randn(2, 4, 64)
    with torch.no_grad():
        features = branch.features(lq_latent, torch.tensor([500, 500]))
        for name in branch.config["blocks"]:
            width = branch.config["blocks"][name]
            side = {32: 8, 64: 4}[width]  # tiny UNet: 32 channels at latent width 8, 64 at width 4
            h, skip = torch.randn(2, width, side, side), torch.randn(2, width, side, side)
            assert torch.equal(modulate(branch.modulation(name), h, skip, features, tokens),
                               modulate(branch.modulation(name), h, skip, features, None))
        trained = tiny_branch(tiny_models.unet, seed=4)
        name = next(iter(trained.config["blocks"]))
        h, skip = torch.randn(2, 32, 8, 8), torch.randn(2, 32, 8, 8)
        features = trained.features(lq_latent, torch.tensor([500, 500]))
        assert not torch.equal(modulate(trained.modulation(name), h, skip, features, tokens),
                               modulate(trained.modulation(name), h, skip, features, None))


def test_the_restorerid_file_serves_as_the_base_model(restorerid_checkpoint, tiny_models, tmp_path):
    base = checkpoints.load_base(restorerid_checkpoint, tiny_models.configs, cache_dir=tmp_path,
                                 sd15_part=backends.sd15_part)
    for ours, theirs in ((base.unet, tiny_models.unet), (base.vae, tiny_models.vae)):
        assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours.state_dict().items())


@pytest.fixture(scope="module")
def restorerid_pipeline(restorerid_checkpoint, tiny_models, tmp_path_factory):
    return RIDFRPipeline.from_files(restorerid_checkpoint, restorerid_checkpoint, tiny_models.adapter_v1,
                                    tiny_models.clip_vision, config_dir=tiny_models.configs,
                                    cache_dir=tmp_path_factory.mktemp("cache"))


def face_identity(seed: int) -> Identity:
    generator = torch.Generator().manual_seed(seed)
    return Identity(torch.nn.functional.normalize(torch.randn(1, 512, generator=generator), dim=-1),
                    torch.randn(1, 257, 48, generator=generator))


def test_pipeline_routes_prompts_and_identities_under_cfg(restorerid_pipeline):
    """Cond rows: positive prompt + the face's identity; uncond rows: negative prompt + the null identity, with
    the same LQ latent (one per face); a face with identity scale 0 gets the null identity on both sides."""
    pipeline, calls = restorerid_pipeline, []
    hook = pipeline.denoiser.register_forward_pre_hook(lambda module, args: calls.append(args[2:]))
    try:
        assert pipeline.backend is RESTORERID
        faces = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        pipeline(faces, Identity.cat([face_identity(1), face_identity(2)]), steps=3,
                 identity_scale=torch.tensor([1.0, 0.0]))
    finally:
        hook.remove()
    assert len(calls) == 2  # the plan's last step is a no-op: not computed
    context, lq, id_tokens, _, scales = calls[0]
    models = pipeline.models
    positive, negative = models.prompts[RESTORERID.positive_prompt], models.prompts[RESTORERID.negative_prompt]
    texts = torch.cat([positive, positive, negative, negative])
    attention = next(iter(context.by_attention))
    with torch.no_grad():
        assert torch.allclose(context.by_attention[attention][0], attention.to_k(texts), atol=1e-6)
    assert lq.shape[0] == 2
    null = pipeline.null_tokens(1)[0]
    identity_tokens = pipeline.identity_tokens(face_identity(1), 1)[0]
    assert torch.allclose(id_tokens[0], identity_tokens, atol=1e-4) and torch.equal(id_tokens[1], null)
    assert torch.equal(id_tokens[2], null) and torch.equal(id_tokens[3], null)
    assert scales.tolist() == [1.0, 0.0, 1.0, 0.0]


def test_each_restoration_computes_its_constants_once(restorerid_pipeline):
    """The structure encoder runs on each face once per step (not on both CFG copies), the text and identity
    keys/values of a cross-attention once per restoration, and the plan's no-op last step not at all; the
    eps stay those of the full computation."""
    pipeline = restorerid_pipeline
    encoder_batches, key_calls, steps = [], [], 4
    attention = next(m for m in pipeline.models.unet.modules() if getattr(m, "is_cross_attention", False))
    hooks = [pipeline.models.content.encoder.register_forward_pre_hook(
                 lambda module, args: encoder_batches.append(args[0].shape[0])),
             attention.to_k.register_forward_hook(lambda module, args, out: key_calls.append(args[0].shape))]
    try:
        pipeline(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)), face_identity(4), steps=steps)
    finally:
        for hook in hooks:
            hook.remove()
    assert encoder_batches == [2] * (steps - 1)
    assert len(key_calls) == 1
    latents, lq, text = tiny_inputs(4)
    tokens = torch.randn(4, 4, 64, generator=torch.Generator().manual_seed(5))
    denoiser = pipeline.denoiser
    with torch.no_grad():
        full = denoiser(latents, 500, text, lq, tokens, 1.0, 0.75)
        shared = denoiser(latents, 500, *denoiser.prepare(text, lq[:2], tokens, 1.0, 0.75))
        lq_shared = denoiser(latents, 500, text, torch.cat([lq[:2], lq[:2]]), tokens, 1.0, 0.75)
    assert torch.allclose(shared, lq_shared, atol=1e-5) and not torch.allclose(full, lq_shared, atol=1e-3)


def test_the_last_step_of_restorerids_plan_changes_nothing():
    from ridfr_core.sampling.ldm_ddim import ddim_update, restorerid_plan

    for steps in (2, 50):
        plan = restorerid_plan(steps, 1.0)
        assert [i for i in range(steps) if not plan.changes_latents(i)] == [steps - 1]
        latents, eps, noise = (torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
        assert torch.allclose(ddim_update(latents, eps, plan, steps - 1, noise), latents, atol=1e-6)
        assert not torch.allclose(ddim_update(latents, eps, plan, steps - 2, noise), latents, atol=1e-3)


def test_pipeline_defaults_seeds_and_colour_fix(restorerid_pipeline):
    from ridfr_core.sampling.colorfix import wavelet_split

    faces = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    identity = face_identity(3)
    both = restorerid_pipeline(faces, identity, steps=3, seed=[5, 6])
    alone = restorerid_pipeline(faces[1:], identity, steps=3, seed=6)
    assert torch.allclose(both[1:], alone, atol=1e-5)  # a face's result does not depend on its batch
    raw = restorerid_pipeline(faces, identity, steps=3, seed=[5, 6], color_fix=False)
    assert not torch.equal(raw, both)
    _, low_fixed = wavelet_split(both)
    _, low_lq = wavelet_split(faces)
    _, low_raw = wavelet_split(raw)
    assert (low_fixed - low_lq).abs().mean() < 0.5 * (low_raw - low_lq).abs().mean()
    with pytest.raises(ValueError, match="steps must be between 1 and 200"):
        restorerid_pipeline(faces, identity, steps=1000)


class RecordingNoise(RunNoise):
    """The run's real draws, each face's row kept as it was drawn: (face seed, stream, tensor)."""

    def __init__(self, seeds: list[int], record: list):
        super().__init__(seeds)
        self.record = record

    def keep(self, stream: str, noise: torch.Tensor) -> torch.Tensor:
        self.record.extend((seed, stream, row) for seed, row in zip(self.seeds, noise))
        return noise

    def start(self, shape):
        return self.keep("start", super().start(shape))

    def posterior(self, shape):
        return self.keep("posterior", super().posterior(shape))

    def next(self, shape):
        return self.keep("steps", super().next(shape))


def assert_no_two_share_a_tensor(draws: list):
    for index, (seed, stream, noise) in enumerate(draws):
        for other_seed, other_stream, other in draws[index + 1:]:
            assert not torch.equal(noise, other), f"face seed {seed} {stream} == face seed {other_seed} {other_stream}"


def test_no_two_faces_or_candidates_share_a_noise_tensor(restorerid_pipeline):
    """Best-of-N, 2 candidates of 2 faces, through the pipeline (RestorerID samples the LQ posterior and draws
    step noise): every start, posterior and step tensor of every face and candidate differs from all others.
    The faces match nobody, so nothing is ranked."""
    from ridfr_core import metrics
    from ridfr_core.best_of_n import BestOfN, load_ranking_recogniser

    if metrics.dlib_unavailable_reason():
        pytest.skip(metrics.dlib_unavailable_reason())
    draws, seeds_used = [], []

    def restore_fn_with_seeds(seeds):
        seeds_used.extend(seeds)
        return lambda faces, scales, people: restorerid_pipeline(faces, None, steps=3,
                                                                 noise=RecordingNoise(seeds, draws))

    faces = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    BestOfN(2, load_ranking_recogniser("dlib", "test"), batch_size=3).around(restore_fn_with_seeds, [], seed=7)(
        faces, torch.zeros(2), [None, None])
    assert seeds_used == [7, 8, 9, 10]  # candidate k of face f: seed + k * F + f, as the report says
    assert len(draws) == 4 * (1 + 1 + 2)  # start, posterior, 2 steps: the plan's last step (a no-op) draws nothing
    assert_no_two_share_a_tensor(draws)


def test_no_two_video_tracks_share_a_noise_tensor():
    """The archive's and Content Condition's video faces sample with seed + their track."""
    seeds = [face_seed(3, track) for track in (0, 1, 2, 5)]
    draws = []
    noise, shape = RecordingNoise(seeds, draws), (len(seeds), 4, 8, 8)
    noise.start(shape), noise.posterior(shape), noise.next(shape), noise.next(shape)
    assert_no_two_share_a_tensor(draws)


def test_v2_faceid_is_refused_with_restorerid(restorerid_checkpoint, tiny_models, tmp_path):
    with pytest.raises(CheckpointError, match="RestorerID was trained with v1"):
        RIDFRPipeline.from_files(restorerid_checkpoint, restorerid_checkpoint, tiny_models.adapter_v2,
                                 tiny_models.clip_vision, config_dir=tiny_models.configs, cache_dir=tmp_path)


def test_cli_restores_with_only_the_public_restorerid_files(restorerid_models_dir, tiny_models, face_data, tmp_path,
                                                           caplog):
    from ridfr_core.restore import main, resolve_models

    paths = resolve_models(restorerid_models_dir, {}, need_insightface=True)
    assert paths["backend"] == "restorerid" and paths["base"] == paths["content"]
    identity = face_data / "celebref-mini" / "00005"
    lq_face = next(identity.glob("lq_*.png"))
    reference = sorted((identity / "refs").glob("*.jpg"))[0]
    out = tmp_path / "restored.png"
    with caplog.at_level(logging.INFO):
        code = main(["--lq", str(lq_face), "--aligned", "--aligned-references", "--id", str(reference), "--out",
                     str(out), "--models", str(restorerid_models_dir), "--steps", "2", "--device", "cpu"],
                    config_dir=tiny_models.configs)
    assert code == 0
    assert np.asarray(Image.open(out)).shape == (512, 512, 3)
    assert "content backend: RestorerID" in caplog.text
    assert "identity scale: auto -> 0.75, the fixed default" in caplog.text


def test_the_cli_says_what_a_restorerid_checkpoint_without_its_lq_branch_lacks(restorerid_models_dir,
                                                                                 restorerid_checkpoint, tmp_path, capsys):
    """It asked for an SD1.5 checkpoint (the file was not recognised, so nothing stood for the base)."""
    from ridfr_core.restore import main

    models = tmp_path / "models"
    models.mkdir()
    for entry in restorerid_models_dir.iterdir():
        if entry.name != "ridfr":
            (models / entry.name).symlink_to(entry.resolve())
    checkpoint = torch.load(restorerid_checkpoint, weights_only=True)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                if not k.startswith("structcond_stage_model.")}
    (models / "ridfr").mkdir()
    torch.save(checkpoint, models / "ridfr" / "RestorerIDFull.ckpt")
    assert main(["--lq", "x.png", "--id", "y.png", "--out", str(tmp_path / "o.png"), "--models", str(models)]) == 2
    err = capsys.readouterr().err
    assert f"{models / 'ridfr' / 'RestorerIDFull.ckpt'} holds RestorerID's spade/IDBalance modules" in err
    assert "lacks the structure encoder of its low-quality branch (no structcond_stage_model.* keys)" in err
    assert "SD1.5" not in err and "checkpoints" not in err and len(err.strip().splitlines()) == 1


def test_weights_for_another_unet_are_refused_naming_the_file(tiny_models, tmp_path):
    from diffusers import UNet2DConditionModel
    from tiny_models import TINY_CONFIGS

    from ridfr_core.weights.checkpoints import save_safetensors_atomic
    from ridfr_core.backends.restorerid.files import RESTORERID_FORMAT

    wider = UNet2DConditionModel(**{**TINY_CONFIGS["unet"], "block_out_channels": [32, 96]})
    branch = tiny_branch(wider, seed=5)
    path = tmp_path / "restorerid-wide.safetensors"
    save_safetensors_atomic(branch.state_dict(), path, {"format": RESTORERID_FORMAT, "format_version": "1"})
    with pytest.raises(CheckpointError, match="96 channels wide in the RestorerID file but 64") as info:
        RIDFRPipeline.from_files(tiny_models.checkpoint, path, tiny_models.adapter_v1, tiny_models.clip_vision,
                                 config_dir=tiny_models.configs, cache_dir=tmp_path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("weights", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("inputs", [torch.float32, torch.float16, torch.bfloat16])
def test_group_norm_computes_in_float32_for_any_mix_of_dtypes(weights, inputs):
    """Half-precision weights (ComfyUI's --fp16-unet / --bf16-unet) beside a float32 input, and the reverse:
    LDM's GroupNorm32 normalises in float32 and answers in the input's dtype."""
    from ridfr_core.backends.restorerid.lq_branch import GroupNorm32

    norm = GroupNorm32(64)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 64, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.group_norm(x.to(inputs).float(), 32, norm.weight.to(weights).float(),
                                              norm.bias.to(weights).float(), norm.eps)
    out = norm.to(weights)(x.to(inputs))
    assert out.dtype == inputs
    torch.testing.assert_close(out.float(), expected.to(inputs).float())
