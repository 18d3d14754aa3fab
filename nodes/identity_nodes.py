"""FaceIDEncode (one person's references -> identity) and MatchIdentities (several people in a photo)."""

from __future__ import annotations

import logging

import numpy as np
import torch
from comfy_api.latest import io

from ..ridfr_core.constants import ON_NO_FACE
from .sockets import FaceIdentity, FacesSocket, IdentitySocket, NodeError, RIDFRModelsSocket, invalid_choice, module_of

logger = logging.getLogger(__name__)
MAX_IDENTITIES = 4


def encode_identity(ridfr, references: torch.Tensor, aligned: bool, on_no_face: str):
    """(FaceIdentity, CLIP face crops (N,224,224,3), report) for one person's reference images."""
    import comfy.model_management as mm
    from ..ridfr_core.faces import FaceError, NoFaceError, build_identity, encode_references

    analyzer = ridfr.face_analyzer()
    found, skipped = [], []
    for number, image in enumerate(references):
        try:
            reference = encode_references(analyzer, [image.cpu().numpy()], aligned=aligned)[0]
        except NoFaceError as error:
            if on_no_face == "error":
                raise NodeError("FaceIDEncode", "references", f"reference {number}: {error} Or set on_no_face to "
                                "'skip' to use the other references.") from None
            skipped.append(number)
            continue
        except FaceError as error:
            raise NodeError("FaceIDEncode", "references", f"reference {number}: {error}") from None
        found.append(reference)
    if not found:
        raise NodeError("FaceIDEncode", "references", f"no face in any of the {len(references)} reference image(s); "
                        "give a clear photo of the person (or aligned face crops with references_are_aligned).")
    mm.load_model_gpu(ridfr.clip_vision)
    identity, report = build_identity(found, module_of(ridfr.clip_vision), bgr=ridfr.backend.clip_bgr)
    identity.id_embeds, identity.clip_embeds = identity.id_embeds.cpu(), identity.clip_embeds.float().cpu()
    text = report.summary()
    if skipped:
        text += f"\nSkipped (no face): reference(s) {skipped}"
    crops = torch.from_numpy(np.stack([reference.clip_crop for reference in found])).float() / 255.0
    embedding = identity.id_embeds[0].numpy()
    return FaceIdentity(identity, embedding, None, "identity"), crops, text


class FaceIDEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceIDEncode",
            display_name="FaceID Encode (RIDFR)",
            category="RIDFR",
            description="Encodes one person from one or more reference photos (ArcFace + CLIP ViT-H, combined "
                        "with quality weights) and reports whether the references agree.",
            inputs=[
                RIDFRModelsSocket.Input("ridfr", tooltip="The modules from Load RIDFR."),
                io.Image.Input("references", tooltip="One or more photos of the same person (a batch: use "
                                                     "'Batch Images' to combine photos of different sizes)."),
                io.Boolean.Input("references_are_aligned", default=False,
                                 tooltip="On: the references are already FFHQ-aligned square face crops, so no "
                                         "face is detected. Off: the largest face of each photo is used."),
                io.Combo.Input("on_no_face", options=list(ON_NO_FACE), default="error",
                               tooltip="A reference without a detectable face: stop with an error, or skip it and "
                                       "use the others."),
            ],
            outputs=[
                IdentitySocket.Output(display_name="identity", tooltip="The person's identity condition."),
                io.Image.Output(display_name="face_crops", tooltip="The aligned face crops CLIP saw (224x224)."),
                io.String.Output(display_name="report", tooltip="Consistency of the references: pairwise ArcFace "
                                                                "similarity, weights and warnings."),
            ],
        )

    @classmethod
    def validate_inputs(cls, on_no_face) -> bool | str:
        return invalid_choice("FaceIDEncode", "on_no_face", on_no_face, ON_NO_FACE) or True

    @classmethod
    def execute(cls, ridfr, references, references_are_aligned, on_no_face) -> io.NodeOutput:
        verdict = cls.validate_inputs(on_no_face)  # a linked input is only known now
        if verdict is not True:
            raise ValueError(verdict)
        identity, crops, report = encode_identity(ridfr, references, references_are_aligned, on_no_face)
        logger.info("FaceIDEncode: %s", report)
        return io.NodeOutput(identity, crops, report)


