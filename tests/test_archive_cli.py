"""Archive runs of ``python -m ridfr_core.restore`` on tiny models: folders with people and bad files,
resume, video, and two processes under accelerate.

The scripted face detector finds one face at a fixed place in any image that is not all black, and the
projection ArcFace recognises an image by its pixels, so a person's reference photo that equals an album
photo is that person's face.
"""

from __future__ import annotations

import os
import shutil
import socket
import signal
import subprocess
import sys
import time
import zlib
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from shared_data import REPO_ROOT
from ridfr_core.archive.manifest import read_records
from ridfr_core.io.folder_lock import HOLDER_NAME, LOCK_NAME
from ridfr_core.restore import main
from test_archive import audio_packets, make_video

av = pytest.importorskip("av")


def smooth_image(seed: int, size: int = 640) -> np.ndarray:
    """A smooth random picture (not all black, so the scripted detector finds its face)."""
    small = np.random.default_rng(seed).integers(40, 256, (8, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC))


def save(path, rgb):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path


def huge_png_header(width: int = 40000, height: int = 40000) -> bytes:
    """A PNG that claims 1.6 gigapixels (a decompression bomb to PIL), with a few bytes of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 10))
            + chunk(b"IEND", b""))


def records(out):
    return read_records(out / "manifest.jsonl")


def leftovers(out):
    """Hidden files in the output folder besides the run's lock (kept: removing it would race a next run)."""
    return [path.name for path in out.rglob(".*") if path.name != LOCK_NAME]


def common_args(models, tiny_models, *more):
    return ["--models", str(models), "--steps", "1", "--device", "cpu", *more]


@pytest.fixture(scope="module")
def cli_models(ridfr_models_dir, tiny_models, tmp_path_factory):
    """The tiny models folder with the tiny architectures in ridfr/configs, where the CLI (also in the
    processes these tests start) finds them."""
    root = tmp_path_factory.mktemp("cli_models")
    for entry in ridfr_models_dir.iterdir():
        if entry.name != "ridfr":
            (root / entry.name).symlink_to(entry.resolve())
    (root / "ridfr").mkdir()
    for weights in (ridfr_models_dir / "ridfr").iterdir():
        (root / "ridfr" / weights.name).symlink_to(weights.resolve())
    (root / "ridfr" / "configs").symlink_to(tiny_models.configs)
    return root


@pytest.fixture
def people(tmp_path):
    folder = tmp_path / "people"
    save(folder / "alice" / "ref.png", smooth_image(1))
    save(folder / "bob" / "ref.png", smooth_image(2))
    return folder


