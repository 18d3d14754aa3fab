"""RestorerID's adaptive identity scale: the worse the LQ face, the more the reference's identity counts.

RestorerID sets the identity attention's scale per face from a no-reference quality score of the LQ
face, ``exp(0.1 * (9.5 - MUSIQ))``, with pyiqa's MUSIQ (KonIQ-10k). :mod:`ridfr_core.musiq` computes the
same score from the same published weights (``<models>/pyiqa/musiq_koniq_ckpt-e95806b9.pth``, fetched by
``python -m ridfr_core.models download --backend restorerid``) with torch alone. Without that file the
backend's fixed scale is used; a file that is there but unusable is an error. Either way the value used
is logged.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ...models.registry import MUSIQ_KONIQ

AUTO = "auto"
MUSIQ_BATCH = 8  # faces per MUSIQ call: a 512 px face is ~450 tokens; a group photo or video batch is split
logger = logging.getLogger(__name__)


def scale_from_musiq(score: float) -> float:
    """RestorerID's mapping from a MUSIQ score to the identity scale."""
    return math.exp(0.1 * (9.5 - score))


def musiq_of_scale(scale: float) -> float:
    """The MUSIQ score that gives ``scale`` (the inverse of :func:`scale_from_musiq`), to show it."""
    return 9.5 - 10 * math.log(scale)


def parse_identity_scale(text: str) -> float | str:
    """The CLI's ``--identity-scale``: "auto" or a finite number >= 0."""
    if text.strip().lower() == AUTO:
        return AUTO
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--identity-scale: '{text}' is neither a number nor 'auto'.") from None
    if not math.isfinite(value):
        raise ValueError(f"--identity-scale: {text} is not a finite number; give a number >= 0 or 'auto'.")
    if value < 0:
        raise ValueError(f"--identity-scale: {text} must be a finite number >= 0 (or 'auto').")
    return value


def musiq_dtype(compute: torch.dtype) -> torch.dtype:
    """The dtype MUSIQ runs in beside a restoration computing in ``compute``: float16 where that is float16 (on
    real faces its score stays within 0.05 points of float32, the identity scale within 0.5 %), else float32.
    bfloat16's 8-bit mantissa moves the score by up to 0.4 points, the scale by 4 %, and MUSIQ is small
    (27M parameters) and runs once per face, so float32 costs little on any device."""
    return torch.float16 if compute == torch.float16 else torch.float32


def load_musiq(models: Path, device="cpu", dtype: torch.dtype = torch.float32):
    """(MUSIQ model on ``device`` in ``dtype``, None), or (None, why it is not available) when its weights file
    is absent. A file that is there but cannot be used raises
    :class:`~ridfr_core.weights.checkpoints.CheckpointError`."""
    from ...musiq import load_musiq as load_weights

    path = models / MUSIQ_KONIQ.relative
    if not path.is_file():
        return None, missing_musiq(models)
    return load_weights(path, device, dtype), None


def missing_musiq(models: Path) -> str:
    return (f"no MUSIQ weights at {models / MUSIQ_KONIQ.relative}; python -m ridfr_core.models download --backend "
            f"restorerid --models {models} --accept-licences fetches them")


def auto_by_default(backend) -> bool:
    """Whether a backend's published identity scale is the adaptive one: RestorerID's inference always applies it."""
    return backend.name == "restorerid"


@dataclass
class IdentityScale:
    """The identity scale of a restoration: fixed, or per face from MUSIQ (``metric``), scored ``batch`` faces at
    a time on the metric's device."""

    fixed: float
    metric: object = None
    batch: int = MUSIQ_BATCH

    @classmethod
    def choose(cls, requested: float | str | None, backend, models: Path, device="cpu",
               dtype: torch.dtype = torch.float32) -> "IdentityScale":
        """``requested`` None means the backend's default: "auto" for RestorerID (its published setting). MUSIQ
        is loaded once here, on ``device`` beside a restoration computing in ``dtype``."""
        if requested is None:
            requested = AUTO if auto_by_default(backend) else backend.identity_scale
        if requested != AUTO:
            logger.info("identity scale: %.3g", requested)
            return cls(float(requested))
        return cls.auto(backend, *load_musiq(Path(models), device, musiq_dtype(dtype)))

    @classmethod
    def auto(cls, backend, metric, why: str | None = None) -> "IdentityScale":
        """RestorerID's "auto": per face from ``metric``, or the backend's fixed scale without one (``why``)."""
        if metric is None:
            logger.info("identity scale: auto -> %.3g, the fixed default (%s)", backend.identity_scale, why)
        else:
            logger.info("identity scale: auto, from each LQ face's MUSIQ score")
        return cls(backend.identity_scale, metric)

    def for_faces(self, faces: torch.Tensor) -> torch.Tensor:
        """(B,) scales for LQ faces (B,3,H,W) in [0,1]."""
        if self.metric is None:
            return torch.full((faces.shape[0],), self.fixed)
        # clamped: a resized face may overshoot [0, 1] by a little, which MUSIQ refuses
        scores = [float(score) for start in range(0, faces.shape[0], self.batch)
                  for score in self.metric(faces[start:start + self.batch].float().clamp(0, 1))]
        scales = [scale_from_musiq(score) for score in scores]
        for index, (score, scale) in enumerate(zip(scores, scales)):
            logger.info("identity scale: auto -> %.3g for face %d (MUSIQ %.1f)", scale, index, score)
        return torch.tensor(scales)

    def around(self, restore_fn):
        """A faces callback (see :mod:`ridfr_core.faces.photo`) whose faces' identity scales are multiplied by
        their scale here before ``restore_fn`` runs: it scores the aligned LQ faces as they come, before any
        pre-processing cleans them (RestorerID scores the raw LQ face; a cleaned one would score high and
        switch the identity off)."""
        def run(faces: torch.Tensor, scales: torch.Tensor, identity_index: list) -> torch.Tensor:
            return restore_fn(faces, scales * self.for_faces(faces), identity_index)
        return run
