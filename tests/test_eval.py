"""ridfr_core.eval: reproducible split and degradation, and the scoring command end to end."""

import csv
import json

import cv2
import numpy as np
import pytest

from ridfr_core import eval as evaluation
from ridfr_core.eval_scores import image_with_stem
from ridfr_core.data.degrade import jpeg_roundtrip
from ridfr_core.io.images import list_images, read_rgb, write_rgb
from shared_data import FACES, needs_faces



@pytest.fixture()
def synthetic_celebref(tmp_path):
    """Five identities with 1-4 small images each (identity 'id0' has one image: never a test case)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "celebref"
    for identity, count in (("id0", 1), ("id1", 2), ("id2", 3), ("id3", 4), ("id4", 2)):
        for index in range(count):
            path = root / identity / f"{index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    return root


def test_split_is_seeded_and_holds_out_whole_identities(synthetic_celebref):
    split = evaluation.build_split(synthetic_celebref, num_test_ids=2, seed=3)
    assert split == evaluation.build_split(synthetic_celebref, num_test_ids=2, seed=3)
    assert len(split["test_ids"]) == 2 and "id0" not in split["test_ids"] + split["train_ids"]
    assert set(split["test_ids"]).isdisjoint(split["train_ids"])
    for case in split["cases"]:
        assert case["identity"] in split["test_ids"]
        assert case["gt"] not in case["refs"] and case["refs"]
        assert all(ref.startswith(case["identity"] + "/") for ref in case["refs"])
    seeds = {tuple(evaluation.build_split(synthetic_celebref, 2, seed)["test_ids"]) for seed in range(6)}
    assert len(seeds) > 1
    with pytest.raises(ValueError, match="--num-test-ids 9"):
        evaluation.build_split(synthetic_celebref, num_test_ids=9)


def test_degrade_split_is_reproducible(synthetic_celebref, tmp_path):
    split = evaluation.build_split(synthetic_celebref, num_test_ids=2, seed=0)
    evaluation.write_split(split, tmp_path / "split")
    assert (tmp_path / "split" / "test_files.txt").read_text().split() == [c["gt"] for c in split["cases"]]
    first = evaluation.degrade_split(split, tmp_path / "a", seed=5, size=64)
    evaluation.degrade_split(split, tmp_path / "b", seed=5, size=64)
    for case in split["cases"]:
        lq_a = (tmp_path / "a" / "lq" / f"{case['case']}.png").read_bytes()
        assert lq_a == (tmp_path / "b" / "lq" / f"{case['case']}.png").read_bytes()
        assert len(list_images(tmp_path / "a" / "refs" / case["case"])) == len(case["refs"])
    manifest = json.loads(first.read_text())
    assert manifest["seed"] == 5 and set(manifest["params"]) == {c["case"] for c in split["cases"]}


def test_score_reports_missing_restorations(tmp_path, capsys):
    gt = tmp_path / "gt"
    gt.mkdir()
    cv2.imwrite(str(gt / "a.png"), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "restored").mkdir()
    code = evaluation.main(["--restored", str(tmp_path / "restored"), "--gt", str(gt), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "--restored" in capsys.readouterr().err


def test_unimportable_restorer_is_a_clear_error():
    with pytest.raises(ValueError, match="--restorer no_such_module:restore"):
        evaluation.load_restorer("no_such_module:restore")
    with pytest.raises(ValueError, match="--restorer ridfr_core.restore: expected module:function"):
        evaluation.load_restorer("ridfr_core.restore")


def test_unreadable_split_or_config_names_the_option(tmp_path, capsys):
    assert evaluation.main(["degrade", "--split", str(tmp_path / "missing.json"), "--out", str(tmp_path / "d")]) == 2
    assert "--split" in capsys.readouterr().err
    split = tmp_path / "split.json"
    split.write_text('{"cases": []}')
    (tmp_path / "bad.json").write_text("{blur_sigma: [1, 2]")
    assert evaluation.main(["degrade", "--split", str(split), "--config", str(tmp_path / "bad.json"),
                            "--out", str(tmp_path / "d")]) == 2
    assert "--config" in capsys.readouterr().err


def test_single_restorations_are_found_by_exact_stem(tmp_path):
    for name in ("a.b.png", "a.png.txt", "a.png", "[x].png"):
        (tmp_path / name).write_bytes(b"")
    assert image_with_stem(tmp_path, "a") == tmp_path / "a.png"  # images only
    assert image_with_stem(tmp_path, "[x]") == tmp_path / "[x].png"  # glob characters are literal
    assert image_with_stem(tmp_path, "b") is None
    (tmp_path / "a.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="a.jpg and a.png are both 'a'.*ambiguous"):
        image_with_stem(tmp_path, "a")


@needs_faces
def test_end_to_end_on_real_faces(tmp_path, capsys):
    """split -> degrade -> (stand-in restorations: mild JPEG of GT, one per reference) -> score."""
    split_dir, data = tmp_path / "split", tmp_path / "data"
    assert evaluation.main(["split", "--celebref", str(FACES), "--glob", "refs/*.jpg", "--num-test-ids", "2",
                            "--max-images-per-id", "2", "--out", str(split_dir)]) == 0
    assert evaluation.main(["degrade", "--split", str(split_dir / "split.json"), "--out", str(data)]) == 0
    cases = [p.stem for p in list_images(data / "gt")]
    assert len(cases) == 4

    restored = tmp_path / "restored"
    for case in cases:
        gt = read_rgb(data / "gt" / f"{case}.png")
        for quality, ref in zip((60, 90), list_images(data / "refs" / case)):
            write_rgb(restored / case / f"{ref.stem}.png", jpeg_roundtrip(gt, quality))
    out = tmp_path / "scores"
    assert evaluation.main(["--restored", str(restored), "--gt", str(data / "gt"), "--refs", str(data / "refs"),
                            "--lq", str(data / "lq"), "--out", str(out), "--grid-rows", "2"]) == 0

    summary = json.loads((out / "summary.json").read_text())
    scores = summary["metrics"]
    assert summary["cases"] == 4 and summary["restorations"] == 8
    assert scores["psnr_y"] > 30 and scores["ssim_y"] > 0.85
    for name in ("dlib", "facenet"):
        assert scores[f"ids_hq_{name}"] > 0.9
        assert 0 <= scores[f"identity_variance_{name}"] < 0.05
    assert "--arcface-model" in summary["skipped"]["ids_hq_arcface"]
    assert {"lpips", "musiq", "maniqa", "clipiqa"} <= set(summary["skipped"]) | set(scores)
    with open(out / "per_case.csv") as handle:
        assert [row["case"] for row in csv.DictReader(handle)] == cases
    assert cv2.imread(str(out / "grid.png")).shape == (32 + 2 * 256, 4 * 256, 3)
    printed = capsys.readouterr().out
    assert "ids_hq_facenet" in printed and "skipped" in printed

    # The degraded inputs themselves must score worse on identity than the near-copies.
    lq_scores = evaluation.evaluate(data / "lq", data / "gt", tmp_path / "lq_scores", iqa=(), recognisers=("facenet",))
    assert lq_scores["metrics"]["ids_hq_facenet"] < scores["ids_hq_facenet"]
    assert "identity_variance_facenet" in lq_scores["skipped"]


def test_run_evaluation_with_a_callable_restorer(synthetic_celebref, tmp_path):
    split = evaluation.build_split(synthetic_celebref, num_test_ids=2, seed=0)
    evaluation.degrade_split(split, tmp_path / "data", size=64)
    summary = evaluation.run_evaluation(
        tmp_path / "data", tmp_path / "out", lambda lq, ref: lq, refs_per_case=2, recognisers=(), iqa=()
    )
    restored = tmp_path / "out" / "restored"
    for case in split["cases"]:
        assert len(list_images(restored / case["case"])) == min(2, len(case["refs"]))
    assert summary["cases"] == len(split["cases"]) and np.isfinite(summary["metrics"]["psnr_y"])
    assert (tmp_path / "out" / "scores" / "grid.png").is_file()


@needs_faces
@pytest.mark.parametrize("models_dir", ["ridfr_models_dir", "restorerid_models_dir"])
def test_run_restores_with_either_backend_and_scores(models_dir, tiny_models, tmp_path, request):
    """The one-command evaluation with the real restorer (tiny weights): split, degrade, restore, score;
    the backend is the one whose weights are in the models folder."""
    out = tmp_path / "run"
    assert evaluation.main(["run", "--celebref", str(FACES), "--glob", "refs/*.jpg", "--num-test-ids", "1",
                            "--max-images-per-id", "1", "--refs-per-case", "2", "--models",
                            str(request.getfixturevalue(models_dir)), "--steps", "3",
                            "--recognisers", "facenet", "--iqa", "", "--out", str(out)],
                           config_dir=tiny_models.configs) == 0
    restored = list_images(next((out / "restored").iterdir()))
    assert len(restored) == 2
    assert read_rgb(restored[0]).shape == (512, 512, 3)
    summary = json.loads((out / "scores" / "summary.json").read_text())
    assert summary["restorations"] == 2 and "identity_variance_facenet" in summary["metrics"]
