"""The MedSteer nodes in real ComfyUI graphs: build, save, load, steer, sample, heatmap.

Every graph runs through ComfyUI's PromptExecutor on a random-weight PixArt (4 blocks of width 48,
34x34 latents). Equality claims are bit-exact (``torch.equal``). Reference runs use a fresh
executor, so no result comes from ComfyUI's cache.
"""

from __future__ import annotations

import html
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from comfy_boot import SAMPLE, SIZE, Graph, empty_latent, keep, ksampler, pixart, prompt, steer

MEDSTEER_NODES = (
    "BuildPathologyVector",
    "ApplySSPSSteer",
    "GateHeatmap",
    "SavePathologyVector",
    "LoadPathologyVector",
    "InspectPathologyVector",
)
CUSTOM = "custom (steps and layers below)"
FIGURE_3 = "paper Fig. 3 (layer 8; steps 8, 12, 14, 19)"


def heatmap(g, model, latent, image=None, **overrides):
    inputs = {"preset": CUSTOM, "steps": "all", "layers": "mean", "colormap": "viridis", "opacity": 0.5, "edit": -1}
    inputs.update(overrides)
    if image is not None:
        inputs["image"] = image
    return g.add("GateHeatmap", model=model, latent=latent, **inputs)


def load(g, name):
    return g.add("LoadPathologyVector", vector_name=name)


def pair_graph(vector_name, strength=2.5, sample=None, steer_overrides=None, tokens=(8, 5), batch=1, model_seed=0):
    """Model, prompts, one steered and one unsteered KSampler sharing the seed (the counterfactual pair)."""
    g = Graph()
    model = pixart(g, seed=model_seed)
    positive = prompt(g, "dyed lifted polyps", tokens=tokens[0])
    negative = prompt(g, "", tokens=tokens[1])
    latent = empty_latent(g, batch=batch)
    steered_model = steer(g, model, load(g, vector_name), strength=strength, **(steer_overrides or {}))
    steered = ksampler(g, steered_model, positive, negative, latent, **(sample or {}))
    unsteered = ksampler(g, model, positive, negative, latent, **(sample or {}))
    keep(g, steered)
    keep(g, unsteered)
    return g, {
        "model": model,
        "positive": positive,
        "negative": negative,
        "latent": latent,
        "steered_model": steered_model,
        "steered": steered,
        "unsteered": unsteered,
    }


