"""ComfyUI entry point of the RIDFR node pack (V3 node API: registration through ``comfy_entrypoint``).

ComfyUI imports this folder as a package; ``ridfr_core`` lives next to it and is imported by name, so
the pack folder is put on ``sys.path`` here. Heavy or optional dependencies (diffusers, transformers,
insightface) are imported only when a node runs, so the nodes always register and a missing package
is reported by the node that needs it, with the ``pip install`` line.
"""

import os
import sys

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    sys.path.insert(0, _PACK_DIR)

from .nodes import comfy_entrypoint  # noqa: E402

__all__ = ["comfy_entrypoint"]
