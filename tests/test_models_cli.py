"""``python -m ridfr_core.models`` as a user runs it: list, the licence flag, a whole backend downloaded
(offline, from a Hugging Face cache filled from a hub on 127.0.0.1) and the command the restore CLI names."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from shared_data import REPO_ROOT
from fake_hub import FakeHub
from ridfr_core.models import BACKENDS, all_files, download_command
from ridfr_core.models.__main__ import parse_args
from test_models_download import content, hub_env


def models_cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ridfr_core.models", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_list_shows_each_backends_files_with_folder_size_source_licence_and_state(tmp_path):
    result = models_cli("list", "--models", str(tmp_path / "models"))
    assert result.returncode == 0, result.stderr
    sections = result.stdout.split("\nbackend ")[1:]
    assert [section.split(":")[0] for section in sections] == list(BACKENDS)
    for section, files in zip(sections, BACKENDS.values()):
        for file in files:
            line = next(line for line in section.splitlines() if line.strip().startswith(file.relative))
            assert "missing" in line
            assert file.source in section
            if file.licence:
                assert file.licence.terms in section
    assert "288.6 MB" in result.stdout  # the pinned size of the insightface pack
    assert not (tmp_path / "models").exists()  # listing writes nothing


def test_download_prints_the_licences_and_needs_the_flag(tmp_path):
    result = models_cli("download", "--backend", "restorerid", "--models", str(tmp_path / "models"))
    assert result.returncode == 2
    assert "--accept-licences" in result.stderr
    for file in BACKENDS["restorerid"]:
        assert file.licence.name in result.stdout and file.licence.url in result.stdout
    assert not (tmp_path / "models").exists()


@pytest.fixture
def hub():
    server = FakeHub()
    yield server
    server.close()


def test_a_backend_downloads_in_one_command_and_lists_as_intact(hub, tmp_path):
    hub_files = [file for file in BACKENDS["ridfr"] if file.repo]
    for number, file in enumerate(hub_files):
        hub.add(f"{file.repo}/{file.path}", content(5000 + number, seed=number))
    env = hub_env(hub, tmp_path)
    fill_cache = "import sys; from huggingface_hub import hf_hub_download as get; [get(*f.split(':')) for f in sys.argv[1:]]"
    subprocess.run([sys.executable, "-c", fill_cache, *(f"{file.repo}:{file.path}" for file in hub_files)],
                   env=env, check=True, timeout=120)
    hub.log.clear()
    models = tmp_path / "models"
    result = models_cli("download", "--backend", "ridfr", "--models", str(models), "--accept-licences",
                        env={**env, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1  # the insightface zip needs the network, which offline mode forbids
    assert hub.log == []
    for file in hub_files:
        assert f"{file.relative}: copied from the Hugging Face cache, verified" in result.stdout
        assert (models / file.relative).is_file()
    assert "insightface/models/buffalo_l: error: " in result.stderr and "HF_HUB_OFFLINE" in result.stderr
    assert "ridfr/ridfr-sd15.safetensors: still missing (no public weights: train them" in result.stdout
    listing = models_cli("list", "--backend", "ridfr", "--models", str(models)).stdout
    for file in hub_files:
        assert next(line for line in listing.splitlines() if file.relative in line).endswith("intact")


def test_restore_names_a_command_that_parses_and_only_for_downloadable_files():
    command = download_command("ridfr", "my models", ["checkpoints/v1-5-pruned-emaonly.safetensors", "ridfr/x.st"])
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "ridfr_core.models"]
    args = parse_args(words[3:])
    assert (args.command, args.backend, args.models, args.accept_licences) == ("download", "ridfr", "my models", True)
    assert download_command("ridfr", "models", ["ridfr/ridfr-content.safetensors"]) is None  # train, not download
    assert download_command("restorerid", "models", ["ridfr/RestorerIDFull.ckpt"]) is not None


def test_registry_names_are_unique_and_every_file_has_exactly_one_source():
    files = all_files()
    assert len({file.relative for file in files}) == len(files)
    for file in files:
        sources = [bool(file.repo and file.path), bool(file.url and file.sha256 and file.size), bool(file.how_to_get)]
        assert sum(sources) == 1, file
        assert file.downloadable == (file.licence is not None), file
        assert not file.downloadable or file.size or file.approx_size, f"{file.relative}: no size to show"


def test_restorerid_download_skips_what_the_checkpoint_holds(hub, tmp_path):
    """Once RestorerIDFull.ckpt is here (the publisher-made tiny one holds everything), SD1.5, FaceID Plus v1 and
    CLIP ViT-H are neither requested nor downloaded; a checkpoint pruned of its Adapter still needs those two."""
    import shutil

    import torch
    from shared_data import SHARED
    from ridfr_core.models.registry import CLIP_VIT_H, FACEID_PLUS_V1, RESTORERID, SD15

    golden = SHARED / "restorerid-golden" / "RestorerIDFull-tiny.ckpt"
    if not golden.is_file():
        pytest.skip(f"publisher-made tiny checkpoint not found at {golden}")
    models = tmp_path / "models"
    (models / "ridfr").mkdir(parents=True)
    shutil.copy(golden, models / RESTORERID.relative)
    env = hub_env(hub, tmp_path)
    result = models_cli("download", "--backend", "restorerid", "--models", str(models), "--accept-licences", env=env)
    for file in (SD15, FACEID_PLUS_V1, CLIP_VIT_H):
        assert f"{file.relative}: not needed: RestorerIDFull.ckpt holds" in result.stdout
        assert not (models / file.relative).exists()
        assert not any(file.path in entry[2] for entry in hub.log)
    state = torch.load(golden, weights_only=True)
    state["state_dict"] = {k: v for k, v in state["state_dict"].items() if not k.startswith("Adapter.")}
    torch.save(state, models / RESTORERID.relative)
    result = models_cli("download", "--backend", "restorerid", "--models", str(models), "--accept-licences", env=env)
    assert f"{SD15.relative}: not needed" in result.stdout
    for file in (FACEID_PLUS_V1, CLIP_VIT_H):
        assert f"{file.relative}: not needed" not in result.stdout
        assert f"{file.relative}: error" in result.stderr  # fetched (this fake hub has no such file)
