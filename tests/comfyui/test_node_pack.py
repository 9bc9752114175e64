"""The MedSteer pack in real ComfyUI: every node registered with tooltips, and the whole graph
(build, save, load, steer two samplers, heatmap) end to end.

Every graph runs through ComfyUI's PromptExecutor on a random-weight PixArt (4 blocks of width 48,
34x34 latents). Equality claims are bit-exact (``torch.equal``). Reference runs use a fresh
executor, so no result comes from ComfyUI's cache.
"""

from __future__ import annotations

import json

import pytest
import torch
from comfy_boot import SIZE, Graph, empty_latent, keep, ksampler, pixart, prompt
from pixart_graphs import heatmap, pair_graph, vector_of

MEDSTEER_NODES = (
    "BuildPathologyVector",
    "ApplySSPSSteer",
    "GateHeatmap",
    "SavePathologyVector",
    "LoadPathologyVector",
    "InspectPathologyVector",
)


def test_pack_registers_v3_nodes_with_tooltips_everywhere(comfy_env):
    import nodes

    for node_id in MEDSTEER_NODES:
        cls = nodes.NODE_CLASS_MAPPINGS[node_id]
        schema = cls.GET_SCHEMA()
        assert schema.display_name.startswith("MedSteer"), node_id
        assert schema.category in ("medsteer", "medsteer/advanced"), node_id
        assert schema.description
        for item in [*schema.inputs, *schema.outputs]:
            assert item.tooltip, f"{node_id}.{item.id or item.display_name} has no tooltip"
    assert list(nodes.NODE_CLASS_MAPPINGS["ApplySSPSSteer"].RETURN_TYPES) == ["MODEL"]
    assert list(nodes.NODE_CLASS_MAPPINGS["LoadPathologyVector"].RETURN_TYPES) == ["PATHOLOGY_VECTOR"]
    assert list(nodes.NODE_CLASS_MAPPINGS["BuildPathologyVector"].RETURN_TYPES) == [
        "PATHOLOGY_VECTOR",
        "LATENT",
        "LATENT",
    ]


def test_build_save_load_steer_two_samplers_heatmap(comfy_env):
    import folder_paths

    # 1. build (3 seeds in batches of 2) and save
    g = Graph()
    model = pixart(g)
    with_concept = prompt(g, "An endoscopic image of dyed lifted polyps")
    without_concept = prompt(g, "An endoscopic image of polyps")
    uncond = prompt(g, "", tokens=5)
    build = g.add(
        "BuildPathologyVector",
        model=model,
        with_concept=with_concept,
        without_concept=without_concept,
        uncond=uncond,
        latent_image=empty_latent(g, batch=2),
        seed=100,
        num_seeds=3,
        steps=4,
        cfg=4.5,
        sampler_name="euler",
        scheduler="normal",
    )
    g.add("SavePathologyVector", pathology_vector=build, filename_prefix="pipeline/dye")
    keep(g, build[1])
    keep(g, build[2])
    before = len(comfy_env.booted.progress)
    result = comfy_env.run(g)
    assert result.success, result.error
    built = result.output(build.id)
    meta = comfy_env.core.vector_file.file_metadata(built)
    assert json.loads(meta["prompts_with"]) == ["An endoscopic image of dyed lifted polyps"]
    assert json.loads(meta["prompts_without"]) == ["An endoscopic image of polyps"]
    assert json.loads(meta["seeds"]) == [100, 101, 102]
    assert (meta["steps"], meta["sampler"], meta["scheduler"], meta["width"]) == ("4", "euler", "normal", str(SIZE))
    assert meta["model_family"] == "pixart-alpha"
    assert (built.depth, built.hidden_size) == (4, 48)
    assert int(built.count_with.max()) == 3 and int(built.count_without.max()) == 3
    assert result.output(build.id, 1)["samples"].shape == (3, 4, SIZE // 8, SIZE // 8)
    assert not torch.equal(result.output(build.id, 1)["samples"], result.output(build.id, 2)["samples"])
    progress = [(v, t) for v, t, node in comfy_env.booted.progress[before:] if node == build.id]
    assert progress and progress[-1] == (2 * 2 * 4, 2 * 2 * 4)  # 2 classes x 2 batches x 4 steps, one bar
    assert all(a[0] <= b[0] for a, b in zip(progress, progress[1:], strict=False))
    assert "pipeline/dye_00001_.safetensors" in folder_paths.get_filename_list("medsteer")
    assert comfy_env.live_hooks(result.output(model.id)) == 0

    # 2. seed 101 of the build is what a KSampler with seed 101 and batch 1 makes
    g = Graph()
    model = pixart(g)
    single = ksampler(
        g,
        model,
        prompt(g, "An endoscopic image of dyed lifted polyps"),
        prompt(g, "", tokens=5),
        empty_latent(g),
        seed=101,
    )
    keep(g, single)
    reference = comfy_env.run(g, fresh=True)
    # Same noise; only float rounding differs between a batch of 2 and a batch of 1.
    built_101 = result.output(build.id, 1)["samples"][1]
    assert torch.allclose(reference.output(single.id)["samples"][0], built_101, rtol=1e-4, atol=1e-2)
    assert not torch.allclose(reference.output(single.id)["samples"][0], result.output(build.id, 1)["samples"][0])

    # 3. load -> steer -> two samplers -> heatmap
    g, nodes = pair_graph("pipeline/dye_00001_.safetensors")
    grid = heatmap(g, nodes["steered_model"], nodes["steered"])
    keep(g, grid[0])
    keep(g, grid[1])
    pair = comfy_env.run(g)
    assert pair.success, pair.error
    steered, unsteered = (pair.output(nodes[k].id)["samples"] for k in ("steered", "unsteered"))
    assert torch.isfinite(steered).all() and not torch.equal(steered, unsteered)
    image, mask = pair.output(grid.id, 0), pair.output(grid.id, 1)
    assert image.dim() == 4 and image.shape[0] == 1 and image.shape[-1] == 3
    assert mask.shape == (1, SIZE, SIZE) and float(mask.max()) == pytest.approx(1.0) and float(mask.min()) >= 0
    # the built vector steers another sampler and step count than it was built with (keys by timestep)
    g, nodes = pair_graph("pipeline/dye_00001_.safetensors", sample={"sampler_name": "heun", "steps": 7})
    other = comfy_env.run(g)
    assert other.success, other.error
    assert not torch.equal(other.output(nodes["steered"].id)["samples"], other.output(nodes["unsteered"].id)["samples"])
    loaded = vector_of(comfy_env, "pipeline/dye_00001_.safetensors")
    assert torch.equal(loaded.directions, built.directions) and list(loaded.provenance.prompts_with) == json.loads(
        meta["prompts_with"]
    )
