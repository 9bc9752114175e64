"""The MedSteer nodes on Stable Diffusion UNets (issue 10) in real ComfyUI graphs.

Tiny random-weight SD1.x / SD2.x (eps and v) / SDXL UNets built from ComfyUI's own model classes
(``medsteer_unet_test_nodes``), sampled by ComfyUI's KSampler on a non-square 8x12 latent. The
tiny SD models have 7 sites of widths 32 and 64 (ragged); the tiny SDXL has 11, two transformer
blocks per block at its deeper levels. Equality claims are bit-exact (``torch.equal``).
"""

from __future__ import annotations

import pytest
import torch
from comfy_boot import TEST_PACK, Graph, keep, pixart
from unet_graphs import (
    LATENT,
    TINY_SD_NAMES,
    TINY_SD_WIDTHS,
    core_sample,
    ensure_unet_nodes,
    ksampler,
    load,
    random_vector,
    sd_latent,
    sd_prompt,
    sites_of,
    steer,
    unet,
    write_vector,
)


@pytest.fixture(scope="module")
def pack(comfy_env):
    return ensure_unet_nodes()


def node_class(name: str):
    import nodes

    return nodes.NODE_CLASS_MAPPINGS[name]


def apply_steer(model, vector, layers: str = "", strength: float = 2.5, rows: str = "cond and uncond"):
    """ApplySSPSSteer's execute, outside a graph (what the node returns)."""
    output = node_class("ApplySSPSSteer").execute(
        model, vector, strength, 0, 1, 0.0, 1.0, rows, False, "nearest", layers=layers
    )
    return output.result[0]


def sample(model, positive, negative, steps: int = 2, cfg: float = 5.0, batch: int = 1):
    import comfy.sample

    latent = torch.zeros(batch, 4, *LATENT)
    noise = comfy.sample.prepare_noise(latent, 3)
    with torch.inference_mode():
        return comfy.sample.sample(
            model, noise, steps, cfg, "euler", "normal", positive, negative, latent, seed=3, disable_pbar=True
        )


# ------------------------------------------------------------------------------------ models
def test_every_comfyui_unet_is_a_site_model_with_its_family(comfy_env, pack):
    common = comfy_env.pack.nodes.common
    for family in ("sd1", "sd2", "sdxl"):
        model = pack.tiny_unet(family, size="wide", device="meta")
        sites = common.model_sites(model)
        assert (sites.family, common.model_sites(model).family) == (family, family)
        assert sites.names == ("input 1", "middle 0", "output 0", "output 1")
    tiny = pack.tiny_unet("sd2-v")
    sites = common.model_sites(tiny)
    assert (sites.names, sites.widths) == (TINY_SD_NAMES, TINY_SD_WIDTHS)
    assert common.model_sites(tiny).family == "sd-unet"  # not a released geometry
    xl = common.model_sites(pack.tiny_unet("sdxl"))
    assert xl.names[:3] == ("input 3", "input 5.0", "input 5.1") and xl.depth == 11
    test_pack = comfy_env.booted.packs[str(TEST_PACK)]
    assert common.model_sites(test_pack.random_pixart(0, 48, 4, 2, 16)).family == "pixart-alpha"


def test_an_unsupported_model_names_every_supported_family(comfy_env, pack):
    g = Graph()
    vector = load(g, write_vector(comfy_env, pack, "unet/unsupported"))
    keep(g, steer(g, pixart(g, kind="not pixart"), vector))
    result = comfy_env.run(g)
    assert not result.success and result.error_type.endswith("UnsupportedModelError")
    assert "PixArt" in result.error and "Stable Diffusion 1.x/2.x/XL UNet" in result.error


