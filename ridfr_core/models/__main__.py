"""``python -m ridfr_core.models``: list the model files each backend needs, download the missing ones.

    python -m ridfr_core.models list [--backend ridfr] [--models models]
    python -m ridfr_core.models download --backend ridfr --models models --accept-licences

``--models`` is laid out like ComfyUI's ``models/`` folder (give ComfyUI's own to serve both). Nothing
is downloaded without ``download`` and the licence flag; hub files honour ``HF_ENDPOINT``, ``HF_TOKEN``,
``HF_HUB_OFFLINE`` and the Hugging Face cache as usual.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

from .fetch import human, state
from .plan import fetch_in_order, in_download_order, not_needed, size_text
from .registry import BACKENDS, LICENCE_FLAG, ModelFile

STATE_TEXT = {"missing": "missing", "intact": "intact", "unverified": "present, not verified yet",
              "different": "DIFFERS from the published file", "incomplete": "INCOMPLETE"}


def describe(file: ModelFile, models: Path) -> list[str]:
    current = state(file, models)
    status = STATE_TEXT[current] if file.downloadable or current != "missing" else "missing (not downloadable)"
    lines = [f"  {file.relative:<58} {size_text(file) if file.downloadable else '':>16}  {status}",
             f"      {file.what}; source: {file.source}"]
    if file.licence:
        lines.append(f"      licence: {file.licence.name}: {file.licence.terms} ({file.licence.url})")
    return lines


def list_files(backends: list[str], models: Path) -> int:
    print(f"models folder: {models.resolve()}")
    for backend in backends:
        print(f"\nbackend {backend}:")
        for file in BACKENDS[backend]:
            print("\n".join(describe(file, models)))
        print("\n".join(describe_content_files(backend, models)))
    return 0


def describe_content_files(backend: str, models: Path) -> list[str]:
    """The content files of ``backend`` in our format under ``ridfr/`` that the registry does not name (trained or
    fine-tuned ones), with what their metadata says they are."""
    from ..backends import BACKENDS as CONTENT_BACKENDS, file_backend
    from ..weights.checkpoints import read_safetensors_metadata

    folder, registered = models / "ridfr", {file.name for file in BACKENDS[backend]}
    lines = []
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        if path.name in registered or file_backend(path, quick=True) is not CONTENT_BACKENDS[backend]:
            continue
        meta = read_safetensors_metadata(path, "content weights")
        made = (f"{'alignment' if meta.get('stage') == 'align' else meta.get('stage', '')}-trained from "
                f"{meta['fine_tuned_from']} ({meta.get('step', '?')} steps, lambda {meta.get('align_weight', '?')}, "
                f"parts {meta.get('train_parts', 'all')}, data {meta.get('data', '?')})" if meta.get("fine_tuned_from")
                else f"trained by {meta['trainer']} (stage {meta.get('stage')}, {meta.get('step')} steps)"
                if meta.get("trainer") else f"converted from {meta.get('source', '?')}")
        lines += [f"  ridfr/{path.name:<52} {human(path.stat().st_size):>16}  present (yours)",
                  f"      {CONTENT_BACKENDS[backend].label} content weights, {made}"]
    return lines


def print_licences(files: list[ModelFile]) -> None:
    for licence in dict.fromkeys(file.licence for file in files if file.licence):
        names = ", ".join(file.name for file in files if file.licence == licence)
        print(f"  {licence.name}: {licence.terms}\n      {licence.url}\n      ({names})")


def found_under(models: Path, file: ModelFile) -> Path | None:
    """Where a registered file is under ``models``, or None."""
    path = models / file.relative
    return path if path.exists() else None


def download(backend: str, models: Path, accepted: bool) -> int:
    files, locate = in_download_order(BACKENDS[backend]), partial(found_under, models)
    wanted = [file for file in files if file.downloadable and state(file, models) != "intact"
              and not_needed(file, files, locate) is None]
    print(f"backend {backend}, models folder {models.resolve()}")
    if wanted:
        print("licences of the files to download:")
        print_licences(wanted)
        if not accepted:
            print(f"\nnothing downloaded: add {LICENCE_FLAG} to accept these licences and download "
                  f"{len(wanted)} file(s).", file=sys.stderr)
            return 2
    failed = 0
    for number, outcome in enumerate(fetch_in_order(files, models, locate), 1):
        failed += outcome.failed
        print(f"[{number}/{len(files)}] {outcome.file.relative}: {outcome.text}", flush=True,
              file=sys.stderr if outcome.failed else sys.stdout)
    if failed:
        print(f"{failed} file(s) failed; nothing partial was put in place.", file=sys.stderr)
    return 1 if failed else 0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ridfr_core.models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="every file per backend: folder, size, source, licence, state")
    listing.add_argument("--backend", choices=sorted(BACKENDS), help="one backend (default: all)")
    fetching = commands.add_parser("download", help="fetch what is missing for one backend")
    fetching.add_argument("--backend", choices=sorted(BACKENDS), required=True)
    fetching.add_argument(LICENCE_FLAG, "--accept-licenses", dest="accept_licences", action="store_true",
                          help="accept the licences printed for the files to download (required to download)")
    for sub in (listing, fetching):
        sub.add_argument("--models", default="models", help="models folder laid out like ComfyUI's (default "
                         "./models; give ComfyUI's models folder to serve both)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    models = Path(args.models)
    if args.command == "list":
        return list_files([args.backend] if args.backend else list(BACKENDS), models)
    return download(args.backend, models, args.accept_licences)


if __name__ == "__main__":
    sys.exit(main())
