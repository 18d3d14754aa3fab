"""The model downloader (ridfr_core.models) against a hub on 127.0.0.1 (tests/fake_hub.py), never the
internet. Each download runs in a fresh process, as a user's would, so that huggingface_hub reads
HF_ENDPOINT, HF_TOKEN, HF_HOME and HF_HUB_OFFLINE from the environment as it does for them."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict
from pathlib import Path

import pytest

from shared_data import REPO_ROOT
from fake_hub import FakeHub
from ridfr_core.models import ModelFile
from ridfr_core.models.fetch import STAGING, part_path

RUNNER = """
import json, sys
from pathlib import Path
from ridfr_core.models.fetch import DownloadError, fetch
from ridfr_core.models.registry import ModelFile
spec = json.loads(sys.argv[1])
spec["members"] = {name: tuple(pin) for name, pin in spec["members"].items()}
spec["licence"] = None
try:
    print(fetch(ModelFile(**spec), Path(sys.argv[2])))
except DownloadError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(3)
"""
TOKEN = "hf_testtoken"


@pytest.fixture
def hub():
    server = FakeHub()
    yield server
    server.close()


def hub_env(hub: FakeHub, tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf_home"), "HF_TOKEN": TOKEN,
            "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(REPO_ROOT), **extra}


def run_fetch(file: ModelFile, models, env: dict, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    spec = json.dumps({**asdict(file), "licence": None})
    return subprocess.run([*prefix, sys.executable, "-c", RUNNER, spec, str(models)], env=env, capture_output=True,
                          text=True, timeout=120)


def parts(models) -> list:
    """Every partial download under ``models`` (hidden .part files beside their targets)."""
    return sorted(Path(models).rglob(".*.part"))


def content(size: int, seed: int = 0) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (size // 32) + b"x" * (size % 32)


def hub_file(name: str = "adapter.bin", folder: str = "ipadapter", repo: str = "tester/adapters") -> ModelFile:
    return ModelFile(folder, name, "test file", repo=repo, path=f"weights/{name}")


def test_fresh_download_lands_verified_and_is_not_fetched_again(hub, tmp_path):
    data = content(300_000)
    file = hub_file()
    hub.add(f"{file.repo}/{file.path}", data)
    env, models = hub_env(hub, tmp_path), tmp_path / "models"
    first = run_fetch(file, models, env)
    assert first.returncode == 0, first.stderr
    assert "downloaded" in first.stdout
    assert (models / "ipadapter" / "adapter.bin").read_bytes() == data
    assert parts(models) == []
    # the token goes to the hub, never to the CDN that serves the bytes
    assert all(auth == f"Bearer {TOKEN}" for *_, auth in hub.requests("hub"))
    assert hub.requests("cdn", "GET") and all(auth is None for *_, auth in hub.requests("cdn"))
    hub.log.clear()
    again = run_fetch(file, models, env)
    assert again.returncode == 0 and "already there, intact" in again.stdout
    assert hub.log == []  # verified on download and unchanged since: no network at all


def test_a_dropped_connection_keeps_every_byte_that_arrived_and_resumes_next_run(hub, tmp_path):
    """huggingface_hub's http_get lost a dropped body's last 10 MB block: the .part stayed empty below 10 MB
    ("stopped after 0 B") and the next run started over."""
    data = content(3_000_000, seed=1)
    file = hub_file()
    sha = hub.add(f"{file.repo}/{file.path}", data)
    env, models = hub_env(hub, tmp_path), tmp_path / "models"
    hub.drop_after[sha] = 100_000
    hub.down_after_drop = True  # after the drop the server is gone: this run stops with what it has
    stopped = run_fetch(file, models, env)
    assert stopped.returncode == 3
    assert "stopped after 100.0 KB of 3.0 MB" in stopped.stderr, stopped.stderr
    assert "run the same command again to resume" in stopped.stderr and "Traceback" not in stopped.stderr
    assert not (models / file.relative).exists()
    assert part_path(models / file.relative, sha).read_bytes() == data[:100_000]
    assert ("cdn", "GET", f"/blobs/{sha}", "bytes=100000-", None) in hub.log  # resumed in the same run first
    hub.down = False
    hub.log.clear()
    resumed = run_fetch(file, models, env)
    assert resumed.returncode == 0, resumed.stderr
    assert [entry[3] for entry in hub.requests("cdn", "GET")] == ["bytes=100000-"]
    assert (models / file.relative).read_bytes() == data
    assert not part_path(models / file.relative, sha).exists()


def test_a_dropped_connection_is_resumed_in_the_same_run(hub, tmp_path):
    data = content(1_000_000, seed=13)
    file = hub_file()
    sha = hub.add(f"{file.repo}/{file.path}", data)
    hub.drop_after[sha] = 250_000
    models = tmp_path / "models"
    result = run_fetch(file, models, hub_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr
    assert [entry[3] for entry in hub.requests("cdn", "GET")] == [None, "bytes=250000-"]
    assert (models / file.relative).read_bytes() == data


def other_filesystem(tmp_path):
    """A folder on another filesystem than ``tmp_path`` (/dev/shm), or None."""
    shm = "/dev/shm"
    if not os.path.isdir(shm) or not os.access(shm, os.W_OK) or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        return None
    return tempfile.mkdtemp(prefix="ridfr-linked-", dir=shm)


def test_a_models_folder_linked_to_another_disk_gets_its_file_and_is_not_hashed_again(hub, tmp_path):
    """The .part was staged in models/.ridfr-downloads and renamed across filesystems: EXDEV on every run,
    each run hashing the whole file again."""
    elsewhere = other_filesystem(tmp_path)
    if elsewhere is None:
        pytest.skip("needs a writable /dev/shm on another filesystem than the temporary folder")
    try:
        data = content(400_000, seed=14)
        file = hub_file()
        hub.add(f"{file.repo}/{file.path}", data)
        env, models = hub_env(hub, tmp_path), tmp_path / "models"
        models.mkdir()
        (models / file.folder).symlink_to(elsewhere)  # e.g. a shared ipadapter folder on a data disk
        first = run_fetch(file, models, env)
        assert first.returncode == 0, first.stderr
        assert "downloaded" in first.stdout
        assert (Path(elsewhere) / file.name).read_bytes() == data
        assert [path.name for path in Path(elsewhere).iterdir()] == [file.name]  # no .part left
        hub.log.clear()
        again = run_fetch(file, models, env)
        assert again.returncode == 0 and again.stdout.strip() == "already there, intact"
        assert hub.log == []  # the record of its verification holds: no hashing, no network
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)


def test_bytes_an_earlier_version_staged_are_not_downloaded_again(hub, tmp_path):
    """Earlier versions kept the .part in models/.ridfr-downloads (where a finished one could stay forever when
    the target folder was on another disk)."""
    data = content(600_000, seed=15)
    file = hub_file()
    sha = hub.add(f"{file.repo}/{file.path}", data)
    models = tmp_path / "models"
    (models / STAGING).mkdir(parents=True)
    (models / STAGING / f"{sha}.part").write_bytes(data[:200_000])
    result = run_fetch(file, models, hub_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr
    assert [entry[3] for entry in hub.requests("cdn", "GET")] == ["bytes=200000-"]
    assert (models / file.relative).read_bytes() == data
    assert not (models / STAGING / f"{sha}.part").exists()


def test_checksum_mismatch_is_never_put_in_place(hub, tmp_path):
    data = content(100_000, seed=2)
    file = hub_file()
    hub.add(f"{file.repo}/{file.path}", data)
    hub.advertise[f"{file.repo}/{file.path}"] = {"sha256": hashlib.sha256(b"the published file").hexdigest()}
    models = tmp_path / "models"
    result = run_fetch(file, models, hub_env(hub, tmp_path))
    assert result.returncode == 3
    assert "expected sha256" in result.stderr and "not put in place" in result.stderr
    assert not (models / "ipadapter" / "adapter.bin").exists()
    assert parts(models) == []


def test_file_missing_on_the_hub_is_a_clear_error(hub, tmp_path):
    models = tmp_path / "models"
    result = run_fetch(hub_file("gone.bin"), models, hub_env(hub, tmp_path))
    assert result.returncode == 3
    assert "404" in result.stderr and "weights/gone.bin" in result.stderr and "Traceback" not in result.stderr
    assert not (models / "ipadapter" / "gone.bin").exists()


def test_files_already_there_are_checked_and_never_overwritten(hub, tmp_path):
    data = content(50_000, seed=3)
    file = hub_file()
    hub.add(f"{file.repo}/{file.path}", data)
    env, models = hub_env(hub, tmp_path), tmp_path / "models"
    target = models / "ipadapter" / "adapter.bin"
    target.parent.mkdir(parents=True)
    target.write_bytes(data)  # put there by hand: checked against the hub's hash, not downloaded
    same = run_fetch(file, models, env)
    assert same.returncode == 0 and "now verified" in same.stdout
    assert hub.requests("cdn") == []
    other = hub_file("other.bin")
    hub.add(f"{other.repo}/{other.path}", content(50_000, seed=4))
    mine = b"my own fine-tune"
    (models / "ipadapter" / "other.bin").write_bytes(mine)
    refused = run_fetch(other, models, env)
    assert refused.returncode == 3 and "left as it is" in refused.stderr
    assert (models / "ipadapter" / "other.bin").read_bytes() == mine


def test_offline_mode_uses_the_hugging_face_cache_or_says_why_not(hub, tmp_path):
    data = content(80_000, seed=5)
    cached, absent = hub_file("cached.bin"), hub_file("absent.bin")
    hub.add(f"{cached.repo}/{cached.path}", data)
    hub.add(f"{absent.repo}/{absent.path}", content(10_000, seed=6))
    env = hub_env(hub, tmp_path)
    subprocess.run([sys.executable, "-c", "import sys; from huggingface_hub import hf_hub_download; "
                    "hf_hub_download(sys.argv[1], sys.argv[2])", cached.repo, cached.path],
                   env=env, check=True, timeout=120)  # the user's earlier download, into their HF cache
    hub.log.clear()
    offline, models = {**env, "HF_HUB_OFFLINE": "1"}, tmp_path / "models"
    from_cache = run_fetch(cached, models, offline)
    assert from_cache.returncode == 0, from_cache.stderr
    assert "Hugging Face cache" in from_cache.stdout
    assert (models / "ipadapter" / "cached.bin").read_bytes() == data
    missing = run_fetch(absent, models, offline)
    assert missing.returncode == 3 and "HF_HUB_OFFLINE" in missing.stderr
    assert not (models / "ipadapter" / "absent.bin").exists()
    fresh = tmp_path / "fresh_models"
    assert run_fetch(absent, fresh, offline).returncode == 3
    assert not fresh.exists()  # no empty model folders
    assert hub.log == []


def test_not_enough_disk_space_is_refused_before_downloading(hub, tmp_path):
    file = hub_file("huge.bin")
    hub.add(f"{file.repo}/{file.path}", content(1000, seed=7))
    hub.advertise[f"{file.repo}/{file.path}"] = {"size": 10**18}
    models = tmp_path / "models"
    result = run_fetch(file, models, hub_env(hub, tmp_path))
    assert result.returncode == 3 and "free some space" in result.stderr
    assert hub.requests("cdn", "GET") == []
    assert not (models / "ipadapter" / "huge.bin").exists()


def _can_unshare() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-m", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs `unshare -m` (a private mount namespace) for a read-only mount")
def test_unwritable_target_folder_is_a_clear_error(hub, tmp_path):
    file = hub_file()
    hub.add(f"{file.repo}/{file.path}", content(20_000, seed=8))
    models = tmp_path / "models"
    (models / "ipadapter").mkdir(parents=True)
    folder = str(models / "ipadapter")
    read_only = ("unshare", "-m", "sh", "-c", f'mount --bind "{folder}" "{folder}" && '
                 f'mount -o remount,bind,ro "{folder}" && exec "$@"', "sh")
    result = run_fetch(file, models, hub_env(hub, tmp_path), prefix=read_only)
    assert result.returncode == 3, result.stderr
    assert f"cannot write to {folder}" in result.stderr and "Traceback" not in result.stderr
    assert hub.requests("cdn", "GET") == []
    assert not (models / "ipadapter" / "adapter.bin").exists()


@pytest.mark.skipif(not _can_unshare(), reason="needs `unshare -m` (a private mount namespace) for a small tmpfs")
def test_disk_filling_up_mid_download_leaves_nothing_under_the_real_name(hub, tmp_path):
    from huggingface_hub.constants import DOWNLOAD_CHUNK_SIZE

    data = content(2 * DOWNLOAD_CHUNK_SIZE + 777, seed=11)
    file = hub_file()
    sha = hub.add(f"{file.repo}/{file.path}", data)
    hub.stall_after[sha] = (DOWNLOAD_CHUNK_SIZE + 1000, 3.0)  # time for the disk to fill up meanwhile
    models = tmp_path / "models"
    models.mkdir()
    # A tmpfs with room for the file; once the first chunk has landed, another writer fills it up.
    fill_when_started = (f'timeout 60 sh -c \'until [ "$(stat -c %s "{models}"/ipadapter/.*.part 2>/dev/null)" -gt 0 ]; '
                         f'do sleep 0.05; done; cat /dev/zero > "{models}/filler" 2>/dev/null\' &')
    listing = tmp_path / "left_on_the_small_disk.txt"  # the tmpfs goes with its namespace: list it from inside
    # (the mount ends its own list: joined by && to the background filler it would race the download)
    small_disk = ("unshare", "-m", "sh", "-c", f'mount -t tmpfs -o size={len(data) + 10**6} tmpfs "{models}" || exit 9; '
                  f'{fill_when_started} "$@"; status=$?; cd "{models}" && find . -type f ! -name filler > "{listing}"; '
                  'exit $status', "sh")
    result = run_fetch(file, models, hub_env(hub, tmp_path), prefix=small_disk)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "No space left on device" in result.stderr and "run the same command again" in result.stderr
    assert "Traceback" not in result.stderr
    # the part is kept to resume (beside the file it becomes; its download lock in the staging folder); nothing is
    # named adapter.bin
    part = part_path(models / file.relative, sha).relative_to(models)
    assert sorted(listing.read_text().split()) == [f"./{STAGING}/{sha}.lock", f"./{part}"]


def test_release_archive_is_verified_and_unpacked_into_its_folder(hub, tmp_path):
    members = {"det_10g.onnx": content(30_000, seed=9), "w600k_r50.onnx": content(40_000, seed=10)}
    members["genderage.onnx"] = content(1000, seed=12)  # in the pack, not needed
    bundle = io.BytesIO()
    with zipfile.ZipFile(bundle, "w") as archive:
        for name, data in members.items():
            archive.writestr(f"buffalo_l/{name}", data)  # packs zipped with or without a top folder both work
        archive.writestr("buffalo_l/readme.txt", b"not part of the pack")
    sha = hub.add("direct/buffalo_l.zip", bundle.getvalue())
    pack = ModelFile("insightface/models", "buffalo_l", "test pack", url=f"{hub.url}/direct/buffalo_l.zip",
                     sha256=sha, size=len(bundle.getvalue()), needed=("det_10g.onnx", "w600k_r50.onnx"),
                     members={name: (len(data), hashlib.sha256(data).hexdigest()) for name, data in members.items()})
    models = tmp_path / "models"
    env = hub_env(hub, tmp_path)
    result = run_fetch(pack, models, env)
    assert result.returncode == 0, result.stderr
    folder = models / "insightface" / "models" / "buffalo_l"
    assert sorted(p.name for p in folder.iterdir()) == sorted(members)
    assert all((folder / name).read_bytes() == data for name, data in members.items())
    assert parts(models) == [] and not list(folder.parent.glob(".buffalo_l.*"))
    (folder / "genderage.onnx").unlink()  # a pack of only the files RIDFR uses (as the README once said) is fine
    assert run_fetch(pack, models, env).stdout.strip() == "already there, intact"
    (folder / "w600k_r50.onnx").unlink()
    incomplete = run_fetch(pack, models, env)
    assert incomplete.returncode == 3 and "some of its files are missing" in incomplete.stderr


def start_fetch(file: ModelFile, models, env: dict) -> subprocess.Popen:
    spec = json.dumps({**asdict(file), "licence": None})
    return subprocess.Popen([sys.executable, "-c", RUNNER, spec, str(models)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_part(models, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while not parts(models) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, process.communicate()


def start_stalled_fetch(hub, tmp_path, name: str, chunks: int, seed: int, stall_seconds: float):
    """A download of a hub file of ``chunks`` download chunks that stalls after the first chunk, started in
    another process and waited for until its .part exists: (file, data, sha, models, env, process)."""
    from huggingface_hub.constants import DOWNLOAD_CHUNK_SIZE

    data = content(DOWNLOAD_CHUNK_SIZE * chunks, seed=seed)
    file = hub_file(name)
    sha = hub.add(f"{file.repo}/{file.path}", data)
    hub.stall_after[sha] = (DOWNLOAD_CHUNK_SIZE + 1000, stall_seconds)
    env, models = hub_env(hub, tmp_path), tmp_path / "models"
    process = start_fetch(file, models, env)
    wait_for_part(models, process)
    return file, data, sha, models, env, process


def test_two_concurrent_downloads_of_one_file_write_it_once(hub, tmp_path):
    """Without a lock both appended to the same .part, and one's verify moved it while the other wrote."""
    file, data, sha, models, env, first = start_stalled_fetch(hub, tmp_path, "shared.bin", 3, 11, 3.0)  # mid-file
    second = start_fetch(file, models, env)
    results = [process.communicate(timeout=120) for process in (first, second)]
    assert [process.returncode for process in (first, second)] == [0, 0], results
    assert "downloaded" in results[0][0] and "placed by a concurrent download" in results[1][0]
    assert (models / "ipadapter" / "shared.bin").read_bytes() == data
    assert len([request for request in hub.requests("cdn", "GET")]) == 1
    assert json.loads((models / STAGING / "verified.json").read_text())["ipadapter/shared.bin"]["sha256"] == sha


def test_a_part_file_removed_mid_download_is_a_clear_error(hub, tmp_path):
    _, _, _, models, _, process = start_stalled_fetch(hub, tmp_path, "removed.bin", 2, 12, 2.0)
    for part in parts(models):
        part.unlink()  # e.g. a user cleaning up hidden folders
    _, err = process.communicate(timeout=120)
    assert process.returncode == 3, err
    assert "disappeared during the download" in err and "Traceback" not in err
    assert not (models / "ipadapter" / "removed.bin").exists()
