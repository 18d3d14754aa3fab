"""The pack in a real ComfyUI server (COMFYUI_PATH): every example workflow submitted over HTTP as shipped, with
only the public weights there, and again with RIDFR content weights chosen in Load RIDFR (its one widget);
/object_info, the template browser and Cancel. Tiny models in the real formats; real photos (from
../shared, used at run time only) with the YuNet-based insightface pack so that faces are detected."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from PIL import Image

from comfy_host import REPO_ROOT, ComfyServer, requires_comfyui
from comfy_workflows import FACE, NOT_PUBLIC, RIDFR_CONTENT, WORKFLOWS, api_prompt, saved_images, workflow_base

pytestmark = requires_comfyui
PACK_NODES = ("LoadRIDFR", "FaceIDEncode", "MatchIdentities", "ContentCondition", "IdentityCondition", "RIDFRSample",
              "PasteFaces", "RankByIdentity")


@pytest.fixture(scope="module")
def server(tmp_path_factory, yunet_models_root, face_data):
    """The public weights only: RestorerIDFull.ckpt, FaceID Plus v1, CLIP ViT-H, MUSIQ, insightface, SwinIR."""
    host = ComfyServer(workflow_base(tmp_path_factory.mktemp("comfy_base"), yunet_models_root, face_data))
    yield host
    host.stop()


@pytest.fixture(scope="module")
def ridfr_server(tmp_path_factory, yunet_models_root, face_data):
    """The public weights and RIDFR content weights with what they need beside them (PlusV2, an SD1.5)."""
    host = ComfyServer(workflow_base(tmp_path_factory.mktemp("comfy_ridfr"), yunet_models_root, face_data,
                                     ridfr_weights=True))
    yield host
    host.stop()


def test_object_info_lists_every_node_with_tooltips(server):
    info = server.get("/object_info")
    log = server.log()
    assert "Cannot import" not in log and "IMPORT FAILED" not in log, log[-3000:]
    assert "Unable to parse pyproject.toml" not in log
    for node_id in PACK_NODES:
        assert node_id in info, f"{node_id} missing from /object_info"
        for category in ("required", "optional"):
            for name, spec in info[node_id]["input"].get(category, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert set(info["LoadRIDFR"]["input"]["required"]["insightface"][1]["options"]) == {"auto", "antelopev2"}
    assert info["LoadRIDFR"]["output"][:4] == ["RIDFR_MODELS", "MODEL", "CLIP", "VAE"]


def test_example_workflows_are_in_the_template_browser(server):
    templates = server.get("/workflow_templates")
    assert sorted(templates["ridfr"]) == sorted(path.stem for path in WORKFLOWS)
    for path in WORKFLOWS:
        assert path.with_suffix(".jpg").is_file()
        notes = [node for node in json.loads(path.read_text())["nodes"] if node["type"] == "Note"]
        assert notes and "models/ipadapter" in notes[0]["widgets_values"][0]


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[path.stem for path in WORKFLOWS])
def test_workflows_take_every_model_from_load_ridfr_and_the_public_checkpoint(workflow):
    """No Load Checkpoint: the MODEL, CLIP and VAE come from Load RIDFR, whose choices are RestorerIDFull.ckpt and
    'auto'; the file is listed with its download URL for ComfyUI's Missing Models dialog (``properties.models``,
    the convention of ComfyUI's own templates) and named in the note with its licence."""
    nodes = json.loads(workflow.read_text())["nodes"]
    assert not [node for node in nodes if node["type"] == "CheckpointLoaderSimple"]
    loader = next(node for node in nodes if node["type"] == "LoadRIDFR")
    assert loader["widgets_values"] == ["RestorerIDFull.ckpt", "auto", "auto", "auto", "auto", "auto"]
    assert [entry["name"] for entry in loader["properties"]["models"]] == ["RestorerIDFull.ckpt"]
    assert loader["properties"]["models"][0]["url"].startswith("https://huggingface.co/YingJiacheng/RestorerID/")
    assert {link for output in loader["outputs"][1:] for link in output["links"]}, "MODEL/CLIP/VAE unconnected"
    identity = next(node for node in nodes if node["type"] == "IdentityCondition")
    assert identity["widgets_values"][2] == "backend default"
    note = next(node for node in nodes if node["type"] == "Note")["widgets_values"][0]
    assert "non-commercial" in note and "RestorerIDFull.ckpt" in note and "musiq_koniq_ckpt-e95806b9.pth" in note


