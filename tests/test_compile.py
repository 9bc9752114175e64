"""Steering a ``torch.compile``d diffusers PixArt (issue 12).

Dynamo does not guard on module hooks, so before the fix a model compiled and run once unsteered
ignored hooks added later: steering silently did nothing. These tests compile a 2-layer PixArt with
a backend that counts the graphs it is handed (dynamo's own ``eager`` backend: the property under
test is what dynamo traces and guards, not inductor's code) and check that steering changes the
compiled output exactly as in eager mode, with one extra graph for steered calls and no
recompilation per step or per context. One inductor run checks the float tolerance end to end.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from diffusers import DPMSolverMultistepScheduler

from medsteer_core import GateRecord, SteeringPlan, VectorEstimator, find_sites, steering
from medsteer_core.driver import SamplingSpec, sample
from medsteer_core.vector import PathologyVector
from tests.tiny_models import make_embeds, make_transformer

SPEC = SamplingSpec(steps=4, cfg=4.0, height=8, width=8)


class CountingBackend:
    """A dynamo backend that runs each graph as traced and counts the graphs it was given."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


@pytest.fixture(autouse=True)
def fresh_dynamo():
    # Compiled code is cached on the (shared) forward code objects: start and end every test empty.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def model():
    return make_transformer(num_layers=2)


@pytest.fixture(scope="module")
def vector():
    g = torch.Generator().manual_seed(0)
    count = torch.ones(3, dtype=torch.long)
    return PathologyVector.from_sums(
        torch.tensor([100.0, 500.0, 900.0]),
        torch.randn(3, 2, 16, generator=g),
        torch.randn(3, 2, 16, generator=g),
        count,
        count.clone(),
    )


EMBEDS = {"with": make_embeds(6, 1), "without": make_embeds(6, 2), "uncond": make_embeds(6, 3)}


def call(model, t=500.0, seed=3):
    """One CFG call ``[uncond, cond]`` of the transformer."""
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(
            x,
            encoder_hidden_states=torch.cat([EMBEDS["uncond"], EMBEDS["with"]]),
            timestep=torch.tensor([t, t]),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
        )[0]


def steered_call(model, compiled, plans, t=500.0):
    with steering(model, plans, layout="uncond_cond"):
        return call(compiled, t)


def run(model, plans=(), record=None, estimator=None, label="with"):
    return sample(
        model,
        DPMSolverMultistepScheduler(),
        EMBEDS[label],
        [7],
        SPEC,
        negative_embeds=EMBEDS["uncond"],
        plans=plans,
        record=record,
        estimator=estimator,
        label=label,
    )


def site_is_clean(model):
    for site in find_sites(model).modules:
        if "forward" in site.__dict__ or site._forward_hooks or site._forward_pre_hooks:
            return False
    return True


def test_model_compiled_and_run_before_steering_is_steered(model, vector):
    """The issue's case: ``cm = torch.compile(m)`` run unsteered, then ``steering(m)`` around ``cm``."""
    plan = SteeringPlan(vector, 2.5, 0, 2)
    plain, eager = call(model), steered_call(model, model, plan)
    assert (eager - plain).abs().max() > 0.1
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    assert torch.equal(call(compiled), plain)
    plain_graphs = backend.graphs
    got = steered_call(model, compiled, plan)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    # One more graph for the steered transformer; the layout pre-hook runs as a frame of its own.
    assert backend.graphs - plain_graphs <= 2
    steered_graphs = backend.graphs
    # Leaving the context brings the unsteered graph back: no trace of the hooks stays.
    assert torch.equal(call(compiled), plain)
    assert site_is_clean(model)
    # New contexts, other timesteps, plain calls in between: the two graphs are reused.
    for t in (300.0, 700.0):
        torch.testing.assert_close(steered_call(model, compiled, plan, t), steered_call(model, model, plan, t))
        assert torch.equal(call(compiled, t), call(model, t))
    assert backend.graphs == steered_graphs


