"""IP-Adapter FaceID Plus / PlusV2 files (the identity module RIDFR keeps frozen): the image projection and
the decoupled attention weights as an :class:`~ridfr_core.identity.adapter.IdentityAdapter`, and the FaceID LoRA as
dense weight deltas for the UNet."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from .checkpoints import CheckpointError, cast, load_strict, read_state_dict
from ..identity.adapter import IdentityAdapter, identity_processor_slots

FACEID_LORA_KEY = re.compile(r"^(\d+)\.to_(q|k|v|out)_lora\.(down|up)\.weight$")


def is_faceid_v2_file(path: Path | str) -> bool:
    """FaceID Plus v1 and v2 files are laid out identically; the published names tell them apart (``...plusv2...``),
    as in the IP-Adapter pack."""
    return "v2" in Path(path).name.lower()


def split_ip_adapter_state(state: dict[str, torch.Tensor], path: Path) -> tuple[dict, dict]:
    """``{"image_proj": ..., "ip_adapter": ...}`` (.bin) or flat ``image_proj.*``/``ip_adapter.*`` (.safetensors)."""
    if "image_proj" in state and "ip_adapter" in state:
        return state["image_proj"], state["ip_adapter"]
    image_proj = {k[len("image_proj."):]: v for k, v in state.items() if k.startswith("image_proj.")}
    ip_adapter = {k[len("ip_adapter."):]: v for k, v in state.items() if k.startswith("ip_adapter.")}
    if not image_proj or not ip_adapter:
        raise CheckpointError(f"IP-Adapter: {path} has no image_proj/ip_adapter weights; it is not an IP-Adapter "
                              "file. Use ip-adapter-faceid-plusv2_sd15.bin (or plus_sd15) in models/ipadapter.")
    return image_proj, ip_adapter


def describe_ip_adapter(image_proj: dict) -> str:
    if "perceiver_resampler.proj_in.weight" in image_proj:
        return "faceid-plus"
    if "latents" in image_proj:
        return "IP-Adapter Plus (CLIP image only, no face ID)"
    if "norm.weight" in image_proj and "proj.0.weight" in image_proj:
        return "IP-Adapter FaceID (without Plus)"
    return "plain IP-Adapter (CLIP image only, no face ID)"


def load_identity_adapter(path: Path | str, unet: UNet2DConditionModel, shortcut: bool | None = None
                          ) -> tuple[IdentityAdapter, dict[str, torch.Tensor]]:
    """The frozen identity module, and the FaceID LoRA as UNet weight deltas (``{param name: delta}``).

    ``shortcut`` (the v2 design) is not visible in the weights, which are laid out identically for
    v1 and v2; by default it follows the published file name (``...plusv2...``), like the IP-Adapter pack.
    """
    path = Path(path)
    image_proj_state, attn_state = split_ip_adapter_state(read_state_dict(path, "IP-Adapter FaceID Plus"), path)
    if shortcut is None:
        shortcut = is_faceid_v2_file(path)
    return identity_adapter_from_state(image_proj_state, attn_state, unet, path, shortcut)


def identity_adapter_from_state(image_proj_state: dict, attn_state: dict, unet: UNet2DConditionModel,
                                path: Path, shortcut: bool) -> tuple[IdentityAdapter, dict[str, torch.Tensor]]:
    """Map the published ``image_proj`` / ``ip_adapter`` keys onto diffusers modules, checking every key."""
    what = "IP-Adapter FaceID Plus"
    kind = describe_ip_adapter(image_proj_state)
    if kind != "faceid-plus":
        raise CheckpointError(f"{what}: {path} is a {kind} model. RIDFR's identity module is IP-Adapter FaceID "
                              "Plus: use ip-adapter-faceid-plusv2_sd15.bin (or ip-adapter-faceid-plus_sd15.bin).")
    try:
        image_proj = unet._convert_ip_adapter_image_proj_to_diffusers(image_proj_state, low_cpu_mem_usage=False)
    except (RuntimeError, KeyError) as err:
        raise CheckpointError(f"{what}: {path}: the image projection does not match FaceID Plus ({err}).") from err
    if image_proj.proj_out.out_features != unet.config.cross_attention_dim:
        raise CheckpointError(f"{what}: {path} makes {image_proj.proj_out.out_features}-d tokens but the UNet "
                              f"takes {unet.config.cross_attention_dim}-d: this adapter is for another base "
                              "model (SDXL adapters are '..._sdxl'); use the _sd15 file.")

    lora = {k: v for k, v in attn_state.items() if FACEID_LORA_KEY.match(k)}
    ip_state = {k: v for k, v in attn_state.items() if k not in lora}
    processors, expected = {}, set()
    for index, name, processor in identity_processor_slots(unet):
        key_state = {"to_k_ip.0.weight": ip_state.get(f"{index}.to_k_ip.weight"),
                     "to_v_ip.0.weight": ip_state.get(f"{index}.to_v_ip.weight")}
        expected |= {f"{index}.to_k_ip.weight", f"{index}.to_v_ip.weight"}
        if any(v is None for v in key_state.values()):
            raise CheckpointError(f"{what}: {path} lacks '{index}.to_k_ip.weight'/'{index}.to_v_ip.weight' for "
                                  f"{name}: the file is incomplete or made for a different UNet.")
        load_strict(processor, key_state, path, f"{what} ({name})")
        processors[name] = processor
    unexpected = sorted(set(ip_state) - expected)
    if unexpected:
        raise CheckpointError(f"{what}: {path} has {len(unexpected)} unexpected keys ({', '.join(unexpected[:5])}); "
                              "it was made for a different UNet layout.")
    # one dtype: h94's .bin files are fp16, which the K/V loaded with assign=True keep, beside the fp32 projection
    adapter = cast(IdentityAdapter(image_proj.eval(), processors, shortcut=shortcut), torch.float32)
    return adapter.requires_grad_(False), faceid_lora(lora, unet, path)


def faceid_lora(lora: dict[str, torch.Tensor], unet: UNet2DConditionModel, path: Path) -> dict:
    """The published LoRA (rank 128, on every attention's q/k/v/out) as ``{UNet weight name: (up, down)}``: kept
    low-rank (ComfyUI patches it as a LoRA; :func:`fuse_lora` adds ``up @ down`` where a UNet is owned)."""
    names = list(unet.attn_processors)
    params = dict(unet.named_parameters())
    factors = {}
    for key in lora:
        index, proj, part = FACEID_LORA_KEY.match(key).groups()
        if part != "down":
            continue
        if int(index) >= len(names):
            raise CheckpointError(f"IP-Adapter FaceID Plus: {path} has LoRA '{key}' for attention #{index}, but the "
                                  f"UNet has {len(names)}; the file is for a different UNet.")
        up = lora.get(key.replace(".down.", ".up."))
        if up is None:
            raise CheckpointError(f"IP-Adapter FaceID Plus: {path} has '{key}' without its '.up.' half; the file "
                                  "is incomplete: download it again.")
        attn = names[int(index)].removesuffix(".processor")
        target = f"{attn}.to_out.0.weight" if proj == "out" else f"{attn}.to_{proj}.weight"
        down = lora[key]
        shape = (up.shape[0], down.shape[1])
        if up.shape[1] != down.shape[0] or shape != tuple(params[target].shape):
            raise CheckpointError(f"IP-Adapter FaceID Plus: {path}: LoRA '{key}' makes a {shape} delta for "
                                  f"{target} {tuple(params[target].shape)}; the file is for a different base model: "
                                  "use the _sd15 file.")
        factors[target] = (up.float(), down.float())
    return factors


def fuse_lora(module: torch.nn.Module, lora: dict[str, tuple[torch.Tensor, torch.Tensor]], strength: float = 1.0) -> None:
    """Add ``strength * up @ down`` to named parameters in place (the FaceID LoRA on a UNet the caller owns)."""
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, (up, down) in lora.items():
            params[name].add_((up @ down).to(params[name]), alpha=strength)
