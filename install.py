"""Run by ComfyUI-Manager and comfy-cli after ``requirements.txt`` (or by hand: ``python install.py``):
installs insightface, onnxruntime and OpenCV without a second onnxruntime or OpenCV wheel beside the one
the environment has (see ridfr_core/dependencies.py)."""

import sys

from ridfr_core.dependencies import main  # python puts this script's folder, the repository, first on sys.path

if __name__ == "__main__":
    sys.exit(main())
