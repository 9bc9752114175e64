"""ApplySSPSSteer with ComfyUI's TorchCompileModel in the chain, before or after it (issue 12).

TorchCompileModel compiles ``diffusion_model`` once and swaps the compiled module in around every
model call (an APPLY_MODEL wrapper). Steering opens its hooks inside that call, so it hooks a model
whose compiled code may already exist: here the unsteered sampler of the compiled model runs first,
then the steered one reuses the same compiled module. Both orders must steer, and agree with the
uncompiled steered sampler to float tolerance (inductor reorders float sums), measured
against the size of the steering effect.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from comfy_boot import Graph, empty_latent, keep, ksampler, pixart, prompt, steer


def ensure_torch_compile_node():
    import nodes

    if "TorchCompileModel" not in nodes.NODE_CLASS_MAPPINGS:
        module = Path(nodes.__file__).parent / "comfy_extras" / "nodes_torch_compile.py"
        assert asyncio.run(nodes.load_custom_node(str(module), module_parent="comfy_extras"))
    assert "TorchCompileModel" in nodes.NODE_CLASS_MAPPINGS


def after(g, latent, node):
    """``latent``, available only once ``node`` has run (forces the execution order)."""
    return g.add("MedSteerTestAfter", latent=latent, after=node)[0]


@pytest.mark.slow
def test_torch_compile_model_before_or_after_steering_steers_like_eager(comfy_env):
    ensure_torch_compile_node()
    import torch._dynamo

    torch._dynamo.reset()
    name = comfy_env.write_vector("compiled", seed=4)
    g = Graph()
    model = pixart(g)
    positive, negative = prompt(g, "dyed lifted polyps"), prompt(g, "", tokens=5)
    latent = empty_latent(g)
    vector = g.add("LoadPathologyVector", vector_name=name)
    eager_plain = ksampler(g, model, positive, negative, latent)
    eager_steered = ksampler(g, steer(g, model, vector), positive, negative, latent)
    compiled = g.add("TorchCompileModel", model=model, backend="inductor")
    # The compiled model samples unsteered first; the steered clone reuses its compiled module.
    compiled_plain = ksampler(g, compiled, positive, negative, after(g, latent, eager_steered))
    compile_then_steer = ksampler(g, steer(g, compiled, vector), positive, negative, after(g, latent, compiled_plain))
    steer_then_compile = ksampler(
        g,
        g.add("TorchCompileModel", model=steer(g, model, vector), backend="inductor"),
        positive,
        negative,
        after(g, latent, compile_then_steer),
    )
    samplers = (eager_plain, eager_steered, compiled_plain, compile_then_steer, steer_then_compile)
    for node in samplers:
        keep(g, node)
    result = comfy_env.run(g)
    assert result.success, result.error
    order = [data.get("node") for event, data in result.messages if event == "executing" and data.get("node")]
    assert [order.index(n.id) for n in samplers[2:]] == sorted(order.index(n.id) for n in samplers[2:])
    out = {n.id: result.output(n.id)["samples"] for n in samplers}
    effect = float((out[eager_steered.id] - out[eager_plain.id]).abs().max())
    assert effect > 0.05
    # Inductor's fused kernels move 4 Euler steps by up to ~6e-3 here (plain vs plain): compare
    # against a tenth of the steering effect, which tells steered from unsteered unambiguously.
    near = effect / 10
    assert (out[compiled_plain.id] - out[eager_plain.id]).abs().max() < near
    for steered in (compile_then_steer, steer_then_compile):
        assert (out[steered.id] - out[compiled_plain.id]).abs().max() > effect / 2
        assert (out[steered.id] - out[eager_steered.id]).abs().max() < near
    sites = [b.cross_attn for b in result.output(model.id).model.diffusion_model.blocks]
    assert all("forward" not in s.__dict__ and not s._forward_hooks for s in sites)
    torch._dynamo.reset()
