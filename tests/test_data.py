"""Training data: folder scanning and bad data, per-sample determinism, the step sampler and the
identity cache. Real CelebRef-HQ photos (resized to 64 px in tmp) where the shared data exists."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shared_data import FACE_DATA
from ridfr_core.weights.checkpoints import load_clip_vision
from ridfr_core.data.streams import DataError
from ridfr_core.data.datasets import (AlignDataset, FaceDataset, NoiseSpec, StepBatchSampler, scan_faces,
                             scan_identities)
from ridfr_core.data.degrade import DegradationConfig
from ridfr_core.identity.cache import IdentityCache, IdentityEncoder

SIZE = 64
NOISE = NoiseSpec(latent_channels=4, latent_size=8, num_train_timesteps=1000)
IDENTITIES, PHOTOS = 4, 4


@dataclass
class SmallFaces:
    faces: Path       # flat folder (stage content)
    identities: Path  # <identity>/<photo>.png (stage align)


@pytest.fixture(scope="session")
def small_faces(tmp_path_factory) -> SmallFaces:
    """CelebRef-HQ photos of 4 people, 4 each, resized to 64 px (never copied into the repository)."""
    source = FACE_DATA / "celebref-mini"
    if not source.is_dir():
        pytest.skip(f"real face photos not found at {source} (shared test resources absent)")
    root = tmp_path_factory.mktemp("faces")
    for person in sorted(source.iterdir())[:IDENTITIES]:
        for photo in sorted((person / "refs").glob("*.jpg"))[:PHOTOS]:
            small = Image.open(photo).convert("RGB").resize((SIZE, SIZE), Image.LANCZOS)
            (root / "identities" / person.name).mkdir(parents=True, exist_ok=True)
            small.save(root / "identities" / person.name / f"{photo.stem}.png")
            (root / "faces").mkdir(exist_ok=True)
            small.save(root / "faces" / f"{person.name}_{photo.stem}.png")
    return SmallFaces(root / "faces", root / "identities")


def copy_tree(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def write_truncated_png(path: Path) -> None:
    """A PNG whose header is fine but whose pixel data is cut: only decoding finds the problem."""
    Image.fromarray(np.full((SIZE, SIZE, 3), 128, np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="session")
def identity_encoder(scripted_models_root, tiny_models):
    """The real encoder path (insightface ArcFace at template landmarks + CLIP) on tiny/fake models."""
    from ridfr_core.faces import load_face_analyzer

    analyzer = load_face_analyzer(models_root=scripted_models_root, device="cpu")
    clip_vision = load_clip_vision(tiny_models.clip_vision, tiny_models.configs)
    return CountingEncoder(analyzer, clip_vision, {"arcface": "w600k_r50.onnx", "clip_vision": "tiny"})


class CountingEncoder(IdentityEncoder):
    calls = 0

    def __call__(self, images):
        CountingEncoder.calls += 1
        return super().__call__(images)


# ----------------------------------------------------------------------------------------------
# Scanning and bad data


def test_scan_skips_unreadable_and_tiny_images_and_counts_them(small_faces, tmp_path):
    folder = copy_tree(small_faces.faces, tmp_path / "faces")
    (folder / "corrupt.jpg").write_bytes(b"not a jpeg at all" * 10)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "tiny.png")
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    paths, report = scan_faces(folder, min_image_size=32)
    assert len(paths) == IDENTITIES * PHOTOS
    assert [p for p, _ in report.unreadable] == ["corrupt.jpg"]
    assert report.too_small == [("tiny.png", "16x16")]
    assert report.skipped_images == 2
    assert "min_image_size=32" in report.summary(32)


def test_an_image_over_the_decompression_bomb_limit_is_skipped_and_reported(small_faces, tmp_path):
    folder = copy_tree(small_faces.faces, tmp_path / "faces")
    side = int((2 * Image.MAX_IMAGE_PIXELS) ** 0.5) + 100
    Image.new("1", (side, side)).save(folder / "huge.png")
    paths, report = scan_faces(folder, min_image_size=32)
    assert len(paths) == IDENTITIES * PHOTOS
    assert [p for p, _ in report.unreadable] == ["huge.png"]
    assert "DecompressionBombError" in report.summary(32)


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"data: no usable images in .*empty"):
        scan_faces(tmp_path / "empty", 32)
    with pytest.raises(DataError, match="is not a folder"):
        scan_faces(tmp_path / "absent", 32)
    with pytest.raises(DataError, match="no identity"):
        scan_identities(tmp_path / "empty", 32, 3)


def test_identities_with_too_few_images_are_excluded_with_a_summary(small_faces, tmp_path):
    root = copy_tree(small_faces.identities, tmp_path / "ids")
    people = sorted(p.name for p in root.iterdir())
    for photo in sorted((root / people[0]).iterdir())[1:]:
        photo.unlink()  # 1 photo
    for photo in sorted((root / people[1]).iterdir())[2:]:
        photo.unlink()  # 2 photos
    groups, report = scan_identities(root, 32, min_images=3)
    assert [g.name for g in groups] == people[2:]
    assert report.excluded_identities == [(people[0], 1), (people[1], 2)]
    assert f"{people[0]} (1)" in report.summary(32, 3)
    groups, report = scan_identities(root, 32, min_images=2)
    assert [g.name for g in groups] == people[1:] and report.excluded_identities == [(people[0], 1)]


def test_identity_stage_on_a_flat_folder_says_what_layout_it_needs(small_faces):
    with pytest.raises(DataError, match="one subfolder per identity"):
        scan_identities(small_faces.faces, 32, 3)


# ----------------------------------------------------------------------------------------------
# Samples and order


def make_dataset(folder: Path, paths=None) -> FaceDataset:
    paths = paths if paths is not None else scan_faces(folder, 32)[0]
    return FaceDataset(paths, SIZE, DegradationConfig(), NOISE, seed=7)


def test_a_sample_is_a_function_of_its_number(small_faces):
    dataset = make_dataset(small_faces.faces)
    first, again, other = dataset[5], make_dataset(small_faces.faces)[5], dataset[6]
    for key in first:
        assert torch.equal(first[key], again[key]), key
    assert not torch.equal(first["noise"], other["noise"])
    assert first["target"].shape == first["lq"].shape == (3, SIZE, SIZE)
    assert first["noise"].shape == first["posterior_noise"].shape == first["lq_posterior_noise"].shape == (4, 8, 8)
    assert not torch.equal(first["posterior_noise"], first["lq_posterior_noise"])
    assert -1 <= first["lq"].min() and first["lq"].max() <= 1
    assert not torch.equal(first["target"], first["lq"])
    assert 0 <= int(first["timestep"]) < NOISE.num_train_timesteps


def test_every_image_is_seen_once_per_epoch_in_a_new_order(small_faces):
    dataset = make_dataset(small_faces.faces)
    size = len(dataset)
    epoch0 = [dataset.order(i) for i in range(size)]
    epoch1 = [dataset.order(size + i) for i in range(size)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(size))
    assert epoch0 != epoch1


def test_step_sampler_splits_each_step_over_processes_and_accumulation():
    per_process = [list(StepBatchSampler(8, 2, 2, rank, 0, 3)) for rank in range(2)]
    assert all(len(batch) == 2 for batches in per_process for batch in batches)
    seen = sorted(i for batches in per_process for batch in batches for i in batch)
    assert seen == list(range(24))
    first_step = {i for batches in per_process for batch in batches[:2] for i in batch}
    assert first_step == set(range(8))
    resumed = list(StepBatchSampler(8, 2, 2, 1, 2, 3))
    assert resumed == per_process[1][4:]
    with pytest.raises(DataError, match="batch_size: 8 is not a multiple"):
        StepBatchSampler(8, 3, 1, 0, 0, 1)


def test_an_image_that_fails_to_decode_is_replaced_and_counted(small_faces, tmp_path):
    broken = tmp_path / "broken.png"
    write_truncated_png(broken)
    good = scan_faces(small_faces.faces, 32)[0][:3]
    dataset = make_dataset(small_faces.faces, [broken, *good])
    position = next(p for p in range(8) if dataset.order(p) == 0)
    sample = dataset[position]
    assert int(sample["skipped"]) == 1
    assert int(dataset[next(p for p in range(8) if dataset.order(p) != 0)]["skipped"]) == 0


# ----------------------------------------------------------------------------------------------
# Identity cache


def build_cache(folder: Path, root: Path, encoder, variants: int = 2) -> tuple[IdentityCache, list]:
    groups, _ = scan_identities(root, 32, 3)
    paths = [p for g in groups for p in g.paths]
    cache = IdentityCache(folder)
    cache.build(root, paths, encoder, variants=variants, min_size=16, max_size=64, seed=0, shard_size=5)
    return IdentityCache(folder), groups


def test_identity_cache_is_built_once_with_distinct_variants(small_faces, identity_encoder, tmp_path):
    root = copy_tree(small_faces.identities, tmp_path / "ids")
    victim = sorted(next(root.iterdir()).iterdir())[0]
    write_truncated_png(victim)
    cache, groups = build_cache(tmp_path / "cache", root, identity_encoder)
    assert len(cache.entries) == IDENTITIES * PHOTOS - 1
    assert list(cache.unreadable) == [victim.relative_to(root).as_posix()]
    key = next(iter(cache.entries))
    (embed0, clip0), (_, clip1) = cache.features(key, 0), cache.features(key, 1)
    assert embed0.shape == (512,) and clip0.shape == (257, 48) and clip0.dtype == torch.float16
    assert abs(float(embed0.norm()) - 1) < 1e-4
    assert not torch.equal(clip0, clip1)  # two independently downsampled versions of the photo
    calls = CountingEncoder.calls
    build_cache(tmp_path / "cache", root, identity_encoder)
    assert CountingEncoder.calls == calls, "a complete cache is reused without recomputing anything"
    with pytest.raises(DataError, match="identity_variants"):
        IdentityCache(tmp_path / "cache").check_settings(variants=3, min_size=16, max_size=64, seed=0)


def test_slices_built_by_several_processes_merge_into_the_one_process_cache(small_faces, identity_encoder, tmp_path):
    """Each process of a multi-process run builds its slice into ``part-N/``; the merge (also of the parts a killed
    run left) gives the cache one process builds, and nothing is computed twice."""
    root = small_faces.identities
    whole, groups = build_cache(tmp_path / "whole", root, identity_encoder)
    paths = [path for group in groups for path in group.paths]
    sliced = IdentityCache(tmp_path / "sliced")
    for process in (0, 1):
        sliced.part(process).build(root, paths[process::2], identity_encoder, variants=2, min_size=16, max_size=64,
                                   seed=0, shard_size=5)
    assert sliced.missing(root, paths) == paths  # parts are not part of the cache until merged
    sliced.merge_parts()
    merged = IdentityCache(tmp_path / "sliced")
    assert merged.entries.keys() == whole.entries.keys() and merged.settings() == whole.settings()
    for key in whole.entries:
        for variant in range(2):
            assert all(torch.equal(a, b) for a, b in zip(merged.features(key, variant), whole.features(key, variant)))
    calls, index = CountingEncoder.calls, (tmp_path / "sliced" / "index.json").read_text()
    merged.merge_parts()
    merged.build(root, paths, identity_encoder, variants=2, min_size=16, max_size=64, seed=0)
    assert CountingEncoder.calls == calls and (tmp_path / "sliced" / "index.json").read_text() == index
    merged.part(2).build(root, paths[:1], identity_encoder, variants=3, min_size=16, max_size=64, seed=0)
    with pytest.raises(DataError, match="part-2 was built with"):
        merged.merge_parts()


def test_align_samples_use_two_other_photos_of_the_same_person(small_faces, identity_encoder, tmp_path):
    cache, groups = build_cache(tmp_path / "cache", small_faces.identities, identity_encoder)
    dataset = AlignDataset(groups, cache, small_faces.identities, SIZE, DegradationConfig(), NOISE, seed=3)
    rng = np.random.default_rng(0)
    for index in range(len(dataset)):
        first, second = dataset.id_photos(index, rng)
        assert len({index, first, second}) == 3
        assert dataset.identity_of[first] == dataset.identity_of[second] == dataset.identity_of[index]
    sample = dataset[0]
    assert sample["id1_embed"].shape == (512,) and sample["id2_clip"].shape == (257, 48)
    assert not torch.equal(sample["id1_embed"], sample["id2_embed"])
