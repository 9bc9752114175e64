"""The plan module: ``SteeringPlan``, ``make_plan`` (host inputs to a validated plan),
``timestep_window`` and ``chain_plans``."""

import re

import pytest
import torch
from torch import nn

from medsteer_core import (
    MedSteerError,
    PathologyVector,
    SteeringPlan,
    UnsupportedModelError,
    VectorMismatchError,
    find_sites,
    save_vector,
    steering,
)
from medsteer_core.plan import ROW_OPTIONS, chain_plans, make_plan, timestep_window
from medsteer_core.provenance import Provenance
from tests.tiny_models import make_transformer


def make_vector(depth=4, hidden=16, keys=5, seed=0) -> PathologyVector:
    g = torch.Generator().manual_seed(seed)
    count = torch.full((keys,), 2, dtype=torch.int64)
    return PathologyVector.from_sums(
        torch.linspace(0, 999, keys),
        torch.randn(keys, depth, hidden, generator=g, dtype=torch.float64),
        torch.randn(keys, depth, hidden, generator=g, dtype=torch.float64),
        count,
        count.clone(),
        Provenance(concept_with="dye"),
    )


@pytest.fixture(scope="module")
def tiny():
    return make_transformer(num_layers=4, heads=2, head_dim=8)  # hidden 16


# ---------------------------------------------------------------------------------- windows
def test_whole_run_window_needs_no_mapping_and_covers_every_timestep():
    def never(_):
        raise AssertionError("not called for the whole run")

    assert timestep_window(0.0, 1.0, never) == (0.0, 1000.0)


def test_window_maps_percents_through_the_host():
    seen = []

    def to_timestep(p):
        seen.append(p)
        return 999.0 * (1 - p)

    low, high = timestep_window(0.25, 0.75, to_timestep)
    assert seen == [0.25, 0.75] and high == pytest.approx(749.25) and low == pytest.approx(249.75)
    assert timestep_window(0.5, 1.0, to_timestep) == (0.0, pytest.approx(499.5))


@pytest.mark.parametrize(
    ("start", "end", "words"),
    [
        (0.6, 0.4, "empty steering window"),
        (-0.1, 0.5, "between 0 and 1"),
        (0.0, 1.5, "between 0 and 1"),
        (1.0, 1.0, "contains no sampling step"),
        (0.0, 0.0, "contains no sampling step"),
        (float("nan"), 1.0, "between 0 and 1"),
    ],
)
def test_bad_windows_are_refused(start, end, words):
    with pytest.raises(ValueError, match=words):
        timestep_window(start, end, lambda p: 1000 * (1 - p))


# ---------------------------------------------------------------------------------- plans
def test_make_plan_maps_widgets_to_a_validated_plan(tiny):
    vector = make_vector()
    plan = make_plan(
        tiny,
        vector,
        strength=2.5,
        layer_start=1,
        layer_end=3,
        start_percent=0.5,
        end_percent=1.0,
        percent_to_timestep=lambda p: 999.0 * (1 - p),
        rows="cond only",
        preserve_norm=True,
        interpolation="linear",
    )
    assert plan == SteeringPlan(vector, 2.5, 1, 3, 499.5, 0.0, "cond", True, "linear")
    assert {ROW_OPTIONS[k] for k in ROW_OPTIONS} == {"all", "cond"}
    assert make_plan(tiny, vector, strength=0, layer_start=0, layer_end=4).rows == "all"


def test_plan_from_widgets_steers_like_a_hand_made_plan(tiny):
    vector = make_vector()
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 6, 32, generator=g)

    def call():
        with torch.no_grad():
            return tiny(
                x,
                encoder_hidden_states=context,
                timestep=torch.tensor([500.0, 500.0]),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                return_dict=False,
            )[0]

    outputs = []
    for plan in (SteeringPlan(vector, 2.0, 1, 3), make_plan(tiny, vector, strength=2.0, layer_start=1, layer_end=3)):
        with steering(tiny, plan, layout="cond"):
            outputs.append(call())
    assert torch.equal(*outputs) and not torch.equal(outputs[0], call())


