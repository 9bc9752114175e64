"""The one gate figure: what the GateHeatmap node and ``medsteer heatmap`` / ``generate --heatmaps``
draw, decided in one place (issue 18).

- ``figure3_selection``: the paper's Fig. 3 preset (layer 8 at steps 8, 12, 14, 19 of 20), scaled
  to the run's length and, where layer 8 was not steered, moved to the first steered layer;
- ``layer_indices``: a layer selection with site names (``"middle 0, output 3"``,
  ``"input 7 - output 2"``) resolved to indices by ``Sites.resolve_layers``;
- ``column_labels``: each drawn column's label (``"layer 8"``; UNets ``"layer 10: output 3"``);
- ``gate_figure``: the labelled grid (rows = steps, columns = layers) of one image, with the
  selected maps behind it (the mask is ``gate_drawing.selection_mask`` of them).

The selection grammar itself and the mask's definition are ``gates``; pixels are ``gate_drawing``.

Example:
    >>> selection = figure3_selection(gates.maps.shape[0], gates.layers)       # doctest: +SKIP
    >>> figure = gate_figure(gates, sites, selection.steps, selection.layers)  # doctest: +SKIP
    >>> figure.grid.shape                                                     # doctest: +SKIP
    torch.Size([552, 282, 3])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .backbones import Sites
from .gate_drawing import gate_grid
from .gates import PAPER_FIGURE_3, GateMaps, HeatmapSelection, parse_layers, select_maps

__all__ = [
    "GateFigure",
    "column_labels",
    "figure3_selection",
    "gate_figure",
    "has_site_names",
    "layer_indices",
    "names_sites",
]


def figure3_selection(num_steps: int, steered_layers: Sequence[int]) -> HeatmapSelection:
    """The paper's Fig. 3 for a run of ``num_steps`` recorded steps whose plan steered ``steered_layers``.

    Steps 8, 12, 14 and 19 of 20, scaled to other lengths (``round(s * (n - 1) / 19)``, repeats
    dropped); layer 8 where it was steered, else the first steered layer (MedSteer-mini has 6).
    """
    paper_steps = [int(s) for s in PAPER_FIGURE_3.steps.split(",")]
    if num_steps == 20:
        steps = PAPER_FIGURE_3.steps
    else:
        steps = ",".join(str(s) for s in dict.fromkeys(round(s * (num_steps - 1) / 19) for s in paper_steps))
    layer = int(PAPER_FIGURE_3.layers)
    layers = list(steered_layers)
    return HeatmapSelection(steps, str(layer if (layer in layers or not layers) else layers[0]))


def has_site_names(text: str) -> bool:
    """Whether a layer selection names sites (``"middle 0"``) rather than indices or the words
    ``mean`` / ``all`` / ``last``."""
    raw = str(text).strip()
    return any(c.isalpha() for c in raw) and raw.lower() not in ("mean", "all", "last")


def layer_indices(sites: Sites, text: str) -> str:
    """A layer selection with site names resolved to indices (``Sites.resolve_layers``):
    ``"middle 0,output 3"`` -> ``"6,10"`` on SD1.x, ``"input 7 - output 2"`` -> ``"4-9"``. Index
    entries and the words ``mean`` / ``all`` / ``last`` pass through unchanged.

    Raises:
        ValueError: a part names no site of this model (the message lists the valid names).
    """
    raw = str(text).strip()
    if not has_site_names(raw):
        return raw
    entries = []
    for part in raw.replace(";", ",").split(","):
        part = part.strip()
        if part and any(c.isalpha() for c in part):
            start, end = sites.resolve_layers(part)
            entries.append(str(start) if end == start + 1 else f"{start}-{end}")
        elif part:
            entries.append(part)
    return ",".join(entries)


def names_sites(sites: Sites) -> bool:
    """Whether the model names its sites itself (UNets: ``"input 7.3"``), not ``"block i"``."""
    return any(name != f"block {i}" for i, name in enumerate(sites.names))


def column_labels(sites: Sites, recorded: Sequence[int], layers: str) -> list[str]:
    """The label of each column a figure of ``layers`` (indices, or ``"mean"``) draws.

    ``"layer 8"`` (PixArt), ``"layer 10: output 3"`` where the model names its sites; the mean
    column ``"layers 8-15 mean"`` (``"layers 4-9 mean: input 7 - output 3"``).
    """
    chosen = parse_layers(layers, recorded)
    named = names_sites(sites)
    names = sites.names
    if chosen == "mean":
        label = f"layers {recorded[0]}-{recorded[-1]} mean"
        return [f"{label}: {names[recorded[0]]} - {names[recorded[-1]]}" if named else label]
    return [f"layer {c}: {names[c]}" if named else f"layer {c}" for c in chosen]


@dataclass(frozen=True)
class GateFigure:
    """One image's gate figure.

    Attributes:
        grid: ``[H, W, 3]`` float image in 0-1: rows = steps, columns = layers, labelled.
        maps: ``[steps, layers, h, w]`` the selected maps (``selection_mask(maps, size)`` is the mask).
        step_labels / layer_labels: the row and column labels drawn.
    """

    grid: torch.Tensor
    maps: torch.Tensor
    step_labels: tuple[str, ...]
    layer_labels: tuple[str, ...]


def gate_figure(
    gates: GateMaps,
    sites: Sites,
    steps: str | Sequence[int],
    layers: str,
    image: int = 0,
    *,
    cell: int = 128,
    colormap: str = "viridis",
    per_map: bool = True,
) -> GateFigure:
    """The labelled gate grid of image ``image`` of a run (the same in every host).

    Args:
        gates: the run's ``GateMaps``.
        sites: the steered model's sites (names, for the labels and named selections).
        steps: ``"all"``, ``"last"``, ``"8,12,14,19"``, ``"0-10"`` (``gates`` grammar).
        layers: ``"mean"``, indices (``"8,12"``, ``"8-16"``) or site names (``"middle 0"``).
        image: which image of the batch.
        cell / colormap / per_map: as ``gate_drawing.gate_grid``.

    Raises:
        MedSteerError / ValueError: a step or layer the run does not have, a name the model does not.
    """
    chosen = layer_indices(sites, layers)
    maps, step_labels, _ = select_maps(gates, steps, chosen, image)
    labels = column_labels(sites, gates.layers, chosen)
    grid = gate_grid(maps, step_labels, labels, cell=cell, colormap=colormap, per_map=per_map)
    return GateFigure(grid, maps, tuple(step_labels), tuple(labels))
