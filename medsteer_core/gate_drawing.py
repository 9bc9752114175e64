"""Gate maps to pictures: coloured maps, labelled step x layer grids, overlays and masks.

What to draw (the selection grammar, ``select_maps``, the mask's definition) is ``gates``; this
module only draws it. Grids have rows = steps and columns = layers in every host.

Images here are float tensors ``[H, W, 3]`` in 0-1 (ComfyUI's IMAGE layout without the batch
axis). Colormaps are perceptually uniform (viridis, magma, cividis) or grey, built by interpolating
a few published anchor colours in sRGB, so no plotting library is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .gates import selection_gate

__all__ = [
    "COLORMAPS",
    "apply_colormap",
    "gate_grid",
    "normalise",
    "overlay",
    "selection_mask",
    "to_mask",
]

_ANCHORS = {
    "viridis": [
        "#440154",
        "#482878",
        "#3e4989",
        "#31688e",
        "#26828e",
        "#1f9e89",
        "#35b779",
        "#6ece58",
        "#b5de2b",
        "#fde725",
    ],
    "magma": [
        "#000004",
        "#180f3d",
        "#440f76",
        "#721f81",
        "#9e2f7f",
        "#cd4071",
        "#f1605d",
        "#fd9668",
        "#feca8d",
        "#fcfdbf",
    ],
    "cividis": [
        "#00224e",
        "#123570",
        "#3b496c",
        "#575d6d",
        "#707173",
        "#8a8678",
        "#a59c74",
        "#c3b369",
        "#e1cc55",
        "#fee838",
    ],
    "gray": ["#000000", "#ffffff"],
}
#: Names accepted by ``apply_colormap``.
COLORMAPS = tuple(_ANCHORS)


def _lut(name: str, size: int = 256) -> torch.Tensor:
    if name not in _ANCHORS:
        raise ValueError(f"unknown colormap {name!r}; choose one of {COLORMAPS}")
    anchors = torch.tensor([[int(h[i : i + 2], 16) / 255 for i in (1, 3, 5)] for h in _ANCHORS[name]])
    pos = torch.linspace(0, len(anchors) - 1, size)
    low = pos.floor().long().clamp(max=len(anchors) - 2)
    w = (pos - low)[:, None]
    return anchors[low] * (1 - w) + anchors[low + 1] * w


def normalise(maps: torch.Tensor, per_map: bool = True) -> torch.Tensor:
    """Scale gates to 0-1 by their maximum (gates are >= 0). All-zero maps stay zero.

    Args:
        maps: ``[..., H, W]`` gates.
        per_map: scale every ``[H, W]`` map by its own maximum (default), else by the global one.
    """
    maps = maps.float().clamp_min(0)
    if per_map:
        peak = maps.flatten(-2).amax(dim=-1)[..., None, None]
    else:
        peak = maps.max()
    return torch.where(peak > 0, maps / torch.as_tensor(peak).clamp_min(1e-12), torch.zeros_like(maps))


def apply_colormap(values: torch.Tensor, colormap: str = "viridis") -> torch.Tensor:
    """Map values in 0-1 (``[..., H, W]``) to colours ``[..., H, W, 3]``."""
    lut = _lut(colormap)
    index = (values.float().clamp(0, 1) * (len(lut) - 1)).round().long()
    return lut[index]


def _resize(maps: torch.Tensor, size: tuple[int, int], smooth: bool) -> torch.Tensor:
    shape = maps.shape
    flat = maps.reshape(-1, 1, shape[-2], shape[-1]).float()
    mode = "bilinear" if smooth else "nearest"
    kwargs = {"align_corners": False} if smooth else {}
    out = F.interpolate(flat, size=size, mode=mode, **kwargs)
    return out.reshape(*shape[:-2], *size)


def to_mask(gate: torch.Tensor, size: tuple[int, int], smooth: bool = True) -> torch.Tensor:
    """A normalised 0-1 mask ``[..., height, width]`` from gates ``[..., h, w]``."""
    return normalise(_resize(normalise(gate), size, smooth)).clamp(0, 1)


def overlay(image: torch.Tensor, gate: torch.Tensor, opacity: float = 0.5, colormap: str = "viridis") -> torch.Tensor:
    """Blend a coloured gate map over an image.

    Args:
        image: ``[H, W, 3]`` in 0-1.
        gate: ``[h, w]`` gates (resized smoothly to the image).
        opacity: 0 = image only, 1 = map only; the map's own strength also scales the blend, so
            tokens the model did not steer leave the image visible.
    """
    if not 0 <= opacity <= 1:
        raise ValueError(f"opacity must be in 0-1, got {opacity}")
    mask = to_mask(gate, tuple(image.shape[:2]))
    colours = apply_colormap(mask, colormap)
    alpha = (opacity * mask)[..., None]
    return image.float() * (1 - alpha) + colours * alpha


def selection_mask(maps: torch.Tensor, size: tuple[int, int], smooth: bool = True) -> torch.Tensor:
    """The heatmap mask of selected maps ``[steps, layers, h, w]``: ``gates.selection_gate`` (the mean
    over the chosen steps and layers) as a 0-1 mask ``[height, width]`` at image size. GateHeatmap's
    MASK and ``medsteer generate --heatmaps``' ``-mask.png`` are both this."""
    return to_mask(selection_gate(maps), size, smooth)


def gate_grid(
    maps: torch.Tensor,
    row_labels: Sequence[str] = (),
    column_labels: Sequence[str] = (),
    cell: int = 128,
    colormap: str = "viridis",
    per_map: bool = True,
) -> torch.Tensor:
    """A labelled grid image of gate maps: rows = steps, columns = layers.

    Args:
        maps: ``[rows, columns, h, w]`` gates.
        row_labels / column_labels: text drawn left of each row / above each column.
        cell: side of one map in pixels (nearest-neighbour upscaling keeps tokens visible).
        colormap: see ``COLORMAPS``.
        per_map: normalise each map by its own maximum (shows shape) or all together (shows size).

    Returns:
        ``[H, W, 3]`` float image in 0-1.
    """
    from PIL import Image, ImageDraw

    rows, cols, h, w = maps.shape
    cell_w = max(1, round(cell * w / max(h, 1))) if h else cell
    values = normalise(maps, per_map=per_map)
    coloured = apply_colormap(_resize(values, (cell, cell_w), smooth=False), colormap)  # [r, c, H, W, 3]
    left = 150 if row_labels else 0
    top = 20 if column_labels else 0
    pad = 4
    width = left + cols * (cell_w + pad) + pad
    height = top + rows * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r in range(rows):
        for c in range(cols):
            tile = (coloured[r, c].numpy() * 255).round().astype("uint8")
            canvas.paste(Image.fromarray(tile), (left + pad + c * (cell_w + pad), top + pad + r * (cell + pad)))
        if row_labels:
            draw.text((4, top + pad + r * (cell + pad) + cell // 2 - 6), str(row_labels[r]), fill=(0, 0, 0))
    for c, label in enumerate(column_labels):
        draw.text((left + pad + c * (cell_w + pad) + 2, 4), str(label), fill=(0, 0, 0))
    import numpy as np

    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)
