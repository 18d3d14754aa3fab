"""Install the face-analysis dependencies without ever adding a second onnxruntime or OpenCV (``install.py``).

insightface declares ``onnxruntime`` and ``opencv-python``. A ComfyUI environment often has another
wheel of each already (``onnxruntime-gpu`` for InstantID/PuLID/ReActor, ``opencv-python-headless`` or
``-contrib``); each family ships one module (``onnxruntime``, ``cv2``), so a second wheel overwrites the
first's files and uninstalling either breaks both. Hence:

- whichever onnxruntime and OpenCV wheel is installed stays, and nothing is added beside it;
- where none is: ``onnxruntime-gpu`` on a CUDA build of torch, else ``onnxruntime``; and
  ``opencv-python-headless``;
- insightface goes in with ``--no-deps``, then its own declared dependencies minus those two families.

Standard library only: it runs before any dependency is there, with the environment's own pip.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
import subprocess
import sys

ONNXRUNTIME_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                             "onnxruntime-silicon", "onnxruntime-rocm")
OPENCV_DISTRIBUTIONS = ("opencv-python", "opencv-python-headless", "opencv-contrib-python",
                        "opencv-contrib-python-headless")
INSIGHTFACE = "insightface>=0.7"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed(names: tuple[str, ...]) -> list[str]:
    found = []
    for name in names:
        try:
            importlib.metadata.distribution(name)
            found.append(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def cuda_torch() -> bool:
    """Whether the installed torch is a CUDA build (without torch: no)."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return getattr(torch.version, "cuda", None) is not None


def insightface_dependencies() -> list[str]:
    """insightface's declared requirements (markers kept, extras dropped) without onnxruntime and OpenCV."""
    families = {canonical(name) for name in ONNXRUNTIME_DISTRIBUTIONS + OPENCV_DISTRIBUTIONS}
    kept = []
    for requirement in importlib.metadata.requires("insightface") or []:
        spec, _, marker = requirement.partition(";")
        name = re.match(r"\s*([A-Za-z0-9._-]+)", spec).group(1)
        if "extra" not in marker and canonical(name) not in families:
            kept.append(requirement.strip())
    return kept


def pip(*args: str) -> None:
    command = [sys.executable, "-m", "pip", "install", *args]
    print("running:", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    importlib.invalidate_caches()


def main() -> int:
    runtimes, opencvs = installed(ONNXRUNTIME_DISTRIBUTIONS), installed(OPENCV_DISTRIBUTIONS)
    chosen = []
    for family, present, default in (("onnxruntime", runtimes, "onnxruntime-gpu" if cuda_torch() else "onnxruntime"),
                                     ("OpenCV", opencvs, "opencv-python-headless")):
        if present:
            print(f"{family}: keeping {', '.join(present)}")
        else:
            print(f"{family}: none installed, choosing {default}")
            chosen.append(default)
        if len(present) > 1:
            print(f"warning: {' and '.join(present)} are installed together and share one module; keep one: "
                  f"pip uninstall -y {' '.join(present)} && pip install {present[0]}", file=sys.stderr)
    try:
        if not installed(("insightface",)):
            pip("--no-deps", INSIGHTFACE)
        pip(*chosen, *insightface_dependencies())
    except subprocess.CalledProcessError as error:
        print(f"error: pip failed ({error.returncode}); see its output above.", file=sys.stderr)
        return 1
    opencv = opencvs[0] if opencvs else "opencv-python-headless"
    if opencv != "opencv-python":  # the one OpenCV wheel insightface names
        print(f"note: pip's \"ERROR: ... insightface ... requires opencv-python, which is not installed\" is deliberate: "
              f"one OpenCV wheel only ({opencv}), which gives insightface its cv2; the install succeeded.")
    return 0
