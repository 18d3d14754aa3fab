"""ridfr_core.metrics on constructed cases with known answers, and the real recognisers on real faces."""

from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ridfr_core import metrics
from ridfr_core.identity.embeddings import l2_normalise
from shared_data import FACES, needs_faces



@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return cv2.GaussianBlur(rng.integers(20, 220, (64, 64, 3), dtype=np.uint8), (0, 0), 1.0)


def test_psnr_identical_is_inf_and_shift_matches_formula(image):
    assert metrics.psnr(image, image) == float("inf")
    shifted = image + np.uint8(10)  # values stay below 255: a pure +10 shift, MSE 100 on RGB
    assert metrics.psnr(shifted, image, channel="rgb") == pytest.approx(10 * np.log10(255**2 / 100), abs=1e-9)
    luma_shift = 10 * (65.481 + 128.553 + 24.966) / 255  # BT.601 luma of a +10 grey shift
    assert metrics.psnr(shifted, image, channel="y") == pytest.approx(20 * np.log10(255 / luma_shift), abs=1e-9)


def test_ssim_identical_is_one_and_flat_shift_is_luminance_term():
    flat, brighter = np.full((32, 32, 3), 100, np.uint8), np.full((32, 32, 3), 110, np.uint8)
    assert metrics.ssim(flat, flat) == pytest.approx(1.0)
    c1 = (0.01 * 255) ** 2  # no variance: SSIM reduces to the luminance term
    expected = (2 * 100 * 110 + c1) / (100**2 + 110**2 + c1)
    assert metrics.ssim(brighter, flat, channel="rgb") == pytest.approx(expected, abs=1e-9)


def test_pixel_metrics_reject_mismatched_sizes_and_channels(image):
    with pytest.raises(ValueError, match="sizes differ"):
        metrics.psnr(image, image[:32])
    with pytest.raises(ValueError, match="channel"):
        metrics.ssim(image, image, channel="lab")


def test_identity_similarity_known_angles():
    a = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    b = np.array([[5.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    assert np.allclose(metrics.identity_similarity(a, b), [1.0, 0.0, -1.0])


def test_identity_variance_known_values():
    theta = np.radians(30)
    pair = np.array([[np.cos(theta), np.sin(theta)], [np.cos(theta), -np.sin(theta)]])
    assert metrics.identity_variance(pair) == pytest.approx(np.sin(theta) ** 2)  # 0.25
    assert metrics.identity_variance(pair * [[3.0], [0.5]]) == pytest.approx(0.25)  # scale does not matter
    assert metrics.identity_variance(np.eye(4)) == pytest.approx(1 - 1 / 4)
    assert metrics.identity_variance(np.tile([0.6, 0.8], (5, 1))) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="at least two"):
        metrics.identity_variance(np.ones((1, 8)))


def test_unknown_recogniser_and_iqa_names():
    with pytest.raises(ValueError, match="--recognisers"):
        metrics.load_recognisers(["vggface"])
    with pytest.raises(ValueError, match="--iqa"):
        metrics.load_pyiqa_metrics(["niqe"])


def test_pyiqa_metrics_report_why_they_are_skipped():
    if metrics.pyiqa_unavailable_reason() is None:
        pytest.skip("pyiqa is installed here; this test covers the skip report")
    scores, skipped, info = metrics.load_pyiqa_metrics(["lpips", "musiq", "maniqa", "clipiqa"])
    assert scores == {} and info == {}
    assert set(skipped) == {"lpips", "musiq", "maniqa", "clipiqa"}
    assert all(f"pyiqa=={metrics.PYIQA_VERSION}" in reason and "not installed" in reason for reason in skipped.values())


def test_arcface_without_model_is_skipped_with_reason():
    recognisers, skipped = metrics.load_recognisers(["arcface"], arcface_model=None)
    assert recognisers == [] and "--arcface-model" in skipped["ids_hq_arcface"]
    _, skipped = metrics.load_recognisers(["arcface"], arcface_model="/nonexistent/antelopev2")
    assert "does not exist" in skipped["ids_hq_arcface"]


def _projection_arcface(path: Path) -> Path:
    """An ONNX model with ArcFace's interface (1x3x112x112 -> 1x512): pooled crop times a fixed matrix."""
    weights = np.random.default_rng(0).standard_normal((3 * 16 * 16, 512)).astype(np.float32)
    nodes = [
        helper.make_node("AveragePool", ["input.1"], ["pooled"], kernel_shape=[7, 7], strides=[7, 7]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "weights"], ["683"]),
    ]
    graph = helper.make_graph(
        nodes, "projection_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, ["None", 512])],
        [numpy_helper.from_array(weights, "weights")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def test_arcface_recogniser_loads_recognition_model_from_folder(tmp_path, image):
    _projection_arcface(tmp_path / "w600k_like.onnx")
    recognisers, skipped = metrics.load_recognisers(["arcface"], arcface_model=tmp_path)
    assert skipped == {}
    face = cv2.resize(image, (512, 512))
    embeddings = recognisers[0].embed([face, face, 255 - face])
    assert embeddings.shape == (3, 512)
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0)
    assert embeddings[0] @ embeddings[1] == pytest.approx(1.0) and embeddings[0] @ embeddings[2] < 0.99



def test_arcface_recogniser_feeds_insightface_bgr_at_the_ffhq_landmarks(tmp_path):
    """The same embedding as insightface's own recogniser given the BGR image and the FFHQ template
    landmarks (swapping the channels, or the template, changes the projection's output)."""
    from insightface.app.common import Face
    from insightface.model_zoo import get_model

    from ridfr_core.faces.align import FFHQ_TEMPLATE_512

    path = _projection_arcface(tmp_path / "w600k_like.onnx")
    recognisers, _ = metrics.load_recognisers(["arcface"], arcface_model=path)
    rng = np.random.default_rng(5)
    face = cv2.resize(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), (512, 512), interpolation=cv2.INTER_CUBIC)
    reference = get_model(str(path), providers=["CPUExecutionProvider"]).get(
        np.ascontiguousarray(face[:, :, ::-1]), Face(kps=FFHQ_TEMPLATE_512.copy()))
    np.testing.assert_allclose(recognisers[0].embed([face])[0], l2_normalise(reference), atol=1e-5)
    swapped = recognisers[0].embed([np.ascontiguousarray(face[:, :, ::-1])])[0]
    assert swapped @ l2_normalise(reference) < 0.999

@needs_faces
@pytest.mark.parametrize("name", ["dlib", "facenet"])
def test_real_recognisers_separate_identities(name):
    recognisers, skipped = metrics.load_recognisers([name])
    if skipped:
        pytest.skip(f"{name}: {skipped}")
    identities = sorted(p for p in FACES.iterdir() if p.is_dir())[:3]
    paths = [path for identity in identities for path in sorted((identity / "refs").glob("*.jpg"))[:2]]
    faces = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths]
    embeddings = recognisers[0].embed(faces)
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0)
    similarity = embeddings @ embeddings.T
    labels = np.repeat(np.arange(3), 2)
    same = (labels[:, None] == labels[None]) & ~np.eye(6, dtype=bool)
    assert similarity[same].min() > similarity[labels[:, None] != labels[None]].max()
    assert metrics.identity_similarity(embeddings[:1], recognisers[0].embed(faces[:1]))[0] == pytest.approx(1.0)
