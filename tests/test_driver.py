"""The diffusers sampling driver: per-seed noise, determinism, CFG layout."""

import pytest
import torch
from diffusers import DDIMScheduler

from medsteer_core import SamplingSpec, initial_latents, sample

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
