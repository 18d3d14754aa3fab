"""Train RIDFR's content module: ``python -m ridfr_core.train --stage content|align ...``.

Two stages, as in the paper (Sec. 3.2, 3.3, 4.1):

- ``content``: the Content Injection Module (7-channel ControlNet) learns eps-prediction from the
  online-degraded LQ face, SD1.5 UNet and VAE frozen, no identity (Eq. 2).
- ``align``: Alignment Learning. The FaceID-Plus identity module (adapter + its LoRA, fused into
  the frozen UNet) is frozen at its published weights; the content module is finetuned with
  ``L = mean(L_diff(ID1), L_diff(ID2)) + align_weight * ||eps(ID1) - eps(ID2)||^2`` at the same noisy
  latent, timestep and noise (Eq. 4-6). Both eps come from one batched forward.

Every hyper-parameter is in a JSON config (``configs/train_content.json``, ``configs/train_align.json``
hold the paper's values; the learning rate, which the paper does not give, is 1e-5 as in ControlNet
and IP-Adapter training). Multi-GPU/multi-node and mixed precision come from accelerate::

    accelerate launch -m ridfr_core.train --stage content --data ffhq512/ --base sd15.safetensors --out runs/c

Checkpoints (``<out>/checkpoints/step-NNNNNNNN``) are written to a temporary folder and renamed, so
a kill leaves the previous one intact; a rerun with the same ``--out`` resumes from the newest intact
one with model, EMA, optimiser, LR schedule, loss scaler, RNG and data position restored. A new run
(``--resume none``) refuses a folder that holds one unless ``--overwrite`` (see :mod:`.run_folder`). The weights
users load (``<out>/ridfr-<stage>.safetensors``, RIDFR content format) are refreshed at each checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoints
from .atomic import fsync_folder, write_json_atomic
from .content import ContentControlNet, lq_to_latent_size
from .data import (AlignDataset, DataError, FaceDataset, IdentityGroup, NoiseSpec,
                   SkipReport, StepBatchSampler, exclude_small_identities, make_loader, sample_rng, scan_faces,
                   scan_identities, STREAM_VALIDATION)
from .degrade import DegradationConfig
from .identity_cache import IdentityCache, IdentityEncoder
from .pipeline import place
from .run_folder import (RunFolderError, check_new_run, checkpoint_problem, clear_previous_run, remove_leftovers,
                         require_writable)

logger = logging.getLogger("ridfr_core.train")

STAGES = ("content", "align")
CONFIG_DIR = Path(__file__).parent / "configs"
STATE_FORMAT = "ridfr-train-state"
STATE_VERSION = 1
CHECKPOINT_NAME = re.compile(r"^step-(\d{8})$")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
# The ID-photo variants belong to the cache, not to a run: a new training seed must not invalidate
# a cache that took hours to build.
IDENTITY_VARIANT_SEED = 0
# Options that may change between an interrupted run and its resume without changing the result
# (paths, when and how often to log/save, how many loader processes).
RESUMABLE_CHANGES = {"data", "base", "out", "adapter", "clip_vision", "insightface_root", "insightface_model_dir",
                     "identity_cache", "init_content", "config_dir", "cache_dir", "max_steps", "num_workers",
                     "gradient_accumulation_steps", "log_every", "checkpoint_every", "keep_checkpoints",
                     "validation_every", "validation_count", "validation_steps"}


class ConfigError(ValueError):
    """A training option that is missing or wrong, with the option's name and the fix."""


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    """Every training option. Defaults are the paper's stage-1 settings (see the stage JSON files)."""

    stage: str = "content"
    # Files and folders
    data: str | None = None              # content: folder of aligned faces; align: <data>/<identity>/*.jpg
    base: str | None = None              # SD1.5 single file or diffusers folder
    out: str | None = None               # run folder: checkpoints, logs, samples, exported weights
    adapter: str | None = None           # align: ip-adapter-faceid-plusv2_sd15.bin
    clip_vision: str | None = None       # align, to build the identity cache: CLIP ViT-H/14
    insightface_root: str | None = None  # align, to build the identity cache: folder with models/buffalo_l
    insightface_model_dir: str | None = None
    identity_cache: str | None = None    # align: default <out>/identity_cache; reuse one across runs
    init_content: str | None = None      # RIDFR content weights to start from (align: the content stage's)
    config_dir: str | None = None        # model architecture configs (default: ridfr_core/configs/sd15)
    cache_dir: str | None = None         # where the empty-prompt embedding is cached
    # Optimisation
    seed: int = 0
    resolution: int = 512
    batch_size: int = 8                  # total per optimiser step, over GPUs and accumulation
    gradient_accumulation_steps: int = 1
    max_steps: int = 87_500
    learning_rate: float = 1e-5
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.01
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    use_8bit_adam: bool = False
    mixed_precision: str = "fp16"
    gradient_checkpointing: bool = True
    ema_decay: float = 0.0               # 0 disables EMA; when on, exported weights are the EMA ones
    align_weight: float = 1.0            # lambda of Eq. 6
    # Data
    min_image_size: int = 128
    min_images_per_identity: int = 3
    identity_variants: int = 4
    identity_min_size: int = 64
    identity_max_size: int = 512
    degradation: dict = field(default_factory=lambda: DegradationConfig().to_dict())
    num_workers: int = 4
    # Logging and saving
    log_every: int = 10
    checkpoint_every: int = 2500
    keep_checkpoints: int = 2
    validation_every: int = 2500
    validation_count: int = 4
    validation_steps: int = 20

    @classmethod
    def fields(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, values: dict, source: str) -> "TrainConfig":
        config = cls()
        for key, value in values.items():
            config.set(key, value, source)
        return config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def set(self, key: str, value, source: str) -> None:
        """Set one option (``degradation.<name>`` for a degradation range), converting JSON types."""
        name, _, sub = key.partition(".")
        known = self.fields()
        if name not in known or name.startswith("_"):
            close = difflib.get_close_matches(name, known, n=1)
            raise ConfigError(f"{source}: unknown option '{key}'" + (f"; did you mean '{close[0]}'?" if close else "")
                              + " (see ridfr_core/configs/train_content.json for every option).")
        if name == "degradation":
            merged = dict(self.degradation)
            if sub:
                merged[sub] = value
            elif isinstance(value, dict):
                merged.update(value)
            else:
                raise ConfigError(f"{source}: degradation must be an object of ranges, got {value!r}.")
            try:
                DegradationConfig.from_dict(merged)
            except (TypeError, ValueError) as error:
                raise ConfigError(f"{source}: {error}") from None
            self.degradation = merged
            return
        if sub:
            raise ConfigError(f"{source}: '{key}': option '{name}' has no sub-options.")
        default = known[name].default
        setattr(self, name, coerce(name, value, default, source))

    def validate(self) -> None:
        def need(condition, message):
            if not condition:
                raise ConfigError(message)

        need(self.stage in STAGES, f"stage: {self.stage!r} is not one of {list(STAGES)}.")
        for name, flag in (("data", "--data"), ("base", "--base"), ("out", "--out")):
            need(getattr(self, name), f"{name}: not set; pass {flag} PATH (or set it in the config file).")
        if self.stage == "align":
            need(self.adapter, "adapter: stage 'align' needs the frozen identity module; pass --adapter "
                               "ip-adapter-faceid-plusv2_sd15.bin.")
        for name in ("resolution", "batch_size", "gradient_accumulation_steps", "max_steps", "identity_variants",
                     "identity_min_size", "validation_steps", "min_image_size", "keep_checkpoints"):
            need(getattr(self, name) >= 1, f"{name}: must be >= 1, got {getattr(self, name)}.")
        for name in ("lr_warmup_steps", "num_workers", "log_every", "checkpoint_every",
                     "validation_every", "validation_count", "max_grad_norm", "align_weight", "adam_weight_decay"):
            need(getattr(self, name) >= 0, f"{name}: must be >= 0, got {getattr(self, name)}.")
        need(self.resolution % 8 == 0, f"resolution: {self.resolution} is not a multiple of 8 (the VAE's factor).")
        need(self.learning_rate > 0, f"learning_rate: must be > 0, got {self.learning_rate}.")
        need(0 <= self.ema_decay < 1, f"ema_decay: {self.ema_decay} must be in [0, 1) (0 turns EMA off).")
        need(self.mixed_precision in MIXED_PRECISIONS,
             f"mixed_precision: {self.mixed_precision!r} is not one of {list(MIXED_PRECISIONS)}.")
        need(self.lr_scheduler in LR_SCHEDULERS, f"lr_scheduler: {self.lr_scheduler!r} is not one of {list(LR_SCHEDULERS)}.")
        need(self.min_images_per_identity >= 2,
             f"min_images_per_identity: {self.min_images_per_identity}; align needs a target and at least one other "
             "photo of the person (2), and 3 for two different ID photos.")
        need(self.identity_min_size <= self.identity_max_size,
             f"identity_min_size ({self.identity_min_size}) is larger than identity_max_size ({self.identity_max_size}).")


