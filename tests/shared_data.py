"""The real faces and small real models of ``../shared`` (beside the repository, never in it: their licences
forbid redistribution; ``RIDFR_SHARED`` points elsewhere, e.g. for a clone in another folder), and the one
marker for tests that need them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RIDFR_SHARED", REPO_ROOT.parent / "shared"))
FACE_DATA = SHARED / "data" / "faces"
FACES = FACE_DATA / "celebref-mini"
YUNET_PATH = SHARED / "models" / "yunet" / "yunet_s_640_640.onnx"

needs_faces = pytest.mark.skipif(not FACES.is_dir(), reason=f"real test faces not found at {FACES} (../shared absent)")