def test_a_folder_with_people_and_bad_files_resumes(tiny_models, cli_models, people, tmp_path, capsys):
    albums = tmp_path / "albums"
    save(albums / "1990" / "alice.png", smooth_image(1))
    save(albums / "2001" / "trip" / "bob.jpg", smooth_image(2))
    save(albums / "stranger.png", smooth_image(3))
    save(albums / "night.png", np.zeros((320, 320, 3), np.uint8))  # no face
    good = (albums / "2001" / "trip" / "bob.jpg").read_bytes()
    (albums / "corrupt.jpg").write_bytes(good[: len(good) // 3])
    (albums / "empty.png").write_bytes(b"")
    (albums / "not_an_image.jpg").write_text("a caption, not a photo")
    (albums / "huge.png").write_bytes(huge_png_header())
    (albums / "notes.txt").write_text("album notes")
    (albums / "selfloop.jpg").symlink_to("selfloop.jpg")  # a link to itself: its manifest line, the rest restored
    (albums / "2001" / "back").symlink_to(albums, target_is_directory=True)  # a folder loop: not descended
    out = tmp_path / "restored"
    args = ["--lq", str(albums), "--out", str(out), "--people", str(people), "--unmatched", "keep_original",
            "--batch-size", "4", "--seed", "7", *common_args(cli_models, tiny_models)]

    assert main(args) == 1  # some inputs failed, and the run still finished every other one
    first = {record["input"]: record for record in records(out)}
    assert len(records(out)) == len(first) == 10  # one line per input
    status = {name: record["status"] for name, record in first.items()}
    assert status == {"1990/alice.png": "done", "2001/trip/bob.jpg": "done", "stranger.png": "done",
                      "night.png": "no_face", "notes.txt": "skipped", "corrupt.jpg": "error", "empty.png": "error",
                      "not_an_image.jpg": "error", "huge.png": "error",
                      "selfloop.jpg": "error"}
    assert "decompression bomb" in first["huge.png"]["error"] and "--lq" in first["empty.png"]["error"]
    assert "Too many levels of symbolic links" in first["selfloop.jpg"]["error"]
    alice, = first["1990/alice.png"]["faces"]
    assert alice["person"] == "alice" and alice["similarity"] > 0.99 and alice["seed"] == 7 and alice["restored"]
    assert alice["identity_scale"] == 1.0  # the scale each restored face got (RIDFR's default)
    assert first["2001/trip/bob.jpg"]["faces"][0]["person"] == "bob"
    stranger, = first["stranger.png"]["faces"]
    assert stranger["person"] is None and stranger["similarity"] < 0.9 and not stranger["restored"]
    assert "identity_scale" not in stranger
    assert first["1990/alice.png"]["settings"]["steps"] == 1 and first["1990/alice.png"]["settings"]["seed"] == 7
    # The output mirrors the input tree; restored faces changed, a face of nobody and a photo of nobody did not.
    for name in ("1990/alice.png", "2001/trip/bob.jpg", "stranger.png", "night.png"):
        assert first[name]["output"] == name and (out / name).is_file()
    before = np.asarray(Image.open(albums / "1990" / "alice.png"))
    after = np.asarray(Image.open(out / "1990" / "alice.png"))
    assert 0.01 < np.any(before != after, axis=-1).mean() < 0.9
    assert np.array_equal(np.asarray(Image.open(out / "stranger.png")), smooth_image(3))
    summary = capsys.readouterr()
    assert "10 inputs" in summary.out and "5 error" in summary.out and "corrupt.jpg" in summary.err
    assert "failed: selfloop.jpg: " in summary.err and "Traceback" not in summary.err
    # Alice's face was sampled in one batch with Bob's; per-face seeds give what the one-photo job gives.
    single = tmp_path / "single.png"
    assert main(["--lq", str(albums / "1990" / "alice.png"), "--out", str(single), *args[4:]]) == 0
    difference = np.abs(np.asarray(Image.open(single), int) - np.asarray(Image.open(out / "1990" / "alice.png"), int))
    assert difference.max() <= 1

    # Resume: the finished inputs are skipped, the failed ones are tried again, a lost output is redone,
    # and a line cut short by a crash is ignored.
    (out / "stranger.png").unlink()
    stamp = (out / "1990" / "alice.png").stat().st_mtime_ns
    with open(out / "manifest.jsonl", "a") as stream:
        stream.write('{"input": "1990/alice.png", "status": "err')
    assert main(args) == 1
    again = Counter(record["input"] for record in records(out)[10:])
    assert again == Counter({"stranger.png": 1, "corrupt.jpg": 1, "empty.png": 1, "not_an_image.jpg": 1,
                             "huge.png": 1, "selfloop.jpg": 1})
    assert (out / "1990" / "alice.png").stat().st_mtime_ns == stamp
    assert leftovers(out) == []  # no partial files left behind


def test_ctrl_c_then_rerun_finishes_every_photo_exactly_once(tiny_models, cli_models, people, tmp_path):
    albums = tmp_path / "albums"
    for number in range(4):
        save(albums / f"photo{number}.png", smooth_image(10 + number, 320))
    out = tmp_path / "out"
    args = ["--lq", str(albums), "--out", str(out), "--people", str(people), "--batch-size", "1",
            *common_args(cli_models, tiny_models)]
    run = subprocess.Popen([sys.executable, "-m", "ridfr_core.restore", *args], cwd=REPO_ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "manifest.jsonl").is_file() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130 and "rerun the same command to resume" in err
    interrupted = read_records(out / "manifest.jsonl")
    assert 1 <= len(interrupted) < 4
    assert main(args) == 0
    final = read_records(out / "manifest.jsonl")
    assert sorted(record["input"] for record in final) == [f"photo{number}.png" for number in range(4)]
    assert all(record["status"] == "done" and (out / record["output"]).is_file() for record in final)
    assert leftovers(out) == []


def test_a_video_keeps_rate_audio_and_one_identity_per_face(tiny_models, cli_models, people, tmp_path):
    face = smooth_image(1, 256)
    frames = [np.roll(face, shift, axis=1) for shift in (0, 2)] + [np.zeros_like(face)] + [np.roll(face, 4, axis=1)]
    video = make_video(tmp_path / "in" / "talk.mp4", frames, rate=12, audio_seconds=0.4)
    out = tmp_path / "out"
    assert main(["--lq", str(video), "--out", str(out), "--people", str(people), "--seed", "3",
                 *common_args(cli_models, tiny_models)]) == 0
    record, = records(out)
    assert record["status"] == "done" and record["frames"] == 4 and record["fps"] == 12
    track, = record["tracks"]  # the face is one track across the frame without it
    assert track == {**track, "person": "alice", "votes": 1.0, "frames": 3, "seed": 3}
    with av.open(str(out / "talk.mp4")) as container:
        assert container.streams.video[0].average_rate == 12
        restored = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(restored) == 4
    assert np.abs(restored[0].astype(int) - face.astype(int)).mean() > 1  # the face was restored
    assert np.abs(restored[2].astype(int)).mean() < 3  # the frame without a face stays black
    assert audio_packets(out / "talk.mp4") == audio_packets(video)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_accelerate_splits_the_inputs_between_two_processes(tiny_models, cli_models, people, tmp_path):
    """accelerate's torchrun launcher starts two real processes; on CPU (--device cpu) they talk over gloo."""
    albums = tmp_path / "albums"
    for number in range(5):
        save(albums / f"photo{number}.png", smooth_image(1) if number == 0 else np.zeros((64, 64, 3), np.uint8))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "ridfr_core.restore", "--lq", str(albums),
               "--out", str(out), "--people", str(people), *common_args(cli_models, tiny_models)]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    done = records(out)
    assert sorted(record["input"] for record in done) == [f"photo{number}.png" for number in range(5)]
    assert {record["process"] for record in done} == {0, 1}
    assert not list(out.glob("manifest.part*"))
    assert all((out / record["output"]).is_file() for record in done)


@pytest.mark.parametrize("option, value, message", [
    ("--out", "file", "is a file"), ("--out", "album", "would overwrite the inputs"),
    ("--out", "r26.png", "names a .png file, but the outputs of an archive"), ("--out", "talk.mp4", "names a .mp4"),
    ("--batch-size", "0", "--batch-size"), ("--candidates", "2", "--candidates"), ("--aligned", None, "--aligned"),
    ("--people", "missing", "--people")])
def test_archive_options_are_checked_before_any_model_loads(cli_models, tmp_path, capsys, option, value,
                                                            message):
    album = tmp_path / "album"
    save(album / "a.png", smooth_image(1, 64))
    (tmp_path / "file").write_text("not a folder")
    args = {"--lq": str(album), "--out": str(tmp_path / "out"), "--id": str(album / "a.png"),
            "--models": str(cli_models)}
    if value is not None:
        args[option] = str(tmp_path / value) if value in ("file", "album", "missing", "r26.png", "talk.mp4") else value
    argv = [part for key, val in args.items() for part in (key, val)] + ([option] if value is None else [])
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "manifest.jsonl").exists()
    assert not (tmp_path / "r26.png").exists() and not (tmp_path / "talk.mp4").exists()


