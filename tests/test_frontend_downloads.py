"""From empty model folders to a restored face in ComfyUI's real frontend (headless Chromium driven by
playwright-core): workflow 4 is loaded, RIDFR's dialog lists what the workflow's nodes of this pack need with
sizes and licences (MUSIQ's weights for IdentityCondition's auto_weight; RestorerIDFull.ckpt with its size,
FaceID Plus v1 and CLIP ViT-H only as "if the checkpoint lacks them"), the user accepts them and clicks
Download, the progress shows, the checkpoint lands first and then only the files whose parts it lacks (served
by a hub on 127.0.0.1 with the registry's repositories and paths, as the CLI downloader's tests do), and Run
restores the face. Also the download routes' refusals, and RIDFR Sample's widgets greyed out in 'backend
defaults' mode.

Needs COMFYUI_PATH, Debian's chromium and the npm package playwright-core (found through NODE_PATH)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from comfy_host import REPO_ROOT, ComfyServer, build_comfy_models, requires_comfyui
from comfy_workflows import FACE, WORKFLOWS
from fake_hub import FakeHub
from ridfr_core.models.plan import size_text
from ridfr_core.models.registry import CLIP_VIT_H, FACE_SWINIR, FACEID_PLUS_V1, MUSIQ_KONIQ, RESTORERID, SD15
from test_frontend_missing_models import CHROMIUM, OPEN_COMFYUI, playwright_missing

pytestmark = [requires_comfyui, pytest.mark.skipif(playwright_missing() is not None, reason=str(playwright_missing()))]
WORKFLOW = next(path for path in WORKFLOWS if path.stem.startswith("4_"))
RIDFR_HEADERS = {"Content-Type": "application/json", "X-RIDFR-Request": "1"}  # as web/ridfr.js sends them
DRIVER = r"""
const { chromium } = require('playwright-core');
const fs = require('fs');
const [url, workflowPath, chromiumPath, face, placePath] = process.argv.slice(2);
const workflow = JSON.parse(fs.readFileSync(workflowPath, 'utf8'));
(async () => {
""" + OPEN_COMFYUI + r"""  await page.evaluate((wf) => window.app.loadGraphData(wf, true, true, null,
    { showMissingNodesDialog: false, showMissingModelsDialog: false }), workflow);
  await page.waitForSelector('#ridfr-downloads', { timeout: 20000 });
  const texts = (selector) => page.$$eval(selector, (rows) => rows.map((row) => row.innerText));
  const result = { rows: await texts('#ridfr-downloads li.ridfr-file'),
                   ifLacking: await texts('#ridfr-downloads li.ridfr-if-lacking') };
  result.disabledBeforeAccepting = await page.$eval('.ridfr-download', (b) => b.disabled);
  await page.check('#ridfr-accept-licences');
  await page.click('.ridfr-download');
  result.progress = [];
  for (let i = 0; i < 1200; i++) {
    const text = await page.$eval('.ridfr-status', (s) => s.innerText);
    if (text && !result.progress.includes(text)) result.progress.push(text);
    if (await page.$('.ridfr-status[data-done="true"]')) break;
    await page.waitForTimeout(50);
  }
  result.status = await page.$eval('.ridfr-status', (s) => s.innerText);
  await page.click('#ridfr-downloads button:text("Close")');
  // what the workflow still names outside RIDFR's needs, ComfyUI's own Missing Models dialog would download
  for (const [source, target] of JSON.parse(fs.readFileSync(placePath, 'utf8'))) {
    fs.mkdirSync(require('path').dirname(target), { recursive: true });
    if (!fs.existsSync(target)) fs.copyFileSync(source, target);
  }
  await page.evaluate(() => window.app.refreshComboInNodes());
  result.sampler = await page.evaluate(() => {
    const node = window.app.graph.nodes.find((n) => n.comfyClass === 'RIDFRSample');
    const names = ['steps', 'guidance', 'sampler_name', 'scheduler'];
    const disabled = () => node.widgets.filter((w) => names.includes(w.name)).map((w) => w.disabled);
    const before = disabled();
    const settings = node.widgets.find((w) => w.name === 'settings');
    settings.value = 'custom';
    settings.callback(settings.value);
    const after = disabled();
    node.widgets.find((w) => w.name === 'steps').value = 2;
    return { before, after };
  });
  await page.evaluate((size) => {
    window.app.graph.nodes.find((n) => n.comfyClass === 'ContentCondition').widgets
      .find((w) => w.name === 'face_size').value = size;
  }, Number(face));
  await page.evaluate(() => window.app.queuePrompt(0, 1));
  result.history = await page.evaluate(async () => {
    for (let i = 0; i < 600; i++) {
      const history = await (await fetch('/history')).json();
      const entry = Object.values(history)[0];
      if (entry && entry.status && entry.status.completed !== undefined) return entry;
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
    return null;
  });
  console.log(JSON.stringify(result));
  await browser.close();
})().catch((error) => { console.error(error); process.exit(1); });
"""


def checkpoint_with_clip_vision(checkpoint, clip_vision, out):
    """RestorerIDFull.ckpt holding the CLIP vision tower (``Adapter.image_encoder.*``, as the publisher's usually
    does) but not the FaceID image projection: the download must then fetch FaceID Plus v1 and skip CLIP ViT-H."""
    state = torch.load(checkpoint, weights_only=True)
    state["state_dict"].update({f"Adapter.image_encoder.{key}": value.half()
                                for key, value in load_file(str(clip_vision)).items()})
    torch.save(state, out)
    return out


@pytest.fixture(scope="module")
def hub_and_server(tmp_path_factory, yunet_models_root, face_data):
    """A fake hub serving the registry's hub files for workflow 4 (tiny models in the real formats; SD1.5 too,
    which must never be asked for) and a ComfyUI whose model folders hold only the tiny architectures' configs
    and an insightface pack; the server reaches nothing but 127.0.0.1 (MUSIQ's pinned GitHub file cannot be
    served by a fake hub: its download fails, clearly)."""
    served_root = tmp_path_factory.mktemp("served")
    source = build_comfy_models(served_root / "models", yunet_models_root / "models" / "antelopev2").root
    clip = source / "clip_vision" / CLIP_VIT_H.name
    checkpoint = checkpoint_with_clip_vision(source / "ridfr" / RESTORERID.name, clip, served_root / RESTORERID.name)
    served = [(SD15, source / "checkpoints" / "tiny-sd15.safetensors"), (RESTORERID, checkpoint),
              (FACEID_PLUS_V1, source / "ipadapter" / FACEID_PLUS_V1.name), (CLIP_VIT_H, clip)]
    hub = FakeHub()
    for file, path in served:
        sha = hub.add(f"{file.repo}/{file.path}", path.read_bytes())
        if file is RESTORERID:  # a pause in the middle keeps the progress on screen for a while
            hub.stall_after[sha] = (path.stat().st_size // 3, 1.5)
    base = tmp_path_factory.mktemp("comfy_downloads")
    shutil.copytree(source / "ridfr" / "configs", base / "models" / "ridfr" / "configs")
    shutil.copytree(yunet_models_root / "models" / "antelopev2", base / "models" / "insightface" / "models" / "buffalo_l")
    (base / "custom_nodes").mkdir()
    os.symlink(REPO_ROOT, base / "custom_nodes" / "ridfr")
    os.symlink(REPO_ROOT / "tests" / "comfy_tiny_sd15.py", base / "custom_nodes" / "comfy_tiny_sd15.py")
    (base / "input").mkdir()
    lq = np.random.default_rng(0).integers(0, 255, (FACE, FACE, 3), dtype=np.uint8)
    Image.fromarray(lq).save(base / "input" / "lq_face.png")
    shutil.copy(face_data / "unaligned" / "obama_obama.jpg", base / "input" / "reference.png")
    nowhere = "http://127.0.0.1:9"  # anything but the fake hub is refused at once
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(base / "hf_home"), "HF_HUB_DISABLE_TELEMETRY": "1",
           "HTTPS_PROXY": nowhere, "HTTP_PROXY": nowhere, "NO_PROXY": "127.0.0.1,localhost"}
    server = ComfyServer(base, extra_env=env)
    server.request("/api/settings/Comfy.TutorialCompleted", True)
    yield hub, server, served
    server.stop()
    hub.close()


def post(server: ComfyServer, path: str, body, headers: dict | None = None) -> tuple[int, dict]:
    """(status, JSON answer) of a POST; ``body`` bytes are sent as they are, anything else as JSON."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(server.url + path, data=data, headers=RIDFR_HEADERS if headers is None else headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_routes_refuse_what_is_not_a_registered_accepted_download(hub_and_server):
    _, server, _ = hub_and_server
    assert post(server, "/ridfr/models/download", {"files": ["ridfr/RestorerIDFull.ckpt"]})[0] == 400  # no licence
    status, answer = post(server, "/ridfr/models/download", {"files": ["https://example.com/x.ckpt"],
                                                             "accept_licences": True})
    assert status == 400 and "not downloadable registered files" in answer["error"]
    status, answer = post(server, "/ridfr/models/download", {"files": ["ridfr/ridfr-sd15.safetensors"],
                                                             "accept_licences": True})
    assert status == 400  # registered, but there are no public RIDFR weights to download


