"""Steering a ComfyUI UNet composes with what else patches it, and loads from ComfyUI's own loaders.

Another pack's ``attn2_output_patch`` and ``attn2`` replace (IP-Adapter's kind), a LoRA-like weight
patch (``ModelPatcher.add_patches``), PAG (ComfyUI's PerturbedAttentionGuidance) and a ControlNet
(ControlNetApplyAdvanced) each run with and without steering. For each: the two node orders give
the same image, strength 0 gives exactly the other patch's image, steering still changes it, and
the input MODEL is left as it was. The ControlNet's own cross-attention is never steered. Then a
single-file SD1.x checkpoint written by the test loads with CheckpointLoaderSimple and steers.
"""

from __future__ import annotations

import os

import pytest
import torch
from comfy_boot import Graph, keep
from unet_graphs import core_sample, ensure_unet_nodes, ksampler, load, sd_latent, sd_prompt, steer, unet, write_vector

WINDOW = {"layers": "input 1 - output 3"}


@pytest.fixture(scope="module")
def pack(comfy_env):
    return ensure_unet_nodes()


def patched(g, model, kind: str):
    """``model`` with one other patch of ``kind`` applied (a node of ComfyUI or of the test pack)."""
    if kind == "LoRA":
        return g.add("MedSteerTestWeightPatch", model=model, strength=1.0)
    if kind == "PAG":
        return g.add("PerturbedAttentionGuidance", model=model, scale=3.0)
    return g.add("MedSteerTestAttnPatch", model=model, kind=kind, scale=1.5)


@pytest.mark.parametrize("kind", ["attn2 output", "attn2 replace", "LoRA", "PAG"])
def test_steering_composes_with_another_patch_in_either_order(comfy_env, pack, kind):
    g = Graph()
    model = unet(g, "sd1")
    positive, negative, latent = sd_prompt(g, "polyp"), sd_prompt(g, ""), sd_latent(g)
    vector = load(g, write_vector(comfy_env, pack, "unet/compose", seed=9))
    other = patched(g, model, kind)
    runs = {
        "steer then other": patched(g, steer(g, model, vector, **WINDOW), kind),
        "other then steer": steer(g, other, vector, **WINDOW),
        "other, strength 0": steer(g, other, vector, strength=0.0, **WINDOW),
        "other": other,
        "steer": steer(g, model, vector, **WINDOW),
        "plain": model,
    }
    samplers = {name: ksampler(g, m, positive, negative, latent) for name, m in runs.items()}
    for node in samplers.values():
        keep(g, node)
    result = comfy_env.run(g)
    assert result.success, result.error
    out = {name: result.output(node.id)["samples"] for name, node in samplers.items()}
    assert torch.equal(out["steer then other"], out["other then steer"])
    assert torch.equal(out["other, strength 0"], out["other"])
    assert not torch.equal(out["other then steer"], out["other"])  # steering still acts
    assert not torch.equal(out["other then steer"], out["steer"])  # and so does the other patch
    assert not torch.equal(out["other"], out["plain"])

    g = Graph()  # the input model, sampled afresh, is what it was before any patch ran on it
    plain = ksampler(g, unet(g, "sd1"), sd_prompt(g, "polyp"), sd_prompt(g, ""), sd_latent(g))
    keep(g, plain)
    fresh = comfy_env.run(g, fresh=True)
    assert torch.equal(fresh.output(plain.id)["samples"], out["plain"])


def test_a_controlnets_own_cross_attention_is_never_steered(comfy_env, pack):
    def graph(strength: float | None):
        g = Graph()
        model = unet(g, "sd1")
        net = g.add("MedSteerTestControlNet", family="sd1", seed=1)
        hint = g.add("EmptyImage", width=96, height=64, batch_size=1, color=0x808080)
        controlled = g.add(
            "ControlNetApplyAdvanced",
            positive=sd_prompt(g, "polyp"),
            negative=sd_prompt(g, ""),
            control_net=net,
            image=hint,
            strength=1.0,
            start_percent=0.0,
            end_percent=1.0,
        )
        vector = load(g, write_vector(comfy_env, pack, "unet/controlnet", seed=10))
        chosen = model if strength is None else steer(g, model, vector, strength=strength, **WINDOW)
        sampler = ksampler(g, chosen, controlled[0], controlled[1], sd_latent(g))
        keep(g, sampler)
        return g, net, sampler

    outputs, probes = {}, {}
    for strength in (None, 2.5, 0.0):
        g, net, sampler = graph(strength)
        result = comfy_env.run(g, fresh=True)
        assert result.success, result.error
        outputs[strength] = result.output(sampler.id)["samples"]
        probe = result.output(net.id).control_model.medsteer_probe
        probes[strength] = list(probe)
        probe.clear()
    assert torch.equal(outputs[0.0], outputs[None]) and not torch.equal(outputs[2.5], outputs[None])
    steered, plain = probes[2.5], probes[None]
    assert steered and len(steered) == len(plain)
    assert not any(patched for _, _, patched in steered)  # no hook was ever on the ControlNet's attn2
    sites = len({name for name, _, _ in plain})
    for (name, out, _), (name_plain, out_plain, _) in zip(steered[:sites], plain[:sites], strict=True):
        assert name == name_plain and torch.equal(out, out_plain)  # first call: same input, same output


