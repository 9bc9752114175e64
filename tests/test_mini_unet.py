"""MedSteer-mini-UNet (issue 10, item 5): the shipped UNet renders every class and steers with its
shipped, calibrated vectors on held-out seeds, judged by the same oracle as MedSteer-mini."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from medsteer_core.backbones import find_sites
from medsteer_core.mini import load_mini, synthetic
from medsteer_core.mini.demo import DENOISERS, EDITS, setting_of
from medsteer_core.mini.metrics import score_pairs
from medsteer_core.mini.mini_unet import DEFAULT_UNET_PATH
from medsteer_core.mini.scan import ISSUE_BAR, prompts_for
from medsteer_core.plan import SteeringPlan
from medsteer_core.provenance import site_widths
from medsteer_core.vector_file import load_vector
from tests._mini import shipped_oracle

UNET = DENOISERS["unet"]
NAMES = ("input 3", "input 5", "middle 0", "output 0", "output 1", "output 2", "output 3")
WIDTHS = (64, 96, 96, 96, 96, 64, 64)
#: Held-out seeds of the bar: the ones tests/test_mini.py checks MedSteer-mini's bar on, fixed
#: before the UNet was calibrated (disjoint from the vector seeds 0-39, the calibration seeds
#: 800000+ and the demo's 900000+).
BAR_SEEDS = [950_000 + i for i in range(32)]


@functools.lru_cache(maxsize=1)
def shipped_unet():
    return load_mini(DEFAULT_UNET_PATH)


@pytest.fixture(scope="module")
def by_class():
    """The unsteered images of every class on BAR_SEEDS (the rendering check, each edit's originals
    and its re-prompting baseline: the same seeds and caption templates)."""
    unet = shipped_unet()
    return {name: unet.generate(prompts_for(name, BAR_SEEDS), BAR_SEEDS) for name in synthetic.CLASSES}


def test_shipped_unet_is_a_small_ragged_unet_of_its_own_family():
    unet = shipped_unet()
    sites = find_sites(unet.transformer)
    assert type(unet.transformer).__name__ == "UNet2DConditionModel"
    assert (sites.family, sites.host, sites.names, sites.widths) == ("medsteer-mini-unet", "diffusers", NAMES, WIDTHS)
    grids = [sites.token_grid(i, (32, 32)) for i in range(sites.depth)]
    assert grids == [(16, 16), (8, 8), (8, 8), (8, 8), (8, 8), (16, 16), (16, 16)]  # two token grids
    assert (sites.latent_channels, sites.pixel_scale) == (3, 1)  # pixel space, as MedSteer-mini
    assert int(unet.metadata["trained_steps"]) > 0
    assert DEFAULT_UNET_PATH.stat().st_size <= 20 * 2**20  # issue 10: 20 MB or less


def test_shipped_unet_renders_every_class(by_class):
    """Rendering rate by the oracle >= 0.8 for every class (the precondition of every edit)."""
    oracle = shipped_oracle()
    for c, name in enumerate(synthetic.CLASSES):
        rate = float((oracle.read(by_class[name]).labels == c).float().mean())
        assert rate >= 0.8, f"{name}: rendering rate {rate}"


def test_strength_zero_pair_is_identical():
    unet = shipped_unet()
    vector = load_vector(EDITS[0].shipped_path(UNET.vector_dir, UNET.prefix))
    seeds = BAR_SEEDS[:2]
    prompts = prompts_for("dyed", seeds)
    plain = unet.generate(prompts, seeds)
    zero = unet.generate(prompts, seeds, plans=[SteeringPlan(vector, strength=0.0, layer_start=0, layer_end=7)])
    assert torch.equal(plain, zero)


@pytest.mark.parametrize("edit", EDITS, ids=lambda e: e.name)
def test_every_edit_ships_a_calibrated_unet_vector(edit):
    """Calibrated by the written rule (its record in the metadata), for this family and these
    weights, with the UNet's ragged widths."""
    vector = load_vector(edit.shipped_path(UNET.vector_dir, UNET.prefix))
    assert vector.provenance.model_family == "medsteer-mini-unet"
    assert vector.widths == WIDTHS and vector.ragged
    vector.check_compatible(site_widths(find_sites(shipped_unet().transformer)))
    vector.check_weights(find_sites(shipped_unet().transformer))
    start, end, strength = setting_of(vector)
    assert 0 <= start < end <= 7 and strength > 0
    record = json.loads(vector.provenance.extra["calibration"])
    chosen = record["chosen"]
    assert (chosen["layer_start"], chosen["layer_end"], chosen["strength"]) == (start, end, strength)
    # The shipped record (commit 715163c): the rule on a reduced grid, confirmed on 32 calibration seeds.
    assert record["seeds"] == "800000..800031" and record["site_names"] == list(NAMES)
    assert record["bar"] == ISSUE_BAR[edit.name]
    met = removal_of(chosen, edit) >= record["bar"] and chosen["bg_psnr"] >= record["reprompting"]["bg_psnr"]
    assert record["meets_issue_bar"] is met
    assert (
        vector.provenance.extra["class_with"] == edit.source and vector.provenance.extra["class_without"] == edit.target
    )


