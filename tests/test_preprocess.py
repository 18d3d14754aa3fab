"""The paper's SwinIR pre-processing (``--preprocess``): spandrel loading of tiny SwinIR files in the published
layouts, tiling, errors, and the restore and evaluation CLIs feeding the cleaned face to the restorer."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from shared_data import FACES, needs_faces
from ridfr_core import eval as evaluation
from ridfr_core.weights.checkpoints import CheckpointError
from ridfr_core.io.images import list_images, read_rgb, write_rgb
from ridfr_core.preprocess import PreprocessError, load_preprocessor, tiled
from ridfr_core.restore import main as restore_main
from tiny_upscale_models import write_diffbir_swinir, write_official_swinir_x2, write_realesrgan_compact_x2



@pytest.fixture(scope="module")
def swinir_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("upscale_models")
    diffbir, x2 = folder / "face_swinir_tiny.safetensors", folder / "swinir_x2_tiny.pth"
    return {"diffbir": (diffbir, write_diffbir_swinir(diffbir)), "x2": (x2, write_official_swinir_x2(x2))}


def unrestored(lq: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The no-restoration baseline of an evaluation: the (pre-processed) LQ face itself."""
    return lq


def test_spandrel_recognises_both_layouts_and_the_output_is_the_models(swinir_files):
    faces = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for name, scale in (("diffbir", 1), ("x2", 2)):
        path, module = swinir_files[name]
        preprocessor = load_preprocessor(path)
        assert (preprocessor.architecture, preprocessor.scale) == ("SwinIR", scale)
        with torch.no_grad():
            expected = module(faces).clamp(0, 1)
        if scale != 1:
            assert expected.shape[-1] == 64 * scale
            expected = F.interpolate(expected, size=(64, 64), mode="bicubic", antialias=True).clamp(0, 1)
        got = preprocessor(faces)
        assert got.shape == faces.shape and got.dtype == faces.dtype
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert (got - faces).abs().mean() > 0.01  # it did something


def test_it_runs_in_the_pipeline_float16_where_the_model_supports_it(swinir_files, tmp_path):
    """Real-ESRGAN runs in a float16 pipeline's dtype; SwinIR (no float16 in spandrel) and any bfloat16 request
    run in float32. Faces come back in the caller's dtype."""
    faces = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    swinir = load_preprocessor(swinir_files["x2"][0])
    for dtype in (torch.float16, torch.bfloat16):
        assert swinir.to("cpu", dtype).model.dtype == torch.float32
    write_realesrgan_compact_x2(tmp_path / "realesr_compact_x2.pth")
    compact = load_preprocessor(tmp_path / "realesr_compact_x2.pth")
    assert (compact.architecture, compact.scale) == ("RealESRGAN Compact", 2)
    in_float32 = compact(faces)
    assert compact.to("cpu", torch.float16).model.dtype == torch.float16
    in_float16 = compact(faces)
    assert in_float16.dtype == torch.float32 and (in_float16 - in_float32).abs().max() < 0.01
    assert (in_float32 - faces).abs().mean() > 0.01


def test_a_name_is_found_in_models_upscale_models(swinir_files, tmp_path):
    path, _ = swinir_files["diffbir"]
    (tmp_path / "upscale_models").mkdir()
    (tmp_path / "upscale_models" / path.name).symlink_to(path)
    assert load_preprocessor(path.name, tmp_path).path == tmp_path / "upscale_models" / path.name
    with pytest.raises(PreprocessError, match=f"--preprocess other.pth: neither a file nor a file in {tmp_path}"):
        load_preprocessor("other.pth", tmp_path)


def test_tiles_blend_to_the_whole_image_result(swinir_files):
    image = torch.rand(1, 3, 150, 230, generator=torch.Generator().manual_seed(1))
    pointwise = lambda tile: F.interpolate(tile, scale_factor=2, mode="nearest") * 0.5 + 0.1  # noqa: E731
    torch.testing.assert_close(tiled(pointwise, image, 2, tile=64, overlap=8), pointwise(image), atol=1e-6, rtol=0)

    whole = load_preprocessor(swinir_files["diffbir"][0], tile=512)
    in_tiles = load_preprocessor(swinir_files["diffbir"][0], tile=128)
    image = torch.rand(1, 3, 192, 320, generator=torch.Generator().manual_seed(2))
    difference = (in_tiles(image) - whole(image)).abs()
    assert difference.mean() < 0.01 and difference.max() < 0.2  # SwinIR sees less context at the seams only


