"""The engine on UNets (issue 10): capture -> estimate -> save/load (ragged widths) -> steer -> gates.

Tiny random diffusers UNets (``tests/tiny_models.py``), called directly with the hooks reading each
call's latents and timesteps (``layout=``), and once through ``driver.sample``.
"""

from __future__ import annotations

import pytest
import torch

from medsteer_core import GateRecord, SteeringPlan, VectorEstimator, capture, find_sites, load_vector, save_vector
from medsteer_core import steering as steering_context
from medsteer_core.provenance import Provenance
from tests.tiny_models import CONTEXT, make_unet, unet_kwargs


@pytest.fixture(scope="module")
def unet():
    return make_unet("sdxl")


def _call(unet, latents, t, context, seed=0):
    with torch.no_grad():
        return unet(latents, t, context, **unet_kwargs(unet, latents.shape[0])).sample


def _inputs(batch=2, size=(6, 10), seed=0, guided=True):
    """``(latents, timesteps, context)`` for ``batch`` images, ``[uncond, cond]`` rows when guided."""
    g = torch.Generator().manual_seed(seed)
    rows = 2 * batch if guided else batch
    latents = torch.randn(batch, 4, *size, generator=g)
    latents = torch.cat([latents, latents]) if guided else latents
    return latents, torch.full((rows,), 600.0), torch.randn(rows, 5, CONTEXT, generator=g)


def _vector(unet, keys=(300.0, 600.0, 900.0)):
    """A vector estimated from the tiny UNet: 'with' and 'without' prompts at three timesteps."""
    estimator = VectorEstimator.for_model(unet)
    for label, seed in (("with", 1), ("without", 2)):
        with capture(unet, estimator, label, layout="uncond_cond"):
            for t in keys:
                latents, _, context = _inputs(batch=2, seed=seed)
                _call(unet, latents, torch.full((4,), t), context)
    return estimator.result(Provenance(concept_with="dye", concept_without="", model_family="sd-unet"))


@pytest.fixture(scope="module")
def vector(unet):
    return _vector(unet)


def test_capture_estimates_a_ragged_vector_that_survives_save_and_load(unet, vector, tmp_path):
    sites = find_sites(unet)
    assert vector.widths == sites.widths and vector.ragged and vector.depth == sites.depth
    assert vector.timesteps.tolist() == [300.0, 600.0, 900.0]
    # zero beyond each site's width, unit-ish directions within it
    for i, w in enumerate(vector.widths):
        assert torch.all(vector.directions[:, i, w:] == 0) and torch.all(vector.directions[:, i, :w].norm(dim=-1) > 0)
    path = tmp_path / "v.safetensors"
    save_vector(vector, path)
    loaded = load_vector(path)
    assert loaded.widths == vector.widths and torch.equal(loaded.directions, vector.directions)
    assert loaded.provenance.model_family == "sd-unet"


def _site_outputs(unet, run):
    """``(result, outputs, own)`` of ``run()``: every site's output, and what the site's own forward
    gives for the same inputs (recomputed without any hook), so ``outputs[i] != own[i]`` exactly
    where a hook edited site ``i``."""
    sites = find_sites(unet)
    outputs, own = {}, {}

    def note(module, args, kwargs, output, index):
        outputs[index] = output.detach().clone()
        own[index] = type(module).forward(module, *args, **kwargs).detach()

    handles = [
        m.register_forward_hook(lambda mod, a, k, out, i=i: note(mod, a, k, out, i), with_kwargs=True)
        for i, m in enumerate(sites.modules)
    ]
    try:
        with torch.no_grad():
            result = run()
    finally:
        for h in handles:
            h.remove()
    return result, outputs, own


def test_strength_zero_is_bit_identical_and_the_context_restores(unet, vector):
    latents, t, context = _inputs()
    plain = _call(unet, latents, t, context)
    with steering_context(unet, SteeringPlan(vector, strength=0.0, layer_start=0, layer_end=find_sites(unet).depth)):
        zero = _call(unet, latents, t, context)
    with steering_context(unet, SteeringPlan(vector, strength=3.0, layer_start=0, layer_end=4)):
        steered = _call(unet, latents, t, context)
    assert torch.equal(zero, plain) and not torch.equal(steered, plain)
    assert torch.equal(_call(unet, latents, t, context), plain)


def test_only_sites_in_the_window_are_changed(unet, vector):
    sites = find_sites(unet)
    start, end = sites.resolve_layers("input 8 - output 0")
    assert (start, end) == (4, 10)
    latents, t, context = _inputs(seed=1)  # the 'with' prompt: its tokens project onto the vector
    plan = SteeringPlan(vector, strength=4.0, layer_start=start, layer_end=end)
    plain, plain_sites, _ = _site_outputs(unet, lambda: _call(unet, latents, t, context))
    with steering_context(unet, plan):
        steered, steered_sites, own = _site_outputs(unet, lambda: _call(unet, latents, t, context))
    for i in range(sites.depth):
        edited = not torch.equal(steered_sites[i], own[i])
        assert edited == (start <= i < end), f"site {i} ({sites.names[i]})"
    for i in range(start):  # upstream of the window nothing moved at all
        assert torch.equal(steered_sites[i], plain_sites[i])
    assert not torch.equal(steered, plain)


