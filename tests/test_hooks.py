"""Steering hooks on a tiny random-weight diffusers PixArt: exactness, windows, composition, cleanup."""

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from medsteer_core import (
    GateRecord,
    MedSteerError,
    SteeringPlan,
    VectorEstimator,
    VectorMismatchError,
    find_sites,
    steering,
)
from medsteer_core.driver import SamplingSpec, sample
from medsteer_core.hooks import CallInfo
from medsteer_core.plan import MAX_STRENGTH
from medsteer_core.provenance import Provenance
from tests.tiny_models import make_transformer

SPEC = SamplingSpec(steps=4, cfg=4.0, height=8, width=8)


@pytest.fixture(scope="module")
def vector(transformer, embeds):
    est = VectorEstimator.for_model(transformer)
    for label in ("with", "without"):
        sample(
            transformer,
            DPMSolverMultistepScheduler(),
            embeds[label],
            [0, 1],
            SPEC,
            negative_embeds=embeds["uncond"],
            estimator=est,
            label=label,
        )
    return est.result(Provenance(concept_with="with", concept_without="without"))


def run(transformer, embeds, plans=(), scheduler=None, seeds=(7,), spec=SPEC, record=None):
    return sample(
        transformer,
        scheduler or DPMSolverMultistepScheduler(),
        embeds["with"],
        list(seeds),
        spec,
        negative_embeds=embeds["uncond"],
        plans=plans,
        record=record,
    )


def no_hooks_left(transformer):
    modules = [transformer, *find_sites(transformer).modules]
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in modules)


def test_strength_zero_is_bit_identical_to_unsteered(transformer, embeds, vector):
    base = run(transformer, embeds)
    for preserve in (False, True):
        steered = run(transformer, embeds, [SteeringPlan(vector, 0.0, 0, 4, preserve_norm=preserve)])
        assert torch.equal(steered, base)
    assert not torch.equal(run(transformer, embeds, [SteeringPlan(vector, 2.5, 0, 4)]), base)


