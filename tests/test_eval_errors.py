"""ridfr_core.eval refuses what it cannot do right, in one line and before any restoration."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from ridfr_core import eval as evaluation
from ridfr_core import restore
from ridfr_core.io.images import write_rgb
from shared_data import FACES, needs_faces
from test_eval import synthetic_celebref  # noqa: F401 (fixture)

NO_METRICS = ["--recognisers", "", "--iqa", ""]


def test_two_images_of_one_case_are_refused_not_picked(tmp_path, capsys):
    face = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    write_rgb(tmp_path / "gt" / "case.png", face)
    write_rgb(tmp_path / "restored" / "case.png", face)
    write_rgb(tmp_path / "restored" / "case.jpg", 255 - face)
    args = ["score", "--restored", str(tmp_path / "restored"), "--gt", str(tmp_path / "gt"), "--out",
            str(tmp_path / "scores"), *NO_METRICS]
    assert evaluation.main(args) == 2
    err = capsys.readouterr().err
    assert "case.jpg and case.png are both 'case'" in err
    (tmp_path / "restored" / "case.jpg").unlink()
    write_rgb(tmp_path / "gt" / "case.jpg", face)  # the same ambiguity among the ground truths
    assert evaluation.main(args) == 2
    assert "are both 'case'" in capsys.readouterr().err


def test_counts_and_sizes_below_one_are_clear_errors(synthetic_celebref, tmp_path, capsys):  # noqa: F811
    for number in ("0", "-1"):
        assert evaluation.main(["split", "--celebref", str(synthetic_celebref), "--num-test-ids", number,
                                "--out", str(tmp_path / "split")]) == 2
        assert f"--num-test-ids {number}: hold out at least 1" in capsys.readouterr().err
    assert evaluation.main(["split", "--celebref", str(synthetic_celebref), "--num-test-ids", "1",
                            "--max-images-per-id", "0", "--out", str(tmp_path / "split")]) == 2
    assert "--max-images-per-id 0" in capsys.readouterr().err
    assert evaluation.main(["split", "--celebref", str(synthetic_celebref), "--num-test-ids", "2",
                            "--out", str(tmp_path / "split")]) == 0
    assert evaluation.main(["degrade", "--split", str(tmp_path / "split" / "split.json"), "--size", "0",
                            "--out", str(tmp_path / "data")]) == 2
    assert "--size 0: give the face size" in capsys.readouterr().err
    assert evaluation.main(["degrade", "--split", str(tmp_path / "split" / "split.json"), "--size", "64",
                            "--out", str(tmp_path / "data")]) == 0
    assert evaluation.main(["run", "--data", str(tmp_path / "data"), "--size", "64", "--refs-per-case", "0",
                            "--restorer", "numpy:maximum", "--out", str(tmp_path / "run"), *NO_METRICS]) == 2
    assert "--refs-per-case 0" in capsys.readouterr().err


@pytest.fixture()
def degraded_at(synthetic_celebref, tmp_path):  # noqa: F811
    def degrade(size: int):
        split = evaluation.build_split(synthetic_celebref, num_test_ids=1, seed=0)
        return evaluation.degrade_split(split, tmp_path / f"data{size}", size=size).parent
    return degrade


def test_run_on_data_of_another_size_fails_before_restoring(degraded_at, tmp_path, capsys):
    out = tmp_path / "run"
    assert evaluation.main(["run", "--data", str(degraded_at(256)), "--out", str(out), "--models",
                            str(tmp_path / "no_models"), *NO_METRICS]) == 2
    err = capsys.readouterr().err
    assert "is 256x256, but --size is 512" in err and "Degrade again with --size 512" in err
    assert not out.exists()
    with pytest.raises(ValueError, match="the LQ face is 256x256; RIDFR restores 512x512"):
        restore.AlignedFaceRestorer(tmp_path / "no_models")(np.zeros((256, 256, 3), np.uint8),
                                                            np.zeros((512, 512, 3), np.uint8))


def test_run_with_missing_models_is_a_clear_error(degraded_at, tmp_path, capsys):
    assert evaluation.main(["run", "--data", str(degraded_at(512)), "--out", str(tmp_path / "run"), "--models",
                            str(tmp_path / "no_models"), *NO_METRICS]) == 2
    err = capsys.readouterr().err
    assert "RIDFR needs these model files" in err and str(tmp_path / "no_models" / "checkpoints") in err
    assert "Traceback" not in err
    assert not list((tmp_path / "run").rglob("*.png"))


def degrade_with(split_value, tmp_path, out=None):
    split = tmp_path / "edited_split.json"
    split.write_text(json.dumps(split_value))
    out = out or tmp_path / "data"
    return evaluation.main(["degrade", "--split", str(split), "--size", "32", "--out", str(out)])


@pytest.mark.parametrize("name", ["../../../escaped_case", "/abs/escaped_case", "sub/case", "..", ""])
def test_a_case_name_of_an_edited_split_never_writes_outside_out(synthetic_celebref, tmp_path, capsys, name):  # noqa: F811
    split = evaluation.build_split(synthetic_celebref, num_test_ids=1, seed=0)
    split["cases"][0]["case"] = name
    victim = tmp_path / "escaped_case.png"
    victim.write_text("a user's file")
    assert degrade_with(split, tmp_path, out=tmp_path / "deep" / "data") == 2  # data/gt/../../.. is tmp_path
    assert "is not a plain file name" in capsys.readouterr().err
    assert victim.read_text() == "a user's file"
    assert [path.name for path in tmp_path.rglob("*escaped_case*")] == ["escaped_case.png"]
    split["cases"][0]["case"] = "fine"
    split["cases"][0]["refs"] = ["id1/.."]
    assert degrade_with(split, tmp_path) == 2
    assert "reference '..' is not a plain file name" in capsys.readouterr().err


@pytest.mark.parametrize("value, message", [
    ([], "holds a JSON list, not the object"), ({"cases": []}, "field 'celebref_root' is missing"),
    ({"celebref_root": "x", "cases": {}}, "field 'cases' is not a list"),
    ({"celebref_root": "x", "cases": []}, "'cases' is empty"),
    ({"celebref_root": "x", "cases": [{"case": "a", "gt": "a.png"}]}, "case 0 has no valid refs")])
def test_a_malformed_split_names_the_field(tmp_path, capsys, value, message):
    assert degrade_with(value, tmp_path) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: --split:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "data").exists()


@pytest.fixture()
def models_with_configs(ridfr_models_dir, tiny_models, tmp_path):
    """The tiny models folder with the tiny architectures in ridfr/configs, where `restore` finds them."""
    root = tmp_path / "models"
    root.mkdir()
    for entry in ridfr_models_dir.iterdir():
        (root / entry.name).symlink_to(entry.resolve())
    (root / "ridfr").unlink()
    (root / "ridfr").mkdir()
    for weights in (ridfr_models_dir / "ridfr").iterdir():
        (root / "ridfr" / weights.name).symlink_to(weights.resolve())
    (root / "ridfr" / "configs").symlink_to(tiny_models.configs)
    return root


@needs_faces
def test_run_reads_the_architectures_in_models_ridfr_configs_as_restore_does(models_with_configs, tmp_path):
    out = tmp_path / "run"
    assert evaluation.main(["run", "--celebref", str(FACES), "--glob", "refs/*.jpg", "--num-test-ids", "1",
                            "--max-images-per-id", "1", "--models", str(models_with_configs), "--steps", "1",
                            *NO_METRICS, "--out", str(out)]) == 0  # no config_dir given: found in the models
    assert len(list((out / "restored").rglob("*.png"))) == 1


def test_run_checks_steps_and_models_before_splitting_or_loading(synthetic_celebref, models_with_configs,  # noqa: F811
                                                                 tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    common = ["run", "--celebref", str(synthetic_celebref), "--num-test-ids", "1", "--size", "512", *NO_METRICS]
    out = tmp_path / "run"
    assert evaluation.main([*common, "--models", str(models_with_configs), "--steps", "0", "--out", str(out)]) == 2
    assert "--steps: 0 is outside 1..200" in capsys.readouterr().err
    assert "content backend" not in caplog.text and not out.exists()  # no model loaded, nothing split
    assert evaluation.main([*common, "--models", str(tmp_path / "no_models"), "--out", str(out)]) == 2
    assert "RIDFR needs these model files" in capsys.readouterr().err
    assert not out.exists()  # refused before the split and the degradation


def test_two_cases_of_one_name_are_refused_naming_both(synthetic_celebref, tmp_path, capsys):  # noqa: F811
    """Both cases wrote gt/same.png, lq/same.png and refs/same/: the second overwrote the first, silently."""
    split = evaluation.build_split(synthetic_celebref, num_test_ids=2, seed=0)
    first, second = split["cases"][0], split["cases"][-1]
    first["case"], second["case"] = "same", "Same"  # one file on Windows and macOS
    assert degrade_with(split, tmp_path) == 2
    err = capsys.readouterr().err
    last = len(split["cases"]) - 1
    assert f"case 0 ('same', gt {first['gt']}) and case {last} ('Same', gt {second['gt']})" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "data").exists()
    second["case"] = "other"
    second["refs"] = [second["refs"][0], "elsewhere/" + Path(second["refs"][0]).name]
    assert degrade_with(split, tmp_path) == 2
    assert f"case {last} ('other') has references {second['refs'][0]} and elsewhere/" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    (lambda case, notes: case.update(refs=[]), "case 0 ('{name}') has no references ('refs' is empty)"),
    (lambda case, notes: case["refs"].append(str(notes)), "case 0 ('{name}'): its reference {notes} is not a "
                                                          "readable image (UnidentifiedImageError"),
    (lambda case, notes: case.update(gt="id9/missing.png"), "its ground truth {root}/id9/missing.png is not a "
                                                            "readable image (FileNotFoundError")],
    ids=["no references", "a text file as reference", "a missing ground truth"])
def test_a_case_without_usable_references_is_refused_before_any_case_is_written(synthetic_celebref, tmp_path, capsys,  # noqa: F811
                                                                                 change, message):
    notes = tmp_path / "hostname"
    notes.write_text("a host name, not a photo\n")
    split = evaluation.build_split(synthetic_celebref, num_test_ids=2, seed=0)
    name = split["cases"][0]["case"]
    change(split["cases"][0], notes)
    assert degrade_with(split, tmp_path) == 2
    err = capsys.readouterr().err
    assert message.format(name=name, notes=notes, root=synthetic_celebref) in err and err.startswith("error: --split:")
    assert not (tmp_path / "data").exists()


def test_degrade_shows_its_progress_with_the_case_count(synthetic_celebref, tmp_path, capsys):  # noqa: F811
    split = evaluation.build_split(synthetic_celebref, num_test_ids=3, seed=0)
    assert degrade_with(split, tmp_path) == 0
    count = len(split["cases"])
    err = capsys.readouterr().err
    assert "degrade: 100%" in err and f"{count}/{count} [" in err  # tqdm's count, then elapsed<ETA and the rate
