"""Gate maps to pictures: coloured maps, labelled step x layer grids, overlays and masks.

Images here are float tensors ``[H, W, 3]`` in 0-1 (ComfyUI's IMAGE layout without the batch
axis). Colormaps are perceptually uniform (viridis, magma, cividis) or grey, built by interpolating
a few published anchor colours in sRGB, so no plotting library is needed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .errors import MedSteerError
from .hooks import GateMaps

__all__ = [
    "COLORMAPS",
    "MAX_INDEX",
    "apply_colormap",
    "gate_grid",
    "index_entries",
    "normalise",
    "overlay",
    "parse_layers",
    "parse_steps",
    "select_maps",
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


def parse_steps(text: str | Sequence[int], num_steps: int) -> list[int]:
    """Step indices from ``"all"``, ``"last"`` or a list such as ``"8,12,14,19"`` (0-based).

    Negative indices count from the end. Raises ``ValueError`` naming the bad entry and the range.
    """
    return _parse_indices(text, num_steps, "step", allow_all=True)


def parse_layers(text: str | Sequence[int], layers: Sequence[int]) -> list[int] | str:
    """Layer (site) indices from a list such as ``"8,10,12"`` or ``"8-16"`` (end exclusive), or
    ``"mean"`` (average over every recorded layer). Only recorded layers are valid."""
    if isinstance(text, str) and text.strip().lower() == "mean":
        return "mean"
    wanted = _parse_indices(text, max(layers) + 1 if layers else 0, "layer", allow_all=True, absolute=True)
    missing = [w for w in wanted if w not in layers]
    if missing:
        raise MedSteerError(
            f"layer(s) {missing} were not steered, so they have no gate; recorded layers are "
            f"{list(layers)} (the steering window)"
        )
    return wanted


#: The largest step or layer index a list may name. ComfyUI's samplers allow at most 10000 steps
#: and no PixArt has that many layers, so a larger number cannot select anything in any run; it is
#: refused while reading the text, before a range such as ``0-1000000000`` could be expanded.
MAX_INDEX = 10_000
_ENTRY = re.compile(r"(?P<minus>-)?\s*(?P<start>[0-9]+)(?:\s*-\s*(?P<end>[0-9]+))?")


def index_entries(text: str, what: str) -> list[int | range]:
    """The entries of a step or layer list, without expanding its ranges.

    ``"8,12"`` -> ``[8, 12]``; ``"8-16"`` -> ``[range(8, 16)]`` (end exclusive); ``"-1"`` -> ``[-1]``
    (from the end). Entries are separated by ``,`` or ``;``. Every number must be at most
    ``MAX_INDEX``, so no selection is larger than ``MAX_INDEX`` per entry whatever the text says.

    Args:
        text: the list (not ``"all"`` / ``"last"`` / ``"mean"``: callers handle those words).
        what: ``"step"`` or ``"layer"``, for the messages.

    Raises:
        MedSteerError: an unreadable entry, an empty range, or a number above ``MAX_INDEX``.
    """
    entries: list[int | range] = []
    for part in str(text).replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        match = _ENTRY.fullmatch(part)
        if match is None:
            raise MedSteerError(
                f"cannot read {what} {part[:40]!r} in {_short(text)}: use numbers like '8,12,14,19' or a range "
                "'8-16' (end exclusive)"
            )
        numbers = [g for g in (match["start"], match["end"]) if g is not None]
        for number in numbers:
            if len(number) > len(str(MAX_INDEX)) or int(number) > MAX_INDEX:
                raise MedSteerError(
                    f"{what} {_short(number)} in {_short(text)} is beyond any run: a {what} list names "
                    f"indices 0 to {MAX_INDEX} at most (the run's own count is checked once it is known)"
                )
        first = int(match["start"])
        if match["end"] is None:
            entries.append(-first if match["minus"] else first)
            continue
        last = int(match["end"])
        if match["minus"] or last <= first:
            raise MedSteerError(
                f"{what} range {part!r} is empty: write start-end with 0 <= start < end (end exclusive)"
            )
        entries.append(range(first, last))
    return entries


def _short(text) -> str:
    text = str(text)
    return repr(text) if len(text) <= 60 else repr(text[:57] + "...") + f" ({len(text)} characters)"


def _parse_indices(text, count: int, what: str, allow_all: bool, absolute: bool = False) -> list[int]:
    if isinstance(text, str):
        raw = text.strip().lower()
        if allow_all and raw in ("all", ""):
            return list(range(count))
        if raw == "last":
            return [count - 1]
        entries = index_entries(raw, what)
    else:
        entries = [int(i) for i in text]
    out: list[int] = []
    for entry in entries:
        if isinstance(entry, range):
            # Checked before expanding, so the list never holds more than `count` items per entry.
            if entry.stop > count:
                raise MedSteerError(
                    f"{what} range {entry.start}-{entry.stop} is out of range: this run has {count} {what}s "
                    f"(0 to {count - 1}; a range's end is exclusive, so at most {entry.start}-{count})"
                )
            out.extend(entry)
            continue
        j = entry + count if (entry < 0 and not absolute) else entry
        if not 0 <= j < count:
            raise MedSteerError(f"{what} {entry} is out of range: this run has {count} {what}s (0 to {count - 1})")
        out.append(j)
    if not out:
        raise MedSteerError(f"no {what}s selected in {_short(text)}")
    return out


def select_maps(
    gates: GateMaps, steps: str | Sequence[int] = "all", layers: str | Sequence[int] = "mean", image: int = 0
):
    """Pick ``[S', L', H, W]`` maps of one image plus row/column labels.

    Returns:
        ``(maps, step_labels, layer_labels)``.
    """
    num_steps, _, batch = gates.maps.shape[:3]
    if not 0 <= image < batch:
        raise MedSteerError(f"image {image} is out of range: the run has {batch} image(s)")
    step_ids = parse_steps(steps, num_steps)
    chosen = parse_layers(layers, gates.layers)
    maps = gates.maps[step_ids, :, image]  # [S', L, H, W]
    if chosen == "mean":
        maps = maps.mean(dim=1, keepdim=True)
        layer_labels = [f"layers {gates.layers[0]}-{gates.layers[-1]} mean"]
    else:
        maps = maps[:, [gates.layers.index(c) for c in chosen]]
        layer_labels = [f"layer {c}" for c in chosen]
    step_labels = [f"step {s} (t={gates.timesteps[s]:.0f})" for s in step_ids]
    return maps, step_labels, layer_labels


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