def test_unusable_files_are_clear_errors(tmp_path):
    with pytest.raises(PreprocessError, match="--preprocess .*missing.pth: neither a file"):
        load_preprocessor(tmp_path / "missing.pth")
    unknown = tmp_path / "unknown.safetensors"
    save_file({"encoder.weight": torch.zeros(4, 4)}, str(unknown))
    with pytest.raises(PreprocessError, match="does not recognise this model's architecture"):
        load_preprocessor(unknown)
    pickled_code = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), pickled_code)  # a whole pickled module: never unpickled
    with pytest.raises(CheckpointError, match="--preprocess: .*module.pth holds Python objects besides tensors"):
        load_preprocessor(pickled_code)
    notes = tmp_path / "notes.pth"
    notes.write_text("SwinIR settings: tile 512\n")  # torch.load's own answer: IndexError: pop from empty list
    with pytest.raises(CheckpointError, match="--preprocess: .*notes.pth is no weight file: neither a PyTorch file"):
        load_preprocessor(notes)


@needs_faces
def test_restore_cli_feeds_the_preprocessed_face_to_ridfr(swinir_files, tiny_models, ridfr_models_dir, tmp_path,
                                                          capsys, caplog):
    """--preprocess restores what RIDFR restores from the cleaned face (up to its 8-bit rounding), not the LQ."""
    path, _ = swinir_files["diffbir"]
    models = tmp_path / "models"
    models.mkdir()
    for folder in ("checkpoints", "ridfr", "ipadapter", "clip_vision", "insightface"):
        (models / folder).symlink_to(ridfr_models_dir / folder)
    (models / "upscale_models").mkdir()
    (models / "upscale_models" / path.name).symlink_to(path)
    identity = FACES / "00005"
    lq = next(identity.glob("lq_*.png"))
    cleaned = tmp_path / "cleaned.png"
    write_rgb(cleaned, load_preprocessor(path).apply_rgb(read_rgb(lq)))
    common = ["--id", str(sorted((identity / "refs").glob("*.jpg"))[0]), "--aligned", "--aligned-references",
              "--models", str(models), "--steps", "2", "--device", "cpu"]

    caplog.set_level(logging.INFO)
    outputs = {}
    for name, args in (("preprocessed", ["--lq", str(lq), "--preprocess", path.name]),
                       ("from_cleaned", ["--lq", str(cleaned)]), ("plain", ["--lq", str(lq)])):
        assert restore_main([*args, *common, "--out", str(tmp_path / f"{name}.png")],
                            config_dir=tiny_models.configs) == 0, capsys.readouterr().err
        outputs[name] = read_rgb(tmp_path / f"{name}.png").astype(np.int16)
    assert "pre-processing: SwinIR x1 (face_swinir_tiny.safetensors) on cpu float32" in caplog.text
    assert np.abs(outputs["preprocessed"] - outputs["from_cleaned"]).mean() < 0.5
    assert np.abs(outputs["preprocessed"] - outputs["plain"]).mean() > 2


def test_restore_cli_names_a_bad_preprocess_file_before_loading_models(ridfr_models_dir, tmp_path, capsys):
    image = tmp_path / "face.png"
    write_rgb(image, np.full((64, 64, 3), 128, np.uint8))
    assert restore_main(["--lq", str(image), "--id", str(image), "--out", str(tmp_path / "o.png"),
                         "--models", str(ridfr_models_dir), "--preprocess", "4x-missing.pth"]) == 2
    err = capsys.readouterr().err
    assert "--preprocess 4x-missing.pth: neither a file nor a file in" in err and "upscale_models" in err


@needs_faces
def test_evaluation_run_restores_preprocessed_faces_and_records_the_model(swinir_files, tmp_path, capsys):
    path, _ = swinir_files["x2"]
    out = tmp_path / "run"
    assert evaluation.main(["run", "--celebref", str(FACES), "--glob", "refs/*.jpg", "--num-test-ids", "2",
                            "--max-images-per-id", "1", "--size", "64", "--restorer", "test_preprocess:unrestored",
                            "--preprocess", str(path), "--recognisers", "", "--iqa", "", "--out", str(out)]) == 0
    assert "pre-processing every LQ face with SwinIR x2" in capsys.readouterr().out
    record = json.loads((out / "preprocess.json").read_text())
    assert record["architecture"] == "SwinIR" and record["scale"] == 2 and len(record["sha256"]) == 64
    preprocessor = load_preprocessor(path)
    lq_faces = list_images(out / "data" / "lq")
    assert len(lq_faces) == 2
    for lq in lq_faces:
        restored = list_images(out / "restored" / lq.stem)
        assert len(restored) == 1
        np.testing.assert_array_equal(read_rgb(restored[0]), preprocessor.apply_rgb(read_rgb(lq)))
    assert json.loads((out / "scores" / "summary.json").read_text())["cases"] == 2


