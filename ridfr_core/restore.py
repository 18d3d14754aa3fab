"""Restore faces in photos with reference photos of the people: ``python -m ridfr_core.restore``.

    python -m ridfr_core.restore --lq photo.jpg --id ref1.jpg --id ref2.jpg --out restored.png --models models/

``--models`` is laid out like ComfyUI's ``models/`` folder (so one download serves both):
checkpoints/ (SD1.5), ridfr/ (content weights: RIDFR's own, or RestorerID's public RestorerIDFull.ckpt),
ipadapter/ (FaceID Plus: v2 for RIDFR, v1 for RestorerID), clip_vision/ (ViT-H/14),
insightface/models/buffalo_l/ (detector + ArcFace). The backend follows the content file, and with it
the sampling defaults. Missing files are listed with where to put them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .archive.inputs import is_archive_input
from .archive.run import reference_people, run_archive
from .backends import RIDFR, content_backend, file_backend
from .backends.interface import ContentBackend
from .backends.restorerid.identity_scale import parse_identity_scale
from .best_of_n import best_of_n
from .constants import FACE_SIZE
from .faces.errors import FaceError
from .io.images import DEFAULT_QUALITY, read_metadata, read_rgb, write_rgb
from .models import download_command
from .preprocess import load_preprocessor
from .restore_checks import DTYPES, check_restore_options
from .sampling.schedulers import SAMPLERS
from .weights.adapter_files import is_faceid_v2_file
from .weights.checkpoints import WEIGHT_SUFFIXES, CheckpointError


@dataclass(frozen=True)
class ModelSlot:
    """One weight file a restoration needs: which folder it lives in and what to put there."""

    option: str
    folder: str
    example: str
    source: str


MODEL_SLOTS = (
    ModelSlot("base", "checkpoints", "v1-5-pruned-emaonly-fp16.safetensors",
              "any Stable Diffusion 1.5 checkpoint or SD1.5 fine-tune (single file); not needed with RestorerID "
              "weights, whose own SD1.5 is the default base"),
    ModelSlot("content", "ridfr", "RestorerIDFull.ckpt",
              "RestorerID's public weights (YingJiacheng/RestorerID on Hugging Face, RestorerIDFull.ckpt), or RIDFR "
              "content weights trained with `python -m ridfr_core.train`"),
    ModelSlot("adapter", "ipadapter", "ip-adapter-faceid-plus_sd15.bin",
              "h94/IP-Adapter-FaceID on Hugging Face: ip-adapter-faceid-plus_sd15.bin for RestorerID, "
              "ip-adapter-faceid-plusv2_sd15.bin for RIDFR"),
    ModelSlot("clip_vision", "clip_vision", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors",
              "h94/IP-Adapter models/image_encoder/model.safetensors, renamed"),
)
INSIGHTFACE_HINT = ("insightface/models/buffalo_l/ with det_10g.onnx and w600k_r50.onnx (insightface's buffalo_l "
                    "pack; antelopev2 also works)")


class MissingModels(ValueError):
    """Every missing file at once, so a user downloads once instead of failing file by file."""


def option_name(slot: ModelSlot) -> str:
    return "--" + slot.option.replace("_", "-")


def candidates(models: Path, slot: ModelSlot, backend: ContentBackend | None) -> list[Path]:
    """The weight files in the slot's folder that fit, best first. Content: RIDFR's own weights are the first
    choice wherever they exist. Adapter: FaceID Plus files, the version the backend was trained with first."""
    folder = models / slot.folder
    found = sorted(p for p in folder.glob("*") if p.suffix in WEIGHT_SUFFIXES) if folder.is_dir() else []
    if slot.option == "content":
        ridfr = [p for p in found if file_backend(p, quick=True) is RIDFR]
        return ridfr or found
    if slot.option == "adapter":
        found = [p for p in found if "faceid-plus" in p.name.lower()] or found
        wanted = [p for p in found if is_faceid_v2_file(p) == (backend is not None and backend.faceid_v2)]
        return wanted or found
    return found


def pick_file(models: Path, slot: ModelSlot, explicit: str | None, backend: ContentBackend | None = None) -> Path | None:
    """An explicit path or name in the slot's folder, else the best fitting file there."""
    folder = models / slot.folder
    if explicit:
        path = Path(explicit)
        return path if path.is_file() else (folder / explicit if (folder / explicit).is_file() else None)
    found = candidates(models, slot, backend)
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise MissingModels(f"{option_name(slot)}: {folder} holds several files that fit ({names}); choose one with "
                            "this option.")
    return found[0] if found else None


