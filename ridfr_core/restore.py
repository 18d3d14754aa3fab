"""Restore faces in photos with reference photos of the people: ``python -m ridfr_core.restore``.

    python -m ridfr_core.restore --lq photo.jpg --id ref1.jpg --id ref2.jpg --out restored.png --models models/

``--models`` is laid out like ComfyUI's ``models/`` folder (so one download serves both):
checkpoints/ (SD1.5), ridfr/ (content weights), ipadapter/ (FaceID Plus v2), clip_vision/ (ViT-H/14),
insightface/models/buffalo_l/ (detector + ArcFace). Missing files are listed with where to put them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoints import WEIGHT_SUFFIXES, CheckpointError
from .faces.errors import FaceError
from .imageio import DEFAULT_QUALITY, read_metadata, read_rgb, write_rgb
from .pipeline import DEFAULT_STEPS, FACE_SIZE
from .restore_checks import check_restore_options


@dataclass(frozen=True)
class ModelSlot:
    """One weight file a restoration needs: which folder it lives in and what to put there."""

    option: str
    folder: str
    example: str
    source: str


MODEL_SLOTS = (
    ModelSlot("base", "checkpoints", "v1-5-pruned-emaonly.safetensors",
              "any Stable Diffusion 1.5 checkpoint or SD1.5 fine-tune (single file)"),
    ModelSlot("content", "ridfr", "ridfr-content.safetensors",
              "RIDFR content weights, trained with `python -m ridfr_core.train` (no public weights exist yet)"),
    ModelSlot("adapter", "ipadapter", "ip-adapter-faceid-plusv2_sd15.bin",
              "h94/IP-Adapter-FaceID on Hugging Face (ip-adapter-faceid-plusv2_sd15.bin)"),
    ModelSlot("clip_vision", "clip_vision", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors",
              "h94/IP-Adapter models/image_encoder/model.safetensors, renamed"),
)
INSIGHTFACE_HINT = ("insightface/models/buffalo_l/ with det_10g.onnx and w600k_r50.onnx (insightface's buffalo_l "
                    "pack; antelopev2 also works)")


class MissingModels(ValueError):
    """Every missing file at once, so a user downloads once instead of failing file by file."""


def pick_file(models: Path, slot: ModelSlot, explicit: str | None) -> Path | None:
    """An explicit path or name in the slot's folder, else the only weight file there."""
    folder = models / slot.folder
    if explicit:
        path = Path(explicit)
        return path if path.is_file() else (folder / explicit if (folder / explicit).is_file() else None)
    found = sorted(p for p in folder.glob("*") if p.suffix in WEIGHT_SUFFIXES) if folder.is_dir() else []
    if slot.option == "adapter":
        found = [p for p in found if "faceid-plus" in p.name.lower()] or found
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise MissingModels(f"--{slot.option.replace('_', '-')}: {folder} holds several files ({names}); "
                            "choose one with this option.")
    return found[0] if found else None


def resolve_models(models: Path, choices: dict[str, str | None], need_insightface: bool) -> dict[str, Path]:
    paths, missing = {}, []
    for slot in MODEL_SLOTS:
        path = pick_file(models, slot, choices.get(slot.option))
        if path is None:
            explicit = choices.get(slot.option)
            where = (f"{explicit} (given with --{slot.option.replace('_', '-')}: neither a file nor a name in "
                     f"{models / slot.folder})") if explicit else str(models / slot.folder / slot.example)
            missing.append(f"  {where}\n      ({slot.source})")
        else:
            paths[slot.option] = path
    if need_insightface:
        root = models / "insightface"
        if not any((root / "models").glob("*/*.onnx")) and not any((root / "models").glob("*/*/*.onnx")):
            missing.append(f"  {root / 'models' / 'buffalo_l'}/\n      ({INSIGHTFACE_HINT})")
        paths["insightface"] = root
    if missing:
        raise MissingModels("RIDFR needs these model files, which were not found:\n" + "\n".join(missing)
                            + f"\nPut them in {models} (or pass --models DIR, or a path for each --option).")
    return paths


class Restorer:
    """The pipeline plus face handling: references -> identity; photos or aligned faces -> restored."""

    def __init__(self, paths: dict[str, Path], device: str = "auto", config_dir=None, identity_scale: float = 1.0,
                 **sampling):
        from .faces import load_face_analyzer
        from .pipeline import RIDFRPipeline

        device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.pipeline = RIDFRPipeline.from_files(paths["base"], paths["content"], paths["adapter"],
                                                 paths["clip_vision"], device=device, config_dir=config_dir)
        self.analyzer = load_face_analyzer(models_root=paths["insightface"], device=device)
        self.identity_scale, self.sampling = identity_scale, sampling

    def identity(self, references: list[np.ndarray], aligned_references: bool = False):
        from .faces import build_identity, encode_references

        refs = encode_references(self.analyzer, references, aligned=aligned_references)
        return build_identity(refs, self.pipeline.models.clip_vision)

    def restore_fn(self, identities: list):
        """The faces callback: each face gets the identity it was matched to (scale 0 for nobody)."""
        def run(faces: torch.Tensor, scales: torch.Tensor, identity_index: list) -> torch.Tensor:
            from .identity import Identity

            per_face = Identity.cat([identities[index or 0] for index in identity_index])
            scales = scales * self.identity_scale  # already 0 for faces matched to nobody
            return self.pipeline(faces, per_face, identity_scale=scales, **self.sampling).cpu()
        return run

    def restore(self, lq: np.ndarray, people: list[list[np.ndarray]], aligned: bool = False,
                aligned_references: bool = False, upscale: float = 1.0,
                unmatched: str = "restore_without_identity") -> np.ndarray:
        """Restored photo (or aligned face) as uint8 RGB.

        ``people``: reference photos per person. In a photo every detected face is matched to the
        person it looks like (ArcFace similarity), so one person's references never turn the others
        into them; ``unmatched`` says what happens to faces that match nobody. An aligned face is that
        of the first person.
        """
        from .faces import restore_aligned, restore_faces_in_photo
        from .faces.images import tensor_to_rgb

        identities = []
        for number, references in enumerate(people, 1):
            identity, report = self.identity(references, aligned_references)
            logging.getLogger(__name__).info("person %d: %s", number, report.summary())
            identities.append(identity)
        if aligned:
            return tensor_to_rgb(restore_aligned([lq], self.restore_fn(identities)))[0]
        embeddings = torch.cat([identity.id_embeds for identity in identities]).float().cpu().numpy()
        return restore_faces_in_photo(self.analyzer, lq, self.restore_fn(identities), identity_embeddings=embeddings,
                                      unmatched=unmatched, upscale=upscale).image


