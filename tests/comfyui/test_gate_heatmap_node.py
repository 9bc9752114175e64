"""GateHeatmap in real ComfyUI graphs: the grid, overlay and mask, chained edits, the run behind a
latent, the paper's Fig. 3 preset, and checked step and layer lists.

Every graph runs through ComfyUI's PromptExecutor on a random-weight PixArt (4 blocks of width 48,
34x34 latents). Equality claims are bit-exact (``torch.equal``). Reference runs use a fresh
executor, so no result comes from ComfyUI's cache.
"""

from __future__ import annotations

import sys

import torch
from comfy_boot import SIZE, Graph, empty_latent, keep, ksampler, pixart, prompt, steer
from pixart_graphs import FIGURE_3, error_of, heatmap, load, pair_graph


def test_heatmap_grid_overlay_mask_and_chained_edits(comfy_env):
    a, b = comfy_env.write_vector("heat_a", seed=12), comfy_env.write_vector("heat_b", seed=13)
    g = Graph()
    model = pixart(g)
    positive, negative, latent = prompt(g, "dyed lifted polyps"), prompt(g, "", tokens=5), empty_latent(g, batch=2)
    first = steer(g, model, load(g, a), layer_start=0, layer_end=2)
    second = steer(g, first, load(g, b), layer_start=1, layer_end=4)
    sampled = ksampler(g, second, positive, negative, latent)
    picture = g.add("EmptyImage", width=SIZE, height=SIZE, batch_size=1, color=0x808080)
    grid = heatmap(g, second, sampled, steps="0,-1", layers="1,2")
    overlays = heatmap(g, second, sampled, image=picture, steps="1-3", layers="mean", edit=0)
    last_edit = heatmap(g, second, sampled, steps="1-3", layers="mean", edit=1)
    for node in (grid, overlays, last_edit):
        keep(g, node[0])
        keep(g, node[1])
    result = comfy_env.run(g)
    assert result.success, result.error
    assert result.output(grid.id).shape[0] == 2  # one labelled grid per image
    assert result.output(overlays.id).shape == (2 * 2, SIZE, SIZE, 3)  # 2 images x 2 steps x 1 (mean)
    assert result.output(overlays.id, 1).shape == (2, SIZE, SIZE)
    assert not torch.equal(result.output(overlays.id, 1), result.output(last_edit.id, 1))


def test_heatmap_mask_is_the_mean_over_the_chosen_steps_and_layers(comfy_env):
    """GateHeatmap's MASK and `medsteer generate --heatmaps`' mask are one definition (here it was
    the last chosen step's layer mean); the recorded run is the sampler's whole outer sample."""
    name = comfy_env.write_vector("mask_mean", seed=31)
    g, nodes = pair_graph(name)
    shown = heatmap(g, nodes["steered_model"], nodes["steered"], steps="0,-1", layers="mean")
    keep(g, shown[1])
    result = comfy_env.run(g)
    assert result.success, result.error
    steer_module = sys.modules[comfy_env.pack.__name__ + ".nodes.apply_steer"]
    wrapper = steer_module.steering_of(result.output(nodes["steered_model"].id))
    record = wrapper.record_for(result.output(nodes["steered"].id)["samples"])
    assert record.runs() == 1
    core = comfy_env.core
    maps, _, _ = core.gates.select_maps(record.maps(), "0,-1", "mean")
    mask = result.output(shown.id, 1)[0]
    assert torch.allclose(mask, core.gate_drawing.selection_mask(maps, (SIZE, SIZE)))
    assert not torch.allclose(
        mask, core.gate_drawing.to_mask(maps[-1].mean(dim=0), (SIZE, SIZE))
    )  # not the last step's


def test_heatmap_shows_the_run_behind_its_latent_when_samplers_share_a_steered_model(comfy_env):
    name = comfy_env.write_vector("shared", seed=22)
    g, nodes = pair_graph(name)
    other = ksampler(g, nodes["steered_model"], nodes["positive"], nodes["negative"], nodes["latent"], seed=77)
    keep(g, other)
    maps = {k: heatmap(g, nodes["steered_model"], v) for k, v in (("5", nodes["steered"]), ("77", other))}
    for node in maps.values():
        keep(g, node[1])
    result = comfy_env.run(g)
    assert result.success, result.error
    assert not torch.equal(result.output(maps["5"].id, 1), result.output(maps["77"].id, 1))
    alone, alone_nodes = pair_graph(name)
    alone_map = heatmap(alone, alone_nodes["steered_model"], alone_nodes["steered"])
    keep(alone, alone_map[1])
    assert torch.equal(comfy_env.run(alone, fresh=True).output(alone_map.id, 1), result.output(maps["5"].id, 1))
    # a LATENT this steered model did not produce is refused, not shown with another run's gates
    g, nodes = pair_graph(name)
    keep(g, heatmap(g, nodes["steered_model"], nodes["unsteered"]))
    assert "none of the last sampling runs" in error_of(comfy_env, g).error


def test_heatmap_paper_figure_3_preset(comfy_env):
    name = comfy_env.write_vector("figure3", depth=10, seed=14)
    g = Graph()
    model = pixart(g, depth=10)
    steered_model = steer(g, model, load(g, name), layer_start=8, layer_end=10)
    sampled = ksampler(
        g, steered_model, prompt(g, "dyed lifted polyps"), prompt(g, "", tokens=5), empty_latent(g), steps=20
    )
    preset = heatmap(g, steered_model, sampled, preset=FIGURE_3)
    by_hand = heatmap(g, steered_model, sampled, steps="8,12,14,19", layers="8")
    for node in (preset, by_hand):
        keep(g, node[0])
        keep(g, node[1])
    result = comfy_env.run(g)
    assert result.success, result.error
    assert torch.equal(result.output(preset.id), result.output(by_hand.id))
    assert torch.equal(result.output(preset.id, 1), result.output(by_hand.id, 1))
    image = result.output(preset.id)
    assert image.shape[1] > image.shape[2]  # four rows (steps) by one column (layer 8)


def test_heatmap_step_and_layer_lists_are_checked(comfy_env):
    name = comfy_env.write_vector("steps", seed=18)
    g, nodes = pair_graph(name)
    keep(g, heatmap(g, nodes["steered_model"], nodes["steered"], steps="0,99"))
    assert "step 99 is out of range: this run has 4 steps" in error_of(comfy_env, g).error
    g, nodes = pair_graph(name)
    keep(g, heatmap(g, nodes["steered_model"], nodes["steered"], layers="0"))
    assert "were not steered" in error_of(comfy_env, g).error
    g, nodes = pair_graph(name)
    keep(g, heatmap(g, nodes["steered_model"], nodes["steered"], steps="8,x"))
    result = error_of(comfy_env, g)
    assert result.error_type == "validation" and "cannot read step 'x'" in result.error
    g, nodes = pair_graph(name)
    keep(g, heatmap(g, nodes["model"], nodes["unsteered"]))
    assert "not steered" in error_of(comfy_env, g).error
