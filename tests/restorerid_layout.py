"""Tiny RestorerID checkpoints in the published layout (a Lightning ``state_dict`` with original LDM keys).

The LQ branch is built with the reference structure's names (``structcond_stage_model.*``,
``model.diffusion_model.<block>.0.spade.*`` / ``.IDBalance.*``), next to the plain SD1.5 tensors, the
FaceID LoRA and K/V copies, a piece of the Adapter and the DDPM schedule buffers, as the released
``RestorerIDFull.ckpt`` holds them. ``test_restorerid.py`` checks the names and shapes at full size against
the layout derived from the publisher's code (``../shared/notes/restorerid-layout.json``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from layouts import faceid_plus_state, text_encoder_to_ldm, unet_to_ldm, vae_to_ldm
from tiny_models import LORA_RANK, TINY_CONFIGS

TINY_ENCODER = {  # EncoderUNetModelWT with model_channels 32, channel_mult (1, 2), one ResBlock per level
    "model_channels": 32, "emb_channels": 128, "middle_channels": 64, "out_channels": 32, "fea_tran": [32, 64],
    "input_blocks": [("conv", 4, 32), ("res", 32, 32), ("down", 32, 32), ("res+attn", 32, 64)],
}
TINY_HIDDEN = 16
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod")


def tiny_branch(unet: UNet2DConditionModel, seed: int, idbalance: bool = True):
    """An LQ branch for ``unet`` with random weights (IDBalance zero when ``idbalance`` is False)."""
    from ridfr_core.backends.restorerid.lq_branch import LQBranch
    from ridfr_core.backends.restorerid.denoiser import resnet_names

    modules = dict(unet.named_modules())
    blocks = {ldm: modules[path].conv2.out_channels for path, ldm in resnet_names(unet).items()}
    config = {"encoder": TINY_ENCODER, "blocks": blocks, "feature_channels": TINY_ENCODER["out_channels"],
              "hidden": TINY_HIDDEN, "context_dim": unet.config.cross_attention_dim}
    branch = LQBranch(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in branch.named_parameters():
            if "IDBalance" in name and not idbalance and "mlp_" in name:
                param.zero_()
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.05 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    return branch.eval()


def branch_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our LQ-branch keys -> RestorerID's checkpoint keys."""
    from ridfr_core.backends.restorerid.lq_branch import resblock_path

    out = {}
    for key, value in state.items():
        if key.startswith("encoder."):
            out["structcond_stage_model." + key[len("encoder."):]] = value
        else:
            _, block, rest = key.split(".", 2)
            out[f"model.diffusion_model.{resblock_path(block.replace('__', '.'))}.{rest}"] = value
    return out


def faceid_copies_in_ldm(unet_config: dict, clip_dim: int, rank: int) -> dict[str, torch.Tensor]:
    """The FaceID LoRA and K/V tensors as Combineckpt.py merges them into the UNet (a few of them suffice
    to exercise the key partition; they are ignored by the loader)."""
    ip = faceid_plus_state(unet_config, clip_dim, rank, seed=9)
    prefix = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0."
    out = {}
    for key, value in ip["ip_adapter"].items():
        index, rest = key.split(".", 1)
        attn = "attn1" if index == "0" else "attn2" if index == "1" else None
        if attn:
            out[f"{prefix}{attn}.{rest}"] = value
    out.update({f"Adapter.image_proj_model.{k}": v.half() for k, v in list(ip["image_proj"].items())[:4]})
    return out


def write_restorerid_checkpoint(path: Path, unet, vae, text_encoder, unet_config: dict, vae_config: dict,
                                branch, clip_dim: int, rank: int) -> Path:
    """A Lightning checkpoint (``torch.save`` of plain containers) with the whole RestorerID state dict."""
    state = {**unet_to_ldm(unet.state_dict(), unet_config), **vae_to_ldm(vae.state_dict(), vae_config),
             **text_encoder_to_ldm(text_encoder.state_dict()), **branch_to_ldm(branch.state_dict()),
             **faceid_copies_in_ldm(unet_config, clip_dim, rank)}
    state.pop("cond_stage_model.transformer.text_model.embeddings.position_ids", None)  # absent in RestorerID's
    state.update({name: torch.linspace(1e-4, 0.02, 1000) for name in SCHEDULE_BUFFERS})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.9.0", "state_dict": state,
                "callbacks": {"ModelCheckpoint": {"best_model_score": torch.tensor(0.1)}}, "optimizer_states": [],
                "lr_schedulers": []}, path)
    return path


@pytest.fixture(scope="session")
def restorerid_checkpoint(tiny_models, tmp_path_factory) -> Path:
    """``RestorerIDFull.ckpt`` for the tiny SD1.5 of ``tiny_models`` (same UNet, VAE and text encoder)."""
    branch = tiny_branch(tiny_models.unet, seed=11)
    path = tmp_path_factory.mktemp("restorerid") / "RestorerIDFull.ckpt"
    return write_restorerid_checkpoint(path, tiny_models.unet, tiny_models.vae, tiny_models.text_encoder,
                                       TINY_CONFIGS["unet"], TINY_CONFIGS["vae"], branch,
                                       TINY_CONFIGS["clip_vision"]["hidden_size"], LORA_RANK)


@pytest.fixture(scope="session")
def restorerid_models_dir(tiny_models, restorerid_checkpoint, scripted_models_root, tmp_path_factory) -> Path:
    """A models folder as a RestorerID user has it: RestorerIDFull.ckpt (no separate SD1.5), FaceID Plus v1,
    CLIP vision and insightface."""
    root = tmp_path_factory.mktemp("restorerid_models")
    for folder, path in (("ridfr", restorerid_checkpoint), ("ipadapter", tiny_models.adapter_v1)):
        (root / folder).mkdir()
        (root / folder / path.name).symlink_to(path)
    (root / "clip_vision").symlink_to(tiny_models.root / "clip_vision")
    (root / "insightface").symlink_to(scripted_models_root)
    return root