def test_post_routes_answer_a_json_object_only_and_only_to_ridfrs_page(hub_and_server):
    """A list or a body that is not JSON was an HTTP 500 with a server traceback; a cross-site page could POST
    text/plain (no CORS preflight) and start downloads; a proxy that says it relays looked local."""
    _, server, _ = hub_and_server
    for path in ("/ridfr/models/download", "/ridfr/models/missing"):
        for body in ([1, 2], b"{not json", b"\xff\xfe", "text"):
            status, answer = post(server, path, body)
            assert status == 400 and "JSON object" in answer["error"], (path, body, answer)
        cross_site = {"Content-Type": "text/plain"}  # what a page of another site can send without a preflight
        status, answer = post(server, path, {"files": [MUSIQ_KONIQ.relative], "accept_licences": True}, cross_site)
        assert status == 403 and "X-RIDFR-Request" in answer["error"]
    relayed = {**RIDFR_HEADERS, "X-Forwarded-For": "203.0.113.9"}
    status, answer = post(server, "/ridfr/models/download", {"files": [MUSIQ_KONIQ.relative]}, relayed)
    assert status == 403 and "RIDFR_ALLOW_REMOTE_DOWNLOADS=1" in answer["error"]
    assert server.get("/ridfr/models/download") == {"running": False, "files": []}  # nothing was started
    assert "Traceback" not in server.log()


