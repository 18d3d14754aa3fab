"""Alignment Learning on RestorerID's public weights (``--backend restorerid --stage align --init
RestorerIDFull.ckpt``), through the same trainer, on the tiny RestorerID checkpoint in the published layout
and 64 px real faces, on CPU: what is trained and what stays bit-identical, the loss, lambda = 0, the
condition dropout, SIGKILL + resume, and the exported file in our format restoring a face through the CLI."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ridfr_core import backends, train
from ridfr_core.backends.restorerid import RESTORERID
from ridfr_core.backends.restorerid.lq_branch import LQBranch
from ridfr_core.identity.adapter import Identity
from ridfr_core.identity.cache import IdentityEncoder
from ridfr_core.train import ConfigError, Trainer, TrainConfig, complete_checkpoints
from ridfr_core.weights import checkpoints
from shared_data import FACES
from test_data import build_cache, small_faces  # noqa: F401 (fixture)
from test_train import TINY, fixed_batch, training_state


@pytest.fixture(scope="module")
def bgr_cache(small_faces, scripted_models_root, tiny_models, tmp_path_factory):  # noqa: F811
    """The identity cache as RestorerID sees references: CLIP on BGR crops."""
    from ridfr_core.faces import load_face_analyzer

    analyzer = load_face_analyzer(models_root=scripted_models_root, device="cpu")
    clip_vision = checkpoints.load_clip_vision(tiny_models.clip_vision, tiny_models.configs)
    encoder = IdentityEncoder(analyzer, clip_vision, {"arcface": "w600k_r50.onnx", "clip_vision": "tiny"}, bgr=True)
    folder = tmp_path_factory.mktemp("bgr_cache")
    build_cache(folder, small_faces.identities, encoder)
    return folder


def cli_args(out: Path, models, checkpoint: Path, faces, cache: Path) -> list[str]:
    args = ["--backend", "restorerid", "--stage", "align", "--init", str(checkpoint), "--data", str(faces.identities),
            "--out", str(out), "--adapter", str(models.adapter_v1), "--clip-vision", str(models.clip_vision),
            "--identity-cache", str(cache), "--config-dir", str(models.configs),
            "--cache-dir", str(out.parent / "prompt_cache")]
    return args + [part for key, value in TINY.items() for part in ("--set", f"{key}={json.dumps(value)}")]


def make_config(out: Path, models, checkpoint: Path, faces, cache: Path, *extra: str) -> TrainConfig:
    return train.config_from_args(train.build_parser().parse_args(cli_args(out, models, checkpoint, faces, cache)
                                                                  + list(extra)))


def test_a_missing_init_file_is_named_before_anything_else(tmp_path, capsys):
    """It said "base: not set; pass --base PATH" (a RestorerID --init gives the base)."""
    missing = tmp_path / "RestorerIDFull.ckpt"
    for init, state in ((missing, "does not exist"), (tmp_path, "is a folder, not a file")):
        assert train.main(["--backend", "restorerid", "--stage", "align", "--init", str(init), "--data", "x",
                           "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --init {init}: {state}; give the content weights to start from (RestorerID: its "
                              "RestorerIDFull.ckpt") and "base" not in err
    assert not (tmp_path / "run").exists()


def snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    modules = {"content": trainer.content, "unet": trainer.unet, "vae": trainer.vae, "adapter": trainer.adapter}
    return {f"{name}/{key}": value.detach().clone() for name, module in modules.items()
            for key, value in module.state_dict().items()}


def test_the_backend_comes_from_the_init_file_which_also_gives_the_base(tiny_models, restorerid_checkpoint,
                                                                         small_faces, bgr_cache, tmp_path):  # noqa: F811
    config = make_config(tmp_path / "run", tiny_models, restorerid_checkpoint, small_faces, bgr_cache)
    assert (config.backend, config.base, config.weights_name) == (
        "restorerid", str(restorerid_checkpoint), "restorerid-align.safetensors")
    with pytest.raises(ConfigError, match="holds RestorerID .* pass --backend restorerid"):
        make_config(tmp_path / "run", tiny_models, restorerid_checkpoint, small_faces, bgr_cache, "--backend", "ridfr")
    with pytest.raises(ConfigError, match="stage: RestorerID .* --stage align"):
        make_config(tmp_path / "run", tiny_models, restorerid_checkpoint, small_faces, bgr_cache, "--stage", "content")
    with pytest.raises(ConfigError, match="train_parts: unet is not a part of RestorerID.*IDBalance"):
        make_config(tmp_path / "run", tiny_models, restorerid_checkpoint, small_faces, bgr_cache,
                    "--train-parts", "IDBalance,unet")


@pytest.mark.parametrize("parts,trained", [(None, {"IDBalance"}), ("IDBalance,spade", {"IDBalance", "spade"})])
def test_only_the_chosen_parts_learn_and_everything_else_stays_bit_identical(
        tiny_models, restorerid_checkpoint, small_faces, bgr_cache, tmp_path, parts, trained):  # noqa: F811
    extra = ("--set", "learning_rate=1e-3", "--set", "ema_decay=0.9") + (("--train-parts", parts) if parts else ())
    trainer = Trainer(make_config(tmp_path / "run", tiny_models, restorerid_checkpoint, small_faces, bgr_cache, *extra))
    assert isinstance(trainer.content, LQBranch)
    named = dict(trainer.content.named_parameters())
    assert {name for name, p in named.items() if p.requires_grad} == {
        name for name in named if ("encoder" if name.startswith("encoder.") else name.split(".")[2]) in trained}
    assert not any(p.requires_grad for module in (trainer.unet, trainer.vae, trainer.adapter) for p in module.parameters())
    before = snapshot(trainer)
    batch = fixed_batch(trainer)
    batch["condition_draws"] = torch.ones_like(batch["condition_draws"])  # no dropout: the same loss every step
    losses = [trainer.train_step([batch])["loss"] for _ in range(8)]
    assert losses[-1] < 0.9 * losses[0], losses
    after = snapshot(trainer)
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    expected = {f"content/{name}" for name, p in named.items() if p.requires_grad}
    assert changed == expected, sorted(changed ^ expected)[:5]
    assert all(p.grad is None for module in (trainer.unet, trainer.vae, trainer.adapter) for p in module.parameters())
    ema = dict(trainer.ema.named_parameters())
    assert all(torch.equal(ema[name], p) for name, p in named.items() if not p.requires_grad)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_restorerid_steps_in_mixed_precision(tiny_models, restorerid_checkpoint, small_faces, bgr_cache, tmp_path,  # noqa: F811
                                             precision):
    """As on a GPU: frozen SD1.5, VAE and FaceID in half precision, the LQ branch in float32 under autocast."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    config = make_config(tmp_path / "run", tiny_models, restorerid_checkpoint, small_faces, bgr_cache,
                         "--set", "learning_rate=1e-3")
    config.mixed_precision = precision
    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps one global precision per process
    try:
        trainer = Trainer(config, Accelerator(mixed_precision=precision, project_dir=config.out))
        assert {p.dtype for m in (trainer.unet, trainer.vae, trainer.adapter) for p in m.parameters()} == {
            trainer.weight_dtype}
        before = {k: v.clone() for k, v in trainer.content.state_dict().items()}
        losses = [trainer.train_step([fixed_batch(trainer)])["loss"] for _ in range(2)]
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert all(np.isfinite(loss) for loss in losses), losses
    after = trainer.content.state_dict()
    assert {v.dtype for v in after.values()} == {torch.float32}
    assert {k for k, v in before.items() if not torch.equal(v, after[k])} and all(
        torch.equal(v, after[k]) for k, v in before.items() if ".IDBalance." not in k)


