"""Appending the bytes a ``.part`` file lacks, keeping every byte that arrived.

huggingface_hub's ``http_get`` reads a body in 10 MB blocks, so a connection that drops inside a block loses
it (a ``.part`` stayed empty when less than 10 MB had come, and the next run started over). Here each piece
is written as it arrives, over huggingface_hub's own HTTP session (its proxy, certificate and header set-up),
and a dropped connection is resumed with a Range request: in the same run while bytes keep coming, and in the
next run from wherever the ``.part`` ends.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

RETRIES = 5  # attempts in a row that bring no new byte before a run gives up (as huggingface_hub's http_get)
PIECE = 1 << 16  # what the requests-based session (huggingface_hub < 1.0) reads at a time


class DiskWriteError(OSError):
    """The disk refused a write (full, or the file went away): retrying the network will not help."""


@contextmanager
def open_stream(url: str, headers: dict) -> Iterator[tuple[int, Iterator[bytes]]]:
    """(HTTP status, the body's pieces as they arrive) of a GET; an HTTP error status raises HfHubHTTPError."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session, hf_raise_for_status

    session = get_session()
    if callable(getattr(session, "stream", None)):  # huggingface_hub >= 1.0: an httpx client (requests: a flag)
        with session.stream("GET", url, headers=headers, follow_redirects=True,
                            timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
            hf_raise_for_status(response)
            yield response.status_code, response.iter_bytes()
    else:  # huggingface_hub 0.x: a requests session
        with session.get(url, headers=headers, stream=True, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
            hf_raise_for_status(response)
            yield response.status_code, response.iter_content(chunk_size=PIECE)


def receive(url: str, headers: dict, handle: BinaryIO, bar) -> None:
    """One request for the bytes after the end of ``handle`` (opened for appending), written as they arrive."""
    have = handle.tell()
    with open_stream(url, {**headers, "Range": f"bytes={have}-"} if have else headers) as (status, pieces):
        if have and status != 206:  # the server ignored the range: its body starts at byte 0
            handle.seek(0)
            handle.truncate()
            bar.update(-have)
        for piece in pieces:
            try:
                handle.write(piece)
            except OSError as error:
                raise DiskWriteError(error.errno, error.strerror) from error
            bar.update(len(piece))


def append_missing(url: str, headers: dict, part: Path, size: int, name: str, tqdm_class=None) -> None:
    """Bring ``part`` to ``size`` bytes from ``url``, resuming where it ends. A dropped connection is resumed at
    once while each try brings bytes; an HTTP error status, a disk error or ``RETRIES`` fruitless tries in a
    row raise, with every byte received kept in ``part``. ``tqdm_class``: the progress bar (huggingface_hub's
    by default)."""
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import tqdm

    with open(part, "ab") as handle, (tqdm_class or tqdm)(total=size, initial=handle.tell(), unit="B", unit_scale=True,
                                                           desc=name) as bar:
        fruitless = 0
        while handle.tell() < size:
            before, error = handle.tell(), None
            try:
                receive(url, headers, handle, bar)
            except (HfHubHTTPError, DiskWriteError):
                raise
            except Exception as caught:  # the transport's own errors (reset, timeout, incomplete body)
                error = caught
            fruitless = 0 if handle.tell() > before else fruitless + 1
            if fruitless >= RETRIES:
                raise error or EOFError(f"the server ended the body at byte {handle.tell()} of {size}")
            if error is not None:
                time.sleep(1)
