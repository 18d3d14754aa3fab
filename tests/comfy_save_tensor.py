"""Test support, dropped into ``custom_nodes/`` of a test server: a node that writes an IMAGE as float32 safetensors
into ComfyUI's output folder, so that a test compares what a workflow computed before the 8-bit PNG rounding."""

from __future__ import annotations

import os

import folder_paths
from safetensors.torch import save_file


class SaveImageTensor:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "name": ("STRING", {"default": "images"})}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"
    CATEGORY = "testing"

    def save(self, images, name):
        path = os.path.join(folder_paths.get_output_directory(), f"{name}.safetensors")
        save_file({"images": images.float().cpu().contiguous()}, path)
        return {}


NODE_CLASS_MAPPINGS = {"SaveImageTensor": SaveImageTensor}
