"""The evaluation split and its degraded data: ``python -m ridfr_core.eval split`` and ``degrade``.

A split holds out whole identities of CelebRef-HQ; every image of a held-out identity is one case with that
identity's other images as its references. ``degrade`` checks the whole split (names, references, that every
file is an image) before it writes anything, since a case name becomes the name of its files under ``--out``.
"""

from __future__ import annotations

import json
import shutil
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np

from .constants import FACE_SIZE
from .data.degrade import DegradationConfig, degrade
from .io.images import IMAGE_SUFFIXES, ImageReadError, image_size, read_rgb, write_rgb

SPLIT_HINT = "write it again with the 'split' command"


def build_split(
    celebref_root: Path, num_test_ids: int = 100, seed: int = 0, pattern: str = "*", max_images_per_id: int | None = None
) -> dict:
    """Hold out ``num_test_ids`` random identities (paper: 100 of CelebRef-HQ's 1,005). Every image
    of a held-out identity is one case; its references are that identity's other images."""
    root = Path(celebref_root)
    if num_test_ids < 1:
        raise ValueError(f"--num-test-ids {num_test_ids}: hold out at least 1 identity (the paper holds out 100).")
    if max_images_per_id is not None and max_images_per_id < 1:
        raise ValueError(f"--max-images-per-id {max_images_per_id}: must be at least 1 (or left out for all images).")
    if not root.is_dir():
        raise ValueError(f"--celebref {root}: not a folder; give the CelebRef-HQ folder with one sub-folder per identity.")
    identities = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        images = sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if len(images) >= 2:  # a case needs at least one other image as its reference
            identities[folder.name] = [p.relative_to(root).as_posix() for p in images]
    if len(identities) < num_test_ids:
        raise ValueError(
            f"--num-test-ids {num_test_ids}: {root} has only {len(identities)} identity folders with >= 2 images "
            f"matching --glob {pattern!r}."
        )
    names = sorted(identities)
    test_ids = sorted(np.random.default_rng(seed).choice(names, size=num_test_ids, replace=False).tolist())
    held_out = set(test_ids)
    cases = []
    for identity in test_ids:
        images = identities[identity]
        for gt in images[:max_images_per_id]:
            cases.append({
                "case": f"{identity}_{Path(gt).stem}",
                "identity": identity,
                "gt": gt,
                "refs": [ref for ref in images if ref != gt],
            })
    return {
        "celebref_root": str(root.resolve()),
        "seed": seed,
        "num_test_ids": num_test_ids,
        "glob": pattern,
        "max_images_per_id": max_images_per_id,
        "test_ids": test_ids,
        "train_ids": [name for name in names if name not in held_out],
        "cases": cases,
    }


def write_split(split: dict, out_dir: Path) -> Path:
    """split.json plus plain file lists, so the split can be rebuilt without this code."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "test_ids.txt").write_text("\n".join(split["test_ids"]) + "\n")
    (out_dir / "train_ids.txt").write_text("\n".join(split["train_ids"]) + "\n")
    (out_dir / "test_files.txt").write_text("\n".join(case["gt"] for case in split["cases"]) + "\n")
    path = out_dir / "split.json"
    path.write_text(json.dumps(split, indent=1))
    return path


def case_rng(seed: int, case: str) -> np.random.Generator:
    """Per-case generator: a case's LQ does not change when other cases are added or removed."""
    return np.random.default_rng([seed, zlib.crc32(case.encode())])


def _link_or_copy(source: Path, target: Path):
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() or target.is_symlink():
        target.unlink()
    try:
        target.symlink_to(source.resolve())
    except OSError:  # e.g. Windows without developer mode
        shutil.copyfile(source, target)


def file_name_of(value, what: str) -> str:
    """``value`` as one file name: a split's case and reference names become paths under ``--out``, and an
    edited split must not reach outside it (``../x``, ``/x``, ``a/b``)."""
    name = value if isinstance(value, str) else ""
    if name in ("", ".", "..") or name != Path(name).name or "\\" in name:
        raise ValueError(f"--split: {what} {value!r} is not a plain file name; a case name must not hold a folder "
                         "(/, \\, ..). Write the split again with the 'split' command.")
    return name


