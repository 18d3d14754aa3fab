"""Our MUSIQ against pyiqa's on real faces, reading a weights file in the published layout.

The published ``musiq_koniq_ckpt-e95806b9.pth`` is IQA-PyTorch's ``scripts/convert_musiq_to_pth.py`` output:
``torch.save`` of a MUSIQ ``state_dict()`` (an OrderedDict of float32 tensors, no wrapper, no prefix), which
pyiqa loads with ``strict=True`` after stripping only a ``module.`` prefix. ``published_layout`` writes
those names and shapes out by hand; the fixture holds seeded random values (no weights can be downloaded
here), spread so that scores vary from image to image like real ones.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ridfr_core.backends import RESTORERID
from ridfr_core.weights.checkpoints import CheckpointError
from ridfr_core.models.registry import BACKENDS, MUSIQ_KONIQ
from ridfr_core.musiq import load_musiq
from ridfr_core.backends.restorerid.identity_scale import AUTO, IdentityScale, musiq_dtype, scale_from_musiq
from shared_data import FACE_DATA, FACES, needs_faces

# scores of 45-56 here; measured: equal to the bit for one image per call, at most 2.3e-5 (4.5e-7 relative)
FP32_TOLERANCE = {"rtol": 1e-5, "atol": 1e-4}


def published_layout() -> dict[str, tuple[int, ...]]:
    """Names and shapes of the published KonIQ state dict (MUSIQ with a 1-output head)."""
    shapes = {"conv_root.weight": (64, 3, 7, 7), "gn_root.weight": (64,), "gn_root.bias": (64,)}
    for conv, (inputs, outputs, kernel) in {"conv1": (64, 64, 1), "conv2": (64, 64, 3), "conv3": (64, 256, 1),
                                            "conv_proj": (64, 256, 1)}.items():
        shapes[f"block1.{conv}.weight"] = (outputs, inputs, kernel, kernel)
    for norm, channels in {"gn1": 64, "gn2": 64, "gn3": 256, "gn_proj": 256}.items():
        shapes[f"block1.{norm}.weight"] = shapes[f"block1.{norm}.bias"] = (channels,)
    shapes |= {"embedding.weight": (384, 16384), "embedding.bias": (384,),
               "transformer_encoder.posembed_input.position_emb": (1, 100, 384),
               "transformer_encoder.scaleembed_input.scale_emb": (3, 384),
               "transformer_encoder.cls": (1, 1, 384),
               "transformer_encoder.encoder_norm.weight": (384,), "transformer_encoder.encoder_norm.bias": (384,)}
    for layer in range(14):
        block = f"transformer_encoder.transformer.encoderblock_{layer}"
        for part in ("norm1", "norm2"):
            shapes[f"{block}.{part}.weight"] = shapes[f"{block}.{part}.bias"] = (384,)
        for part in ("query", "key", "value", "out"):
            shapes[f"{block}.attention.{part}.weight"], shapes[f"{block}.attention.{part}.bias"] = (384, 384), (384,)
        shapes |= {f"{block}.mlp.fc1.weight": (1152, 384), f"{block}.mlp.fc1.bias": (1152,),
                   f"{block}.mlp.fc2.weight": (384, 1152), f"{block}.mlp.fc2.bias": (384,)}
    return shapes | {"head.weight": (1, 384), "head.bias": (1,)}


def random_state(seed: int = 0, head_outputs: int = 1) -> OrderedDict:
    """Seeded values of a trained-looking scale: fan-in scaled kernels, norms near 1, a head around 50."""
    generator = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for name, shape in published_layout().items():
        if name.startswith("head."):
            shape = (head_outputs, *shape[1:])
        noise = torch.randn(shape, generator=generator)
        if name.endswith(("_emb", ".cls")):
            state[name] = 0.5 * noise
        elif name == "head.bias":
            state[name] = 50 + noise
        elif name == "head.weight":  # a gain that spreads the scores of different images over a few points
            state[name] = noise
        elif len(shape) > 1:
            state[name] = noise / math.sqrt(math.prod(shape[1:]))
        elif name.endswith(".weight"):
            state[name] = 1 + 0.1 * noise
        else:
            state[name] = 0.1 * noise
    state._metadata = OrderedDict({"": {"version": 1}})  # as a state_dict() carries it into the pickle
    return state


def constant_state(head_outputs: int = 1) -> dict[str, torch.Tensor]:
    """The published layout with every value 1, as expanded views of one number: a file of a few kB."""
    return {name: torch.ones(1).expand((head_outputs, *shape[1:]) if name.startswith("head.") else shape)
            for name, shape in published_layout().items()}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("musiq") / MUSIQ_KONIQ.name
    torch.save(random_state(), path)
    return path


def read_rgb(path: Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    image = Image.open(path).convert("RGB")
    if size:
        image = image.resize(size, Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]


def real_images() -> list[torch.Tensor]:
    """A 512 LQ face (the restore path's input), a real-world LQ face at 128, a non-square photo whose sides
    are no multiple of 32 (pyiqa pads and masks it), and a face smaller than one 32x32 patch grid."""
    lq_faces = sorted(FACES.glob("*/lq_*.png"))
    return [read_rgb(lq_faces[0]), read_rgb(sorted((FACE_DATA / "obama-realworld" / "lq").glob("*"))[0], (128, 128)),
            read_rgb(FACE_DATA / "unaligned" / "obama_obama.jpg", (211, 150)), read_rgb(lq_faces[1], (48, 40))]


@needs_faces
def test_scores_equal_pyiqas_on_real_faces(weights):
    pyiqa = pytest.importorskip("pyiqa", reason="pyiqa is a dev requirement (requirements-pyiqa.txt)")
    reference = pyiqa.create_metric("musiq", pretrained_model_path=str(weights), device="cpu", as_loss=False)
    assert set(reference.net.state_dict()) == set(published_layout())  # and it loaded the file strictly
    ours = load_musiq(weights)
    images = real_images()
    expected = torch.cat([reference(image).reshape(1) for image in images])
    got = torch.cat([ours(image) for image in images])
    torch.testing.assert_close(got, expected, **FP32_TOLERANCE)
    assert expected.max() - expected.min() > 1  # the images score differently: a wrong step shows


@needs_faces
def test_musiq_runs_in_half_precision_only_where_the_identity_scale_stays_within_one_percent(weights):
    """Beside a float16 restoration MUSIQ runs in float16: on real LQ faces the scale exp(0.1 (9.5 - MUSIQ)) moves
    by under 1 % (measured 0.1-0.5 %) from float32's. bfloat16 would move it by more (measured up to 4 % at
    512 px), so beside a bfloat16 restoration MUSIQ runs in float32."""
    faces = torch.cat([read_rgb(path, (128, 128)) for path in sorted(FACES.glob("*/lq_*.png"))[:3]])
    full = load_musiq(weights)(faces)
    for compute in (torch.float16, torch.bfloat16):
        half = load_musiq(weights, dtype=compute)
        assert half.embedding.weight.dtype == compute
        scale_moved = ((half(faces) - full).abs() * 0.1).exp().max() - 1  # relative change of the identity scale
        if musiq_dtype(compute) == compute:
            assert scale_moved < 0.01, (compute, scale_moved)
        else:
            assert musiq_dtype(compute) == torch.float32 and scale_moved > 0.01, (compute, scale_moved)


@needs_faces
def test_auto_identity_scale_uses_musiq_from_the_models_folder(weights, caplog):
    models = weights.parent.parent / "models_with_musiq"
    (models / MUSIQ_KONIQ.folder).mkdir(parents=True)
    (models / MUSIQ_KONIQ.relative).symlink_to(weights)
    faces = torch.cat([read_rgb(path, (96, 96)) for path in sorted(FACES.glob("*/lq_*.png"))[:2]])
    with caplog.at_level(logging.INFO, logger="ridfr_core.backends.restorerid.identity_scale"):
        scale = IdentityScale.choose(AUTO, RESTORERID, models)
        scale.batch = 1  # faces are scored in calls of at most this many
        calls = []
        scale.metric.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
        scales = scale.for_faces(faces)
    expected = [scale_from_musiq(float(score)) for score in load_musiq(weights)(faces)]
    assert scales.tolist() == pytest.approx(expected, rel=1e-5)
    assert scales[0] != pytest.approx(scales[1]) and calls == [1, 1]
    assert "MUSIQ" in caplog.text and f"{scales[0]:.3g}" in caplog.text
    for compute, runs_in in ((torch.float16, torch.float16), (torch.bfloat16, torch.float32)):  # see musiq_dtype
        assert IdentityScale.choose(AUTO, RESTORERID, models, "cpu", compute).metric.head.weight.dtype == runs_in


def test_registry_lists_musiq_for_restorerid():
    assert MUSIQ_KONIQ in BACKENDS["restorerid"] and MUSIQ_KONIQ not in BACKENDS["ridfr"]
    assert MUSIQ_KONIQ.relative == "pyiqa/musiq_koniq_ckpt-e95806b9.pth"
    assert MUSIQ_KONIQ.sha256.startswith("e95806b9")  # torch.hub names files after their sha256


def test_missing_weights_fall_back_to_the_fixed_scale_and_say_how_to_get_them(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="ridfr_core.backends.restorerid.identity_scale"):
        scale = IdentityScale.choose(AUTO, RESTORERID, tmp_path)
    assert scale.metric is None and scale.fixed == RESTORERID.identity_scale
    assert "ridfr_core.models download --backend restorerid" in caplog.text
    with pytest.raises(CheckpointError, match="file not found"):
        load_musiq(tmp_path / "absent.pth")


def test_unusable_weights_are_clear_errors(weights, tmp_path):
    truncated = tmp_path / "truncated.pth"
    with open(weights, "rb") as handle:
        truncated.write_bytes(handle.read(100_000))
    with pytest.raises(CheckpointError, match="truncated, corrupt or not a weight file"):
        load_musiq(truncated)
    ava = tmp_path / "musiq_ava.pth"
    torch.save(constant_state(head_outputs=10), ava)  # the 10-class AVA model is not the KonIQ one
    with pytest.raises(CheckpointError, match=r"does not match the expected architecture.*head\.weight"):
        load_musiq(ava)
    damaged = constant_state()
    damaged["embedding.bias"] = torch.full((384,), float("nan"))
    torch.save(damaged, tmp_path / "nan.pth")
    with pytest.raises(CheckpointError, match="non-finite"):
        load_musiq(tmp_path / "nan.pth")
    pickled = tmp_path / "pickled.pth"
    torch.save({"weights": constant_state(), "options": Path("x")}, pickled)
    with pytest.raises(CheckpointError, match="Python objects besides tensors"):
        load_musiq(pickled)
    models = tmp_path / "models"
    (models / MUSIQ_KONIQ.folder).mkdir(parents=True)
    (models / MUSIQ_KONIQ.relative).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="MUSIQ"):  # present but broken: an error, not a silent fallback
        IdentityScale.choose(AUTO, RESTORERID, models)


def test_images_outside_zero_one_are_refused(weights):
    model = load_musiq(weights)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model(torch.full((1, 3, 64, 64), 2.0))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(3, 64, 64))