# ------------------------------------------------------------------------------------ steering
@pytest.mark.parametrize("family", ["sd1", "sd2-v", "sdxl"])
def test_strength_zero_is_bit_identical_across_samplers_and_steps(comfy_env, pack, family):
    g = Graph()
    model = unet(g, family)
    positive, negative = sd_prompt(g, "dyed polyp", family), sd_prompt(g, "", family)
    latent = sd_latent(g)
    vector = load(g, write_vector(comfy_env, pack, f"unet/zero_{family}", family=family))
    window = {"layers": "input - output"}
    zero, full = steer(g, model, vector, strength=0.0, **window), steer(g, model, vector, **window)
    pairs = []
    for sampler_name in ("euler", "dpmpp_2m"):
        for steps in (2, 4):
            settings = {"sampler_name": sampler_name, "steps": steps}
            pairs.append(
                (
                    ksampler(g, zero, positive, negative, latent, **settings),
                    ksampler(g, model, positive, negative, latent, **settings),
                )
            )
    steered = ksampler(g, full, positive, negative, latent, steps=2)
    for node in [*(n for pair in pairs for n in pair), steered]:
        keep(g, node)
    result = comfy_env.run(g)
    assert result.success, result.error
    for zero_node, plain_node in pairs:
        assert torch.equal(result.output(zero_node.id)["samples"], result.output(plain_node.id)["samples"])
    assert not torch.equal(result.output(steered.id)["samples"], result.output(pairs[0][1].id)["samples"])


@pytest.mark.parametrize(
    ("family", "layers", "expected"),
    [
        ("sd1", "input 3 - output 0", ("input 3", "middle 0", "output 0")),
        ("sdxl", "input 5.1 - middle 0", ("input 5.1", "middle 0.0", "middle 0.1")),
    ],
)
def test_steering_changes_only_the_sites_in_the_window(comfy_env, pack, family, layers, expected):
    """Each site's raw output (its output projection's) against what the block receives."""
    model = pack.tiny_unet(family)
    sites = sites_of(comfy_env.core, model)
    steered = apply_steer(model, random_vector(comfy_env.core, sites, seed=5), layers=layers)
    attn2 = [m for n, m in model.model.diffusion_model.named_modules() if n.endswith("attn2")]
    raw, final = {i: [] for i in range(len(attn2))}, {i: [] for i in range(len(attn2))}
    handles = []
    for i, module in enumerate(attn2):
        handles.append(module.to_out[0].register_forward_hook(lambda m, a, out, i=i: raw[i].append(out.clone())))
        handles.append(module.register_forward_hook(lambda m, a, out, i=i: final[i].append(out.clone())))
    try:
        conds = pack.random_conditioning("polyp", 77, family), pack.random_conditioning("", 77, family)
        sample(steered, *conds, steps=2)
    finally:
        for handle in handles:
            handle.remove()
    changed = [i for i in raw if any(not torch.equal(r, f) for r, f in zip(raw[i], final[i], strict=True))]
    assert tuple(sites.names[i] for i in changed) == expected
    assert all(len(raw[i]) == 2 for i in raw)  # one batched [uncond, cond] call per step


def test_a_sampling_run_walks_the_unet_for_its_sites_once(comfy_env, pack, monkeypatch):
    """The wrapper finds the sites at a run's first model call and reuses them for the others
    (walking SDXL's modules costs about 1.6 ms a call); the next run finds them afresh, and the
    reuse changes no output."""
    steer_module = comfy_env.pack.nodes.apply_steer
    found, find = [], steer_module.find_sites
    # A spy: records each call, then runs the real find_sites.
    monkeypatch.setattr(steer_module, "find_sites", lambda model: found.append(model) or find(model))
    model = pack.tiny_unet("sdxl")
    vector = random_vector(comfy_env.core, sites_of(comfy_env.core, model), seed=5)
    steered = apply_steer(model, vector, layers="preset")
    conds = pack.random_conditioning("polyp", 77, "sdxl"), pack.random_conditioning("", 77, "sdxl")
    first = sample(steered, *conds, steps=4)  # 4 model calls (one CFG batch each)
    assert found == [model.model.diffusion_model]
    second = sample(steered, *conds, steps=4)
    assert len(found) == 2 and torch.equal(first, second)
    monkeypatch.undo()
    assert not torch.equal(first, sample(model, *conds, steps=4))  # every run was steered


