"""Training data for both RIDFR stages: folder scanning, online degradation and the identity cache.

Every random draw of a sample (degradation, ID photos and their variants, diffusion noise, timestep)
comes from a generator seeded by ``(seed, global sample number)``. A sample is therefore a pure
function of its number: data order and augmentation survive a resume, any number of data-loader
workers and any number of GPUs without saving worker RNG states.

- Stage ``content`` (paper Sec. 3.2): every image under ``--data`` (FFHQ-style, searched recursively)
  is a high-quality target; its LQ is synthesised online with Eq. 7 (:mod:`ridfr_core.degrade`).
- Stage ``align`` (paper Sec. 3.3): ``--data`` holds one folder per identity (CelebRef-HQ layout,
  images directly inside). Each epoch visits every image once as the target; ID1 and ID2 are two
  other photos of the same person, so the identity never comes from the target itself (which would
  let the model copy the target through the identity branch; the paper warns about
  self-reconstruction in Sec. 3.3). An identity therefore needs 3 images for ID1 != ID2; with
  ``min_images_per_identity = 2`` two-image identities are kept with ID1 = ID2 (their alignment term
  is 0, they still train the diffusion term).
- The identity module is frozen, so ArcFace embeddings and CLIP features of every ID photo are
  computed once (:class:`IdentityCache`). The paper downsamples ID photos to 64..512 px per sample;
  the cache keeps ``identity_variants`` independently downsampled versions of each photo and a
  sample draws one of them, which keeps that augmentation at a fixed, documented granularity.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from .degrade import DegradationConfig, degrade, downsample_reference
from .imageio import IMAGE_SUFFIXES, UNREADABLE, ImageReadError, list_images, read_rgb

logger = logging.getLogger(__name__)

# Independent random streams per sample: adding a draw to one never shifts the others.
STREAM_ORDER, STREAM_SAMPLE, STREAM_ID_VARIANT, STREAM_VALIDATION = 1, 2, 3, 4
CACHE_FORMAT = "ridfr-identity-cache"
CACHE_VERSION = 1
LOAD_RETRIES = 16


class DataError(ValueError):
    """Training data that cannot be used, with the option and the fix in the message."""


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


def sample_rng(seed: int, stream: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, *keys])


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
    """Noise for the VAE posterior and the forward process, and the timestep, for one sample."""
    shape = (spec.latent_channels, spec.latent_size, spec.latent_size)
    return {
        "posterior_noise": torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)),
        "noise": torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)),
        "timestep": torch.tensor(int(rng.integers(0, spec.num_train_timesteps)), dtype=torch.long),
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


# ----------------------------------------------------------------------------------------------
# Identity feature cache


class IdentityCache:
    """ArcFace embeddings + CLIP features of ``variants`` downsampled versions of every ID photo.

    A folder of shards (``shard-NNNNN.safetensors``: ``id_embeds`` (n,K,512) float32, ``clip_embeds``
    (n,K,257,C) float16) and ``index.json`` mapping each photo's path relative to the data root to
    its shard row. Shards are memory-mapped, so workers read two rows per sample and the cache can be
    larger than RAM (fp16 CLIP ViT-H features: ~0.66 MB per variant, ~25 GB for CelebRef-HQ at K=4).
    Building is incremental and atomic per shard: an interrupted build keeps its finished shards and
    a rerun computes only the photos that are missing.
    """

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        self.index = self.read_index()
        self._handles: dict[str, object] = {}

    # -- reading
    def read_index(self) -> dict:
        path = self.folder / "index.json"
        if not path.is_file():
            return {}
        index = json.loads(path.read_text())
        if index.get("format") != CACHE_FORMAT or index.get("version") != CACHE_VERSION:
            raise DataError(f"identity_cache: {self.folder} is not a RIDFR identity cache (format "
                            f"{index.get('format')!r} v{index.get('version')}); point identity_cache at another folder.")
        return index

    @property
    def variants(self) -> int:
        return int(self.index["variants"])

    @property
    def entries(self) -> dict:
        return self.index.get("entries", {})

    @property
    def unreadable(self) -> dict:
        return self.index.get("unreadable", {})

    def __getstate__(self):
        return {"folder": self.folder, "index": self.index, "_handles": {}}  # file handles stay per process

    def features(self, key: str, variant: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(512,) float32 ArcFace embedding and (257, C) float16 CLIP features of one variant."""
        from safetensors import safe_open

        entry = self.entries[key]
        shard = entry["shard"]
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.folder / shard), framework="pt")
        handle, row = self._handles[shard], entry["row"]
        embed = handle.get_slice("id_embeds")[row:row + 1, variant:variant + 1]
        clip = handle.get_slice("clip_embeds")[row:row + 1, variant:variant + 1]
        return embed.reshape(embed.shape[-1]), clip.reshape(clip.shape[-2:])

    # -- building
    def settings(self) -> dict:
        return {key: self.index.get(key) for key in ("variants", "min_size", "max_size", "seed")}

    def check_settings(self, variants: int, min_size: int, max_size: int, seed: int) -> None:
        wanted = {"variants": variants, "min_size": min_size, "max_size": max_size, "seed": seed}
        if self.index and self.settings() != wanted:
            raise DataError(f"identity_cache: {self.folder} was built with {self.settings()} but the config asks "
                            f"for {wanted} (identity_variants, identity_min_size, identity_max_size). "
                            "Set identity_cache to a new folder, or use the settings it was built with.")

    def missing(self, root: Path, paths: list[Path]) -> list[Path]:
        known = set(self.entries) | set(self.unreadable)
        return [path for path in paths if path.relative_to(root).as_posix() not in known]

    def build(self, root: Path, paths: list[Path], encoder: "IdentityEncoder", variants: int, min_size: int,
              max_size: int, seed: int, shard_size: int = 256, progress=None) -> None:
        """Compute the photos not cached yet; unreadable ones are recorded (and skipped) in the index."""
        self.check_settings(variants, min_size, max_size, seed)
        if not self.index:
            self.index = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "variants": variants,
                          "min_size": min_size, "max_size": max_size, "seed": seed, "entries": {}, "unreadable": {},
                          "models": encoder.description}
        elif self.index.get("models") != encoder.description:
            raise DataError(f"identity_cache: {self.folder} was built with {self.index.get('models')}, now "
                            f"{encoder.description}; features of different models cannot be mixed. Set "
                            "identity_cache to a new folder, or use the models it was built with.")
        todo = self.missing(root, paths)
        for start in range(0, len(todo), shard_size):
            self.write_shard(root, todo[start:start + shard_size], encoder, progress)

    def write_shard(self, root: Path, paths: list[Path], encoder: "IdentityEncoder", progress) -> None:
        from .checkpoints import save_safetensors_atomic

        variants, embeds, clips, keys = self.variants, [], [], []
        for path in paths:
            key = path.relative_to(root).as_posix()
            try:
                image = read_rgb(path, "identity cache")
            except ImageReadError as error:
                logger.warning("identity cache: skipping unreadable image %s (%s)", path, error)
                self.index["unreadable"][key] = f"{type(error).__name__}: {error}"
                continue
            rng = sample_rng(self.index["seed"], STREAM_ID_VARIANT, zlib.crc32(key.encode()))
            versions = [downsample_reference(image, rng, self.index["min_size"], self.index["max_size"])
                        for _ in range(variants)]
            embed, clip = encoder(versions)
            embeds.append(embed.reshape(variants, -1))
            clips.append(clip.reshape(variants, *clip.shape[1:]))
            keys.append(key)
            if progress is not None:
                progress(1)
        if keys:
            shard = f"shard-{len({e['shard'] for e in self.entries.values()}):05d}.safetensors"
            while (self.folder / shard).exists():
                shard = f"shard-{int(shard[6:11]) + 1:05d}.safetensors"
            save_safetensors_atomic({"id_embeds": torch.stack(embeds).float(),
                                     "clip_embeds": torch.stack(clips).half()}, self.folder / shard,
                                    {"format": CACHE_FORMAT})
            for row, key in enumerate(keys):
                self.index["entries"][key] = {"shard": shard, "row": row}
        write_json_atomic(self.folder / "index.json", self.index)


class IdentityEncoder:
    """Frozen identity features of aligned faces: insightface ArcFace at the FFHQ template landmarks
    (no detection: the data is aligned) and CLIP ViT-H/14 on the ArcFace-aligned 224 crop."""

    def __init__(self, analyzer, clip_vision, description: dict):
        self.analyzer, self.clip_vision, self.description = analyzer, clip_vision, description

    def __call__(self, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        from .faces import clip_face_crop
        from .faces.images import rgb_to_tensor
        from .faces.references import aligned_landmarks
        from .identity import encode_clip_features

        kps = aligned_landmarks(images[0])
        embeds = torch.from_numpy(np.stack([self.analyzer.embed(image, kps) for image in images]))
        crops = rgb_to_tensor([clip_face_crop(image, kps) for image in images])
        return embeds, encode_clip_features(self.clip_vision, crops).float().cpu()


def write_json_atomic(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as handle:
            json.dump(value, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
