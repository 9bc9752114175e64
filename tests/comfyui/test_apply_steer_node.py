"""ApplySSPSSteer in real ComfyUI graphs: strength 0 is bit-identical, the source model is untouched,
clones and chains compose as the core's plans, every row layout, sampler, scheduler and percent
window steers what the core does, other wrappers and patches coexist; bad models, vectors,
windows and latents are refused with a clear error.

Every graph runs through ComfyUI's PromptExecutor on a random-weight PixArt (4 blocks of width 48,
34x34 latents). Equality claims are bit-exact (``torch.equal``). Reference runs use a fresh
executor, so no result comes from ComfyUI's cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from comfy_boot import SAMPLE, SIZE, Graph, empty_latent, keep, ksampler, pixart, prompt, steer
from pixart_graphs import core_sample, error_of, heatmap, load, pair_graph, vector_of


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


def test_non_pixart_model_is_refused_before_sampling(comfy_env):
    name = comfy_env.write_vector("any", seed=15)
    g = Graph()
    model = pixart(g, kind="not pixart")
    sampled = ksampler(g, steer(g, model, load(g, name)), prompt(g, "x"), prompt(g, "", tokens=5), empty_latent(g))
    keep(g, sampled)
    result = error_of(comfy_env, g)
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
    assert "PixArt" in error_of(comfy_env, g).error


def test_vector_from_another_model_is_refused(comfy_env):
    wide = comfy_env.write_vector("wide", hidden_size=96, seed=16)
    g, _ = pair_graph(wide)
    result = error_of(comfy_env, g)
    assert "VectorMismatchError" in result.error_type
    assert "hidden size 96" in result.error and "hidden size 48" in result.error


def test_layer_windows_outside_the_depth_or_empty_are_refused(comfy_env):
    name = comfy_env.write_vector("windows", seed=17)
    g, _ = pair_graph(name, steer_overrides={"layer_start": 2, "layer_end": 10})
    assert "outside this model's 4 layers" in error_of(comfy_env, g).error
    g, _ = pair_graph(name, steer_overrides={"layer_start": 3, "layer_end": 3})
    result = error_of(comfy_env, g)
    assert result.error_type == "validation" and "empty layer window" in result.error
    g, _ = pair_graph(name, steer_overrides={"start_percent": 0.8, "end_percent": 0.2})
    assert "empty steering window" in error_of(comfy_env, g).error
    g, _ = pair_graph(name, steer_overrides={"start_percent": 1.0, "end_percent": 1.0})
    assert "contains no sampling step" in error_of(comfy_env, g).error


def test_latents_of_32x32_or_smaller_get_a_clear_error(comfy_env):
    name = comfy_env.write_vector("small_latent", seed=19)
    g = Graph()
    model = pixart(g)
    sampled = ksampler(
        g, steer(g, model, load(g, name)), prompt(g, "x"), prompt(g, "", tokens=5), empty_latent(g, size=256)
    )
    keep(g, sampled)
    result = error_of(comfy_env, g)
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
    assert "at least 34x34" in error_of(comfy_env, g).error
