#!/usr/bin/env bash
# Every GPU figure of issue 29 in one command (about 8 minutes on one H100), written as one table:
# RIDFR and RestorerID per face in fp16 and bf16 at batch 1/4/16 (faces/s, peak VRAM), example workflows 1
# and 4 through a real ComfyUI server on CUDA, and workflow 4 with --reserve-vram 4. See bench/device_check.py.
#
#   bench/device_check.sh                       # CUDA, full size; table in device_check.md (+ .json)
#   bench/device_check.sh --tiny                # CPU, tiny sizes: checks that everything runs
#   PYTHON=/path/to/python bench/device_check.sh --out "$OUT/device_check.md"
#
# Needs the project's requirements (diffusers, transformers, safetensors, onnx, insightface) in PYTHON; the
# ComfyUI parts need COMFYUI_PATH (a ComfyUI checkout whose requirements PYTHON holds) and are skipped without.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" bench/device_check.py "$@"
