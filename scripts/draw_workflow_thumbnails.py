"""Draw each example workflow's thumbnail (``example_workflows/<name>.jpg``, shown by ComfyUI's template browser)
from its JSON: the nodes where the workflow places them (RIDFR's in purple, ComfyUI's in grey), their titles and
links, notes and text previews left out.

    python scripts/draw_workflow_thumbnails.py

Run it after changing a workflow's graph.
"""

import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZE, MARGIN, TOP = (640, 360), 20, 55
BACKGROUND, COMFY_NODE, RIDFR_NODE = (33, 34, 39), (55, 58, 67), (70, 52, 100)
BORDER, LINK, TEXT = (120, 124, 140), (120, 160, 220), (235, 235, 240)
RIDFR_NODES = {"LoadRIDFR", "FaceIDEncode", "MatchIdentities", "ContentCondition", "IdentityCondition", "RIDFRSample",
               "PasteFaces", "RankByIdentity"}
LEFT_OUT = {"Note", "MarkdownNote", "PreviewAny", "StringConcatenate"}
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


def font(size: int):
    try:
        return ImageFont.truetype(FONT, size)
    except OSError:
        return ImageFont.load_default()


def draw(workflow: dict, heading: str) -> Image.Image:
    nodes = {node["id"]: node for node in workflow["nodes"] if node["type"] not in LEFT_OUT}
    left = min(node["pos"][0] for node in nodes.values())
    top = min(node["pos"][1] for node in nodes.values())
    right = max(node["pos"][0] + node["size"][0] for node in nodes.values())
    bottom = max(node["pos"][1] + node["size"][1] for node in nodes.values())
    scale = min((SIZE[0] - 2 * MARGIN) / (right - left), (SIZE[1] - TOP - MARGIN) / (bottom - top))

    def box(node):
        x, y = MARGIN + (node["pos"][0] - left) * scale, TOP + (node["pos"][1] - top) * scale
        return x, y, x + node["size"][0] * scale, y + node["size"][1] * scale

    image = Image.new("RGB", SIZE, BACKGROUND)
    canvas = ImageDraw.Draw(image)
    canvas.text((MARGIN, 14), heading, fill=TEXT, font=font(18))
    for node in nodes.values():
        canvas.rounded_rectangle(box(node), radius=4, fill=RIDFR_NODE if node["type"] in RIDFR_NODES else COMFY_NODE,
                                 outline=BORDER)
    for _, source, _, target, _, _ in workflow["links"]:
        if source in nodes and target in nodes:
            start, end = box(nodes[source]), box(nodes[target])
            canvas.line((start[2], start[1] + 8, end[0], end[1] + 8), fill=LINK, width=1)
    for node in nodes.values():
        x0, y0, x1, _ = box(node)
        title = node.get("title") or node["type"]
        while title and canvas.textlength(title, font=font(11)) > x1 - x0 - 6:
            title = title[:-1]
        canvas.text((x0 + 4, y0 + 3), title, fill=TEXT, font=font(11))
    return image


if __name__ == "__main__":
    for path in sorted((REPO_ROOT / "example_workflows").glob("*.json")):
        heading = path.stem.split("_", 1)[1].replace("_", " ").capitalize().replace("Restorerid", "RestorerID")
        draw(json.loads(path.read_text()), heading).save(path.with_suffix(".jpg"), quality=90)
        print(f"{path.with_suffix('.jpg').name}: drawn")