def resolve_models(models: Path, choices: dict[str, str | None], need_insightface: bool) -> dict[str, Path]:
    """{slot: file} for every model file, plus ``backend`` (of the content file). With RestorerID weights the
    checkpoint's own parts come first unless an option names another file: its SD1.5 (what RestorerID was
    trained against) is the base, and its FaceID adapter and CLIP vision tower, where its keys hold them, stand
    for those slots (the slot then maps to None: "the checkpoint's own"). Missing files are listed all at once,
    with the command that downloads the public ones."""
    paths, missing, absent = {}, [], []
    slots = {slot.option: slot for slot in MODEL_SLOTS}
    content = pick_file(models, slots["content"], choices.get("content"))
    backend = content_backend(content) if content is not None else None
    own = backend.bundled_parts(content) if backend is not None else set()
    for slot in MODEL_SLOTS:
        if slot.option in own and not choices.get(slot.option):
            paths[slot.option] = content if slot.option == "base" else None
            continue
        path = content if slot.option == "content" else pick_file(models, slot, choices.get(slot.option), backend)
        if path is None and slot.option == "base" and backend is not None and not choices.get("base"):
            path = backend.base_file(content)  # RestorerID's checkpoint (or the one a converted/trained file names)
        if path is None:
            explicit = choices.get(slot.option)
            where = (f"{explicit} (given with {option_name(slot)}: neither a file nor a name in "
                     f"{models / slot.folder})") if explicit else str(models / slot.folder / slot.example)
            missing.append(f"  {where}\n      ({slot.source})")
            if not explicit:
                absent.append(f"{slot.folder}/{slot.example}")
        else:
            paths[slot.option] = path
    if need_insightface:
        root = models / "insightface"
        if not any((root / "models").glob("*/*.onnx")) and not any((root / "models").glob("*/*/*.onnx")):
            missing.append(f"  {root / 'models' / 'buffalo_l'}/\n      ({INSIGHTFACE_HINT})")
            absent.append("insightface/models/buffalo_l")
        paths["insightface"] = root
    if missing:
        raise MissingModels("RIDFR needs these model files, which were not found:\n" + "\n".join(missing)
                            + f"\nPut them in {models} (or pass --models DIR, or a path for each --option)."
                            + fetch_hint(backend.name if backend else "restorerid", models, absent))  # the public one
    paths["backend"], paths["models"] = backend.name if backend else None, models
    return paths


def fetch_hint(backend: str, models: Path, absent: list[str]) -> str:
    """The command that downloads what can be downloaded of ``absent`` (never run from here)."""
    command = download_command(backend, models, absent)
    return f"\nTo download the public ones (licences are shown first):\n  {command}" if command else ""


class Restorer:
    """The pipeline plus face handling: references -> identity; photos or aligned faces -> restored.

    ``identity_scale``: a float, "auto" (MUSIQ of each LQ face, see :mod:`ridfr_core.backends.restorerid.identity_scale`) or None for the
    backend's default; ``preprocess``: a model run on each aligned LQ face first; ``best_of``: best-of-N
    ranking; ``dtype``: the compute dtype (None: float16 on CUDA, float32 on the CPU); ``sampling``: the
    pipeline's options (None = the backend's published setting)."""

    def __init__(self, paths: dict[str, Path], device: str = "auto", config_dir=None,
                 identity_scale: float | str | None = None, preprocess=None, best_of=None,
                 dtype: torch.dtype | None = None, **sampling):
        from .faces import load_face_analyzer
        from .pipeline import RIDFRPipeline
        from .backends.restorerid.identity_scale import IdentityScale

        device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.pipeline = RIDFRPipeline.from_files(paths["base"], paths["content"], paths["adapter"],
                                                 paths["clip_vision"], device=device, dtype=dtype,
                                                 config_dir=config_dir)
        backend = self.pipeline.backend
        log = logging.getLogger(__name__)
        log.info("content backend: %s (%s)", backend.label, paths["content"].name)
        for slot in ("base", "adapter", "clip_vision"):
            if paths[slot] is None or paths[slot] == paths["content"]:
                log.info("%s: from %s itself", slot, paths["content"].name)
        self.analyzer = load_face_analyzer(models_root=paths["insightface"], device=device)
        self.identity_scale = IdentityScale.choose(identity_scale, backend, paths["models"], self.pipeline.device,
                                                   self.pipeline.dtype)
        self.sampling = sampling
        self.preprocess = preprocess.to(self.pipeline.device, self.pipeline.dtype) if preprocess else None
        self.best_of = best_of  # ridfr_core.best_of_n.BestOfN, or None for one sample per face

    def identity(self, references: list[np.ndarray], aligned_references: bool = False):
        from .faces import build_identity, encode_references

        refs = encode_references(self.analyzer, references, aligned=aligned_references)
        return build_identity(refs, self.pipeline.models.clip_vision, bgr=self.pipeline.backend.clip_bgr)

    def restore_fn(self, identities: list, seeds: list[int] | None = None, scales_used: list | None = None):
        """The sampling faces callback: each face gets the identity it was matched to, at the scale it is given
        (0 for nobody; see :meth:`around_sampling`). ``seeds``: one per face of the call (default: --seed, face i
        seed + i); ``scales_used`` collects the identity scale each face was restored with (e.g. RestorerID's
        "auto" per face, for a manifest)."""
        sampling = self.sampling if seeds is None else {**self.sampling, "seed": list(seeds)}

        def run(faces: torch.Tensor, scales: torch.Tensor, identity_index: list) -> torch.Tensor:
            from .identity.adapter import Identity

            per_face = Identity.cat([identities[index or 0] for index in identity_index])
            if scales_used is not None:
                scales_used.extend(round(float(scale), 4) for scale in scales)
            return self.pipeline(faces, per_face, identity_scale=scales, **sampling).cpu()
        return run

    def around_sampling(self, restore_fn):
        """The faces callback that hands ``restore_fn`` (sampling, or best-of-N around it) the aligned LQ faces
        pre-processed (``--preprocess``) and their identity scales times the backend's (RestorerID's "auto":
        MUSIQ of each raw LQ face, scored before the pre-processing, as RestorerID scores it)."""
        from .preprocess import preprocess_before

        if self.preprocess is not None:
            restore_fn = preprocess_before(restore_fn, self.preprocess)
        return self.identity_scale.around(restore_fn)

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
        restore_fn = self.restore_fn(identities)
        if self.best_of is not None:
            restore_fn = self.best_of.around(lambda seeds: self.restore_fn(identities, seeds), people,
                                             self.sampling.get("seed", 0))
        if self.preprocess is not None:
            logging.getLogger(__name__).info("pre-processing: %s", self.preprocess.summary())
        restore_fn = self.around_sampling(restore_fn)
        if aligned:
            return tensor_to_rgb(restore_aligned([lq], restore_fn))[0]
        embeddings = torch.cat([identity.id_embeds for identity in identities]).float().cpu().numpy()
        return restore_faces_in_photo(self.analyzer, lq, restore_fn, identity_embeddings=embeddings,
                                      unmatched=unmatched, upscale=upscale).image


