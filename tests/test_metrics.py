"""Counterfactual metrics, checked against the formulas and against the generator's ground truth."""

from __future__ import annotations

import math

import pytest
import torch

from medsteer_core.mini import synthetic
from medsteer_core.mini.metrics import PSNR_CAP, background_mask, masked_psnr, masked_ssim, score_pairs
from tests._mini import shipped_oracle


@pytest.fixture()
def oracle():
    return shipped_oracle()


def test_masked_psnr_matches_formula_and_ignores_masked_out_pixels():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 8, 8, generator=g)
    b = a.clone()
    b[0, :, :4] += 0.1  # changed only in the top half of image 0
    b[1, :, 4:] = 1.0  # image 1 changed only in the bottom half
    top = torch.zeros(2, 8, 8, dtype=torch.bool)
    top[:, :4] = True
    psnr = masked_psnr(a, b, top)
    assert math.isclose(float(psnr[0]), 10 * math.log10(1 / 0.01), rel_tol=1e-4)
    assert math.isinf(float(psnr[1]))  # identical where scored
    assert math.isnan(float(masked_psnr(a, b, torch.zeros_like(top))[0]))


def test_masked_ssim_is_one_for_identical_and_lower_for_noise():
    a = synthetic.render(0, "normal").image[None]
    mask = torch.ones(1, 32, 32, dtype=torch.bool)
    assert math.isclose(float(masked_ssim(a, a, mask)[0]), 1.0, rel_tol=1e-5)
    noisy = (a + 0.1 * torch.randn(a.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert float(masked_ssim(a, noisy, mask)[0]) < 0.8


def test_background_mask_dilates_and_respects_fov():
    m = torch.zeros(1, 7, 7, dtype=torch.bool)
    m[0, 3, 3] = True
    keep = background_mask(m, dilate=1)
    assert int((~keep).sum()) == 9
    fov = torch.zeros(7, 7, dtype=torch.bool)
    fov[:, :2] = True
    assert int(background_mask(m, fov=fov, dilate=0).sum()) == 14


def test_ground_truth_counterfactuals_score_perfectly(oracle):
    """The generator's own pairs (same seed, concept removed) flip and keep the background exactly."""
    seeds = range(40, 48)
    dyed = torch.stack([synthetic.render(s, "dyed").image for s in seeds])
    polyp = torch.stack([synthetic.render(s, "polyp").image for s in seeds])
    normal = torch.stack([synthetic.render(s, "normal").image for s in seeds])
    scores = score_pairs(oracle, dyed, polyp, source=2, target=1)
    assert scores.flip_rate == 1.0 and scores.dye_detection == 0.0
    assert scores.bg_psnr == PSNR_CAP and math.isclose(scores.bg_ssim, 1.0, rel_tol=1e-5)
    scores = score_pairs(oracle, polyp, normal, source=1, target=0)
    assert scores.flip_rate == 1.0 and scores.source_removed == 1.0 and scores.delta_p > 0.9
    # A different background (another seed) is what re-rolling looks like: PSNR drops.
    other = torch.stack([synthetic.render(s + 100, "normal").image for s in seeds])
    assert score_pairs(oracle, polyp, other, source=1, target=0).bg_psnr < 30


def test_effective_background_counts_only_the_pairs_whose_edit_succeeded(oracle):
    """Half the 'edits' are the unchanged source image: they keep the background perfectly but did
    not edit anything. The plain mean counts them; the effective mean does not."""
    seeds = range(60, 68)
    polyp = torch.stack([synthetic.render(s, "polyp").image for s in seeds])
    rerolled = torch.stack([synthetic.render(s + 100, "normal").image for s in seeds])
    edits = torch.cat([polyp[:4], rerolled[4:]])  # 4 failed (still polyps), 4 flipped but re-rolled
    scores = score_pairs(oracle, polyp, edits, source=1, target=0)
    honest = score_pairs(oracle, polyp[4:], rerolled[4:], source=1, target=0)
    assert scores.succeeded == 4 and scores.flip_rate == 0.5
    assert scores.bg_psnr > honest.bg_psnr + 10  # flattered by the failures (60 dB each)
    assert math.isclose(scores.effective_bg_psnr, honest.bg_psnr, rel_tol=1e-6)
    assert math.isclose(scores.effective_bg_ssim, honest.bg_ssim, rel_tol=1e-6)
    # For a dye edit, success is "no dye left": the unchanged dyed images do not count.
    dyed = torch.stack([synthetic.render(s, "dyed").image for s in seeds])
    half = torch.cat([dyed[:4], polyp[4:]])
    dye = score_pairs(oracle, dyed, half, source=2, target=1, dye_edit=True)
    assert dye.succeeded == 4 and dye.effective_bg_psnr == PSNR_CAP
    nothing = score_pairs(oracle, polyp, polyp, source=1, target=0)
    assert nothing.succeeded == 0 and math.isnan(nothing.effective_bg_psnr)