def test_validation_restores_with_the_backends_sampler_and_the_trainers_null_identity(
        tiny_models, restorerid_checkpoint, small_faces, bgr_cache, tmp_path):  # noqa: F811
    trainer = Trainer(make_config(tmp_path / "run", tiny_models, restorerid_checkpoint, small_faces, bgr_cache,
                                  "--set", "validation_count=2", "--set", "validation_steps=2"))
    trainer.validate()
    grid = np.asarray(Image.open(tmp_path / "run" / "samples" / "step-00000000.png"))
    assert grid.shape == (2 * 64, 3 * 64, 3)
    restored = grid[:, 64:128].astype(float)
    assert restored.std() > 2 and np.abs(restored - grid[:, :64]).mean() > 1  # not the LQ passed through


def plain_diffusion_loss(trainer: Trainer, batch: dict) -> torch.Tensor:
    """mean over ID1 and ID2 of ||eps(z_t, ID) - eps||^2, each with its own forward pass, the LQ latent a VAE
    posterior sample."""
    with torch.no_grad():
        posterior = trainer.vae.encode(batch["target"]).latent_dist
        latents = (posterior.mean + posterior.std * batch["posterior_noise"]) * trainer.vae.config.scaling_factor
        noisy = trainer.noise_scheduler.add_noise(latents, batch["noise"], batch["timestep"])
        # the LQ latent is a sample of the VAE posterior, with the sample's own noise (publisher's training)
        lq = RESTORERID.content_input(trainer.content, batch["lq"], trainer.vae, noisy.shape[-2:],
                                      batch["lq_posterior_noise"])
        text = trainer.text.expand(noisy.shape[0], -1, -1)
        losses = []
        for name in ("id1", "id2"):
            tokens = trainer.adapter.identity_tokens(Identity(batch[f"{name}_embed"], batch[f"{name}_clip"].float()))
            eps = trainer.denoiser(noisy, batch["timestep"], text, lq, tokens, 1.0, 0.75)
            losses.append(F.mse_loss(eps, batch["noise"]))
    return sum(losses) / 2


