"""Layer scan helpers: the profile formula and the calibration rule."""

from __future__ import annotations

import torch

from medsteer_core.scan import SweepRow, calibrate, layer_profile, prompts_for
from medsteer_core.vector import PathologyVector


def test_layer_profile_is_relative_difference():
    g = torch.Generator().manual_seed(0)
    k, layers, d = 3, 4, 8
    sum_with = torch.randn(k, layers, d, generator=g, dtype=torch.float64) * 2
    sum_without = torch.randn(k, layers, d, generator=g, dtype=torch.float64) * 2
    counts = torch.full((k,), 2, dtype=torch.int64)
    vector = PathologyVector.from_sums(torch.tensor([100.0, 500.0, 900.0]), sum_with, sum_without, counts, counts, {})
    mean_with, mean_without = sum_with / 2, sum_without / 2
    expected = ((mean_with - mean_without).norm(dim=-1) / ((mean_with + mean_without) / 2).norm(dim=-1)).mean(0)
    assert torch.allclose(torch.tensor(layer_profile(vector), dtype=torch.float64), expected, rtol=1e-5)


def _row(start, end, strength, flip=0.0, dye=1.0, psnr=30.0):
    return SweepRow(start, end, strength, flip, 0.0, flip, dye, psnr, 0.9)


def test_calibrate_prefers_removal_then_background():
    rows = [
        _row(0, 1, 1.0, dye=0.10, psnr=35.0),
        _row(0, 1, 2.0, dye=0.05, psnr=30.0),  # removes a little more, background worse: within 0.05
        _row(0, 6, 3.0, dye=0.50, psnr=40.0),  # keeps the dye: never chosen
    ]
    assert calibrate(rows, dye=True) == rows[0]
    rows = [_row(0, 1, 1.0, flip=0.3, psnr=50.0), _row(2, 3, 2.0, flip=0.9, psnr=25.0)]
    assert calibrate(rows, dye=False) == rows[1]


def test_prompts_cycle_templates_with_one_concept():
    prompts = prompts_for("dyed", range(10))
    assert len(set(prompts)) == 8 and prompts[0] == prompts[8]
    assert all("dyed lifted polyps" in p for p in prompts)
