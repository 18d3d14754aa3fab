"""Training data for both RIDFR stages: folder scanning, online degradation and the identity cache.

Every random draw of a sample (degradation, ID photos and their variants, diffusion noise, timestep)
comes from a generator seeded by ``(seed, global sample number)``. A sample is therefore a pure
function of its number: data order and augmentation survive a resume, any number of data-loader
workers and any number of GPUs without saving worker RNG states.

- Stage ``content`` (paper Sec. 3.2): every image under ``--data`` (FFHQ-style, searched recursively)
  is a high-quality target; its LQ is synthesised online with Eq. 7 (:mod:`ridfr_core.data.degrade`).
- Stage ``align`` (paper Sec. 3.3): ``--data`` holds one folder per identity (CelebRef-HQ layout,
  images directly inside). Each epoch visits every image once as the target; ID1 and ID2 are two
  other photos of the same person, so the identity never comes from the target itself (which would
  let the model copy the target through the identity branch; the paper warns about
  self-reconstruction in Sec. 3.3). An identity therefore needs 3 images for ID1 != ID2; with
  ``min_images_per_identity = 2`` two-image identities are kept with ID1 = ID2 (their alignment term
  is 0, they still train the diffusion term).
- The identity module is frozen, so ArcFace embeddings and CLIP features of every ID photo are
  computed once (:class:`~ridfr_core.identity.cache.IdentityCache`). The paper downsamples ID photos to 64..512 px per sample;
  the cache keeps ``identity_variants`` independently downsampled versions of each photo and a
  sample draws one of them, which keeps that augmentation at a fixed, documented granularity.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from .degrade import DegradationConfig, degrade
from ..io.images import IMAGE_SUFFIXES, UNREADABLE, ImageReadError, list_images, read_rgb

from .streams import STREAM_ORDER, STREAM_SAMPLE, DataError, sample_rng

if TYPE_CHECKING:
    from ..identity.cache import IdentityCache

logger = logging.getLogger(__name__)

LOAD_RETRIES = 16


# ----------------------------------------------------------------------------------------------
# Scanning folders


@dataclass
class SkipReport:
    """Images left out at start-up, with why: kept so the summary and ``data_report.json`` agree."""

    unreadable: list[tuple[str, str]] = field(default_factory=list)
    too_small: list[tuple[str, str]] = field(default_factory=list)
    excluded_identities: list[tuple[str, int]] = field(default_factory=list)

    @property
    def skipped_images(self) -> int:
        return len(self.unreadable) + len(self.too_small)

    def summary(self, min_image_size: int, min_images: int | None = None) -> str:
        parts = []
        if self.unreadable:
            parts.append(f"{len(self.unreadable)} unreadable image(s) skipped (e.g. "
                         + "; ".join(f"{p}: {why}" for p, why in self.unreadable[:3]) + ")")
        if self.too_small:
            parts.append(f"{len(self.too_small)} image(s) smaller than min_image_size={min_image_size} px skipped "
                         "(e.g. " + "; ".join(f"{p} is {size}" for p, size in self.too_small[:3]) + ")")
        if self.excluded_identities:
            parts.append(f"{len(self.excluded_identities)} identities with fewer than "
                         f"min_images_per_identity={min_images} usable images excluded (e.g. "
                         + ", ".join(f"{name} ({count})" for name, count in self.excluded_identities[:5]) + ")")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {"unreadable": [list(x) for x in self.unreadable], "too_small": [list(x) for x in self.too_small],
                "excluded_identities": [list(x) for x in self.excluded_identities]}


def image_problem(path: Path, min_image_size: int) -> tuple[str, str] | None:
    """("unreadable"|"too_small", why) from the header alone (fast enough for 70k files at start-up);
    a file whose body is truncated is caught when it is decoded."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except UNREADABLE as error:  # including images over PIL's decompression-bomb limit
        return "unreadable", f"{type(error).__name__}: {error}"
    if min(width, height) < min_image_size:
        return "too_small", f"{width}x{height}"
    return None


def require_folder(root: Path | str, option: str = "data") -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{option}: {root} is not a folder; pass the folder that holds the training images.")
    return root


def usable_images(paths: list[Path], root: Path, min_image_size: int, report: SkipReport) -> list[Path]:
    """The readable, large-enough images among ``paths``; the others go into ``report`` with the reason."""
    kept = []
    for path in paths:
        problem = image_problem(path, min_image_size)
        if problem is None:
            kept.append(path)
        else:
            getattr(report, problem[0]).append((str(path.relative_to(root)), problem[1]))
    return kept


