"""BuildPathologyVector in real ComfyUI graphs: the vector equals the core's own capture, and an
interrupt stops it cleanly.

Every graph runs through ComfyUI's PromptExecutor on a random-weight PixArt (4 blocks of width 48,
34x34 latents). Equality claims are bit-exact (``torch.equal``). Reference runs use a fresh
executor, so no result comes from ComfyUI's cache.
"""

from __future__ import annotations

import pytest
import torch
from comfy_boot import SIZE, Graph, empty_latent, keep, pixart, prompt


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