def test_cond_rows_only_batch_of_three(unet, vector):
    sites = find_sites(unet)
    latents, t, context = _inputs(batch=3, seed=1)
    plan = SteeringPlan(vector, strength=4.0, layer_start=0, layer_end=sites.depth, rows="cond")
    with steering_context(unet, plan):
        _, steered, own = _site_outputs(unet, lambda: _call(unet, latents, t, context))
    edited = {(i, r) for i in range(sites.depth) for r in range(6) if not torch.equal(steered[i][r], own[i][r])}
    assert {r for _, r in edited} == {3, 4, 5}  # every conditional row, never an unconditional one
    assert {i for i, _ in edited} == set(range(sites.depth))


def test_cfg_one_layout_steers_every_row_and_records_gates_per_site_grid(unet, vector):
    sites = find_sites(unet)
    latents, t, context = _inputs(batch=2, size=(5, 7), seed=1, guided=False)
    record = GateRecord()
    plan = SteeringPlan(vector, strength=2.0, layer_start=1, layer_end=8)
    plain = _call(unet, latents, t, context)
    record.begin_run()
    with steering_context(unet, plan, layout="cond", record=record):
        for step_t in (900.0, 600.0, 300.0):
            steered = _call(unet, latents, torch.full((2,), step_t), context)
    record.end_run()
    assert not torch.equal(steered, plain)
    gates = record.maps()
    assert gates.layers == tuple(range(1, 8)) and gates.timesteps.tolist() == [900.0, 600.0, 300.0]
    finest = max((sites.token_grid(i, (5, 7)) for i in range(1, 8)), key=lambda g: g[0] * g[1])
    assert gates.maps.shape == (3, 7, 2, *finest) and finest == (3, 4)
    assert gates.grids == tuple(sites.token_grid(i, (5, 7)) for i in range(1, 8))
    assert len(set(gates.grids)) == 2  # two resolution levels in this window
    assert bool((gates.maps >= 0).all()) and bool((gates.maps > 0).any())


def test_driver_samples_a_unet_steered_and_unsteered(vector):
    from diffusers import EulerDiscreteScheduler

    from medsteer_core.driver import SamplingSpec, sample

    unet = make_unet("sd1")
    vector = _vector(unet)
    spec = SamplingSpec(steps=3, cfg=4.0, height=6, width=6)
    g = torch.Generator().manual_seed(3)
    cond, uncond = torch.randn(1, 5, CONTEXT, generator=g), torch.randn(1, 5, CONTEXT, generator=g)

    def run(plans=(), record=None):
        return sample(
            unet, EulerDiscreteScheduler(), cond, [1, 2], spec, negative_embeds=uncond, plans=plans, record=record
        )

    plain = run()
    assert torch.equal(run([SteeringPlan(vector, strength=0.0, layer_start=0, layer_end=11)]), plain)
    record = GateRecord()
    steered = run([SteeringPlan(vector, strength=3.0, layer_start=4, layer_end=8)], record)
    assert steered.shape == plain.shape == (2, 4, 6, 6) and not torch.equal(steered, plain)
    assert record.maps().maps.shape[:3] == (3, 4, 2)


def test_heatmap_mask_and_figure_at_a_non_square_size(unet, vector):
    """The mask is the mean over steps and layers of each site's gates upsampled bilinearly from
    its own grid to the finest one; the figure and overlays come out at the image's aspect."""
    from medsteer_core.gate_drawing import gate_grid, overlay, selection_mask
    from medsteer_core.gates import select_maps

    sites = find_sites(unet)
    latents, _, context = _inputs(batch=1, size=(5, 7), seed=1, guided=False)
    record = GateRecord()
    record.begin_run()
    with steering_context(
        unet, SteeringPlan(vector, strength=2.0, layer_start=0, layer_end=6), layout="cond", record=record
    ):
        for step_t in (900.0, 300.0):
            _call(unet, latents, torch.full((1,), step_t), context)
    record.end_run()
    gates = record.maps()
    assert gates.grids == ((3, 4), (3, 4), (2, 2), (2, 2), (2, 2), (2, 2))
    maps, step_labels, layer_labels = select_maps(gates, "all", "mean")
    assert maps.shape == (2, 1, 3, 4) and len(step_labels) == 2 and len(layer_labels) == 1
    expected = torch.zeros(3, 4)
    for entry in record.entries:  # longhand: own grid -> bilinear to 3x4 -> mean over 2 steps x 6 sites
        own = entry.gate.float().reshape(1, 1, *sites.token_grid(entry.site, (5, 7)))
        expected += torch.nn.functional.interpolate(own, size=(3, 4), mode="bilinear", align_corners=False)[0, 0]
    assert torch.allclose(maps.mean(dim=(0, 1)), expected / 12, atol=1e-6)
    mask = selection_mask(maps, (40, 56))
    assert mask.shape == (40, 56) and float(mask.min()) >= 0 and float(mask.max()) == pytest.approx(1.0)
    per_site, _, labels = select_maps(gates, "all", "0-6")
    figure = gate_grid(per_site, step_labels, labels, cell=30)
    assert figure.shape[-1] == 3 and figure.shape[1] > figure.shape[0]  # 6 columns of 3x4 cells, 2 rows
    assert overlay(torch.zeros(40, 56, 3), per_site[0, 2]).shape == (40, 56, 3)
