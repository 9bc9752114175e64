"""Gates: the named entries, explicit run boundaries (with the rising-timestep fallback), the one
selection grammar and the one mask definition."""

import pytest
import torch

from medsteer_core import MedSteerError, PathologyVector, SteeringPlan, steering
from medsteer_core.gates import (
    GateEntry,
    GateMaps,
    GateRecord,
    check_index_list,
    parse_layers,
    parse_steps,
    select_maps,
    selection_gate,
)
from tests.tiny_models import make_transformer


@pytest.fixture(scope="module")
def tiny():
    return make_transformer(num_layers=4, heads=2, head_dim=8)  # hidden 16, 8x8 latent -> 4x4 tokens


@pytest.fixture(scope="module")
def plan():
    g = torch.Generator().manual_seed(3)
    shape = (2, 4, 16)
    vector = PathologyVector.from_sums(
        torch.tensor([0.0, 999.0]),
        torch.randn(shape, generator=g, dtype=torch.float64),
        torch.randn(shape, generator=g, dtype=torch.float64),
        torch.full((2,), 2, dtype=torch.int64),
        torch.full((2,), 2, dtype=torch.int64),
    )
    return SteeringPlan(vector, 2.5, 1, 3)


def _sample(tiny, plan, record, timesteps):
    """One model call per timestep, steered and recorded (every row conditional)."""
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 6, 32, generator=g)
    with steering(tiny, plan, layout="cond", record=record), torch.no_grad():
        for t in timesteps:
            tiny(
                x,
                encoder_hidden_states=context,
                timestep=torch.tensor([float(t)] * 2),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                return_dict=False,
            )


# ---------------------------------------------------------------------------------- entries
def test_entries_are_named(tiny, plan):
    record = GateRecord()
    _sample(tiny, plan, record, [700])
    assert len(record) == 2 and all(isinstance(e, GateEntry) for e in record.entries)
    first = record.entries[0]
    assert (first.call, first.site, first.plan, first.grid) == (1, 1, 0, (4, 4))
    assert first.gate.shape == (2, 16) and first.timestep == 700.0 and first.token_grid() == (4, 4)
    with pytest.raises(AttributeError):
        first.site = 2  # frozen


# ---------------------------------------------------------------------------------- runs
def test_explicit_runs_keep_a_run_whose_timesteps_rise_whole(tiny, plan):
    """A sampler that adds noise back (restart-type) goes up in timestep inside one run: the old
    rule cut it in two; the host's begin_run / end_run keep it one run."""
    timesteps = [900, 500, 800, 100]
    fallback = GateRecord()
    _sample(tiny, plan, fallback, timesteps)
    assert fallback.runs() == 2  # the rising-timestep rule (still used without explicit runs)
    record = GateRecord()
    record.begin_run()
    _sample(tiny, plan, record, timesteps)
    record.end_run()
    assert record.runs() == 1
    assert record.maps().timesteps.tolist() == [float(t) for t in timesteps]


def test_explicit_runs_split_runs_that_keep_falling(tiny, plan):
    """A second run starting below the first one's last timestep (img2img at low denoise after a
    full run) was merged by the old rule; explicit boundaries split it."""
    merged = GateRecord()
    _sample(tiny, plan, merged, [900, 500])
    _sample(tiny, plan, merged, [400, 100])
    assert merged.runs() == 1
    record = GateRecord()
    for timesteps in ([900, 500], [400, 100]):
        record.begin_run()
        _sample(tiny, plan, record, timesteps)
        record.end_run()
    assert record.runs() == 2
    assert record.maps(run=0).timesteps.tolist() == [900.0, 500.0]
    assert record.maps().timesteps.tolist() == [400.0, 100.0]
    # calls after the explicit runs fall back to the timestep rule, as their own runs
    _sample(tiny, plan, record, [300, 200, 600])
    assert record.runs() == 4 and record.maps().timesteps.tolist() == [600.0]
    record.clear()
    assert len(record) == 0 and record.runs() == 0


def test_begin_run_closes_a_run_left_open(tiny, plan):
    record = GateRecord()
    record.begin_run()
    _sample(tiny, plan, record, [900])
    record.begin_run()
    _sample(tiny, plan, record, [950])
    record.end_run()
    record.end_run()  # a second end is a no-op
    assert record.runs() == 2 and record.maps(run=0).timesteps.tolist() == [900.0]


# ---------------------------------------------------------------------------------- grammar
@pytest.mark.parametrize("text", ["all", "last", "8,12,14,19", " 0 ; 3 ", "2-5", "-1", "0,-1", "1-3,7"])
def test_step_lists_accepted_by_the_syntax_check_parse_in_range(text):
    check_index_list(text, "step")
    assert parse_steps(text, 20)


@pytest.mark.parametrize("text", ["", ",", "8,x", "1.5", "5-3", "3-3", "a-b", "8,,?"])
def test_unreadable_step_lists_are_refused_before_sampling(text):
    with pytest.raises(ValueError, match="step"):
        check_index_list(text, "step")


def test_layer_lists_accept_mean_and_ranges():
    for text in ("mean", "all", "8", "8-16", "8,10"):
        check_index_list(text, "layer", words=("mean", "all"))
    assert parse_layers("8-10", list(range(8, 16))) == [8, 9]


# ---------------------------------------------------------------------------------- mask
def test_the_mask_gate_is_the_mean_over_the_chosen_steps_and_layers():
    maps = torch.zeros(3, 2, 1, 2, 2)
    maps[0, 0, 0, 0, 0] = 4.0  # an early step's broad gate ...
    maps[2, 1, 0, 1, 1] = 2.0  # ... and the last step's sparse patch
    gates = GateMaps(torch.tensor([900.0, 500.0, 100.0]), (1, 2), maps)
    chosen, _, _ = select_maps(gates, "all", "1,2")
    expected = torch.tensor([[4.0, 0.0], [0.0, 2.0]]) / 6
    assert torch.allclose(selection_gate(chosen), expected)
    last, _, _ = select_maps(gates, "last", "1,2")  # the last step's mask is one selection away
    assert torch.allclose(selection_gate(last), torch.tensor([[0.0, 0.0], [0.0, 1.0]]))
    with pytest.raises(MedSteerError, match=r"\[steps, layers, h, w\]"):
        selection_gate(chosen[0])
