"""The small pieces the RestorerID backend adds: prompt token ids, the wavelet colour fix, the adaptive scale."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from ridfr_core.sampling.colorfix import wavelet_color_fix, wavelet_split
from ridfr_core.backends.restorerid.prompts import PROMPT_TOKENS
from ridfr_core.weights.checkpoints import token_ids
from ridfr_core.backends.restorerid.identity_scale import AUTO, IdentityScale, parse_identity_scale, scale_from_musiq
from ridfr_core.backends import RESTORERID, RIDFR


def test_prompt_token_ids_match_sd15_tokenizer():
    """The listed ids are what SD1.5's CLIP tokenizer (as ComfyUI ships it) gives, padded with EOS to 77."""
    comfyui = os.environ.get("COMFYUI_PATH")
    vocab = Path(comfyui or "") / "comfy" / "sd1_tokenizer"
    if not comfyui or not (vocab / "vocab.json").is_file():
        pytest.skip("COMFYUI_PATH not set: SD1.5's tokenizer files come with ComfyUI (no hub access here)")
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(vocab))
    for text in PROMPT_TOKENS:
        expected = tokenizer(text, padding="max_length", max_length=77).input_ids
        assert token_ids(PROMPT_TOKENS[text]).tolist() == [expected]


def test_wavelet_split_is_exact_and_colour_fix_takes_the_lq_colours():
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 64, 64, generator=generator)
    high, low = wavelet_split(image)
    assert torch.allclose(high + low, image, atol=1e-6)
    assert low.std() < image.std()  # the low band is smooth
    tinted = (image * 0.7 + torch.tensor([0.25, 0.0, -0.1]).view(1, 3, 1, 1)).clamp(0, 1)  # a colour cast
    fixed = wavelet_color_fix(tinted, image)
    cast_error = (tinted.mean((2, 3)) - image.mean((2, 3))).abs().max()
    assert (fixed.mean((2, 3)) - image.mean((2, 3))).abs().max() < 0.2 * cast_error
    small_lq = torch.nn.functional.interpolate(image, size=(32, 32), mode="bilinear")
    assert wavelet_color_fix(tinted, small_lq).shape == tinted.shape  # LQ of another size is resized


def test_identity_scale_option_and_auto_fallback(tmp_path):
    assert scale_from_musiq(9.5) == 1.0 and math.isclose(scale_from_musiq(19.5), math.exp(-1))
    assert parse_identity_scale("Auto") == AUTO and parse_identity_scale("0.5") == 0.5
    for bad in ("nan", "inf", "-1", "strong"):
        with pytest.raises(ValueError, match="--identity-scale"):
            parse_identity_scale(bad)
    faces = torch.rand(3, 3, 64, 64)
    restorerid_default = IdentityScale.choose(None, RESTORERID, tmp_path)  # auto; no pyiqa/weights here
    assert restorerid_default.for_faces(faces).tolist() == [RESTORERID.identity_scale] * 3
    assert IdentityScale.choose(None, RIDFR, tmp_path).for_faces(faces).tolist() == [RIDFR.identity_scale] * 3
    assert IdentityScale.choose(0.3, RESTORERID, tmp_path).for_faces(faces[:1]).tolist() == [pytest.approx(0.3)]
