"""RestorerID's prompts as CLIP token ids (SD1.5's BPE vocabulary; checked against ComfyUI's SD1.5 tokenizer in
the tests): the standalone core carries no tokenizer files. In ComfyUI any prompt can be encoded with its nodes.
"""

from __future__ import annotations

RESTORERID_POSITIVE = "best quality, high quality"
RESTORERID_NEGATIVE = "cartoon, 3d, paint, monochrome, lowres, bad anatomy, worst quality, low quality"
PROMPT_TOKENS = {
    "": [],
    RESTORERID_POSITIVE: [949, 3027, 267, 1400, 3027],
    RESTORERID_NEGATIVE: [7651, 267, 274, 323, 267, 5185, 267, 25576, 267, 1049, 934, 267, 2103, 15376, 267, 5719,
                          3027, 267, 1042, 3027],
}
