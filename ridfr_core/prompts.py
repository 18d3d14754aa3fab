"""The text prompts the backends condition on, as CLIP token ids.

The standalone core carries no tokenizer files (they would come from a hub), and RIDFR and RestorerID
each use fixed prompts, so their token ids are listed here (SD1.5's CLIP BPE vocabulary; checked
against ComfyUI's SD1.5 tokenizer in the tests). In ComfyUI any prompt can be encoded with its nodes.
"""

from __future__ import annotations

import torch

CLIP_BOS, CLIP_EOS = 49406, 49407  # SD1.5's tokenizer pads with EOS
RESTORERID_POSITIVE = "best quality, high quality"
RESTORERID_NEGATIVE = "cartoon, 3d, paint, monochrome, lowres, bad anatomy, worst quality, low quality"
PROMPT_TOKENS = {
    "": [],
    RESTORERID_POSITIVE: [949, 3027, 267, 1400, 3027],
    RESTORERID_NEGATIVE: [7651, 267, 274, 323, 267, 5185, 267, 25576, 267, 1049, 934, 267, 2103, 15376, 267, 5719,
                          3027, 267, 1042, 3027],
}


def prompt_ids(text: str, length: int = 77) -> torch.Tensor:
    """(1, length) token ids: BOS, the prompt's tokens, EOS, padded with EOS."""
    if text not in PROMPT_TOKENS:
        known = ", ".join(repr(p) for p in PROMPT_TOKENS)
        raise ValueError(f"prompt {text!r}: the standalone core encodes only the backends' own prompts ({known}); "
                         "in ComfyUI, encode any prompt with CLIP Text Encode.")
    ids = [CLIP_BOS, *PROMPT_TOKENS[text], CLIP_EOS]
    return torch.tensor([ids + [CLIP_EOS] * (length - len(ids))])
