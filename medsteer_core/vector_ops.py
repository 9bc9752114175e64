"""What is computed on pathology vectors: directions from class sums, checks on external rows,
merging two estimates, and the arithmetic of edits (negate, scale, compose).

The methods of ``vector.PathologyVector`` (``from_sums``, ``from_directions``, ``merge``, ``-v``,
``v * k``, ``v1 + v2``) call these; they build their result with the class of their argument, so
this module does not import ``vector``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import torch

from .errors import VectorMismatchError

__all__ = [
    "UNIT_TOLERANCE",
    "compose",
    "directions_from_sums",
    "external_rows",
    "merge",
    "negate",
    "scale",
    "short_widths",
]

#: Origins whose sums are real per-class sums: estimated from seeds, or given (``from_directions``).
_MERGEABLE_ORIGINS = ("estimated", "external")
#: How far from 1 the norm of a unit row may be.
UNIT_TOLERANCE = 1e-3
_KEY_TOLERANCE = 1e-3  # two timesteps closer than this are the same key


def merge(first, second):
    """``first.merge(second)``: pool the seeds of two vectors (see ``PathologyVector.merge``)."""
    for vec in (first, second):
        if vec.metadata.get("origin", "estimated") not in _MERGEABLE_ORIGINS:
            raise VectorMismatchError(
                f"cannot merge a vector made by arithmetic (origin {vec.metadata['origin']!r}): "
                "only vectors estimated from seeds carry the sums a merge needs"
            )
    second.check_compatible(first.widths, what="the vector it is merged into")
    mine, theirs = first.provenance, second.provenance
    for key in ("concept_with", "concept_without", "model_family"):
        a, b = getattr(mine, key), getattr(theirs, key)
        if a != b:
            raise VectorMismatchError(f"cannot merge vectors with different {key}: {a!r} vs {b!r}")
    a, b = mine.weights_fingerprint, theirs.weights_fingerprint
    if a and b and a != b:
        raise VectorMismatchError(
            f"cannot merge vectors built on different weights (weights_fingerprint {a} vs {b}): the "
            "shapes fit but the activations are not comparable. Build both on the same model "
            "(checkpoint, LoRA and dtype), or rebuild one of them"
        )
    for which, prov in (("the first", mine), ("the second", theirs)):
        if not prov.seeds:
            raise VectorMismatchError(
                f"cannot merge: {which} vector records no seeds, so whether the two hold the same images "
                "cannot be checked (merging a vector with itself would count every image twice). "
                "Merge vectors whose metadata lists their seeds (every medsteer build writes them)"
            )
    overlap = sorted(set(mine.seeds) & set(theirs.seeds))
    if overlap:
        raise VectorMismatchError(
            f"cannot merge vectors that share seeds {overlap[:10]}: their images would count "
            "twice. Build the extra vector with a different seed range."
        )
    keys = list(first.timesteps.double().tolist())
    sums = {n: list(getattr(first, n).double().unbind(0)) for n in ("sum_with", "sum_without")}
    counts = {n: list(getattr(first, n).tolist()) for n in ("count_with", "count_without")}
    for j, t in enumerate(second.timesteps.double().tolist()):
        match = next((i for i, k in enumerate(keys) if abs(k - t) <= _KEY_TOLERANCE), None)
        if match is None:
            keys.append(t)
            for n in sums:
                sums[n].append(getattr(second, n)[j].double())
            for n in counts:
                counts[n].append(int(getattr(second, n)[j]))
        else:
            for n in sums:
                sums[n][match] = sums[n][match] + getattr(second, n)[j].double()
            for n in counts:
                counts[n][match] += int(getattr(second, n)[j])
    merged = mine.replace(seeds=mine.seeds + theirs.seeds, weights_fingerprint=a or b, library_version="").to_metadata()
    return type(first).from_sums(
        torch.tensor(keys),
        torch.stack(sums["sum_with"]),
        torch.stack(sums["sum_without"]),
        torch.tensor(counts["count_with"]),
        torch.tensor(counts["count_without"]),
        merged,
        widths=first.widths,
    )


def negate(vector):
    """``-vector``: the same vector built the other way round (with and without swapped)."""
    metadata = dict(vector.metadata)
    metadata["concept_with"], metadata["concept_without"] = vector.concept_without, vector.concept_with
    for a, b in (("prompts_with", "prompts_without"),):
        if a in metadata or b in metadata:
            metadata[a], metadata[b] = vector.metadata.get(b, ""), vector.metadata.get(a, "")
    return type(vector)(
        directions=-vector.directions,
        timesteps=vector.timesteps.clone(),
        sum_with=vector.sum_without.clone(),
        sum_without=vector.sum_with.clone(),
        count_with=vector.count_without.clone(),
        count_without=vector.count_with.clone(),
        metadata=metadata,
        gain=vector.gain,
    )


def scale(vector, k: float):
    """``vector * k``: the same directions, ``gain`` multiplied by ``k``."""
    return type(vector)(
        vector.directions.clone(),
        vector.timesteps.clone(),
        vector.sum_with.clone(),
        vector.sum_without.clone(),
        vector.count_with.clone(),
        vector.count_without.clone(),
        dict(vector.metadata),
        gain=vector.gain * float(k),
    )


def compose(first, second):
    """``first + second``: ``normalize(g1 * v1 + g2 * v2)`` per row (see ``PathologyVector.__add__``)."""
    second.check_compatible(first.widths, what="the other vector")
    if second.timesteps.shape != first.timesteps.shape or not torch.allclose(
        second.timesteps, first.timesteps, atol=_KEY_TOLERANCE, rtol=0
    ):
        raise VectorMismatchError(
            f"cannot add vectors with different timestep keys ({first.num_timesteps} vs "
            f"{second.num_timesteps} rows): build both with the same scheduler and steps, or "
            "chain two steering plans instead"
        )
    mixed = first.gain * first.directions.double() + second.gain * second.directions.double()
    directions = mixed / mixed.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    directions = torch.where(mixed.norm(dim=-1, keepdim=True) > 1e-12, directions, torch.zeros_like(directions))
    zeros = torch.zeros_like(first.sum_with)
    metadata = {
        "origin": "composed",
        "concept_with": f"({first.concept_with}) + ({second.concept_with})",
        "concept_without": f"({first.concept_without}) + ({second.concept_without})",
        "model_family": first.metadata.get("model_family", ""),
        "composed_of": json.dumps([_provenance(first), _provenance(second)]),
    }
    return type(first)(
        directions.float(),
        first.timesteps.clone(),
        zeros,
        zeros.clone(),
        torch.zeros_like(first.count_with),
        torch.zeros_like(first.count_without),
        metadata,
        widths=first.widths,
    )


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


def directions_from_sums(
    sum_with: torch.Tensor, sum_without: torch.Tensor, count_with: torch.Tensor, count_without: torch.Tensor
) -> torch.Tensor:
    defined = (count_with > 0) & (count_without > 0)
    mean_with = sum_with / count_with.clamp_min(1).to(sum_with.dtype)[:, None, None]
    mean_without = sum_without / count_without.clamp_min(1).to(sum_without.dtype)[:, None, None]
    diff = mean_with - mean_without
    norm = diff.norm(dim=-1, keepdim=True)
    directions = diff / norm.clamp_min(1e-30)
    keep = defined[:, None, None] & (norm > 0)
    return torch.where(keep, directions, torch.zeros_like(directions))


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


def _provenance(vector) -> dict:
    return {
        "concept_with": vector.concept_with,
        "concept_without": vector.concept_without,
        "gain": vector.gain,
        "origin": vector.metadata.get("origin", "estimated"),
    }
