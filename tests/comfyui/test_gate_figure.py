"""One gate figure (issue 18): the GateHeatmap node and the CLI (``medsteer heatmap`` / ``generate
--heatmaps``) draw the same figure - the same Fig. 3 preset, selection by site name, column labels,
grid and mask - for PixArt and for a UNet. Both code paths are called on the same recorded gates."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest
import torch
from comfy_boot import TEST_PACK
from unet_graphs import ensure_unet_nodes, sites_of

pytestmark = pytest.mark.comfyui

FIG3 = "paper Fig. 3 (layer 8; steps 8, 12, 14, 19)"


def _gates(core, sites, layers, steps: int, grid=None):
    """Random gates of a run over ``layers`` on each site's token grid (the finest for all)."""
    gates_module = sys.modules[core.__name__ + ".gates"]
    g = torch.Generator().manual_seed(0)
    grids = tuple(sites.token_grid(i, (16, 16)) for i in layers)
    finest = gates_module.finest_grid(grids)
    maps = torch.rand(steps, len(layers), 1, *finest, generator=g)
    return gates_module.GateMaps(torch.linspace(999, 0, steps), tuple(layers), maps, grids)


def _both(comfy_env, sites, gates, plan_window, preset, steps, layers):
    """(node figure, CLI figure and labels) of image 0 for the same gates and widgets/flags."""
    node = comfy_env.pack.nodes.gate_heatmap
    figures = importlib.import_module(comfy_env.core.__name__ + ".headless.figures")
    dataset = importlib.import_module(comfy_env.core.__name__ + ".headless.dataset")
    from_node = node.draw(gates, sites, preset, steps, layers, 0, "viridis")

    class Plan:  # what the CLI's default needs of the plan: its window
        layer_start, layer_end = plan_window

    choice = dataset._heatmap_choice(
        None if preset == FIG3 else steps, None if preset == FIG3 else layers, Plan, gates.maps.shape[0], sites
    )
    picture, maps = figures._gate_picture(gates, 0, choice["steps"], choice["layers"], sites, colormap="viridis")
    return from_node, picture, maps


@pytest.mark.parametrize(
    ("preset", "steps", "layers"),
    [(FIG3, "all", "mean"), ("custom (steps and layers below)", "0,-1", "mean")],
)
def test_pixart_node_and_cli_draw_the_same_figure(comfy_env, preset, steps, layers):
    test_pack = comfy_env.booted.packs[str(TEST_PACK)]
    model = test_pack.random_pixart(0, 48, 12, 2, 16)
    sites = sites_of(comfy_env.core, model)
    window = (8, 12)
    gates = _gates(comfy_env.core, sites, range(*window), steps=20)
    node, picture, maps = _both(comfy_env, sites, gates, window, preset, steps, layers)
    assert torch.equal(node.maps, maps)
    assert torch.equal((node.grid * 255).round().to(torch.uint8), torch.from_numpy(np.array(picture)))
    if preset == FIG3:
        assert node.step_labels[0].startswith("step 8 ") and node.layer_labels == ("layer 8",)
        assert node.maps.shape[:2] == (4, 1)


@pytest.mark.parametrize(
    ("preset", "steps", "layers"), [(FIG3, "", ""), ("custom (steps and layers below)", "1,3", "middle 0, output 1")]
)
def test_unet_node_and_cli_draw_the_same_figure(comfy_env, preset, steps, layers):
    pack = ensure_unet_nodes()
    sites = sites_of(comfy_env.core, pack.tiny_unet("sd1"))
    window = sites.default_window
    # A short run (6 steps): the Fig. 3 preset is scaled to it in both hosts, and layer 8 is not
    # steered, so both show the window's first layer.
    gates = _gates(comfy_env.core, sites, range(*window), steps=6)
    node, picture, maps = _both(comfy_env, sites, gates, window, preset, steps, layers)
    assert torch.equal(node.maps, maps)
    assert torch.equal((node.grid * 255).round().to(torch.uint8), torch.from_numpy(np.array(picture)))
    names = sites.names
    if preset == FIG3:
        assert len(node.step_labels) == 4 and node.layer_labels == (f"layer {window[0]}: {names[window[0]]}",)
    else:
        first = names.index("middle 0")
        assert node.layer_labels[0] == f"layer {first}: middle 0"
    mask_module = sys.modules[comfy_env.core.__name__ + ".gate_drawing"]
    assert torch.equal(mask_module.selection_mask(node.maps, (32, 32)), mask_module.selection_mask(maps, (32, 32)))
