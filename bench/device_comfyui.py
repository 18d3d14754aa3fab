"""The ComfyUI parts of ``device_check.py``: example workflows 1 (RIDFR) and 4 (RestorerID) on a real server.

The server is ComfyUI at ``COMFYUI_PATH`` (the tests' :class:`ComfyServer`, on the GPU unless tiny) with
``--base-directory`` a folder holding the pack (linked), random input images and a models folder in the
published layouts under the workflows' own names: full SD1.5 size written here (on the GPU the random
initialisation takes seconds), or the tests' tiny models (``tiny``). insightface is the tests' scripted
stand-in (no ArcFace weights can be had here): its detector finds one face in any reference image.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
WORKFLOWS = {1: REPO / "example_workflows" / "1_aligned_face_one_reference.json",
             4: REPO / "example_workflows" / "4_restorerid_public_weights.json"}
PACK = "antelopev2"  # the insightface folder name the tests' workflows use for their stand-in


def write_full_size_models(models: Path, device: str) -> None:
    """Every file of workflows 1 and 4 at full SD1.5 size in its published layout and dtype, random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    from bench_pipeline import restorerid_branch
    from layouts import faceid_plus_state, text_encoder_to_ldm, unet_to_ldm, vae_to_ldm
    from restorerid_layout import write_restorerid_checkpoint
    from ridfr_core.backends.ridfr.controlnet import ContentControlNet
    from ridfr_core.backends.ridfr.files import save_content
    from ridfr_core.weights.checkpoints import load_config

    def half(state):
        return {k: v.detach().half().contiguous().cpu() if v.is_floating_point() else v.cpu() for k, v in state.items()}

    unet_config, vae_config = load_config("unet"), load_config("vae")
    with torch.device(device):
        unet, vae = UNet2DConditionModel(**unet_config), AutoencoderKL(**vae_config)
        text = CLIPTextModel(CLIPTextConfig(**load_config("text_encoder")))
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**load_config("clip_vision")))
        content, branch = ContentControlNet.from_unet(unet), restorerid_branch(unet)
    for folder in ("checkpoints", "ridfr", "ipadapter", "clip_vision"):
        (models / folder).mkdir(parents=True, exist_ok=True)
    sd15 = {**unet_to_ldm(unet.state_dict(), unet_config), **vae_to_ldm(vae.state_dict(), vae_config),
            **text_encoder_to_ldm(text.state_dict())}
    save_file(half(sd15), str(models / "checkpoints" / "v1-5-pruned-emaonly-fp16.safetensors"))
    save_content(content.cpu(), models / "ridfr" / "ridfr-sd15.safetensors")
    write_restorerid_checkpoint(models / "ridfr" / "RestorerIDFull.ckpt", unet.cpu(), vae.cpu(), text.cpu(),
                                unet_config, vae_config, branch.cpu(), 1280, 128)
    adapter = {part: half(state) for part, state in faceid_plus_state(unet_config, 1280, 128, device=device).items()}
    for name in ("ip-adapter-faceid-plusv2_sd15.bin", "ip-adapter-faceid-plus_sd15.bin"):
        torch.save(adapter, models / "ipadapter" / name)
    save_file(half(clip.state_dict()), str(models / "clip_vision" / "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"))


def prepare_base(base: Path, tiny: bool, device: str) -> Path:
    """The server's base directory: models, the pack in custom_nodes, the workflows' input images."""
    from comfy_host import build_comfy_models
    from onnx_fakes import (SCRIPTED_ANCHOR, SCRIPTED_BBOX, build_projection_arcface, build_scripted_scrfd,
                            scripted_kps_offsets)

    if (base / "ready").is_file():
        return base
    pack = base / "insightface_pack" / PACK
    build_scripted_scrfd(pack / "det_10g.onnx", SCRIPTED_ANCHOR, SCRIPTED_BBOX, scripted_kps_offsets())
    build_projection_arcface(pack / "w600k_r50.onnx")
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    os.symlink(REPO, base / "custom_nodes" / "ridfr")
    if tiny:
        build_comfy_models(base / "models", pack)
        os.symlink(REPO / "tests" / "comfy_tiny_sd15.py", base / "custom_nodes" / "comfy_tiny_sd15.py")
    else:
        write_full_size_models(base / "models", device)
        (base / "models" / "insightface" / "models").mkdir(parents=True)
        os.symlink(pack, base / "models" / "insightface" / "models" / PACK, target_is_directory=True)
    (base / "input").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    size = 64 if tiny else 512
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(base / "input" / "lq_face.png")
    Image.fromarray(rng.integers(0, 256, (640, 640, 3), dtype=np.uint8)).save(base / "input" / "reference.png")
    (base / "ready").write_text("")
    return base


