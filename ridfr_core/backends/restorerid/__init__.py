"""RestorerID's content backend (Ying et al. 2024, public weights): frozen SD1.5 + FaceID Plus v1 with a trained
LQ branch (structure encoder, spade, IDBalance) that modulates 22 UNet ResBlocks. Its defaults reproduce the
publisher's inference: their DDIM plan (50 steps, eta 1), a VAE posterior sample, its prompts, CFG 4, BGR CLIP
crops, the wavelet colour fix on the unclamped decode, the adaptive identity scale, the checkpoint's own base."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ...weights.adapter_files import is_faceid_v2_file
from ...sampling.ldm_ddim import RESTORERID_DDIM
from ...weights.checkpoints import CheckpointError, read_state_dict
from ..interface import ContentBackend, TrainingRecipe
from .bundled import checkpoint_parts, clip_vision_from_checkpoint, identity_adapter_from_checkpoint
from .denoiser import RestorerIDDenoiser, check_branch_fits
from .files import (RESTORERID_FORMAT, WHAT, is_restorerid_state, load_lq_branch, missing_branch_parts,
                    save_lq_branch, source_name, without_restorerid_extras)
from .lq_branch import LQBranch
from .prompts import PROMPT_TOKENS, RESTORERID_NEGATIVE, RESTORERID_POSITIVE


# What each of RestorerID's two training stages trained (its train_RestorerID.py and ddpm.py): stage 1 the
# structure encoder and spade (how the LQ face shapes the UNet), stage 2 only IDBalance (how the LQ features and
# the FaceID tokens are balanced, with everything else frozen).
PARTS = {"encoder": "structure encoder (stage 1)", "spade": "spade modulation (stage 1)",
         "IDBalance": "IDBalance identity/LQ balance (stage 2)"}
# RestorerID's training (ddpm.py LatentDiffusionRestorerID): empty prompt, IPA_dropout / structcond_dropout 0.05
# (configs/v15/v15-RestorerID.yaml), ip_scale 0.75 fixed in p_losses (the MUSIQ-adaptive scale is inference only).
# Alignment Learning trains what balances identity against the LQ face: IDBalance.
RESTORERID_TRAINING = TrainingRecipe(prompt="", identity_dropout=0.05, content_dropout=0.05, identity_scale=0.75,
                                     parts=("IDBalance",))


def part_of(name: str) -> str:
    """``encoder.*`` -> encoder; ``modulations.<block>.spade.*`` -> spade; ``...IDBalance.*`` -> IDBalance."""
    return "encoder" if name.startswith("encoder.") else name.split(".")[2]


@dataclass(frozen=True)
class RestorerIDBackend(ContentBackend):
    def recognises_keys(self, keys: list[str]) -> bool:
        return is_restorerid_state(keys)

    def partial_file(self, keys: list[str]) -> str | None:
        return missing_branch_parts(keys)

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

    def bundled_parts(self, path: Path) -> set[str]:
        return checkpoint_parts(path)

    def bundled_adapter(self, path: Path, unet, state=None) -> tuple:
        return identity_adapter_from_checkpoint(read_state_dict(path, WHAT) if state is None else state, unet, path)

    def bundled_clip_vision(self, path: Path, config_dir=None, state=None) -> torch.nn.Module:
        return clip_vision_from_checkpoint(read_state_dict(path, WHAT) if state is None else state, path, config_dir)

    @torch.no_grad()
    def content_input(self, content, lq: torch.Tensor, vae, latent_hw: tuple[int, int], posterior_noise=None
                      ) -> torch.Tensor:
        """The LQ faces' scaled VAE latent, which the structure encoder reads at every step: ``mean + std * eps``
        with ``posterior_noise`` eps (a posterior sample, as RestorerID's ``get_first_stage_encoding``), else the
        mean."""
        param = next(vae.parameters())
        posterior = vae.encode(lq.to(param.device, param.dtype)).latent_dist
        latent = posterior.mode()
        if posterior_noise is not None:
            latent = latent + posterior.std * posterior_noise.to(latent.device, latent.dtype)
        return latent * vae.config.scaling_factor

    def faceid_shortcut(self, adapter: Path, shortcut: bool | None = None) -> bool:
        """RestorerID was trained with FaceID Plus v1 (no shortcut); its v2 file has other weights."""
        if shortcut or (shortcut is None and is_faceid_v2_file(adapter)):
            raise CheckpointError(f"'{adapter.name}' is IP-Adapter FaceID PlusV2 (in {adapter.parent}), but RestorerID "
                                  "was trained with v1: choose ip-adapter-faceid-plus_sd15.bin "
                                  "(https://huggingface.co/h94/IP-Adapter-FaceID) in models/ipadapter.")
        return False

    def base_file(self, content: Path) -> Path | None:
        """The publisher's checkpoint (it holds the SD1.5 base): the file itself, or the one our file was
        converted or fine-tuned from when it lies beside it."""
        source = content.parent / source_name(content)
        return source if source.is_file() and source.suffix != ".safetensors" else None

    def trainable_parameters(self, content, parts: tuple[str, ...] = ()) -> list[torch.nn.Parameter]:
        parts = tuple(parts) or self.training.parts
        unknown = [part for part in parts if part not in PARTS]
        if unknown:
            raise ValueError(f"train_parts: {', '.join(unknown)} is not a part of {self.label}; choose from "
                             + "; ".join(f"{name} ({what})" for name, what in PARTS.items()) + ".")
        return [param for name, param in content.named_parameters() if part_of(name) in parts]

    def enable_gradient_checkpointing(self, denoiser) -> None:
        denoiser.gradient_checkpointing = True

    def save_trained(self, content, path: Path, metadata: dict[str, str], init: Path | None = None) -> None:
        save_lq_branch(content, path, source_name(init) if init is not None else "", metadata)


RESTORERID = RestorerIDBackend(
    name="restorerid", label="RestorerID (LQ branch)", sampler=RESTORERID_DDIM, steps=50, guidance=4.0,
    positive_prompt=RESTORERID_POSITIVE, negative_prompt=RESTORERID_NEGATIVE, color_fix=True, identity_scale=0.75,
    file_format=RESTORERID_FORMAT, faceid_v2=False, ddim_eta=1.0, ddim_spacing="trailing", prompt_tokens=PROMPT_TOKENS,
    null_identity_tokens=True, clip_bgr=True, sample_posterior=True, color_fix_unclamped=True,
    training=RESTORERID_TRAINING)
