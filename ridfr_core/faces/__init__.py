"""From users' photos to the aligned faces RIDFR restores, and back (GitHub issue 4).

- :mod:`.analysis`: insightface SCRFD + ArcFace on onnxruntime (lazy import, model discovery,
  provider choice and the onnxruntime/onnxruntime-gpu conflict check, detection-size retry).
- :mod:`.references`: reference photos -> embeddings + CLIP crops -> one combined Identity, with a
  consistency report.
- :mod:`.matching`: detected faces -> identities by ArcFace similarity.
- :mod:`.align`: FFHQ-512 alignment, inverse warp, feathered paste-back.
- :mod:`.photo`: the steps of whole-photo restoration (detect and align with the no-face policy, paste
  restored crops back), the aligned mode for faces too degraded to detect, and ``restore_*`` helpers
  built from them that restore through a callback.

Images are HWC uint8 RGB numpy arrays (inputs may also be grayscale, RGBA, 16-bit or float
[0,1], numpy or torch: see :func:`to_rgb_uint8`); face crops handed to restorers and CLIP are
(B,3,H,W) float tensors in [0,1]. Nothing here imports ComfyUI, and insightface only when used.
"""

from .align import FACE_SIZE, FFHQ_TEMPLATE_512, estimate_alignment, ffhq_template, inverse_alignment, paste_face, warp_to_crop
from .analysis import (DETECTION_SIZES, MODEL_PACKS, DetectedFace, FaceAnalyzer, clip_face_crop, find_model_pack,
                       load_face_analyzer, onnxruntime_install_problem)
from .errors import FaceError, FaceInputError, FaceModelError, NoFaceError
from .images import as_image_list, to_rgb_uint8
from .matching import MATCH_SIMILARITY, FaceMatches, match_faces
from .photo import (FacesInPhoto, PhotoRestoration, align_faces, align_photo, detect_and_align, paste_restored,
                    prepare_aligned, restore_aligned, restore_faces_in_photo, restore_in_photo, restore_photo)
from .references import (ConsistencyReport, ReferenceFace, build_identity, check_consistency, combine_identity,
                         encode_references)

__all__ = [
    "FACE_SIZE", "FFHQ_TEMPLATE_512", "estimate_alignment", "ffhq_template", "inverse_alignment", "paste_face",
    "warp_to_crop", "DETECTION_SIZES", "MODEL_PACKS", "DetectedFace", "FaceAnalyzer", "clip_face_crop",
    "find_model_pack", "load_face_analyzer", "onnxruntime_install_problem", "FaceError", "FaceInputError",
    "FaceModelError", "NoFaceError", "as_image_list", "to_rgb_uint8", "MATCH_SIMILARITY", "FaceMatches",
    "match_faces", "FacesInPhoto", "PhotoRestoration", "align_faces", "align_photo", "detect_and_align",
    "paste_restored", "prepare_aligned", "restore_aligned", "restore_faces_in_photo", "restore_in_photo", "restore_photo",
    "ConsistencyReport", "ReferenceFace", "build_identity", "check_consistency", "combine_identity",
    "encode_references",
]
