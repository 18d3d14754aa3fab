"""Run by ComfyUI-Manager and comfy-cli after ``requirements.txt`` (or by hand: ``python install.py``):
installs insightface, onnxruntime and OpenCV without a second onnxruntime or OpenCV wheel beside the one
the environment has (see ridfr_core/dependencies.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ridfr_core.dependencies import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
