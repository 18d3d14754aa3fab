"""Offline loading of every weight file RIDFR uses, with errors that say which file and what to do.

Nothing here touches a model hub: architectures come from the JSON files in ``configs/sd15`` (or a
``config_dir`` of the same shape, which is how the tests build tiny models), weights from local files.

- SD1.5 base: a single-file checkpoint (``.safetensors``; ``.ckpt`` read with ``weights_only=True``)
  in the original LDM key layout, or a diffusers folder. The text encoder is only used once, to
  compute the empty-prompt embedding that RIDFR always conditions on, which is cached on disk.
- Identity adapter: ``ip-adapter-faceid-plus(v2)_sd15`` ``.bin``/``.safetensors`` in the published
  layout (``image_proj`` + ``ip_adapter``, the latter with the FaceID LoRA).
- CLIP ViT-H/14 image encoder as ComfyUI users keep it (``models/clip_vision``, transformers layout).
- RIDFR content weights: one ``.safetensors`` whose metadata holds format, version and config.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                convert_ldm_vae_checkpoint)
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..io.atomic import atomic_path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "sd15"
LDM_UNET_PREFIX = "model.diffusion_model."
LDM_TEXT_PREFIX = "cond_stage_model.transformer."
CLIP_BOS, CLIP_EOS = 49406, 49407  # SD1.5's tokenizer pads with EOS
EMPTY_PROMPT = {"": []}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)  # what read_state_dict reads


class CheckpointError(ValueError):
    """A weight file that cannot be used, with the file and the fix in the message."""


def load_config(name: str, config_dir: Path | str | None = None) -> dict:
    path = Path(config_dir or CONFIG_DIR) / f"{name}.json"
    if not path.is_file():
        raise CheckpointError(f"architecture config {path} not found: a config folder holds unet.json, vae.json, "
                              "text_encoder.json, clip_vision.json and scheduler.json (see ridfr_core/configs/sd15).")
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------------
# Reading files


def read_state_dict(path: Path | str, what: str) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or a pickled torch file, read without running pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what}: file not found: {path}. Put the file there or pass the right path.")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        if path.suffix in PICKLE_SUFFIXES:
            check_pickle_container(path, what)
            # memory-mapped where the format allows: a multi-GB checkpoint of which a part is kept
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
            if not isinstance(state, dict):
                raise CheckpointError(f"{what}: {path} holds a {type(state).__name__}, not a dict of tensors.")
            return state
    except CheckpointError:
        raise
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower():
            raise CheckpointError(
                f"{what}: {path} holds Python objects besides tensors; loading it would run code from the file, "
                "which RIDFR never does. If you trust the file, open it once in a separate environment and save "
                f"its state_dict's tensors with safetensors.torch.save_file as {path.with_suffix('.safetensors')}, "
                "then use that file."
            ) from None
        raise CheckpointError(f"{what}: cannot read {path} ({err}). The file is truncated, corrupt or not a weight "
                              "file: download it again (compare its size with the source).") from err
    except (SafetensorError, zipfile.BadZipFile, EOFError, RuntimeError, OSError) as err:
        raise CheckpointError(
            f"{what}: cannot read {path} ({type(err).__name__}: {err}). The file is truncated, corrupt or not "
            "a weight file: download it again (compare its size with the source) or export it as .safetensors."
        ) from err
    raise CheckpointError(f"{what}: {path} has unknown extension '{path.suffix}'; use one of "
                          f"{', '.join(WEIGHT_SUFFIXES)}.")


def file_kind(path: Path) -> str:
    """What a weight file is by its first bytes, whatever its name: 'zip' (torch.save), 'pickle' (older
    torch.save), 'safetensors' (an 8-byte header length, then a JSON object) or 'other'."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:1] == b"\x80":  # pickle protocol 2 and later
        return "pickle"
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return "safetensors"
    return "other"


