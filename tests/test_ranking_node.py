"""In a real ComfyUI (COMFYUI_PATH): the RankByIdentity node on real faces with the real recognisers, its guard
against the injected ArcFace, and ComfyUI's own "Upscale Image (using Model)" agreeing with ``--preprocess``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from comfy_host import import_comfy, requires_comfyui
from shared_data import FACES, needs_faces
from ridfr_core import metrics
from ridfr_core.io.images import read_rgb
from tiny_upscale_models import write_diffbir_swinir, write_official_swinir_x2

pytestmark = requires_comfyui
UNAVAILABLE = {"dlib": metrics.dlib_unavailable_reason(), "facenet": metrics.facenet_unavailable_reason()}


@pytest.fixture(scope="module")
def pack(comfy_models):
    return import_comfy(comfy_models.configs)


def rank_node(pack):
    return next(node for node in pack.nodes.NODES if node.define_schema().node_id == "RankByIdentity")


def comfy_images(paths, size: int = 256) -> torch.Tensor:
    """ComfyUI IMAGE batch (B,H,W,3) float in [0,1] of image files, resized to one size."""
    images = [torch.from_numpy(read_rgb(path)).permute(2, 0, 1)[None].float() / 255 for path in paths]
    return torch.cat([F.interpolate(image, size=(size, size), mode="area") for image in images]).permute(0, 2, 3, 1)


def test_rank_by_identity_has_tooltips_and_only_independent_recognisers(pack):
    schema = rank_node(pack).define_schema()
    assert all(item.tooltip for item in schema.inputs + schema.outputs)
    recogniser = next(item for item in schema.inputs if item.id == "recogniser")
    assert set(recogniser.options) == {"dlib", "facenet"}


def test_rank_by_identity_refuses_the_injected_arcface(pack):
    node = rank_node(pack)
    verdict = node.validate_inputs(recogniser="arcface")
    assert verdict.startswith("RankByIdentity (recogniser): 'arcface' is the ArcFace that RIDFR is conditioned on")
    assert node.validate_inputs(recogniser=None) is True  # linked: checked when it runs
    image = torch.rand(1, 64, 64, 3)
    with pytest.raises(ValueError, match="conditioned on"):
        node.execute(images=image, references=image, recogniser="buffalo_l")


@needs_faces
@pytest.mark.parametrize("recogniser", ["dlib", "facenet"])
def test_rank_by_identity_puts_the_person_first(pack, recogniser):
    """Four faces, one of them a held-out photo of the person: it comes out first, with every score reported."""
    if UNAVAILABLE[recogniser]:
        pytest.skip(UNAVAILABLE[recogniser])
    person = sorted((FACES / "00005" / "refs").glob("*.jpg"))
    strangers = [sorted((FACES / other / "refs").glob("*.jpg"))[0] for other in ("00022", "00075", "00119")]
    images = comfy_images([strangers[0], strangers[1], person[0], strangers[2]])
    references = comfy_images(person[1:4])
    node = rank_node(pack)
    assert node.validate_inputs(recogniser=recogniser) is True
    ranked, report = node.execute(images=images, references=references, recogniser=recogniser).args
    assert ranked.shape == images.shape
    torch.testing.assert_close(ranked[0], images[2], rtol=0, atol=0)
    assert sorted(ranked.reshape(4, -1).sum(1).tolist()) == sorted(images.reshape(4, -1).sum(1).tolist())
    lines = report.splitlines()
    assert lines[0].startswith(f"ranked by {'dlib' if recogniser == 'dlib' else 'FaceNet'}")
    assert "3 reference" in lines[0]
    assert lines[1].startswith("1. image 2: ") and len(lines) == 5
    scores = [float(line.rsplit(": ", 1)[1]) for line in lines[1:]]
    assert scores == sorted(scores, reverse=True) and scores[0] - scores[1] > 0.05


@pytest.mark.parametrize("layout", ["diffbir", "x2"])
def test_comfyui_upscale_image_using_model_matches_preprocess(pack, tmp_path, layout):
    """The workflow's Load Upscale Model + Upscale Image (using Model) and the CLI's --preprocess build the
    same network from the same file: same output (the CLI then resizes an upscaler's output to the face)."""
    import folder_paths
    from comfy_extras.nodes_upscale_model import ImageUpscaleWithModel, UpscaleModelLoader

    from ridfr_core.preprocess import load_preprocessor

    path = tmp_path / ("face_swinir.safetensors" if layout == "diffbir" else "swinir_x2.pth")
    (write_diffbir_swinir if layout == "diffbir" else write_official_swinir_x2)(path)
    folder_paths.add_model_folder_path("upscale_models", str(tmp_path))
    model, = UpscaleModelLoader.execute(model_name=path.name).args
    image = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    comfy, = ImageUpscaleWithModel.execute(upscale_model=model, image=image).args
    comfy = comfy.permute(0, 3, 1, 2)
    if comfy.shape[-1] != 64:
        comfy = F.interpolate(comfy, size=(64, 64), mode="bicubic", antialias=True).clamp(0, 1)
    ours = load_preprocessor(path)(image.permute(0, 3, 1, 2))
    torch.testing.assert_close(ours, comfy, atol=1e-5, rtol=0)
    assert np.abs((ours - image.permute(0, 3, 1, 2)).numpy()).mean() > 0.01
