"""The shipped example workflows on a real ComfyUI server with tiny models: a base directory holding
the models under the workflows' names (tiny stand-ins): only the public weights (RestorerID's checkpoint, FaceID
Plus v1, CLIP ViT-H, MUSIQ, insightface, SwinIR), or with RIDFR's own content weights and what they need beside
them (FaceID PlusV2, an SD1.5 checkpoint); the pack linked into ``custom_nodes``, the input photos (real faces
from ../shared), and each workflow as an API prompt with small faces and few steps."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from comfy_host import REPO_ROOT, build_comfy_models, ui_to_api
from tiny_upscale_models import write_diffbir_swinir

WORKFLOWS = sorted((REPO_ROOT / "example_workflows").glob("*.json"))
FACE = 64
# Real model names in the workflows -> the tiny test models; smaller faces and fewer steps for CPU.
# The public files (RestorerIDFull.ckpt, ip-adapter-faceid-plus_sd15.bin, CLIP ViT-H, MUSIQ) are there under their
# real names; Load RIDFR's 'auto' choices find them, and the insightface pack antelopev2.
MODEL_NAMES = {"face_swinir_v1.ckpt": "face_swinir_tiny.safetensors"}
RIDFR_CONTENT = "ridfr-tiny.safetensors"
NOT_PUBLIC = ("ridfr/" + RIDFR_CONTENT, "ipadapter/ip-adapter-faceid-plusv2_sd15.bin", "checkpoints")
INPUT_FILES = {"lq_face.png": None, "reference.png": "obama_obama.jpg", "group_photo.jpg": "group_two_people.jpg",
               "person_a.jpg": "obama_obama.jpg", "person_b.jpg": "biden_biden.jpg",
               "reference_1.jpg": "obama_obama.jpg", "reference_2.jpg": "obama_obama2.jpg",
               "reference_3.jpg": "obama_obama3.jpg"}


def write_musiq_weights(models: Path) -> None:
    """MUSIQ KonIQ in the published layout (seeded random values), where RestorerID's identity scale reads it."""
    import torch
    from test_musiq import random_state

    from ridfr_core.models.registry import MUSIQ_KONIQ

    (models / MUSIQ_KONIQ.folder).mkdir(parents=True, exist_ok=True)
    torch.save(random_state(), models / MUSIQ_KONIQ.relative)


def workflow_base(base: Path, yunet_models_root: Path, face_data: Path, ridfr_weights: bool = False) -> Path:
    """A ComfyUI base directory (``--base-directory``) in which every example workflow can run: with the public
    weights only, or (``ridfr_weights``) also with RIDFR content weights chosen in Load RIDFR."""
    build_comfy_models(base / "models", yunet_models_root / "models" / "antelopev2")
    if not ridfr_weights:
        for relative in NOT_PUBLIC:
            path = base / "models" / relative
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    write_musiq_weights(base / "models")
    write_diffbir_swinir(base / "models" / "upscale_models" / "face_swinir_tiny.safetensors")
    (base / "custom_nodes").mkdir()
    os.symlink(REPO_ROOT, base / "custom_nodes" / "ridfr")
    os.symlink(REPO_ROOT / "tests" / "comfy_tiny_sd15.py", base / "custom_nodes" / "comfy_tiny_sd15.py")
    (base / "input").mkdir()
    for name, source in INPUT_FILES.items():
        if source is None:
            lq = np.random.default_rng(0).integers(0, 255, (FACE, FACE, 3), dtype=np.uint8)
            Image.fromarray(lq).save(base / "input" / name)
        else:
            shutil.copy(face_data / "unaligned" / source, base / "input" / name)
    return base


def api_prompt(server, workflow: Path, steps: int = 3, content: str | None = None) -> dict:
    """The workflow with the tiny models' names, small faces and ``steps``; ``content``: Load RIDFR's content
    weights changed to this file (its one widget that picks the backend)."""
    prompt = ui_to_api(json.loads(workflow.read_text()), server.get("/object_info"))
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "LoadRIDFR" and content is not None:
            inputs["content_weights"] = content
        for key, value in inputs.items():
            if isinstance(value, str) and value in MODEL_NAMES:
                inputs[key] = MODEL_NAMES[value]
        if node["class_type"] == "ContentCondition":
            inputs["face_size"] = FACE
        if "steps" in inputs:
            inputs["steps"] = steps
        if "settings" in inputs:  # the widgets (the published settings in the workflows) with fewer steps
            inputs["settings"] = "custom"
    return prompt


def saved_images(server, entry: dict) -> list[np.ndarray]:
    images = []
    for output in entry["outputs"].values():
        for image in output.get("images", []):
            if image["type"] == "output":
                path = server.base / "output" / image["subfolder"] / image["filename"]
                images.append(np.asarray(Image.open(path).convert("RGB")))
    return images
