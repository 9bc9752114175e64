"""GateHeatmap: where the steered model steered, as a labelled grid, overlays and a mask.

The gate ``sigma = max(<h, v>, 0)`` of every token is the paper's spatial map of the edit (broad at
early steps, sparse patches at the end; Fig. 3). The steered clone records the gates of each
sampling run, keyed by the LATENT the run produced; this node takes that clone plus the LATENT,
which both orders execution after sampling and picks the run to show (several samplers may share
one steered model).
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..medsteer_core import MedSteerError
from ..medsteer_core.comfy_widgets import HEATMAP_PRESETS, heatmap_selection, resolve_edit
from ..medsteer_core.gate_drawing import COLORMAPS, overlay, selection_mask
from ..medsteer_core.gate_figure import GateFigure, figure3_selection, gate_figure, has_site_names
from ..medsteer_core.gates import HeatmapSelection, finest_grid
from .apply_steer import steering_of
from .common import CATEGORY, UNET_SITES_HELP, model_sites


class GateHeatmap(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GateHeatmap",
            display_name="MedSteer Gate Heatmap",
            category=CATEGORY,
            description=(
                "Shows where the steered model steered: the gate max(<h, v>, 0) of each image token, per "
                "step and layer, from the last sampling run of the steered model. Pick the paper's Fig. 3 "
                "in 'preset' to see layer 8 at steps 8, 12, 14 and 19."
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="The steered model (the output of ApplySSPSSteer) that the sampler used.",
                ),
                io.Latent.Input(
                    "latent",
                    tooltip="The LATENT output of the sampler that used the steered model. It makes this "
                    "node run after sampling and selects that sampler's run.",
                ),
                io.Image.Input(
                    "image",
                    optional=True,
                    tooltip="Optional: the decoded steered image. Connected: one overlay per chosen step "
                    "and layer. Not connected: a labelled grid (rows = steps, columns = layers).",
                ),
                io.Combo.Input(
                    "preset",
                    options=list(HEATMAP_PRESETS),
                    default=next(iter(HEATMAP_PRESETS)),
                    tooltip="The paper's Fig. 3 (layer 8 at steps 8, 12, 14, 19 of a 20-step run; scaled to "
                    "other step counts, and the first steered layer where 8 is not steered), or custom to use "
                    "steps and layers below.",
                ),
                io.String.Input(
                    "steps",
                    default="all",
                    tooltip="Steps to show, 0-based: 'all', 'last', a list '8,12,14,19' or a range '0-10' "
                    "(end exclusive). Every model evaluation counts, so Heun-type samplers show about "
                    "twice the steps. Used when preset is custom.",
                ),
                io.String.Input(
                    "layers",
                    default="mean",
                    tooltip="Layers to show: 'mean' (average over the steered layers), a list '8,12', a "
                    "range '8-16' (end exclusive), or site names, comma-separated: 'middle', 'input 7' (all "
                    "its transformer blocks), 'input 7 - output 2' (both ends included). Only steered layers "
                    "have gates; a UNet's coarser levels are upsampled to the finest steered grid. "
                    + UNET_SITES_HELP
                    + " Used when preset is custom.",
                ),
                io.Combo.Input(
                    "colormap",
                    options=list(COLORMAPS),
                    default="viridis",
                    tooltip="Colours of the map (perceptually uniform; gray for a plain intensity map).",
                ),
                io.Float.Input(
                    "opacity",
                    default=0.5,
                    min=0.0,
                    max=1.0,
                    step=0.05,
                    tooltip="Overlay only: 0 shows the image, 1 the map. Tokens that were not steered "
                    "leave the image visible at any opacity.",
                ),
                io.Int.Input(
                    "edit",
                    default=-1,
                    min=-64,
                    max=63,
                    tooltip="With chained ApplySSPSSteer nodes: which edit's gates to show (0 = the first "
                    "node, -1 = the last).",
                ),
            ],
            outputs=[
                io.Image.Output(
                    display_name="heatmap",
                    tooltip="A labelled step x layer grid per image, or the overlays when an image is connected.",
                ),
                io.Mask.Output(
                    display_name="mask",
                    tooltip="The gate averaged over the chosen steps and layers (the maps the grid shows; "
                    "steps 'last' for the last step only), scaled to 0-1 at image size: usable for "
                    "inpainting or background metrics.",
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, preset: str | None = None, steps: str | None = None, layers: str | None = None):
        # The syntax is checked before sampling; the range and site names need the model and the
        # recorded run (checked in execute).
        if preset is None or steps is None or layers is None:
            return True
        try:
            heatmap_selection(preset, steps, layers if by_index(layers) else "mean")
        except ValueError as error:
            return str(error)
        return True

    @classmethod
    def execute(
        cls,
        model,
        latent,
        preset: str,
        steps: str,
        layers: str,
        colormap: str,
        opacity: float,
        edit: int,
        image: torch.Tensor | None = None,
    ) -> io.NodeOutput:
        wrapper = steering_of(model)
        if wrapper is None:
            raise MedSteerError(
                "this MODEL is not steered: connect the output of ApplySSPSSteer (the model the sampler used)"
            )
        heatmap_selection(preset, steps, layers if by_index(layers) else "mean")  # the syntax, as at queue time
        plan = resolve_edit(edit, len(wrapper.plans))
        samples = latent["samples"]
        record = wrapper.record_for(samples)
        if record is None:
            raise MedSteerError(
                "none of the last sampling runs of this steered model produced this LATENT: connect the "
                "LATENT output of the sampler that used this steered model (the gates of its last "
                f"{wrapper.KEEP_RUNS} runs are kept)"
            )
        gates = record.maps(plan=plan)
        batch, height, width = int(samples.shape[0]), int(samples.shape[-2]), int(samples.shape[-1])
        sites = model_sites(model)
        grid = finest_grid(sites.token_grid(i, (height, width)) for i in gates.layers)
        recorded = (int(gates.maps.shape[2]), *gates.maps.shape[-2:])
        if recorded != (batch, *grid):
            raise MedSteerError(
                f"the recorded gates cover {recorded[0]} image(s) on a {recorded[1]}x{recorded[2]} token grid, "
                f"but this LATENT has {batch} image(s) of {height}x{width} ({grid[0]}x{grid[1]} tokens); "
                "this happens when ComfyUI splits a large batch across model calls: use a smaller batch"
            )
        if image is not None and int(image.shape[0]) not in (1, batch):
            raise ValueError(
                f"image has {int(image.shape[0])} images but the latent has {batch}: connect the decoded "
                "steered latent (or a single image)"
            )
        scale = sites.pixel_scale
        mask_size = tuple(image.shape[1:3]) if image is not None else (height * scale, width * scale)
        pictures, masks = [], []
        for b in range(batch):
            figure = draw(gates, sites, preset, steps, layers, b, colormap)
            if image is None:
                pictures.append(figure.grid)
            else:
                picture = image[b if image.shape[0] == batch else 0].float().cpu()
                for s in range(figure.maps.shape[0]):
                    for layer in range(figure.maps.shape[1]):
                        pictures.append(overlay(picture, figure.maps[s, layer], opacity, colormap))
            masks.append(selection_mask(figure.maps, mask_size))
        return io.NodeOutput(torch.stack(pictures), torch.stack(masks))


def draw(gates, sites, preset: str, steps: str, layers: str, image: int, colormap: str) -> GateFigure:
    """The node's figure of one image: the preset's selection (``gate_figure.figure3_selection``,
    the same as ``medsteer heatmap``'s default) or the widgets', drawn by ``gate_figure``."""
    selection = HEATMAP_PRESETS[preset]
    if selection is None:
        selection = HeatmapSelection(str(steps), str(layers))
    else:  # the paper's Fig. 3, scaled to this run's steps and steered layers
        selection = figure3_selection(int(gates.maps.shape[0]), gates.layers)
    return gate_figure(gates, sites, selection.steps, selection.layers, image, colormap=colormap)


def by_index(text) -> bool:
    """Whether a layers text uses indices or the words ('mean', '8,12', '8-16'), not site names."""
    return not has_site_names(text)
