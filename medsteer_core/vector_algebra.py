"""Combining pathology vectors: merging two estimates and the arithmetic of edits.

One job: ``PathologyVector.merge``, ``-v``, ``v * k`` and ``v1 + v2`` call these. They build their
result with the class of their argument, so this module imports ``vector`` only for type checking
(``vector`` imports this module; there is no import cycle at run time).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .errors import VectorMismatchError
from .provenance import Provenance

if TYPE_CHECKING:
    from .vector import PathologyVector

__all__ = ["compose", "merge", "negate", "scale"]

#: Origins whose sums are real per-class sums: estimated from seeds, or given (``from_directions``).
_MERGEABLE_ORIGINS = ("estimated", "external")
_KEY_TOLERANCE = 1e-3  # two timesteps closer than this are the same key


def merge(first: PathologyVector, second: PathologyVector) -> PathologyVector:
    """``first.merge(second)``: pool the seeds of two vectors (see ``PathologyVector.merge``)."""
    for vec in (first, second):
        if vec.provenance.origin not in _MERGEABLE_ORIGINS:
            raise VectorMismatchError(
                f"cannot merge a vector made by arithmetic (origin {vec.provenance.origin!r}): "
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
    merged = mine.replace(
        seeds=mine.seeds + theirs.seeds, weights_fingerprint=a or b, library_version="", site_widths=()
    )
    return type(first).from_sums(
        torch.tensor(keys),
        torch.stack(sums["sum_with"]),
        torch.stack(sums["sum_without"]),
        torch.tensor(counts["count_with"]),
        torch.tensor(counts["count_without"]),
        merged,
        widths=first.widths,
    )


def negate(vector: PathologyVector) -> PathologyVector:
    """``-vector``: the same vector built the other way round (with and without swapped)."""
    mine = vector.provenance
    provenance = mine.replace(
        concept_with=mine.concept_without,
        concept_without=mine.concept_with,
        prompts_with=mine.prompts_without,
        prompts_without=mine.prompts_with,
    )
    return type(vector)(
        directions=-vector.directions,
        timesteps=vector.timesteps.clone(),
        sum_with=vector.sum_without.clone(),
        sum_without=vector.sum_with.clone(),
        count_with=vector.count_without.clone(),
        count_without=vector.count_with.clone(),
        provenance=provenance,
        gain=vector.gain,
        widths=vector.widths,
    )


def scale(vector: PathologyVector, k: float) -> PathologyVector:
    """``vector * k``: the same directions, ``gain`` multiplied by ``k``."""
    return type(vector)(
        vector.directions.clone(),
        vector.timesteps.clone(),
        vector.sum_with.clone(),
        vector.sum_without.clone(),
        vector.count_with.clone(),
        vector.count_without.clone(),
        vector.provenance,
        gain=vector.gain * float(k),
        widths=vector.widths,
    )


def compose(first: PathologyVector, second: PathologyVector) -> PathologyVector:
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
    provenance = Provenance(
        origin="composed",
        concept_with=f"({first.concept_with}) + ({second.concept_with})",
        concept_without=f"({first.concept_without}) + ({second.concept_without})",
        model_family=first.provenance.model_family,
        composed_of=(_part(first), _part(second)),
    )
    return type(first)(
        directions.float(),
        first.timesteps.clone(),
        zeros,
        zeros.clone(),
        torch.zeros_like(first.count_with),
        torch.zeros_like(first.count_without),
        provenance,
        widths=first.widths,
    )


def _part(vector: PathologyVector) -> dict:
    """What ``composed_of`` records of one part of ``v1 + v2``."""
    return {
        "concept_with": vector.concept_with,
        "concept_without": vector.concept_without,
        "gain": vector.gain,
        "origin": vector.provenance.origin,
    }
