"""``python -m ridfr_core.restore``: the README's main job, end to end on tiny models and real photos."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from shared_data import REPO_ROOT
from ridfr_core.restore import main, resolve_models


def test_without_models_it_lists_every_file_and_folder(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ridfr_core.restore", "--lq", "x.png", "--id", "y.png",
                             "--out", str(tmp_path / "o.png"), "--models", str(tmp_path / "models")],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    for expected in ("checkpoints", "ridfr", "RestorerIDFull.ckpt", "ip-adapter-faceid-plus_sd15.bin",
                     "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", "insightface/models/buffalo_l"):
        assert expected in result.stderr
    command = (f"python -m ridfr_core.models download --backend restorerid --models {tmp_path / 'models'} "
               "--accept-licences")
    assert command in result.stderr  # printed, never run: nothing was created
    assert not (tmp_path / "models").exists()


def test_several_candidates_ask_for_a_choice(tiny_models, ridfr_models_dir, tmp_path, capsys):
    models = tmp_path / "models"
    models.mkdir()
    for folder in ("ridfr", "clip_vision", "insightface"):
        (models / folder).symlink_to(ridfr_models_dir / folder)
    (models / "checkpoints").symlink_to(tiny_models.checkpoint.parent)  # .safetensors and .ckpt
    (models / "ipadapter").mkdir()
    for name in ("ip-adapter-faceid-plusv2_sd15.bin", "my-faceid-plusv2.bin"):
        (models / "ipadapter" / name).symlink_to(tiny_models.adapter_v2)
    args = ["--lq", "x.png", "--id", "y.png", "--out", str(tmp_path / "o.png"), "--models", str(models)]
    assert main(args) == 2
    assert "--base:" in capsys.readouterr().err
    assert main([*args, "--base", tiny_models.checkpoint.name]) == 2
    assert "--adapter:" in capsys.readouterr().err


def test_the_backend_picks_its_faceid_version(tiny_models, ridfr_models_dir, tmp_path):
    """With both FaceID Plus files present, RIDFR weights take v2 (the paper's) without asking."""
    models = tmp_path / "models"
    models.mkdir()
    for folder in ("ridfr", "clip_vision", "insightface", "checkpoints"):
        (models / folder).symlink_to(ridfr_models_dir / folder)
    (models / "ipadapter").symlink_to(tiny_models.adapter_v2.parent)  # plus (v1) and plusv2
    paths = resolve_models(models, {}, need_insightface=True)
    assert paths["backend"] == "ridfr" and paths["adapter"].name == tiny_models.adapter_v2.name


def test_explicit_missing_file_and_unreadable_image_are_named(ridfr_models_dir, tmp_path, capsys):
    args = ["--lq", str(tmp_path / "x.png"), "--id", "y.png", "--out", str(tmp_path / "o.png"),
            "--models", str(ridfr_models_dir)]
    assert main([*args, "--base", str(tmp_path / "elsewhere.safetensors")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "elsewhere.safetensors") in err and "--base" in err
    (tmp_path / "x.png").write_bytes(b"not an image")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--lq" in err and str(tmp_path / "x.png") in err


@pytest.mark.parametrize("models_dir", ["ridfr_models_dir", "restorerid_models_dir"])
def test_restores_a_photo_and_an_aligned_face(tiny_models, models_dir, face_data, tmp_path, request):
    ridfr_models_dir = request.getfixturevalue(models_dir)  # either backend, chosen from the content file
    identity = face_data / "celebref-mini" / "00005"
    lq_face = next(identity.glob("lq_*.png"))
    reference = sorted((identity / "refs").glob("*.jpg"))[0]
    photo = tmp_path / "photo.png"
    Image.open(lq_face).convert("RGB").resize((640, 640)).save(photo)
    common = ["--id", str(reference), "--models", str(ridfr_models_dir), "--steps", "2", "--device", "cpu"]

    out_photo = tmp_path / "restored_photo.png"
    assert main(["--lq", str(photo), "--out", str(out_photo), *common], config_dir=tiny_models.configs) == 0
    before, after = np.asarray(Image.open(photo)), np.asarray(Image.open(out_photo))
    assert after.shape == before.shape
    changed = np.any(before != after, axis=-1)
    assert 0.01 < changed.mean() < 0.9  # the face was pasted back, the rest is untouched

    out_face = tmp_path / "restored_face.png"
    assert main(["--lq", str(lq_face), "--aligned", "--aligned-references", "--out", str(out_face), *common],
                config_dir=tiny_models.configs) == 0
    assert np.asarray(Image.open(out_face)).shape == (512, 512, 3)


@pytest.mark.parametrize("models_dir", ["ridfr_models_dir", "restorerid_models_dir"])
def test_each_face_is_restored_as_the_person_it_resembles(tiny_models, models_dir, face_data, tmp_path, request):
    """A reference of somebody else never changes a face: with keep_original it is left as it was."""
    ridfr_models_dir = request.getfixturevalue(models_dir)
    photo = tmp_path / "photo.png"
    lq_face = next((face_data / "celebref-mini" / "00005").glob("lq_*.png"))
    Image.open(lq_face).convert("RGB").resize((640, 640)).save(photo)
    stranger = tmp_path / "stranger.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (640, 640, 3), dtype=np.uint8)).save(stranger)
    common = ["--lq", str(photo), "--models", str(ridfr_models_dir), "--steps", "2", "--device", "cpu",
              "--unmatched", "keep_original"]

    kept = tmp_path / "kept.png"
    assert main([*common, "--id", str(stranger), "--out", str(kept)], config_dir=tiny_models.configs) == 0
    assert np.array_equal(np.asarray(Image.open(kept)), np.asarray(Image.open(photo)))

    matched = tmp_path / "matched.png"
    assert main([*common, "--id", str(stranger), "--person", str(photo), "--out", str(matched)],
                config_dir=tiny_models.configs) == 0
    assert np.any(np.asarray(Image.open(matched)) != np.asarray(Image.open(photo)))


def test_cheap_options_are_checked_before_any_model_is_looked_for(tmp_path, capsys):
    """With no models at all, a bad option is still the error reported: it is checked first."""
    (tmp_path / "a_file").write_text("not a folder")
    common = {"--lq": "x.png", "--id": "y.png", "--out": str(tmp_path / "o.png"), "--models": str(tmp_path / "none")}
    for changes, expected in (
            ({"--identity-scale": "nan"}, "--identity-scale: nan is not a finite number"),
            ({"--content-scale": "inf"}, "--content-scale: inf is not a finite number"),
            ({"--guidance": "nan"}, "--guidance: nan is not a finite number"),
            ({"--guidance": "-3"}, "--guidance: -3.0 is below 1; give 1 (no guidance"),
            ({"--guidance": "0.5"}, "--guidance: 0.5 is below 1"),
            ({"--content-scale": "-1"}, "--content-scale: -1.0 is negative; give a number >= 0"),
            ({"--identity-scale": "-2"}, "--identity-scale: -2 must be a finite number >= 0"),
            ({"--steps": "201"}, "--steps: 201 is outside 1..200"),
            ({"--steps": "0"}, "--steps: 0 is outside 1..200"),
            ({"--upscale": "0"}, "--upscale: 0.0 is outside"),
            ({"--upscale": "inf"}, "--upscale: inf is not a finite number"),
            ({"--quality": "0"}, "--quality: 0 is outside 1..100"),
            ({"--out": str(tmp_path / "o.gif")}, "unsupported extension '.gif'"),
            ({"--out": str(tmp_path / "o.bmp")}, "unsupported extension '.bmp'"),
            ({"--out": str(tmp_path)}, "is a folder"),
            ({"--out": str(tmp_path / "a_file" / "sub" / "o.png")}, "cannot write into"),
            ({"--device": "tpu"}, "--device: 'tpu' is not one of auto, cuda, cpu"),
            *([({"--device": "cuda"}, "--device cuda: torch")] if not torch.cuda.is_available() else []),
    ):
        args = {**common, **changes}
        assert main([part for pair in args.items() for part in pair]) == 2, changes
        err = capsys.readouterr().err
        assert expected in err, (changes, err)
        assert "model files" not in err


def test_out_never_replaces_an_input(tiny_models, ridfr_models_dir, face_data, tmp_path, capsys):
    identity = face_data / "celebref-mini" / "00005"
    photo = tmp_path / "photo.png"
    Image.open(next(identity.glob("lq_*.png"))).convert("RGB").save(photo)
    reference = tmp_path / "refs" / "reference.png"
    reference.parent.mkdir()
    Image.open(sorted((identity / "refs").glob("*.jpg"))[0]).save(reference)
    (tmp_path / "linked.png").symlink_to(reference)
    before = {path: path.read_bytes() for path in (photo, reference)}
    common = ["--models", str(ridfr_models_dir), "--steps", "1",
              "--device", "cpu", "--aligned", "--aligned-references"]
    for out, refs, named in ((tmp_path / "refs" / ".." / "photo.png", ["--id", str(reference)], "photo.png"),
                             (tmp_path / "linked.png", ["--id", str(reference)], "reference.png"),
                             (tmp_path / "linked.png", ["--person", f"{photo},{reference}"], "reference.png")):
        assert main(["--lq", str(photo), *refs, "--out", str(out), *common], config_dir=tiny_models.configs) == 2
        err = capsys.readouterr().err
        assert "would destroy the original" in err and named in err
    assert all(path.read_bytes() == data for path, data in before.items())


def test_a_jpeg_result_keeps_quality_profile_exif_and_is_upright(tiny_models, ridfr_models_dir, face_data, tmp_path):
    """A camera photo stored sideways (EXIF orientation 6) with a colour profile: with every face kept
    as it was, the JPEG written is the upright photo up to quality-95 encoding, profile and EXIF kept."""
    from PIL import ImageCms

    upright = np.asarray(Image.open(next((face_data / "celebref-mini" / "00005").glob("lq_*.png")))
                         .convert("RGB").resize((640, 640)))
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x0112], exif[0x010F] = 6, "RIDFR test camera"
    photo = tmp_path / "camera.png"
    Image.fromarray(np.rot90(upright)).save(photo, icc_profile=icc, exif=exif.tobytes())
    stranger = tmp_path / "stranger.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (640, 640, 3), dtype=np.uint8)).save(stranger)
    out = tmp_path / "restored.jpg"
    assert main(["--lq", str(photo), "--id", str(stranger), "--out", str(out), "--models", str(ridfr_models_dir),
                 "--steps", "1", "--device", "cpu",
                 "--unmatched", "keep_original"], config_dir=tiny_models.configs) == 0
    with Image.open(out) as written:
        assert written.info.get("icc_profile") == icc
        assert written.getexif()[0x010F] == "RIDFR test camera" and written.getexif()[0x0112] == 1
        error = np.abs(np.asarray(written.convert("RGB"), dtype=int) - upright).mean()
    assert error < 1.0, error  # PIL's default (quality 75, 4:2:0 chroma) is several times worse


def test_nan_weights_fail_naming_the_module_instead_of_writing_black(tiny_models, ridfr_models_dir, face_data,
                                                                      tmp_path, capsys):
    from ridfr_core.backends import load_content
    from ridfr_core.backends.ridfr.files import save_content

    models = tmp_path / "models"
    models.mkdir()
    for folder in ("checkpoints", "ipadapter", "clip_vision", "insightface"):
        (models / folder).symlink_to(ridfr_models_dir / folder)
    content = load_content(tiny_models.content)
    with torch.no_grad():
        next(content.parameters()).fill_(float("nan"))
    save_content(content, models / "ridfr" / "nan.safetensors")
    identity = face_data / "celebref-mini" / "00005"
    out = tmp_path / "restored.png"
    assert main(["--lq", str(next(identity.glob("lq_*.png"))), "--id", str(sorted((identity / "refs").glob("*.jpg"))[0]),
                 "--out", str(out), "--models", str(models), "--steps", "1", "--device", "cpu", "--aligned",
                 "--aligned-references"],
                config_dir=tiny_models.configs) == 2
    err = capsys.readouterr().err
    assert "NaN/inf" in err and "RIDFR content module" in err
    assert not out.exists()



def restore_aligned_face(models, face_data, out, dtype, *options, config_dir=None) -> np.ndarray:
    identity = face_data / "celebref-mini" / "00005"
    lq, reference = next(identity.glob("lq_*.png")), sorted((identity / "refs").glob("*.jpg"))[0]
    assert main(["--lq", str(lq), "--id", str(reference), "--aligned", "--aligned-references", "--out", str(out),
                 "--models", str(models), "--steps", "1", "--device", "cpu", "--dtype", dtype, *options],
                config_dir=config_dir) == 0, dtype
    return np.asarray(Image.open(out)).astype(np.float32)


def assert_alike(results: dict[str, np.ndarray], lq: np.ndarray) -> None:
    """Half precision restores as float32 does: much closer to it than the restoration is to the input."""
    reference = results.pop("float32")
    change = np.abs(reference - lq).mean()
    assert change > 1.0  # the sampler changed the face
    for dtype, result in results.items():
        assert result.shape == reference.shape == (512, 512, 3)
        assert np.abs(result - reference).mean() < change / 4, dtype


def lq_face(face_data) -> np.ndarray:
    path = next((face_data / "celebref-mini" / "00005").glob("lq_*.png"))
    return np.asarray(Image.open(path).convert("RGB")).astype(np.float32)


def test_publisher_made_files_restore_in_float32_and_bfloat16(golden_models_dir, face_data, tmp_path):
    """RestorerID weights and SD1.5 base from one publisher-made LDM checkpoint, an fp16 FaceID .bin, the CLIP
    tower under its published names: the CLI restores with them (architectures from <models>/ridfr/configs).
    float16 runs on the tiny fixtures below: CPU float16 convolutions are too slow for this SD1.5-deep model."""
    results = {dtype: restore_aligned_face(golden_models_dir, face_data, tmp_path / f"{dtype}.png", dtype,
                                           "--identity-scale", "0.75", "--guidance", "1")
               for dtype in ("float32", "bfloat16")}
    assert_alike(results, lq_face(face_data))


@pytest.mark.parametrize("models_dir", ["ridfr_models_dir", "restorerid_models_dir"])
def test_both_backends_restore_in_every_dtype(tiny_models, models_dir, face_data, tmp_path, request):
    """fp16 FaceID and SD1.5 files, fp32 content weights: one compute dtype whatever the files hold."""
    models = request.getfixturevalue(models_dir)
    results = {dtype: restore_aligned_face(models, face_data, tmp_path / f"{dtype}.png", dtype,
                                           config_dir=tiny_models.configs)
               for dtype in ("float32", "float16", "bfloat16")}
    assert_alike(results, lq_face(face_data))


def test_dtype_is_checked_before_models_are_looked_for(tmp_path, capsys):
    assert main(["--lq", "x.png", "--id", "y.png", "--out", str(tmp_path / "o.png"), "--models", str(tmp_path),
                 "--dtype", "fp8"]) == 2
    err = capsys.readouterr().err
    assert "--dtype: 'fp8' is not one of auto, float32, float16, bfloat16" in err and "model files" not in err