def coerce(name: str, value, default, source: str):
    """JSON value -> the option's type; ints are accepted for floats, strings for paths."""
    kind = type(default)
    if default is None:
        if value is None or isinstance(value, str):
            return value
        return str(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif isinstance(value, kind):
        return value
    raise ConfigError(f"{source}: {name}={value!r} should be a {kind.__name__} (default {default!r}).")


def parse_set(assignment: str):
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. --set learning_rate=2e-5.")
    key, raw = assignment.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # bare strings: --set mixed_precision=bf16
    return key.strip(), value


def read_config_file(path: Path) -> dict:
    try:
        values = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"--config: {path} does not exist.") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"--config: {path} is not valid JSON ({error}).") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config: {path} must hold a JSON object of options.")
    values.pop("_comment", None)
    return values


PATH_FLAGS = {
    "data": "content: folder of aligned 512 px faces; align: <data>/<identity>/<photo>.jpg",
    "base": "SD1.5 checkpoint (single file) or diffusers folder",
    "out": "run folder (checkpoints, logs, samples, ridfr-<stage>.safetensors); rerun to resume",
    "adapter": "align: ip-adapter-faceid-plusv2_sd15.bin (frozen identity module)",
    "clip_vision": "align, to build the identity cache: CLIP ViT-H/14 image encoder",
    "insightface_root": "align, to build the identity cache: folder holding models/buffalo_l",
    "insightface_model_dir": "align, to build the identity cache: the buffalo_l folder itself",
    "identity_cache": "align: identity feature cache folder (default <out>/identity_cache)",
    "init_content": "RIDFR content weights to start from (align: the content stage's output)",
    "config_dir": "model architecture configs (default ridfr_core/configs/sd15)",
    "cache_dir": "where the empty-prompt embedding is cached",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ridfr_core.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=STAGES, help="which stage to train (default: the config's)")
    parser.add_argument("--config", type=Path, help="JSON options (default: ridfr_core/configs/train_<stage>.json)")
    for name, help_text in PATH_FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, metavar="PATH", help=help_text)
    parser.add_argument("--max-steps", type=int, help="shortcut for --set max_steps=N")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any option; VALUE is JSON (e.g. --set degradation.blur_sigma=[0.1,10])")
    parser.add_argument("--resume", default="auto",
                        help="'auto' (newest intact checkpoint in --out, if any), 'none' (a new run), or a "
                             "checkpoint folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="with --resume none: delete the run already in --out (its checkpoints, samples, logs "
                             "and weights) instead of refusing")
    parser.add_argument("--prepare-only", action="store_true",
                        help="scan the data and build the identity cache, then exit")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    stage = args.stage
    values = {}
    if args.config is not None:
        values = read_config_file(args.config)
        stage = stage or values.get("stage")
    if stage is None:
        raise ConfigError("stage: not set; pass --stage content or --stage align.")
    if args.config is None:
        values = read_config_file(CONFIG_DIR / f"train_{stage}.json")
    config = TrainConfig.from_dict(values, str(args.config or CONFIG_DIR / f"train_{stage}.json"))
    config.stage = stage
    for assignment in args.overrides:
        key, value = parse_set(assignment)
        config.set(key, value, f"--set {assignment}")
    for name in PATH_FLAGS:
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    if args.max_steps is not None:
        config.max_steps = args.max_steps
    config.validate()
    return config


# ----------------------------------------------------------------------------------------------
# Data


@dataclass
class PreparedData:
    """Scanned (and, for align, cached) training images, before the model-dependent noise spec."""

    root: Path
    report: SkipReport
    paths: list[Path] = field(default_factory=list)
    groups: list[IdentityGroup] = field(default_factory=list)
    cache: IdentityCache | None = None

    @property
    def image_count(self) -> int:
        return len(self.paths) or sum(len(group.paths) for group in self.groups)


def prepare_data(config: TrainConfig, accelerator) -> PreparedData:
    root = Path(config.data)
    if config.stage == "content":
        paths, report = scan_faces(root, config.min_image_size)
        prepared = PreparedData(root, report, paths=paths)
    else:
        groups, report = scan_identities(root, config.min_image_size, config.min_images_per_identity)
        cache = prepare_identity_cache(config, root, groups, accelerator)
        scanned = {p.relative_to(root).as_posix() for g in groups for p in g.paths}
        report.unreadable += [(key, why) for key, why in cache.unreadable.items() if key in scanned]
        groups = [IdentityGroup(g.name, [p for p in g.paths if p.relative_to(root).as_posix() in cache.entries])
                  for g in groups]
        groups = exclude_small_identities(groups, config.min_images_per_identity, report)
        if not groups:
            raise DataError(f"data: no identity in {root} has min_images_per_identity={config.min_images_per_identity}"
                            f" readable images ({report.summary(config.min_image_size, config.min_images_per_identity)}).")
        prepared = PreparedData(root, report, groups=groups, cache=cache)
    if not accelerator.is_main_process:
        return prepared
    summary = report.summary(config.min_image_size, config.min_images_per_identity)
    if summary:
        logger.warning("Data: %s. Full list: %s", summary, Path(config.out) / "data_report.json")
    write_json_atomic(Path(config.out) / "data_report.json",
                      {"images": prepared.image_count, "identities": len(prepared.groups), **report.to_dict()})
    logger.info("Data: %d training images%s in %s.", prepared.image_count,
                f" of {len(prepared.groups)} identities" if prepared.groups else "", root)
    return prepared


def prepare_identity_cache(config: TrainConfig, root: Path, groups: list[IdentityGroup], accelerator) -> IdentityCache:
    """Open the cache, computing the missing photos on the main process (the others wait and reread)."""
    folder = Path(config.identity_cache or Path(config.out) / "identity_cache")
    settings = dict(variants=config.identity_variants, min_size=config.identity_min_size,
                    max_size=config.identity_max_size, seed=IDENTITY_VARIANT_SEED)
    cache = IdentityCache(folder)
    cache.check_settings(**settings)
    paths = [path for group in groups for path in group.paths]
    missing = cache.missing(root, paths)
    if missing and accelerator.is_main_process:
        encoder = make_identity_encoder(config, accelerator.device, folder, len(missing), missing[0])
        from tqdm.auto import tqdm

        with tqdm(total=len(missing), desc="identity cache", unit="photo") as bar:
            cache.build(root, paths, encoder, progress=bar.update, **settings)
    accelerator.wait_for_everyone()
    return IdentityCache(folder)


def make_identity_encoder(config: TrainConfig, device, folder: Path, missing: int, example: Path) -> IdentityEncoder:
    if not config.clip_vision or not (config.insightface_root or config.insightface_model_dir):
        raise ConfigError(
            f"identity_cache: {folder} lacks the features of {missing} photo(s) (e.g. {example}). Computing them needs "
            "--clip-vision (CLIP ViT-H/14) and --insightface-root (folder with models/buffalo_l) or "
            "--insightface-model-dir; or pass --identity-cache with a cache built elsewhere for this data.")
    from .faces import load_face_analyzer

    analyzer = load_face_analyzer(models_root=config.insightface_root, model_dir=config.insightface_model_dir)
    clip_vision = checkpoints.load_clip_vision(config.clip_vision, config.config_dir).to(device)
    description = {"arcface": Path(analyzer.recognizer.model_file).name, "clip_vision": Path(config.clip_vision).name}
    return IdentityEncoder(analyzer, clip_vision, description)


# ----------------------------------------------------------------------------------------------
# Training state files


def optimizer_to_files(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimiser state -> (tensors for safetensors, everything else as JSON)."""
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for param_id, values in state["state"].items():
        entry = meta["state"][str(param_id)] = {}
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                name = f"{param_id}.{key}"
                tensors[name] = value
                entry[key] = {"tensor": name}
            else:
                entry[key] = value
    return tensors, meta


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {int(param_id): {key: tensors[value["tensor"]] if isinstance(value, dict) and "tensor" in value else value
                             for key, value in values.items()}
             for param_id, values in meta["state"].items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Global RNG states of this process. The training loop draws nothing from them (every sample's
    randomness is derived from the seed and its number), but library code may: restoring them keeps
    a resume exact anyway."""
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state()
    tensors = {"torch_cpu": torch.get_rng_state(), "numpy_keys": torch.from_numpy(numpy_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = state
    meta = {"python": [version, list(internal), gauss], "numpy": [numpy_state[0], int(numpy_state[2]),
                                                                   int(numpy_state[3]), float(numpy_state[4])]}
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, position, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[f"torch_cuda_{i}"] for i in range(torch.cuda.device_count()) if f"torch_cuda_{i}" in tensors]
    if cuda and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)



def complete_checkpoints(folder: Path) -> list[Path]:
    """Finished checkpoint folders, oldest first (a half-written one is still named .step-*.partial)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if CHECKPOINT_NAME.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.match(p.name).group(1)))


# ----------------------------------------------------------------------------------------------
# The trainer


def make_accelerator(config: TrainConfig):
    from accelerate import Accelerator

    has_gpu = torch.cuda.is_available() or torch.backends.mps.is_available() or (
        hasattr(torch, "xpu") and torch.xpu.is_available())
    if config.mixed_precision != "no" and not has_gpu:
        # CPU autocast leaves GroupNorm alone, so the bf16 UNet would get the fp32 content residuals and fail.
        raise ConfigError(f"mixed_precision: '{config.mixed_precision}' needs a GPU; on CPU use "
                          "--set mixed_precision=no.")
    return Accelerator(mixed_precision=config.mixed_precision, project_dir=config.out)


class Trainer:
    """One training run: models, data, optimiser and state, built from a validated :class:`TrainConfig`."""

    def __init__(self, config: TrainConfig, accelerator=None):
        self.config = config
        self.accelerator = accelerator or make_accelerator(config)
        self.out = Path(config.out)
        self.checkpoint_folder = self.out / "checkpoints"
        self.device = self.accelerator.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.accelerator.mixed_precision,
                                                                                torch.float32)
        self.step = 0
        self.skipped_at_load = 0
        self.writer = None  # TensorBoard, main process only, opened by run()
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.load_models()
        self.data = prepare_data(config, self.accelerator)
        self.dataset = self.make_dataset()
        self.make_optimiser()

    # -- setup
    def load_models(self) -> None:
        from diffusers import DDPMScheduler

        c = self.config
        base = checkpoints.load_base(c.base, c.config_dir, c.cache_dir)
        self.scheduler_config = base.scheduler_config
        self.noise_scheduler = DDPMScheduler.from_config(base.scheduler_config)
        if self.noise_scheduler.config.prediction_type != "epsilon":
            raise ConfigError(f"base: {c.base} has prediction_type={self.noise_scheduler.config.prediction_type!r}; "
                              "RIDFR trains eps-prediction on Stable Diffusion 1.5 (prediction_type 'epsilon').")
        # The content module starts from the plain UNet (stage 1 never sees the FaceID LoRA).
        content = checkpoints.load_content(c.init_content) if c.init_content else ContentControlNet.from_unet(base.unet)
        if c.stage == "align" and not c.init_content:
            logger.warning("init_content is not set: alignment starts from a fresh content module. The paper "
                           "finetunes the weights of stage 'content' (pass --init-content <out>/ridfr-content.safetensors).")
        self.adapter = None
        if c.stage == "align":
            self.adapter, lora = checkpoints.load_identity_adapter(c.adapter, base.unet)
            checkpoints.apply_weight_deltas(base.unet, lora, 1.0)
            place(self.adapter, self.device, self.weight_dtype).requires_grad_(False).eval()
        self.unet = place(base.unet, self.device, self.weight_dtype).requires_grad_(False).eval()
        self.vae = place(base.vae, self.device, self.weight_dtype).requires_grad_(False).eval()
        self.empty_prompt = base.empty_prompt.to(self.device)
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        content = place(content, self.device, torch.float32).requires_grad_(True).train()
        if c.gradient_checkpointing:
            content.enable_gradient_checkpointing()
            self.unet.enable_gradient_checkpointing()  # gradients flow through the frozen UNet to the residuals
        self.ema = copy.deepcopy(content).requires_grad_(False).eval() if c.ema_decay > 0 else None
        self.content = content

    def make_dataset(self) -> FaceDataset:
        c = self.config
        noise = NoiseSpec(self.unet.config.in_channels, c.resolution // self.vae_factor,
                          self.noise_scheduler.config.num_train_timesteps)
        degradation = DegradationConfig.from_dict(c.degradation)
        if c.stage == "content":
            return FaceDataset(self.data.paths, c.resolution, degradation, noise, c.seed)
        return AlignDataset(self.data.groups, self.data.cache, self.data.root, c.resolution, degradation, noise, c.seed)

    def make_optimiser(self) -> None:
        from diffusers.optimization import get_scheduler

        c = self.config
        optimiser_class = torch.optim.AdamW
        if c.use_8bit_adam:
            try:
                import bitsandbytes
            except ImportError:
                raise ConfigError("use_8bit_adam: bitsandbytes is not installed; pip install bitsandbytes (CUDA "
                                  "GPUs), or set use_8bit_adam=false.") from None
            optimiser_class = bitsandbytes.optim.AdamW8bit
        optimiser = optimiser_class(self.content.parameters(), lr=c.learning_rate, betas=(c.adam_beta1, c.adam_beta2),
                                    weight_decay=c.adam_weight_decay, eps=c.adam_epsilon)
        # Stepped once per optimiser step by us (not accelerate, which would step it once per process).
        self.lr_scheduler = get_scheduler(c.lr_scheduler, optimiser, num_warmup_steps=c.lr_warmup_steps,
                                          num_training_steps=c.max_steps)
        self.model, self.optimiser = self.accelerator.prepare(self.content, optimiser)
        from .pipeline import RIDFRDenoiser

        self.denoiser = RIDFRDenoiser(self.unet, self.model, self.adapter)

    # -- losses
    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """Eq. 2 (content) or Eq. 6 (align) for one micro-batch from the data loader."""
        device, dtype = self.device, self.weight_dtype
        with torch.no_grad():
            posterior = self.vae.encode(batch["target"].to(device, dtype)).latent_dist
            latents = posterior.mean + posterior.std * batch["posterior_noise"].to(device, posterior.mean.dtype)
            latents = latents.float() * self.vae.config.scaling_factor
        noise = batch["noise"].to(device)
        timesteps = batch["timestep"].to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        lq = lq_to_latent_size(batch["lq"].to(device), noisy.shape[-2:])  # once, not once per ID reference
        text = self.empty_prompt.expand(noisy.shape[0], -1, -1)
        if self.config.stage == "content":
            eps = self.denoiser(noisy, timesteps, text, lq).float()
            diffusion = F.mse_loss(eps, noise)
            return {"loss": diffusion, "diffusion": diffusion}
        from .identity import Identity

        with torch.no_grad():
            identity = Identity(torch.cat([batch["id1_embed"], batch["id2_embed"]]).to(device),
                                torch.cat([batch["id1_clip"], batch["id2_clip"]]).to(device).float())
            id_tokens = self.adapter.identity_tokens(identity)
        twice = lambda x: torch.cat([x, x])  # noqa: E731 - one forward for both references
        eps_id1, eps_id2 = self.denoiser(twice(noisy), twice(timesteps), twice(text), twice(lq), id_tokens).float().chunk(2)
        diffusion = (F.mse_loss(eps_id1, noise) + F.mse_loss(eps_id2, noise)) / 2
        align = F.mse_loss(eps_id1, eps_id2)
        return {"loss": diffusion + self.config.align_weight * align, "diffusion": diffusion, "align": align}

    def train_step(self, micro_batches: list[dict]) -> dict[str, float]:
        """One optimiser step over ``gradient_accumulation_steps`` micro-batches; returns local mean losses."""
        totals: dict[str, torch.Tensor] = {}
        count = len(micro_batches)
        for index, batch in enumerate(micro_batches):
            last = index == count - 1
            with nullcontext() if last else self.accelerator.no_sync(self.model):
                with self.accelerator.autocast():
                    losses = self.compute_losses(batch)
                self.accelerator.backward(losses["loss"] / count)
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + value.detach() / count
            self.skipped_at_load += int(batch["skipped"].sum())
        if self.config.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        self.optimiser.step()
        if not self.optimiser.step_was_skipped:  # fp16 loss scaler found inf/NaN gradients: no step taken
            self.lr_scheduler.step()
        self.optimiser.zero_grad(set_to_none=True)
        if self.ema is not None:
            with torch.no_grad():
                for shadow, param in zip(self.ema.parameters(), self.content.parameters()):
                    shadow.lerp_(param, 1.0 - self.config.ema_decay)
        self.step += 1
        return dict(zip(totals, torch.stack(list(totals.values())).tolist()))  # one device sync per step

    # -- checkpoints
    def save_checkpoint(self) -> Path:
        """Write the full training state to a temporary folder, then rename it into place."""
        acc = self.accelerator
        final = self.checkpoint_folder / f"step-{self.step:08d}"
        partial = self.checkpoint_folder / f".step-{self.step:08d}.partial"
        try:
            self.write_partial_checkpoint(partial)
            if acc.is_main_process:
                fsync_folder(partial)
                if final.exists():
                    shutil.rmtree(final)
                os.rename(partial, final)
        except BaseException:  # failed or killed (SIGTERM, Ctrl-C): no weights-sized half checkpoint stays behind
            if acc.is_main_process:
                shutil.rmtree(partial, ignore_errors=True)
            raise
        if acc.is_main_process:
            fsync_folder(self.checkpoint_folder)
            for old in complete_checkpoints(self.checkpoint_folder)[:-max(self.config.keep_checkpoints, 1)]:
                shutil.rmtree(old, ignore_errors=True)
            self.export_weights()
        acc.wait_for_everyone()
        return final

    def write_partial_checkpoint(self, partial: Path) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        acc.wait_for_everyone()
        tensors, meta = rng_state()
        checkpoints.save_safetensors_atomic(tensors, partial / f"rng-{acc.process_index}.safetensors", {})
        write_json_atomic(partial / f"rng-{acc.process_index}.json", meta)
        acc.wait_for_everyone()
        if acc.is_main_process:
            save = checkpoints.save_safetensors_atomic
            save(self.content.state_dict(), partial / "content.safetensors", {})
            if self.ema is not None:
                save(self.ema.state_dict(), partial / "ema.safetensors", {})
            tensors, meta = optimizer_to_files(self.optimiser.state_dict())
            save(tensors, partial / "optimizer.safetensors", {})
            write_json_atomic(partial / "optimizer.json", meta)
            write_json_atomic(partial / "lr_scheduler.json", self.lr_scheduler.state_dict())
            write_json_atomic(partial / "config.json", self.config.to_dict())
            scaler = acc.scaler.state_dict() if acc.scaler is not None else None
            write_json_atomic(partial / "state.json", {"format": STATE_FORMAT, "version": STATE_VERSION,
                                                       "step": self.step, "skipped_at_load": self.skipped_at_load,
                                                       "grad_scaler": scaler})

    def find_resume(self, resume: str) -> Path | None:
        if resume == "none":
            return None
        if resume == "auto":
            problems = []
            for folder in reversed(complete_checkpoints(self.checkpoint_folder)):
                problem = checkpoint_problem(folder)
                if problem is None:
                    if problems:
                        logger.warning("Damaged checkpoint(s) skipped: %s.", "; ".join(problems))
                    return folder
                problems.append(f"{folder.name}: {problem}")
            if problems:
                raise ConfigError(f"--resume auto: no intact checkpoint in {self.checkpoint_folder} "
                                  f"({'; '.join(problems)}). Pass --resume none --overwrite to start again.")
            return None
        path = Path(resume)
        if not (path / "state.json").is_file():
            raise ConfigError(f"--resume: {path} is not a finished checkpoint folder (no state.json); pass a "
                              f"{self.checkpoint_folder}/step-NNNNNNNN folder, 'auto' or 'none'.")
        problem = checkpoint_problem(path)
        if problem is not None:
            raise ConfigError(f"--resume: {path} is damaged ({problem}); pass an intact checkpoint folder or 'auto'.")
        return path

    def load_checkpoint(self, folder: Path) -> None:
        def load_file(path: str) -> dict[str, torch.Tensor]:
            return checkpoints.read_state_dict(path, f"--resume {folder}")

        state = json.loads((folder / "state.json").read_text())
        if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise ConfigError(f"--resume: {folder} is not a RIDFR training checkpoint of version {STATE_VERSION}.")
        saved = json.loads((folder / "config.json").read_text())
        current = self.config.to_dict()
        changed = sorted(k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k])
        if changed:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
            raise ConfigError(f"--resume: {folder} was trained with other settings ({details}). Resume with the same "
                              "options, or start a new run (--out elsewhere, or --resume none).")
        if self.config.lr_scheduler in ("linear", "cosine") and saved.get("max_steps") != self.config.max_steps:
            raise ConfigError(f"max_steps: {folder} was trained with max_steps={saved.get('max_steps')} and "
                              f"lr_scheduler={self.config.lr_scheduler!r}, whose learning rate depends on max_steps; "
                              f"resume with --max-steps {saved.get('max_steps')}, or start a new run.")
        self.content.load_state_dict(load_file(str(folder / "content.safetensors")))
        if self.ema is not None:
            self.ema.load_state_dict(load_file(str(folder / "ema.safetensors")))
        tensors = load_file(str(folder / "optimizer.safetensors"))
        self.optimiser.load_state_dict(optimizer_from_files(tensors, json.loads((folder / "optimizer.json").read_text())))
        self.lr_scheduler.load_state_dict(json.loads((folder / "lr_scheduler.json").read_text()))
        if self.accelerator.scaler is not None and state.get("grad_scaler"):
            self.accelerator.scaler.load_state_dict(state["grad_scaler"])
        rank = self.accelerator.process_index
        if (folder / f"rng-{rank}.json").is_file():
            restore_rng(load_file(str(folder / f"rng-{rank}.safetensors")),
                        json.loads((folder / f"rng-{rank}.json").read_text()))
        self.step, self.skipped_at_load = state["step"], state["skipped_at_load"]
        logger.info("Resumed from %s at step %d.", folder, self.step)

    def exported_path(self) -> Path:
        return self.out / f"ridfr-{self.config.stage}.safetensors"

    def export_weights(self) -> None:
        """The RIDFR content file LoadRIDFR reads (EMA weights when EMA is on)."""
        module = self.ema if self.ema is not None else self.content
        c = self.config
        checkpoints.save_content(module, self.exported_path(), {
            "stage": c.stage, "step": str(self.step), "ema": str(self.ema is not None),
            "base": Path(c.base).name, "adapter": Path(c.adapter).name if c.adapter else "",
            "trainer": "ridfr_core.train"})

    # -- validation
    def validation_batch(self) -> dict:
        samples = [self.dataset_validation_sample(i) for i in range(self.config.validation_count)]
        return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}

    def dataset_validation_sample(self, number: int) -> dict:
        """Fixed samples spread over the data, with their own fixed degradation and ID photos."""
        from .data import read_face

        dataset = self.dataset
        index = number * len(dataset) // max(self.config.validation_count, 1)
        image = read_face(dataset.paths[index], self.config.resolution)
        return dataset.make_sample(image, index, sample_rng(self.config.seed, STREAM_VALIDATION, number))

    @torch.no_grad()
    def validate(self) -> None:
        """Restore the fixed validation LQs; write ``samples/step-N.png`` (LQ | restored | target rows)."""
        if self.config.validation_count == 0 or not self.accelerator.is_main_process:
            return
        from PIL import Image

        from .identity import Identity
        from .pipeline import PipelineModules, RIDFRPipeline

        if not hasattr(self, "_validation"):
            self._validation = self.validation_batch()
        batch = self._validation
        # The trained module's forward carries accelerate's autocast + fp32-output wrapper: its fp32
        # residuals would meet the fp16 UNet outside autocast. Sample with a plain copy, as users do.
        source = self.ema if self.ema is not None else self.content
        content = place(self.accelerator.unwrap_model(copy.deepcopy(source), keep_fp32_wrapper=False), self.device,
                        self.weight_dtype)
        models = PipelineModules(self.unet, self.vae, content, self.empty_prompt, self.scheduler_config, self.adapter)
        pipeline = RIDFRPipeline(models, self.device, dtype=self.weight_dtype)
        identity = None
        if self.adapter is not None:
            identity = Identity(batch["id1_embed"], batch["id1_clip"].float())
        lq = (batch["lq"] + 1) / 2
        restored = pipeline(lq.to(self.device), identity, steps=self.config.validation_steps, seed=self.config.seed)
        rows = torch.cat([lq, restored.float().cpu(), (batch["target"] + 1) / 2], dim=3)  # side by side
        grid = torch.cat(list(rows), dim=1).clamp(0, 1)
        path = self.out / "samples" / f"step-{self.step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
        if self.writer is not None:
            self.writer.add_image("validation/lq_restored_target", grid, self.step)
        del pipeline, content

    # -- the loop
    def run(self, resume: str = "auto", overwrite: bool = False) -> Path:
        """Train to max_steps; ``overwrite`` (with ``resume='none'``) first deletes the run already in ``out``."""
        c, acc = self.config, self.accelerator
        if acc.is_main_process:
            remove_leftovers(self.out)
            if overwrite:
                clear_previous_run(self.out, c.stage)
        acc.wait_for_everyone()
        folder = self.find_resume(resume)
        if folder is not None:
            self.load_checkpoint(folder)
        if acc.is_main_process:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "logs" / c.stage))
        if self.step >= c.max_steps:
            logger.info("Already at step %d of max_steps=%d; nothing to train.", self.step, c.max_steps)
            if acc.is_main_process:
                self.export_weights()
            return self.exported_path()
        sampler = StepBatchSampler(c.batch_size, c.gradient_accumulation_steps, acc.num_processes, acc.process_index,
                                   self.step, c.max_steps)
        batches = iter(make_loader(self.dataset, sampler, c.num_workers, self.device.type == "cuda"))
        from tqdm.auto import tqdm

        bar = tqdm(total=c.max_steps, initial=self.step, desc=f"RIDFR {c.stage}", unit="step",
                   disable=not acc.is_main_process, dynamic_ncols=True)
        window_start, window_steps = time.perf_counter(), 0
        while self.step < c.max_steps:
            losses = self.train_step([next(batches) for _ in range(c.gradient_accumulation_steps)])
            window_steps += 1
            if not all(math.isfinite(v) for v in losses.values()):
                raise FloatingPointError(f"step {self.step}: loss is {losses}; lower learning_rate, use "
                                         "mixed_precision=bf16/no, or check --init-content and --base for NaN "
                                         "weights. The last checkpoint is intact.")
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in losses.items()} | {"lr": f"{self.lr_scheduler.get_last_lr()[0]:.1e}"})
            if c.log_every and self.step % c.log_every == 0:
                elapsed = time.perf_counter() - window_start
                self.log(losses, window_steps * c.batch_size / max(elapsed, 1e-9))
                window_start, window_steps = time.perf_counter(), 0
            if c.checkpoint_every and self.step % c.checkpoint_every == 0:
                self.save_checkpoint()
            if c.validation_every and self.step % c.validation_every == 0:
                self.validate()
        bar.close()
        if not (c.checkpoint_every and self.step % c.checkpoint_every == 0):
            self.save_checkpoint()
        if not (c.validation_every and self.step % c.validation_every == 0):
            self.validate()
        if self.writer is not None:
            self.writer.close()
        return self.exported_path()

    def log(self, losses: dict[str, float], samples_per_second: float) -> None:
        reduced = {k: self.accelerator.reduce(torch.tensor(v, device=self.device), "mean").item()
                   for k, v in losses.items()}
        if self.writer is None:
            return
        for key, value in reduced.items():
            self.writer.add_scalar(f"train/{key}", value, self.step)
        self.writer.add_scalar("train/lr", self.lr_scheduler.get_last_lr()[0], self.step)
        self.writer.add_scalar("train/samples_per_second", samples_per_second, self.step)
        self.writer.add_scalar("data/skipped_at_load", self.skipped_at_load, self.step)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        require_writable(Path(config.out))
        if args.prepare_only:
            accelerator = make_accelerator(config)
            prepared = prepare_data(config, accelerator)
            print(f"{prepared.image_count} usable images; report in {Path(config.out) / 'data_report.json'}")
            return 0
        check_new_run(Path(config.out), config.stage, args.resume, args.overwrite, config.init_content)
        path = Trainer(config).run(args.resume, args.overwrite)
    except (ConfigError, DataError, checkpoints.CheckpointError, RunFolderError, FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # e.g. the disk filled up or --out became unwritable during the run
        print(f"error: {error}. Fix that and rerun: the run resumes from its last checkpoint.", file=sys.stderr)
        return 2
    print(f"RIDFR content weights: {path}")
    return 0


def stop_on_sigterm(signum, frame):
    """``kill``: unwind like Ctrl-C, so half-written files are removed on the way out."""
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    sys.exit(main())