def test_layers_by_name_equal_the_index_window_and_bad_names_list_the_blocks(comfy_env, pack):
    g = Graph()
    model = unet(g, "sd1")
    positive, negative, latent = sd_prompt(g, "polyp"), sd_prompt(g, ""), sd_latent(g)
    vector = load(g, write_vector(comfy_env, pack, "unet/names"))
    by_name = ksampler(g, steer(g, model, vector, layers="input 3-output 0"), positive, negative, latent)
    by_index = ksampler(g, steer(g, model, vector, layer_start=1, layer_end=4), positive, negative, latent)
    by_text = ksampler(g, steer(g, model, vector, layers="1-4"), positive, negative, latent)
    # 'preset': the engine's UNet preset, the coarsest level and below (here input 3 - output 1)
    by_preset = ksampler(g, steer(g, model, vector, layers="preset"), positive, negative, latent)
    preset_by_index = ksampler(g, steer(g, model, vector, layer_start=1, layer_end=5), positive, negative, latent)
    for node in (by_name, by_index, by_text, by_preset, preset_by_index):
        keep(g, node)
    result = comfy_env.run(g)
    assert result.success, result.error
    reference = result.output(by_index.id)["samples"]
    assert torch.equal(result.output(by_name.id)["samples"], reference)
    assert torch.equal(result.output(by_text.id)["samples"], reference)
    assert torch.equal(result.output(by_preset.id)["samples"], result.output(preset_by_index.id)["samples"])

    g = Graph()
    keep(g, steer(g, unet(g, "sd1"), load(g, "unet/names.safetensors"), layers="input 9"))
    bad = comfy_env.run(g)
    assert not bad.success and "input 9" in bad.error and "input 1, input 3, middle 0" in bad.error


def test_chained_edits_compose_like_the_cores_plans(comfy_env, pack):
    core = comfy_env.core
    g = Graph()
    model = unet(g, "sd1")
    positive, negative, latent = sd_prompt(g, "polyp"), sd_prompt(g, ""), sd_latent(g)
    first = steer(g, model, load(g, write_vector(comfy_env, pack, "unet/chain_a", seed=1)), layers="input 1 - middle 0")
    second = steer(
        g,
        first,
        load(g, write_vector(comfy_env, pack, "unet/chain_b", seed=2)),
        layers="middle 0 - output 3",
        strength=1.5,
    )
    chained, single = ksampler(g, second, positive, negative, latent), ksampler(g, first, positive, negative, latent)
    keep(g, chained)
    keep(g, single)
    result = comfy_env.run(g)
    assert result.success, result.error
    a, b = (core.load_vector(comfy_env.vector_dir / f"unet/chain_{k}.safetensors") for k in "ab")
    plans = [core.SteeringPlan(a, 2.5, 0, 3), core.SteeringPlan(b, 1.5, 2, 7)]
    conds = result.output(positive.id), result.output(negative.id)
    reference = core_sample(comfy_env, result.output(model.id), *conds, plans)
    assert torch.equal(result.output(chained.id)["samples"], reference)
    assert torch.equal(
        result.output(single.id)["samples"], core_sample(comfy_env, result.output(model.id), *conds, plans[:1])
    )
    assert not torch.equal(result.output(chained.id)["samples"], result.output(single.id)["samples"])


