"""The paper's pre-processing (Sec. 4): a restoration model cleans the aligned LQ face before the content
module sees it, as DiffBIR's SwinIR stage does.

Any single-image model spandrel recognises from its weights (SwinIR, Real-ESRGAN, ...), i.e. the files
ComfyUI keeps in ``models/upscale_models``. An upscaling model's output is resized back to the face size,
so the model restores and the face stays aligned. Large images are processed in overlapping tiles (512 px,
32 px overlap, as ComfyUI's "Upscale Image (using Model)") blended with linear ramps.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .weights.checkpoints import read_state_dict

logger = logging.getLogger(__name__)

MODEL_FOLDER = "upscale_models"  # ComfyUI's folder for these files
TILE, OVERLAP = 512, 32
INSTALL_HINT = "pip install -c constraints.txt spandrel"


class PreprocessError(ValueError):
    """A pre-processing model that cannot be used; the message names the option and the fix."""


def import_spandrel(option: str):
    """spandrel, or an error saying how to install it. spandrel imports torchvision's pure-Python transforms,
    and PyPI's torchvision does not import beside a CPU-only torch until scripts/cpu_torchvision.py ran."""
    if importlib.util.find_spec("spandrel") is None:
        raise PreprocessError(f"{option}: pre-processing models are loaded with spandrel, which is not installed; "
                              f"run `{INSTALL_HINT}` (then, on a CPU-only torch, `python scripts/cpu_torchvision.py`).")
    try:
        import spandrel
    except ImportError as error:
        raise PreprocessError(f"{option}: spandrel cannot be imported ({error}); run `{INSTALL_HINT}`.") from error
    except RuntimeError as error:  # torchvision's compiled ops built for another torch
        raise PreprocessError(
            f"{option}: spandrel imports torchvision, which fails beside this torch ({error}). On a CPU-only torch "
            "run `python scripts/cpu_torchvision.py` once; otherwise install the torchvision that matches your torch."
        ) from error
    return spandrel


def model_path(file: str | Path, models: Path | None, option: str) -> Path:
    """``file`` itself, or a file of that name in ``models/upscale_models`` (where ComfyUI keeps them)."""
    path = Path(file)
    if path.is_file():
        return path
    if models is not None and (models / MODEL_FOLDER / file).is_file():
        return models / MODEL_FOLDER / file
    where = f" nor a file in {models / MODEL_FOLDER}" if models is not None else ""
    raise PreprocessError(f"{option} {file}: neither a file{where}; give the path of a SwinIR, Real-ESRGAN or other "
                          "restoration model (.safetensors or .pth).")


def tiled(run: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, scale: int, tile: int = TILE,
          overlap: int = OVERLAP) -> torch.Tensor:
    """``run`` over overlapping ``tile``-px tiles of a (1,C,H,W) image (whole when it fits), blended with
    linear ramps over the overlap; ``run`` maps a (1,C,h,w) tile to (1,C',h*scale,w*scale)."""
    height, width = image.shape[-2:]
    if max(height, width) <= tile:
        return run(image)
    output, weight = None, None
    for top in _tile_starts(height, tile, overlap):
        for left in _tile_starts(width, tile, overlap):
            piece = run(image[..., top:top + tile, left:left + tile])
            if output is None:
                output = piece.new_zeros(*piece.shape[:2], height * scale, width * scale)
                weight = piece.new_zeros(1, 1, height * scale, width * scale)
            tall, wide = piece.shape[-2:]
            ramp = _ramp(tall, overlap * scale, piece)[:, None] * _ramp(wide, overlap * scale, piece)
            rows, columns = slice(top * scale, top * scale + tall), slice(left * scale, left * scale + wide)
            output[..., rows, columns] += piece * ramp
            weight[..., rows, columns] += ramp
    return output / weight


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, tile - overlap))
    return starts + [size - tile]


def _ramp(length: int, overlap: int, like: torch.Tensor) -> torch.Tensor:
    """1 inside, rising linearly over ``overlap`` pixels at both ends (never 0, so every pixel has weight)."""
    position = torch.arange(length, device=like.device, dtype=like.dtype)
    return torch.minimum(position + 1, length - position).div(overlap + 1).clamp(max=1)


