"""Tiny restoration models written in the published key layouts, for the pre-processing tests.

- DiffBIR's stage-1 SwinIR (what the paper pre-cleans with): pixel-unshuffle by 8, "nearest+conv" up by 8,
  so 1x overall; its first conv sits in ``nn.Sequential(PixelUnshuffle, Conv2d)``, hence ``conv_first.1.*``.
- The official SwinIR release layout (``{"params_ema": state}``, ``.pth``) with a 2x "pixelshuffle" head.
- Real-ESRGAN's compact model (SRVGGNetCompact, ``{"params": state}``, ``.pth``), which runs in float16.

The modules are SwinIR's own architecture (spandrel ships the reference implementation); only the sizes are
tiny. spandrel has to recognise them from their keys, as it does the real files.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

TINY = dict(img_size=32, patch_size=1, in_chans=3, embed_dim=12, depths=[2], num_heads=[2], window_size=8,
            mlp_ratio=2.0, resi_connection="1conv")


def tiny_swinir(upscale: int, upsampler: str, start_unshuffle: int = 1, seed: int = 0) -> torch.nn.Module:
    from spandrel.architectures.SwinIR import SwinIR

    torch.manual_seed(seed)
    return SwinIR(**TINY, upscale=upscale, upsampler=upsampler, start_unshuffle=start_unshuffle).eval()


def write_diffbir_swinir(path: Path, seed: int = 0) -> torch.nn.Module:
    """DiffBIR-style 1x SwinIR as ``.safetensors``; returns the module the file holds."""
    model = tiny_swinir(8, "nearest+conv", start_unshuffle=8, seed=seed)
    state = {(f"conv_first.1.{key[len('conv_first.'):]}" if key.startswith("conv_first.") else key): value
             for key, value in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in state.items()}, str(path))
    return model


def write_official_swinir_x2(path: Path, seed: int = 1) -> torch.nn.Module:
    """2x SwinIR in the official release format (``.pth`` holding ``{"params_ema": state}``)."""
    model = tiny_swinir(2, "pixelshuffle", seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"params_ema": model.state_dict()}, path)
    return model


def write_realesrgan_compact_x2(path: Path, seed: int = 2) -> torch.nn.Module:
    """2x Real-ESRGAN Compact in the release format (``.pth`` holding ``{"params": state}``)."""
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(seed)
    model = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"params": model.state_dict()}, path)
    return model
