"""``--people DIR``: one sub-folder of reference photos per person, named after the person."""

from __future__ import annotations

from pathlib import Path

from ..io.images import list_images


def people_folders(folder: Path | str) -> list[tuple[str, list[Path]]]:
    """[(name, reference photos)] for each sub-folder of ``folder``, sorted by name. Raises ValueError
    naming --people when the folder, a person or all photos are missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--people: {folder} is not a folder; give a folder with one sub-folder of reference "
                         "photos per person (DIR/<name>/*.jpg).")
    people = []
    for person in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        photos = list_images(person, recursive=True)
        if not photos:
            raise ValueError(f"--people: {person} holds no photos (.jpg, .png, .webp, .bmp); add reference photos "
                             "of this person or remove the folder.")
        people.append((person.name, photos))
    if not people:
        raise ValueError(f"--people: {folder} has no sub-folders; put each person's reference photos in "
                         f"{folder}/<name>/.")
    return people
