"""The training options: :class:`TrainConfig` (defaults in code, a stage's config file, ``--set`` and the flags on top),
their checks and the command line."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..backends import BACKENDS, file_backend
from ..data.degrade import DegradationConfig


STAGES = ("content", "align")
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
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


@dataclass
class TrainConfig:
    """Every training option. Defaults are the paper's stage-1 settings (see the stage JSON files)."""

    stage: str = "content"
    backend: str = "ridfr"               # the content backend trained (default: the --init file's)
    train_parts: str = ""                # comma-separated parts of the content module to train ("" = backend's)
    # Files and folders
    data: str | None = None              # content: folder of aligned faces; align: <data>/<identity>/*.jpg
    base: str | None = None              # SD1.5 single file or diffusers folder
    out: str | None = None               # run folder: checkpoints, logs, samples, exported weights
    adapter: str | None = None           # align: the FaceID Plus file the backend was trained with
    clip_vision: str | None = None       # align: CLIP ViT-H/14 (identity cache; the null identity if the backend uses it)
    insightface_root: str | None = None  # align, to build the identity cache: folder with models/buffalo_l
    insightface_model_dir: str | None = None
    identity_cache: str | None = None    # align: default <out>/identity_cache; reuse one across runs
    init_content: str | None = None      # content weights to start from (--init; align: the content stage's)
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

    def parts(self) -> tuple[str, ...]:
        return tuple(part.strip() for part in self.train_parts.split(",") if part.strip())

    @property
    def weights_name(self) -> str:
        """The file users load, refreshed at each checkpoint: ``<backend>-<stage>.safetensors``."""
        return f"{self.backend}-{self.stage}.safetensors"

    def set(self, key: str, value, source: str) -> None:
        """Set one option (``degradation.<name>`` for a degradation range), converting JSON types."""
        name, _, sub = key.partition(".")
        known = self.fields()
        if name not in known or name.startswith("_"):
            close = difflib.get_close_matches(name, known, n=1)
            raise ConfigError(f"{source}: unknown option '{key}'" + (f"; did you mean '{close[0]}'?" if close else "")
                              + " (python -m ridfr_core.train --help lists every option).")
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
        need(self.backend in BACKENDS, f"backend: {self.backend!r} is not one of {list(BACKENDS)}.")
        backend = BACKENDS[self.backend]
        need(self.stage == "align" or not backend.null_identity_tokens,
             f"stage: {backend.label} reads identity tokens for every face, so it is fine-tuned with --stage align "
             "(from its published weights, --init FILE).")
        try:
            backend.trainable_parameters(torch.nn.Module(), self.parts())
        except ValueError as error:
            raise ConfigError(str(error)) from None
        for name, flag in (("data", "--data"), ("base", "--base"), ("out", "--out")):
            need(getattr(self, name), f"{name}: not set; pass {flag} PATH (or set it in the config file).")
        if self.stage == "align":
            faceid = "ip-adapter-faceid-plusv2_sd15.bin" if backend.faceid_v2 else "ip-adapter-faceid-plus_sd15.bin"
            need(self.adapter, f"adapter: stage 'align' needs the frozen identity module; pass --adapter {faceid}.")
            need(self.clip_vision or not backend.null_identity_tokens,
                 f"clip_vision: {backend.label} trains with the null identity (CLIP features of a blank image) for "
                 "dropped identities; pass --clip-vision CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors.")
        need(not is_inside(self.out, self.data),
             f"out: {self.out} is {'the' if same_path(self.out, self.data) else 'inside the'} --data folder "
             f"{self.data}; checkpoints, samples and weights would be written among the training images (and read "
             "as data by the next run). Pass an --out outside it.")
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


def same_path(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def is_inside(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or below it, after links and ``..`` are resolved."""
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))


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
    "adapter": "align: the frozen FaceID Plus file (RIDFR: ip-adapter-faceid-plusv2_sd15.bin, RestorerID: "
               "ip-adapter-faceid-plus_sd15.bin)",
    "clip_vision": "align: CLIP ViT-H/14 image encoder (to build the identity cache; RestorerID: the null identity)",
    "insightface_root": "align, to build the identity cache: folder holding models/buffalo_l",
    "insightface_model_dir": "align, to build the identity cache: the buffalo_l folder itself",
    "identity_cache": "align: identity feature cache folder (default <out>/identity_cache)",
    "init_content": "content weights to start from (RIDFR align: the content stage's output; RestorerID: its "
                    "RestorerIDFull.ckpt); its backend is the one trained, and a RestorerID file also gives --base",
    "config_dir": "model architecture configs (default ridfr_core/configs/sd15)",
    "cache_dir": "where the empty-prompt embedding is cached",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ridfr_core.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=STAGES, help="which stage to train (default: the config's)")
    parser.add_argument("--config", type=Path, help="JSON options (default: ridfr_core/configs/train_<stage>.json)")
    parser.add_argument("--backend", choices=sorted(BACKENDS), help="content backend to train (default: the --init "
                        "file's, else ridfr)")
    for name, help_text in PATH_FLAGS.items():
        flags = ["--" + name.replace("_", "-")] + (["--init"] if name == "init_content" else [])
        parser.add_argument(*flags, dest=name, metavar="PATH", help=help_text)
    parser.add_argument("--train-parts", help="comma-separated parts of the content module to train (RestorerID: "
                        "IDBalance (default), spade, encoder); shortcut for --set train_parts=...")
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
    if args.train_parts is not None:
        config.train_parts = args.train_parts
    choose_backend(config, args.backend)
    config.validate()
    return config


def choose_backend(config: TrainConfig, requested: str | None) -> None:
    """The backend is the --init file's (``--backend`` must agree); a RestorerID file also serves as --base."""
    init = Path(config.init_content) if config.init_content else None
    if init is not None and not init.is_file():
        state = "is a folder, not a file" if init.is_dir() else "does not exist"
        raise ConfigError(f"--init {init}: {state}; give the content weights to start from (RestorerID: its "
                          "RestorerIDFull.ckpt; RIDFR align: the content stage's ridfr-content.safetensors).")
    found = file_backend(init) if init is not None else None
    if requested and found is not None and found.name != requested:
        raise ConfigError(f"--backend {requested}: --init {init} holds {found.label} weights; pass --backend "
                          f"{found.name} or another --init file.")
    if requested or found is not None:
        config.backend = requested or found.name
    if config.base is None and init is not None and config.backend in BACKENDS:
        base = BACKENDS[config.backend].base_file(init)
        config.base = str(base) if base is not None else None