@dataclass(eq=False)
class Preprocessor:
    """A loaded spandrel model: ``preprocessor(faces)`` maps (B,3,H,W) in [0,1] to the same shape."""

    model: object  # spandrel.ImageModelDescriptor
    path: Path | None = None  # None: a model loaded elsewhere (ComfyUI's Load Upscale Model)
    tile: int = TILE
    overlap: int = OVERLAP

    @property
    def architecture(self) -> str:
        return self.model.architecture.name

    @property
    def scale(self) -> int:
        return self.model.scale

    def to(self, device, dtype: torch.dtype) -> Preprocessor:
        """Run on the restoration's device, in its float16 where the model supports it (Real-ESRGAN, ...), else
        in float32: spandrel's SwinIR refuses float16, and its bfloat16 SwinIR fails on any input size but its
        training size (the attention mask it recomputes stays float32)."""
        run_in = torch.float16 if dtype == torch.float16 and self.model.supports_half else torch.float32
        if run_in != dtype:
            logger.info("pre-processing: %s runs in float32, not %s.", self.architecture, dtype)
        self.model.to(device=torch.device(device), dtype=run_in)
        return self

    @torch.no_grad()
    def __call__(self, faces: torch.Tensor) -> torch.Tensor:
        height, width = faces.shape[-2:]
        model = self.model
        outputs = []
        for face in faces:  # one at a time: a batch of large images would not fit where one does
            face = face[None].to(model.device, model.dtype)
            outputs.append(tiled(lambda piece: model(piece).float(), face, self.scale, self.tile, self.overlap))
        restored = torch.cat(outputs)
        if restored.shape[-2:] != (height, width):
            restored = F.interpolate(restored, size=(height, width), mode="bicubic", antialias=True)
        return restored.clamp(0, 1).to(faces.device, faces.dtype)

    def apply_rgb(self, image: np.ndarray) -> np.ndarray:
        """HWC uint8 RGB -> pre-processed HWC uint8 RGB of the same size."""
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255
        return (self(tensor)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)

    def describe(self) -> dict:
        """What a report or an evaluation records to make the run reproducible."""
        return {"file": self.path.name, "sha256": hashlib.sha256(self.path.read_bytes()).hexdigest(),
                "architecture": self.architecture, "scale": self.scale, "tags": list(self.model.tags),
                "tile": self.tile, "overlap": self.overlap, "dtype": str(self.model.dtype).replace("torch.", "")}

    def summary(self) -> str:
        return (f"{self.architecture} x{self.scale} ({self.path.name}) on {self.model.device} "
                f"{str(self.model.dtype).replace('torch.', '')}, tiles of {self.tile} px")


def load_preprocessor(file: str | Path, models: Path | None = None, option: str = "--preprocess",
                      tile: int = TILE) -> Preprocessor:
    """A restoration/upscale model from a path or a name in ``models/upscale_models``, on the CPU in float32
    (see :meth:`Preprocessor.to`). Weights are read with safetensors or ``torch.load(weights_only=True)``."""
    path = model_path(file, models, option)
    spandrel = import_spandrel(option)
    state = read_state_dict(path, option)
    try:
        model = spandrel.ModelLoader(device="cpu").load_from_state_dict(spandrel.canonicalize_state_dict(state))
    except spandrel.UnsupportedModelError as error:
        raise PreprocessError(f"{option} {path}: spandrel does not recognise this model's architecture from its "
                              "weights; give a SwinIR, Real-ESRGAN or other model that ComfyUI's Load Upscale Model "
                              "reads.") from error
    if not isinstance(model, spandrel.ImageModelDescriptor) or (model.input_channels, model.output_channels) != (3, 3):
        raise PreprocessError(f"{option} {path}: {model.architecture.name} is not a single-image RGB restoration "
                              "model (e.g. an inpainting or grey-scale model); give an RGB restoration/upscale model.")
    return Preprocessor(model.eval(), path, tile)


def preprocess_before(restore_fn, preprocessor: Preprocessor):
    """A faces callback (see :mod:`ridfr_core.faces.photo`) that pre-processes the aligned LQ faces first."""
    def run(faces: torch.Tensor, scales: torch.Tensor, identity_index: list) -> torch.Tensor:
        return restore_fn(preprocessor(faces), scales, identity_index)
    return run


def preprocessed_restorer(restore: Callable[[np.ndarray, np.ndarray], np.ndarray], file: str | Path, device: str,
                          out_dir: Path) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """``python -m ridfr_core.eval run --preprocess``: an evaluation restorer ``(lq, reference) -> restored``
    whose LQ face is cleaned by the model first, so any restorer is evaluated on the same pre-processed inputs
    as in the paper's protocol. The model (file, hash, architecture) is recorded in ``out_dir/preprocess.json``."""
    preprocessor = load_preprocessor(file).to(device, torch.float32)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "preprocess.json").write_text(json.dumps(preprocessor.describe(), indent=1))
    print(f"pre-processing every LQ face with {preprocessor.summary()}")

    def run(lq: np.ndarray, reference: np.ndarray) -> np.ndarray:
        return restore(preprocessor.apply_rgb(lq), reference)
    return run