def needs(server: ComfyServer, nodes: list) -> tuple[list[str], list[str]]:
    status, answer = post(server, "/ridfr/models/missing", {"nodes": nodes})
    assert status == 200, answer
    return [file["relative"] for file in answer["files"]], [file["relative"] for file in answer["if_lacking"]]


def test_only_the_nodes_of_this_pack_ask_for_files(hub_and_server):
    """Another pack's workflow that names SD1.5 or CLIP ViT-H in its own nodes opened RIDFR's dialog; MUSIQ's
    weights, which no widget names, were never offered."""
    _, server, _ = hub_and_server
    other_pack = [{"type": "CheckpointLoaderSimple", "widgets": {"ckpt_name": SD15.name}},
                  {"type": "CLIPVisionLoader", "widgets": {"clip_name": CLIP_VIT_H.name}},
                  {"type": "IPAdapterModelLoader", "widgets": {"ipadapter_file": FACEID_PLUS_V1.name}}]
    assert needs(server, other_pack) == ([], [])
    identity = {"type": "IdentityCondition", "widgets": {"weight": 1.0, "lora_strength": 1.0, "auto_weight": True}}
    assert needs(server, [*other_pack, identity]) == ([MUSIQ_KONIQ.relative], [])
    assert needs(server, [{**identity, "widgets": {"auto_weight": False}}]) == ([], [])
    ridfr = {"type": "LoadRIDFR", "widgets": {"content_weights": "ridfr-sd15.safetensors", "ipadapter": "auto",
                                              "clip_vision": CLIP_VIT_H.name, "insightface": "buffalo_l"}}
    assert needs(server, [ridfr]) == (["ridfr/ridfr-sd15.safetensors", "ipadapter/ip-adapter-faceid-plusv2_sd15.bin",
                                       CLIP_VIT_H.relative], [])  # buffalo_l is there; 'auto' follows the content
    by_default = {**identity, "widgets": {"auto_weight": "backend default"}}
    restorerid = {"type": "LoadRIDFR", "widgets": {**ridfr["widgets"], "content_weights": "RestorerIDFull.ckpt"}}
    assert MUSIQ_KONIQ.relative in needs(server, [restorerid, by_default])[0]  # RestorerID is published with it
    assert MUSIQ_KONIQ.relative not in needs(server, [ridfr, by_default])[0]
    for nodes in ([], [{"type": "LoadRIDFR"}], [{"type": "LoadRIDFR", "widgets": [1]}], "nodes", [None]):
        assert needs(server, nodes) == ([], [])  # nothing to read is nothing needed, not an error


