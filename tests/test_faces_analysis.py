"""insightface loading, detection and recognition through the real insightface/onnxruntime code,
with ONNX models built by conftest.py (scripted SCRFD, YuNet as SCRFD, projection ArcFace)."""

import shutil

import cv2
import numpy as np
import onnxruntime
import pytest
from onnx_fakes import SCRIPTED_BBOX, SCRIPTED_CELL, scripted_face_kps
from shared_data import REPO_ROOT

from ridfr_core.faces import (FaceInputError, FaceModelError, NoFaceError, find_model_pack, load_face_analyzer,
                              onnxruntime_install_problem, to_rgb_uint8)
from ridfr_core.faces.analysis import FaceAnalyzer, choose_providers, clip_face_crop

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def textured(height=640, width=640, seed=0):
    noise = np.random.default_rng(seed).uniform(0, 255, (height // 16, width // 16, 3)).astype(np.float32)
    return np.clip(cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC), 0, 255).astype(np.uint8)


def read_rgb(path):
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    order = [2, 1, 0, 3] if image.ndim == 3 and image.shape[2] == 4 else [2, 1, 0]
    return np.ascontiguousarray(image[:, :, order])


@pytest.fixture(scope="module")
def scripted(scripted_models_root):
    return load_face_analyzer(models_root=scripted_models_root, device="cpu")


@pytest.fixture(scope="module")
def yunet(yunet_models_root):
    return load_face_analyzer(models_root=yunet_models_root, device="auto")


# --- model discovery and providers -------------------------------------------------------------

def test_missing_pack_says_which_files_go_where(tmp_path):
    with pytest.raises(FaceModelError) as error:
        find_model_pack(models_root=tmp_path)
    message = str(error.value)
    assert str(tmp_path / "models" / "buffalo_l") in message and "w600k_r50.onnx" in message
    assert "glintr100.onnx" in message


def test_buffalo_l_is_preferred_and_nested_antelopev2_is_accepted(tmp_path, scripted_models_root):
    source = scripted_models_root / "models" / "buffalo_l"
    shutil.copytree(source, tmp_path / "models" / "antelopev2" / "antelopev2")
    assert find_model_pack(models_root=tmp_path) == tmp_path / "models" / "antelopev2" / "antelopev2"
    shutil.copytree(source, tmp_path / "models" / "buffalo_l")
    assert find_model_pack(models_root=tmp_path) == tmp_path / "models" / "buffalo_l"
    assert find_model_pack(model_dir=source) == source


def test_corrupt_model_file_is_named(tmp_path, scripted_models_root):
    pack = tmp_path / "buffalo_l"
    shutil.copytree(scripted_models_root / "models" / "buffalo_l", pack)
    (pack / "w600k_r50.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(FaceModelError, match="w600k_r50.onnx.*download it again"):
        FaceAnalyzer(pack, device="cpu")


def test_pack_without_recogniser_is_refused(tmp_path, scripted_models_root):
    pack = tmp_path / "buffalo_l"
    pack.mkdir()
    shutil.copy(scripted_models_root / "models" / "buffalo_l" / "det_10g.onnx", pack)
    with pytest.raises(FaceModelError, match="no recognition model"):
        FaceAnalyzer(pack, device="cpu")


def test_provider_choice_and_install_conflicts():
    assert choose_providers("auto", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert choose_providers("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"])[0][0] == "CUDAExecutionProvider"
    with pytest.raises(FaceModelError, match="onnxruntime-gpu"):
        choose_providers("cuda", ["CPUExecutionProvider"])
    with pytest.raises(FaceInputError, match="device"):
        choose_providers("tpu", ["CPUExecutionProvider"])
    both = onnxruntime_install_problem(["onnxruntime", "onnxruntime-gpu"], ["CPUExecutionProvider"], True)
    assert "both installed" in both and "pip uninstall -y onnxruntime onnxruntime-gpu" in both
    assert "CUDA provider is unavailable" in onnxruntime_install_problem(
        ["onnxruntime-gpu"], ["CPUExecutionProvider"], True)
    assert "pip install onnxruntime-gpu" in onnxruntime_install_problem(["onnxruntime"], ["CPUExecutionProvider"], True)
    assert onnxruntime_install_problem(["onnxruntime"], ["CPUExecutionProvider"], False) is None
    assert onnxruntime_install_problem(
        ["onnxruntime-gpu"], ["CUDAExecutionProvider", "CPUExecutionProvider"], True) is None


def test_active_provider_is_reported(scripted):
    assert scripted.active_providers[0] in onnxruntime.get_available_providers()
    assert scripted.provider_report.startswith(f"insightface buffalo_l on {scripted.active_providers[0]}")


# --- detection geometry and recognition conventions ------------------------------------------

def test_scripted_face_is_found_exactly_where_placed(scripted):
    faces = scripted.detect(textured())
    assert len(faces) == 1
    np.testing.assert_allclose(faces[0].kps, scripted_face_kps(), atol=1e-3)
    centre = np.array(SCRIPTED_CELL) * 32.0
    expected_box = [centre[0] - SCRIPTED_BBOX[0] * 32, centre[1] - SCRIPTED_BBOX[1] * 32,
                    centre[0] + SCRIPTED_BBOX[2] * 32, centre[1] + SCRIPTED_BBOX[3] * 32]
    np.testing.assert_allclose(faces[0].bbox, expected_box, atol=1e-3)
    assert faces[0].det_score == pytest.approx(0.9)
    assert np.linalg.norm(faces[0].embedding) == pytest.approx(1.0, abs=1e-5)


def test_detection_coordinates_are_in_the_input_photo(scripted):
    faces = scripted.detect(textured(960, 1280))  # detected at 640 wide: scale 0.5
    np.testing.assert_allclose(faces[0].kps, scripted_face_kps() * 2.0, atol=1e-3)


def test_embedding_matches_insightface_face_analysis(scripted_models_root):
    from insightface.app import FaceAnalysis

    pack = scripted_models_root / "models" / "buffalo_l"
    app = FaceAnalysis(name=str(pack), root=str(pack.parent), providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=0, det_size=(640, 640))
    rgb = textured(seed=3)
    reference = app.get(np.ascontiguousarray(rgb[:, :, ::-1]))[0]  # insightface takes BGR
    ours = load_face_analyzer(models_root=scripted_models_root, device="cpu").detect(rgb)[0]
    np.testing.assert_allclose(ours.kps, reference.kps, atol=1e-3)
    np.testing.assert_allclose(ours.embedding, reference.normed_embedding, atol=1e-5)


def test_clip_crop_is_insightface_norm_crop_224(scripted):
    from insightface.utils import face_align

    rgb = textured(seed=4)
    face = scripted.detect(rgb)[0]
    crop = clip_face_crop(rgb, face.kps)
    assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8
    np.testing.assert_array_equal(crop, face_align.norm_crop(rgb, landmark=face.kps.astype(np.float32),
                                                             image_size=224))


def test_detection_retries_at_smaller_sizes(small_size_models_root):
    analyzer = load_face_analyzer(models_root=small_size_models_root, device="cpu")
    rgb = textured()
    assert analyzer.detect(rgb, sizes=(640, 512)) == []
    faces = analyzer.detect(rgb)
    cell_centre = np.array([4, 3]) * 32.0
    expected = (cell_centre + scripted_face_kps() - np.array(SCRIPTED_CELL) * 32.0) * (640 / 384)
    np.testing.assert_allclose(faces[0].kps, expected, atol=1e-3)


def test_no_face_message_suggests_aligned_mode(scripted):
    with pytest.raises(NoFaceError, match="tried detection sizes.*aligned"):
        scripted.detect_one(np.zeros((300, 300, 3), np.uint8))


# --- input formats ----------------------------------------------------------------------------

def test_image_normalisation():
    gray = np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)
    assert to_rgb_uint8(gray).shape == (64, 64, 3)
    sixteen = (np.full((32, 32, 3), 1000, np.uint16))
    assert to_rgb_uint8(sixteen)[0, 0, 0] == round(1000 / 257)
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 3] = 0
    assert (to_rgb_uint8(rgba) == 255).all()  # transparent -> white
    import torch
    assert to_rgb_uint8(torch.full((1, 40, 40, 3), 0.5))[0, 0, 0] == 128  # ComfyUI IMAGE
    with pytest.raises(FaceInputError, match="channels-first"):
        to_rgb_uint8(np.zeros((3, 64, 64), np.float32))
    with pytest.raises(FaceInputError, match="too small"):
        to_rgb_uint8(np.zeros((8, 64, 3), np.uint8))
    with pytest.raises(FaceInputError, match="NaN"):
        to_rgb_uint8(np.full((32, 32, 3), np.nan, np.float32))
    with pytest.raises(FaceInputError, match="pixel type"):
        to_rgb_uint8(np.zeros((32, 32, 3), np.int32))