def scan_faces(root: Path | str, min_image_size: int) -> tuple[list[Path], SkipReport]:
    """Stage ``content``: every usable image under ``root`` (FFHQ keeps them in numbered subfolders)."""
    root = require_folder(root)
    report = SkipReport()
    kept = usable_images(list_images(root, recursive=True), root, min_image_size, report)
    if not kept:
        raise DataError(f"data: no usable images in {root} (looked for {sorted(IMAGE_SUFFIXES)} recursively"
                        + (f"; {report.summary(min_image_size)}" if report.skipped_images else "")
                        + "). Stage 'content' takes a folder of aligned 512x512 faces, e.g. FFHQ's images1024x1024 "
                        "resized, or FFHQ 512.")
    return kept, report


@dataclass
class IdentityGroup:
    name: str
    paths: list[Path]


def scan_identities(root: Path | str, min_image_size: int, min_images: int) -> tuple[list[IdentityGroup], SkipReport]:
    """Stage ``align``: one subfolder per identity with its photos directly inside (CelebRef-HQ)."""
    root = require_folder(root)
    report, groups = SkipReport(), []
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    for folder in folders:
        paths = usable_images(list_images(folder, recursive=False), root, min_image_size, report)
        if not paths and not any(folder.iterdir()):
            continue
        groups.append(IdentityGroup(folder.name, paths))
    groups = exclude_small_identities(groups, min_images, report)
    if not groups:
        loose = len(list_images(root, recursive=False))
        hint = (f" It has {loose} images directly inside: stage 'align' needs one subfolder per identity."
                if loose else "")
        raise DataError(f"data: no identity in {root} has at least min_images_per_identity={min_images} usable "
                        f"images ({len(folders)} subfolders; {report.summary(min_image_size, min_images) or 'none'})."
                        f"{hint} Stage 'align' takes CelebRef-HQ-style data: <data>/<identity>/<photo>.jpg.")
    return groups, report


def exclude_small_identities(groups: list[IdentityGroup], min_images: int, report: SkipReport) -> list[IdentityGroup]:
    kept = []
    for group in groups:
        if len(group.paths) >= min_images:
            kept.append(group)
        else:
            report.excluded_identities.append((group.name, len(group.paths)))
    return kept


# ----------------------------------------------------------------------------------------------
# Decoding and the per-sample randomness


def read_face(path: Path, resolution: int) -> np.ndarray:
    """HWC uint8 RGB, centre-cropped to a square and resized to ``resolution`` (area down, cubic up)."""
    image = read_rgb(path, "data")
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    image = image[top:top + side, left:left + side]
    if side != resolution:
        interpolation = cv2.INTER_AREA if side > resolution else cv2.INTER_CUBIC
        image = cv2.resize(image, (resolution, resolution), interpolation=interpolation)
    return np.ascontiguousarray(image)


def to_signed_tensor(image: np.ndarray) -> torch.Tensor:
    """HWC uint8 -> (3,H,W) float in [-1, 1], the VAE's and the content module's range."""
    return torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1.0)


@dataclass(frozen=True)
class NoiseSpec:
    """Shape of the diffusion noise drawn with each sample, and the timestep range."""

    latent_channels: int
    latent_size: int
    num_train_timesteps: int


def diffusion_draws(rng: np.random.Generator, spec: NoiseSpec) -> dict[str, torch.Tensor]:
    """Noise for the target's VAE posterior and the forward process, the timestep, and the noise of the LQ's
    VAE posterior (for a backend that reads the LQ latent, see ``ContentBackend.sample_posterior``), for one
    sample."""
    shape = (spec.latent_channels, spec.latent_size, spec.latent_size)
    return {
        "posterior_noise": torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)),
        "noise": torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)),
        "timestep": torch.tensor(int(rng.integers(0, spec.num_train_timesteps)), dtype=torch.long),
        "lq_posterior_noise": torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)),
    }


