"""Alignment-trained RestorerID weights in a real ComfyUI (COMFYUI_PATH): trained by ``python -m ridfr_core.train``
from the public ``RestorerIDFull.ckpt`` of a ComfyUI models folder, put next to it in ``models/ridfr`` and
chosen in workflow 4's LoadRIDFR instead of the public file; the workflow restores the face, deterministically,
and differently from the public weights."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from comfy_host import REPO_ROOT, RESTORERID_FILE, ComfyServer, build_comfy_models, requires_comfyui
from comfy_workflows import write_musiq_weights
from test_comfyui_integration import FACE, api_prompt, saved_images
from test_data import small_faces  # noqa: F401 (fixture)
from test_train import TINY, fixed_batch
from test_train_restorerid import bgr_cache  # noqa: F401 (fixture)

from ridfr_core import train
from ridfr_core.train import Trainer

pytestmark = requires_comfyui
WORKFLOW = REPO_ROOT / "example_workflows" / "4_restorerid_public_weights.json"


@pytest.fixture(scope="module")
def server(tmp_path_factory, scripted_models_root, small_faces, bgr_cache):  # noqa: F811
    base = tmp_path_factory.mktemp("comfy_aligned")
    models = base / "models"
    tiny = build_comfy_models(models, scripted_models_root / "models" / "buffalo_l")
    write_musiq_weights(models)
    configs = base / "configs"  # the tiny UNet; the checkpoint's VAE is SD1.5's own (as comfy_host writes it)
    shutil.copytree(tiny.configs, configs)
    shutil.copy(REPO_ROOT / "ridfr_core" / "configs" / "sd15" / "vae.json", configs / "vae.json")
    out = base / "run"
    args = ["--backend", "restorerid", "--stage", "align", "--init", str(models / "ridfr" / RESTORERID_FILE),
            "--data", str(small_faces.identities), "--out", str(out), "--adapter", str(tiny.adapter_v1),
            "--clip-vision", str(tiny.clip_vision), "--identity-cache", str(bgr_cache), "--config-dir",
            str(configs), "--cache-dir", str(base / "prompt_cache"), "--max-steps", "2",
            "--set", "learning_rate=1e-2", "--set", "ema_decay=0"]
    args += [part for key, value in TINY.items() for part in ("--set", f"{key}={json.dumps(value)}")]
    trainer = Trainer(train.config_from_args(train.build_parser().parse_args(args)))  # the loop without TensorBoard,
    for _ in range(2):                                                                 # which ComfyUI's venv lacks
        trainer.train_step([fixed_batch(trainer)])
    trainer.export_weights()
    shutil.copy(out / "restorerid-align.safetensors", models / "ridfr" / "restorerid-aligned.safetensors")
    (base / "custom_nodes").mkdir()
    os.symlink(REPO_ROOT, base / "custom_nodes" / "ridfr")
    os.symlink(REPO_ROOT / "tests" / "comfy_tiny_sd15.py", base / "custom_nodes" / "comfy_tiny_sd15.py")
    (base / "input").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (FACE, FACE, 3), dtype=np.uint8)).save(
        base / "input" / "lq_face.png")
    shutil.copy(sorted(small_faces.identities.rglob("*.png"))[0], base / "input" / "reference.png")
    host = ComfyServer(base)
    yield host
    host.stop()


def with_content(prompt: dict, name: str) -> dict:
    for node in prompt.values():
        if node["class_type"] == "LoadRIDFR":
            node["inputs"]["content_weights"] = name
    return prompt


def test_workflow_4_restores_with_the_alignment_trained_file(server):
    info = server.get("/object_info")["LoadRIDFR"]["input"]["required"]["content_weights"][1]["options"]
    assert "restorerid-aligned.safetensors" in info
    aligned = with_content(api_prompt(server, WORKFLOW), "restorerid-aligned.safetensors")
    first = saved_images(server, server.run(aligned))
    server.request("/free", {"unload_models": True, "free_memory": True})  # else the same prompt is served from cache
    again = saved_images(server, server.run(aligned))
    public = saved_images(server, server.run(with_content(api_prompt(server, WORKFLOW), RESTORERID_FILE)))
    assert len(first) == 1 and first[0].shape == (FACE, FACE, 3) and first[0].std() > 2
    np.testing.assert_array_equal(first[0], again[0])
    assert (first[0] != public[0]).any(), "the aligned weights restored exactly as the public ones"
