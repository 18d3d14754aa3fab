"""In-UI model downloads: routes on ComfyUI's PromptServer that fetch registered model files (and only those)
into ComfyUI's models folder with the same downloader and the same plan as ``python -m ridfr_core.models
download`` (resume, sha256 check, atomic placement; a holder such as RestorerIDFull.ckpt first, then only the
files whose parts it lacks). The frontend extension (web/ridfr.js) sends a loaded workflow's nodes, shows
what this pack's nodes lack with sizes and licences and, once the user accepts them, starts a download and
polls its progress.

- ``POST /ridfr/models/missing`` ``{"nodes": [{"type", "widgets": {name: value}}]}``: the registered files
  the graph's nodes of this pack need and ComfyUI cannot see (:mod:`.model_needs`), and those needed only if
  a file still to be downloaded lacks their part.
- ``POST /ridfr/models/download`` ``{"files": [registry paths], "accept_licences": true}``: starts one
  download job in a thread; 409 while one runs, 403 from another machine unless
  ``RIDFR_ALLOW_REMOTE_DOWNLOADS=1`` is set where ComfyUI starts (``--listen`` makes the server reachable).
- ``GET /ridfr/models/download``: the job's progress.

Both POST routes answer only requests that carry ``X-RIDFR-Request: 1``: a page of another site cannot send
that header without a CORS preflight, which ComfyUI does not grant (aiohttp reads JSON whatever the
Content-Type, so a plain ``text/plain`` form post would otherwise get through).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import threading
from pathlib import Path

import folder_paths

from ..ridfr_core.models import all_files
from ..ridfr_core.models.plan import fetch_in_order, in_download_order, size_text
from .loading import FACE_FOLDER, face_model_packs
from .model_needs import graph_needs, sort_needs

logger = logging.getLogger(__name__)
REMOTE_SWITCH = "RIDFR_ALLOW_REMOTE_DOWNLOADS"
REQUEST_HEADER = "X-RIDFR-Request"
FORWARDED = ("Forwarded", "X-Forwarded-For", "X-Real-IP")  # set by the usual reverse proxies and tunnels


class DownloadJob:
    """One download of several files, run in a thread; its state is read by the progress route."""

    def __init__(self, files: list):
        self.files, self.finished, self.results, self.errors = files, [], [], []
        self.current, self.done, self.total = None, 0, None
        self.running = True
        self.lock = threading.Lock()

    def snapshot(self) -> dict:
        with self.lock:
            return {"running": self.running, "files": [file.relative for file in self.files],
                    "current": self.current, "done": self.done, "total": self.total, "finished": list(self.finished),
                    "results": list(self.results), "errors": list(self.errors)}

    def progress_bar(self):
        """A huggingface_hub progress bar class that also reports to this job."""
        from huggingface_hub.utils import tqdm

        job = self

        class Bar(tqdm):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                with job.lock:
                    job.done, job.total = kwargs.get("initial") or 0, kwargs.get("total")

            def update(self, n=1):
                with job.lock:
                    job.done += n or 0
                return super().update(n)

        return Bar

    def starting(self, file) -> None:
        with self.lock:
            self.current, self.done, self.total = file.relative, 0, file.size or file.approx_size

    def run(self, models: Path) -> None:
        try:
            for outcome in fetch_in_order(self.files, models, comfy_path, self.progress_bar(), self.starting):
                with self.lock:
                    self.finished.append(outcome.file.relative)
                    (self.errors if outcome.failed else self.results).append(f"{outcome.file.relative}: {outcome.text}")
        except Exception as error:  # reported to the user, who can run it again
            logger.exception("RIDFR download failed")
            with self.lock:
                self.errors.append(f"{type(error).__name__}: {error}")
        finally:
            with self.lock:
                self.running, self.current = False, None


_job: DownloadJob | None = None
_start_lock = threading.Lock()


def comfy_path(file) -> Path | None:
    """Where ComfyUI's loaders (and ours) find a registered file, or None: its model folders (extra paths
    included) for the folders ComfyUI knows, ``models/<folder>`` for the others (MUSIQ's ``pyiqa``)."""
    if file.folder == FACE_FOLDER + "/models":
        return face_model_packs().get(file.name)
    if file.folder in folder_paths.folder_names_and_paths:
        found = folder_paths.get_full_path(file.folder, file.name)
        return Path(found) if found else None
    path = Path(folder_paths.models_dir) / file.relative
    return path if path.exists() else None


def describe(file) -> dict:
    licence = file.licence and {"name": file.licence.name, "url": file.licence.url, "terms": file.licence.terms}
    return {"relative": file.relative, "folder": file.folder, "name": file.name, "what": file.what,
            "size": file.size or file.approx_size, "size_text": size_text(file), "licence": licence,
            "downloadable": file.downloadable, "how_to_get": file.how_to_get, "source": file.source}


def missing_answer(nodes) -> dict:
    needs = sort_needs(graph_needs(nodes if isinstance(nodes, list) else [], comfy_path), comfy_path)
    return {"files": [describe(file) for file in needs.missing],
            "if_lacking": [{**describe(file), "holder": holder.relative, "holder_name": holder.name, "holds": why}
                           for file, holder, why in needs.if_holder_lacks],
            "download": _job.snapshot() if _job else None}


def is_local(request) -> bool:
    """From this machine, and not relayed by a proxy or tunnel that says so (one that does not, looks local)."""
    try:
        loopback = ipaddress.ip_address(request.remote or "").is_loopback
    except ValueError:
        loopback = False
    return loopback and not any(header in request.headers for header in FORWARDED)


def refusal(request, downloads: bool) -> str | None:
    """Why a POST is refused (403), or None: no RIDFR header (a cross-site page), or, for ``downloads``, another
    machine while the user has not allowed it."""
    if request.headers.get(REQUEST_HEADER) != "1":
        return (f"RIDFR's routes answer only RIDFR's own page (header {REQUEST_HEADER}: 1); reload ComfyUI in the "
                "browser if this came from it.")
    if downloads and not (is_local(request) or os.environ.get(REMOTE_SWITCH) == "1"):
        return f"downloads from another machine are off; start ComfyUI with {REMOTE_SWITCH}=1 to allow them."
    return None


def start(relatives, accepted: bool) -> tuple[int, dict]:
    """(HTTP status, answer) for a download request."""
    global _job
    registry = {file.relative: file for file in all_files()}
    if not isinstance(relatives, list) or not relatives:
        return 400, {"error": "name the registered files to download ('files': [folder/name, ...])."}
    unknown = [name for name in relatives if not isinstance(name, str) or name not in registry
               or not registry[name].downloadable]
    if unknown:
        return 400, {"error": f"not downloadable registered files: {', '.join(map(str, unknown))}."}
    files = in_download_order(registry[name] for name in relatives)
    if any(file.licence for file in files) and accepted is not True:
        return 400, {"error": "accept the licences of the files first ('accept_licences': true)."}
    with _start_lock:
        if _job is not None and _job.running:
            return 409, {**_job.snapshot(), "error": "another RIDFR download is running; wait for it to finish."}
        _job = DownloadJob(files)
        threading.Thread(target=_job.run, args=(Path(folder_paths.models_dir),), daemon=True,
                         name="ridfr-download").start()
        return 202, _job.snapshot()


async def json_object(request) -> dict | None:
    """The request's JSON object, or None for a body that is not JSON or not an object."""
    try:
        body = await request.json()
    except ValueError:  # not JSON (json.JSONDecodeError), or not UTF-8 text
        return None
    return body if isinstance(body, dict) else None


def register_routes(server) -> None:
    from aiohttp import web

    routes = server.routes

    async def checked(request, downloads: bool):
        """(the POST's JSON object, None), or (None, the answer refusing it)."""
        refused = refusal(request, downloads)
        if refused:
            return None, web.json_response({"error": refused}, status=403)
        body = await json_object(request)
        if body is None:
            return None, web.json_response({"error": "send a JSON object as the request body."}, status=400)
        return body, None

    @routes.post("/ridfr/models/missing")
    async def missing(request):
        body, refused = await checked(request, downloads=False)
        if refused:
            return refused
        # may read a checkpoint's key names: off the server's event loop
        return web.json_response(await asyncio.to_thread(missing_answer, body.get("nodes")))

    @routes.post("/ridfr/models/download")
    async def download(request):
        body, refused = await checked(request, downloads=True)
        if refused:
            return refused
        status, answer = start(body.get("files"), body.get("accept_licences"))
        return web.json_response(answer, status=status)

    @routes.get("/ridfr/models/download")
    async def progress(request):
        return web.json_response(_job.snapshot() if _job else {"running": False, "files": []})
