"""Workflow 4 as shipped, in a real ComfyUI server (COMFYUI_PATH), on the publisher-made tiny RestorerID checkpoint
(``../shared/restorerid-golden``, the one the golden test proves the CLI against): every widget as shipped (the
checkpoint under its published name, 'auto' everywhere, 50 steps, seed 0) but the face size, which is the
checkpoint's own 128 px (the publisher's reference outputs are at 128 px; at 512 px the tiny UNet's attention over
4096 latent positions takes over 15 minutes per side on a 2-core CPU), and a node added that keeps RIDFR Sample's
image in float. It gives the CLI's image for the same seed, the base taken from the checkpoint on both sides and,
with MUSIQ weights there, the same per-face identity scale."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from comfy_host import REPO_ROOT, ComfyServer, requires_comfyui, ui_to_api
from comfy_workflows import write_musiq_weights
from golden import GOLDEN_CKPT, GOLDEN_CONFIGS
from tiny_models import write_configs

pytestmark = requires_comfyui
WORKFLOW = REPO_ROOT / "example_workflows" / "4_restorerid_public_weights.json"
REFERENCE = "obama_obama.jpg"
FACE_SIZE = 128  # the golden checkpoint's (see above)


@pytest.fixture(scope="module")
def golden_base(tmp_path_factory, golden_state, yunet_models_root, face_data):
    """A ComfyUI base directory holding only what workflow 4 names: the golden checkpoint as RestorerIDFull.ckpt
    (with its architecture in ridfr/configs), MUSIQ weights and insightface; its inputs: the publisher's LQ face
    and a real reference photo."""
    base = tmp_path_factory.mktemp("comfy_golden")
    models = base / "models"
    (models / "ridfr").mkdir(parents=True)
    (models / "ridfr" / "RestorerIDFull.ckpt").symlink_to(GOLDEN_CKPT)
    write_configs(models / "ridfr" / "configs", GOLDEN_CONFIGS)
    write_musiq_weights(models)
    (models / "insightface").symlink_to(yunet_models_root)
    (base / "custom_nodes").mkdir()
    os.symlink(REPO_ROOT, base / "custom_nodes" / "ridfr")
    for helper in ("comfy_tiny_sd15.py", "comfy_save_tensor.py"):
        os.symlink(REPO_ROOT / "tests" / helper, base / "custom_nodes" / helper)
    (base / "input").mkdir()
    lq = torch.load(GOLDEN_CKPT.parent / "inputs.pt", weights_only=True)["lq01"][0]
    Image.fromarray((lq.permute(1, 2, 0) * 255).round().byte().numpy()).save(base / "input" / "lq_face.png")
    Image.open(face_data / "unaligned" / REFERENCE).save(base / "input" / "reference.png")
    return base


def comfyui_image(base) -> tuple[torch.Tensor, str]:
    """(RIDFR Sample's restored face (1,S,S,3) in float, what Identity Condition showed) of workflow 4 as shipped."""
    server = ComfyServer(base)
    try:
        prompt = ui_to_api(json.loads(WORKFLOW.read_text()), server.get("/object_info"))
        sampler = next(key for key, node in prompt.items() if node["class_type"] == "RIDFRSample")
        identity = next(key for key, node in prompt.items() if node["class_type"] == "IdentityCondition")
        content = next(key for key, node in prompt.items() if node["class_type"] == "ContentCondition")
        prompt[content]["inputs"]["face_size"] = FACE_SIZE
        prompt["float_image"] = {"class_type": "SaveImageTensor", "inputs": {"images": [sampler, 0], "name": "restored"}}
        entry = server.run(prompt, timeout=900)
        return load_file(str(base / "output" / "restored.safetensors"))["images"], entry["outputs"][identity]["text"][0]
    finally:
        server.stop()


def cli_image(base) -> tuple[torch.Tensor, list[float]]:
    """(The CLI's restored face (1,S,S,3), its per-face identity scales) for the same files, defaults and seed."""
    from ridfr_core.faces import restore_aligned
    from ridfr_core.io.images import read_rgb
    from ridfr_core.restore import Restorer, architecture_dir, resolve_models

    models = base / "models"
    paths = resolve_models(models, {}, need_insightface=True)
    restorer = Restorer(paths, device="cpu", config_dir=architecture_dir(models), seed=0)
    identity = restorer.identity([read_rgb(base / "input" / "reference.png")])
    scales = []
    restored = restore_aligned([read_rgb(base / "input" / "lq_face.png")], restorer.restore_fn([identity], scales_used=scales),
                               face_size=FACE_SIZE)
    return restored.permute(0, 2, 3, 1), scales


def test_workflow_4_as_shipped_gives_the_cli_image(golden_base):
    comfy, shown = comfyui_image(golden_base)
    cli, scales = cli_image(golden_base)
    assert comfy.shape == cli.shape == (1, FACE_SIZE, FACE_SIZE, 3) and cli.std() > 0.01
    comfy_scales = [float(value) for value in re.findall(r"identity scale (\d+\.\d+)", shown)]
    assert comfy_scales == pytest.approx(scales, abs=1e-3), shown  # shown with 3 decimals, the CLI rounds to 4
    difference = (comfy - cli).abs().max()
    print(f"\nworkflow 4 in ComfyUI vs the CLI, publisher's tiny checkpoint: max abs difference {difference:.1e}")
    np.testing.assert_allclose(comfy.numpy(), cli.numpy(), atol=1e-4, rtol=0)