def test_lambda_zero_is_the_plain_diffusion_loss_and_dropout_uses_the_null_identity(
        tiny_models, restorerid_checkpoint, small_faces, bgr_cache, tmp_path):  # noqa: F811
    trainer = Trainer(make_config(tmp_path / "run", tiny_models, restorerid_checkpoint, small_faces, bgr_cache,
                                  "--set", "align_weight=0"))
    batch = fixed_batch(trainer)
    kept = {**batch, "condition_draws": torch.ones_like(batch["condition_draws"])}
    with torch.no_grad():
        zero = trainer.compute_losses(kept)
    assert zero["align"] > 0 and zero["loss"] == zero["diffusion"]
    torch.testing.assert_close(zero["diffusion"], plain_diffusion_loss(trainer, kept), rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        other_sample = trainer.compute_losses({**kept, "lq_posterior_noise": -kept["lq_posterior_noise"]})
    assert other_sample["diffusion"] != zero["diffusion"], "the LQ latent must be a posterior sample, not the mean"
    trainer.config.align_weight = 1.0
    with torch.no_grad():
        one = trainer.compute_losses(kept)
        dropped = trainer.compute_losses({**kept, "condition_draws": torch.tensor([[0.0, 1.0]]).repeat(4, 1)})
    assert one["diffusion"] == zero["diffusion"] and one["loss"] == one["diffusion"] + one["align"]
    assert dropped["align"] == 0, "a dropped identity is the null identity for both references"


def run_cli(out: Path, models, checkpoint: Path, faces, cache: Path, *extra: str) -> int:
    return train.main(cli_args(out, models, checkpoint, faces, cache) + list(extra))


def test_sigkill_and_resume_is_bit_exact_and_the_file_restores_through_the_cli(
        tiny_models, restorerid_checkpoint, restorerid_models_dir, small_faces, bgr_cache, face_data, tmp_path,
        caplog):  # noqa: F811
    options = ["--max-steps", "4", "--set", "checkpoint_every=1", "--set", "ema_decay=0.9", "--set", "keep_checkpoints=1",
               "--set", "learning_rate=1e-4"]
    straight = tmp_path / "straight"
    assert run_cli(straight, tiny_models, restorerid_checkpoint, small_faces, bgr_cache, *options) == 0
    reference = training_state(straight / "checkpoints" / "step-00000004")

    killed = tmp_path / "killed"
    args = cli_args(killed, tiny_models, restorerid_checkpoint, small_faces, bgr_cache) + options
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen([sys.executable, "-m", "ridfr_core.train", *args], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not complete_checkpoints(killed / "checkpoints") and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert train.main(args) == 0
    state = training_state(killed / "checkpoints" / "step-00000004")
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in reference), "resume after SIGKILL is not bit-exact"

    # The exported file: our RestorerID format, loaded like the converted public weights, with its provenance.
    weights = killed / "restorerid-align.safetensors"
    assert backends.file_backend(weights, quick=True) is RESTORERID
    assert isinstance(backends.load_content(weights), LQBranch)
    metadata = checkpoints.read_safetensors_metadata(weights, "test")
    assert metadata["format"] == "restorerid-lq-branch" and metadata["source"] == restorerid_checkpoint.name
    assert (metadata["stage"], metadata["step"], metadata["align_weight"]) == ("align", "4", "1.0")
    assert metadata["fine_tuned_from"] == restorerid_checkpoint.name
    assert metadata["fine_tuned_from_size"] == str(restorerid_checkpoint.stat().st_size)
    assert len(metadata["fine_tuned_from_sha256"]) == 64 and metadata["train_parts"] == "IDBalance"
    assert (metadata["data"], metadata["data_images"], metadata["data_identities"]) == ("identities", "16", "4")

    # `models list` shows it; the CLI restores with it, the base coming from the RestorerIDFull.ckpt beside it.
    models = models_with_aligned(tmp_path, restorerid_models_dir, restorerid_checkpoint, weights)
    from ridfr_core.models.__main__ import main as models_main
    from ridfr_core.restore import main as restore_main, resolve_models

    caplog.clear()
    listing = subprocess.run([sys.executable, "-m", "ridfr_core.models", "list", "--backend", "restorerid",
                              "--models", str(models)], env=env, capture_output=True, text=True, check=True).stdout
    assert "ridfr/aligned.safetensors" in listing and "alignment-trained from RestorerIDFull.ckpt" in listing
    assert models_main(["list", "--backend", "ridfr", "--models", str(models)]) == 0
    paths = resolve_models(models, {"content": "aligned.safetensors"}, need_insightface=True)
    assert paths["backend"] == "restorerid" and paths["base"] == models / "ridfr" / "RestorerIDFull.ckpt"
    identity = face_data / "celebref-mini" / "00005"
    out = tmp_path / "restored.png"
    with caplog.at_level(logging.INFO):
        code = restore_main(["--lq", str(next(identity.glob("lq_*.png"))), "--aligned", "--aligned-references",
                             "--id", str(sorted((identity / "refs").glob("*.jpg"))[0]), "--out", str(out),
                             "--models", str(models), "--content", "aligned.safetensors", "--steps", "2",
                             "--device", "cpu"], config_dir=tiny_models.configs)
    assert code == 0 and "content backend: RestorerID (LQ branch) (aligned.safetensors)" in caplog.text
    restored = np.asarray(Image.open(out))
    assert restored.shape == (512, 512, 3) and restored.std() > 2


def models_with_aligned(tmp_path, restorerid_models_dir, restorerid_checkpoint, aligned: Path) -> Path:
    """A models folder with the public RestorerID checkpoint and ``aligned`` (as ridfr/aligned.safetensors) beside
    it, and the other model files of ``restorerid_models_dir``."""
    models = tmp_path / "models"
    models.mkdir()
    for folder in ("ipadapter", "clip_vision", "insightface"):
        (models / folder).symlink_to((restorerid_models_dir / folder).resolve())
    (models / "ridfr").mkdir()
    (models / "ridfr" / "RestorerIDFull.ckpt").symlink_to(restorerid_checkpoint)
    (models / "ridfr" / "aligned.safetensors").symlink_to(aligned)
    return models


@pytest.fixture(scope="module")
def aligned_file(tiny_models, restorerid_checkpoint, small_faces, bgr_cache, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("aligned") / "run"
    assert run_cli(out, tiny_models, restorerid_checkpoint, small_faces, bgr_cache, "--max-steps", "2",
                   "--set", "learning_rate=1e-3") == 0
    return out / "restorerid-align.safetensors"


@pytest.mark.skipif(not FACES.is_dir(), reason=f"real test faces not found at {FACES} (../shared absent)")
def test_eval_compares_the_public_and_the_aligned_weights_in_one_table(
        aligned_file, restorerid_models_dir, restorerid_checkpoint, tiny_models, tmp_path, capsys):
    from test_musiq import random_state

    from ridfr_core import eval as evaluation
    from ridfr_core.models.registry import MUSIQ_KONIQ

    models = models_with_aligned(tmp_path, restorerid_models_dir, restorerid_checkpoint, aligned_file)
    (models / MUSIQ_KONIQ.relative).parent.mkdir(parents=True)
    torch.save(random_state(), models / MUSIQ_KONIQ.relative)
    split = evaluation.build_split(FACES, num_test_ids=1, seed=0, pattern="refs/*.jpg", max_images_per_id=1)
    evaluation.degrade_split(split, tmp_path / "data")
    out = tmp_path / "compare"
    assert evaluation.main(["compare", "--data", str(tmp_path / "data"), "--content", "RestorerIDFull.ckpt",
                            "--content", "aligned.safetensors", "--models", str(models), "--steps", "2",
                            "--out", str(out)], config_dir=tiny_models.configs) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "comparison.json").read_text())
    table = report["metrics"]
    assert set(report["files"]) == {"RestorerIDFull", "aligned"}
    assert {"psnr_y", "ssim_y", "musiq"} <= set(table)
    assert all(np.isfinite(value) for value in table["musiq"].values())
    assert table["psnr_y"]["RestorerIDFull"] != table["psnr_y"]["aligned"], "the two files restored the same"
    for recogniser in ("dlib", "facenet"):  # the default recognisers, independent of the ArcFace the models read
        assert {f"ids_hq_{recogniser}", f"identity_variance_{recogniser}"} <= set(table), report["skipped"]
        assert all(np.isfinite(v) for v in table[f"ids_hq_{recogniser}"].values())
    assert "RestorerIDFull" in printed.splitlines()[-len(table) - 1] and "musiq" in printed
    for label in ("RestorerIDFull", "aligned"):
        case = next((out / label / "restored").iterdir())
        assert len(list(case.iterdir())) == 2  # one restoration per reference
