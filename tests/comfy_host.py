"""Running the node pack against a real ComfyUI (``COMFYUI_PATH`` = a ComfyUI checkout; see
scripts/setup_comfyui.sh). Tests that need it are marked ``requires_comfyui`` and skip without it.

- :func:`import_comfy`: ComfyUI's modules in this process (CPU, no argument parsing), the tiny SD1.5
  family registered (tests/comfy_tiny_sd15.py) and the pack imported the way ComfyUI imports it.
- :func:`build_comfy_models` (fixture ``comfy_models``): a ComfyUI ``models/`` folder with tiny models
  in the real formats.
- :class:`ComfyServer`: the real server on 127.0.0.1 with ``--base-directory`` a temp folder.
- :func:`ui_to_api`: UI-format workflow JSON (what example_workflows/ holds) -> API-format prompt,
  using the node schemas from ``/object_info``.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
requires_comfyui = pytest.mark.skipif(
    not COMFYUI_PATH or not (Path(COMFYUI_PATH) / "main.py").is_file(),
    reason="COMFYUI_PATH is not set to a ComfyUI checkout (see scripts/setup_comfyui.sh)")
PACK_MODULE = "ridfr_comfyui_pack"
# Widgets the frontend adds after an input and stores in widgets_values (they are not node inputs).
EXTRA_WIDGET_OPTIONS = ("control_after_generate", "image_upload")
NOT_EXECUTED = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
RESTORERID_FILE, RESTORERID_ADAPTER = "RestorerIDFull.ckpt", "ip-adapter-faceid-plus_sd15.bin"


# ------------------------------------------------------------------------------------------------
# ComfyUI in this process


def import_comfy(config_dir: Path):
    """Import ComfyUI (CPU), register the tiny SD1.5 family for ``config_dir`` and load the pack.
    Returns the pack module (``comfy_entrypoint`` and ``nodes``)."""
    if COMFYUI_PATH not in sys.path:
        sys.path.insert(0, COMFYUI_PATH)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401  (after args.cpu)

    sys.path.insert(0, str(Path(__file__).parent))
    import comfy_tiny_sd15

    comfy_tiny_sd15.register(config_dir)
    if PACK_MODULE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK_MODULE, REPO_ROOT / "__init__.py",
                                                      submodule_search_locations=[str(REPO_ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_MODULE] = module
        spec.loader.exec_module(module)
        asyncio.run(module.comfy_entrypoint())
    return sys.modules[PACK_MODULE]


def pack_core(module: str):
    """A module of the core as the pack imports it (``<pack>.ridfr_core.<module>``): ComfyUI loads the pack
    under a name of its own and the nodes reach the core relatively, so what the nodes make is of these
    classes and compares with these constants, not with those of the top-level ``ridfr_core``."""
    return importlib.import_module(f"{PACK_MODULE}.ridfr_core.{module}")


def add_models_folder(models: Path) -> None:
    """Make ComfyUI (in this process) see the folders of ``models`` (added, never replaced)."""
    import folder_paths

    for folder in ("checkpoints", "clip_vision", "ipadapter", "ridfr", "insightface"):
        folder_paths.add_model_folder_path(folder, str(models / folder))


# ------------------------------------------------------------------------------------------------
# Models in the real formats


def build_comfy_models(models: Path, insightface_pack: Path):
    """A ComfyUI ``models/`` folder with tiny RIDFR models in the real file formats (tests/tiny_models.py,
    ComfyUI variant), the public RestorerID set under its real names (``ridfr/RestorerIDFull.ckpt`` in the
    Lightning checkpoint layout, tests/restorerid_layout.py; FaceID Plus v1 ``ipadapter/ip-adapter-faceid-plus_sd15.bin``)
    and the insightface pack. Returns a ``tiny_models.TinyModels`` whose ``root`` is ``models``."""
    from restorerid_layout import tiny_branch, write_restorerid_checkpoint
    from tiny_models import LORA_RANK, TINY_CONFIGS, build_tiny_models

    from ridfr_core.weights.checkpoints import load_config

    tiny = build_tiny_models(models, comfy=True)
    unet_config = {**TINY_CONFIGS["unet"], "norm_num_groups": 32}
    write_restorerid_checkpoint(models / "ridfr" / RESTORERID_FILE, tiny.unet, copy.deepcopy(tiny.vae).half(),
                                tiny.text_encoder, unet_config, load_config("vae"), tiny_branch(tiny.unet, seed=7),
                                TINY_CONFIGS["clip_vision"]["hidden_size"], LORA_RANK)  # fp16 VAE: a smaller file
    shutil.copytree(insightface_pack, models / "insightface" / "models" / insightface_pack.name)
    return tiny


@pytest.fixture(scope="session")
def comfy_models(tmp_path_factory, scripted_models_root):
    """Tiny models for ComfyUI (see :func:`build_comfy_models`) with the scripted insightface pack; the
    RestorerID conversion cache (``RIDFR_CACHE``) in a temporary folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RIDFR_CACHE", str(tmp_path_factory.mktemp("ridfr_cache")))
        yield build_comfy_models(tmp_path_factory.mktemp("comfy") / "models",
                                 scripted_models_root / "models" / "buffalo_l")