class AlignedFaceRestorer:
    """``python -m ridfr_core.eval run``'s own restorer: an aligned LQ face and an aligned reference (uint8 RGB)
    -> restored, with the models in ``models`` (laid out as for the CLI, either backend), loaded at the first
    face. ``steps``: None for the backend's; ``config_dir``: architectures other than SD1.5's (tiny test models);
    ``content``: the content file (a path or a name in ``ridfr/``) when that folder holds several."""

    def __init__(self, models: Path, steps: int | None = None, config_dir=None, content: str | None = None):
        self.models, self.steps, self.config_dir, self.content = Path(models), steps, config_dir, content
        self.restorer: Restorer | None = None

    def __call__(self, lq: np.ndarray, reference: np.ndarray) -> np.ndarray:
        if lq.shape[:2] != (FACE_SIZE, FACE_SIZE):
            raise ValueError(f"the LQ face is {lq.shape[1]}x{lq.shape[0]}; RIDFR restores {FACE_SIZE}x{FACE_SIZE} "
                             f"aligned faces (evaluate with --size {FACE_SIZE}).")
        if self.restorer is None:
            self.restorer = Restorer(resolve_models(self.models, {"content": self.content}, need_insightface=True),
                                     config_dir=self.config_dir, steps=self.steps)
        return self.restorer.restore(lq, [[reference]], aligned=True, aligned_references=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ridfr_core.restore", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lq", required=True, help="low-quality photo (or aligned face crop with --aligned); for "
                        "an archive a folder (recursive), a glob, a text file listing paths, or a video")
    parser.add_argument("--id", action="append", default=[], dest="references",
                        help="reference photo of the person; repeat for several photos of the same person")
    parser.add_argument("--person", action="append", default=[], metavar="REF[,REF...]",
                        help="reference photos of one more person (comma-separated); repeat per person. Each face "
                             "of the photo is restored as the person it resembles")
    parser.add_argument("--people", metavar="DIR", help="one sub-folder of reference photos per person "
                        "(DIR/<name>/*.jpg); each face is restored as the person it resembles")
    parser.add_argument("--batch-size", type=int, default=8, help="faces per sampler call (default 8): in archives "
                        "gathered from several photos or frames, with --candidates the samples of a photo's faces")
    parser.add_argument("--unmatched", choices=("restore_without_identity", "keep_original"),
                        default="restore_without_identity",
                        help="faces that resemble none of the people: restored without identity, or left as they are")
    parser.add_argument("--out", required=True, help="where to write the restored image (.png/.jpg); only PNG "
                        "is lossless. The --lq photo's ICC profile and EXIF are kept. For an archive the output "
                        "folder (it mirrors the input tree and holds manifest.jsonl)")
    parser.add_argument("--quality", type=int, default=DEFAULT_QUALITY,
                        help=f"JPEG/WebP quality of --out, 1..100 (default {DEFAULT_QUALITY})")
    parser.add_argument("--models", default="models", help="models folder laid out like ComfyUI's (default ./models)")
    for slot in MODEL_SLOTS:
        parser.add_argument(f"--{slot.option.replace('_', '-')}", help=f"file in {slot.folder}/ or a path "
                            f"(default: the only file there, e.g. {slot.example})")
    parser.add_argument("--aligned", action="store_true", help="--lq is already an FFHQ-aligned face crop "
                        "(for faces too degraded to detect)")
    parser.add_argument("--aligned-references", action="store_true", help="the --id images are aligned face crops")
    parser.add_argument("--steps", type=int, help="sampling steps, 1..200 (default: the backend's, RIDFR 20, "
                        "RestorerID 50)")
    parser.add_argument("--sampler", choices=SAMPLERS, help="default: the backend's (RIDFR unipc, RestorerID "
                        "restorerid-ddim: its own DDIM plan; ddim is diffusers' trailing DDIM)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--identity-scale", help="strength of the identity (0 = none), or 'auto' (RestorerID's "
                        "MUSIQ-based scale, from models/pyiqa/musiq_koniq_ckpt-e95806b9.pth, else 0.75). "
                        "Default: RIDFR 1, RestorerID auto")
    parser.add_argument("--content-scale", type=float, default=1.0, help="strength of the LQ content condition")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance against the null identity (and "
                        "RestorerID's negative prompt); 1 = off. Default: RIDFR 1, RestorerID 4")
    parser.add_argument("--color-fix", action=argparse.BooleanOptionalAction, default=None,
                        help="wavelet colour fix against the LQ face (default: on for RestorerID, off for RIDFR)")
    parser.add_argument("--upscale", type=float, default=1.0, help="upsample the whole photo before pasting")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu")
    parser.add_argument("--dtype", default="auto", help="compute dtype: auto (float16 on CUDA, float32 on the CPU), "
                        "float32, float16 or bfloat16")
    parser.add_argument("--preprocess", metavar="FILE", help="restoration/upscale model run on each aligned LQ face "
                        "before RIDFR (the paper pre-cleans with SwinIR, as DiffBIR does): a path or a file in "
                        "MODELS/upscale_models; any model spandrel reads (SwinIR, Real-ESRGAN, ...)")
    parser.add_argument("--candidates", type=int, default=1, metavar="N", help="sample N seeds per face (1..16, in "
                        "--batch-size batches) and keep the one most like the references, ranked by --rank-with "
                        "(default 1)")
    parser.add_argument("--rank-with", default="dlib", metavar="RECOGNISER", help="recogniser that ranks the "
                        "candidates: dlib (default) or facenet, never the ArcFace RIDFR is conditioned on")
    return parser.parse_args(argv)