def direct_call(transformer, embeds, t=500.0, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.cat([embeds["uncond"], embeds["with"]])
    return transformer(
        x,
        encoder_hidden_states=ctx,
        timestep=torch.tensor([t, t]),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )[0]


def test_leaving_the_context_removes_hooks_and_restores_outputs(transformer, embeds, vector):
    before = direct_call(transformer, embeds)
    plan = SteeringPlan(vector, 2.5, 1, 3)
    with steering(transformer, plan, layout="uncond_cond"):
        inside = direct_call(transformer, embeds)
    assert not torch.equal(inside, before)
    assert no_hooks_left(transformer)
    assert torch.equal(direct_call(transformer, embeds), before)
    with pytest.raises(RuntimeError, match="boom"), steering(transformer, plan, layout="uncond_cond"):
        raise RuntimeError("boom")
    assert no_hooks_left(transformer)
    assert torch.equal(direct_call(transformer, embeds), before)


def test_failure_while_attaching_leaves_nothing_behind(transformer, vector):
    bad = SteeringPlan(vector, 2.5, 2, 9)
    with (
        pytest.raises(ValueError, match="outside this model's 4 layers"),
        steering(transformer, [SteeringPlan(vector, 1.0, 0, 2), bad]),
    ):
        pass
    assert no_hooks_left(transformer)


def test_nested_contexts_remove_only_their_own_hooks(transformer, embeds, vector):
    outer_plan, inner_plan = SteeringPlan(vector, 1.0, 0, 2), SteeringPlan(vector, 2.0, 2, 4)
    with steering(transformer, outer_plan, layout="uncond_cond"):
        outer_only = direct_call(transformer, embeds)
        with steering(transformer, inner_plan, layout="uncond_cond"):
            both = direct_call(transformer, embeds)
        assert torch.equal(direct_call(transformer, embeds), outer_only)
    with steering(transformer, [outer_plan, inner_plan], layout="uncond_cond"):
        assert torch.equal(direct_call(transformer, embeds), both)
    assert no_hooks_left(transformer)


def _site_io(transformer, call):
    """Inputs and outputs of every site during ``call()`` (plain forward hooks; the test's own recorder)."""
    seen = {}

    def recorder(i):
        def hook(module, args, kwargs, out):
            # returns None: the output is left as it is
            seen.setdefault(i, (args[0].clone(), out.clone(), kwargs))

        return hook

    handles = [
        m.register_forward_hook(recorder(i), with_kwargs=True) for i, m in enumerate(find_sites(transformer).modules)
    ]
    try:
        call()
    finally:
        for h in handles:
            h.remove()
    return seen


def test_only_sites_inside_the_window_change(embeds, vector):
    transformer = make_transformer(num_layers=4)
    # The reverse edit: on this random model every token at site 1 is negatively aligned with
    # `vector` at this timestep, so `vector` itself would (correctly) leave site 1 alone.
    plan = SteeringPlan(-vector, 2.5, 1, 3)
    unsteered = _site_io(transformer, lambda: direct_call(transformer, embeds))
    with steering(transformer, plan, layout="uncond_cond"):
        steered = _site_io(transformer, lambda: direct_call(transformer, embeds))
    # Site 0 (before the window): sees and emits exactly what it would unsteered.
    assert torch.equal(steered[0][0], unsteered[0][0]) and torch.equal(steered[0][1], unsteered[0][1])
    # Site 1 sees the same input, but its output is steered.
    assert torch.equal(steered[1][0], unsteered[1][0]) and not torch.equal(steered[1][1], unsteered[1][1])
    assert not torch.equal(steered[2][1], unsteered[2][1])
    # Site 3 (after the window): its hook leaves its own output alone - output is the module's
    # plain function of the (changed) input.
    sites = find_sites(transformer)
    x3, out3, kwargs3 = steered[3]
    assert not torch.equal(x3, unsteered[3][0])
    with torch.no_grad():
        assert torch.equal(out3, sites.modules[3](x3, **kwargs3))


def _longhand_reference(transformer, vector, alpha, start, end, rows="all"):
    """Steering written out with plain hooks: timestep from the call, nearest key, the paper's formula."""
    state = {}
    sites = find_sites(transformer)

    def pre(mod, args, kwargs):
        state["t"] = kwargs["timestep"]

    def make(i):
        def hook(mod, args, out):
            new = out.clone()
            for b in range(out.shape[0]):
                if rows == "cond" and b < out.shape[0] // 2:
                    continue
                t = float(state["t"][b])
                k = int(torch.argmin((vector.timesteps - t).abs()))
                v = vector.directions[k, i]
                sigma = (out[b] @ v).clamp_min(0)
                new[b] = out[b] - alpha * sigma[:, None] * v[None, :]
            return new

        return hook

    handles = [transformer.register_forward_pre_hook(pre, with_kwargs=True)]
    handles += [sites.modules[i].register_forward_hook(make(i)) for i in range(start, end)]
    return handles


@pytest.mark.parametrize("rows", ["all", "cond"])
@pytest.mark.parametrize(
    "scheduler_cls, steps", [(DPMSolverMultistepScheduler, 4), (DDIMScheduler, 7), (EulerDiscreteScheduler, 3)]
)
def test_parity_with_longhand_on_other_schedulers_and_step_counts(
    transformer, embeds, vector, scheduler_cls, steps, rows
):
    """A vector built with DPM-Solver/4 steps steers runs with other schedulers and step counts by
    timestep lookup; the result equals the formula written out longhand."""
    spec = SamplingSpec(steps=steps, cfg=4.0, height=8, width=8)
    ours = run(transformer, embeds, [SteeringPlan(vector, 2.5, 1, 3, rows=rows)], scheduler_cls(), spec=spec)
    handles = _longhand_reference(transformer, vector, 2.5, 1, 3, rows)
    try:
        reference = run(transformer, embeds, (), scheduler_cls(), spec=spec)
    finally:
        for h in handles:
            h.remove()
    unsteered = run(transformer, embeds, (), scheduler_cls(), spec=spec)
    assert not torch.allclose(ours, unsteered, atol=1e-3)
    # Same math in another order of float operations: equal up to float32 rounding of the scale.
    assert (ours - reference).abs().max() <= 1e-4 * reference.abs().max()


def test_scaling_the_vector_equals_scaling_the_strength(transformer, embeds, vector):
    a = run(transformer, embeds, [SteeringPlan(vector * 2.0, 1.25, 0, 4)])
    b = run(transformer, embeds, [SteeringPlan(vector, 2.5, 0, 4)])
    assert torch.equal(a, b)


def test_plans_compose_in_order(transformer, embeds, vector):
    p1, p2 = SteeringPlan(vector, 1.5, 0, 3), SteeringPlan(-vector, 1.0, 1, 4)
    composed = run(transformer, embeds, [p1, p2])
    swapped = run(transformer, embeds, [p2, p1])
    single = run(transformer, embeds, [p1])
    assert not torch.equal(composed, single)
    assert not torch.allclose(composed, swapped)


def test_rows_cond_leaves_the_unconditional_half_alone(transformer, embeds, vector):
    plan = SteeringPlan(vector, 2.5, 0, 4, rows="cond")
    plain = _site_io(transformer, lambda: direct_call(transformer, embeds))
    with steering(transformer, plan, layout="uncond_cond"):
        steered = _site_io(transformer, lambda: direct_call(transformer, embeds))
    # The recorder was registered after our hook, so it sees the steered output.
    for i in range(4):
        assert torch.equal(steered[i][1][0], plain[i][1][0])
    assert not torch.equal(steered[0][1][1], plain[0][1][1])


def test_timestep_window_outside_the_run_changes_nothing(transformer, embeds, vector):
    base = run(transformer, embeds)
    late_only = SteeringPlan(vector, 2.5, 0, 4, timestep_min=0.0, timestep_max=300.0)
    early_only = SteeringPlan(vector, 2.5, 0, 4, timestep_min=300.0, timestep_max=1000.0)
    assert not torch.equal(run(transformer, embeds, [late_only]), base)
    assert not torch.equal(
        run(transformer, embeds, [early_only]), run(transformer, embeds, [SteeringPlan(vector, 2.5, 0, 4)])
    )
    none = SteeringPlan(vector, 2.5, 0, 4, timestep_min=1000.0, timestep_max=1000.0)
    assert torch.equal(run(transformer, embeds, [none]), base)
    with pytest.raises(ValueError, match="empty timestep window"):
        run(transformer, embeds, [SteeringPlan(vector, 2.5, 0, 4, timestep_min=500, timestep_max=100)])


def test_explicit_call_info_equals_reading_the_call(transformer, embeds, vector):
    plan = SteeringPlan(vector, 2.5, 0, 4)
    with steering(transformer, plan, layout="uncond_cond"):
        auto = direct_call(transformer, embeds, t=420.0)
    info = CallInfo(torch.tensor([420.0, 420.0]), (False, True), (4, 4))
    with steering(transformer, plan, call_info=info):
        explicit = direct_call(transformer, embeds, t=420.0)
    info_comfy = CallInfo.from_layout(torch.tensor(420.0), 2, "comfyui", (4, 4), cond_or_uncond=[1, 0])
    with steering(transformer, plan, call_info=info_comfy):
        comfy = direct_call(transformer, embeds, t=420.0)
    assert torch.equal(auto, explicit) and torch.equal(auto, comfy)


def test_gate_record_matches_the_gate_longhand(transformer, embeds, vector):
    record = GateRecord()
    plan = SteeringPlan(vector, 2.5, 1, 3)
    plain = _site_io(transformer, lambda: direct_call(transformer, embeds, t=600.0))
    with steering(transformer, plan, layout="uncond_cond", record=record):
        direct_call(transformer, embeds, t=600.0)
    gates = record.maps()
    assert gates.maps.shape == (1, 2, 1, 4, 4) and gates.layers == (1, 2)
    # Layer 1 sees the unsteered input, so its gate is the longhand gate of the unsteered output.
    h_cond = plain[1][1][1]
    v = vector.at(600.0)[1]
    assert torch.allclose(gates.maps[0, 0, 0].reshape(-1), (h_cond @ v).clamp_min(0), atol=1e-6)
    assert float(gates.timesteps[0]) == 600.0


def test_gate_record_splits_runs_and_counts_steps(transformer, embeds, vector):
    record = GateRecord()
    run(transformer, embeds, [SteeringPlan(vector, 2.5, 2, 4)], seeds=(1, 2), record=record)
    run(transformer, embeds, [SteeringPlan(vector, 2.5, 2, 4)], seeds=(1, 2), record=record)
    assert record.runs() == 2
    gates = record.maps()
    assert gates.maps.shape == (4, 2, 2, 4, 4)
    assert gates.timesteps.tolist() == sorted(gates.timesteps.tolist(), reverse=True)
    assert (gates.maps >= 0).all() and gates.maps.sum() > 0


def test_vector_from_another_model_is_refused_with_both_numbers(vector):
    other = make_transformer(num_layers=3, heads=3, head_dim=8)
    with (
        pytest.raises(
            VectorMismatchError, match="hidden size 16 with 4 layers; the model has hidden size 24 and 3 layers"
        ),
        steering(other, SteeringPlan(vector, 2.5, 0, 2)),
    ):
        pass
    assert no_hooks_left(other)


def test_bad_plan_values_are_refused(transformer, vector):
    for plan, message in (
        (SteeringPlan(vector, float("nan"), 0, 2), "strength must be finite"),
        (SteeringPlan(vector, 1.0, 0, 2, rows="uncond"), "rows must be one of"),
        (SteeringPlan(vector, 1.0, 0, 2, interpolation="cubic"), "interpolation must be one of"),
        (SteeringPlan(vector, 1.0, 3, 3), "empty or outside"),
    ):
        with pytest.raises(ValueError, match=message), steering(transformer, plan):
            pass


@pytest.mark.parametrize("strength", [1e30, 7e4, 1e300, -1000.5, float("inf")])
def test_strengths_that_overflow_are_refused_before_any_hook(transformer, vector, strength):
    """1e30 gave black images with exit 0, 7e4 NaN in float16, 1e300 a raw RuntimeError (issue 12 F7)."""
    with (
        pytest.raises(MedSteerError, match=r"strength must be finite with \|strength x vector gain\| at most 1000"),
        steering(transformer, SteeringPlan(vector, strength, 0, 2)),
    ):
        pass
    assert no_hooks_left(transformer)


def test_the_bound_is_on_strength_times_gain(transformer, embeds, vector):
    assert MAX_STRENGTH == 1e3
    with pytest.raises(MedSteerError, match=r"got strength 2.0 x gain 1000.0 = 2000.0"):
        SteeringPlan(vector * 1e3, 2.0, 0, 2).validate(find_sites(transformer))
    for strength in (MAX_STRENGTH, -MAX_STRENGTH):
        with steering(transformer, SteeringPlan(vector, strength, 0, 4), layout="uncond_cond"):
            assert torch.isfinite(direct_call(transformer, embeds)).all()