def core_sample(comfy_env, result, nodes, plans, sample=None, batch=1, log=None):
    """Sample the unpatched model inside the core's ``steering(..., layout="comfyui")`` context.

    The core reads each call's timesteps and rows from PixArt's own arguments, independently of the
    nodes' APPLY_MODEL wrapper, so agreeing with it checks the wrapper's per-call row info.
    """
    import comfy.patcher_extension
    import comfy.sample

    settings = {**SAMPLE, **(sample or {})}
    model = result.output(nodes["model"].id).clone()
    if log is not None:

        def logger(executor, x, t, *args, **kwargs):
            log.append((int(x.shape[0]), list(args[3].get("cond_or_uncond", []))))
            return executor(x, t, *args, **kwargs)

        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test.log", logger)
    positive, negative = result.output(nodes["positive"].id), result.output(nodes["negative"].id)
    latent = torch.zeros(batch, 4, SIZE // 8, SIZE // 8)
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = comfy.sample.prepare_noise(latent, settings["seed"])
    with torch.inference_mode(), comfy_env.core.steering(model.model.diffusion_model, plans, layout="comfyui"):
        return comfy.sample.sample(
            model,
            noise,
            settings["steps"],
            settings["cfg"],
            settings["sampler_name"],
            settings["scheduler"],
            positive,
            negative,
            latent,
            seed=settings["seed"],
        )


def vector_of(comfy_env, name):
    return comfy_env.core.load_vector(comfy_env.vector_dir / name)


# ------------------------------------------------------------------------------------------ schema
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


# ------------------------------------------------------------------------------------------ pipeline
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
    meta = built.metadata
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
    assert torch.equal(loaded.directions, built.directions) and loaded.metadata["prompts_with"] == meta["prompts_with"]


@pytest.mark.parametrize(("cfg", "tokens"), [(1.0, (8, 5)), (4.5, (8, 5)), (4.5, (8, 8))])
def test_built_vector_equals_the_cores_own_capture(comfy_env, cfg, tokens):
    """The node's per-call row info (via its wrapper) gives the vector the core's capture does on its own."""
    import comfy.sample

    g = Graph()
    model = pixart(g)
    conds = {label: prompt(g, f"{label} the concept", tokens=tokens[0]) for label in ("with", "without")}
    uncond = prompt(g, "", tokens=tokens[1])
    build = g.add(
        "BuildPathologyVector",
        model=model,
        with_concept=conds["with"],
        without_concept=conds["without"],
        uncond=uncond,
        latent_image=empty_latent(g, batch=2),
        seed=7,
        num_seeds=3,
        steps=3,
        cfg=cfg,
        sampler_name="euler",
        scheduler="normal",
    )
    keep(g, build)
    result = comfy_env.run(g)
    assert result.success, result.error
    built = result.output(build.id)
    patcher = result.output(model.id)
    core = comfy_env.core
    estimator = core.VectorEstimator.for_model(patcher.model.diffusion_model)
    for seeds in ([7, 8], [9]):
        for label in ("with", "without"):
            latent = torch.zeros(len(seeds), 4, SIZE // 8, SIZE // 8)
            noise = torch.cat([comfy.sample.prepare_noise(latent[:1], s) for s in seeds])
            with (
                torch.inference_mode(),
                core.capture(patcher.model.diffusion_model, estimator, label, layout="comfyui"),
            ):
                comfy.sample.sample(
                    patcher,
                    noise,
                    3,
                    cfg,
                    "euler",
                    "normal",
                    result.output(conds[label].id),
                    result.output(uncond.id),
                    latent,
                    seed=seeds[0],
                )
    reference = estimator.result()
    assert torch.equal(built.timesteps, reference.timesteps)
    assert torch.equal(built.directions, reference.directions)
    assert built.count_with.tolist() == [3] * built.num_timesteps


def test_strength_zero_is_bit_identical_and_strength_changes_the_latents(comfy_env):
    name = comfy_env.write_vector("zero_check", seed=1)
    for preserve_norm in (False, True):
        g, nodes = pair_graph(name, strength=0.0, steer_overrides={"preserve_norm": preserve_norm})
        result = comfy_env.run(g)
        assert result.success, result.error
        assert torch.equal(
            result.output(nodes["steered"].id)["samples"], result.output(nodes["unsteered"].id)["samples"]
        )
    g, nodes = pair_graph(name, strength=2.5)
    result = comfy_env.run(g)
    assert not torch.equal(
        result.output(nodes["steered"].id)["samples"], result.output(nodes["unsteered"].id)["samples"]
    )
    g, nodes = pair_graph(name, strength=-2.5)
    negative = comfy_env.run(g)
    assert not torch.equal(
        negative.output(nodes["steered"].id)["samples"], result.output(nodes["steered"].id)["samples"]
    )


def test_source_model_is_untouched_by_steering(comfy_env):
    import comfy.patcher_extension as pe

    name = comfy_env.write_vector("untouched", seed=2)
    g, nodes = pair_graph(name)
    result = comfy_env.run(g)
    source, steered = result.output(nodes["model"].id), result.output(nodes["steered_model"].id)
    assert source.get_all_wrappers(pe.WrappersMP.APPLY_MODEL) == []
    assert source.model_options == {"transformer_options": {}}
    assert len(steered.get_all_wrappers(pe.WrappersMP.APPLY_MODEL)) == 1
    assert steered.model is source.model  # a clone shares the weights
    assert comfy_env.live_hooks(source) == 0


def test_unsteered_run_after_steered_equals_a_fresh_process(comfy_env, tmp_path):
    name = comfy_env.write_vector("fresh_process", seed=3)
    g, nodes = pair_graph(name)
    # Force the order: the unsteered sampler's latent waits for the steered sampler.
    unsteered_prompt = g.prompt[nodes["unsteered"].id]["inputs"]
    unsteered_prompt["latent_image"] = g.add(
        "MedSteerTestAfter", latent=unsteered_prompt["latent_image"], after=nodes["steered"]
    )[0]
    result = comfy_env.run(g)
    assert result.success, result.error
    order = [data.get("node") for event, data in result.messages if event == "executing" and data.get("node")]
    assert order.index(nodes["steered"].id) < order.index(nodes["unsteered"].id)

    fresh = Graph()
    model = pixart(fresh)
    sampler = ksampler(
        fresh, model, prompt(fresh, "dyed lifted polyps"), prompt(fresh, "", tokens=5), empty_latent(fresh)
    )
    keep(fresh, sampler)
    (tmp_path / "prompt.json").write_text(json.dumps(fresh.prompt))
    out = tmp_path / "fresh.safetensors"
    helper = os.path.join(os.path.dirname(__file__), "comfy_boot.py")
    done = subprocess.run(
        [sys.executable, helper, str(tmp_path / "prompt.json"), str(out), sampler.id],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MEDSTEER_COMFY_BASE": str(tmp_path / "base")},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    from safetensors.torch import load_file

    assert torch.equal(load_file(out)[sampler.id], result.output(nodes["unsteered"].id)["samples"])


def test_two_steered_clones_in_one_graph_do_not_interfere(comfy_env):
    a, b = comfy_env.write_vector("clone_a", seed=4), comfy_env.write_vector("clone_b", seed=5)
    g = Graph()
    model = pixart(g)
    positive, negative, latent = prompt(g, "dyed lifted polyps"), prompt(g, "", tokens=5), empty_latent(g)
    samplers = {}
    for name, strength in ((a, 2.5), (b, 3.0)):
        samplers[name] = ksampler(g, steer(g, model, load(g, name), strength=strength), positive, negative, latent)
        keep(g, samplers[name])
    both = comfy_env.run(g)
    assert both.success, both.error
    for name, strength in ((a, 2.5), (b, 3.0)):
        alone, nodes = pair_graph(name, strength=strength)
        single = comfy_env.run(alone, fresh=True)
        assert torch.equal(both.output(samplers[name].id)["samples"], single.output(nodes["steered"].id)["samples"])
    assert not torch.equal(both.output(samplers[a].id)["samples"], both.output(samplers[b].id)["samples"])


def test_chained_steering_equals_the_cores_composed_plan(comfy_env):
    a, b = comfy_env.write_vector("chain_a", seed=6), comfy_env.write_vector("chain_b", seed=7)
    g = Graph()
    model = pixart(g)
    positive, negative = prompt(g, "dyed lifted polyps"), prompt(g, "", tokens=5)
    first = steer(g, model, load(g, a), strength=2.5, layer_start=0, layer_end=3)
    second = steer(g, first, load(g, b), strength=1.5, layer_start=1, layer_end=4, preserve_norm=True)
    chained = ksampler(g, second, positive, negative, empty_latent(g))
    only_first = ksampler(g, first, positive, negative, empty_latent(g))
    keep(g, chained)
    keep(g, only_first)
    result = comfy_env.run(g)
    assert result.success, result.error
    core = comfy_env.core
    plan_a = core.SteeringPlan(vector_of(comfy_env, a), strength=2.5, layer_start=0, layer_end=3)
    plan_b = core.SteeringPlan(vector_of(comfy_env, b), strength=1.5, layer_start=1, layer_end=4, preserve_norm=True)
    nodes = {"model": model, "positive": positive, "negative": negative}
    expected = core_sample(comfy_env, result, nodes, [plan_a, plan_b])
    assert torch.equal(result.output(chained.id)["samples"], expected)
    assert torch.equal(result.output(only_first.id)["samples"], core_sample(comfy_env, result, nodes, [plan_a]))
    # the upstream clone still holds one plan; the chained one holds both, in order
    steer_module = sys.modules[comfy_env.pack.__name__ + ".nodes.apply_steer"]
    assert len(steer_module.steering_of(result.output(first.id)).plans) == 1
    assert [p.strength for p in steer_module.steering_of(result.output(second.id)).plans] == [2.5, 1.5]


@pytest.mark.parametrize(
    ("tokens", "layout"),
    [((8, 5), [(1, [0]), (1, [1])]), ((8, 8), [(2, [1, 0])])],
    ids=["split-cond-uncond-calls", "one-uncond-cond-batch"],
)
@pytest.mark.parametrize("rows", ["cond and uncond", "cond only"])
def test_cond_uncond_layouts_match_the_core(comfy_env, tokens, layout, rows):
    name = comfy_env.write_vector("layouts", seed=8)
    g, nodes = pair_graph(name, tokens=tokens, steer_overrides={"rows": rows})
    result = comfy_env.run(g)
    assert result.success, result.error
    log = []
    plan = comfy_env.core.SteeringPlan(
        vector_of(comfy_env, name),
        strength=2.5,
        layer_start=1,
        layer_end=3,
        rows="all" if rows == "cond and uncond" else "cond",
    )
    expected = core_sample(comfy_env, result, nodes, [plan], log=log)
    assert sorted({(batch, tuple(chunks)) for batch, chunks in log}) == sorted((n, tuple(c)) for n, c in layout)
    assert torch.equal(result.output(nodes["steered"].id)["samples"], expected)
    assert not torch.equal(expected, result.output(nodes["unsteered"].id)["samples"])


@pytest.mark.parametrize(
    ("sampler_name", "scheduler", "steps", "cfg", "batch"),
    [
        ("euler", "normal", 4, 1.0, 2),  # CFG 1 (no uncond rows) with a batch of 2
        ("heun", "karras", 3, 4.5, 1),  # two model evaluations per step
        ("dpmpp_2m", "karras", 6, 4.5, 2),
        ("uni_pc", "sgm_uniform", 5, 4.5, 1),
        ("euler_ancestral", "simple", 4, 4.5, 1),
    ],
)
def test_samplers_schedulers_step_counts_and_batches(comfy_env, sampler_name, scheduler, steps, cfg, batch):
    name = comfy_env.write_vector("samplers", seed=9)  # built keys differ from every schedule's timesteps
    sample = {"sampler_name": sampler_name, "scheduler": scheduler, "steps": steps, "cfg": cfg}
    g, nodes = pair_graph(name, sample=sample, batch=batch)
    zero = steer(g, nodes["model"], g.prompt[nodes["steered_model"].id]["inputs"]["pathology_vector"], strength=0.0)
    at_zero = ksampler(g, zero, nodes["positive"], nodes["negative"], nodes["latent"], **sample)
    keep(g, at_zero)
    grid = heatmap(g, nodes["steered_model"], nodes["steered"])
    keep(g, grid)
    result = comfy_env.run(g)
    assert result.success, result.error
    steered, unsteered = (result.output(nodes[k].id)["samples"] for k in ("steered", "unsteered"))
    assert steered.shape[0] == batch
    assert torch.equal(result.output(at_zero.id)["samples"], unsteered)
    assert not torch.equal(steered, unsteered)
    assert result.output(grid.id, 1).shape == (batch, SIZE, SIZE)
    plan = comfy_env.core.SteeringPlan(vector_of(comfy_env, name), strength=2.5, layer_start=1, layer_end=3)
    assert torch.equal(steered, core_sample(comfy_env, result, nodes, [plan], sample=sample, batch=batch))


@pytest.mark.parametrize(("start_percent", "end_percent"), [(0.5, 1.0), (0.0, 0.6), (0.3, 0.7)])
def test_percent_window_steers_the_steps_comfyui_would(comfy_env, start_percent, end_percent):
    import comfy.samplers

    name = comfy_env.write_vector("window", seed=10)
    window = {"start_percent": start_percent, "end_percent": end_percent}
    g, nodes = pair_graph(name, steer_overrides=window, sample={"steps": 6})
    result = comfy_env.run(g)
    assert result.success, result.error
    windowed = result.output(nodes["steered"].id)["samples"]
    assert not torch.equal(windowed, result.output(nodes["unsteered"].id)["samples"])
    # ComfyUI's convention (as for ControlNet ranges): a call is inside when its sigma lies between
    # percent_to_sigma(end_percent) and percent_to_sigma(start_percent), both included.
    sampling = result.output(nodes["model"].id).get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", 6)[:-1]
    high, low = sampling.percent_to_sigma(start_percent), sampling.percent_to_sigma(end_percent)
    inside = [float(sampling.timestep(s)) for s in sigmas if low <= float(s) <= high]
    assert 0 < len(inside) < len(sigmas)
    plan = comfy_env.core.SteeringPlan(
        vector_of(comfy_env, name), 2.5, 1, 3, timestep_max=max(inside), timestep_min=min(inside)
    )
    assert torch.equal(windowed, core_sample(comfy_env, result, nodes, [plan], sample={"steps": 6}))


def test_steering_coexists_with_other_wrappers_and_patches(comfy_env):
    import comfy.patcher_extension as pe
    import comfy.sample

    name = comfy_env.write_vector("coexist", seed=11)
    g, nodes = pair_graph(name)
    result = comfy_env.run(g)
    steered = result.output(nodes["steered_model"].id)
    positive, negative = result.output(nodes["positive"].id), result.output(nodes["negative"].id)
    calls = []

    def other_pack(executor, *args, **kwargs):  # another pack's keyed APPLY_MODEL wrapper
        calls.append(1)
        return executor(*args, **kwargs)

    def function_wrapper(apply_model, args):  # a model_function_wrapper patch (one slot in ComfyUI)
        return apply_model(args["input"], args["timestep"], **args["c"])

    patched = steered.clone()
    patched.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "another.pack", other_pack)
    patched.set_model_unet_function_wrapper(function_wrapper)
    latent = torch.zeros(1, 4, SIZE // 8, SIZE // 8)
    with torch.inference_mode():
        out = comfy.sample.sample(
            patched,
            comfy.sample.prepare_noise(latent, SAMPLE["seed"]),
            4,
            4.5,
            "euler",
            "normal",
            positive,
            negative,
            latent,
            seed=SAMPLE["seed"],
        )
    assert calls and torch.equal(out, result.output(nodes["steered"].id)["samples"])
    assert "model_function_wrapper" not in steered.model_options


# ------------------------------------------------------------------------------------------ heatmap
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
    assert not torch.allclose(mask, core.gate_drawing.to_mask(maps[-1].mean(dim=0), (SIZE, SIZE)))  # not the last step's


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
    assert "none of the last sampling runs" in _error_of(comfy_env, g).error


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


# ------------------------------------------------------------------------------------------ errors
def _error_of(comfy_env, g):
    result = comfy_env.run(g, fresh=True)
    assert not result.success
    return result


def test_non_pixart_model_is_refused_before_sampling(comfy_env):
    name = comfy_env.write_vector("any", seed=15)
    g = Graph()
    model = pixart(g, kind="not pixart")
    sampled = ksampler(g, steer(g, model, load(g, name)), prompt(g, "x"), prompt(g, "", tokens=5), empty_latent(g))
    keep(g, sampled)
    result = _error_of(comfy_env, g)
    assert result.error_type.endswith("UnsupportedModelError") and "PixArt" in result.error
    executed = [data.get("node") for event, data in result.messages if event == "executing"]
    assert sampled.id not in executed

    g = Graph()
    build = g.add(
        "BuildPathologyVector",
        model=pixart(g, kind="not pixart"),
        with_concept=prompt(g, "a"),
        without_concept=prompt(g, "b"),
        uncond=prompt(g, ""),
        latent_image=empty_latent(g),
        seed=0,
        num_seeds=1,
        steps=2,
        cfg=4.5,
        sampler_name="euler",
        scheduler="normal",
    )
    keep(g, build)
    assert "PixArt" in _error_of(comfy_env, g).error


def test_vector_from_another_model_is_refused(comfy_env):
    wide = comfy_env.write_vector("wide", hidden_size=96, seed=16)
    g, _ = pair_graph(wide)
    result = _error_of(comfy_env, g)
    assert "VectorMismatchError" in result.error_type
    assert "hidden size 96" in result.error and "hidden size 48" in result.error


def test_layer_windows_outside_the_depth_or_empty_are_refused(comfy_env):
    name = comfy_env.write_vector("windows", seed=17)
    g, _ = pair_graph(name, steer_overrides={"layer_start": 2, "layer_end": 10})
    assert "outside this model's 4 layers" in _error_of(comfy_env, g).error
    g, _ = pair_graph(name, steer_overrides={"layer_start": 3, "layer_end": 3})
    result = _error_of(comfy_env, g)
    assert result.error_type == "validation" and "empty layer window" in result.error
    g, _ = pair_graph(name, steer_overrides={"start_percent": 0.8, "end_percent": 0.2})
    assert "empty steering window" in _error_of(comfy_env, g).error
    g, _ = pair_graph(name, steer_overrides={"start_percent": 1.0, "end_percent": 1.0})
    assert "contains no sampling step" in _error_of(comfy_env, g).error


def test_heatmap_step_and_layer_lists_are_checked(comfy_env):
    name = comfy_env.write_vector("steps", seed=18)
    g, nodes = pair_graph(name)
    keep(g, heatmap(g, nodes["steered_model"], nodes["steered"], steps="0,99"))
    assert "step 99 is out of range: this run has 4 steps" in _error_of(comfy_env, g).error
    g, nodes = pair_graph(name)
    keep(g, heatmap(g, nodes["steered_model"], nodes["steered"], layers="0"))
    assert "were not steered" in _error_of(comfy_env, g).error
    g, nodes = pair_graph(name)
    keep(g, heatmap(g, nodes["steered_model"], nodes["steered"], steps="8,x"))
    result = _error_of(comfy_env, g)
    assert result.error_type == "validation" and "cannot read step 'x'" in result.error
    g, nodes = pair_graph(name)
    keep(g, heatmap(g, nodes["model"], nodes["unsteered"]))
    assert "not steered" in _error_of(comfy_env, g).error


def test_corrupt_and_unsafe_vector_files_are_refused_before_running(comfy_env):
    (comfy_env.vector_dir / "corrupt.safetensors").write_bytes(b"\x0a\x00\x00\x00\x00\x00\x00\x00{not json}")
    torch.save({"directions": torch.zeros(2)}, comfy_env.vector_dir / "pickled.safetensors")
    for name, words in (("corrupt.safetensors", "not valid JSON"), ("pickled.safetensors", "pickle")):
        g, _ = pair_graph(name)
        result = _error_of(comfy_env, g)
        assert result.error_type == "validation" and words in result.error and name in result.error


def test_latents_of_32x32_or_smaller_get_a_clear_error(comfy_env):
    name = comfy_env.write_vector("small_latent", seed=19)
    g = Graph()
    model = pixart(g)
    sampled = ksampler(
        g, steer(g, model, load(g, name)), prompt(g, "x"), prompt(g, "", tokens=5), empty_latent(g, size=256)
    )
    keep(g, sampled)
    result = _error_of(comfy_env, g)
    assert "32 latent pixels or less" in result.error and "ZeroDivision" not in result.error_type
    g = Graph()
    build = g.add(
        "BuildPathologyVector",
        model=pixart(g),
        with_concept=prompt(g, "a"),
        without_concept=prompt(g, "b"),
        uncond=prompt(g, ""),
        latent_image=empty_latent(g, size=256),
        seed=0,
        num_seeds=1,
        steps=2,
        cfg=4.5,
        sampler_name="euler",
        scheduler="normal",
    )
    keep(g, build)
    assert "at least 34x34" in _error_of(comfy_env, g).error


def test_build_stops_cleanly_on_interrupt(comfy_env):
    import nodes as comfy_nodes

    g = Graph()
    model = pixart(g)
    build = g.add(
        "BuildPathologyVector",
        model=model,
        with_concept=prompt(g, "with"),
        without_concept=prompt(g, "without"),
        uncond=prompt(g, "", tokens=5),
        latent_image=empty_latent(g),
        seed=0,
        num_seeds=4,
        steps=3,
        cfg=4.5,
        sampler_name="euler",
        scheduler="normal",
    )
    keep(g, build)
    seen = []

    def interrupt(value, total, node_id):
        if node_id == build.id:
            seen.append(value)
            if value >= 4:
                comfy_nodes.interrupt_processing(True)

    comfy_env.booted.on_progress.append(interrupt)
    try:
        result = comfy_env.run(g, fresh=True)
    finally:
        comfy_env.booted.on_progress.remove(interrupt)
        comfy_nodes.interrupt_processing(False)
    assert result.error_type == "interrupted"
    assert max(seen) < 2 * 4 * 3  # stopped well before the end
    assert build.id not in result.outputs
    assert comfy_env.live_hooks(result.output(model.id)) == 0


# ------------------------------------------------------------------------------------------ files
def test_vector_folder_lists_safetensors_only_and_honours_extra_model_paths(comfy_env, tmp_path):
    import folder_paths
    import utils.extra_config

    extra = tmp_path / "shared_vectors"
    extra.mkdir()
    comfy_env.core.save_vector(
        vector_of(comfy_env, comfy_env.write_vector("extra_src", seed=20)), extra / "from_extra.safetensors"
    )
    (extra / "notes.txt").write_text("not a vector")
    (tmp_path / "extra.yaml").write_text(f"lab:\n    base_path: {tmp_path}\n    medsteer: shared_vectors\n")
    paths_before = folder_paths.get_folder_paths("medsteer")
    utils.extra_config.load_extra_path_config(str(tmp_path / "extra.yaml"))
    try:
        listed = folder_paths.get_filename_list("medsteer")
        assert "from_extra.safetensors" in listed and "notes.txt" not in listed
        g, nodes = pair_graph("from_extra.safetensors")
        assert comfy_env.run(g).success
        # registered before the pack loads (extra_model_paths.yaml is read first): kept, filtered
        vector_io = sys.modules[comfy_env.pack.__name__ + ".nodes.vector_io"]
        saved = folder_paths.folder_names_and_paths.pop("medsteer")
        folder_paths.add_model_folder_path("medsteer", str(extra))
        vector_io.register_vector_folder()
        paths, extensions = folder_paths.folder_names_and_paths["medsteer"]
        assert paths == [paths_before[0], str(extra)] and extensions == {".safetensors"}
        folder_paths.folder_names_and_paths["medsteer"] = saved
    finally:
        paths = folder_paths.folder_names_and_paths["medsteer"][0]
        if str(extra) in paths:
            paths.remove(str(extra))


def test_vector_folder_exists_from_the_start(comfy_env, tmp_path, monkeypatch):
    import folder_paths

    # the booted ComfyUI's models/medsteer (its base directory is a fresh temporary folder)
    assert Path(folder_paths.get_folder_paths("medsteer")[0]) == Path(folder_paths.models_dir) / "medsteer"
    assert (Path(folder_paths.models_dir) / "medsteer").is_dir()
    # what the pack does when it loads, on a ComfyUI whose models/ has no medsteer folder yet, with an
    # extra_model_paths.yaml folder registered first: models/medsteer is created, the extra one is not
    vector_io = sys.modules[comfy_env.pack.__name__ + ".nodes.vector_io"]
    models = tmp_path / "models"
    models.mkdir()
    monkeypatch.setattr(folder_paths, "models_dir", str(models))
    saved = folder_paths.folder_names_and_paths.pop("medsteer")
    try:
        folder_paths.add_model_folder_path("medsteer", str(tmp_path / "elsewhere"))
        vector_io.register_vector_folder()
        assert folder_paths.get_folder_paths("medsteer")[0] == str(models / "medsteer")
        assert (models / "medsteer").is_dir() and not (tmp_path / "elsewhere").exists()
    finally:
        folder_paths.folder_names_and_paths["medsteer"] = saved


def test_missing_or_escaping_vector_names_are_refused_at_queue_time(comfy_env):
    name = comfy_env.write_vector("queue_time_ok", seed=24)
    for bad, words in (
        ("no_such_vector.safetensors", "no pathology vector 'no_such_vector.safetensors' in models/medsteer/"),
        ("../" + name, "without '..'"),
        (str(comfy_env.vector_dir / name), "without '..'"),
    ):
        g, _ = pair_graph(bad)
        (loader,) = [i for i, n in g.prompt.items() if n["class_type"] == "LoadPathologyVector"]
        _, _, outputs, node_errors = comfy_env.validate(g)  # the unsteered sampler's output stays valid
        assert list(node_errors) == [loader] and len(outputs) == 1
        (message,) = [e["details"] for e in node_errors[loader]["errors"]]
        assert words in message and repr(bad) in message and name not in message.replace(bad, "")
    g, _ = pair_graph(name)
    valid, _, outputs, node_errors = comfy_env.validate(g)
    assert valid and node_errors == {} and len(outputs) == 2


def test_inspect_node_shows_the_cores_layer_profile_and_report(comfy_env):
    name = comfy_env.write_vector("inspect_me", seed=23, depth=4, keys=8)
    g = Graph()
    inspected = g.add("InspectPathologyVector", pathology_vector=load(g, name), colormap="magma")
    result = comfy_env.run(g)
    assert result.success, result.error
    image, text = result.output(inspected.id, 0), result.output(inspected.id, 1)
    core = comfy_env.core
    report = core.inspection.inspect_vector(vector_of(comfy_env, name))
    assert torch.equal(image, core.inspection.profile_image(report, "magma")[None])
    assert image.shape[0] == 1 and image.shape[-1] == 3 and 0 <= float(image.min()) <= float(image.max()) <= 1
    report["file"] = f"{name} (models/medsteer)"
    assert text == core.inspection.format_inspection(report)
    assert text.splitlines()[0] == f"vector: {name} (models/medsteer)"
    assert "concept: 'concept 23'" in text and "per layer" in text
    assert list(result.ui[inspected.id]["text"]) == [text]  # the report on the node (history / "executed")


def test_inspect_names_a_vector_built_in_the_graph_and_draws_the_report_on_the_node(comfy_env):
    import server

    g = Graph()
    build = g.add(
        "BuildPathologyVector",
        model=pixart(g),
        with_concept=prompt(g, "dyed polyps"),
        without_concept=prompt(g, "polyps"),
        uncond=prompt(g, "", tokens=5),
        latent_image=empty_latent(g),
        seed=0,
        num_seeds=1,
        steps=2,
        cfg=4.5,
        sampler_name="euler",
        scheduler="normal",
    )
    inspected = g.add("InspectPathologyVector", pathology_vector=build, colormap="viridis")

    class Recorder:  # stands in for the running server's PromptServer.instance (no sockets here)
        def __init__(self):
            self.sent = []

        def send_progress_text(self, text, node_id, sid=None):
            self.sent.append((node_id, text))

    recorder = Recorder()
    had, before = hasattr(server.PromptServer, "instance"), getattr(server.PromptServer, "instance", None)
    server.PromptServer.instance = recorder
    try:
        result = comfy_env.run(g, fresh=True)
    finally:
        if had:
            server.PromptServer.instance = before
        else:
            del server.PromptServer.instance
    assert result.success, result.error
    text = result.output(inspected.id, 1)
    first = text.splitlines()[0]
    assert first == "vector: 'dyed polyps' vs 'polyps' (built in the graph, not read from a file)"
    assert list(result.ui[inspected.id]["text"]) == [text]
    # frontend 1.27 draws only PreviewAny's text output, so the report also goes to the node as
    # progress text (rendered as HTML there: escaped)
    assert recorder.sent == [(inspected.id, html.escape(text))]
    assert "&#x27;dyed polyps&#x27;" in recorder.sent[0][1]


def test_save_refuses_names_outside_the_folder(comfy_env):
    name = comfy_env.write_vector("save_src", seed=21)
    g = Graph()
    g.add("SavePathologyVector", pathology_vector=load(g, name), filename_prefix="../escape")
    result = _error_of(comfy_env, g)
    assert "inside models/medsteer" in result.error
    assert not (comfy_env.vector_dir.parent / "escape_00001_.safetensors").exists()
