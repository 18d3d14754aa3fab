"""Errors of the face front-end. Each one says what was wrong and how to fix it, so that a ComfyUI
user sees a sentence instead of a stack trace from inside onnxruntime."""


class FaceError(Exception):
    """Base class: anything ``ridfr_core.faces`` reports to the user."""


class FaceInputError(FaceError, ValueError):
    """An image or a batch that cannot be used as given (wrong layout, size or count)."""


class NoFaceError(FaceError, ValueError):
    """The detector found no face in an image."""


class FaceModelError(FaceError, RuntimeError):
    """insightface/onnxruntime or the detection/recognition model files are missing or unusable."""