@pytest.mark.parametrize("tokens", [77, 5])  # 77: one [uncond, cond] batch per step; 5: separate calls
def test_cond_only_rows_and_cfg_1_match_the_core(comfy_env, pack, tokens):
    core = comfy_env.core
    g = Graph()
    model = unet(g, "sd1")
    positive, negative, latent = sd_prompt(g, "polyp"), sd_prompt(g, "", tokens=tokens), sd_latent(g)
    vector = load(g, write_vector(comfy_env, pack, "unet/rows", seed=3))
    cond_only = steer(g, model, vector, layers="input 1 - output 3", rows="cond only")
    both = steer(g, model, vector, layers="input 1 - output 3")
    runs = {
        (rows, cfg): ksampler(g, m, positive, negative, latent, cfg=cfg)
        for rows, m in (("cond", cond_only), ("all", both), ("none", model))
        for cfg in (5.0, 1.0)
    }
    for node in runs.values():
        keep(g, node)
    result = comfy_env.run(g)
    assert result.success, result.error
    out = {key: result.output(node.id)["samples"] for key, node in runs.items()}
    loaded = core.load_vector(comfy_env.vector_dir / "unet/rows.safetensors")
    conds = result.output(positive.id), result.output(negative.id)
    for cfg in (5.0, 1.0):
        reference = core_sample(
            comfy_env,
            result.output(model.id),
            *conds,
            [core.SteeringPlan(loaded, 2.5, 0, 7, rows="cond")],
            {"cfg": cfg},
        )
        assert torch.equal(out[("cond", cfg)], reference)
        assert not torch.equal(out[("cond", cfg)], out[("none", cfg)])
    assert not torch.equal(out[("cond", 5.0)], out[("all", 5.0)])  # the uncond rows are left alone
    assert torch.equal(out[("cond", 1.0)], out[("all", 1.0)])  # CFG 1: every row is conditional


def test_a_batch_of_two_is_steered_row_by_row_with_one_heatmap_each(comfy_env, pack):
    core = comfy_env.core
    g = Graph()
    model = unet(g, "sdxl")
    positive, negative = sd_prompt(g, "polyp", "sdxl"), sd_prompt(g, "", "sdxl")
    latent = sd_latent(g, batch=2)
    steered_model = steer(
        g, model, load(g, write_vector(comfy_env, pack, "unet/batch", "sdxl", 4)), layers="input 3 - output 3"
    )
    steered, plain = (
        ksampler(g, steered_model, positive, negative, latent),
        ksampler(g, model, positive, negative, latent),
    )
    grid = g.add(
        "GateHeatmap",
        model=steered_model,
        latent=steered,
        preset="custom (steps and layers below)",
        steps="all",
        layers="input 5, output 3",
        colormap="viridis",
        opacity=0.5,
        edit=-1,
    )
    for node in (steered, plain, grid):
        keep(g, node)
    result = comfy_env.run(g)
    assert result.success, result.error
    samples = result.output(steered.id)["samples"]
    vector = core.load_vector(comfy_env.vector_dir / "unet/batch.safetensors")
    conds = result.output(positive.id), result.output(negative.id)
    reference = core_sample(
        comfy_env, result.output(model.id), *conds, [core.SteeringPlan(vector, 2.5, 0, 11)], batch=2
    )
    assert torch.equal(samples, reference)
    assert all(not torch.equal(samples[b], result.output(plain.id)["samples"][b]) for b in range(2))
    assert result.output(grid.id, 0).shape[0] == 2 and result.output(grid.id, 1).shape == (2, 64, 96)


