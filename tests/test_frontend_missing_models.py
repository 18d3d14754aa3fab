"""ComfyUI's real frontend (headless Chromium driven by playwright-core) loads each example workflow the
way a drag-and-drop does: with no model files it shows the Missing Models dialog listing each registered
hub file with its folder (a Download button for the .safetensors ones; the frontend allows no other
suffix), and once the files are in place it shows nothing. The browser may only reach the local server.

Needs COMFYUI_PATH, Debian's chromium and the npm package playwright-core (found through NODE_PATH);
skips, saying which is missing, otherwise."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from comfy_host import REPO_ROOT, ComfyServer, requires_comfyui
from ridfr_core.models import frontend_models

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
WORKFLOWS = sorted((REPO_ROOT / "example_workflows").glob("*.json"))
OPEN_COMFYUI = r"""
  // in an async function with url and chromiumPath: the frontend of the server at url, ready, offline but for it
  const browser = await chromium.launch({ executablePath: chromiumPath, args: ['--no-sandbox'] });
  const page = await browser.newPage();
  const origin = new URL(url).origin;
  await page.route('**/*', (route) => route.request().url().startsWith(origin) ? route.continue() : route.abort());
  await page.goto(url);
  await page.waitForFunction(() => window.app && window.app.vueAppReady, null, { timeout: 90000 });
  await page.waitForLoadState('networkidle');  // the start-up workflow's model checks are done
"""
DRIVER = r"""
const { chromium } = require('playwright-core');
const [url, workflowsPath, chromiumPath] = process.argv.slice(2);
const workflows = JSON.parse(require('fs').readFileSync(workflowsPath, 'utf8'));
(async () => {
""" + OPEN_COMFYUI + r"""  const results = {};
  for (const [name, workflow] of Object.entries(workflows)) {
    await page.evaluate((wf) => window.app.loadGraphData(wf, true, true, null,
      { showMissingNodesDialog: false, showMissingModelsDialog: true }), workflow);
    const shown = await page.waitForSelector('.comfy-missing-models', { timeout: 5000 }).catch(() => null);
    results[name] = await page.evaluate(() => {
      const list = document.querySelector('.comfy-missing-models');
      return list && [...list.querySelectorAll('li')].map((row) => ({
        text: row.innerText,
        downloads: [...row.querySelectorAll('button')].filter((b) => b.innerText.includes('Download'))
          .map((b) => ({ url: b.getAttribute('title'), disabled: b.disabled })),
      }));
    });
    if (shown) {  // close it as a user would before dropping the next workflow
      await page.keyboard.press('Escape');
      await page.waitForSelector('.comfy-missing-models', { state: 'detached', timeout: 5000 });
    }
  }
  console.log(JSON.stringify(results));
  await browser.close();
})().catch((error) => { console.error(error); process.exit(1); });
"""


def playwright_missing() -> str | None:
    if not CHROMIUM or not shutil.which("node"):
        return "needs Debian's chromium and node"
    found = subprocess.run(["node", "-e", "require.resolve('playwright-core')"], capture_output=True)
    return None if found.returncode == 0 else "needs the npm package playwright-core (set NODE_PATH to its node_modules)"


pytestmark = [requires_comfyui, pytest.mark.skipif(playwright_missing() is not None, reason=str(playwright_missing()))]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_frontend")
    (base / "custom_nodes").mkdir()
    os.symlink(REPO_ROOT, base / "custom_nodes" / "ridfr")
    host = ComfyServer(base)
    host.request("/api/settings/Comfy.TutorialCompleted", True)
    yield host
    host.stop()


def dialogs(server: ComfyServer, tmp_path: Path) -> dict:
    """{workflow: rows of the Missing Models dialog, or None when none was shown}."""
    workflows = tmp_path / "workflows.json"
    workflows.write_text(json.dumps({path.name: json.loads(path.read_text()) for path in WORKFLOWS}))
    script = tmp_path / "driver.js"
    script.write_text(DRIVER)
    result = subprocess.run(["node", str(script), server.url, str(workflows), CHROMIUM], capture_output=True,
                            text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_missing_models_dialog_lists_each_file_with_its_folder_then_nothing_once_present(server, tmp_path):
    expected = {}
    for path in WORKFLOWS:
        nodes = json.loads(path.read_text())["nodes"]
        expected[path.name] = [entry for node in nodes for entry in frontend_models(node.get("widgets_values") or [])]
    shown = dialogs(server, tmp_path)
    for name, entries in expected.items():
        rows = shown[name]
        assert rows is not None, f"{name}: no Missing Models dialog"
        assert len(rows) == len({entry["url"] for entry in entries})
        for entry in entries:
            row = next(row for row in rows if f"{entry['directory']} / {entry['name']}" in row["text"])
            assert [download["url"] for download in row["downloads"]] == [entry["url"]]
            assert row["downloads"][0]["disabled"] == (not entry["name"].endswith(".safetensors")), row
    for entry in {entry["url"]: entry for entries in expected.values() for entry in entries}.values():
        target = server.base / "models" / entry["directory"] / entry["name"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"")
    assert dialogs(server, tmp_path) == {name: None for name in expected}
