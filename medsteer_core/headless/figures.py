"""Gate pictures of the headless route: the paper's Fig. 3 grid of one seed, and a pair's grid and mask."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import MedSteerError
from ..gate_drawing import selection_mask
from ..gate_figure import figure3_selection, gate_figure, layer_indices
from ..gates import GateMaps, GateRecord, parse_steps
from .models import HeadlessModel
from .steer_options import Steer


def _gate_picture(gates: GateMaps, image: int, steps: str, layers: str, sites, **style):
    """The gate figure of one image of a batch (``gate_figure``: the GateHeatmap node's figure) as
    a PIL image, and the selected ``[steps, layers, h, w]`` maps."""
    from PIL import Image

    figure = gate_figure(gates, sites, steps, layers, image, **style)
    return Image.fromarray((figure.grid.numpy() * 255).round().astype("uint8")), figure.maps


def _pair_heatmap(gates: GateMaps, image: int, steps: str, layers: str, colormap: str, picture, sites):
    """The gate grid and the 0-255 mask (``gate_drawing.selection_mask``: the selected gates averaged
    over steps and layers, at image size) of one image."""
    from PIL import Image

    grid, maps = _gate_picture(gates, image, steps, layers, sites, colormap=colormap)
    mask = selection_mask(maps, (picture.height, picture.width))
    return grid, Image.fromarray((mask.numpy() * 255).round().astype("uint8"), mode="L")


# ================================================================================ heatmap
@dataclass
class Heatmap:
    """The gate grid of one seed (the paper's Fig. 3) with the images it belongs to."""

    grid: object  # PIL image
    steered: object
    unsteered: object
    gates: GateMaps
    steps: str
    layers: str


def gate_heatmap(
    model: HeadlessModel,
    steers: Sequence[Steer],
    prompt: str,
    seed: int,
    *,
    negative_prompt: str = "",
    steps: int = 20,
    cfg: float | None = None,
    scheduler: str = "default",
    height: int | None = None,
    width: int | None = None,
    at_steps: str | None = None,
    layers: str | None = None,
    plan: int = 0,
    colormap: str = "viridis",
    cell: int = 128,
    per_map: bool = True,
) -> Heatmap:
    """Sample one seed steered and unsteered and draw the gate grid (rows: steps, columns: layers).

    Defaults draw the paper's Fig. 3: layer 8 at steps 8, 12, 14 and 19 of 20 (scaled to other
    step counts; the window's first layer if layer 8 is not steered).

    Args:
        per_map: normalise each map by its own maximum (shape) or all by one (size).
        cell: pixels per map side.
        (the rest as in ``generate``)
    """
    resolved = [steer.resolve(sites=model.sites) for steer in steers]
    plans = [p for p, _ in resolved]
    if not 0 <= plan < len(plans):
        raise ValueError(f"plan {plan} is out of range: {len(plans)} vector(s) given")
    if type(cell) is not int or cell < 1:
        raise MedSteerError(f"cell must be a whole number of pixels >= 1, got {cell!r} (the default is 128)")
    cfg = model.default_cfg if cfg is None else cfg
    spec = model.spec(steps, cfg, height, width)
    preset = figure3_selection(spec.steps, range(plans[plan].layer_start, plans[plan].layer_end))
    at_steps = at_steps or preset.steps
    parse_steps(at_steps, spec.steps)  # a step the run does not have: refused before sampling
    layers = layer_indices(model.sites, layers or preset.layers)
    record = GateRecord()
    common = {"negative_prompt": negative_prompt, "scheduler": scheduler}
    steered = model.sample(prompt, [seed], spec, plans=plans, record=record, **common)
    unsteered = model.sample(prompt, [seed], spec, **common)
    gates = record.maps(plan)
    grid, _ = _gate_picture(gates, 0, at_steps, layers, model.sites, cell=cell, colormap=colormap, per_map=per_map)
    return Heatmap(grid, model.decode(steered)[0], model.decode(unsteered)[0], gates, at_steps, layers)