# ------------------------------------------------------------------------------- build, heatmap
WINDOWS = {"sd1": "input 3 - output 1", "sdxl": "input 3 - output 1.1"}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_build_save_load_apply_round_trip_keeps_ragged_widths(comfy_env, pack, family):
    g = Graph()
    model = unet(g, family)
    positive, negative, latent = sd_prompt(g, "dyed polyp", family), sd_prompt(g, "", family), sd_latent(g)
    build = g.add(
        "BuildPathologyVector",
        model=model,
        with_concept=positive,
        without_concept=sd_prompt(g, "polyp", family),
        uncond=negative,
        latent_image=sd_latent(g, batch=2),
        seed=10,
        num_seeds=2,
        steps=3,
        cfg=5.0,
        sampler_name="euler",
        scheduler="normal",
    )
    g.add("SavePathologyVector", pathology_vector=build, filename_prefix=f"unet/built_{family}")
    built_steer = ksampler(g, steer(g, model, build, layers=WINDOWS[family]), positive, negative, latent)
    keep(g, built_steer)
    result = comfy_env.run(g)
    assert result.success, result.error
    built = result.output(build.id)
    widths = sites_of(comfy_env.core, result.output(model.id)).widths
    assert built.widths == widths and len(set(widths)) == 2 and built.provenance.model_family == "sd-unet"

    g = Graph()
    model = unet(g, family)
    positive, negative, latent = sd_prompt(g, "dyed polyp", family), sd_prompt(g, "", family), sd_latent(g)
    loaded = load(g, f"unet/built_{family}_00001_.safetensors")
    loaded_steer = ksampler(g, steer(g, model, loaded, layers=WINDOWS[family]), positive, negative, latent)
    plain = ksampler(g, model, positive, negative, latent)
    keep(g, loaded_steer)
    keep(g, plain)
    again = comfy_env.run(g, fresh=True)
    assert again.success, again.error
    vector = again.output(loaded.id)
    assert vector.widths == widths and torch.equal(vector.directions, built.directions)
    assert all(float(vector.directions[:, i, w:].abs().sum()) == 0 for i, w in enumerate(vector.widths))
    steered = again.output(loaded_steer.id)["samples"]
    assert torch.equal(steered, result.output(built_steer.id)["samples"])
    assert not torch.equal(steered, again.output(plain.id)["samples"])


@pytest.mark.parametrize(("layers", "grid"), [("input 1 - output 3", LATENT), ("input 3 - output 1", (4, 6))])
def test_gate_heatmap_on_a_non_square_latent_upsamples_each_sites_grid(comfy_env, pack, layers, grid):
    g = Graph()
    model = unet(g, "sd1")
    positive, negative, latent = sd_prompt(g, "polyp"), sd_prompt(g, ""), sd_latent(g)
    steered_model = steer(g, model, load(g, write_vector(comfy_env, pack, "unet/heat", seed=6)), layers=layers)
    steered = ksampler(g, steered_model, positive, negative, latent, steps=4)
    common = {"preset": "custom (steps and layers below)", "colormap": "viridis", "opacity": 0.5, "edit": -1}
    by_name = g.add(
        "GateHeatmap", model=steered_model, latent=steered, steps="all", layers="middle, output 1", **common
    )
    image = g.add("EmptyImage", width=LATENT[1] * 8, height=LATENT[0] * 8, batch_size=1, color=0)
    overlays = g.add(
        "GateHeatmap", model=steered_model, latent=steered, image=image, steps="1,3", layers="mean", **common
    )
    keep(g, by_name)
    keep(g, overlays)
    result = comfy_env.run(g)
    assert result.success, result.error
    record = comfy_env.pack.nodes.apply_steer.steering_of(result.output(steered_model.id))
    gates = record.record_for(result.output(steered.id)["samples"]).maps()
    assert tuple(gates.maps.shape) == (4, 4 if grid == (4, 6) else 7, 1, *grid)
    picture, mask = result.output(by_name.id, 0), result.output(by_name.id, 1)
    assert picture.dim() == 4 and picture.shape[0] == 1 and mask.shape == (1, 64, 96)
    assert result.output(overlays.id, 0).shape == (2, 64, 96, 3)  # two steps x the layer mean
    figure = comfy_env.core.gate_figure
    sites = sites_of(comfy_env.core, result.output(model.id))
    assert figure.layer_indices(sites, "middle, output 1") == "2,4"
    assert figure.column_labels(sites, gates.layers, "2,4") == ["layer 2: middle 0", "layer 4: output 1"]


