"""The identity feature cache of the alignment stage: ArcFace embeddings and CLIP features of several
downsampled versions of every ID photo, computed once with the frozen models (:class:`IdentityEncoder`)
and memory-mapped by the data-loader workers."""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path

import numpy as np
import torch

from ..io.atomic import write_json_atomic
from ..data.streams import STREAM_ID_VARIANT, DataError, sample_rng
from ..data.degrade import downsample_reference
from ..io.images import ImageReadError, read_rgb

logger = logging.getLogger(__name__)

CACHE_FORMAT = "ridfr-identity-cache"
CACHE_VERSION = 1


class IdentityCache:
    """ArcFace embeddings + CLIP features of ``variants`` downsampled versions of every ID photo.

    ``clip_bgr``: the CLIP features were computed from BGR crops (a backend trained that way, see
    :attr:`~ridfr_core.backends.interface.ContentBackend.clip_bgr`). A folder of shards (``shard-NNNNN.safetensors``: ``id_embeds`` (n,K,512) float32, ``clip_embeds``
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
        return self.settings_of(self.index)

    @staticmethod
    def settings_of(index: dict) -> dict:
        return ({key: index.get(key) for key in ("variants", "min_size", "max_size", "seed")}
                | {"clip_bgr": index.get("clip_bgr", False)})

    def check_settings(self, variants: int, min_size: int, max_size: int, seed: int, clip_bgr: bool = False) -> None:
        wanted = {"variants": variants, "min_size": min_size, "max_size": max_size, "seed": seed, "clip_bgr": clip_bgr}
        if self.index and self.settings() != wanted:
            raise DataError(f"identity_cache: {self.folder} was built with {self.settings()} but the config asks "
                            f"for {wanted} (identity_variants, identity_min_size, identity_max_size; clip_bgr follows the backend). "
                            "Set identity_cache to a new folder, or use the settings it was built with.")

    def missing(self, root: Path, paths: list[Path]) -> list[Path]:
        known = set(self.entries) | set(self.unreadable)
        return [path for path in paths if path.relative_to(root).as_posix() not in known]

    def build(self, root: Path, paths: list[Path], encoder: "IdentityEncoder", variants: int, min_size: int,
              max_size: int, seed: int, shard_size: int = 256, progress=None) -> None:
        """Compute the photos not cached yet; unreadable ones are recorded (and skipped) in the index."""
        self.check_settings(variants, min_size, max_size, seed, encoder.bgr)
        if not self.index:
            self.index = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "variants": variants,
                          "min_size": min_size, "max_size": max_size, "seed": seed, "clip_bgr": encoder.bgr,
                          "entries": {}, "unreadable": {}, "models": encoder.description}
        elif self.index.get("models") != encoder.description:
            raise DataError(f"identity_cache: {self.folder} was built with {self.index.get('models')}, now "
                            f"{encoder.description}; features of different models cannot be mixed. Set "
                            "identity_cache to a new folder, or use the models it was built with.")
        todo = self.missing(root, paths)
        for start in range(0, len(todo), shard_size):
            self.write_shard(root, todo[start:start + shard_size], encoder, progress)

    def part(self, process: int) -> "IdentityCache":
        """The cache process ``process`` builds its slice of the missing photos into (``part-N/``, beside the
        others'), folded into this one by :meth:`merge_parts`."""
        return IdentityCache(self.folder / f"part-{process}")

    def merge_parts(self) -> None:
        """Add the photos of the ``part-N/`` caches to this cache's index; their shards stay where they are.
        Idempotent, so a build killed before or during the merge is merged by the next run."""
        merged = dict(self.index)
        for folder in sorted(self.folder.glob("part-*")):
            part = IdentityCache(folder)
            if not part.index:
                continue
            if not merged:
                merged = {**part.index, "entries": {}, "unreadable": {}}
            elif (part.settings(), part.index.get("models")) != (self.settings_of(merged), merged.get("models")):
                raise DataError(f"identity_cache: {folder} was built with {part.settings()} and "
                                f"{part.index.get('models')}, {self.folder} with {self.settings_of(merged)} and "
                                f"{merged.get('models')}; delete {folder} (its photos are computed again) or use "
                                "another identity_cache.")
            entries = {key: {"shard": f"{folder.name}/{entry['shard']}", "row": entry["row"]}
                       for key, entry in part.entries.items()}
            merged = {**merged, "entries": {**merged["entries"], **entries},
                      "unreadable": {**merged["unreadable"], **part.unreadable}}
        if merged != self.index:
            write_json_atomic(self.folder / "index.json", merged)
            self.index = merged

    def write_shard(self, root: Path, paths: list[Path], encoder: "IdentityEncoder", progress) -> None:
        from ..weights.checkpoints import save_safetensors_atomic

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
    (no detection: the data is aligned) and CLIP ViT-H/14 on the ArcFace-aligned 224 crop (in BGR order with
    ``bgr``)."""

    def __init__(self, analyzer, clip_vision, description: dict, bgr: bool = False):
        self.analyzer, self.clip_vision, self.description, self.bgr = analyzer, clip_vision, description, bgr

    def __call__(self, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """(K,512) ArcFace embeddings and (K,257,C) CLIP features of K versions of one aligned face."""
        from ..faces.images import rgb_to_tensor
        from ..faces.references import encode_references
        from .adapter import encode_clip_features

        references = encode_references(self.analyzer, images, aligned=True)
        embeds = torch.from_numpy(np.stack([reference.embedding for reference in references]))
        crops = rgb_to_tensor([reference.clip_crop for reference in references])
        return embeds, encode_clip_features(self.clip_vision, crops, self.bgr).float().cpu()

