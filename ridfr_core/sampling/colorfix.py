"""Wavelet colour fix: keep the restored face's detail and take its colours from the low-quality input.

Diffusion restorers drift in colour; RestorerID (after StableSR) ends every restoration by replacing the
low-frequency part of the output with that of the LQ input. The decomposition is the usual a-trous one:
five levels of a dilated 3x3 binomial blur.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WAVELET_LEVELS = 5


def wavelet_blur(image: torch.Tensor, dilation: int) -> torch.Tensor:
    """(B,C,H,W) blurred by the 3x3 binomial kernel with holes of ``dilation`` (replicate borders)."""
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=image.dtype, device=image.device)
    kernel = (kernel / 16).expand(image.shape[1], 1, 3, 3)
    padded = F.pad(image, (dilation,) * 4, mode="replicate")
    return F.conv2d(padded, kernel, groups=image.shape[1], dilation=dilation)


def wavelet_split(image: torch.Tensor, levels: int = WAVELET_LEVELS) -> tuple[torch.Tensor, torch.Tensor]:
    """(high frequencies, low frequencies); they sum back to ``image``."""
    high = torch.zeros_like(image)
    low = image
    for level in range(levels):
        blurred = wavelet_blur(low, 2 ** level)
        high = high + (low - blurred)
        low = blurred
    return high, low


def wavelet_color_fix(restored: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """Restored faces (B,3,H,W) in [0,1] with the LQ faces' low frequencies (resized to match)."""
    if lq.shape[-2:] != restored.shape[-2:]:
        lq = F.interpolate(lq, size=restored.shape[-2:], mode="bicubic", antialias=True)
    high, _ = wavelet_split(restored.float())
    _, low = wavelet_split(lq.to(restored.device).float())
    return (high + low).clamp(0, 1)
