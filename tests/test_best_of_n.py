"""Best-of-N (``--candidates``): ranking by an independent recogniser on real faces, the guard against the
injected ArcFace, and the restore CLI keeping the best of N seeds and reporting every score."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest

from shared_data import FACES, needs_faces
from ridfr_core import metrics
from ridfr_core.best_of_n import (RankingError, best_of_n, load_ranking_recogniser, ranking_problem,
                                  reference_embedding, similarity)
from ridfr_core.io.images import read_rgb, write_rgb
from ridfr_core.restore import main as restore_main

AVAILABLE = {"dlib": metrics.dlib_unavailable_reason(), "facenet": metrics.facenet_unavailable_reason()}


def recogniser_or_skip(name: str):
    if AVAILABLE[name]:
        pytest.skip(AVAILABLE[name])
    return load_ranking_recogniser(name, "test")


@pytest.mark.parametrize("name", ["arcface", "ArcFace", "insightface", "buffalo_l", "antelopev2"])
def test_the_injected_arcface_never_ranks(name):
    problem = ranking_problem(name, "--rank-with")
    assert problem.startswith(f"--rank-with: '{name}' is the ArcFace that RIDFR is conditioned on")
    assert "dlib or facenet" in problem
    with pytest.raises(RankingError, match="conditioned on"):
        best_of_n(4, name)
    with pytest.raises(RankingError, match="unknown recogniser 'vggface'"):
        best_of_n(4, "vggface")
    with pytest.raises(RankingError, match=r"--candidates 0: give 1\.\.16 samples per face"):
        best_of_n(0, "dlib")
    assert best_of_n(1, "dlib") is None  # one sample: nothing to rank, nothing loaded


@needs_faces
@pytest.mark.parametrize("name", ["dlib", "facenet"])
def test_the_person_ranks_first_among_real_faces(name):
    """A held-out photo of person 00005 scores above photos of three other people against 00005's references."""
    recogniser = recogniser_or_skip(name)
    photos = sorted((FACES / "00005" / "refs").glob("*.jpg"))
    held_out, references = photos[0], photos[1:6]
    others = [sorted((FACES / person / "refs").glob("*.jpg"))[0] for person in ("00022", "00075", "00119")]
    candidates = [read_rgb(path) for path in (others[0], held_out, *others[1:])]
    scores = similarity(recogniser, candidates, reference_embedding(recogniser, [read_rgb(p) for p in references]))
    assert int(np.argmax(scores)) == 1, scores
    assert scores[1] - np.delete(scores, 1).max() > 0.05, scores


@needs_faces
def test_restore_cli_keeps_the_best_of_n_seeds_and_reports_every_score(tiny_models, ridfr_models_dir, tmp_path, caplog):
    """Three seeds of one face in one batch: the report lists a dlib score per seed, the kept seed is the best
    scored, and a single run with that seed gives the kept sample again, with the reported score."""
    recogniser = recogniser_or_skip("dlib")
    identity = FACES / "00005"
    lq = next(identity.glob("lq_*.png"))
    reference = sorted((identity / "refs").glob("*.jpg"))[0]
    common = ["--lq", str(lq), "--id", str(reference), "--aligned", "--aligned-references", "--models",
              str(ridfr_models_dir), "--steps", "2", "--device", "cpu"]
    caplog.set_level(logging.INFO)
    best = tmp_path / "best.png"
    assert restore_main([*common, "--seed", "10", "--candidates", "3", "--rank-with", "dlib", "--out", str(best)],
                        config_dir=tiny_models.configs) == 0
    report = caplog.text
    assert "best of 3 ranked by dlib ResNet-34" in report and "independent of the injected ArcFace" in report
    scores = {int(seed): float(score) for seed, score in re.findall(r"seed (\d+): (-?\d\.\d+)", report)}
    kept = int(re.search(r"kept seed (\d+)", report).group(1))
    assert sorted(scores) == [10, 11, 12] and kept == max(scores, key=scores.get)
    assert len(set(scores.values())) == 3  # three different samples

    single = tmp_path / "single.png"
    assert restore_main([*common, "--seed", str(kept), "--out", str(single)], config_dir=tiny_models.configs) == 0
    assert np.abs(read_rgb(best).astype(int) - read_rgb(single).astype(int)).max() <= 2  # batched vs alone: rounding
    rescored = similarity(recogniser, [read_rgb(single)], reference_embedding(recogniser, [read_rgb(reference)]))
    assert abs(rescored[0] - scores[kept]) < 0.02


def test_restore_cli_refuses_arcface_ranking_before_loading_models(ridfr_models_dir, tmp_path, capsys):
    image = tmp_path / "face.png"
    write_rgb(image, np.full((64, 64, 3), 128, np.uint8))
    assert restore_main(["--lq", str(image), "--id", str(image), "--out", str(tmp_path / "o.png"), "--models",
                         str(ridfr_models_dir), "--candidates", "4", "--rank-with", "arcface"]) == 2
    assert "--rank-with: 'arcface' is the ArcFace that RIDFR is conditioned on" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_too_many_candidates_are_refused_before_any_model_loads(tmp_path, capsys):
    """--candidates 1000 took 6 minutes and 13 GB before "can't allocate memory"; now one line at once."""
    image = tmp_path / "face.png"
    write_rgb(image, np.full((64, 64, 3), 128, np.uint8))
    assert restore_main(["--lq", str(image), "--id", str(image), "--out", str(tmp_path / "o.png"), "--models",
                         str(tmp_path / "no_models"), "--candidates", "1000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --candidates 1000: give 1..16 samples per face") and "model files" not in err


@needs_faces
def test_candidates_are_sampled_in_batch_size_batches_with_the_same_seeds(tiny_models, ridfr_models_dir, tmp_path,
                                                                        caplog, monkeypatch):
    """3 candidates with --batch-size 2: sampler calls of 2 and 1 faces, with the seeds and (up to batched-vs-alone
    rounding) the scores of one batch of 3."""
    from ridfr_core.pipeline import RIDFRPipeline

    recogniser_or_skip("dlib")
    batches, call = [], RIDFRPipeline.__call__

    def counted(self, faces, *args, **kwargs):
        batches.append(len(faces))
        return call(self, faces, *args, **kwargs)
    monkeypatch.setattr(RIDFRPipeline, "__call__", counted)
    identity = FACES / "00005"
    common = ["--lq", str(next(identity.glob("lq_*.png"))), "--id", str(sorted((identity / "refs").glob("*.jpg"))[0]),
              "--aligned", "--aligned-references", "--models", str(ridfr_models_dir), "--steps", "1", "--device",
              "cpu", "--seed", "4", "--candidates", "3"]
    caplog.set_level(logging.INFO)
    reports = {}
    for batch in (2, 8):
        caplog.clear()
        batches.clear()
        assert restore_main([*common, "--batch-size", str(batch), "--out", str(tmp_path / f"b{batch}.png")],
                            config_dir=tiny_models.configs) == 0
        reports[batch] = (list(batches), re.search(r"face 0 .*kept seed \d+", caplog.text).group(0))
    assert reports[2][0] == [2, 1] and reports[8][0] == [3]
    scores = [re.findall(r"seed (\d+): (-?\d\.\d+)", reports[batch][1]) for batch in (2, 8)]
    assert [seed for seed, _ in scores[0]] == [seed for seed, _ in scores[1]] == ["4", "5", "6"]
    assert all(abs(float(a) - float(b)) < 0.02 for (_, a), (_, b) in zip(*scores))
