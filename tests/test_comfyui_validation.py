"""Validation on the real server, before anything runs: each RIDFR node reports its problems in one
message (ComfyUI repeats a validate_inputs message per parameter the method names), LoadRIDFR lists every
missing model file with its folder and how to get it, and RankByIdentity's recogniser packages are checked
before workflow 5 samples anything."""

from __future__ import annotations

import json
import os

import pytest

from comfy_host import REPO_ROOT, ComfyServer, requires_comfyui, ui_to_api
from comfy_workflows import WORKFLOWS, api_prompt, workflow_base

pytestmark = requires_comfyui


def workflow(name: str) -> dict:
    return json.loads(next(path for path in WORKFLOWS if path.stem.startswith(name)).read_text())


def node_id(prompt: dict, class_type: str) -> str:
    return next(key for key, node in prompt.items() if node["class_type"] == class_type)


@pytest.fixture(scope="module")
def empty_server(tmp_path_factory):
    """A ComfyUI with the pack and empty model folders, as after installing it."""
    base = tmp_path_factory.mktemp("comfy_empty")
    (base / "custom_nodes").mkdir()
    os.symlink(REPO_ROOT, base / "custom_nodes" / "ridfr")
    host = ComfyServer(base)
    yield host
    host.stop()


@pytest.mark.parametrize("content, backend, files", [
    (None, "restorerid", ["models/ridfr/RestorerIDFull.ckpt", "models/insightface/models/buffalo_l"]),
    ("ridfr-sd15.safetensors", "ridfr", [
        "models/ridfr/ridfr-sd15.safetensors", "models/checkpoints/v1-5-pruned-emaonly-fp16.safetensors",
        "models/ipadapter/ip-adapter-faceid-plusv2_sd15.bin",
        "models/clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", "models/insightface/models/buffalo_l"]),
], ids=["as shipped", "ridfr weights"])
@pytest.mark.parametrize("name", ["1_", "4_"])
def test_load_ridfr_lists_every_missing_file_once(empty_server, name, content, backend, files):
    """Empty model folders: one message on Load RIDFR naming each file its choices need, with the download; the
    RestorerID checkpoint stands for the base, FaceID Plus v1 and CLIP ViT-H it holds. Identity Condition's
    default needs MUSIQ with RestorerID weights only. No node repeats a problem."""
    prompt = ui_to_api(workflow(name), empty_server.get("/object_info"))
    if content:
        prompt[node_id(prompt, "LoadRIDFR")]["inputs"]["content_weights"] = content
    node_errors = empty_server.refused(prompt)["node_errors"]
    assert all(len(entry["errors"]) == 1 for entry in node_errors.values()), node_errors
    details = node_errors[node_id(prompt, "LoadRIDFR")]["errors"][0]["details"]
    assert f"{len(files)} model file(s) missing" in details
    for file in files:
        assert file in details
    assert f"python -m ridfr_core.models download --backend {backend} --models " in details
    identity = node_errors.get(node_id(prompt, "IdentityCondition"))
    if backend == "ridfr":  # no public RIDFR weights: says how to make them instead of a download
        assert "train them with `python -m ridfr_core.train`" in details
        assert identity is None
    else:
        assert "https://huggingface.co/YingJiacheng/RestorerID" in details and "non-commercial" in details
        assert "it holds the SD1.5 RestorerID was trained against" in details
        assert "pyiqa/musiq_koniq_ckpt-e95806b9.pth" in identity["errors"][0]["details"]


def test_several_wrong_choices_of_one_node_are_one_message(empty_server):
    prompt = ui_to_api(workflow("1_"), empty_server.get("/object_info"))
    prompt[node_id(prompt, "IdentityCondition")]["inputs"]["auto_weight"] = "off"  # no MUSIQ here
    content, sampler = node_id(prompt, "ContentCondition"), node_id(prompt, "RIDFRSample")
    prompt[content]["inputs"].update(on_no_face="maybe", start_percent=0.9, end_percent=0.1)
    prompt[sampler]["inputs"].update(scheduler="sometimes")
    node_errors = empty_server.refused(prompt)["node_errors"]
    for node, expected in ((content, "ContentCondition (on_no_face): 'maybe' is not one of"),
                           (sampler, "RIDFRSample (scheduler): 'sometimes' is not a ComfyUI scheduler")):
        errors = node_errors[node]["errors"]
        assert len(errors) == 1 and expected in errors[0]["details"], errors


def test_rank_by_identity_without_dlib_is_refused_before_sampling(tmp_path_factory, yunet_models_root, face_data):
    """dlib absent (blocked the way Python documents: ``sys.modules['dlib'] = None``, so ``import dlib`` and
    ``find_spec('dlib')`` fail as if it were not installed): workflow 5 is refused at validation, naming
    the install command, and nothing is sampled."""
    blocker = tmp_path_factory.mktemp("no_dlib")
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['dlib'] = None\n")
    base = workflow_base(tmp_path_factory.mktemp("comfy_no_dlib"), yunet_models_root, face_data)
    path = os.pathsep.join([str(blocker), *filter(None, [os.environ.get("PYTHONPATH")])])
    server = ComfyServer(base, extra_env={"PYTHONPATH": path})
    try:
        prompt = api_prompt(server, next(path for path in WORKFLOWS if path.stem.startswith("5_")))
        node_errors = server.refused(prompt)["node_errors"]
        assert list(node_errors) == [node_id(prompt, "RankByIdentity")]
        errors = node_errors[node_id(prompt, "RankByIdentity")]["errors"]
        assert len(errors) == 1 and "pip install dlib-bin face_recognition_models" in errors[0]["details"]
        assert server.get("/history") == {}
    finally:
        server.stop()


def own_address() -> str | None:
    """This machine's address on its network (not loopback), or None."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: only picks the outgoing interface
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


@pytest.mark.parametrize("allowed", [False, True])
def test_downloads_from_another_machine_need_the_users_consent(tmp_path, allowed):
    """With --listen the download route answers other machines only when RIDFR_ALLOW_REMOTE_DOWNLOADS=1."""
    import urllib.error
    import urllib.request

    address = own_address()
    if address is None:
        pytest.skip("no network address other than loopback")
    (tmp_path / "custom_nodes").mkdir()
    os.symlink(REPO_ROOT, tmp_path / "custom_nodes" / "ridfr")
    server = ComfyServer(tmp_path, extra_args=("--listen", "0.0.0.0"),
                         extra_env={"RIDFR_ALLOW_REMOTE_DOWNLOADS": "1"} if allowed else None)
    try:
        request = urllib.request.Request(f"http://{address}:{server.port}/ridfr/models/download", data=b'{"files": []}',
                                         headers={"Content-Type": "application/json", "X-RIDFR-Request": "1"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        answer = json.loads(refused.value.read())
        if allowed:  # past the gate: refused only for naming no file
            assert refused.value.code == 400 and "name the registered files" in answer["error"]
        else:
            assert refused.value.code == 403 and "RIDFR_ALLOW_REMOTE_DOWNLOADS=1" in answer["error"]
    finally:
        server.stop()
