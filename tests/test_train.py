"""The trainer on tiny real-architecture models and 64 px real faces, on CPU.

Both stages learn (loss down on a fixed batch), the alignment term is exactly 0 for identical ID
photos, an interrupted run (stopped, or killed while writing a checkpoint) resumes to bit-identical
weights, and the exported file loads through the public loader and restores a face.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ridfr_core import backends, train

from ridfr_core.backends.ridfr import files as content_files

from ridfr_core.weights import checkpoints
from ridfr_core.identity.cache import IdentityCache
from ridfr_core.identity.adapter import Identity
from ridfr_core.pipeline import RIDFRPipeline
from ridfr_core.train import ConfigError, Trainer, TrainConfig, complete_checkpoints
from test_data import build_cache, identity_encoder, small_faces  # noqa: F401 (fixtures)

TINY = {"resolution": 64, "min_image_size": 32, "batch_size": 4, "mixed_precision": "no", "num_workers": 0,
        "validation_count": 0, "identity_variants": 2, "identity_min_size": 16, "identity_max_size": 64,
        "log_every": 1}


@pytest.fixture(scope="module")
def cache_folder(small_faces, identity_encoder, tmp_path_factory) -> Path:  # noqa: F811
    folder = tmp_path_factory.mktemp("identity_cache")
    build_cache(folder, small_faces.identities, identity_encoder)
    return folder


def make_config(stage: str, out: Path, models, faces, cache: Path | None = None, **options) -> TrainConfig:
    config = TrainConfig.from_dict({**TINY, "stage": stage, **options}, "test")
    config.data = str(faces.faces if stage == "content" else faces.identities)
    config.base, config.out = str(models.checkpoint), str(out)
    config.config_dir, config.cache_dir = str(models.configs), str(out.parent / "prompt_cache")
    if stage == "align":
        config.adapter, config.init_content = str(models.adapter_v2), str(models.content)
        config.identity_cache = str(cache)
    config.validate()
    return config


def fixed_batch(trainer: Trainer) -> dict:
    samples = [trainer.dataset[i] for i in range(trainer.config.batch_size)]
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


def test_content_stage_loss_goes_down_on_a_fixed_batch(tiny_models, small_faces, tmp_path):  # noqa: F811
    trainer = Trainer(make_config("content", tmp_path / "run", tiny_models, small_faces, learning_rate=1e-3))
    batch = fixed_batch(trainer)
    losses = [trainer.train_step([batch])["loss"] for _ in range(8)]
    assert losses[-1] < 0.9 * losses[0], losses
    assert trainer.unet.conv_in.weight.grad is None, "the UNet stays frozen"


def test_align_stage_loss_goes_down_and_the_alignment_term(tiny_models, small_faces, cache_folder, tmp_path):  # noqa: F811
    trainer = Trainer(make_config("align", tmp_path / "run", tiny_models, small_faces, cache_folder,
                                  learning_rate=1e-3))
    batch = fixed_batch(trainer)
    with torch.no_grad():
        different = trainer.compute_losses(batch)
        same = trainer.compute_losses({**batch, "id2_embed": batch["id1_embed"], "id2_clip": batch["id1_clip"]})
    assert different["align"] > 0
    assert same["align"] == 0  # exactly: same latent, timestep, noise and identity give the same eps
    assert different["loss"] == different["diffusion"] + different["align"]  # lambda = 1 by default
    adapter_before = {k: v.clone() for k, v in trainer.adapter.state_dict().items()}
    losses = [trainer.train_step([batch])["loss"] for _ in range(8)]
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(torch.equal(v, trainer.adapter.state_dict()[k]) for k, v in adapter_before.items())


def test_validation_samples_with_the_mixed_precision_weights(tiny_models, small_faces, tmp_path):  # noqa: F811
    """accelerate wraps the trained module's forward in autocast with fp32 outputs; validation must sample
    with a plain copy in the frozen models' dtype (bf16 on CPU stands in for fp16 on a GPU here)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    config = make_config("content", tmp_path / "run", tiny_models, small_faces, validation_count=1,
                         validation_steps=1)
    config.mixed_precision = "bf16"
    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps one global precision per process
    try:
        trainer = Trainer(config, Accelerator(mixed_precision="bf16", project_dir=config.out))
        assert trainer.unet.dtype == torch.bfloat16
        trainer.validate()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert (tmp_path / "run" / "samples" / "step-00000000.png").is_file()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("stage", ["content", "align"])
