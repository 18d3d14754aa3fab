"""In-UI model downloads: routes on ComfyUI's PromptServer that fetch registered model files (and only those)
into ComfyUI's models folder with the same downloader as ``python -m ridfr_core.models`` (resume, sha256
check, atomic placement). The frontend extension (web/ridfr.js) asks which files a loaded workflow lacks,
shows their licences and, once the user accepts them, starts a download and polls its progress.

- ``POST /ridfr/models/missing`` ``{"names": [widget values]}``: the registered files named there that
  ComfyUI cannot see, with folder, size, licence and whether they can be downloaded.
- ``POST /ridfr/models/download`` ``{"files": [registry paths], "accept_licences": true}``: starts one
  download job in a thread; 409 while one runs, 403 from another machine unless
  ``RIDFR_ALLOW_REMOTE_DOWNLOADS=1`` is set where ComfyUI starts (``--listen`` makes the server reachable).
- ``GET /ridfr/models/download``: the job's progress.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from pathlib import Path

import folder_paths

from ..ridfr_core.models import all_files
from .loading import FACE_FOLDER, face_model_packs

logger = logging.getLogger(__name__)
REMOTE_SWITCH = "RIDFR_ALLOW_REMOTE_DOWNLOADS"


class DownloadJob:
    """One download of several files, run in a thread; its state is read by the progress route."""

    def __init__(self, files: list):
        self.files, self.finished, self.results = files, [], []
        self.current, self.done, self.total, self.error = None, 0, None, None
        self.running = True
        self.lock = threading.Lock()

    def snapshot(self) -> dict:
        with self.lock:
            return {"running": self.running, "files": [file.relative for file in self.files],
                    "current": self.current, "done": self.done, "total": self.total, "finished": list(self.finished),
                    "results": list(self.results), "error": self.error}

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

    def run(self, models: Path) -> None:
        from ..ridfr_core.models.fetch import DownloadError, fetch

        try:
            for file in self.files:
                with self.lock:
                    self.current, self.done, self.total = file.relative, 0, file.size or file.approx_size
                result = fetch(file, models, tqdm_class=self.progress_bar())
                with self.lock:
                    self.finished.append(file.relative)
                    self.results.append(f"{file.relative}: {result}")
        except DownloadError as error:
            with self.lock:
                self.error = str(error)
        except Exception as error:  # reported to the user, who can run it again
            logger.exception("RIDFR download failed")
            with self.lock:
                self.error = f"{type(error).__name__}: {error}"
        finally:
            with self.lock:
                self.running, self.current = False, None


_job: DownloadJob | None = None
_start_lock = threading.Lock()


def is_present(file) -> bool:
    """Whether ComfyUI sees the file where LoadRIDFR and ComfyUI's loaders look for it."""
    if file.folder == FACE_FOLDER + "/models":
        return file.name in face_model_packs()
    try:
        return file.name in folder_paths.get_filename_list(file.folder)
    except KeyError:
        return False


def describe(file) -> dict:
    licence = file.licence and {"name": file.licence.name, "url": file.licence.url, "terms": file.licence.terms}
    return {"relative": file.relative, "folder": file.folder, "name": file.name, "what": file.what,
            "size": file.size or file.approx_size, "licence": licence, "downloadable": file.downloadable,
            "how_to_get": file.how_to_get, "source": file.source}


def missing_files(names) -> list:
    wanted = {name for name in names if isinstance(name, str)}
    return [file for file in all_files() if file.name in wanted and not is_present(file)]


def allowed(request) -> bool:
    """Downloads fill the disk of the machine ComfyUI runs on: from that machine always, from others only
    when whoever started ComfyUI allowed it."""
    try:
        local = ipaddress.ip_address(request.remote or "").is_loopback
    except ValueError:
        local = False
    return local or os.environ.get(REMOTE_SWITCH) == "1"


def start(relatives, accepted: bool) -> tuple[int, dict]:
    """(HTTP status, answer) for a download request."""
    global _job
    registry = {file.relative: file for file in all_files()}
    if not isinstance(relatives, list) or not relatives:
        return 400, {"error": "name the registered files to download ('files': [folder/name, ...])."}
    unknown = [name for name in relatives if name not in registry or not registry[name].downloadable]
    if unknown:
        return 400, {"error": f"not downloadable registered files: {', '.join(map(str, unknown))}."}
    files = [registry[name] for name in dict.fromkeys(relatives)]
    if any(file.licence for file in files) and accepted is not True:
        return 400, {"error": "accept the licences of the files first ('accept_licences': true)."}
    with _start_lock:
        if _job is not None and _job.running:
            return 409, {**_job.snapshot(), "error": "another RIDFR download is running; wait for it to finish."}
        _job = DownloadJob(files)
        threading.Thread(target=_job.run, args=(Path(folder_paths.models_dir),), daemon=True,
                         name="ridfr-download").start()
        return 202, _job.snapshot()


def register_routes(server) -> None:
    from aiohttp import web

    routes = server.routes

    @routes.post("/ridfr/models/missing")
    async def missing(request):
        body = await request.json()
        files = missing_files(body.get("names") or [])
        return web.json_response({"files": [describe(file) for file in files],
                                  "download": _job.snapshot() if _job else None})

    @routes.post("/ridfr/models/download")
    async def download(request):
        if not allowed(request):
            return web.json_response({"error": f"downloads from another machine are off; start ComfyUI with "
                                               f"{REMOTE_SWITCH}=1 to allow them."}, status=403)
        body = await request.json()
        status, answer = start(body.get("files"), body.get("accept_licences"))
        return web.json_response(answer, status=status)

    @routes.get("/ridfr/models/download")
    async def progress(request):
        return web.json_response(_job.snapshot() if _job else {"running": False, "files": []})
