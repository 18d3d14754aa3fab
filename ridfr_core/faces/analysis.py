"""insightface detection (SCRFD) and ArcFace recognition on onnxruntime.

insightface is imported lazily so that ``ridfr_core`` (and the ComfyUI pack) loads without it.
Models are found where ComfyUI users keep them: ``models/insightface/models/<pack>/*.onnx`` (the
IP-Adapter and InstantID packs' convention), or at an explicit folder. The published FaceID-Plus
weights were trained with buffalo_l's ArcFace, so buffalo_l is preferred when both packs exist.

Images in and out are HWC uint8 RGB (see :mod:`.images`); insightface's BGR convention stays inside.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..constants import CLIP_SIZE
from ..dependencies import ONNXRUNTIME_DISTRIBUTIONS, installed
from .errors import FaceInputError, FaceModelError, NoFaceError
from .images import to_rgb_uint8

logger = logging.getLogger(__name__)

MODEL_PACKS = ("buffalo_l", "antelopev2")
# Files each pack ships; only the detector and the recogniser are loaded.
MODEL_PACK_FILES = {
    "buffalo_l": {"detection": "det_10g.onnx", "recognition": "w600k_r50.onnx"},
    "antelopev2": {"detection": "scrfd_10g_bnkps.onnx", "recognition": "glintr100.onnx"},
}
DETECTION_SIZES = (640, 512, 384, 256)
ALIGNED_MODE_HINT = ("If the face is too degraded to detect, give it as an already aligned face crop "
                     "(FFHQ-aligned, like the paper's inputs) with the 'aligned' mode.")


@dataclass(eq=False)
class DetectedFace:
    """One face in an image, in that image's pixel coordinates.

    ``bbox``: (x1, y1, x2, y2); ``kps``: (5, 2) eyes, nose, mouth corners; ``embedding``: the
    L2-normalised 512-d ArcFace embedding (insightface ``normed_embedding``) or None.
    """

    bbox: np.ndarray
    kps: np.ndarray
    det_score: float
    embedding: np.ndarray | None = None

    @property
    def size(self) -> float:
        """Geometric mean of the box sides, in pixels."""
        width, height = self.bbox[2] - self.bbox[0], self.bbox[3] - self.bbox[1]
        return float(np.sqrt(max(width, 0.0) * max(height, 0.0)))


def import_insightface():
    try:
        import insightface
    except ImportError as error:
        raise FaceModelError(
            "insightface is not installed; face detection and ArcFace need it: run `python install.py` in the RIDFR "
            "folder (it installs insightface and onnxruntime without a second onnxruntime or OpenCV)."
        ) from error
    return insightface


def installed_onnxruntimes() -> list[str]:
    """The onnxruntime distributions pip has installed (they all provide the same module)."""
    return installed(ONNXRUNTIME_DISTRIBUTIONS)


def onnxruntime_install_problem(installed: list[str], available_providers: list[str],
                                cuda_device: bool) -> str | None:
    """Why onnxruntime would silently run on CPU, with the fix; None if nothing is wrong."""
    fix = "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"
    if "onnxruntime-gpu" in installed and len(installed) > 1:
        others = ", ".join(name for name in installed if name != "onnxruntime-gpu")
        return (f"onnxruntime-gpu and {others} are both installed; they share one 'onnxruntime' module and the "
                f"CPU one (pulled in by insightface) usually wins, so face analysis runs on CPU. Fix: {fix}")
    if "onnxruntime-gpu" in installed and "CUDAExecutionProvider" not in available_providers:
        return ("onnxruntime-gpu is installed but its CUDA provider is unavailable (CUDA/cuDNN libraries missing "
                "or of another major version than this onnxruntime-gpu build); face analysis runs on CPU.")
    if cuda_device and "CUDAExecutionProvider" not in available_providers:
        return f"A CUDA GPU is present but onnxruntime has no CUDA provider, so face analysis runs on CPU. Fix: {fix}"
    return None


def cuda_provider() -> tuple[str, dict]:
    """onnxruntime's CUDA provider on the GPU torch uses: under ``accelerate launch`` each process's own (set
    by accelerate), not GPU 0 for every process."""
    try:
        import torch
        device_id = torch.cuda.current_device() if torch.cuda.is_available() else 0
    except ImportError:
        device_id = 0
    return ("CUDAExecutionProvider", {"device_id": device_id})


def provider_name(provider) -> str:
    return provider if isinstance(provider, str) else provider[0]


def choose_providers(device: str, available_providers: list[str]) -> list:
    """onnxruntime providers for ``device`` ('auto', 'cuda' or 'cpu'); CUDA's with its device_id."""
    if device not in ("auto", "cuda", "cpu"):
        raise FaceInputError(f"device: {device!r} is not one of 'auto', 'cuda', 'cpu'.")
    has_cuda = "CUDAExecutionProvider" in available_providers
    if device == "cuda" and not has_cuda:
        raise FaceModelError(
            "device='cuda' but onnxruntime has no CUDAExecutionProvider; install onnxruntime-gpu "
            "(and uninstall the CPU onnxruntime) or use device='cpu'.")
    if device != "cpu" and has_cuda:
        return [cuda_provider(), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def find_model_pack(models_root: str | Path | None = None, model_dir: str | Path | None = None) -> Path:
    """The folder holding the detector and recogniser ONNX files.

    ``model_dir``: an explicit pack folder (``.../buffalo_l``). ``models_root``: an insightface root
    (ComfyUI's ``models/insightface``) searched for ``models/<pack>/`` with buffalo_l first.
    """
    if model_dir is not None:
        folder = Path(model_dir).expanduser()
        if not folder.is_dir():
            raise FaceModelError(f"model_dir: {folder} is not a folder; point it at a folder holding "
                                 f"{_pack_listing()}.")
        return _unnest(folder)
    if models_root is None:
        raise FaceModelError("Give models_root (ComfyUI's models/insightface folder) or model_dir.")
    root = Path(models_root).expanduser()
    for name in MODEL_PACKS:
        folder = root / "models" / name
        if folder.is_dir() and any(folder.glob("**/*.onnx")):
            return _unnest(folder)
    raise FaceModelError(
        f"No insightface model pack in {root / 'models'}. Put one of {_pack_listing(root)} there "
        "(the same files the IP-Adapter FaceID and InstantID packs use).")


def _pack_listing(root: Path | None = None) -> str:
    def where(name):
        return f"{root / 'models' / name}/" if root is not None else f"{name}/"
    return " or ".join(f"{where(name)}{{{', '.join(files.values())}}}" for name, files in MODEL_PACK_FILES.items())


def _unnest(folder: Path) -> Path:
    """antelopev2.zip unpacks to antelopev2/antelopev2/*.onnx: accept that nesting."""
    if not any(folder.glob("*.onnx")):
        nested = [child for child in folder.iterdir() if child.is_dir() and any(child.glob("*.onnx"))]
        if len(nested) == 1:
            return nested[0]
        raise FaceModelError(f"{folder} holds no .onnx files; expected {_pack_listing()}.")
    return folder


class FaceAnalyzer:
    """Detector + ArcFace of one model pack on the chosen onnxruntime providers.

    ``provider_report`` says which provider is active and, if onnxruntime would fall back to CPU
    silently, why and how to fix it.
    """

    def __init__(self, model_dir: str | Path, device: str = "auto", det_thresh: float = 0.5):
        import_insightface()
        import onnxruntime

        self.model_dir = Path(model_dir)
        available = list(onnxruntime.get_available_providers())
        providers = choose_providers(device, available)
        self.detector, self.recognizer = self._load(providers)
        self.detector.prepare(0, input_size=(DETECTION_SIZES[0],) * 2, det_thresh=det_thresh)
        self.recognizer.prepare(0)
        self.active_providers = list(self.detector.session.get_providers())
        self.provider_report = self._provider_report(providers, available)

    def _load(self, providers: list[str]):
        from insightface.model_zoo import model_zoo

        found = {}
        for onnx_file in sorted(self.model_dir.glob("*.onnx")):
            try:
                model = model_zoo.get_model(str(onnx_file), providers=providers)
            except Exception as error:  # onnxruntime raises its own types; name the file instead
                raise FaceModelError(
                    f"Could not load {onnx_file}: {type(error).__name__}: {error}. The file is probably "
                    "incomplete or not an insightface model; download it again.") from error
            task = getattr(model, "taskname", None)
            if task in ("detection", "recognition") and task not in found:
                found[task] = model
        missing = [task for task in ("detection", "recognition") if task not in found]
        if missing:
            raise FaceModelError(
                f"{self.model_dir} has no {' and no '.join(missing)} model; expected {_pack_listing()}.")
        detector, recognizer = found["detection"], found["recognition"]
        if recognizer.input_size != (112, 112) or recognizer.output_shape[-1] != 512:
            raise FaceModelError(
                f"{recognizer.model_file} is not a 112x112 -> 512-d ArcFace model; FaceID-Plus needs "
                "buffalo_l's w600k_r50.onnx (or antelopev2's glintr100.onnx).")
        return detector, recognizer

    def _provider_report(self, requested: list[str], available: list[str]) -> str:
        try:
            import torch
            cuda_device = torch.cuda.is_available()
        except ImportError:
            cuda_device = False
        report = f"insightface {self.model_dir.name} on {self.active_providers[0]}"
        problem = onnxruntime_install_problem(installed_onnxruntimes(), available, cuda_device)
        if provider_name(requested[0]) != self.active_providers[0]:
            problem = (f"{provider_name(requested[0])} was requested but onnxruntime activated {self.active_providers[0]}. "
                       + (problem or ""))
        if problem:
            logger.warning(problem)
            report += f". Warning: {problem}"
        return report

    def detect(self, image, sizes: tuple[int, ...] = DETECTION_SIZES, embed: bool = True,
               name: str = "image") -> list[DetectedFace]:
        """Every face in ``image`` (any layout :func:`to_rgb_uint8` accepts), largest first.

        Tries each detection size in turn until one finds a face: downscaling to 640 can lose faces
        that fill the frame or are blurred, which smaller detection sizes still find.
        """
        rgb = to_rgb_uint8(image, name)
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        for size in sizes:
            boxes, kpss = self._run(self.detector, "detect", bgr, input_size=(size, size))
            if len(boxes):
                break
        else:
            return []
        if kpss is None:
            raise FaceModelError(f"{self.detector.model_file} gives no landmarks; use an SCRFD model with keypoints "
                                 "(det_10g.onnx or scrfd_10g_bnkps.onnx).")
        faces = [DetectedFace(bbox=box[:4].astype(np.float64), kps=kps.astype(np.float64), det_score=float(box[4]))
                 for box, kps in zip(boxes, kpss)]
        faces.sort(key=lambda face: face.size, reverse=True)
        if embed:
            for face in faces:
                face.embedding = self.embed_bgr(bgr, face.kps)
        return faces

    def detect_one(self, image, index: int | None = None, name: str = "image",
                   sizes: tuple[int, ...] = DETECTION_SIZES) -> DetectedFace:
        """The largest face of ``image`` (or the ``index``-th largest); NoFaceError if there is none."""
        faces = self.detect(image, sizes=sizes, name=name)
        if not faces:
            raise NoFaceError(f"{name}: no face found (tried detection sizes {list(sizes)}). {ALIGNED_MODE_HINT}")
        if index is None:
            if len(faces) > 1:
                logger.info("%s: %d faces found; using the largest (give face_index to choose another).",
                            name, len(faces))
            return faces[0]
        if not -len(faces) <= index < len(faces):
            raise FaceInputError(f"face_index: {index} is out of range; {name} has {len(faces)} faces "
                                 "(0 = largest).")
        return faces[index]

    def embed(self, image, kps: np.ndarray) -> np.ndarray:
        """Normalised ArcFace embedding (512,) of the face at landmarks ``kps`` in an RGB image."""
        rgb = to_rgb_uint8(image)
        return self.embed_bgr(np.ascontiguousarray(rgb[:, :, ::-1]), kps)

    def embed_bgr(self, bgr: np.ndarray, kps: np.ndarray) -> np.ndarray:
        from insightface.app.common import Face

        face = Face(kps=np.asarray(kps, np.float32))
        self._run(self.recognizer, "get", bgr, face)
        embedding = np.asarray(face.embedding, np.float64).reshape(-1)
        norm = np.linalg.norm(embedding)
        if not np.isfinite(norm) or norm < 1e-6:
            raise FaceModelError(f"{Path(self.recognizer.model_file).name} gave an empty embedding for the face at "
                                 f"{np.round(kps, 1).tolist()}; the crop is probably blank.")
        return (embedding / norm).astype(np.float32)

    @staticmethod
    def _run(model, method: str, *args, **kwargs):
        try:
            return getattr(model, method)(*args, **kwargs)
        except (FaceInputError, FaceModelError):
            raise
        except Exception as error:  # onnxruntime's errors are not Python-friendly; say which model failed
            raise FaceModelError(
                f"{Path(model.model_file).name} failed while running ({type(error).__name__}: {error}).") from error


def clip_face_crop(image, kps: np.ndarray, size: int = CLIP_SIZE) -> np.ndarray:
    """The ArcFace-aligned crop that feeds CLIP ViT-H/14 (FaceID-Plus reference code:
    ``face_align.norm_crop(img, landmark=face.kps, image_size=224)``), HWC uint8 RGB."""
    import_insightface()
    from insightface.utils import face_align

    return face_align.norm_crop(to_rgb_uint8(image), landmark=np.asarray(kps, np.float32), image_size=size)


_ANALYZERS: dict[tuple, FaceAnalyzer] = {}


def load_face_analyzer(models_root: str | Path | None = None, model_dir: str | Path | None = None,
                       device: str = "auto", det_thresh: float = 0.5) -> FaceAnalyzer:
    """A cached :class:`FaceAnalyzer` for the pack found by :func:`find_model_pack`."""
    folder = find_model_pack(models_root, model_dir).resolve()
    key = (str(folder), device, det_thresh)
    if key not in _ANALYZERS:
        _ANALYZERS[key] = FaceAnalyzer(folder, device=device, det_thresh=det_thresh)
        logger.info(_ANALYZERS[key].provider_report)
    return _ANALYZERS[key]
