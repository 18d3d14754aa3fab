"""Training in two processes (``accelerate launch --multi_gpu --num_processes 2``: torchrun, gloo on CPU; a GPU
machine runs the same code with NCCL) against one process with the same total batch, on the tiny models.

For the content stage (RIDFR) and the align stage (RIDFR, RestorerID): the two processes train the weights and log
the losses of one process (to float tolerance: DDP sums the gradients in another order), write one checkpoint
folder, and a run with a rank killed (kill -9) mid-run stops within a minute naming that rank, then resumes on two
processes and on one to the weights of the uninterrupted run. The identity cache is built by both processes on
disjoint slices. A rank that dies at start, or a non-finite loss on one rank, stops every rank.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ridfr_core import backends, train
from ridfr_core.identity.cache import IdentityCache
from ridfr_core.train import complete_checkpoints
from shared_data import REPO_ROOT
from test_archive_cli import free_port
from test_data import small_faces  # noqa: F401 (fixture)
from test_train import TINY, training_state
from test_train_restorerid import bgr_cache, cli_args as restorerid_args  # noqa: F401 (fixture)

# ||w(2 processes) - w(1 process)|| / ||w(1 process) - w(start)|| after 6 steps at learning rate 1e-3 (content and
# EMA); seen: 3.4e-5 to 6.7e-5 (largest element difference 1.5e-5 to 5.2e-5)
TOLERANCE = 1e-3
STEPS = 6
RUN = ["--max-steps", str(STEPS), "--set", "checkpoint_every=1", "--set", "keep_checkpoints=1",
       "--set", "ema_decay=0.9", "--set", "learning_rate=1e-3"]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
          "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def ridfr_args(stage: str, out: Path, models, faces, insightface: Path | None) -> list[str]:
    """A RIDFR run from the tiny content weights; align builds its identity cache in <out>/identity_cache."""
    args = ["--stage", stage, "--data", str(faces.faces if stage == "content" else faces.identities),
            "--base", str(models.checkpoint), "--out", str(out), "--config-dir", str(models.configs),
            "--cache-dir", str(out.parent / "prompt_cache"), "--init-content", str(models.content)]
    if stage == "align":
        args += ["--adapter", str(models.adapter_v2), "--clip-vision", str(models.clip_vision),
                 "--insightface-root", str(insightface)]
    return args + [part for key, value in TINY.items() for part in ("--set", f"{key}={json.dumps(value)}")] + RUN


def launch(target: list[str], log: Path) -> subprocess.Popen:
    """``accelerate launch`` of ``target`` (``-m module`` or a script, with its arguments), output in ``log``."""
    command = [*LAUNCH, "--main_process_port", str(free_port()), *target]
    with open(log, "w") as handle:
        return subprocess.Popen(command, cwd=REPO_ROOT, env=ENV, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait(process: subprocess.Popen, timeout: float) -> int:
    try:
        return process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run_two_processes(args: list[str], log: Path) -> None:
    code = wait(launch(["-m", "ridfr_core.train", *args], log), 600)
    assert code == 0, log.read_text()[-3000:]


def ranks(launcher: subprocess.Popen) -> dict[int, psutil.Process]:
    """The training processes torchrun started, by rank."""
    found = {}
    try:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            rank = child.environ().get("RANK")
            if rank is not None and child.environ().get("LOCAL_RANK") is not None:
                found[int(rank)] = child
    except psutil.Error:  # a process ended while we looked
        pass
    return found


def kill_and_check_the_others_stop(launcher: subprocess.Popen, victim: int, log: Path) -> None:
    """kill -9 rank ``victim``: the launcher stops the other rank and exits within a minute, non-zero, naming it."""
    started = ranks(launcher)
    started[victim].kill()
    code = wait(launcher, 60)
    err = log.read_text()
    assert code != 0, err[-3000:]
    assert re.search(rf"rank\s*: {victim} \(local_rank: {victim}\)\s+exitcode\s*: -9", err), err[-3000:]
    _, alive = psutil.wait_procs(started.values(), timeout=10)
    assert not alive, f"processes still running after the launcher exited: {alive}"


def relative_difference(state: dict, reference: dict, start: dict, prefix: str) -> float:
    keys = [key for key in reference if key.startswith(prefix)]
    difference = torch.cat([(state[key] - reference[key]).flatten() for key in keys])
    update = torch.cat([(reference[key] - start[key[len(prefix):]].float()).flatten() for key in keys])
    return float(difference.norm() / update.norm())


def assert_same_training(state: dict, reference: dict, start: dict) -> None:
    assert state.keys() == reference.keys()
    for prefix in ("content/", "ema/"):
        assert relative_difference(state, reference, start, prefix) < TOLERANCE, prefix


def loss_log(out: Path, stage: str) -> dict[str, dict[int, float]]:
    """The TensorBoard scalars of a run (a resumed run's events replace those of the steps it trained again)."""
    events = EventAccumulator(str(out / "logs" / stage))
    events.Reload()
    return {tag: {event.step: event.value for event in events.Scalars(tag)}
            for tag in events.Tags()["scalars"] if tag != "train/samples_per_second"}


def assert_same_loss_log(log: dict, reference: dict) -> None:
    assert log.keys() == reference.keys() and "train/loss" in reference
    for tag, values in reference.items():
        assert sorted(log[tag]) == list(range(1, STEPS + 1)), tag
        assert log[tag] == pytest.approx(values, rel=1e-5, abs=1e-9), tag


def assert_one_checkpoint_folder(out: Path) -> None:
    """One folder per checkpoint, written whole by the main process: every rank's RNG state is in it."""
    folder, = (out / "checkpoints").iterdir()
    assert folder.name == f"step-{STEPS:08d}"
    assert {"rng-0.json", "rng-1.json", "rng-0.safetensors", "rng-1.safetensors"} <= {p.name for p in folder.iterdir()}
    assert not list((out / "checkpoints").glob(".*")), "a partial checkpoint was left behind"


def kill_resume_and_compare(args_for, out_name: str, victim: int, tmp_path: Path, reference: dict, start: dict):
    """Two processes, rank ``victim`` killed after the first checkpoint, resumed on two processes and (a copy) on
    one: both end at the reference's weights and the two-process run logs the reference's losses."""
    killed = tmp_path / out_name
    log = tmp_path / f"{out_name}.log"
    launcher = launch(["-m", "ridfr_core.train", *args_for(killed)], log)
    deadline = time.monotonic() + 300
    while not complete_checkpoints(killed / "checkpoints") and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert launcher.poll() is None, log.read_text()[-3000:]
    kill_and_check_the_others_stop(launcher, victim, log)
    assert complete_checkpoints(killed / "checkpoints")[-1].name != f"step-{STEPS:08d}", "killed too late"
    on_one = shutil.copytree(killed, tmp_path / f"{out_name}-on-one")

    run_two_processes(args_for(killed), tmp_path / f"{out_name}-resumed.log")
    resumed = training_state(killed / "checkpoints" / f"step-{STEPS:08d}")
    assert_same_training(resumed, reference, start)
    assert_one_checkpoint_folder(killed)
    assert train.main(args_for(on_one)) == 0
    assert_same_training(training_state(on_one / "checkpoints" / f"step-{STEPS:08d}"), reference, start)
    return killed, resumed


def test_content_stage_on_two_processes_trains_and_resumes_as_one(tiny_models, small_faces, tmp_path):  # noqa: F811
    def args_for(out: Path) -> list[str]:
        return ridfr_args("content", out, tiny_models, small_faces, None)

    assert train.main(args_for(tmp_path / "one")) == 0
    reference = training_state(tmp_path / "one" / "checkpoints" / f"step-{STEPS:08d}")
    start = backends.load_content(tiny_models.content).state_dict()

    run_two_processes(args_for(tmp_path / "two"), tmp_path / "two.log")
    two = training_state(tmp_path / "two" / "checkpoints" / f"step-{STEPS:08d}")
    assert_same_training(two, reference, start)
    assert_same_loss_log(loss_log(tmp_path / "two", "content"), loss_log(tmp_path / "one", "content"))
    assert_one_checkpoint_folder(tmp_path / "two")

    killed, resumed = kill_resume_and_compare(args_for, "killed", 1, tmp_path, reference, start)
    assert all(torch.equal(resumed[key], two[key]) for key in two), "resume on two processes is not bit-exact"
    assert_same_loss_log(loss_log(killed, "content"), loss_log(tmp_path / "one", "content"))


def test_ridfr_align_on_two_processes_builds_the_cache_in_slices_trains_and_resumes_as_one(
        tiny_models, small_faces, scripted_models_root, tmp_path):  # noqa: F811
    def args_for(out: Path) -> list[str]:
        return ridfr_args("align", out, tiny_models, small_faces, scripted_models_root)

    assert train.main(args_for(tmp_path / "one")) == 0
    reference = training_state(tmp_path / "one" / "checkpoints" / f"step-{STEPS:08d}")
    start = backends.load_content(tiny_models.content).state_dict()
    # rank 0, which writes the checkpoints and the cache's index, is the one killed
    killed, _ = kill_resume_and_compare(args_for, "killed", 0, tmp_path, reference, start)
    assert_same_loss_log(loss_log(killed, "align"), loss_log(tmp_path / "one", "align"))

    # each process computed its own half of the photos; merged, they are the one-process cache
    one, two = IdentityCache(tmp_path / "one" / "identity_cache"), IdentityCache(killed / "identity_cache")
    parts = [set(IdentityCache(killed / "identity_cache" / f"part-{rank}").entries) for rank in (0, 1)]
    assert parts[0] and parts[1] and not parts[0] & parts[1]
    assert parts[0] | parts[1] == set(one.entries) == set(two.entries)
    for key in one.entries:
        for variant in range(one.variants):
            assert all(torch.equal(a, b) for a, b in zip(one.features(key, variant), two.features(key, variant)))


def test_restorerid_align_on_two_processes_trains_and_resumes_as_one(
        tiny_models, restorerid_checkpoint, small_faces, bgr_cache, tmp_path):  # noqa: F811
    def args_for(out: Path) -> list[str]:
        return restorerid_args(out, tiny_models, restorerid_checkpoint, small_faces, bgr_cache) + RUN

    assert train.main(args_for(tmp_path / "one")) == 0
    reference = training_state(tmp_path / "one" / "checkpoints" / f"step-{STEPS:08d}")
    start = backends.load_content(restorerid_checkpoint).state_dict()
    killed, _ = kill_resume_and_compare(args_for, "killed", 1, tmp_path, reference, start)
    assert_same_loss_log(loss_log(killed, "align"), loss_log(tmp_path / "one", "align"))


def test_a_rank_that_dies_at_start_stops_the_other(tiny_models, small_faces, tmp_path):  # noqa: F811
    """Rank 1 is killed as soon as it exists, before it joins the process group rank 0 waits in."""
    log = tmp_path / "run.log"
    launcher = launch(["-m", "ridfr_core.train", *ridfr_args("content", tmp_path / "run", tiny_models, small_faces,
                                                              None)], log)
    deadline = time.monotonic() + 120
    while 1 not in ranks(launcher) and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert launcher.poll() is None, log.read_text()[-3000:]
    kill_and_check_the_others_stop(launcher, 1, log)
    assert not complete_checkpoints(tmp_path / "run" / "checkpoints")


NAN_ON_PROCESS_1 = """
import sys

from ridfr_core.train import cli, trainer


class NaNOnProcess1(trainer.Trainer):
    def compute_losses(self, batch):  # as an fp16 overflow on one GPU
        losses = super().compute_losses(batch)
        if self.accelerator.process_index == 1 and self.step == 1:
            losses = {key: value * float("nan") for key, value in losses.items()}
        return losses


cli.Trainer = NaNOnProcess1
sys.exit(cli.main())
"""


def test_a_non_finite_loss_on_one_rank_stops_every_rank_with_one_message(tiny_models, small_faces,  # noqa: F811
                                                                         tmp_path):
    script = tmp_path / "nan_on_process_1.py"
    script.write_text(NAN_ON_PROCESS_1)
    out, log = tmp_path / "run", tmp_path / "run.log"
    launcher = launch([str(script), *ridfr_args("content", out, tiny_models, small_faces, None)], log)
    code = wait(launcher, 600)
    err = log.read_text()
    assert code != 0
    errors = re.findall(r"^error: .*$", err, re.MULTILINE)
    assert len(errors) == 1, err[-3000:]
    # said by rank 0, which saw finite losses: it stopped on rank 1's NaN instead of waiting in the next all-reduce
    assert errors[0].startswith("error: step 2: loss is {'loss': nan") and " on process 1; " in errors[0]
    assert [folder.name for folder in complete_checkpoints(out / "checkpoints")] == ["step-00000001"]
