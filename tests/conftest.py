"""Shared fixtures: a tiny random-weight diffusers PixArt transformer and caption embeddings, the
weights tests' PixArt and T5 (all built by ``tests/tiny_models.py``), and the pytest-xdist worker count."""

from __future__ import annotations

import os

import pytest
import torch

from tests.tiny_models import make_embeds, make_transformer, tiny_pixart, tiny_t5

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


@pytest.fixture(scope="module")
def pixart():
    """The weights tests' PixArt: 72-wide heads, every tensor non-zero."""
    return tiny_pixart()


@pytest.fixture(scope="module")
def t5():
    """The weights tests' T5: T5-XXL's vocabulary, gated-GELU MLP."""
    return tiny_t5()
