"""Render each example_workflows/<name>.jpg thumbnail from its <name>.json (PIL only).

    python scripts/render_thumbnails.py                # every workflow
    python scripts/render_thumbnails.py NAME [NAME]    # some: medsteer_quickstart_mini ...

The workflows are kept by hand (ComfyUI's template format); a thumbnail is a diagram of the graph
as the canvas shows it: groups, nodes with their sockets and widget values, links coloured by type.
JPEG, because the template browser asks for ``<name>.jpg`` for custom-node templates (frontend
1.27.10). A real render is not possible here: the PixArt templates need weights CI cannot download.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

FOLDER = Path(__file__).resolve().parents[1] / "example_workflows"
WIDTH = 1600
TITLE_H, SLOT_H, WIDGET_H = 30, 22, 22
TYPE_COLORS = {
    "MODEL": "#B39DDB",
    "CLIP": "#FFD500",
    "VAE": "#FF6E6E",
    "CONDITIONING": "#FFA931",
    "LATENT": "#FF9CF9",
    "IMAGE": "#64B5F6",
    "MASK": "#81C784",
    "INT": "#A1E88B",
    "PATHOLOGY_VECTOR": "#4DD0E1",
}
MEDSTEER = {
    "BuildPathologyVector",
    "ApplySSPSSteer",
    "GateHeatmap",
    "SavePathologyVector",
    "LoadPathologyVector",
    "InspectPathologyVector",
}
#: The name of each widget value, in ``widgets_values`` order. The files name no widget, so the picture
#: takes the names from here; tests/comfyui/test_workflows.py checks them against the live schemas.
WIDGET_NAMES = {
    "ApplySSPSSteer": "strength layer_start layer_end start_percent end_percent rows preserve_norm interpolation layers",
    "BuildPathologyVector": "seed control_after_generate num_seeds steps cfg sampler_name scheduler",
    "CheckpointLoaderSimple": "ckpt_name",
    "CLIPLoader": "clip_name type device",
    "CLIPTextEncode": "text",
    "EmptyChromaRadianceLatentImage": "width height batch_size",
    "EmptyImage": "width height batch_size color",
    "EmptyLatentImage": "width height batch_size",
    "GateHeatmap": "preset steps layers colormap opacity edit",
    "ImageCompositeMasked": "x y resize_source",
    "ImageScaleBy": "upscale_method scale_by",
    "ImageStitch": "direction match_image_size spacing_width spacing_color",
    "InspectPathologyVector": "colormap",
    "KSampler": "seed control_after_generate steps cfg sampler_name scheduler denoise",
    "LoadMedSteerMini": "denoiser",
    "LoadPathologyVector": "vector_name",
    "MedSteerLoadPeftLora": "lora_name strength_model strength_clip",
    "MedSteerLoadPixArtAlpha": "ckpt_name weight_dtype",
    "PrimitiveNode": "value control_after_generate",
    "SaveImage": "filename_prefix",
    "SavePathologyVector": "filename_prefix",
    "VAELoader": "vae_name",
}


def _rgb(color: str) -> tuple[int, int, int]:
    digits = color[1:] if len(color) == 7 else "".join(c * 2 for c in color[1:])
    return tuple(int(digits[i : i + 2], 16) for i in (0, 2, 4))


def _text(value) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return text if len(text) <= 34 else text[:31] + "..."


def _wrap(draw: ImageDraw.ImageDraw, origin, text: str, font, width: float) -> None:
    """A note's markdown as plain text, wrapped to ``width``."""
    x, y = origin
    for paragraph in text.replace("**", "").replace("*", "").replace("`", "").split("\n"):
        line = ""
        for word in paragraph.split(" "):
            trial = f"{line} {word}".strip()
            if draw.textlength(trial, font=font) > width and line:
                draw.text((x, y), line, font=font, fill="#dddddd")
                y += 19
                line = word
            else:
                line = trial
        draw.text((x, y), line, font=font, fill="#dddddd")
        y += 19


