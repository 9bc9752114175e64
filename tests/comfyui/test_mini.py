"""MedSteer-mini inside real ComfyUI (issue 11): the loader node, its parity with the library's
model, the shipped vectors, and the method's effect measured through ComfyUI's own executor.

The effect test runs the ``medsteer_quickstart_mini`` template (converted to an API prompt the way
the frontend queues it) over held-out seeds fixed before it first ran, adds a re-prompting sampler
on the same seed, and scores the three images with the shipped oracle.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from comfy_boot import Graph
from test_workflows import ui_to_api

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "example_workflows" / "medsteer_quickstart_mini.json"
DYE_PROMPT = "an endoscopic image of dyed lifted polyps"
POLYP_PROMPT = "an endoscopic image of polyps"

#: Held-out seeds for the ComfyUI route, fixed on 2026-12-01 before the test first ran: disjoint from
#: the vector seeds (0-39), the calibration seeds (800000-800063) and the library's bar seeds
#: (950000-950031). Never tuned: if the bar fails on them, the failure is the result.
COMFY_SEEDS = [970_000 + i for i in range(24)]


@pytest.fixture(scope="module")
def classes(comfy_env):
    import nodes

    if "EmptyChromaRadianceLatentImage" not in nodes.NODE_CLASS_MAPPINGS:  # built-in extras
        asyncio.run(nodes.init_builtin_extra_nodes())
    return nodes.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def library_mini(comfy_env):
    return comfy_env.core.mini.load_mini()


@pytest.fixture(scope="module")
def loaded(comfy_env):
    """(MODEL, CLIP, VAE) from the node, executed directly."""
    return comfy_env.pack.nodes.mini.LoadMedSteerMini.execute().args


def test_loader_model_matches_the_library_transformer(loaded, library_mini):
    """ComfyUI's PixArt blocks with the mini's weights compute what the diffusers model computes
    (the padded, masked captions of the library vs the unpadded ones ComfyUI gets)."""
    model, clip, _ = loaded
    embeds, mask = library_mini.encode(DYE_PROMPT)
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(DYE_PROMPT))[0][0]
    assert cond.shape == (1, int(mask.sum()), 64)
    torch.testing.assert_close(cond[0], embeds[0, : cond.shape[1]], atol=1e-5, rtol=1e-5)

    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999.0, 480.0, 19.0])
    with torch.no_grad():
        reference = library_mini.transformer(
            x,
            encoder_hidden_states=embeds.repeat(3, 1, 1),
            encoder_attention_mask=mask.repeat(3, 1),
            timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
        )[0]
        ours = model.model.diffusion_model(x, t, context=cond.repeat(3, 1, 1))
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)


def test_loader_model_is_steerable_and_pixel_space(comfy_env, loaded):
    model, _, vae = loaded
    sites = comfy_env.pack.nodes.common.model_sites(model)
    assert (sites.depth, sites.widths, sites.token_grid(5, (32, 48))) == (6, (128,) * 6, (8, 12))
    assert (sites.pixel_scale, sites.latent_channels) == (1, 3)
    assert comfy_env.pack.nodes.common.model_sites(model).family == "medsteer-mini"
    assert model.model.model_type.name == "V_PREDICTION"
    image = torch.rand(1, 32, 32, 3)
    latent = vae.encode(image)
    assert latent.shape == (1, 3, 32, 32)
    torch.testing.assert_close(vae.decode(latent), image, atol=1e-6, rtol=0)


def test_shipped_vectors_are_listed(comfy_env):
    import folder_paths

    listed = folder_paths.get_filename_list("medsteer")
    for name in ("dye_removal", "polyp_to_normal", "colitis_to_normal"):
        assert f"{name}.safetensors" in listed
    # models/medsteer stays first: that is where SavePathologyVector writes.
    assert Path(folder_paths.get_folder_paths("medsteer")[0]) == comfy_env.vector_dir


def mini_pair(seed: int, strength: float, sampler: str = "ddim", steps: int = 20, batch: int = 1):
    g = Graph()
    mini = g.add("LoadMedSteerMini")
    positive = g.add("CLIPTextEncode", clip=mini[1], text=DYE_PROMPT)
    negative = g.add("CLIPTextEncode", clip=mini[1], text="")
    vector = g.add("LoadPathologyVector", vector_name="dye_removal.safetensors")
    latent = g.add("EmptyChromaRadianceLatentImage", width=32, height=32, batch_size=batch)
    return (
        g,
        *steered_and_plain(g, mini[0], vector[0], strength, (1, 4), (positive, negative, latent), seed, sampler, steps),
    )


def steered_and_plain(g, model, vector, strength: float, window: tuple[int, int], conditioning, seed, sampler, steps):
    """An ApplySSPSSteer on ``model`` and two KSamplers on one seed (steered, unsteered); both minis' pair graphs."""
    positive, negative, latent = conditioning
    steer = g.add(
        "ApplySSPSSteer",
        model=model,
        pathology_vector=vector,
        strength=strength,
        layer_start=window[0],
        layer_end=window[1],
        start_percent=0.0,
        end_percent=1.0,
        rows="cond and uncond",
        preserve_norm=False,
        interpolation="nearest",
    )
    settings = {
        "seed": seed,
        "steps": steps,
        "cfg": 2.0,
        "sampler_name": sampler,
        "scheduler": "simple",
        "denoise": 1.0,
    }
    steered = g.add(
        "KSampler", model=steer[0], positive=positive[0], negative=negative[0], latent_image=latent[0], **settings
    )
    plain = g.add(
        "KSampler", model=model, positive=positive[0], negative=negative[0], latent_image=latent[0], **settings
    )
    g.add("MedSteerTestKeep", value=steered[0])
    g.add("MedSteerTestKeep", value=plain[0])
    return steered, plain


