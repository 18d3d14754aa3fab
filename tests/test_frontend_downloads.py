"""From empty model folders to a restored face in ComfyUI's real frontend (headless Chromium driven by
playwright-core): workflow 4 is loaded, RIDFR's dialog lists the missing registered files with their
licences, the user accepts them and clicks Download, the progress shows, the files land in ComfyUI's models
folders (served by a hub on 127.0.0.1 with the registry's repositories and paths, as the CLI downloader's
tests do), and Run restores the face. Also the download routes' refusals, and RIDFR Sample's widgets greyed
out in 'backend defaults' mode.

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
from PIL import Image

from comfy_host import REPO_ROOT, ComfyServer, build_comfy_models, requires_comfyui
from comfy_workflows import FACE, WORKFLOWS
from fake_hub import FakeHub
from ridfr_core.models.registry import CLIP_VIT_H, FACE_SWINIR, FACEID_PLUS_V1, RESTORERID, SD15
from test_frontend_missing_models import CHROMIUM, OPEN_COMFYUI, playwright_missing

pytestmark = [requires_comfyui, pytest.mark.skipif(playwright_missing() is not None, reason=str(playwright_missing()))]
WORKFLOW = next(path for path in WORKFLOWS if path.stem.startswith("4_"))
DRIVER = r"""
const { chromium } = require('playwright-core');
const [url, workflowPath, chromiumPath, face] = process.argv.slice(2);
const workflow = JSON.parse(require('fs').readFileSync(workflowPath, 'utf8'));
(async () => {
""" + OPEN_COMFYUI + r"""  await page.evaluate((wf) => window.app.loadGraphData(wf, true, true, null,
    { showMissingNodesDialog: false, showMissingModelsDialog: false }), workflow);
  await page.waitForSelector('#ridfr-downloads', { timeout: 20000 });
  const result = { rows: await page.$$eval('#ridfr-downloads li', (rows) => rows.map((row) => row.innerText)) };
  result.disabledBeforeAccepting = await page.$eval('.ridfr-download', (b) => b.disabled);
  await page.check('#ridfr-accept-licences');
  await page.click('.ridfr-download');
  result.progress = [];
  for (let i = 0; i < 600; i++) {
    const text = await page.$eval('.ridfr-status', (s) => s.innerText);
    if (text && !result.progress.includes(text)) result.progress.push(text);
    if (await page.$('.ridfr-status[data-done="true"]')) break;
    await page.waitForTimeout(50);
  }
  await page.click('#ridfr-downloads button:text("Close")');
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


@pytest.fixture(scope="module")
def hub_and_server(tmp_path_factory, yunet_models_root, face_data):
    """A fake hub serving workflow 4's registered files (tiny models in the real formats) and a ComfyUI whose
    model folders hold only the tiny architectures' configs and an insightface pack."""
    source = build_comfy_models(tmp_path_factory.mktemp("served") / "models",
                                yunet_models_root / "models" / "antelopev2").root
    served = [(SD15, source / "checkpoints" / "tiny-sd15.safetensors"), (RESTORERID, source / "ridfr" / RESTORERID.name),
              (FACEID_PLUS_V1, source / "ipadapter" / FACEID_PLUS_V1.name),
              (CLIP_VIT_H, source / "clip_vision" / CLIP_VIT_H.name)]
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
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(base / "hf_home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    server = ComfyServer(base, extra_env=env)
    server.request("/api/settings/Comfy.TutorialCompleted", True)
    yield hub, server, served
    server.stop()
    hub.close()


def post(server: ComfyServer, path: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(server.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
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
    missing = server.request("/ridfr/models/missing", {"names": ["ridfr-sd15.safetensors", "buffalo_l", "x.bin"]})
    assert [(file["relative"], file["downloadable"]) for file in missing["files"]] == \
        [("ridfr/ridfr-sd15.safetensors", False)]  # buffalo_l is there; x.bin is nobody's


def test_workflow_4_from_empty_folders_download_in_the_ui_then_run(hub_and_server, tmp_path):
    hub, server, served = hub_and_server
    script = tmp_path / "driver.js"
    script.write_text(DRIVER)
    result = subprocess.run(["node", str(script), server.url, str(WORKFLOW), CHROMIUM, str(FACE)], capture_output=True,
                            text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:] + server.log()[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(seen["rows"]) == 4 and seen["disabledBeforeAccepting"]
    for file, _ in served:
        row = next(row for row in seen["rows"] if f"models/{file.relative}" in row)
        assert file.licence.name in row
    assert any(text.startswith("Downloading ridfr/RestorerIDFull.ckpt") and "%" in text for text in seen["progress"])
    assert seen["progress"][-1].startswith("Done:")
    for file, path in served:
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
    data = served[1][1].read_bytes() + b"swinir"  # any bytes: the fake hub serves them under DiffBIR's name

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