def removal_of(row: dict, edit) -> float:
    return 1 - row["dye_detection"] if edit.dye else row["flip_rate"]


def score_shipped_edit(edit, by_class):
    """``(ours, re-prompting)``: the scores of the edit's shipped setting and of re-prompting on BAR_SEEDS."""
    vector = load_vector(edit.shipped_path(UNET.vector_dir, UNET.prefix))
    start, end, strength = setting_of(vector)
    plan = SteeringPlan(vector, strength=strength, layer_start=start, layer_end=end)
    steered = shipped_unet().generate(prompts_for(edit.source, BAR_SEEDS), BAR_SEEDS, plans=[plan])
    s, t = synthetic.CLASSES.index(edit.source), synthetic.CLASSES.index(edit.target)
    oracle, originals = shipped_oracle(), by_class[edit.source]
    ours = score_pairs(oracle, originals, steered, s, t, dye_edit=edit.dye)
    return ours, score_pairs(oracle, originals, by_class[edit.target], s, t, dye_edit=edit.dye)


#: Whether each shipped setting met issue 10's bar on BAR_SEEDS, from one run when the vectors
#: shipped (2026-12-01; not chosen, and the test fails if a result moves either way). Every edit
#: removes enough (dye gone 32/32, polyp flipped 32/32, colitis 30/32) but none keeps the background
#: better than re-prompting the same seeds: Bg-PSNR 39.32 vs 39.45 dB (dye), 37.82 vs 38.08
#: (polyp), 38.93 vs 39.21 (colitis). The calibration seeds said the same for dye removal (39.57
#: vs 39.88) and a small win for the lesion edits (+0.23 and +0.72 dB), which does not hold out of
#: sample.
MEETS_BAR_ON_HELD_OUT = {"dye_removal": False, "polyp_to_normal": False, "colitis_to_normal": False}


@pytest.mark.parametrize("edit", EDITS, ids=lambda e: e.name)
def test_shipped_unet_vectors_on_held_out_seeds(edit, by_class):
    """Issue 10's bar on held-out seeds: dye removal >= 0.85, polyp -> normal >= 0.8 (colitis as
    polyp), with a background PSNR at least re-prompting's on the same seeds. The removal half
    holds for every edit; whether the whole bar holds is the recorded MEETS_BAR_ON_HELD_OUT."""
    ours, baseline = score_shipped_edit(edit, by_class)
    removed = 1 - ours.dye_detection if edit.dye else ours.flip_rate
    assert removed >= ISSUE_BAR[edit.name], (edit.name, ours)  # the concept goes
    met = removed >= ISSUE_BAR[edit.name] and ours.bg_psnr >= baseline.bg_psnr
    assert met is MEETS_BAR_ON_HELD_OUT[edit.name], (edit.name, removed, ours.bg_psnr, baseline.bg_psnr)
    if edit.dye:  # there was dye to remove
        assert float(shipped_oracle().read(by_class["dyed"]).dye_detected.float().mean()) >= 0.8