def test_a_single_file_sd15_checkpoint_loads_and_steers(comfy_env, pack):
    """CheckpointLoaderSimple on an SD1.x-layout file (``model.diffusion_model.*`` keys, 320 base
    channels and a 768-wide context, one resolution level: 26M parameters in float16)."""
    import folder_paths
    from safetensors.torch import save_file

    model = pack.tiny_unet("sd1", seed=2, size="wide")
    state = {
        f"model.diffusion_model.{k}": v.half().contiguous() for k, v in model.model.diffusion_model.state_dict().items()
    }
    folder = folder_paths.get_folder_paths("checkpoints")[0]
    os.makedirs(folder, exist_ok=True)
    save_file(state, f"{folder}/medsteer_tiny_sd15.safetensors")

    g = Graph()
    checkpoint = g.add("CheckpointLoaderSimple", ckpt_name="medsteer_tiny_sd15.safetensors")
    positive, negative, latent = sd_prompt(g, "polyp"), sd_prompt(g, ""), sd_latent(g)
    vector = load(g, write_vector(comfy_env, pack, "unet/checkpoint", seed=11, size="wide"))
    steered = ksampler(g, steer(g, checkpoint[0], vector, layers="middle - output 1"), positive, negative, latent)
    zero = ksampler(g, steer(g, checkpoint[0], vector, strength=0.0, layers="middle"), positive, negative, latent)
    plain = ksampler(g, checkpoint[0], positive, negative, latent)
    for node in (steered, zero, plain):
        keep(g, node)
    result = comfy_env.run(g)
    assert result.success, result.error
    loaded = result.output(checkpoint.id)
    common = comfy_env.pack.nodes.common
    assert common.model_sites(loaded).family == "sd1"
    assert common.model_sites(loaded).names == ("input 1", "middle 0", "output 0", "output 1")
    out = {k: result.output(n.id)["samples"] for k, n in (("steered", steered), ("zero", zero), ("plain", plain))}
    assert torch.equal(out["zero"], out["plain"]) and not torch.equal(out["steered"], out["plain"])


@pytest.mark.parametrize("sampling", ["v_prediction", "lcm"])
def test_a_model_sampling_patch_after_steering_sets_the_timesteps_it_steers_at(comfy_env, pack, sampling):
    """The wrapper reads the model_sampling in use at each call, so the node order does not matter
    (LCM maps sigmas to its own 50 timesteps) and the core, reading the UNet's arguments, agrees."""
    core = comfy_env.core
    g = Graph()
    model = unet(g, "sd1")
    positive, negative, latent = sd_prompt(g, "polyp"), sd_prompt(g, ""), sd_latent(g)
    vector = load(g, write_vector(comfy_env, pack, "unet/sampling", seed=12))
    patched = g.add("ModelSamplingDiscrete", model=model, sampling=sampling, zsnr=False)
    after = g.add("ModelSamplingDiscrete", model=steer(g, model, vector, **WINDOW), sampling=sampling, zsnr=False)
    before = steer(g, patched, vector, **WINDOW)
    runs = {name: ksampler(g, m, positive, negative, latent) for name, m in (("after", after), ("before", before))}
    for node in runs.values():
        keep(g, node)
    result = comfy_env.run(g)
    assert result.success, result.error
    loaded = core.load_vector(comfy_env.vector_dir / "unet/sampling.safetensors")
    conds = result.output(positive.id), result.output(negative.id)
    reference = core_sample(comfy_env, result.output(patched.id), *conds, [core.SteeringPlan(loaded, 2.5, 0, 7)])
    assert torch.equal(result.output(runs["after"].id)["samples"], reference)
    assert torch.equal(result.output(runs["before"].id)["samples"], reference)