def check_split(split) -> None:
    """The fields ``degrade`` reads, with a message that names the field (an edited or foreign split.json), and
    names that give every case its own files: two cases of one name would overwrite each other's."""
    hint = SPLIT_HINT
    if not isinstance(split, dict):
        raise ValueError(f"--split: holds a JSON {type(split).__name__}, not the object the 'split' command writes; "
                         f"{hint}.")
    for field, kind in (("celebref_root", str), ("cases", list)):
        if not isinstance(split.get(field), kind):
            state = "is missing" if field not in split else f"is not a {'list' if kind is list else 'string'}"
            raise ValueError(f"--split: field '{field}' {state}; {hint}.")
    if not split["cases"]:
        raise ValueError(f"--split: 'cases' is empty, so there is nothing to degrade; {hint} (with --num-test-ids "
                         "of at least 1).")
    first_of_name = {}
    for number, case in enumerate(split["cases"]):
        missing = [field for field in ("case", "gt", "refs") if not isinstance(case, dict) or field not in case]
        if missing or not isinstance(case["refs"], list) or not isinstance(case["gt"], str):
            raise ValueError(f"--split: case {number} has no valid {', '.join(missing) or 'gt/refs'} (each case is an "
                             f"object with 'case', 'gt' and a list 'refs'); {hint}.")
        name = file_name_of(case["case"], f"case {number}'s name")
        if not case["refs"]:
            raise ValueError(f"--split: case {number} ({name!r}) has no references ('refs' is empty); each case needs "
                             f"at least one other photo of its identity; {hint}.")
        other = first_of_name.setdefault(name.casefold(), number)  # Windows and macOS ignore case in file names
        if other != number:
            earlier = split["cases"][other]
            raise ValueError(f"--split: case {other} ({earlier['case']!r}, gt {earlier['gt']}) and case {number} "
                             f"({name!r}, gt {case['gt']}) would write the same files (gt/{name}.png, lq/{name}.png, "
                             f"refs/{name}/); give each case its own name, or {hint}.")
        check_reference_names(case, number)


def check_reference_names(case: dict, number: int) -> None:
    """Every reference of a case gets its own file in ``refs/<case>/``."""
    seen = {}
    for ref in case["refs"]:
        base = file_name_of(Path(ref).name if isinstance(ref, str) else ref, f"case {case['case']!r}'s reference")
        if seen.setdefault(base, ref) != ref:
            raise ValueError(f"--split: case {number} ({case['case']!r}) has references {seen[base]} and {ref} of the "
                             f"same file name, so refs/{case['case']}/{base} would hold only one; rename one, or "
                             f"{SPLIT_HINT}.")


def check_split_files(split: dict, root: Path) -> None:
    """Every ground truth and reference is an image (its header is read once per file), so a wrong path is
    named before any case is written rather than linked as a reference or found hours later."""
    checked = set()
    for number, case in enumerate(split["cases"]):
        for role, relative in [("ground truth", case["gt"])] + [("reference", ref) for ref in case["refs"]]:
            path = root / relative
            if path in checked:
                continue
            try:
                image_size(path)
            except ImageReadError as error:
                why = error.__cause__ or error
                raise ValueError(f"--split: case {number} ({case['case']!r}): its {role} {path} is not a readable "
                                 f"image ({type(why).__name__}: {why}); give image files (PNG, JPEG, WebP), or "
                                 f"{SPLIT_HINT}.") from None
            checked.add(path)


def progress_bar(total: int, what: str):
    """Count, rate and ETA on stderr: a full split (thousands of cases) takes tens of minutes."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=what, unit="case", file=sys.stderr, dynamic_ncols=True)


def degrade_case(case: dict, root: Path, out_dir: Path, seed: int, config: DegradationConfig, size: int) -> dict:
    """gt/<case>.png at ``size``, its degraded lq/<case>.png and links to its references; the parameters drawn."""
    name = case["case"]
    gt = read_rgb(root / case["gt"])
    if gt.shape[:2] != (size, size):
        gt = cv2.resize(gt, (size, size), interpolation=cv2.INTER_AREA if gt.shape[0] > size else cv2.INTER_CUBIC)
    lq, params = degrade(gt, case_rng(seed, name), config, return_params=True)
    write_rgb(out_dir / "gt" / f"{name}.png", gt)
    write_rgb(out_dir / "lq" / f"{name}.png", lq)
    for ref in case["refs"]:
        _link_or_copy(root / ref, out_dir / "refs" / name / Path(ref).name)
    return params.to_dict()


def degrade_split(
    split: dict, out_dir: Path, seed: int = 0, config: DegradationConfig = DegradationConfig(), size: int = FACE_SIZE
) -> Path:
    """Write gt/, lq/ (Eq. 7 with a per-case seed) and refs/ (links) for every case of a split."""
    if size < 1:
        raise ValueError(f"--size {size}: give the face size in pixels ({FACE_SIZE} for RIDFR, as in the paper).")
    check_split(split)
    root = Path(split["celebref_root"])
    check_split_files(split, root)
    records = {}
    with progress_bar(len(split["cases"]), "degrade") as bar:
        for case in split["cases"]:
            records[case["case"]] = degrade_case(case, root, out_dir, seed, config, size)
            bar.update()
    manifest = {"seed": seed, "size": size, "config": config.to_dict(), "split": split, "params": records}
    path = out_dir / "degradation.json"
    path.write_text(json.dumps(manifest, indent=1))
    return path
