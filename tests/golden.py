"""The publisher-made tiny RestorerID checkpoint (``../shared/restorerid-golden/RestorerIDFull-tiny.ckpt``):
every key name of the published ``RestorerIDFull.ckpt`` (SD1.5 UNet, VAE and text encoder in LDM layout, the LQ
branch, FaceID copies, the CLIP vision tower under ``Adapter.image_encoder.``), written by RestorerID's own
classes at tiny widths. ``GOLDEN_CONFIGS`` describe those widths (``make_tiny_ckpt.py``'s defaults)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from layouts import faceid_plus_state
from shared_data import SHARED
from tiny_models import SCHEDULER, write_configs

GOLDEN_CKPT = SHARED / "restorerid-golden" / "RestorerIDFull-tiny.ckpt"
PUBLISHER_OUTPUTS = SHARED / "restorerid-golden" / "publisher.pt"  # what RestorerID's code computed from it
SD15 = Path(__file__).resolve().parents[1] / "ridfr_core" / "configs" / "sd15"
CLIP_VISION_PREFIX = "Adapter.image_encoder."
GOLDEN_LORA_RANK = 8


def _sd15(name: str, **changes) -> dict:
    import json

    return {**json.loads((SD15 / f"{name}.json").read_text()), **changes}


GOLDEN_CONFIGS = {  # SD1.5's layer counts and heads, the widths of make_tiny_ckpt.py's defaults
    "unet": _sd15("unet", block_out_channels=[32, 64, 128, 128], cross_attention_dim=64, sample_size=16),
    "vae": _sd15("vae", block_out_channels=[32, 64, 128, 128]),
    "text_encoder": _sd15("text_encoder", hidden_size=64, intermediate_size=128, num_attention_heads=2,
                          projection_dim=64),
    "clip_vision": _sd15("clip_vision", hidden_size=32, intermediate_size=64, num_attention_heads=2, projection_dim=32),
    "scheduler": SCHEDULER,
}


@pytest.fixture(scope="session")
def golden_state() -> dict[str, torch.Tensor]:
    if not GOLDEN_CKPT.is_file():
        pytest.skip(f"publisher-made tiny RestorerID checkpoint not found at {GOLDEN_CKPT} (../shared absent)")
    return torch.load(GOLDEN_CKPT, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="session")
def golden_models_dir(golden_state, scripted_models_root, tmp_path_factory) -> Path:
    """A models folder with the golden checkpoint as RestorerID weights and as the SD1.5 base (no separate
    checkpoint), an fp16 FaceID Plus v1 ``.bin`` as h94 publishes it, the CLIP vision tower under the published
    transformers names, and the architecture configs in ``ridfr/configs`` (as the CLI reads them)."""
    root = tmp_path_factory.mktemp("golden_models")
    (root / "ridfr").mkdir()
    (root / "ridfr" / "RestorerIDFull.ckpt").symlink_to(GOLDEN_CKPT)
    write_configs(root / "ridfr" / "configs", GOLDEN_CONFIGS)
    adapter = faceid_plus_state(GOLDEN_CONFIGS["unet"], GOLDEN_CONFIGS["clip_vision"]["hidden_size"],
                                GOLDEN_LORA_RANK, seed=7)
    (root / "ipadapter").mkdir()
    torch.save({part: {k: v.half() for k, v in sd.items()} for part, sd in adapter.items()},
               root / "ipadapter" / "ip-adapter-faceid-plus_sd15.bin")
    (root / "clip_vision").mkdir()
    save_file({k[len(CLIP_VISION_PREFIX):]: v.contiguous() for k, v in golden_state.items()
               if k.startswith(CLIP_VISION_PREFIX)},
              str(root / "clip_vision" / "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"))
    (root / "insightface").symlink_to(scripted_models_root)
    return root