@pytest.fixture(scope="module")
def restorerid_musiq_models(swinir_files, restorerid_models_dir, tmp_path_factory):
    """RestorerID's public files, MUSIQ weights (published layout, random values) and the tiny DiffBIR SwinIR."""
    from test_musiq import random_state

    from ridfr_core.models.registry import MUSIQ_KONIQ

    models = tmp_path_factory.mktemp("restorerid_musiq_models")
    for entry in restorerid_models_dir.iterdir():
        (models / entry.name).symlink_to(entry.resolve())
    (models / MUSIQ_KONIQ.folder).mkdir()
    torch.save(random_state(), models / MUSIQ_KONIQ.relative)
    (models / "upscale_models").mkdir()
    (models / "upscale_models" / swinir_files["diffbir"][0].name).symlink_to(swinir_files["diffbir"][0])
    return models


def logged_musiq(text: str) -> list[float]:
    return [float(score) for score in re.findall(r"identity scale: auto -> \S+ for face \d+ \(MUSIQ (\S+)\)", text)]


@needs_faces
def test_auto_identity_scale_scores_the_raw_lq_face_not_the_preprocessed_one(restorerid_musiq_models, swinir_files,
                                                                            tiny_models, tmp_path, caplog):
    """RestorerID's "auto" scale comes from the MUSIQ of the LQ face as given; the SwinIR-cleaned face scores
    otherwise (in real use far higher: identity off)."""
    from ridfr_core.models.registry import MUSIQ_KONIQ
    from ridfr_core.musiq import load_musiq

    identity = FACES / "00005"
    lq = next(identity.glob("lq_*.png"))
    raw = torch.from_numpy(read_rgb(lq)).permute(2, 0, 1)[None].float() / 255
    musiq = load_musiq(restorerid_musiq_models / MUSIQ_KONIQ.relative)
    raw_score = float(musiq(raw))
    cleaned_score = float(musiq(load_preprocessor(swinir_files["diffbir"][0])(raw)))
    assert abs(raw_score - cleaned_score) > 0.5  # the two are told apart

    caplog.set_level(logging.INFO)
    assert restore_main(["--lq", str(lq), "--aligned", "--aligned-references", "--id",
                         str(sorted((identity / "refs").glob("*.jpg"))[0]), "--models", str(restorerid_musiq_models),
                         "--preprocess", swinir_files["diffbir"][0].name, "--steps", "1", "--device", "cpu",
                         "--out", str(tmp_path / "restored.png")], config_dir=tiny_models.configs) == 0
    assert logged_musiq(caplog.text) == [pytest.approx(raw_score, abs=0.06)]


@needs_faces
def test_an_archive_scores_the_raw_lq_faces_with_or_without_preprocess(restorerid_musiq_models, swinir_files,
                                                                       tiny_models, tmp_path):
    """The manifest's per-face "auto" identity scale is that of the faces as detected: pre-processing them
    does not change it."""
    from ridfr_core.archive.manifest import read_records

    identity = FACES / "00005"
    albums = tmp_path / "albums"
    albums.mkdir()
    (albums / "photo.png").symlink_to(next(identity.glob("lq_*.png")))
    scales = {}
    for name, more in (("plain", []), ("preprocessed", ["--preprocess", swinir_files["diffbir"][0].name])):
        out = tmp_path / name
        assert restore_main(["--lq", str(albums), "--id", str(sorted((identity / "refs").glob("*.jpg"))[0]),
                             "--models", str(restorerid_musiq_models), "--steps", "1", "--device", "cpu",
                             "--out", str(out), *more], config_dir=tiny_models.configs) == 0
        scales[name] = [face["identity_scale"] for record in read_records(out / "manifest.jsonl")
                        for face in record["faces"]]
    assert len(scales["plain"]) == 1 and scales["plain"] != [0.75]  # MUSIQ's, not the fixed fallback
    assert scales["preprocessed"] == pytest.approx(scales["plain"], rel=1e-4)