def identities_by_track(faces, embeddings: np.ndarray, people: np.ndarray, threshold: float,
                        one_face_per_identity: bool, names: list[str]) -> tuple[list, str]:
    """(identity index or None per face, report) for faces tracked through video frames: each frame's faces
    are matched to the people, and every face of a track takes its track's vote."""
    from ..ridfr_core.archive.tracking import describe_tracks, match_tracks

    spans = [slice(entry.first, entry.first + len(entry.photo.faces)) for entry in faces.photos]
    votes = match_tracks([embeddings[span] for span in spans], people, [faces.tracks[span] for span in spans],
                         threshold, one_face_per_identity)
    return [votes[track].identity for track in faces.tracks], describe_tracks(votes, names)


class MatchIdentities(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        optional = [IdentitySocket.Input(f"identity_{n}", optional=True,
                                         tooltip=f"Identity of person {n} (from FaceID Encode); optional.")
                    for n in range(2, MAX_IDENTITIES + 1)]
        return io.Schema(
            node_id="MatchIdentities",
            display_name="Match Identities to Faces (RIDFR)",
            category="RIDFR",
            description="Gives each face of ContentCondition the identity of the person it looks like (ArcFace "
                        "similarity); faces matched to nobody are restored without identity. Faces tracked through "
                        "video frames (track_faces) get one person per track, by a vote over its frames.",
            inputs=[
                RIDFRModelsSocket.Input("ridfr", tooltip="The modules from Load RIDFR."),
                FacesSocket.Input("faces", tooltip="The faces output of ContentCondition."),
                IdentitySocket.Input("identity_1", tooltip="Identity of person 1 (from FaceID Encode)."),
                *optional,
                io.Float.Input("threshold", default=0.2, min=-1.0, max=1.0, step=0.01,
                               tooltip="Lowest ArcFace similarity that counts as a match (degraded faces score low; "
                                       "0.2 separates people on buffalo_l)."),
                io.Boolean.Input("one_face_per_identity", default=True,
                                 tooltip="On: each person appears at most once per photo (best overall pairing). "
                                         "Off: every face takes its most similar identity."),
            ],
            outputs=[
                IdentitySocket.Output(display_name="identity", tooltip="One identity per face, for IdentityCondition."),
                io.String.Output(display_name="report", tooltip="Which face got which identity, with similarities."),
            ],
        )

    @classmethod
    def execute(cls, ridfr, faces, identity_1, threshold, one_face_per_identity, **more) -> io.NodeOutput:
        from ..ridfr_core.faces import FaceError, ffhq_template, match_faces
        from ..ridfr_core.faces.images import tensor_to_rgb
        from ..ridfr_core.identity.adapter import Identity

        identities = [identity_1] + [more[f"identity_{n}"] for n in range(2, MAX_IDENTITIES + 1)
                                     if more.get(f"identity_{n}") is not None]
        for number, identity in enumerate(identities, 1):
            if identity.embedding is None or len(identity.adapter_input) != 1:
                raise NodeError("MatchIdentities", f"identity_{number}", "is already one identity per face; connect "
                                "FaceID Encode outputs (one person each).")
        analyzer = ridfr.face_analyzer()
        template = ffhq_template(faces.size)
        people = np.stack([identity.embedding for identity in identities])
        names = [f"identity_{n}" for n in range(1, len(identities) + 1)]
        try:
            face_embeddings = np.stack([analyzer.embed(crop, template) for crop in tensor_to_rgb(faces.lq)])
            if faces.tracks is not None:
                matched, report = identities_by_track(faces, face_embeddings, people, threshold, one_face_per_identity,
                                                      names)
            else:
                matches = match_faces(face_embeddings, people, threshold, one_face_per_identity)
                matched, report = matches.identity, matches.summary(names)
        except FaceError as error:
            raise NodeError("MatchIdentities", "faces", str(error)) from None
        chosen = [0 if index is None else index for index in matched]
        per_face = Identity.cat([identities[index].adapter_input for index in chosen])
        scales = torch.tensor([0.0 if index is None else 1.0 for index in matched])
        logger.info("MatchIdentities:\n%s", report)
        return io.NodeOutput(FaceIdentity(per_face, None, scales, "per face"), report)
