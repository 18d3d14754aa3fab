"""The model files LoadRIDFR loads: ComfyUI's model folders, and what each "auto" choice stands for.

Folders (added with ``folder_paths.add_model_folder_path``, so paths from extra_model_paths.yaml and other packs
stay): ``models/ridfr`` (the content module: RIDFR content weights, or RestorerID's ``RestorerIDFull.ckpt`` / its
converted ``.safetensors``), ``models/ipadapter`` (IP-Adapter FaceID Plus/PlusV2, shared with the IP-Adapter pack),
``models/clip_vision`` and ``models/checkpoints`` (ComfyUI's own) and ``models/insightface``
(``models/<buffalo_l|antelopev2>/*.onnx``, shared with the IP-Adapter and InstantID packs).

"auto" follows the content file as the CLI does (``ridfr_core.restore.resolve_models``): a RestorerID checkpoint
brings its own SD1.5 (the non-EMA one it was trained against) and, where its keys hold them, FaceID Plus v1 and
CLIP ViT-H; everything else comes from the registered files (``ridfr_core.models``): SD1.5 in checkpoints, the
FaceID Plus version the backend was trained with, CLIP ViT-H, buffalo_l. A content file that is not there yet is
known by its registered name, and the parts the registry says it holds are taken as held: the downloader fetches
it first, and once it is there its keys say what is still needed.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import folder_paths

from ..ridfr_core.faces.analysis import MODEL_PACKS
from ..ridfr_core.models.registry import BACKENDS as REGISTERED, CLIP_VIT_H, FACEID_PLUS_V1, FACEID_PLUS_V2, HELD_BY, SD15

CONTENT_FOLDER, ADAPTER_FOLDER, CLIP_FOLDER, FACE_FOLDER = "ridfr", "ipadapter", "clip_vision", "insightface"
BASE_FOLDER, PACK_FOLDER = "checkpoints", "insightface/models"
WEIGHT_EXTENSIONS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
AUTO = "auto"
PARTS = {"base": "base", "ipadapter": "adapter", "clip_vision": "clip_vision"}  # option -> backend part name


def register_model_folders() -> None:
    for name in (CONTENT_FOLDER, ADAPTER_FOLDER, FACE_FOLDER):
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name))


def weight_files(folder: str) -> list[str]:
    try:
        names = folder_paths.get_filename_list(folder)
    except KeyError:
        return []
    return [name for name in names if name.lower().endswith(WEIGHT_EXTENSIONS)]


def face_model_packs() -> dict[str, Path]:
    """{pack name: folder} for every ``<insightface folder>/models/<pack>`` holding .onnx files."""
    packs: dict[str, Path] = {}
    try:
        roots = folder_paths.get_folder_paths(FACE_FOLDER)
    except KeyError:
        roots = []
    for root in roots:
        models = Path(root) / "models"
        if models.is_dir():
            for pack in sorted(models.iterdir()):
                if pack.is_dir() and pack.name not in packs and any(pack.glob("**/*.onnx")):
                    packs[pack.name] = pack
    return packs


def available(folder: str) -> list[str]:
    """What a folder offers: weight files, or for insightface the model packs."""
    return list(face_model_packs()) if folder == PACK_FOLDER else weight_files(folder)


@dataclass(frozen=True)
class Chosen:
    """One model LoadRIDFR loads: ``name`` in ``models/<folder>``, or (name None) the content file's own part."""

    option: str
    folder: str
    name: str | None
    auto: bool = False

    @property
    def from_content(self) -> bool:
        return self.name is None


@functools.lru_cache(maxsize=8)
def _content_facts(path: str, size: int, mtime: int) -> tuple[str | None, frozenset[str]]:
    from ..ridfr_core.backends import file_backend
    from ..ridfr_core.weights.checkpoints import CheckpointError

    try:
        backend = file_backend(path)
        return (backend.name, frozenset(backend.bundled_parts(Path(path)))) if backend else (None, frozenset())
    except (CheckpointError, ValueError):  # unreadable: LoadRIDFR says so when it loads it
        return None, frozenset()


def content_facts(name: str) -> tuple[str | None, frozenset[str]]:
    """(backend name, parts it holds) of a content file: read from its keys when it is there (remembered while
    the file is unchanged), else from the registry by its name ((None, {}) for a name RIDFR does not know)."""
    path = folder_paths.get_full_path(CONTENT_FOLDER, name) if name in weight_files(CONTENT_FOLDER) else None
    if path is not None:
        stat = os.stat(path)
        return _content_facts(path, stat.st_size, stat.st_mtime_ns)
    backend = next((backend for backend, files in REGISTERED.items()
                    if any(file.folder == CONTENT_FOLDER and file.name == name for file in files)), None)
    held = {part for holder, part, _ in HELD_BY.values() if holder.folder == CONTENT_FOLDER and holder.name == name}
    return backend, frozenset(held)