def prompt_for(server, number: int, tiny: bool) -> dict:
    """The workflow as an API prompt: tiny (the tests' names, 64 px faces, 2 steps) or as shipped."""
    from comfy_host import ui_to_api
    from comfy_workflows import api_prompt

    if tiny:
        return api_prompt(server, WORKFLOWS[number], steps=2)
    prompt = ui_to_api(json.loads(WORKFLOWS[number].read_text()), server.get("/object_info"))
    for node in prompt.values():
        if node["inputs"].get("insightface") == "buffalo_l":
            node["inputs"]["insightface"] = PACK
    return prompt


class PeakMemory:
    """The server's peak memory while a prompt runs: GPU memory in use (nvidia-smi, polled) on CUDA, else the
    process' own high-water mark."""

    def __init__(self, pid: int, cuda: bool):
        self.pid, self.cuda, self.peak, self.running = pid, cuda, 0.0, True
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()

    def read(self) -> float:
        if self.cuda:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout
            return float(out.split()[0]) / 1024
        with open(f"/proc/{self.pid}/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 2**20

    def poll(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.read())
            time.sleep(0.2)

    def stop(self) -> float:
        self.running = False
        self.thread.join()
        return max(self.peak, self.read())


def run_workflows(settings, base: Path, numbers: tuple[int, ...], extra_args: tuple[str, ...], label: str) -> list:
    from comfy_host import ComfyServer

    rows = []
    cuda = settings.device == "cuda"
    server = ComfyServer(base, extra_args, cpu=not cuda, ready_timeout=600)  # a busy CI machine starts it slowly
    try:
        for number in numbers:
            for run in ("first run (loading)", "second run"):
                row = {"part": "comfyui", "what": f"workflow {number}{label}", "batch": 1,
                       "dtype": "fp32" if not cuda else "ComfyUI default"}
                rows.append(row)
                if settings.out_of_time():
                    row["note"] = "skipped: out of time"
                    continue
                prompt = prompt_for(server, number, settings.tiny)
                if run == "second run":  # a changed seed: not served from ComfyUI's cache
                    for node in prompt.values():
                        if node["class_type"] == "RIDFRSample":
                            node["inputs"]["seed"] = 1
                memory = PeakMemory(server.process.pid, cuda)
                start = time.perf_counter()
                server.run(prompt, timeout=max(60.0, settings.budget_s))
                seconds = time.perf_counter() - start
                row.update(seconds_per_face=seconds, faces_per_s=1 / seconds, peak_gb=memory.stop(), note=run)
                print(f"  comfyui workflow {number}{label} {run}: {seconds:.2f}s", flush=True)
    finally:
        server.stop()
    return rows


def comfyui_rows(settings, workdir: Path, workflows: bool, reserve: bool) -> list[dict]:
    comfy = os.environ.get("COMFYUI_PATH")
    if not comfy or not (Path(comfy) / "main.py").is_file():
        return [{"part": "comfyui", "what": "workflows 1 and 4", "note": "skipped: COMFYUI_PATH is not a ComfyUI "
                                                                          "checkout"}]
    os.environ["RIDFR_CACHE"] = str(workdir / "ridfr_cache")
    base = prepare_base(workdir / ("tiny" if settings.tiny else "full"), settings.tiny, settings.device)
    rows = run_workflows(settings, base, (1, 4), (), "") if workflows else []
    if reserve:
        rows += run_workflows(settings, base, (4,), ("--reserve-vram", "4"), ", --reserve-vram 4")
    return rows
