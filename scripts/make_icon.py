"""Draw the pack's icon (docs/icon.png, 400 x 400) for the Comfy Registry ([tool.comfy] Icon).

    python scripts/make_icon.py

A counterfactual pair in one picture: the left half of a round endoscopic view keeps a polyp, the
right half is the steered, normal mucosa, split by the steering arrow.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 400
OUT = Path(__file__).resolve().parents[1] / "docs" / "icon.png"


def draw(size: int = SIZE) -> Image.Image:
    scale = 4  # draw large, then downsample for smooth edges
    s = size * scale
    image = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(image)
    d.rounded_rectangle((0, 0, s - 1, s - 1), radius=s // 6, fill=(22, 27, 38, 255))
    view = (s * 0.12, s * 0.12, s * 0.88, s * 0.88)
    d.ellipse(view, fill=(196, 96, 92, 255))  # mucosa
    # right half: the steered (normal) side, lighter and polyp-free
    right = Image.new("L", (s, s), 0)
    ImageDraw.Draw(right).rectangle((s // 2, 0, s, s), fill=255)
    healthy = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    ImageDraw.Draw(healthy).ellipse(view, fill=(232, 150, 140, 255))
    image.paste(healthy, (0, 0), Image.composite(healthy.getchannel("A"), right, right))
    # the polyp on the left half
    d.ellipse((s * 0.24, s * 0.36, s * 0.44, s * 0.56), fill=(128, 40, 52, 255))
    d.ellipse((s * 0.28, s * 0.39, s * 0.35, s * 0.45), fill=(236, 170, 170, 255))
    # the steering arrow across the split
    y = s * 0.5
    d.line((s * 0.5, s * 0.14, s * 0.5, s * 0.86), fill=(22, 27, 38, 255), width=s // 60)
    d.line((s * 0.40, y, s * 0.66, y), fill=(77, 208, 225, 255), width=s // 28)
    d.polygon([(s * 0.74, y), (s * 0.64, y - s * 0.06), (s * 0.64, y + s * 0.06)], fill=(77, 208, 225, 255))
    return image.resize((size, size), Image.Resampling.LANCZOS)


if __name__ == "__main__":
    draw().save(OUT, optimize=True)
    print(f"wrote {OUT}")