@pytest.mark.parametrize(("sampler", "steps", "batch"), [("ddim", 20, 1), ("euler_ancestral", 7, 2), ("heun", 4, 1)])
def test_strength_zero_is_bit_identical_to_unsteered(comfy_env, classes, sampler, steps, batch):
    g, steered, plain = mini_pair(971_000, 0.0, sampler, steps, batch)
    result = comfy_env.run(g)
    assert result.success, result.error
    a, b = result.output(steered.id)["samples"], result.output(plain.id)["samples"]
    assert a.shape == (batch, 3, 32, 32)
    assert torch.equal(a, b)


def test_other_sizes_sample_and_broken_patches_get_a_clear_error(comfy_env, classes):
    g, steered, _ = mini_pair(971_000, 1.0)
    latent_id = next(i for i, n in g.prompt.items() if n["class_type"] == "EmptyChromaRadianceLatentImage")
    g.prompt[latent_id]["inputs"].update(width=48, height=32)  # whole patches: the embedding extends
    result = comfy_env.run(g)
    assert result.success, result.error
    assert result.output(steered.id)["samples"].shape == (1, 3, 32, 48)

    # 30x30 px (through the pixel-space VAE) is not a whole number of 4 px patches.
    mini_id = next(i for i, n in g.prompt.items() if n["class_type"] == "LoadMedSteerMini")
    g.prompt["90"] = {"class_type": "EmptyImage", "inputs": {"width": 30, "height": 30, "batch_size": 1, "color": 0}}
    g.prompt["91"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["90", 0], "vae": [mini_id, 2]}}
    for node in g.prompt.values():
        if node["class_type"] == "KSampler":
            node["inputs"]["latent_image"] = ["91", 0]
    result = comfy_env.run(g)
    assert not result.success
    assert "multiples of 4" in result.error and "30x30" in result.error


def quickstart_prompt(classes) -> tuple[dict, dict[str, str]]:
    """The template as the frontend queues it, plus its node ids by title."""
    prompt = ui_to_api(json.loads(QUICKSTART.read_text()), classes)
    by_title = {node["_meta"]["title"]: node_id for node_id, node in prompt.items()}
    return prompt, by_title


def test_quickstart_template_runs_and_shows_pair_heatmap_and_mask(comfy_env, classes):
    prompt, ids = quickstart_prompt(classes)
    result = comfy_env.run(prompt)
    assert result.success, result.error
    previews = {prompt[i]["_meta"]["title"]: result.ui[i]["images"] for i in result.ui if "images" in result.ui[i]}
    assert set(previews) == {
        "Counterfactual pair: unsteered | steered",
        "Gate heatmap (last step, layers 1-3)",
        "Gate MASK on the unsteered image",
    }
    pair = result.output(ids["unsteered | steered"])
    assert pair.shape == (1, 32, 66, 3)  # unsteered | 2 px spacing | steered
    steered, unsteered = result.output(ids["Decode steered"]), result.output(ids["Decode unsteered"])
    assert not torch.equal(steered, unsteered)
    torch.testing.assert_close(pair[:, :, :32], unsteered, atol=1 / 255, rtol=0)  # ImageStitch rounds
    torch.testing.assert_close(pair[:, :, 34:], steered, atol=1 / 255, rtol=0)
    heatmap_node = ids["Where the model steered"]
    mask = result.output(heatmap_node, 1)
    assert mask.shape == (1, 32, 32) and float(mask.max()) > 0  # the model did steer somewhere
    painted = result.output(ids["Gate MASK in red on the unsteered image"])
    assert painted.shape == (1, 32, 32, 3)