def test_every_report_of_a_shipped_workflow_is_shown_on_the_canvas(server):
    """Each STRING output of a RIDFR node (reference consistency, who is who, settings, scores) is connected
    to one of ComfyUI's display nodes."""
    info = server.get("/object_info")
    for path in WORKFLOWS:
        workflow = json.loads(path.read_text())
        kinds = {node["id"]: node["type"] for node in workflow["nodes"]}
        shown, reached = set(), {node for node, kind in kinds.items() if kind == "PreviewAny"}
        while True:  # back from the previews, through ComfyUI's string joins
            feeding = {(link[1], link[2]) for link in workflow["links"] if link[3] in reached}
            joins = {node for node, _ in feeding if kinds[node] == "StringConcatenate"} - reached
            shown |= feeding
            if not joins:
                break
            reached |= joins
        for node in workflow["nodes"]:
            if node["type"] in PACK_NODES:
                for slot, kind in enumerate(info[node["type"]]["output"]):
                    if kind == "STRING":
                        assert (node["id"], slot) in shown, (path.name, node["type"], slot)


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[path.stem for path in WORKFLOWS])
def test_example_workflow_runs_and_is_deterministic(server, workflow):
    """As shipped, with only the public weights there."""
    assert not any((server.base / "models" / relative).exists() for relative in NOT_PUBLIC)
    prompt = api_prompt(server, workflow)
    entry = server.run(prompt)
    first = saved_images(server, entry)
    server.request("/free", {"unload_models": True, "free_memory": True})
    second = saved_images(server, server.run(prompt))
    assert first and len(first) == len(second)
    for image, again in zip(first, second):
        assert image.std() > 2, "blank output"
        np.testing.assert_array_equal(image, again)
    previews = [str(node["id"]) for node in json.loads(workflow.read_text())["nodes"] if node["type"] == "PreviewAny"]
    for node in previews:  # every report reaches the canvas
        assert entry["outputs"][node]["text"][0].strip(), node
    if "best_of_n" in workflow.stem:  # four candidates saved best first, every score shown
        report = next(output["text"][0] for output in entry["outputs"].values()
                      if output.get("text", [""])[0].startswith("ranked by"))
        scores = report.split("\n\n")[0].splitlines()
        assert len(first) == 4 and scores[0].startswith("ranked by dlib") and len(scores) == 5
        assert "sampled with" in report and "reference" in report.lower()
    if "group_photo" in workflow.stem:
        photo = np.asarray(Image.open(server.base / "input" / "group_photo.jpg").convert("RGB"))
        assert first[0].shape == photo.shape
        assert (first[0] != photo).any(axis=-1).mean() < 0.5  # faces replaced, the rest kept
    else:
        assert first[0].shape == (FACE, FACE, 3)


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[path.stem for path in WORKFLOWS])
def test_example_workflow_runs_with_ridfr_weights_chosen_in_load_ridfr(ridfr_server, workflow):
    """RIDFR's own content weights are one widget away: Load RIDFR's 'auto' choices and the 'backend default(s)'
    follow them (FaceID PlusV2, the SD1.5 checkpoint, no MUSIQ), nothing else changes."""
    entry = ridfr_server.run(api_prompt(ridfr_server, workflow, content=RIDFR_CONTENT))
    images = saved_images(ridfr_server, entry)
    assert images and all(image.std() > 2 for image in images)
    reports = [output["text"][0] for output in entry["outputs"].values() if output.get("text")]
    assert not any("RestorerID" in report for report in reports), reports
    public = saved_images(ridfr_server, ridfr_server.run(api_prompt(ridfr_server, workflow)))
    assert any((ours != theirs).any() for ours, theirs in zip(images, public)), "the content weights changed nothing"


def test_cancel_stops_a_running_prompt(server):
    prompt = api_prompt(server, WORKFLOWS[0], steps=200)
    for node in prompt.values():
        if node["class_type"] == "RIDFRSample":
            node["inputs"].update(guidance=3.0, seed=7)
        if node["class_type"] == "ContentCondition":
            node["inputs"]["face_size"] = 256
    prompt_id = server.submit(prompt)
    deadline = time.time() + 60
    while not server.get("/queue")["queue_running"] and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    started = time.time()
    server.request("/interrupt", {})
    entry = server.wait(prompt_id, timeout=60)
    assert time.time() - started < 20
    messages = [message[0] for message in entry["status"]["messages"]]
    assert "execution_interrupted" in messages, entry["status"]
