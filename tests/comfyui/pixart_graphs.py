"""Graph helpers for the PixArt node tests: the counterfactual pair, a GateHeatmap, the core's own
sampling as the reference, a vector's file read back, a graph's error.

The model and prompts come from ``medsteer_test_nodes`` (loaded by ``comfy_boot.boot``); the
generic builders (``pixart``, ``prompt``, ``steer``, ``ksampler``, ...) are ``comfy_boot``'s.
"""

from __future__ import annotations

import torch
from comfy_boot import SAMPLE, SIZE, Graph, empty_latent, keep, ksampler, pixart, prompt, steer

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


def error_of(comfy_env, g):
    result = comfy_env.run(g, fresh=True)
    assert not result.success
    return result
