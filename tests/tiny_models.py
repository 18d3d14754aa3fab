"""Tiny RIDFR models with the real architectures, written to disk in the real file formats.

``tiny_models`` (session fixture) gives a folder laid out like ComfyUI's ``models/`` with:
an SD1.5-style single-file checkpoint in the LDM key layout (``checkpoints/tiny-sd15.safetensors``, fp16 as the
registry's SD1.5 file), the same as ``.ckpt`` (fp32), IP-Adapter FaceID PlusV2 as ``.bin`` (torch pickle of fp16
tensors, as h94 publishes them) and Plus as ``.safetensors``, a CLIP vision file in the transformers layout, RIDFR content weights in our format,
and the config set (``configs/``) that describes these small architectures.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

from layouts import faceid_plus_state, text_encoder_to_ldm, unet_to_ldm, vae_to_ldm

TINY_CONFIGS = {
    "unet": {
        "act_fn": "silu", "attention_head_dim": 2, "block_out_channels": [32, 64], "cross_attention_dim": 64,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
        "norm_num_groups": 8, "norm_eps": 1e-5, "sample_size": 8,
    },
    "vae": {
        "act_fn": "silu", "block_out_channels": [8, 8, 16, 16], "latent_channels": 4, "in_channels": 3,
        "out_channels": 3, "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 64, "scaling_factor": 0.18215,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    },
    "text_encoder": {
        "hidden_act": "quick_gelu", "hidden_size": 64, "intermediate_size": 37, "max_position_embeddings": 77,
        "num_attention_heads": 2, "num_hidden_layers": 2, "projection_dim": 32, "vocab_size": 49408,
    },
    "clip_vision": {
        "hidden_act": "gelu", "hidden_size": 48, "image_size": 224, "intermediate_size": 64,
        "num_attention_heads": 2, "num_hidden_layers": 2, "patch_size": 14, "projection_dim": 24,
    },
}
SCHEDULER = json.loads((Path(__file__).resolve().parents[1] / "ridfr_core/configs/sd15/scheduler.json").read_text())
LORA_RANK = 4


@dataclass
class TinyModels:
    root: Path          # ComfyUI-style models/ folder
    configs: Path       # config set for the tiny architectures
    checkpoint: Path    # LDM single file, .safetensors
    checkpoint_ckpt: Path | None  # the same as .ckpt (not in the ComfyUI variant)
    adapter_v2: Path    # ip-adapter-faceid-plusv2 layout, .bin
    adapter_v1: Path    # ip-adapter-faceid-plus layout, .safetensors (flat keys); ComfyUI variant: RestorerID's .bin
    clip_vision: Path
    content: Path       # RIDFR content weights (our format)
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel


def randomise(module: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    """Random weights everywhere, zero-initialised convs included, so every path carries signal; each value
    representable in float16, so the files stored in the published fp16 load back exactly."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(1 + std * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(std * torch.randn(param.shape, generator=generator))
            param.copy_(param.half())
    return module.eval()