_EVAL_RESTORER: Restorer | None = None


def restore(lq: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``ridfr_core.eval``'s restorer: an aligned LQ face and an aligned reference (uint8 RGB) -> restored.

    Models come from ``$RIDFR_MODELS`` (default ``./models``), laid out as for the CLI; ``$RIDFR_STEPS``
    sets the UniPC steps (default 20).
    """
    global _EVAL_RESTORER
    if lq.shape[:2] != (FACE_SIZE, FACE_SIZE):
        raise ValueError(f"ridfr_core.restore:restore: the LQ face is {lq.shape[1]}x{lq.shape[0]}; RIDFR restores "
                         f"{FACE_SIZE}x{FACE_SIZE} aligned faces (evaluate with --size {FACE_SIZE}).")
    if _EVAL_RESTORER is None:
        models = Path(os.environ.get("RIDFR_MODELS", "models"))
        _EVAL_RESTORER = Restorer(resolve_models(models, {}, need_insightface=True),
                                  config_dir=os.environ.get("RIDFR_CONFIG_DIR"),
                                  steps=int(os.environ.get("RIDFR_STEPS", DEFAULT_STEPS)))
    return _EVAL_RESTORER.restore(lq, [[reference]], aligned=True, aligned_references=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ridfr_core.restore", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lq", required=True, help="low-quality photo (or aligned face crop with --aligned)")
    parser.add_argument("--id", action="append", default=[], dest="references",
                        help="reference photo of the person; repeat for several photos of the same person")
    parser.add_argument("--person", action="append", default=[], metavar="REF[,REF...]",
                        help="reference photos of one more person (comma-separated); repeat per person. Each face "
                             "of the photo is restored as the person it resembles")
    parser.add_argument("--unmatched", choices=("restore_without_identity", "keep_original"),
                        default="restore_without_identity",
                        help="faces that resemble none of the people: restored without identity, or left as they are")
    parser.add_argument("--out", required=True, help="where to write the restored image (.png/.jpg); only PNG "
                        "is lossless. The --lq photo's ICC profile and EXIF are kept")
    parser.add_argument("--quality", type=int, default=DEFAULT_QUALITY,
                        help=f"JPEG/WebP quality of --out, 1..100 (default {DEFAULT_QUALITY})")
    parser.add_argument("--models", default="models", help="models folder laid out like ComfyUI's (default ./models)")
    for slot in MODEL_SLOTS:
        parser.add_argument(f"--{slot.option.replace('_', '-')}", help=f"file in {slot.folder}/ or a path "
                            f"(default: the only file there, e.g. {slot.example})")
    parser.add_argument("--aligned", action="store_true", help="--lq is already an FFHQ-aligned face crop "
                        "(for faces too degraded to detect)")
    parser.add_argument("--aligned-references", action="store_true", help="the --id images are aligned face crops")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="UniPC steps, 1..200 (default 20, as the paper)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--identity-scale", type=float, default=1.0, help="strength of the identity (0 = none)")
    parser.add_argument("--content-scale", type=float, default=1.0, help="strength of the LQ content condition")
    parser.add_argument("--guidance", type=float, default=1.0, help="identity guidance; 1 = off")
    parser.add_argument("--upscale", type=float, default=1.0, help="upsample the whole photo before pasting")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu")
    parser.add_argument("--config-dir", help=argparse.SUPPRESS)  # tiny architectures in tests
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        check_restore_options(args)
        choices = {slot.option: getattr(args, slot.option) for slot in MODEL_SLOTS}
        paths = resolve_models(Path(args.models), choices, need_insightface=True)
        lq = read_rgb(args.lq, "--lq")
        people = ([[read_rgb(path, "--id") for path in args.references]] if args.references else []) + [
            [read_rgb(path, "--person") for path in group.split(",") if path] for group in args.person]
        if not people:
            raise ValueError("--id: give at least one reference photo (--id, or --person for each person).")
        restorer = Restorer(paths, args.device, args.config_dir, args.identity_scale, steps=args.steps,
                            seed=args.seed, content_scale=args.content_scale, guidance=args.guidance)
        restored = restorer.restore(lq, people, args.aligned, args.aligned_references, args.upscale, args.unmatched)
    except (MissingModels, CheckpointError, FaceError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        write_rgb(args.out, restored, args.quality, read_metadata(args.lq))
    except (OSError, ValueError) as err:  # PIL: ValueError for an unknown extension
        print(f"error: --out: cannot write {args.out} ({err}); give a writable .png or .jpg path.", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