def score_dye_removal(originals, steered, reprompted):
    """``(had_dye, steered scores, re-prompting scores)`` of ``[B, 3, H, W]`` images by the shipped oracle."""
    from medsteer_core.mini import metrics, oracle, synthetic

    judge = oracle.load_oracle()
    dyed, polyp = synthetic.CLASSES.index("dyed"), synthetic.CLASSES.index("polyp")
    ours = metrics.score_pairs(judge, originals, steered, dyed, polyp, dye_edit=True)
    baseline = metrics.score_pairs(judge, originals, reprompted, dyed, polyp, dye_edit=True)
    return float(judge.read(originals).dye_detected.float().mean()), ours, baseline


def score_quickstart(comfy_env, prompt: dict, ids: dict, seeds: list[int], label: str):
    """``(had dye, steered scores, re-prompted scores)`` of a quickstart graph over ``seeds``, with a
    re-prompting sampler added on the same seed (both minis' ComfyUI-route effect tests)."""
    steered_sampler, plain_sampler = ids["Steered sampler"], ids["Unsteered sampler"]
    # Re-prompting: the same sampler settings and seed with the without-concept prompt.
    clip = prompt[ids["Prompt (with the concept)"]]["inputs"]["clip"]
    prompt["900"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": POLYP_PROMPT}}
    prompt["901"] = {"class_type": "KSampler", "inputs": {**prompt[plain_sampler]["inputs"], "positive": ["900", 0]}}
    prompt["902"] = {
        "class_type": "VAEDecode",
        "inputs": {"samples": ["901", 0], "vae": prompt[ids["Decode steered"]]["inputs"]["vae"]},
    }
    prompt["903"] = {"class_type": "PreviewImage", "inputs": {"images": ["902", 0]}}
    images = {"unsteered": [], "steered": [], "reprompted": []}
    for seed in seeds:
        for sampler in (steered_sampler, plain_sampler, "901"):
            prompt[sampler]["inputs"]["seed"] = seed
        result = comfy_env.run(prompt)
        assert result.success, result.error
        images["steered"].append(result.output(ids["Decode steered"]))
        images["unsteered"].append(result.output(ids["Decode unsteered"]))
        images["reprompted"].append(result.output("902"))
    # IMAGE [B, H, W, 3] -> the oracle's [B, 3, H, W]
    as_batch = {k: torch.cat(v).permute(0, 3, 1, 2).contiguous() for k, v in images.items()}
    had_dye, ours, baseline = score_dye_removal(as_batch["unsteered"], as_batch["steered"], as_batch["reprompted"])
    print(f"\n{label}, {len(seeds)} held-out seeds: had dye {had_dye:.3f}; steered {ours}; re-prompted {baseline}")
    return had_dye, ours, baseline


@pytest.fixture(scope="module")
def quickstart_scores(comfy_env, classes):
    """The template over COMFY_SEEDS, with a re-prompting sampler added on the same seed."""
    prompt, ids = quickstart_prompt(classes)
    return score_quickstart(comfy_env, prompt, ids, COMFY_SEEDS, "ComfyUI route")


def test_quickstart_removes_dye_on_held_out_seeds(quickstart_scores):
    """Issue 11's bar through ComfyUI's executor: dye removed in >= 80 % of the held-out seeds."""
    had_dye, ours, _ = quickstart_scores
    assert had_dye >= 0.8  # there was dye to remove
    assert 1 - ours.dye_detection >= 0.8, ours


def test_quickstart_background_beats_reprompting(quickstart_scores):
    """...and the steered image keeps the background better than re-prompting the same seed."""
    _, ours, baseline = quickstart_scores
    assert ours.bg_psnr > baseline.bg_psnr, (ours, baseline)


def test_comfyui_route_agrees_with_the_library_route(quickstart_scores):
    """The README's side-by-side table: the library route on the same seeds and prompt. The two routes
    differ only in how clipping enters the sampler (see README), so removal rates agree closely."""
    from medsteer_core import SteeringPlan, load_vector
    from medsteer_core import mini as library

    model = library.load_mini()
    vector = load_vector(library.VECTOR_DIR / "dye_removal.safetensors")
    plan = SteeringPlan(vector, strength=5.25, layer_start=1, layer_end=4)
    source = [DYE_PROMPT] * len(COMFY_SEEDS)
    originals = model.generate(source, COMFY_SEEDS)
    steered = model.generate(source, COMFY_SEEDS, plans=[plan])
    reprompted = model.generate([POLYP_PROMPT] * len(COMFY_SEEDS), COMFY_SEEDS)
    _, ours, baseline = score_dye_removal(originals, steered, reprompted)
    print(f"\nlibrary route, same seeds: steered {ours}; re-prompted {baseline}")
    _, comfy_ours, _ = quickstart_scores
    assert 1 - ours.dye_detection >= 0.8 and ours.bg_psnr > baseline.bg_psnr, (ours, baseline)
    assert abs(ours.dye_detection - comfy_ours.dye_detection) <= 0.125, (ours, comfy_ours)