# ------------------------------------------------------------------------------------------------
# The real server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ComfyServer:
    """``python main.py --cpu`` on 127.0.0.1 with ``base`` as base directory (and ``extra_args``, e.g. a
    precision flag, as a user would start it; ``cpu=False``: on ComfyUI's default device); stop() ends it."""

    def __init__(self, base: Path, extra_args: tuple[str, ...] = (), extra_env: dict | None = None, cpu: bool = True,
                 ready_timeout: float = 90):
        self.base, self.port = base, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "server.log"
        env = {**os.environ, "RIDFR_CACHE": str(base / "ridfr_cache"),
               "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        self.process = subprocess.Popen(
            [sys.executable, "main.py", *(["--cpu"] if cpu else []), "--listen", "127.0.0.1", "--port", str(self.port),
             "--disable-auto-launch", "--base-directory", str(base), *extra_args],
            cwd=COMFYUI_PATH, env=env, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT)
        self.wait_ready(ready_timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not start in {timeout}s:\n{self.log()[-4000:]}")

    def request(self, path: str, data: dict | None = None):
        body = None if data is None else json.dumps(data).encode()
        request = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def get(self, path: str):
        return self.request(path)

    def refused(self, prompt: dict) -> dict:
        """The answer to a prompt that validation refuses (HTTP 400: ``error`` and ``node_errors``)."""
        try:
            self.request("/prompt", {"prompt": prompt})
        except urllib.error.HTTPError as error:
            assert error.code == 400, error.code
            return json.loads(error.read())
        raise AssertionError("the prompt was accepted")

    def submit(self, prompt: dict) -> str:
        try:
            return self.request("/prompt", {"prompt": prompt})["prompt_id"]
        except urllib.error.HTTPError as error:
            raise AssertionError(f"prompt rejected: {error.read().decode()}") from None

    def wait(self, prompt_id: str, timeout: float = 120) -> dict:
        """The history entry of a finished prompt (its status says success or error)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                return history[prompt_id]
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died:\n{self.log()[-4000:]}")
            time.sleep(0.3)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s:\n{self.log()[-3000:]}")

    def run(self, prompt: dict, timeout: float = 120) -> dict:
        entry = self.wait(self.submit(prompt), timeout)
        status = entry["status"]
        if status.get("status_str") != "success":
            raise AssertionError(f"prompt failed: {json.dumps(status.get('messages'), indent=1)[-3000:]}")
        return entry

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# ------------------------------------------------------------------------------------------------
# UI format -> API format


def _is_widget(spec: list) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """API-format prompt of a UI-format workflow: each node's widget values are matched to its widget
    inputs in schema order (plus the frontend's extra widgets: control_after_generate, image upload);
    links become ``[source node id, output slot]``. Notes and other frontend-only nodes are dropped."""
    links = {link[0]: (str(link[1]), link[2]) for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in NOT_EXECUTED or node.get("mode", 0) in (2, 4):  # 2 muted, 4 bypassed
            continue
        schema = object_info.get(node["type"])
        if schema is None:
            raise KeyError(f"node type {node['type']} (node {node['id']}) is not registered in this ComfyUI")
        linked = {slot["name"]: links[slot["link"]] for slot in node.get("inputs", []) if slot.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs = {}
        order = schema.get("input_order") or {k: list(v) for k, v in schema["input"].items()}
        for category in ("required", "optional"):
            for name in order.get(category, []):
                spec = schema["input"][category][name]
                if _is_widget(spec) and values:
                    inputs[name] = values.pop(0)
                    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                    if any(options.get(extra) for extra in EXTRA_WIDGET_OPTIONS) and values:
                        values.pop(0)
                if name in linked:
                    inputs[name] = list(linked[name])
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
