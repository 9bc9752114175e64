"""The diffusers sampling driver: per-seed noise, determinism, CFG layout."""

import pytest
import torch
from diffusers import DDIMScheduler

from medsteer_core.driver import SamplingSpec, initial_latents, sample

SPEC = SamplingSpec(steps=3, cfg=3.0, height=8, width=8)


def test_noise_depends_only_on_each_seed():
    both = initial_latents([4, 9], SPEC)
    assert torch.equal(both[1], initial_latents([9], SPEC)[0])
    assert not torch.equal(both[0], both[1])


def test_sampling_is_deterministic_and_seed_batched_like_single(transformer, embeds):
    def run(seeds):
        return sample(transformer, DDIMScheduler(), embeds["with"], seeds, SPEC, negative_embeds=embeds["uncond"])

    a, b = run([1, 2]), run([1, 2])
    assert torch.equal(a, b)
    assert torch.allclose(a[1], run([2])[0], atol=1e-5)


def test_cfg_one_needs_no_negative_and_cfg_needs_one(transformer, embeds):
    no_cfg = SamplingSpec(steps=2, cfg=1.0, height=8, width=8)
    out = sample(transformer, DDIMScheduler(), embeds["with"], [0], no_cfg)
    assert out.shape == (1, 4, 8, 8)
    with pytest.raises(ValueError, match="needs negative_embeds"):
        sample(transformer, DDIMScheduler(), embeds["with"], [0], SPEC)


def test_progress_is_reported_every_step(transformer, embeds):
    seen = []
    sample(
        transformer,
        DDIMScheduler(),
        embeds["with"],
        [0],
        SPEC,
        negative_embeds=embeds["uncond"],
        progress=lambda i, n: seen.append((i, n)),
    )
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_each_sample_call_is_one_explicit_gate_run(transformer, embeds):
    """The driver marks its run: gates recorded afterwards at lower timesteps (which the old
    rising-timestep rule merged into the driver's run) form runs of their own."""
    from medsteer_core import GateRecord, PathologyVector, SteeringPlan, find_sites, steering

    sites = find_sites(transformer)
    g = torch.Generator().manual_seed(0)
    shape = (2, sites.depth, sites.hidden_size)
    ones = torch.ones(2, dtype=torch.int64)
    vector = PathologyVector.from_sums(
        torch.tensor([0.0, 999.0]), torch.randn(shape, generator=g), torch.randn(shape, generator=g), ones, ones
    )
    plan = SteeringPlan(vector, 2.5, 0, 2)
    record = GateRecord()
    common = {"negative_embeds": embeds["uncond"], "plans": [plan], "record": record}
    sample(transformer, DDIMScheduler(), embeds["with"], [0], SPEC, **common)
    assert record.runs() == 1
    steps = record.maps().timesteps.tolist()
    assert len(steps) == SPEC.steps and steps == sorted(steps, reverse=True)
    # one more steered call, not above the run's last timestep, outside any sample call
    with steering(transformer, plan, layout="cond", record=record), torch.no_grad():
        transformer(
            torch.randn(1, 4, 8, 8, generator=g),
            encoder_hidden_states=embeds["with"],
            timestep=torch.tensor([0.0]),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
        )
    assert steps[-1] == 0.0 and record.runs() == 2
    assert record.maps(run=0).timesteps.tolist() == steps and record.maps().timesteps.tolist() == [0.0]