@pytest.mark.parametrize(
    ("overrides", "error", "words"),
    [
        ({"layer_end": 9}, ValueError, "outside this model's 4 layers"),
        ({"layer_start": 2, "layer_end": 2}, ValueError, "empty or outside"),
        ({"layer_start": -1}, ValueError, "empty or outside"),
        ({"rows": "uncond only"}, ValueError, "rows must be one of"),
        ({"interpolation": "cubic"}, ValueError, "interpolation must be one of"),
        ({"strength": float("inf")}, ValueError, "finite"),
        ({"start_percent": 0.2}, ValueError, "needs percent_to_timestep"),
    ],
)
def test_make_plan_refuses_bad_inputs_with_the_fix(tiny, overrides, error, words):
    kwargs = {"strength": 2.5, "layer_start": 1, "layer_end": 3, **overrides}
    with pytest.raises(error, match=words):
        make_plan(tiny, make_vector(), **kwargs)


def test_make_plan_refuses_other_models_and_vectors(tiny):
    with pytest.raises(VectorMismatchError, match="hidden size 32 with 4 layers.*hidden size 16"):
        make_plan(tiny, make_vector(hidden=32), strength=2.5, layer_start=1, layer_end=3)
    with pytest.raises(UnsupportedModelError, match="PixArt"):
        make_plan(nn.Linear(4, 4), make_vector(), strength=2.5, layer_start=1, layer_end=3)
    with pytest.raises(TypeError, match="LoadPathologyVector"):
        make_plan(tiny, torch.zeros(4, 16), strength=2.5, layer_start=1, layer_end=3)


def test_chain_plans_appends_without_touching_the_upstream_plans(tiny):
    a = make_plan(tiny, make_vector(seed=1), strength=2.5, layer_start=0, layer_end=2)
    b = make_plan(tiny, make_vector(seed=2), strength=1.0, layer_start=1, layer_end=4)
    upstream = (a,)
    chained = chain_plans(upstream, b)
    assert chained == (a, b) and upstream == (a,)
    assert chain_plans([], a) == (a,)


# ---------------------------------------------------------------------------------- strength bound (issue 12 F7)
@pytest.mark.parametrize("strength", [1e30, 7e4, 1e300, -2e3])
def test_make_plan_refuses_strengths_that_overflow(strength):
    transformer = make_transformer()
    sites = find_sites(transformer)
    shape = (1, sites.depth, sites.hidden_size)
    vector = PathologyVector.from_sums(
        torch.tensor([500.0]), torch.randn(shape), torch.randn(shape), torch.ones(1), torch.ones(1)
    )
    with pytest.raises(MedSteerError, match=re.escape(f"at most 1000; got strength {strength!r}")):
        make_plan(transformer, vector, strength=strength, layer_start=0, layer_end=2)
    assert make_plan(transformer, vector, strength=-1e3, layer_start=0, layer_end=2).strength == -1e3


@pytest.mark.parametrize("strength", ["1e30", "1e300"])
def test_generate_refuses_an_overflowing_strength_before_writing(tmp_path, strength, capsys):
    """It wrote all-black PNGs and exited 0 (1e30), or raised a raw RuntimeError after creating --out."""
    from medsteer_core.backbones import find_sites as sites_of
    from medsteer_core.headless.cli import main
    from tests.tiny_models import save_tiny_pixart

    model = save_tiny_pixart(tmp_path / "model")
    from diffusers import PixArtTransformer2DModel

    sites = sites_of(PixArtTransformer2DModel.from_pretrained(str(model / "transformer")))
    g = torch.Generator().manual_seed(0)
    shape = (2, sites.depth, sites.hidden_size)
    vector = PathologyVector.from_sums(
        torch.tensor([100.0, 900.0]),
        torch.randn(shape, generator=g),
        torch.randn(shape, generator=g),
        torch.ones(2),
        torch.ones(2),
        Provenance(concept_with="polyps", concept_without="normal"),
    )
    path = save_vector(vector, tmp_path / "v.safetensors")
    out = tmp_path / "pairs"
    argv = ["generate", "-q", "--model", str(model), "--vector", str(path), "--prompt", "polyps"]
    argv += ["--layer-start", "0", "--layer-end", "2", "--steps", "2", "--strength", strength, "--out", str(out)]
    assert main(argv) == 2
    assert "strength must be finite with |strength x vector gain| at most 1000" in capsys.readouterr().err
    assert not out.exists()