# ------------------------------------------------------------------------------- errors, inspect
def test_a_vector_of_another_family_is_refused_naming_both(comfy_env, pack):
    core = comfy_env.core
    sd1 = pack.tiny_unet("sd1", size="wide", device="meta")
    vector = random_vector(core, sites_of(core, sd1), seed=8)
    assert vector.provenance.model_family == "sd1"
    sdxl = pack.tiny_unet("sdxl", size="wide", device="meta")  # the same four 320-wide sites
    with pytest.raises(Exception, match="sd1") as error:
        apply_steer(sdxl, vector)
    assert "sdxl" in str(error.value)
    test_pack = comfy_env.booted.packs[str(TEST_PACK)]
    with pytest.raises(Exception, match="sd1") as error:
        apply_steer(test_pack.random_pixart(0, 48, 4, 2, 16), vector)
    assert "pixart" in str(error.value).lower()


def test_inspect_reports_the_site_names_of_the_connected_model(comfy_env, pack):
    g = Graph()
    vector = load(g, write_vector(comfy_env, pack, "unet/inspect"))
    named = g.add("InspectPathologyVector", pathology_vector=vector, model=unet(g, "sd1"), colormap="viridis")
    other = g.add("InspectPathologyVector", pathology_vector=vector, model=unet(g, "sdxl"), colormap="viridis")
    result = comfy_env.run(g)
    assert result.success, result.error
    text = result.output(named.id, 1)
    rows = [line.split() for line in text.splitlines()]
    for index, name in enumerate(TINY_SD_NAMES):  # each per-layer row: index, name, its grid, width
        grid = "64x64" if TINY_SD_WIDTHS[index] == 32 else "32x32"  # no size recorded: 512x512 px
        assert [str(index), *name.split(), grid, str(TINY_SD_WIDTHS[index])] in [
            r[: len(name.split()) + 3] for r in rows
        ]
    assert "does not fit this vector" in result.output(other.id, 1)


def test_tooltips_name_the_sites_of_the_released_unets(comfy_env):
    """The names the tooltips list are those of the full SD1.5 and SDXL UNets (built without weights)."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    shared = {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320, "legacy": False}
    shared["use_spatial_transformer"] = True
    sd15 = {
        **shared,
        **{"num_res_blocks": [2] * 4, "channel_mult": [1, 2, 4, 4], "context_dim": 768, "num_heads": 8},
        **{"transformer_depth": [1] * 6 + [0] * 2, "transformer_depth_middle": 1},
        "transformer_depth_output": [1] * 9 + [0] * 3,
    }
    sdxl = {
        **shared,
        **{"num_res_blocks": [2] * 3, "channel_mult": [1, 2, 4], "context_dim": 2048, "num_head_channels": 64},
        **{
            "transformer_depth": [0, 0, 2, 2, 10, 10],
            "transformer_depth_middle": 10,
            "use_linear_in_transformer": True,
        },
        **{
            "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
            "adm_in_channels": 2816,
            "num_classes": "sequential",
        },
    }
    schema = node_class("ApplySSPSSteer").GET_SCHEMA()
    tooltip = next(i.tooltip for i in schema.inputs if i.id == "layers")
    heatmap = next(i.tooltip for i in node_class("GateHeatmap").GET_SCHEMA().inputs if i.id == "layers")
    for config, depth in ((sd15, 16), (sdxl, 70)):
        with torch.device("meta"):
            unet_model = UNetModel(**config, device="meta", operations=comfy.ops.disable_weight_init)
        names = comfy_env.core.find_sites(unet_model).names
        assert len(names) == depth and (f"have {depth}" in tooltip or f"has {depth}" in tooltip)
        for text in (tooltip, heatmap):
            assert f"'{names[0]}'" in text and f"'{names[-1]}'" in text, names
    assert "'middle 0'" in tooltip and "'middle 0.0'" in tooltip
    for config, window in ((sd15, "'input 7 - output 5'"), (sdxl, "'input 7.0 - output 2.9'")):
        with torch.device("meta"):
            sites = comfy_env.core.find_sites(
                UNetModel(**config, device="meta", operations=comfy.ops.disable_weight_init)
            )
        start, end = sites.default_window
        assert window == f"'{sites.names[start]} - {sites.names[end - 1]}'" and window in tooltip