class EpochOrder:
    """Global sample number -> dataset index: a fresh seeded permutation per epoch."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed

    @lru_cache(maxsize=4)
    def permutation(self, epoch: int) -> np.ndarray:
        return sample_rng(self.seed, STREAM_ORDER, epoch).permutation(self.size)

    def __call__(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        return int(self.permutation(epoch)[offset])


# ----------------------------------------------------------------------------------------------
# Datasets


class FaceDataset(Dataset):
    """Shared by both stages: target + online-degraded LQ + diffusion noise for sample ``position``.

    Indexing is by global sample number (not dataset index). An image that fails to decode is
    replaced by the next one in the epoch order and reported in the sample's ``skipped`` count.
    """

    def __init__(self, paths: list[Path], resolution: int, degradation: DegradationConfig, noise: NoiseSpec, seed: int):
        self.paths, self.resolution, self.degradation, self.noise, self.seed = paths, resolution, degradation, noise, seed
        self.order = EpochOrder(len(paths), seed)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int) -> dict:
        for attempt in range(LOAD_RETRIES):
            index = self.order(position + attempt)
            try:
                image = read_face(self.paths[index], self.resolution)
            except ImageReadError as error:
                logger.warning("Skipping unreadable training image %s", error)
                continue
            rng = sample_rng(self.seed, STREAM_SAMPLE, position)
            sample = self.make_sample(image, index, rng)
            sample["skipped"] = torch.tensor(attempt)
            return sample
        raise DataError(f"data: {LOAD_RETRIES} images in a row could not be decoded near sample {position}; the "
                        "dataset is damaged (check the disk, or re-extract it).")

    def make_sample(self, image: np.ndarray, index: int, rng: np.random.Generator) -> dict:
        lq = degrade(image, rng, self.degradation)
        return {"target": to_signed_tensor(image), "lq": to_signed_tensor(lq), **diffusion_draws(rng, self.noise)}


class AlignDataset(FaceDataset):
    """Stage ``align``: adds two other photos of the target's identity as cached identity features."""

    def __init__(self, groups: list[IdentityGroup], cache: "IdentityCache", root: Path, resolution: int,
                 degradation: DegradationConfig, noise: NoiseSpec, seed: int):
        paths = [path for group in groups for path in group.paths]
        super().__init__(paths, resolution, degradation, noise, seed)
        self.cache, self.root = cache, Path(root)
        self.identity_of = np.array([number for number, group in enumerate(groups) for _ in group.paths])
        self.members = []
        start = 0
        for group in groups:
            self.members.append(np.arange(start, start + len(group.paths)))
            start += len(group.paths)

    def key(self, index: int) -> str:
        return self.paths[index].relative_to(self.root).as_posix()

    def id_photos(self, index: int, rng: np.random.Generator) -> tuple[int, int]:
        """Two distinct other photos of the same person (the same one twice for a 2-image identity)."""
        others = self.members[self.identity_of[index]]
        others = others[others != index]
        if len(others) == 1:
            return int(others[0]), int(others[0])
        first, second = rng.choice(others, size=2, replace=False)
        return int(first), int(second)

    def make_sample(self, image: np.ndarray, index: int, rng: np.random.Generator) -> dict:
        sample = super().make_sample(image, index, rng)
        for name, photo in zip(("id1", "id2"), self.id_photos(index, rng)):
            embed, clip = self.cache.features(self.key(photo), int(rng.integers(self.cache.variants)))
            sample[f"{name}_embed"], sample[f"{name}_clip"] = embed, clip
        # uniform draws for the backend's condition dropout (identity, content): drawn last, so the draws
        # above stay what they were
        sample["condition_draws"] = torch.from_numpy(rng.random(2, dtype=np.float32))
        return sample


class StepBatchSampler(Sampler[list[int]]):
    """Global sample numbers of this process's micro-batches, from ``start_step`` on.

    Optimiser step ``s`` consumes samples ``s*batch_size ... (s+1)*batch_size - 1``; micro-batch ``a``
    of process ``p`` takes its slice of them. The split depends only on the step, so a resume starts
    exactly where the interrupted run was.
    """

    def __init__(self, batch_size: int, accumulation: int, num_processes: int, process_index: int,
                 start_step: int, max_steps: int):
        micro, remainder = divmod(batch_size, accumulation * num_processes)
        if remainder or micro == 0:
            raise DataError(f"batch_size: {batch_size} is not a multiple of gradient_accumulation_steps "
                            f"({accumulation}) x processes ({num_processes}); batch_size is the total batch per "
                            "optimiser step, so choose values that divide it.")
        self.micro, self.batch_size, self.accumulation = micro, batch_size, accumulation
        self.num_processes, self.process_index = num_processes, process_index
        self.start_step, self.max_steps = start_step, max_steps

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step) * self.accumulation

    def __iter__(self):
        for step in range(self.start_step, self.max_steps):
            for accumulation_index in range(self.accumulation):
                first = (step * self.batch_size + accumulation_index * self.micro * self.num_processes
                         + self.process_index * self.micro)
                yield list(range(first, first + self.micro))


def single_threaded_worker(_worker_id: int) -> None:
    """Each worker is one core: OpenCV and torch would otherwise each spawn a thread per core."""
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def make_loader(dataset: Dataset, sampler: StepBatchSampler, num_workers: int, pin_memory: bool) -> DataLoader:
    """Workers are spawned, not forked: forking after onnxruntime (identity cache) or CUDA threads
    have started can deadlock a worker. Spawning costs a few seconds once per run."""
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                      worker_init_fn=single_threaded_worker if num_workers else None,
                      multiprocessing_context="spawn" if num_workers else None,
                      prefetch_factor=4 if num_workers else None)