def test_compiled_sampling_matches_eager_and_does_not_recompile_per_step(model, vector):
    plan = SteeringPlan(vector, 2.5, 0, 2)
    reference_plain, reference = run(model), run(model, [plan])
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    assert torch.equal(run(compiled), reference_plain)  # the driver accepts the compiled module
    torch.testing.assert_close(run(compiled, [plan]), reference, rtol=1e-5, atol=1e-5)
    after_first = backend.graphs
    # Another 4-step steered run, a different strength (floats become dynamic after one change)
    # and a plain run: at most one more graph, none per step.
    torch.testing.assert_close(run(compiled, [plan]), reference, rtol=1e-5, atol=1e-5)
    stronger = SteeringPlan(vector, 4.0, 0, 2)
    torch.testing.assert_close(run(compiled, [stronger]), run(model, [stronger]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        run(compiled, [SteeringPlan(vector, 1.0, 0, 2)]), run(model, [SteeringPlan(vector, 1.0, 0, 2)])
    )
    assert torch.equal(run(compiled), reference_plain)
    assert backend.graphs - after_first <= 1
    assert site_is_clean(model)


def test_steering_accepts_the_compiled_module(model, vector):
    plan = SteeringPlan(vector, 2.5, 0, 2)
    eager = steered_call(model, model, plan)
    compiled = torch.compile(model, backend=CountingBackend())
    assert find_sites(compiled).transformer is model
    call(compiled)
    torch.testing.assert_close(steered_call(compiled, compiled, plan), eager, rtol=1e-5, atol=1e-5)
    assert site_is_clean(model) and not compiled._forward_pre_hooks


def test_strength_zero_under_compile_is_bit_identical_to_unsteered(model, vector):
    compiled = torch.compile(model, backend=CountingBackend())
    plain = call(compiled)
    for preserve_norm in (False, True):
        assert torch.equal(
            steered_call(model, compiled, SteeringPlan(vector, 0.0, 0, 2, preserve_norm=preserve_norm)), plain
        )


def test_nested_contexts_under_compile_match_eager(model, vector):
    # The reverse edit at site 1: this random vector is negatively aligned there, so leaves it alone.
    outer, inner = SteeringPlan(vector, 1.0, 0, 1), SteeringPlan(-vector, 2.0, 1, 2)
    compiled = torch.compile(model, backend=CountingBackend())
    results = {}
    for name, target in (("eager", model), ("compiled", compiled)):
        call(target)
        with steering(model, outer):
            with steering(model, inner):
                both = call(target)
            outer_only = call(target)
        results[name] = (both, outer_only, call(target))
    for got, expected in zip(results["compiled"], results["eager"], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(results["eager"][0], results["eager"][1])
    assert site_is_clean(model)


def test_gate_record_under_compile_equals_eager_without_recompiling_per_step(model, vector):
    plan = SteeringPlan(vector, 2.5, 0, 2)
    eager_record = GateRecord()
    eager = run(model, [plan], record=eager_record)
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    record = GateRecord()
    torch.testing.assert_close(run(compiled, [plan], record=record), eager, rtol=1e-5, atol=1e-5)
    graphs = backend.graphs
    assert len(record) == len(eager_record) == SPEC.steps * 2
    torch.testing.assert_close(record.maps().maps, eager_record.maps().maps, rtol=1e-5, atol=1e-5)
    again = GateRecord()
    run(compiled, [plan], record=again)
    assert backend.graphs == graphs and len(again) == len(eager_record)


def test_capture_under_compile_builds_the_same_vector(model):
    built = {}
    for name, target in (("eager", model), ("compiled", torch.compile(model, backend=CountingBackend()))):
        estimator = VectorEstimator.for_model(model)
        for label in ("with", "without"):
            run(target, estimator=estimator, label=label)
        built[name] = estimator.result()
    torch.testing.assert_close(built["compiled"].directions, built["eager"].directions, rtol=1e-5, atol=1e-5)
    assert torch.equal(built["compiled"].count_with, built["eager"].count_with)
    assert site_is_clean(model)


def test_an_instance_forward_already_on_a_site_is_kept_and_restored(vector):
    model = make_transformer(num_layers=2)
    site = find_sites(model).modules[0]
    unbound = type(site).forward

    def doubled(*args, **kwargs):  # another library's wrapper (accelerate's offload hooks do this)
        return unbound(site, *args, **kwargs) * 2

    plain = call(model)
    site.forward = doubled
    wrapped = call(model)
    assert not torch.equal(wrapped, plain)
    with steering(model, SteeringPlan(vector, 2.5, 0, 2)):
        steered = call(model)
    assert site.__dict__["forward"] is doubled
    assert torch.equal(call(model), wrapped)
    assert not torch.equal(steered, wrapped)


@pytest.mark.slow
def test_inductor_steered_output_is_within_float_tolerance_of_eager(model, vector):
    plan = SteeringPlan(vector, 2.5, 0, 2)
    compiled = torch.compile(model)  # the default backend, inductor (CPU: needs a C compiler)
    plain = call(compiled)
    torch.testing.assert_close(plain, call(model), rtol=1e-4, atol=1e-4)
    got, eager = steered_call(model, compiled, plan), steered_call(model, model, plan)
    assert (got - plain).abs().max() > 0.1
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-4)
    assert torch.equal(call(compiled), plain)
