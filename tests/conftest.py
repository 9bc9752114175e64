"""Shared fixtures: a tiny random-weight diffusers PixArt transformer and caption embeddings."""

from __future__ import annotations

import os

import pytest
import torch

CAPTION_CHANNELS = 32
#: ``-n auto`` (the README's test command, pytest-xdist) starts one worker per core, at most this
#: many: every worker boots its own ComfyUI and loads its own models, and the heavy modules are few.
MAX_WORKERS = 4


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pytest_xdist_auto_num_workers(config) -> int:
    return max(1, min(_cores(), MAX_WORKERS))


def pytest_configure(config) -> None:
    """Under pytest-xdist, share the cores between the workers: torch gives every process all of
    them, and N workers x N threads each thrash (the ComfyUI tests set 1 thread when they boot)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if workers > 1:
        torch.set_num_threads(max(1, _cores() // workers))


def make_transformer(
    num_layers: int = 4,
    heads: int = 2,
    head_dim: int = 8,
    seed: int = 0,
    *,
    sample_size: int = 8,
    use_additional_conditions: bool | None = None,
):
    """A random-weight diffusers ``PixArtTransformer2DModel`` (hidden ``heads * head_dim``,
    ``CAPTION_CHANNELS`` caption channels), the one tiny PixArt the core and checkpoint tests build."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        sample_size=sample_size,
        num_layers=num_layers,
        patch_size=2,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        caption_channels=CAPTION_CHANNELS,
        in_channels=4,
        out_channels=8,
        cross_attention_dim=heads * head_dim,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        use_additional_conditions=use_additional_conditions,
    )
    return model.eval()


def make_embeds(tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, tokens, CAPTION_CHANNELS, generator=g)


@pytest.fixture(scope="session")
def transformer():
    return make_transformer()


@pytest.fixture()
def scheduler():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler()


@pytest.fixture(scope="session")
def embeds():
    """Caption embeddings: with the concept, without it, and the unconditional one."""
    return {"with": make_embeds(6, 1), "without": make_embeds(6, 2), "uncond": make_embeds(6, 3)}
