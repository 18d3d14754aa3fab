"""The training data of a run: scanned faces (content) or identity groups with their identity feature cache (align)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..backends import BACKENDS
from ..weights import checkpoints
from ..io.atomic import write_json_atomic
from ..data.datasets import IdentityGroup, SkipReport, exclude_small_identities, scan_faces, scan_identities
from ..data.streams import DataError
from ..identity.cache import IdentityCache, IdentityEncoder
from .options import IDENTITY_VARIANT_SEED, ConfigError, TrainConfig

logger = logging.getLogger(__name__)


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
    """Open the cache, computing the missing photos first. Each process computes its own slice of them into its
    part of the cache (``part-N/``), the main process merges the parts: the processes wait for each other only for
    the difference between their equal shares, never for a whole build (which would outlast the collective
    timeout: NCCL's is 10 minutes)."""
    folder = Path(config.identity_cache or Path(config.out) / "identity_cache")
    settings = dict(variants=config.identity_variants, min_size=config.identity_min_size,
                    max_size=config.identity_max_size, seed=IDENTITY_VARIANT_SEED)
    count, process = accelerator.num_processes, accelerator.process_index
    if accelerator.is_main_process:
        IdentityCache(folder).merge_parts()  # what a killed multi-process build left
    accelerator.wait_for_everyone()
    cache = IdentityCache(folder)
    cache.check_settings(**settings, clip_bgr=BACKENDS[config.backend].clip_bgr)
    paths = [path for group in groups for path in group.paths]
    missing = cache.missing(root, paths)
    if not missing:
        return cache
    require_encoder_options(config, folder, missing)  # on every process alike, before any waits
    share = missing[process::count]
    if share:
        encoder = make_identity_encoder(config, accelerator.device)
        from tqdm.auto import tqdm

        target = cache if count == 1 else cache.part(process)
        with tqdm(total=len(share), desc="identity cache" + (f" [{process}]" if count > 1 else ""), unit="photo",
                  position=process) as bar:
            target.build(root, share, encoder, progress=bar.update, **settings)
    accelerator.wait_for_everyone()
    if count > 1 and accelerator.is_main_process:
        cache.merge_parts()
    accelerator.wait_for_everyone()
    return IdentityCache(folder)


def require_encoder_options(config: TrainConfig, folder: Path, missing: list[Path]) -> None:
    if not config.clip_vision or not (config.insightface_root or config.insightface_model_dir):
        raise ConfigError(
            f"identity_cache: {folder} lacks the features of {len(missing)} photo(s) (e.g. {missing[0]}). Computing "
            "them needs --clip-vision (CLIP ViT-H/14) and --insightface-root (folder with models/buffalo_l) or "
            "--insightface-model-dir; or pass --identity-cache with a cache built elsewhere for this data.")


def make_identity_encoder(config: TrainConfig, device) -> IdentityEncoder:
    from ..faces import load_face_analyzer

    analyzer = load_face_analyzer(models_root=config.insightface_root, model_dir=config.insightface_model_dir)
    clip_vision = checkpoints.load_clip_vision(config.clip_vision, config.config_dir).to(device)
    description = {"arcface": Path(analyzer.recognizer.model_file).name, "clip_vision": Path(config.clip_vision).name}
    return IdentityEncoder(analyzer, clip_vision, description, bgr=BACKENDS[config.backend].clip_bgr)
