"""Layer scan helpers: the profile formula and the calibration rule."""

from __future__ import annotations

import pytest
import torch

from medsteer_core.mini.scan import SweepRow, all_windows, calibrate, layer_profile, prompts_for, shortlist
from medsteer_core.vector import PathologyVector


def test_layer_profile_is_relative_difference():
    g = torch.Generator().manual_seed(0)
    k, layers, d = 3, 4, 8
    sum_with = torch.randn(k, layers, d, generator=g, dtype=torch.float64) * 2
    sum_without = torch.randn(k, layers, d, generator=g, dtype=torch.float64) * 2
    counts = torch.full((k,), 2, dtype=torch.int64)
    vector = PathologyVector.from_sums(torch.tensor([100.0, 500.0, 900.0]), sum_with, sum_without, counts, counts)
    mean_with, mean_without = sum_with / 2, sum_without / 2
    expected = ((mean_with - mean_without).norm(dim=-1) / ((mean_with + mean_without) / 2).norm(dim=-1)).mean(0)
    assert torch.allclose(torch.tensor(layer_profile(vector), dtype=torch.float64), expected, rtol=1e-5)


def _row(start, end, strength, flip=0.0, dye=1.0, psnr=30.0):
    return SweepRow(start, end, strength, flip, 0.0, flip, dye, psnr, 0.9)


def test_calibrate_takes_the_best_background_among_settings_that_remove_enough():
    rows = [
        _row(0, 1, 1.0, dye=0.10, psnr=35.0),  # removes in 90 %: eligible
        _row(0, 1, 2.0, dye=0.00, psnr=30.0),  # removes more, background worse
        _row(1, 4, 5.0, dye=0.12, psnr=36.0),  # eligible (88 %), best background: chosen
        _row(0, 6, 3.0, dye=0.50, psnr=40.0),  # keeps the dye: never chosen
    ]
    assert calibrate(rows, dye=True) == rows[2]
    assert calibrate(rows, dye=True, min_removal=0.95) == rows[1]
    rows = [_row(0, 1, 1.0, flip=0.3, psnr=50.0), _row(2, 3, 2.0, flip=0.9, psnr=25.0)]
    assert calibrate(rows, dye=False) == rows[1]


def test_calibrate_falls_back_to_most_removal_when_nothing_reaches_the_bar():
    rows = [
        _row(0, 1, 1.0, flip=0.5, psnr=40.0),
        _row(0, 2, 1.0, flip=0.6, psnr=30.0),
        _row(0, 3, 1.0, flip=0.58, psnr=33.0),
    ]
    assert calibrate(rows, dye=False) == rows[2]  # within 0.05 of the best removal, better background
    with pytest.raises(ValueError, match="at least one"):
        calibrate([], dye=False)


def test_shortlist_keeps_the_choice_first_then_near_misses_by_background():
    rows = [
        _row(0, 1, 1.0, flip=0.90, psnr=30.0),
        _row(0, 2, 1.0, flip=0.80, psnr=38.0),  # within the slack of 0.85: worth confirming
        _row(0, 3, 1.0, flip=0.70, psnr=45.0),  # too far below the bar
        _row(1, 2, 1.0, flip=0.95, psnr=32.0),
    ]
    picks = shortlist(rows, dye=False, count=3)
    assert picks == [rows[3], rows[1], rows[0]]
    assert shortlist(rows, dye=False, count=1) == [rows[3]]


def test_all_windows_are_every_contiguous_span():
    assert all_windows(3) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert len(all_windows(6)) == 21


def test_prompts_cycle_templates_with_one_concept():
    prompts = prompts_for("dyed", range(10))
    assert len(set(prompts)) == 8 and prompts[0] == prompts[8]
    assert all("dyed lifted polyps" in p for p in prompts)


def test_build_vector_writes_prompts_and_seeds_as_json():
    """Issue 11: the shipped vectors stored a Python repr and a comma list, which JSON readers missed."""

    from medsteer_core.mini import load_mini
    from medsteer_core.mini.scan import build_vector

    vector = build_vector(load_mini(), "dyed", "polyp", [3, 5])
    assert list(vector.provenance.seeds) == [3, 5]
    assert list(vector.provenance.prompts_with) == sorted(set(prompts_for("dyed", [3, 5])))
    assert list(vector.provenance.prompts_without) == sorted(set(prompts_for("polyp", [3, 5])))
    assert vector.provenance.model_family == "medsteer-mini"  # from the mini's registered backbone
