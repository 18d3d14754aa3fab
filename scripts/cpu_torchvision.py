"""Make PyPI's torchvision importable beside a CPU-only torch: ``python scripts/cpu_torchvision.py [PYTHON]``.

spandrel (``--preprocess``) imports torchvision's pure-Python transforms. PyPI's Linux x86_64 torchvision
wheels are CUDA builds: on a CPU torch their compiled ops cannot load, which torchvision tolerates, except
that two fake-kernel registrations (``torchvision::nms``/``qnms``) then raise "operator torchvision::nms
does not exist" and the whole package fails to import. This guards those two registrations the way
torchvision guards its other ones (``extension._has_ops()``), leaving a pure-Python torchvision whose
``ops``/``io`` raise when used (RIDFR and spandrel's SwinIR path use neither).

Does nothing where torchvision is absent or already imports (a CUDA torch with its matching torchvision).
PYTHON: the interpreter whose torchvision to fix (default: this one).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

GUARDED_OPS = ("nms", "qnms")


def import_error(python: str) -> str | None:
    """Why ``import torchvision`` fails in ``python`` (None when it imports), in a fresh process because a
    failed import leaves half-registered ops behind."""
    result = subprocess.run([python, "-c", "import torchvision"], capture_output=True, text=True)
    return None if result.returncode == 0 else result.stderr.strip().splitlines()[-1]


def registrations_file(python: str) -> Path | None:
    """``torchvision/_meta_registrations.py`` of ``python``'s torchvision, found without importing it."""
    result = subprocess.run([python, "-c", "import importlib.util as u; s = u.find_spec('torchvision'); "
                             "print(s.submodule_search_locations[0] if s else '')"], capture_output=True, text=True)
    folder = result.stdout.strip()
    return Path(folder) / "_meta_registrations.py" if folder else None


def guard_registrations(text: str) -> str:
    for op in GUARDED_OPS:
        plain = f'@torch.library.register_fake("torchvision::{op}")'
        guarded = (f'@(torch.library.register_fake("torchvision::{op}") if torchvision.extension._has_ops() '
                   'else (lambda fn: fn))')
        if guarded not in text:
            text = text.replace(plain, guarded)
    return text


def main(argv: list[str]) -> int:
    python = argv[0] if argv else sys.executable
    path = registrations_file(python)
    if path is None:
        print("torchvision is not installed; nothing to do.")
        return 0
    error = import_error(python)
    if error is None:
        print("torchvision imports; nothing to do.")
        return 0
    if "torchvision::" not in error:
        print(f"torchvision fails to import for another reason, left as it is: {error}", file=sys.stderr)
        return 1
    path.write_text(guard_registrations(path.read_text()))
    error = import_error(python)
    if error is not None:
        print(f"torchvision still fails to import after guarding {path}: {error}", file=sys.stderr)
        return 1
    print(f"torchvision: its compiled ops do not load against this torch; guarded their registrations in {path}.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
