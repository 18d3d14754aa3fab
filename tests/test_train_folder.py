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
from ridfr_core.io.folder_lock import HOLDER_NAME, LOCK_NAME
from ridfr_core.run_folder import checkpoint_problem
from ridfr_core.train import complete_checkpoints
from ridfr_core.train.cli import run_lock
from test_data import small_faces  # noqa: F401 (fixture)
from test_train import TINY, run_cli, training_state


def hidden_files(out: Path) -> list[str]:
    """Hidden files besides the run's lock (kept: removing it would race a next run)."""
    return sorted(str(p.relative_to(out)) for p in out.rglob(".*") if p.name != LOCK_NAME)


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


def test_an_out_that_is_or_is_inside_the_data_is_refused(small_faces, tmp_path, capsys):  # noqa: F811
    """Checkpoints, samples and the exported weights went into the data set folder (restore refuses --out == --lq)."""
    data = tmp_path / "faces"
    data.symlink_to(small_faces.faces, target_is_directory=True)  # a link to the data is the data too
    before = sorted(small_faces.faces.rglob("*"))
    for out, where in ((small_faces.faces, "the"), (data / "runs" / "r1", "inside the")):
        assert train.main(["--stage", "content", "--data", str(data), "--base", "x", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert error_line(err) == (f"error: out: {out} is {where} --data folder {data}; checkpoints, samples and "
                                   "weights would be written among the training images (and read as data by the next "
                                   "run). Pass an --out outside it.")
    assert sorted(small_faces.faces.rglob("*")) == before


def test_a_second_run_on_the_same_out_is_refused_naming_the_first(tiny_models, small_faces, tmp_path, capsys,  # noqa: F811
                                                                  monkeypatch):
    """Both trained and wrote into one --out; now the second stops (exit 2) while the first goes on."""
    out = tmp_path / "run"
    args = ["--stage", "content", "--data", str(small_faces.faces), "--base", str(tiny_models.checkpoint),
            "--out", str(out), "--config-dir", str(tiny_models.configs), "--cache-dir", str(tmp_path / "prompt_cache"),
            "--max-steps", "200"]
    args += [part for key, value in TINY.items() for part in ("--set", f"{key}={json.dumps(value)}")]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    first = subprocess.Popen([sys.executable, "-m", "ridfr_core.train", *args], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / HOLDER_NAME).is_file() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first.poll() is None, "the first run ended before the second one started"
    assert train.main(args) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: --out {out}: another run is writing into this folder (process {first.pid} on ")
    assert "ridfr_core/train" in line and line.endswith("let it finish, or give another --out.")
    monkeypatch.setenv("RANK", "1")  # another process of the first run (accelerate launch): it takes no lock
    with run_lock(out):
        assert first.poll() is None, "the first run stopped too"
    first.kill()  # the OS releases the lock; the stale holder record is overwritten by the next run
    first.wait(timeout=60)
    monkeypatch.setenv("RANK", "0")
    with run_lock(out):
        assert json.loads((out / HOLDER_NAME).read_text())["pid"] == os.getpid()
    assert not (out / HOLDER_NAME).exists()