def test_training_steps_in_mixed_precision(tiny_models, small_faces, cache_folder, tmp_path, stage, precision):  # noqa: F811
    """What a GPU run does: frozen models (fp16 FaceID and SD1.5 files) in half precision, trained weights in
    float32 under accelerate's autocast. CPU torch runs these ops in half precision too."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    config = make_config(stage, tmp_path / "run", tiny_models, small_faces, cache_folder, learning_rate=1e-3)
    config.mixed_precision = precision
    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps one global precision per process
    try:
        trainer = Trainer(config, Accelerator(mixed_precision=precision, project_dir=config.out))
        half = trainer.weight_dtype
        frozen = [trainer.unet, trainer.vae] + ([trainer.adapter] if stage == "align" else [])
        assert {p.dtype for module in frozen for p in module.parameters()} == {half}
        before = {k: v.clone() for k, v in trainer.content.state_dict().items()}
        losses = [trainer.train_step([fixed_batch(trainer)])["loss"] for _ in range(2)]
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert all(math.isfinite(loss) for loss in losses), losses
    after = trainer.content.state_dict()
    assert {v.dtype for v in after.values()} == {torch.float32}
    assert any(not torch.equal(v, after[k]) for k, v in before.items())


def run_cli(stage: str, out: Path, models, faces, cache: Path | None = None, *extra: str) -> int:
    args = ["--stage", stage, "--data", str(faces.faces if stage == "content" else faces.identities),
            "--base", str(models.checkpoint), "--out", str(out), "--config-dir", str(models.configs),
            "--cache-dir", str(out.parent / "prompt_cache")]
    if stage == "align":
        args += ["--adapter", str(models.adapter_v2), "--init-content", str(models.content),
                 "--identity-cache", str(cache)]
    for key, value in TINY.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    return train.main(args + list(extra))


def training_state(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for name in ("content", "ema", "optimizer"):
        state |= {f"{name}/{k}": v for k, v in load_file(str(folder / f"{name}.safetensors")).items()}
    return state


def test_interrupted_runs_resume_to_the_uninterrupted_weights(tiny_models, small_faces, cache_folder, tmp_path,  # noqa: F811
                                                              monkeypatch):
    options = ("--set", "ema_decay=0.9", "--set", "checkpoint_every=2", "--set", "learning_rate=1e-4")
    assert run_cli("align", tmp_path / "straight", tiny_models, small_faces, cache_folder, "--max-steps", "4",
                   *options) == 0
    reference = training_state(tmp_path / "straight" / "checkpoints" / "step-00000004")

    # Stopped after 2 steps, then continued with a larger max_steps.
    resumed = tmp_path / "resumed"
    assert run_cli("align", resumed, tiny_models, small_faces, cache_folder, "--max-steps", "2", *options) == 0
    assert run_cli("align", resumed, tiny_models, small_faces, cache_folder, "--max-steps", "4", *options) == 0
    state = training_state(resumed / "checkpoints" / "step-00000004")
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in reference), "resume is not bit-exact"

    # Killed while writing the step-4 checkpoint: step 2 stays the last good one and resuming matches.
    killed = tmp_path / "killed"
    real_save = checkpoints.save_safetensors_atomic

    def dies_writing_step_4(tensors, path, metadata):
        if Path(path).name == "optimizer.safetensors" and "step-00000004" in str(path):
            Path(path).write_bytes(b"half a file")
            raise KeyboardInterrupt("killed mid-write")
        return real_save(tensors, path, metadata)

    monkeypatch.setattr(checkpoints, "save_safetensors_atomic", dies_writing_step_4)
    with pytest.raises(KeyboardInterrupt):
        run_cli("align", killed, tiny_models, small_faces, cache_folder, "--max-steps", "4", *options)
    monkeypatch.setattr(checkpoints, "save_safetensors_atomic", real_save)
    assert [p.name for p in complete_checkpoints(killed / "checkpoints")] == ["step-00000002"]
    assert backends.load_content(killed / "ridfr-align.safetensors") is not None  # last export intact
    assert run_cli("align", killed, tiny_models, small_faces, cache_folder, "--max-steps", "4", *options) == 0
    state = training_state(killed / "checkpoints" / "step-00000004")
    assert all(torch.equal(state[k], reference[k]) for k in reference), "resume after a kill is not bit-exact"
    assert not list((killed / "checkpoints").glob(".*partial"))


def test_a_killed_training_process_resumes_to_the_uninterrupted_weights(tiny_models, small_faces, tmp_path):  # noqa: F811
    """SIGKILL a real training process as soon as it has a checkpoint, wherever it is, then resume."""
    options = ["--max-steps", "6", "--set", "checkpoint_every=1", "--set", "ema_decay=0.9", "--set", "keep_checkpoints=1"]
    assert run_cli("content", tmp_path / "straight", tiny_models, small_faces, None, *options) == 0
    reference = training_state(tmp_path / "straight" / "checkpoints" / "step-00000006")

    killed = tmp_path / "killed"
    args = ["--stage", "content", "--data", str(small_faces.faces), "--base", str(tiny_models.checkpoint),
            "--out", str(killed), "--config-dir", str(tiny_models.configs), "--cache-dir", str(tmp_path / "prompt_cache")]
    args += [part for key, value in TINY.items() for part in ("--set", f"{key}={json.dumps(value)}")] + options
    command = [sys.executable, "-m", "ridfr_core.train", *args]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not complete_checkpoints(killed / "checkpoints") and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert complete_checkpoints(killed / "checkpoints"), "the process made no checkpoint before it was killed"
    assert train.main(args) == 0
    state = training_state(killed / "checkpoints" / "step-00000006")
    assert all(torch.equal(state[k], reference[k]) for k in reference), "resume after SIGKILL is not bit-exact"


def test_content_cli_writes_samples_logs_and_weights_the_pipeline_restores_with(tiny_models, small_faces,  # noqa: F811
                                                                               cache_folder, tmp_path):
    out = tmp_path / "content"
    assert run_cli("content", out, tiny_models, small_faces, None, "--max-steps", "2",
                   "--set", "validation_count=2", "--set", "validation_every=2", "--set", "validation_steps=2") == 0
    assert (out / "samples" / "step-00000002.png").is_file()
    assert list((out / "logs" / "content").glob("events.out.tfevents.*"))
    assert json.loads((out / "data_report.json").read_text())["images"] == 16
    weights = out / "ridfr-content.safetensors"
    metadata = checkpoints.read_safetensors_metadata(weights, "test")
    assert metadata["stage"] == "content" and metadata["step"] == "2"
    assert isinstance(backends.load_content(weights), content_files.ContentControlNet)

    pipeline = RIDFRPipeline.from_files(tiny_models.checkpoint, weights, tiny_models.adapter_v2,
                                        tiny_models.clip_vision, config_dir=tiny_models.configs,
                                        cache_dir=tmp_path / "prompt_cache")
    cache = IdentityCache(cache_folder)
    embed, clip = cache.features(next(iter(cache.entries)), 0)
    lq = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    restored = pipeline(lq, Identity(embed[None], clip[None].float()), steps=2)
    assert restored.shape == lq.shape and torch.isfinite(restored).all()


def test_align_cli_builds_the_identity_cache_with_insightface(tiny_models, small_faces, scripted_models_root,  # noqa: F811
                                                              tmp_path):
    out = tmp_path / "align"
    extra = ["--max-steps", "1", "--clip-vision", str(tiny_models.clip_vision),
             "--insightface-root", str(scripted_models_root)]
    assert run_cli("align", out, tiny_models, small_faces, out / "identity_cache", *extra) == 0
    assert len(IdentityCache(out / "identity_cache").entries) == 16
    assert checkpoints.read_safetensors_metadata(out / "ridfr-align.safetensors", "test")["stage"] == "align"


def test_options_are_checked_with_the_option_named(tiny_models, small_faces, tmp_path, capsys):  # noqa: F811
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        TrainConfig.from_dict({"learning_rat": 1e-5}, "test")
    with pytest.raises(ConfigError, match="batch_size='eight' should be a int"):
        TrainConfig.from_dict({"batch_size": "eight"}, "test")
    with pytest.raises(ConfigError, match="blur_sigma"):
        TrainConfig.from_dict({"degradation": {"blur_sigma": [5, 1]}}, "test")
    assert train.main(["--stage", "content", "--base", "x", "--out", str(tmp_path)]) == 2
    assert "data: not set; pass --data" in capsys.readouterr().err
    assert train.main(["--stage", "align", "--data", "x", "--base", "x", "--out", str(tmp_path)]) == 2
    assert "adapter" in capsys.readouterr().err
    assert train.main(["--stage", "content", "--data", "x", "--base", "x", "--out", str(tmp_path),
                       "--set", "mixed_precision=fp16"]) == 2
    assert "fp16' needs a GPU" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert train.main(["--stage", "content", "--data", "x", "--base", "x", "--out", str(tmp_path),
                           "--set", "mixed_precision=bf16"]) == 2
        assert "bf16' needs a GPU; on CPU use --set mixed_precision=no" in capsys.readouterr().err

    out = tmp_path / "run"
    assert run_cli("content", out, tiny_models, small_faces, None, "--max-steps", "1") == 0
    assert run_cli("content", out, tiny_models, small_faces, None, "--max-steps", "2", "--set", "seed=5") == 2
    assert "seed: 0 -> 5" in capsys.readouterr().err


def test_packaged_configs_hold_what_differs_from_the_defaults_and_give_the_papers_values():
    fields, defaults = set(TrainConfig.fields()), TrainConfig().to_dict()
    for stage, steps in (("content", 87_500), ("align", 45_000)):
        values = json.loads((train.CONFIG_DIR / f"train_{stage}.json").read_text())
        values.pop("_comment")
        assert set(values) <= fields, stage
        assert all(defaults[key] != value for key, value in values.items()), stage
        config = TrainConfig.from_dict(values, stage)
        assert (config.stage, config.max_steps, config.batch_size) == (stage, steps, 8)
        assert config.learning_rate == 1e-5 and config.align_weight == 1.0
