"""The model files of each backend (registry) and an opt-in downloader: ``python -m ridfr_core.models``.

Torch-free, so the CLI answers at once and the restore CLI can name the download command cheaply.
"""

from .registry import (BACKENDS, LICENCE_FLAG, Licence, ModelFile, all_files, download_command, frontend_models,
                       registered_file)

__all__ = ["BACKENDS", "LICENCE_FLAG", "Licence", "ModelFile", "all_files", "download_command", "frontend_models",
           "registered_file"]