@pytest.mark.skipif(shutil.which("setpriv") is None and os.geteuid() == 0, reason="root writes anywhere without setpriv")
def test_a_read_only_out_is_refused_in_one_line_before_models_load(cli_models, people, tmp_path):
    album = tmp_path / "album"
    save(album / "a.png", smooth_image(1, 64))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    # root ignores folder permissions: drop that capability for the run
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"] if os.geteuid() == 0 else []
    result = subprocess.run([*prefix, sys.executable, "-m", "ridfr_core.restore", "--lq", str(album), "--out",
                             str(locked / "out"), "--people", str(people), "--models", str(cli_models), "--device",
                             "cpu"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: --out {locked / 'out'}: cannot create or write")
    assert "Traceback" not in result.stderr and "content backend" not in result.stderr  # no model was loaded
    assert not (locked / "out").exists()


def test_a_second_run_on_the_same_out_is_refused_and_stale_temp_files_go(tiny_models, cli_models, people, tmp_path,
                                                                           capsys):
    albums = tmp_path / "albums"
    for number in range(6):
        save(albums / f"photo{number}.png", smooth_image(20 + number, 320))
    out = tmp_path / "out"
    stale = [out / ".photo4.png.tmp-16296", out / "sub" / ".talk.mp4.tmp-16297.mp4"]  # what kill -9 left behind
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half written")
    (out / ".keep").write_text("a user's hidden file")
    args = ["--lq", str(albums), "--out", str(out), "--people", str(people), "--batch-size", "1",
            *common_args(cli_models, tiny_models)]
    first = subprocess.Popen([sys.executable, "-m", "ridfr_core.restore", *args], cwd=REPO_ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "manifest.jsonl").is_file() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, "the first run ended before the second one started"
    assert main(args) == 2
    assert f"another run is writing into this folder (process {first.pid} on " in capsys.readouterr().err
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    done = records(out)
    assert sorted(record["input"] for record in done) == [f"photo{number}.png" for number in range(6)]
    assert all(record["process"] == 0 and record["status"] == "done" for record in done)
    assert not any(path.exists() for path in stale) and (out / ".keep").is_file()
    assert not (out / HOLDER_NAME).exists()
    assert main(args) == 0  # the lock went with the first run


RANK_FAILS = """
import sys
from pathlib import Path

from accelerate import PartialState
from ridfr_core.archive.run import run_archive
from ridfr_core.restore import architecture_dir, parse_args, resolve_models, restorer_from_args

args = parse_args(sys.argv[1:])
paths = resolve_models(Path(args.models), {}, need_insightface=True)


def make_restorer(found):
    if PartialState().process_index == 1:  # as a CUDA error or a failed model load on one GPU only
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    return restorer_from_args(args, found, config_dir=architecture_dir(Path(args.models)))


sys.exit(run_archive(args, paths, make_restorer))
"""


def test_under_accelerate_a_failure_outside_an_input_stops_every_process(cli_models, people, tmp_path):
    """Process 1 fails while loading its models: process 0 does not wait for it in a collective (until the
    timeout, or until the launcher kills it without a word); it stops with process 1's error."""
    albums = tmp_path / "albums"
    for number in range(2):
        save(albums / f"photo{number}.png", np.zeros((64, 64, 3), np.uint8))
    script = tmp_path / "rank_fails.py"
    script.write_text(RANK_FAILS)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(script), "--lq", str(albums), "--out", str(out),
               "--people", str(people), "--models", str(cli_models), "--steps", "1", "--device", "cpu"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert ("ArchiveStopped: stopped because process 1: RuntimeError: CUDA error: an illegal memory access"
            in result.stderr), result.stderr[-3000:]
    assert [record["input"] for record in read_records(out / "manifest.part0.jsonl")] == ["photo0.png"]
