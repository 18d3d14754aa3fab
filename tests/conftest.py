"""Shared test fixtures: the insightface stand-ins (:mod:`onnx_fakes`) as model folders, the real faces of
``../shared`` (:mod:`shared_data`), and the fixture modules registered below (tiny real-layout models)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from onnx_fakes import (SCRIPTED_ANCHOR, SCRIPTED_BBOX, build_projection_arcface, build_scripted_scrfd,
                        build_yunet_as_scrfd, scripted_kps_offsets)
from shared_data import FACE_DATA, YUNET_PATH

pytest_plugins = ["tiny_models", "restorerid_layout", "golden", "comfy_host"]

# Random tiny weights drive activations into denormal floats, which are 10-100x slower on CPU.
torch.set_flush_denormal(True)


@pytest.fixture(scope="session")
def scripted_models_root(tmp_path_factory) -> Path:
    """``<root>/models/buffalo_l`` with a scripted SCRFD and the projection ArcFace."""
    root = tmp_path_factory.mktemp("insightface")
    pack = root / "models" / "buffalo_l"
    build_scripted_scrfd(pack / "det_10g.onnx", SCRIPTED_ANCHOR, SCRIPTED_BBOX, scripted_kps_offsets())
    build_projection_arcface(pack / "w600k_r50.onnx")
    return root


@pytest.fixture(scope="session")
def small_size_models_root(tmp_path_factory) -> Path:
    """Like ``scripted_models_root`` but the face is only found at detection sizes <= 384."""
    root = tmp_path_factory.mktemp("insightface_small")
    pack = root / "models" / "buffalo_l"
    build_scripted_scrfd(pack / "det_10g.onnx", 2 * (3 * 12 + 4), SCRIPTED_BBOX, scripted_kps_offsets(),
                         max_input_width=384)
    build_projection_arcface(pack / "w600k_r50.onnx")
    return root


@pytest.fixture(scope="session")
def yunet_models_root(tmp_path_factory) -> Path:
    """``<root>/models/antelopev2`` with YuNet as SCRFD and the projection ArcFace (real photos)."""
    if not YUNET_PATH.is_file():
        pytest.skip(f"real YuNet detector not found at {YUNET_PATH} (shared test resources absent)")
    root = tmp_path_factory.mktemp("insightface_yunet")
    pack = root / "models" / "antelopev2"
    build_yunet_as_scrfd(YUNET_PATH, pack / "scrfd_10g_bnkps.onnx")
    build_projection_arcface(pack / "glintr100.onnx")
    return root


@pytest.fixture(scope="session")
def face_data() -> Path:
    if not FACE_DATA.is_dir():
        pytest.skip(f"real face photos not found at {FACE_DATA} (shared test resources absent)")
    return FACE_DATA

