"""Every example workflow on a real ComfyUI server started with each weight-precision flag, as a user
starts it: fp8 and half precision store ComfyUI's UNet in that dtype and compute in its manual-cast dtype;
RIDFR's own modules must follow that compute dtype (never compute in float8)."""

from __future__ import annotations

import numpy as np
import pytest

from comfy_host import ComfyServer, requires_comfyui
from comfy_workflows import WORKFLOWS, api_prompt, saved_images, workflow_base

pytestmark = requires_comfyui
FLAGS = ("--fp8_e4m3fn-unet", "--fp8_e5m2-unet", "--fp16-unet", "--bf16-unet")


@pytest.fixture(scope="module", params=FLAGS)
def server(request, tmp_path_factory, yunet_models_root, face_data):
    host = ComfyServer(workflow_base(tmp_path_factory.mktemp("comfy_precision"), yunet_models_root, face_data),
                       extra_args=(request.param,))
    yield host
    host.stop()


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[path.stem for path in WORKFLOWS])
def test_example_workflow_runs_under_precision_flag(server, workflow):
    entry = server.run(api_prompt(server, workflow))
    images = saved_images(server, entry)
    assert images and all(image.std() > 2 for image in images), "blank output"
