"""install.py in fresh virtual environments, one per starting state a user's ComfyUI may be in, with real
pip against a local package index: a folder of small wheels built here that stand in for onnxruntime,
OpenCV, insightface (with insightface's real declared dependencies) and torch. Afterwards exactly one
onnxruntime and one OpenCV distribution must be installed: the one that was there, or the right choice."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from shared_data import REPO_ROOT
from ridfr_core.dependencies import ONNXRUNTIME_DISTRIBUTIONS, OPENCV_DISTRIBUTIONS

# insightface 2.1's requirements, used when insightface itself is not installed here to read them from.
INSIGHTFACE_2_1_REQUIRES = ["numpy", "onnx>=1.13", "onnxruntime", "opencv-python", "tqdm", "requests", "scipy",
                            "scikit-image", 'PySide6-Essentials>=6.5; extra == "gui"']


def build_wheel(folder: Path, name: str, version: str = "1.0", requires=(), modules=(), files=None) -> Path:
    """A minimal pure-Python wheel (what pip needs: the package files, METADATA, WHEEL and RECORD)."""
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    contents = {f"{module}/__init__.py": f"DISTRIBUTION = {name!r}\n" for module in modules}
    contents.update(files or {})
    contents[f"{info}/METADATA"] = (f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                    + "".join(f"Requires-Dist: {requirement}\n" for requirement in requires))
    contents[f"{info}/WHEEL"] = "Wheel-Version: 1.0\nGenerator: ridfr-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = []
    for path, text in contents.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    contents[f"{info}/RECORD"] = "\n".join([*record, f"{info}/RECORD,,"]) + "\n"
    wheel = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in contents.items():
            archive.writestr(path, text)
    return wheel


def torch_wheel(folder: Path, cuda: str | None) -> Path:
    folder.mkdir(exist_ok=True)
    return build_wheel(folder, "torch", "2.13.0", modules=["torch"],
                       files={"torch/__init__.py": "from . import version\n", "torch/version.py": f"cuda = {cuda!r}\n"})


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> Path:
    """The local index: stand-ins for everything install.py may ask pip for."""
    folder = tmp_path_factory.mktemp("wheels")
    try:
        requires = importlib.metadata.requires("insightface")
    except importlib.metadata.PackageNotFoundError:
        requires = INSIGHTFACE_2_1_REQUIRES
    build_wheel(folder, "insightface", "2.1", requires=requires, modules=["insightface"])
    for name in ONNXRUNTIME_DISTRIBUTIONS[:2]:
        build_wheel(folder, name, "1.22.0", modules=["onnxruntime"])
    for name in OPENCV_DISTRIBUTIONS:
        build_wheel(folder, name, "4.12.0", modules=["cv2"])
    for name, module in (("numpy", "numpy"), ("onnx", "onnx"), ("tqdm", "tqdm"), ("requests", "requests"),
                         ("scipy", "scipy"), ("scikit-image", "skimage"), ("PySide6-Essentials", "PySide6")):
        build_wheel(folder, name, "1.13.0", modules=[module])
    return folder


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory) -> Path:
    """One fresh venv (with pip), copied for each starting state."""
    venv = tmp_path_factory.mktemp("venv") / "base"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    return venv


def pip_env(index: Path) -> dict:
    """Real pip, but only the local index: no config files, no other index, no network."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(index),
            "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_CACHE_DIR": "1"}


def distributions(python: Path) -> dict[str, str]:
    code = ("import importlib.metadata as m, json; "
            "print(json.dumps({d.metadata['Name'].lower(): d.version for d in m.distributions()}))")
    return json.loads(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout)


STATES = {  # starting state: (wheels installed first, onnxruntime and OpenCV expected afterwards)
    "nothing": ((), "onnxruntime", "opencv-python-headless"),
    "onnxruntime-gpu": (("onnxruntime-gpu",), "onnxruntime-gpu", "opencv-python-headless"),
    "opencv-python": (("opencv-python",), "onnxruntime", "opencv-python"),
    "opencv-python-headless": (("opencv-python-headless",), "onnxruntime", "opencv-python-headless"),
    "cuda torch, nothing else": (("torch-cuda",), "onnxruntime-gpu", "opencv-python-headless"),
}


@pytest.mark.parametrize("state", list(STATES))
def test_install_keeps_one_onnxruntime_and_one_opencv(state, index, base_venv, tmp_path):
    first, runtime, opencv = STATES[state]
    venv = tmp_path / "venv"
    shutil.copytree(base_venv, venv, symlinks=True)
    python = venv / "bin" / "python"
    env = pip_env(index)
    for name in first:
        wheel = torch_wheel(tmp_path / "torch", "12.8") if name == "torch-cuda" else name
        subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheel)], env=env, check=True, timeout=300)
    before = distributions(python)
    result = subprocess.run([str(python), str(REPO_ROOT / "install.py")], env=env, capture_output=True, text=True,
                            timeout=300, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    # pip's resolver complains of the missing opencv-python exactly when another OpenCV wheel is kept; we say why
    complained = "requires opencv-python, which is not installed" in result.stdout + result.stderr
    explained = "is deliberate: one OpenCV wheel only" in result.stdout
    assert explained == (opencv != "opencv-python") and (explained or not complained)
    after = distributions(python)
    assert [name for name in ONNXRUNTIME_DISTRIBUTIONS if name in after] == [runtime]
    assert [name for name in OPENCV_DISTRIBUTIONS if name in after] == [opencv]
    assert after["insightface"] == "2.1"
    assert {name: version for name, version in before.items() if after.get(name) != version} == {}  # nothing replaced
    imports = subprocess.run([str(python), "-c", "import cv2, onnxruntime, insightface, skimage, onnx; "
                              "print(cv2.DISTRIBUTION, onnxruntime.DISTRIBUTION)"], capture_output=True, text=True)
    assert imports.stdout.split() == [opencv, runtime], imports.stderr


def test_requirements_and_pyproject_declare_the_same_versions():
    """pip -r requirements.txt (ComfyUI-Manager, comfy-cli) and pip install . must ask for the same versions."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from packaging.requirements import Requirement

    def normal(lines):
        return {canonical_name(r.name): str(r.specifier) for r in map(Requirement, lines)}

    def canonical_name(name):
        return name.lower().replace("_", "-")

    listed = [line.split("#")[0].strip() for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()]
    declared = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert normal([line for line in listed if line]) == normal(declared)
    assert all(spec.startswith(">=") for spec in normal(declared).values())  # a lower bound on each