def test_tiny_image_gives_no_face_not_a_crash(scripted):
    assert scripted.detect(np.zeros((32, 32, 3), np.uint8)) == []


def test_8k_photo(scripted):
    photo = np.zeros((4320, 7680, 3), np.uint8)
    photo[::7, ::5] = 200
    faces = scripted.detect(photo)
    np.testing.assert_allclose(faces[0].kps, scripted_face_kps() * 12.0, atol=1e-2)


def test_face_index_chooses_among_several_faces(yunet, face_data):
    photo = read_rgb(face_data / "unaligned" / "group_two_people.jpg")
    faces = yunet.detect(photo)
    assert len(faces) == 2 and faces[0].size >= faces[1].size
    np.testing.assert_allclose(yunet.detect_one(photo).kps, faces[0].kps)
    np.testing.assert_allclose(yunet.detect_one(photo, index=1).kps, faces[1].kps)
    with pytest.raises(FaceInputError, match="face_index: 2 is out of range"):
        yunet.detect_one(photo, index=2)


# --- real photos, real detector ---------------------------------------------------------------

def test_real_photos_in_every_format(yunet, face_data):
    photo = read_rgb(face_data / "unaligned" / "obama_obama.jpg")
    face = yunet.detect_one(photo)
    x1, y1, x2, y2 = face.bbox
    assert x1 < face.kps[:, 0].min() and face.kps[:, 0].max() < x2
    assert face.kps[0, 0] < face.kps[1, 0] and face.kps[2, 1] < face.kps[3, 1]  # eyes left->right, nose above mouth
    for name, same_pixels in (("16-bit", photo.astype(np.uint16) * 257), ("float", photo.astype(np.float32) / 255)):
        np.testing.assert_allclose(yunet.detect_one(same_pixels, name=name).kps, face.kps, atol=1e-4)
    gray = yunet.detect_one(cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY), name="gray")
    assert np.abs(gray.kps - face.kps).max() < 0.05 * face.size
    rgba = read_rgb(face_data / "unaligned" / "rgba_32bit.png")
    assert rgba.shape[2] == 4 and len(yunet.detect(rgba)) == 1
    # A 32 px photo is analysed like any other (the detector upsamples it to the detection size).
    tiny = yunet.detect_one(cv2.resize(photo, (32, 40), interpolation=cv2.INTER_AREA), name="tiny photo")
    scale = np.array([32 / photo.shape[1], 40 / photo.shape[0]])
    assert np.abs(tiny.kps - face.kps * scale).max() < 1.5


def test_package_imports_without_insightface_and_says_how_to_install(tmp_path, scripted_models_root):
    import subprocess
    import sys

    code = ("import sys; sys.modules['insightface'] = None\n"
            "import ridfr_core.faces as faces\n"
            "try:\n"
            f"    faces.FaceAnalyzer({str(scripted_models_root / 'models' / 'buffalo_l')!r})\n"
            "except faces.FaceModelError as error:\n"
            "    print(error)\n")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                            env={"PYTHONPATH": str(REPO_ROOT), "PATH": ""})
    assert "insightface is not installed" in output.stdout and "python install.py" in output.stdout, output.stderr


def test_the_cuda_provider_runs_on_the_gpu_torch_uses():
    """Under accelerate each process has its own GPU (torch.cuda.set_device): onnxruntime's detector and ArcFace
    sessions must name it, or every process runs them on GPU 0."""
    import torch

    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    providers = choose_providers("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert providers == [("CUDAExecutionProvider", {"device_id": current}), "CPUExecutionProvider"]