def half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def write_configs(folder: Path, configs: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, config in configs.items():
        (folder / f"{name}.json").write_text(json.dumps(config))
    return folder


def build_tiny_models(root: Path, comfy: bool = False) -> TinyModels:
    """The tiny models in ``root``. ``comfy``: the ComfyUI variant (tests/comfy_host.py), with the two changes
    ComfyUI's fixed SD1.5 building blocks need: the UNet uses 32 GroupNorm groups (ComfyUI's
    ``normalization`` is GroupNorm(32)) and the VAE has the SD1.5 architecture (random weights, stored as
    fp16); its configs go to ``ridfr/configs``, where LoadRIDFR reads architectures other than SD1.5's."""
    from ridfr_core.weights.checkpoints import load_config
    from ridfr_core.backends.ridfr.controlnet import ContentControlNet
    from ridfr_core.backends.ridfr.files import save_content

    configs = {**TINY_CONFIGS, "scheduler": SCHEDULER}
    if comfy:
        configs["unet"] = {**TINY_CONFIGS["unet"], "norm_num_groups": 32}
    config_dir = write_configs(root / ("ridfr/configs" if comfy else "configs"), configs)
    vae_config = load_config("vae") if comfy else TINY_CONFIGS["vae"]
    torch.manual_seed(0)
    unet = randomise(UNet2DConditionModel(**configs["unet"]), 1)
    vae = randomise(AutoencoderKL(**vae_config), 2, std=0.03 if comfy else 0.1)
    text_encoder = randomise(CLIPTextModel(CLIPTextConfig(**TINY_CONFIGS["text_encoder"])), 3)
    clip_vision = randomise(CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CONFIGS["clip_vision"])), 4)

    # .safetensors in fp16 as the registry's v1-5-pruned-emaonly-fp16 (ComfyUI variant: only its VAE), .ckpt in fp32
    checkpoint = root / "checkpoints" / "tiny-sd15.safetensors"
    checkpoint.parent.mkdir(parents=True)
    vae_state = vae_to_ldm(vae.state_dict(), vae_config)
    ldm = {**unet_to_ldm(unet.state_dict(), configs["unet"]), **(half(vae_state) if comfy else vae_state),
           **text_encoder_to_ldm(text_encoder.state_dict())}
    ldm["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file({k: v.contiguous() for k, v in (ldm if comfy else half(ldm)).items()}, str(checkpoint))
    checkpoint_ckpt = None if comfy else checkpoint.with_suffix(".ckpt")
    if checkpoint_ckpt is not None:
        torch.save({"state_dict": ldm, "global_step": 1}, checkpoint_ckpt)

    adapter_dir = root / "ipadapter"
    adapter_dir.mkdir()
    adapter = faceid_plus_state(configs["unet"], TINY_CONFIGS["clip_vision"]["hidden_size"], LORA_RANK, seed=5)
    adapter = {part: half(sd) for part, sd in adapter.items()}  # h94's FaceID files are fp16
    adapter_v2 = adapter_dir / "ip-adapter-faceid-plusv2_sd15.bin"
    torch.save(adapter, adapter_v2)
    if comfy:  # RestorerID's FaceID Plus v1 under its real name (the same weights)
        adapter_v1 = adapter_dir / "ip-adapter-faceid-plus_sd15.bin"
        torch.save(adapter, adapter_v1)
    else:
        adapter_v1 = adapter_dir / "ip-adapter-faceid-plus_sd15.safetensors"
        save_file({f"{part}.{k}": v.contiguous() for part, sd in adapter.items() for k, v in sd.items()}, str(adapter_v1))

    clip_path = root / "clip_vision" / "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
    clip_path.parent.mkdir()
    save_file(clip_vision.state_dict(), str(clip_path))

    content_path = root / "ridfr" / "ridfr-tiny.safetensors"
    save_content(randomise(ContentControlNet.from_unet(unet), 6), content_path)
    return TinyModels(root, config_dir, checkpoint, checkpoint_ckpt, adapter_v2, adapter_v1, clip_path, content_path,
                      unet, vae, text_encoder)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    return build_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def ridfr_models_dir(tiny_models, scripted_models_root, tmp_path_factory) -> Path:
    """A ComfyUI-style models folder with one file per slot: tiny weights in the real formats and
    scripted insightface models (see conftest)."""
    root = tmp_path_factory.mktemp("ridfr_models")
    for folder in ("ridfr", "clip_vision"):
        (root / folder).symlink_to(tiny_models.root / folder)
    for folder, path in (("checkpoints", tiny_models.checkpoint), ("ipadapter", tiny_models.adapter_v2)):
        (root / folder).mkdir()
        (root / folder / path.name).symlink_to(path)
    (root / "insightface").symlink_to(scripted_models_root)
    return root
