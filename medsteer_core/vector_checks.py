"""Checks on the rows of a pathology vector and their messages: directions given from outside
(``PathologyVector.from_directions``), the unit-length tolerance every loaded row is held to, and
how a list of site widths is shown in an error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = ["UNIT_TOLERANCE", "external_rows", "short_widths"]

#: How far from 1 the norm of a unit row may be.
UNIT_TOLERANCE = 1e-3


def external_rows(directions, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``([K] keys, [K, L, D] rows)`` of ``PathologyVector.from_directions``, sorted and checked."""
    if isinstance(directions, Mapping):
        if timesteps is not None:
            raise ValueError("directions is a {timestep: rows} mapping: leave timesteps out")
        timesteps = [float(t) for t in directions]
        directions = list(directions.values())
    if timesteps is None:
        raise ValueError("from_directions needs the model timestep of every row (timesteps=)")
    rows = _as_tensor(directions, "directions")
    if rows.dim() != 3 or 0 in rows.shape:
        raise ValueError(f"directions must be [K, L, D] (K rows of [L, D]), got shape {tuple(rows.shape)}")
    keys = _as_tensor(timesteps, "timesteps").reshape(-1)
    if keys.shape[0] != rows.shape[0]:
        raise ValueError(f"{keys.shape[0]} timesteps for {rows.shape[0]} rows of directions: give one per row")
    if not bool(torch.isfinite(rows).all()) or not bool(torch.isfinite(keys).all()):
        raise ValueError("directions and timesteps must be finite (found NaN or infinity)")
    if bool((keys < 0).any()) or bool((keys > 1000).any()):
        raise ValueError(f"timesteps must be model timesteps in 0-1000, got {keys.min():g} to {keys.max():g}")
    order = torch.argsort(keys)
    keys, rows = keys[order], rows[order]
    if keys.shape[0] > 1 and not bool((keys[1:] > keys[:-1]).all()):
        same = int((keys[1:] <= keys[:-1]).nonzero()[0])
        raise ValueError(f"timestep {float(keys[same]):g} is given twice: give each row its own timestep")
    norms = rows.norm(dim=-1)
    bad = ~((norms - 1).abs() <= UNIT_TOLERANCE) & (norms != 0)
    if bool(bad.any()):
        k, layer = (int(x) for x in bad.nonzero()[0])
        raise ValueError(
            f"direction row at timestep {float(keys[k]):g}, layer {layer} has norm {float(norms[k, layer]):.6g}: "
            "every row must be unit length or zero; normalise the rows first"
        )
    return keys, rows


def _as_tensor(value, name: str) -> torch.Tensor:
    """A float64 CPU tensor from a tensor, a NumPy array or a list of them (or of numbers)."""
    try:
        if isinstance(value, (list, tuple)) and value and not isinstance(value[0], (int, float)):
            return torch.stack([torch.as_tensor(x).detach().double().cpu() for x in value])
        return torch.as_tensor(value).detach().double().cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{name} must be numbers of one shape (a tensor, array or list of them): {exc}") from None


def short_widths(widths: Sequence[int]) -> str:
    """A width list for a message: runs of one width collapsed (``[1152] x 28``)."""
    widths = list(widths)
    if widths and len(set(widths)) == 1:
        return f"[{widths[0]}] x {len(widths)}"
    text = str(widths)
    return text if len(text) <= 200 else text[:197] + "...]"
