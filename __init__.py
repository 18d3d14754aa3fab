"""ComfyUI entry point of the RIDFR node pack (V3 node API: registration through ``comfy_entrypoint``).

ComfyUI imports this folder as a package (its module name comes from the folder's path); the nodes reach
the core as the sub-package ``ridfr_core`` through relative imports, so nothing is put on ``sys.path``.
Heavy or optional dependencies (diffusers, transformers, insightface) are imported only when a node runs,
so the nodes always register and a missing package is reported by the node that needs it, with the
``pip install`` line.
"""

from .nodes import comfy_entrypoint

WEB_DIRECTORY = "./web"  # the frontend extension: model downloads, greyed-out backend-default widgets
__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
