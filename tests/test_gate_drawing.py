"""Heatmap rendering: colormaps, grids, overlays, masks, and step/layer selection."""

import re

import pytest
import torch

from medsteer_core import MedSteerError
from medsteer_core.gate_drawing import (
    COLORMAPS,
    apply_colormap,
    gate_grid,
    normalise,
    overlay,
    selection_mask,
    to_mask,
)
from medsteer_core.gates import MAX_INDEX, GateMaps, index_entries, parse_layers, parse_steps, select_maps


def _gates(steps=20, layers=(8, 9, 10), batch=1, side=4):
    maps = torch.zeros(steps, len(layers), batch, side, side)
    for s in range(steps):
        maps[s, :, :, s % side, (s // side) % side] = s + 1.0  # one hot token per step
    return GateMaps(torch.linspace(999, 0, steps), tuple(layers), maps)


@pytest.mark.parametrize("name", ["viridis", "magma", "cividis"])
def test_perceptual_colormaps_increase_monotonically_in_lightness(name):
    colours = apply_colormap(torch.linspace(0, 1, 64), name)
    luminance = colours @ torch.tensor([0.2126, 0.7152, 0.0722])
    assert (luminance[1:] >= luminance[:-1] - 1e-3).all()
    assert colours.shape == (64, 3) and colours.min() >= 0 and colours.max() <= 1


def test_unknown_colormap_is_refused():
    with pytest.raises(ValueError, match="choose one of"):
        apply_colormap(torch.zeros(2, 2), "jet")
    assert "gray" in COLORMAPS


def test_normalise_and_mask():
    maps = torch.tensor([[[0.0, 2.0], [1.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]])
    n = normalise(maps)
    assert torch.equal(n[0], torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    assert torch.equal(n[1], torch.zeros(2, 2))
    mask = to_mask(maps[0], (8, 8))
    assert mask.shape == (8, 8) and float(mask.max()) == 1.0 and float(mask.min()) >= 0
    assert mask[-1, -1] > mask[0, 0]


def test_overlay_blends_only_where_the_model_steered():
    image = torch.full((16, 16, 3), 0.5)
    gate = torch.zeros(4, 4)
    gate[0, 0] = 3.0
    out = overlay(image, gate, opacity=1.0, colormap="gray")
    assert torch.allclose(out[-1, -1], image[-1, -1])  # no gate there: the image shows through
    assert not torch.allclose(out[0, 0], image[0, 0])
    assert torch.equal(overlay(image, gate, opacity=0.0), image)
    with pytest.raises(ValueError, match="opacity"):
        overlay(image, gate, opacity=2.0)


def test_step_and_layer_parsing():
    assert parse_steps("all", 5) == [0, 1, 2, 3, 4]
    assert parse_steps("8,12,14,19", 20) == [8, 12, 14, 19]
    assert parse_steps("-1", 20) == [19] and parse_steps("last", 20) == [19]
    with pytest.raises(ValueError, match="step 20 is out of range: this run has 20 steps"):
        parse_steps("8,20", 20)
    with pytest.raises(ValueError, match="cannot read step 'x'"):
        parse_steps("8,x", 20)
    assert parse_layers("mean", (8, 9)) == "mean"
    assert parse_layers("8-10", (8, 9, 10)) == [8, 9]
    with pytest.raises(ValueError, match=r"layer\(s\) \[3\] were not steered"):
        parse_layers("3", (8, 9))


def test_paper_figure_three_selection_and_grid():
    gates = _gates()
    maps, rows, cols = select_maps(gates, "8,12,14,19", "8")
    assert maps.shape == (4, 1, 4, 4)
    assert torch.equal(maps[0, 0], gates.maps[8, 0, 0])
    assert rows[0].startswith("step 8") and cols == ["layer 8"]
    image = gate_grid(maps, rows, cols, cell=32)
    assert image.ndim == 3 and image.shape[2] == 3 and image.min() >= 0 and image.max() <= 1
    assert image.shape[0] >= 4 * 32 and image.shape[1] >= 32
    mean, _, labels = select_maps(gates, "all", "mean")
    assert mean.shape == (20, 1, 4, 4) and "mean" in labels[0]
    assert torch.allclose(mean[:, 0], gates.maps[:, :, 0].mean(1))


# ---------------------------------------------------------------------------------- huge ranges (issue 12 F6)
def _peak_bytes(fn) -> tuple[BaseException | None, int]:
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
        error = None
    except BaseException as exc:  # noqa: BLE001 - returned for the test to inspect
        error = exc
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return error, peak


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: parse_steps("0-9000", 20), r"step range 0-9000 is out of range: this run has 20 steps"),
        (lambda: parse_steps("5,2-10000", 20), r"step range 2-10000 is out of range"),
        (lambda: parse_layers("8-9000", (8, 9, 10)), r"layer range 8-9000 is out of range"),
        (lambda: parse_steps("0-3000000", 20), r"step '3000000' in '0-3000000' is beyond any run"),
        (lambda: parse_steps("0-1000000000", 20), r"step '1000000000' in '0-1000000000' is beyond any run"),
        (lambda: parse_steps("9" * 5000, 20), r"step '9999.*' \(5000 characters\) .* is beyond any run"),
    ],
)
def test_a_huge_range_is_refused_without_expanding_it(call, message):
    """The old parser built the whole list first (9000 steps: ~0.3 MB; 3e6: ~100 MB; 1e8: 4 GB)."""
    error, peak = _peak_bytes(call)
    assert isinstance(error, MedSteerError), error
    assert re.search(message, str(error)), str(error)
    assert peak < 100_000, f"{peak} bytes allocated while parsing"


def test_ranges_still_expand_within_the_run():
    assert parse_steps("2-5,19", 20) == [2, 3, 4, 19]
    assert parse_steps(" 0 - 3 ; -1", 20) == [0, 1, 2, 19]
    assert parse_steps("0-20", 20) == list(range(20))
    assert parse_layers("8-11", (8, 9, 10)) == [8, 9, 10]
    with pytest.raises(MedSteerError, match="step range '5-5' is empty"):
        parse_steps("5-5", 20)
    with pytest.raises(MedSteerError, match=r"cannot read step '\+3'"):
        parse_steps("+3", 20)
    assert index_entries("8-16,3,-1", "layer") == [range(8, 16), 3, -1]
    assert index_entries(f"0-{MAX_INDEX}", "step") == [range(0, MAX_INDEX)]


def test_the_headless_host_draws_steps_as_rows_and_the_shared_mask():
    """`medsteer heatmap` / `generate --heatmaps` drew layers as rows and GateHeatmap steps as rows;
    both now draw rows = steps, columns = layers, and use the one mask (``selection_mask``)."""
    import numpy as np
    from PIL import Image

    from medsteer_core import find_sites
    from medsteer_core.headless.figures import _pair_heatmap
    from tests.tiny_models import make_transformer

    gates = _gates(steps=5, layers=(8, 9))
    picture = Image.new("RGB", (16, 16))
    sites = find_sites(make_transformer(num_layers=10))  # a PixArt: columns labelled "layer 8", ...
    grid, mask = _pair_heatmap(gates, 0, "0,2,4", "8,9", "viridis", picture, sites)
    maps, rows, cols = select_maps(gates, "0,2,4", "8,9")
    expected = gate_grid(maps, rows, cols, colormap="viridis")  # what GateHeatmap draws
    assert grid.size == (expected.shape[1], expected.shape[0]) and grid.height > grid.width  # 3 rows, 2 columns
    assert np.array_equal(np.asarray(grid), (expected.numpy() * 255).round().astype("uint8"))
    shared = (selection_mask(maps, (16, 16)).numpy() * 255).round().astype("uint8")
    assert np.array_equal(np.asarray(mask), shared)
