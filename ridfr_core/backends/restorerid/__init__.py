"""RestorerID's content backend (Ying et al. 2024, public weights): frozen SD1.5 + FaceID Plus v1 with a trained
LQ branch (structure encoder, spade, IDBalance) that modulates 22 UNet ResBlocks; published settings DDIM 50
steps (eta 1), its prompts, CFG 4, wavelet colour fix, adaptive identity scale."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ...weights.adapter_files import is_faceid_v2_file
from ...weights.checkpoints import CheckpointError
from ..interface import ContentBackend
from .denoiser import RestorerIDDenoiser, check_branch_fits
from .files import RESTORERID_FORMAT, is_restorerid_state, load_lq_branch, without_restorerid_extras
from .lq_branch import LQBranch
from .prompts import PROMPT_TOKENS, RESTORERID_NEGATIVE, RESTORERID_POSITIVE


@dataclass(frozen=True)
class RestorerIDBackend(ContentBackend):
    def recognises_keys(self, keys: list[str]) -> bool:
        return is_restorerid_state(keys)

    def load(self, path: Path, cache_dir=None, state=None) -> LQBranch:
        return load_lq_branch(path, cache_dir, state)

    def sd15_part(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return without_restorerid_extras(state) if is_restorerid_state(state) else state

    def owns(self, content: torch.nn.Module) -> bool:
        return isinstance(content, LQBranch)

    def check_fits(self, content, unet, source: str) -> None:
        check_branch_fits(content, unet, source)

    def make_denoiser(self, unet, content, adapter=None) -> RestorerIDDenoiser:
        return RestorerIDDenoiser(unet, content, adapter)

    @torch.no_grad()
    def content_input(self, content, lq: torch.Tensor, vae, latent_hw: tuple[int, int]) -> torch.Tensor:
        """The LQ faces' VAE latent (scaled), which the structure encoder reads at every step."""
        param = next(vae.parameters())
        posterior = vae.encode(lq.to(param.device, param.dtype)).latent_dist
        return posterior.mode() * vae.config.scaling_factor

    def faceid_shortcut(self, adapter: Path, shortcut: bool | None = None) -> bool:
        """RestorerID was trained with FaceID Plus v1 (no shortcut); its v2 file has other weights."""
        if shortcut or (shortcut is None and is_faceid_v2_file(adapter)):
            raise CheckpointError(f"'{adapter.name}' is IP-Adapter FaceID PlusV2 (in {adapter.parent}), but RestorerID "
                                  "was trained with v1: choose ip-adapter-faceid-plus_sd15.bin "
                                  "(https://huggingface.co/h94/IP-Adapter-FaceID) in models/ipadapter.")
        return False


RESTORERID = RestorerIDBackend(
    name="restorerid", label="RestorerID (LQ branch)", sampler="ddim", steps=50, guidance=4.0,
    positive_prompt=RESTORERID_POSITIVE, negative_prompt=RESTORERID_NEGATIVE, color_fix=True, identity_scale=0.75,
    file_format=RESTORERID_FORMAT, faceid_v2=False, ddim_eta=1.0, ddim_spacing="trailing", prompt_tokens=PROMPT_TOKENS,
    null_identity_tokens=True, holds_base=True)