def preferred_or_only(folder: str, preferred: str, fits=lambda name: True) -> str:
    """The registered file when it is there, else the only file of the folder that fits, else the registered
    name (reported missing)."""
    found = available(folder)
    fitting = [name for name in found if fits(name)]
    return preferred if preferred in found or len(fitting) != 1 else fitting[0]


def auto_base(content: str, backend, held: frozenset[str]) -> Chosen:
    if "base" in held:
        return Chosen("base", CONTENT_FOLDER, None, auto=True)
    path = folder_paths.get_full_path(CONTENT_FOLDER, content) if backend is not None else None
    source = backend.base_file(Path(path)) if path else None  # a converted/trained RestorerID file: its checkpoint
    if source is not None and source.name != content and source.name in weight_files(CONTENT_FOLDER):
        return Chosen("base", CONTENT_FOLDER, source.name, auto=True)
    return Chosen("base", BASE_FOLDER, preferred_or_only(BASE_FOLDER, SD15.name), auto=True)


def auto_adapter(backend, held: frozenset[str]) -> Chosen:
    from ..ridfr_core.weights.adapter_files import is_faceid_v2_file

    if "adapter" in held:
        return Chosen("ipadapter", CONTENT_FOLDER, None, auto=True)
    wanted = FACEID_PLUS_V2 if backend.faceid_v2 else FACEID_PLUS_V1
    name = preferred_or_only(ADAPTER_FOLDER, wanted.name, lambda name: "faceid-plus" in name.lower()
                             and is_faceid_v2_file(name) == backend.faceid_v2)
    return Chosen("ipadapter", ADAPTER_FOLDER, name, auto=True)


def auto_clip_vision(held: frozenset[str]) -> Chosen:
    if "clip_vision" in held:
        return Chosen("clip_vision", CONTENT_FOLDER, None, auto=True)
    return Chosen("clip_vision", CLIP_FOLDER, preferred_or_only(CLIP_FOLDER, CLIP_VIT_H.name), auto=True)


def auto_face_pack() -> Chosen:
    """The pack the CLI takes: buffalo_l (FaceID Plus was trained with its ArcFace), else antelopev2."""
    packs = face_model_packs()
    return Chosen("insightface", PACK_FOLDER, next((name for name in MODEL_PACKS if name in packs), MODEL_PACKS[0]),
                  auto=True)


def chosen_files(values: dict) -> list[Chosen]:
    """Every model LoadRIDFR loads with these widget values, "auto" resolved for the content file (a linked
    value, None, is known only when the node runs and is left out). The "auto" choices that depend on a content
    file RIDFR cannot tell (not there and not registered) are left out until it is there."""
    from ..ridfr_core.backends import BACKENDS

    content = values.get("content_weights")
    chosen = [Chosen("content_weights", CONTENT_FOLDER, content)] if content is not None else []
    backend_name, held = content_facts(content) if content is not None else (None, frozenset())
    backend = BACKENDS.get(backend_name)
    automatic = {"base": lambda: auto_base(content, backend, held), "ipadapter": lambda: auto_adapter(backend, held),
                 "clip_vision": lambda: auto_clip_vision(held), "insightface": auto_face_pack}
    folders = {"base": BASE_FOLDER, "ipadapter": ADAPTER_FOLDER, "clip_vision": CLIP_FOLDER, "insightface": PACK_FOLDER}
    for option, folder in folders.items():
        value = values.get(option, AUTO)  # base: absent from workflows saved before it existed
        if value == AUTO and (backend is not None or option == "insightface"):
            chosen.append(automatic[option]())
        elif value is not None and value != AUTO:
            chosen.append(Chosen(option, folder, value))
    return chosen


def files_needed(values: dict) -> list[tuple[str, str]]:
    """(models/ subfolder, file name) of every file LoadRIDFR with these widget values reads, present or not, the
    parts the content file holds left out: what the download dialog offers for a Load RIDFR node."""
    return [(file.folder, file.name) for file in chosen_files(values) if not file.from_content]


def content_backend_name(values: dict) -> str | None:
    """The backend ("ridfr", "restorerid") of the content file these LoadRIDFR values name, None if unknown."""
    content = values.get("content_weights")
    return content_facts(content)[0] if content is not None else None


def missing_model_files(values: dict) -> list[tuple[Chosen, list[str]]]:
    """(the chosen file, what its folder holds) for each file LoadRIDFR would load that is not there."""
    missing = []
    for file in chosen_files(values):
        if not file.from_content:
            found = available(file.folder)
            if file.name not in found:
                missing.append((file, found))
    return missing