def test_workflow_4_from_empty_folders_download_in_the_ui_then_run(hub_and_server, tmp_path):
    hub, server, served = hub_and_server
    script, place = tmp_path / "driver.js", tmp_path / "place.json"
    script.write_text(DRIVER)
    nodes = json.loads(WORKFLOW.read_text())["nodes"]
    named = {entry["name"]: entry["directory"] for node in nodes for entry in node.get("properties", {}).get("models", [])}
    place.write_text(json.dumps([[str(path), str(server.base / "models" / named[file.name] / file.name)]
                                 for file, path in served if file.name in named]))
    hub.log.clear()
    result = subprocess.run(["node", str(script), server.url, str(WORKFLOW), CHROMIUM, str(FACE), str(place)],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:] + server.log()[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    # the dialog: the checkpoint with its size and MUSIQ; the files the checkpoint usually holds only if it lacks them
    assert [row.split(" — ")[0] for row in seen["rows"]] == [f"models/{RESTORERID.relative}",
                                                              f"models/{MUSIQ_KONIQ.relative}"]
    assert f"({size_text(RESTORERID)}, " in seen["rows"][0] and size_text(RESTORERID) == "~6.5 GB"
    assert "(108.6 MB, " in seen["rows"][1]
    assert [row.split(" (")[0] for row in seen["ifLacking"]] == [f"models/{FACEID_PLUS_V1.relative}",
                                                                  f"models/{CLIP_VIT_H.relative}"]
    assert all("only if RestorerIDFull.ckpt lacks" in row for row in seen["ifLacking"])
    for row in seen["rows"] + seen["ifLacking"]:
        assert any(file.licence.name in row for file in (RESTORERID, MUSIQ_KONIQ, FACEID_PLUS_V1, CLIP_VIT_H))
    assert seen["disabledBeforeAccepting"]
    # the download: the checkpoint first, then FaceID Plus v1 (its projection is not in the checkpoint), not CLIP
    # ViT-H (it is), never SD1.5; MUSIQ's GitHub file is out of reach here and said so
    blobs = {hub.add(f"{file.repo}/{file.path}", path.read_bytes()): file.relative for file, path in served}
    fetched = list(dict.fromkeys(blobs[entry[2].rsplit("/", 1)[-1]] for entry in hub.requests("cdn", "GET")))
    assert fetched == [RESTORERID.relative, FACEID_PLUS_V1.relative]
    assert not any(SD15.path in entry[2] or CLIP_VIT_H.path in entry[2] for entry in hub.log)
    assert any(text.startswith("Downloading ridfr/RestorerIDFull.ckpt") and "%" in text for text in seen["progress"])
    assert f"{CLIP_VIT_H.relative}: not needed: RestorerIDFull.ckpt holds the CLIP" in seen["status"]
    assert f"Failed: {MUSIQ_KONIQ.relative}: error: " in seen["status"], seen["status"]
    for file, path in served[1:3]:  # the checkpoint and FaceID Plus v1
        assert (server.base / "models" / file.relative).read_bytes() == path.read_bytes()
    assert seen["sampler"] == {"before": [True] * 4, "after": [False] * 4}
    entry = seen["history"]
    assert entry and entry["status"]["status_str"] == "success", json.dumps(entry)[-3000:]
    images = [image for output in entry["outputs"].values() for image in output.get("images", [])
              if image["type"] == "output"]
    saved = np.asarray(Image.open(server.base / "output" / images[0]["subfolder"] / images[0]["filename"]))
    assert saved.shape == (FACE, FACE, 3) and saved.std() > 2


def test_a_second_download_is_refused_while_one_runs(hub_and_server):
    hub, server, served = hub_and_server
    target = server.base / "models" / "upscale_models"
    data = served[2][1].read_bytes() + b"swinir"  # any bytes: the fake hub serves them under DiffBIR's name

    sha = hub.add(f"{FACE_SWINIR.repo}/{FACE_SWINIR.path}", data)
    hub.stall_after[sha] = (len(data) // 2, 3.0)
    first = post(server, "/ridfr/models/download", {"files": [FACE_SWINIR.relative], "accept_licences": True})
    assert first[0] == 202
    second = post(server, "/ridfr/models/download", {"files": [FACE_SWINIR.relative], "accept_licences": True})
    assert second[0] == 409 and "another RIDFR download is running" in second[1]["error"]
    for _ in range(100):
        if not server.get("/ridfr/models/download")["running"]:
            break
        time.sleep(0.2)
    assert (target / FACE_SWINIR.name).read_bytes() == data