def render(workflow: dict, width: int = WIDTH) -> Image.Image:
    """Draw a UI-format workflow like the ComfyUI canvas, scaled down to ``width`` pixels."""
    nodes, groups = workflow["nodes"], workflow.get("groups", [])
    boxes = [g["bounding"] for g in groups]
    boxes += [[n["pos"][0], n["pos"][1] - TITLE_H, n["size"][0], n["size"][1] + TITLE_H] for n in nodes]
    x0 = min(b[0] for b in boxes) - 30
    y0 = min(b[1] for b in boxes) - 30
    x1 = max(b[0] + b[2] for b in boxes) + 30
    y1 = max(b[1] + b[3] for b in boxes) + 30
    image = Image.new("RGB", (int(x1 - x0), int(y1 - y0)), "#1e1e1e")
    draw = ImageDraw.Draw(image, "RGBA")
    title_font, font, big = ImageFont.load_default(16), ImageFont.load_default(14), ImageFont.load_default(26)

    def at(x, y):
        return (x - x0, y - y0)

    for gx in range(0, image.width, 40):
        draw.line([(gx, 0), (gx, image.height)], fill="#242424")
    for gy in range(0, image.height, 40):
        draw.line([(0, gy), (image.width, gy)], fill="#242424")
    for group in groups:
        x, y, w, h = group["bounding"]
        rgb = _rgb(group["color"])
        draw.rounded_rectangle([at(x, y), at(x + w, y + h)], 8, fill=(*rgb, 40), outline=(*rgb, 160), width=2)
        draw.text(at(x + 12, y + 8), group["title"], font=big, fill=(*rgb, 255))

    slots = {}  # (node id, "in"/"out", index) -> canvas point
    for node in nodes:
        x, y = node["pos"]
        for i in range(len(node["inputs"])):
            slots[(node["id"], "in", i)] = (x, y + 14 + i * SLOT_H)
        for i in range(len(node["outputs"])):
            slots[(node["id"], "out", i)] = (x + node["size"][0], y + 14 + i * SLOT_H)
    for _, origin, origin_slot, target, target_slot, link_type in workflow["links"]:
        (ax, ay), (bx, by) = slots[(origin, "out", origin_slot)], slots[(target, "in", target_slot)]
        dx = max(60, abs(bx - ax) * 0.5)  # a cubic Bezier leaving and entering horizontally, as the canvas draws
        points = []
        for k in range(41):
            t = k / 40
            cx = (1 - t) ** 3 * ax + 3 * (1 - t) ** 2 * t * (ax + dx) + 3 * (1 - t) * t**2 * (bx - dx) + t**3 * bx
            cy = (1 - t) ** 3 * ay + 3 * (1 - t) ** 2 * t * ay + 3 * (1 - t) * t**2 * by + t**3 * by
            points.append(at(cx, cy))
        draw.line(points, fill=TYPE_COLORS.get(link_type, "#bbbbbb"), width=3)

    for node in nodes:
        x, y = node["pos"]
        w, h = node["size"]
        kind = node["type"]
        note = kind == "MarkdownNote"
        header = "#2f6f5f" if kind in MEDSTEER or kind.startswith("MedSteer") else "#353535"
        header = {"PrimitiveNode": "#4a5a2a", "MarkdownNote": "#4b4b2a"}.get(kind, header)
        body = "#33331f" if note else "#2b2b2b"
        draw.rounded_rectangle([at(x, y - TITLE_H), at(x + w, y + h)], 8, fill=body, outline="#111111", width=2)
        draw.rounded_rectangle([at(x, y - TITLE_H), at(x + w, y)], 8, fill=header)
        draw.text(at(x + 10, y - TITLE_H + 7), node.get("title", kind), font=title_font, fill="#eeeeee")
        if note:
            _wrap(draw, at(x + 12, y + 10), node["widgets_values"][0], font, w - 24)
            continue
        for i, slot in enumerate(node["inputs"]):
            px, py = at(*slots[(node["id"], "in", i)])
            color = TYPE_COLORS.get(slot["type"], "#bbbbbb")
            linked = color if slot["link"] is not None else None
            draw.ellipse([px - 5, py - 5, px + 5, py + 5], fill=linked, outline=color, width=2)
            draw.text((px + 10, py - 8), slot["name"], font=font, fill="#cccccc")
        for i, slot in enumerate(node["outputs"]):
            px, py = at(*slots[(node["id"], "out", i)])
            draw.ellipse([px - 5, py - 5, px + 5, py + 5], fill=TYPE_COLORS.get(slot["type"], "#bbbbbb"))
            label = slot["name"]
            draw.text((px - 10 - draw.textlength(label, font=font), py - 8), label, font=font, fill="#cccccc")
        wy = y + 8 + max(len(node["inputs"]), len(node["outputs"])) * SLOT_H
        values = node.get("widgets_values") or []
        names = WIDGET_NAMES.get(kind, "").split()
        labels = [name.replace("control_after_generate", "control after generate") for name in names]
        if len(labels) != len(values):  # a node type not listed above: its values without names
            labels = [""] * len(values)
        for label, value in zip(labels, values, strict=True):
            if wy + WIDGET_H > y + h:
                break
            draw.rounded_rectangle(
                [at(x + 10, wy), at(x + w - 10, wy + WIDGET_H - 3)], 6, fill="#222222", outline="#444444"
            )
            px, py = at(x + 18, wy + 2)
            draw.text((px, py), label, font=font, fill="#999999")
            text = _text(value)
            draw.text((px + w - 36 - draw.textlength(text, font=font), py), text, font=font, fill="#dddddd")
            wy += WIDGET_H
    if image.width > width:
        image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    return image


def main(names: list[str]) -> int:
    paths = [FOLDER / f"{name}.json" for name in names] or sorted(FOLDER.glob("*.json"))
    missing = [path.name for path in paths if not path.is_file()]
    if missing:
        print(f"no workflow {missing} in {FOLDER}; the names are the .json files' stems", file=sys.stderr)
        return 1
    for path in paths:
        thumbnail = path.with_suffix(".jpg")
        render(json.loads(path.read_text())).save(thumbnail, "JPEG", quality=90, optimize=True)
        print(f"wrote {thumbnail} ({thumbnail.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