def restorer_from_args(args: argparse.Namespace, paths: dict[str, Path], best_of=None, config_dir=None) -> Restorer:
    identity_scale = parse_identity_scale(args.identity_scale) if args.identity_scale is not None else None
    preprocess = load_preprocessor(args.preprocess, Path(args.models)) if args.preprocess else None
    return Restorer(paths, args.device, config_dir, identity_scale, preprocess=preprocess, best_of=best_of,
                    dtype=DTYPES.get(args.dtype), steps=args.steps, seed=args.seed, content_scale=args.content_scale,
                    guidance=args.guidance, sampler=args.sampler, color_fix=args.color_fix)


def architecture_dir(models: Path) -> Path | None:
    """``<models>/ridfr/configs``: architectures other than SD1.5's (e.g. tiny test models), as LoadRIDFR reads."""
    folder = models / "ridfr" / "configs"
    return folder if folder.is_dir() else None


def main(argv=None, config_dir=None) -> int:
    """The CLI; ``config_dir``: model architectures other than SD1.5's (default: ``<models>/ridfr/configs``
    when it exists)."""
    args = parse_args(argv)
    config_dir = config_dir or architecture_dir(Path(args.models))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        archive = is_archive_input(args.lq)
        check_restore_options(args, archive)
        best_of = best_of_n(args.candidates, args.rank_with, args.batch_size)
        choices = {slot.option: getattr(args, slot.option) for slot in MODEL_SLOTS}
        paths = resolve_models(Path(args.models), choices, need_insightface=True)
        if archive:
            return run_archive(args, paths, lambda found: restorer_from_args(args, found, config_dir=config_dir))
        lq = read_rgb(args.lq, "--lq")
        people = [[read_rgb(path, f"reference of {name}") for path in photos]
                  for name, photos in reference_people(args)]
        restorer = restorer_from_args(args, paths, best_of, config_dir)
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
