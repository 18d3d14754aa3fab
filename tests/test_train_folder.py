"""The trainer's run folder under bad conditions: a used folder, damaged checkpoints, a kill while
writing, an unwritable --out and a loss that turns NaN. Tiny real models and real faces, on CPU."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ridfr_core import backends, train

from ridfr_core.backends.ridfr import files as content_files
from ridfr_core.run_folder import checkpoint_problem
from ridfr_core.train import complete_checkpoints
from test_data import small_faces  # noqa: F401 (fixture)
from test_train import TINY, run_cli, training_state


def hidden_files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob(".*"))


def error_line(err: str) -> str:
    """The one line the CLI printed for an error (the progress bar shares stderr), and no traceback."""
    lines = [line for line in err.splitlines() if "error: " in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_new_run_in_a_used_folder_is_refused_unless_overwritten(tiny_models, small_faces, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    assert run_cli("content", out, tiny_models, small_faces, None, "--max-steps", "2",
                   "--set", "checkpoint_every=1", "--set", "ema_decay=0.9") == 0
    before = training_state(out / "checkpoints" / "step-00000002")
    capsys.readouterr()
    assert run_cli("content", out, tiny_models, small_faces, None, "--max-steps", "1", "--set", "seed=5",
                   "--resume", "none") == 2
    err = capsys.readouterr().err
    assert "already holds a 'content' run" in err and "--overwrite" in err
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == ["step-00000001", "step-00000002"]
    assert all(torch.equal(v, before[k]) for k, v in training_state(out / "checkpoints" / "step-00000002").items())

    assert run_cli("content", out, tiny_models, small_faces, None, "--max-steps", "1", "--set", "seed=5",
                   "--resume", "none", "--overwrite") == 0
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == ["step-00000001"]  # nothing of the old run
    assert json.loads((out / "checkpoints" / "step-00000001" / "config.json").read_text())["seed"] == 5
    assert train.main(["--stage", "content", "--data", "x", "--base", "x", "--out", str(out), "--overwrite"]) == 2
    assert "--overwrite starts a new run" in capsys.readouterr().err


def test_a_direct_trainer_run_refuses_a_used_folder_too(tiny_models, small_faces, tmp_path):  # noqa: F811
    """The CLI refused ``--resume none`` over an earlier run; ``Trainer.run(resume="none")`` trained over it."""
    from ridfr_core.run_folder import RunFolderError
    from ridfr_core.train.options import build_parser, config_from_args
    from ridfr_core.train.trainer import Trainer

    out = tmp_path / "run"
    assert run_cli("content", out, tiny_models, small_faces, None, "--max-steps", "1") == 0
    weights = out / "checkpoints" / "step-00000001" / "content.safetensors"
    before = weights.read_bytes()
    args = ["--stage", "content", "--data", str(small_faces.faces), "--base", str(tiny_models.checkpoint), "--out",
            str(out), "--config-dir", str(tiny_models.configs), "--cache-dir", str(tmp_path / "prompt_cache"),
            "--max-steps", "1", *[part for key, value in TINY.items() for part in ("--set", f"{key}={json.dumps(value)}")]]
    with pytest.raises(RunFolderError, match="already holds a 'content' run"):
        Trainer(config_from_args(build_parser().parse_args(args))).run(resume="none")
    assert weights.read_bytes() == before


def test_a_truncated_newest_checkpoint_gives_way_to_the_previous_one(tiny_models, small_faces, tmp_path, caplog):  # noqa: F811
    caplog.set_level(logging.INFO, "ridfr_core.train")
    out = tmp_path / "run"
    options = ("--max-steps", "2", "--set", "checkpoint_every=1", "--set", "ema_decay=0.9")
    assert run_cli("content", out, tiny_models, small_faces, None, *options) == 0
    newest = out / "checkpoints" / "step-00000002"
    reference = {k: v.clone() for k, v in training_state(newest).items()}  # not views of the file cut below
    weights = newest / "optimizer.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a power cut mid-write
    assert "optimizer.safetensors" in checkpoint_problem(newest)

    assert run_cli("content", out, tiny_models, small_faces, None, *options) == 0
    assert "step-00000002: optimizer.safetensors is truncated" in caplog.text
    assert f"Resumed from {out / 'checkpoints' / 'step-00000001'} at step 1" in caplog.text
    assert checkpoint_problem(newest) is None
    state = training_state(newest)
    assert [k for k in reference if not torch.equal(state[k], reference[k])] == [], "redoing step 2 is not bit-exact"


def test_a_corrupt_state_json_is_one_clear_line(tiny_models, small_faces, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    assert run_cli("content", out, tiny_models, small_faces, None, "--max-steps", "1") == 0
    checkpoint = out / "checkpoints" / "step-00000001"
    (checkpoint / "state.json").write_text('{"format": "ridfr-train-state", "ver')
    capsys.readouterr()
    assert run_cli("content", out, tiny_models, small_faces, None, "--max-steps", "2") == 2
    err = capsys.readouterr().err
    assert "state.json is not valid JSON" in error_line(err) and "no intact checkpoint" in err
    assert run_cli("content", out, tiny_models, small_faces, None, "--max-steps", "2", "--resume", str(checkpoint)) == 2
    err = capsys.readouterr().err
    assert "is damaged (state.json is not valid JSON" in error_line(err)


def test_an_unwritable_out_is_one_clear_line(tiny_models, small_faces, tmp_path, capsys):  # noqa: F811
    (tmp_path / "a_file").write_text("not a folder")
    out = tmp_path / "a_file" / "run"
    assert run_cli("content", out, tiny_models, small_faces, None, "--max-steps", "1") == 2
    err = capsys.readouterr().err
    assert error_line(err).startswith(f"error: out: cannot write to {out}")


def test_a_nan_loss_is_one_clear_line(tiny_models, small_faces, tmp_path, capsys):  # noqa: F811
    content = backends.load_content(tiny_models.content)
    with torch.no_grad():
        next(content.parameters()).fill_(float("nan"))
    content_files.save_content(content, tmp_path / "nan.safetensors")
    assert run_cli("content", tmp_path / "run", tiny_models, small_faces, None, "--max-steps", "1",
                   "--init-content", str(tmp_path / "nan.safetensors")) == 2
    err = capsys.readouterr().err
    assert "step 1: loss is" in error_line(err) and "NaN weights" in err


def test_a_failed_export_leaves_no_hidden_weights_file(tiny_models, small_faces, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    (out / "ridfr-content.safetensors" / "something").mkdir(parents=True)  # the export cannot be renamed there
    assert run_cli("content", out, tiny_models, small_faces, None, "--max-steps", "1") == 2
    assert "ridfr-content.safetensors" in error_line(capsys.readouterr().err)
    assert hidden_files(out) == []
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == ["step-00000001"]


def test_leftovers_of_a_killed_run_are_removed_when_it_resumes(tiny_models, small_faces, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    assert run_cli("content", out, tiny_models, small_faces, None, "--max-steps", "1") == 0
    weights = (out / "ridfr-content.safetensors").read_bytes()
    (out / f".ridfr-content.safetensors.tmp-{2 ** 22 + 1}").write_bytes(weights)  # SIGKILL during the export
    partial = out / "checkpoints" / ".step-00000002.partial"
    partial.mkdir()
    (partial / "content.safetensors").write_bytes(weights)
    assert run_cli("content", out, tiny_models, small_faces, None, "--max-steps", "2") == 0
    assert hidden_files(out) == []


def test_kill_while_writing_a_checkpoint_leaves_no_half_written_files(tiny_models, small_faces, tmp_path):  # noqa: F811
    """``kill`` (SIGTERM) a real training process while it writes a checkpoint: the half-written
    checkpoint and temporary weights are removed on the way out, and the run resumes."""
    out = tmp_path / "run"
    args = ["--stage", "content", "--data", str(small_faces.faces), "--base", str(tiny_models.checkpoint),
            "--out", str(out), "--config-dir", str(tiny_models.configs), "--cache-dir", str(tmp_path / "prompt_cache"),
            "--max-steps", "200", "--set", "checkpoint_every=1", "--set", "keep_checkpoints=1"]
    args += [part for key, value in TINY.items() for part in ("--set", f"{key}={json.dumps(value)}")]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen([sys.executable, "-m", "ridfr_core.train", *args], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while (not list((out / "checkpoints").glob(".step-*.partial")) and process.poll() is None
           and time.monotonic() < deadline):
        time.sleep(0.001)
    process.send_signal(signal.SIGTERM)
    status = process.wait()
    assert status == 128 + signal.SIGTERM, f"exit status {status}: SIGTERM did not unwind the run"
    assert hidden_files(out) == []