def check_pickle_container(path: Path, what: str) -> None:
    """A ``.ckpt/.pt/.pth/.bin`` is a torch file: a renamed safetensors or a text file is said to be what it is
    (torch's own messages would call it a pickle with Python objects, or an IndexError)."""
    kind = file_kind(path)
    if kind == "safetensors":
        described = read_safetensors_metadata(path, what).get("format")
        what_it_is = f"a safetensors file (format '{described}')" if described else "a safetensors file"
        raise CheckpointError(f"{what}: {path} is {what_it_is} with a '{path.suffix}' name; rename it to "
                              f"{path.with_suffix('.safetensors').name} and use that name.")
    if kind == "other":
        raise CheckpointError(f"{what}: {path} is no weight file: neither a PyTorch file nor safetensors (text, an "
                              "HTML error page saved under this name, or a corrupt download); give the model file "
                              "itself, or download it again.")


def read_safetensors_metadata(path: Path | str, what: str) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{what}: cannot read {path} ({err}); the file is truncated or not safetensors: "
                              "download or write it again.") from err


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path | str, metadata: dict[str, str]) -> None:
    """Write next to the target and rename, so a crash never leaves a half-written file in its place."""
    with atomic_path(path) as tmp:  # a failed or interrupted write leaves no weights-sized hidden file
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path | str, what: str,
                ignore: tuple[str, ...] = ()) -> None:
    """``load_state_dict`` that lists missing/unexpected keys and shape mismatches in one clear error."""
    expected = module.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(ignore)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        def show(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        parts = [f"{len(missing)} missing keys: {show(missing)}" if missing else "",
                 f"{len(unexpected)} unexpected keys: {show(unexpected)}" if unexpected else "",
                 "shape mismatch: " + show([f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
                                            for k in wrong]) if wrong else ""]
        raise CheckpointError(f"{what}: {path} does not match the expected architecture: "
                              + "; ".join(p for p in parts if p) + ". Check that it is the right file.")
    module.load_state_dict(state, strict=True, assign=True)


def cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Every floating parameter and buffer in ``dtype``. Files keep their own dtypes (h94's fp16 FaceID .bin,
    fp16 SD1.5 files) and ``assign=True`` loading keeps them, so a loaded module may hold several; compute needs
    one. Casts only when something differs (diffusers warns on every cast)."""
    if any(t.is_floating_point() and t.dtype != dtype for t in (*module.parameters(), *module.buffers())):
        module.to(dtype=dtype)
    return module


def on_meta(factory):
    from accelerate import init_empty_weights

    with init_empty_weights():
        return factory()


# ----------------------------------------------------------------------------------------------
# SD1.5 base


@dataclass
class BaseModel:
    """What RIDFR needs of Stable Diffusion 1.5: the UNet, the VAE and the text states of the prompts the
    backend conditions on (always the empty prompt, which RIDFR uses and the trainer trains with)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    prompts: dict[str, torch.Tensor]  # text -> (1, 77, cross_attention_dim)
    scheduler_config: dict

    @property
    def empty_prompt(self) -> torch.Tensor:
        return self.prompts[""]


def check_base_family(state: dict[str, torch.Tensor], path: Path, unet_config: dict) -> None:
    """Refuse SDXL, SD2 and inpainting checkpoints with a message that says what the file is."""
    what = "SD1.5 checkpoint"
    if any(k.startswith(("conditioner.", LDM_UNET_PREFIX + "label_emb.")) for k in state):
        raise CheckpointError(f"{what}: {path} is an SDXL checkpoint. RIDFR is built on Stable Diffusion 1.5: "
                              "choose an SD1.5 model (or an SD1.5 fine-tune).")
    if not any(k.startswith(LDM_UNET_PREFIX) for k in state):
        hint = ("it looks like a diffusers UNet file: pass the diffusers folder instead"
                if any(k.startswith("down_blocks.") for k in state) else "it has no UNet weights")
        raise CheckpointError(f"{what}: {path} is not a Stable Diffusion single-file checkpoint ({hint}).")
    context_key = LDM_UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    context_dim = state[context_key].shape[1] if context_key in state else None
    if context_dim is not None and context_dim != unet_config["cross_attention_dim"]:
        family = "an SD2.x" if context_dim == 1024 else f"a {context_dim}-d text-context"
        raise CheckpointError(f"{what}: {path} is {family} checkpoint; RIDFR needs Stable Diffusion 1.5 "
                              f"({unet_config['cross_attention_dim']}-d text context).")
    conv_in = state.get(LDM_UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] != unet_config["in_channels"]:
        raise CheckpointError(f"{what}: {path} has a {conv_in.shape[1]}-channel UNet input (an inpainting or "
                              "depth model); use a regular SD1.5 checkpoint.")


def load_base(path: Path | str, config_dir: Path | str | None = None, cache_dir: Path | str | None = None,
              dtype: torch.dtype = torch.float32, prompts: dict[str, list[int]] | None = None,
              sd15_part=None) -> BaseModel:
    """SD1.5 from a single file or a diffusers folder, with the text states of the empty prompt and of
    ``prompts`` ({text: CLIP token ids}, cached per file). ``sd15_part`` reduces a single-file checkpoint that
    holds more than SD1.5 (a RestorerID checkpoint) to its SD1.5 tensors."""
    path = Path(path)
    prompts = {**EMPTY_PROMPT, **(prompts or {})}
    base = (load_base_folder(path, config_dir, prompts) if path.is_dir()
            else load_base_single_file(path, config_dir, cache_dir, prompts, sd15_part))
    cast(base.unet, dtype)
    cast(base.vae, dtype)
    return base


def load_base_single_file(path: Path, config_dir=None, cache_dir=None, prompts: dict[str, list[int]] = EMPTY_PROMPT,
                          sd15_part=None) -> BaseModel:
    state = read_state_dict(path, "SD1.5 checkpoint")
    if sd15_part is not None:
        state = sd15_part(state)
    unet_config = load_config("unet", config_dir)
    check_base_family(state, path, unet_config)
    unet = on_meta(lambda: UNet2DConditionModel(**unet_config))
    load_strict(unet, convert_ldm_unet_checkpoint(state, unet_config), path, "SD1.5 checkpoint (UNet)")
    vae_config = load_config("vae", config_dir)
    vae = on_meta(lambda: AutoencoderKL(**vae_config))
    load_strict(vae, convert_ldm_vae_checkpoint(state, vae_config), path, "SD1.5 checkpoint (VAE)")
    states = cached_prompts(path, cache_dir, prompts,
                            lambda missing: prompts_from_state(state, path, missing, config_dir))
    return BaseModel(unet.eval(), vae.eval(), states, load_config("scheduler", config_dir))


def load_base_folder(path: Path, config_dir=None, prompts: dict[str, list[int]] = EMPTY_PROMPT) -> BaseModel:
    from transformers import CLIPTextModel

    for part in ("unet", "vae", "text_encoder"):
        if not (path / part / "config.json").is_file():
            raise CheckpointError(f"SD1.5 diffusers folder: {path / part / 'config.json'} is missing; a diffusers "
                                  "model folder has unet/, vae/ and text_encoder/ subfolders.")
    unet = UNet2DConditionModel.from_pretrained(path / "unet", local_files_only=True)
    expected = load_config("unet", config_dir)
    if unet.config.cross_attention_dim != expected["cross_attention_dim"]:
        raise CheckpointError(f"SD1.5 diffusers folder: {path} is not an SD1.5 model (cross_attention_dim "
                              f"{unet.config.cross_attention_dim}, SD1.5 has {expected['cross_attention_dim']}); "
                              "choose an SD1.5 model (or an SD1.5 fine-tune).")
    if unet.config.in_channels != expected["in_channels"]:
        raise CheckpointError(f"SD1.5 diffusers folder: {path} has a {unet.config.in_channels}-channel UNet input "
                              "(an inpainting or depth model); use a regular SD1.5 model.")
    vae = AutoencoderKL.from_pretrained(path / "vae", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True)
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    scheduler = (json.loads(scheduler_file.read_text()) if scheduler_file.is_file()
                 else load_config("scheduler", config_dir))
    return BaseModel(unet.eval(), vae.eval(), {text: encode_prompt(text_encoder, ids) for text, ids in prompts.items()}, scheduler)


def prompts_from_state(state: dict[str, torch.Tensor], path: Path, prompts: dict[str, list[int]],
                       config_dir=None) -> dict[str, torch.Tensor]:
    from transformers import CLIPTextConfig, CLIPTextModel

    text_state = convert_ldm_clip_checkpoint(state)
    if not text_state:
        raise CheckpointError(f"SD1.5 checkpoint: {path} has no text encoder ({LDM_TEXT_PREFIX}*); use a full "
                              "checkpoint, not a UNet-only or pruned-of-CLIP file.")
    text_encoder = on_meta(lambda: CLIPTextModel(CLIPTextConfig(**load_config("text_encoder", config_dir))))
    if not hasattr(text_encoder, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel (as diffusers does)
        text_state = {k.removeprefix("text_model."): v for k, v in text_state.items()}
    load_strict(text_encoder, text_state, path, "SD1.5 checkpoint (text encoder)",
                ignore=("text_model.embeddings.position_ids", "embeddings.position_ids"))
    cast(text_encoder, torch.float32)  # computed once and cached: in full precision whatever the file holds
    return {text: encode_prompt(text_encoder, ids) for text, ids in prompts.items()}


def token_ids(tokens: list[int], length: int = 77) -> torch.Tensor:
    """(1, length) CLIP input: BOS, a prompt's tokens, EOS, padded with EOS. The standalone core carries no
    tokenizer files (they would come from a hub); each backend lists the ids of its fixed prompts."""
    ids = [CLIP_BOS, *tokens, CLIP_EOS]
    return torch.tensor([ids + [CLIP_EOS] * (length - len(ids))])


@torch.no_grad()
def encode_prompt(text_encoder, tokens: list[int]) -> torch.Tensor:
    """CLIP's last hidden state (1, 77, C) of a prompt given as token ids."""
    ids = token_ids(tokens, text_encoder.config.max_position_embeddings)
    return text_encoder(input_ids=ids.to(text_encoder.device)).last_hidden_state.float().cpu()


def cache_key(path: Path) -> str:
    """A key that changes when the file does (path, size, modification time)."""
    stat = path.stat()
    return hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def cache_folder(cache_dir) -> Path:
    return Path(cache_dir or os.environ.get("RIDFR_CACHE") or Path.home() / ".cache" / "ridfr")


def cached_prompts(path: Path, cache_dir, prompts: dict[str, list[int]], compute) -> dict[str, torch.Tensor]:
    """Prompt states depend only on the checkpoint and the text: computed once, then read from the cache."""
    key, found = cache_key(path), {}
    files = {text: cache_folder(cache_dir) / f"prompt_{key}_{hashlib.sha1(text.encode()).hexdigest()[:8]}.safetensors"
             for text in prompts}
    for text, cached in files.items():
        try:
            found[text] = load_file(str(cached))["prompt"]
        except (SafetensorError, KeyError, OSError):
            pass  # absent or damaged: computed below
    missing = {text: ids for text, ids in prompts.items() if text not in found}
    if missing:
        for text, states in compute(missing).items():
            found[text] = states
            try:
                save_safetensors_atomic({"prompt": states}, files[text], {"source": str(path), "prompt": text})
            except OSError:
                pass  # a read-only cache only costs time
    return found


# ----------------------------------------------------------------------------------------------
# CLIP ViT-H/14 image encoder


def load_clip_vision(path: Path | str, config_dir=None):
    """CLIP ViT-H/14 (``CLIPVisionModelWithProjection`` layout, as ``models/clip_vision`` files are)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    path = Path(path)
    what = "CLIP vision"
    if path.is_dir():
        return CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True).eval()
    state = read_state_dict(path, what)
    if any(k.startswith("visual.transformer.") for k in state):
        raise CheckpointError(f"{what}: {path} is in open_clip layout; use the transformers-layout file "
                              "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors (h94/IP-Adapter models/image_encoder).")
    config = CLIPVisionConfig(**load_config("clip_vision", config_dir))
    model = on_meta(lambda: CLIPVisionModelWithProjection(config))
    width = state.get("vision_model.embeddings.class_embedding")
    if width is not None and width.shape[0] != config.hidden_size:
        raise CheckpointError(f"{what}: {path} is a {width.shape[0]}-wide CLIP (e.g. ViT-bigG or ViT-L); the "
                              f"FaceID Plus adapter needs ViT-H/14 ({config.hidden_size}-wide).")
    load_strict(model, state, path, what, ignore=("vision_model.embeddings.position_ids", "text_model.",
                                                  "text_projection.", "logit_scale"))
    return model.eval()
