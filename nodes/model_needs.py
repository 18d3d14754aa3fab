"""Which registered model files a ComfyUI graph needs, read from the nodes of this pack only (their types and
widget values, as the frontend sends them): RIDFR's download dialog offers these and nothing that another
pack's nodes merely name. The one place that knows which widget of which node asks for which file.

- ``LoadRIDFR``: the file each file widget names (content weights, IP-Adapter, CLIP vision, insightface pack);
  a widget set to ``auto`` asks for the file the content file's backend uses in that folder.
- ``IdentityCondition`` whose ``auto_weight`` asks for RestorerID's adaptive identity scale: MUSIQ's weights.

Files that a needed file may hold (``HELD_BY``: RestorerIDFull.ckpt holds SD1.5, FaceID Plus v1 and CLIP ViT-H)
are sorted by :func:`sort_needs`: not needed when the holder is there and holds their part, needed when it is
there and lacks it, and "only if the holder lacks it" while the holder is still to be downloaded (the
download then fetches the holder first and decides by its keys: ridfr_core.models.plan).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ridfr_core.models.plan import Locate, holder_of, in_download_order, not_needed
from ..ridfr_core.models.registry import BACKENDS, MUSIQ_KONIQ, ModelFile, all_files
from .model_files import ADAPTER_FOLDER, AUTO, BASE_FOLDER, CLIP_FOLDER, CONTENT_FOLDER, PACK_FOLDER

FOLLOW_CONTENT = AUTO  # a LoadRIDFR file widget that takes what the content file's backend uses
LOADER_FILES = {"content_weights": CONTENT_FOLDER, "base": BASE_FOLDER, "ipadapter": ADAPTER_FOLDER,
                "clip_vision": CLIP_FOLDER, "insightface": PACK_FOLDER}  # LoadRIDFR's file widgets and their folders


@dataclass(frozen=True)
class Needs:
    """The missing files a graph needs (download order), and those needed only if ``holder`` lacks their part."""

    missing: list[ModelFile]
    if_holder_lacks: list[tuple[ModelFile, ModelFile, str]]  # (file, holder, what the holder usually holds)


def registered(folder: str, name) -> ModelFile | None:
    return next((file for file in all_files() if file.folder == folder and file.name == name), None)


def content_backend(content: ModelFile | None, name, locate: Locate) -> str | None:
    """The backend of LoadRIDFR's content file: by the registry for a registered one, else by its keys when it
    is there; None when neither tells."""
    for backend, files in BACKENDS.items():
        if content in files:
            return backend
    path = locate(ModelFile("ridfr", name, "content weights")) if isinstance(name, str) else None
    if path is None:
        return None
    from ..ridfr_core.backends import file_backend

    try:
        found = file_backend(path)
    except (ValueError, OSError):  # unreadable: LoadRIDFR says why when it runs
        return None
    return found.name if found is not None else None


def loader_needs(widgets: dict, locate: Locate) -> list[ModelFile]:
    content = registered(LOADER_FILES["content_weights"], widgets.get("content_weights"))
    backend = None
    needs = []
    for widget, folder in LOADER_FILES.items():
        value = widgets.get(widget)
        if value == FOLLOW_CONTENT:
            backend = backend or content_backend(content, widgets.get("content_weights"), locate)
            needs += [file for file in BACKENDS.get(backend, ()) if file.folder == folder][:1]
        elif registered(folder, value) is not None:
            needs.append(registered(folder, value))
    return needs


def needs_musiq(auto_weight, backends: set) -> bool:
    """IdentityCondition's auto_weight asks for MUSIQ: 'on' (True in workflows saved when it was a switch), or
    'backend default' in a graph whose LoadRIDFR loads RestorerID weights (published with the adaptive scale)."""
    choice = {True: "on", False: "off"}.get(auto_weight, auto_weight)
    return choice == "on" or (choice == "backend default" and "restorerid" in backends)


def graph_needs(nodes: list, locate: Locate) -> list[ModelFile]:
    """The registered files the nodes of this pack among ``nodes`` (``{"type", "widgets": {name: value}}``)
    need, in download order; other nodes are not read."""
    ours = [node for node in nodes if isinstance(node, dict) and isinstance(node.get("widgets"), dict)]
    loaders = [node["widgets"] for node in ours if node.get("type") == "LoadRIDFR"]
    backends = {content_backend(registered(CONTENT_FOLDER, widgets.get("content_weights")),
                                widgets.get("content_weights"), locate) for widgets in loaders}
    needs = [file for widgets in loaders for file in loader_needs(widgets, locate)]
    if any(needs_musiq(node["widgets"].get("auto_weight", "backend default"), backends)
           for node in ours if node.get("type") == "IdentityCondition"):
        needs.append(MUSIQ_KONIQ)
    return in_download_order(needs)


def sort_needs(needs: list[ModelFile], locate: Locate) -> Needs:
    """Which of ``needs`` are missing, and which of those only matter if a holder still to come lacks them."""
    missing, conditional = [], []
    for file in needs:
        if locate(file) is not None or not_needed(file, needs, locate):
            continue
        held = holder_of(file, needs)
        if held is not None and locate(held[0]) is None:
            conditional.append((file, held[0], held[2]))
        else:
            missing.append(file)
    return Needs(missing, conditional)
