"""Shared, cached loading of the shipped MedSteer-mini assets for the tests (loaded once per session)."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def shipped_oracle():
    from medsteer_core.mini.oracle import load_oracle

    return load_oracle()


@functools.lru_cache(maxsize=1)
def shipped_mini():
    import torch

    from medsteer_core.mini import load_mini

    torch.manual_seed(0)
    return load_mini()
