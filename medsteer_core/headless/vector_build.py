"""``build-vector``: estimate a pathology vector (and its seed halves) on a headless model; merging
builds.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..errors import VectorMismatchError
from ..estimate import VectorEstimator
from ..inspection import halves_paths, load_halves
from ..provenance import Provenance, build_provenance
from ..vector import PathologyVector
from ..vector_file import load_vector, save_vector
from .distributed import Shard
from .models import HeadlessModel

log = logging.getLogger("medsteer")


# ================================================================================ build-vector
@dataclass
class BuiltVector:
    """A built vector and, when there were at least two seed batches, the vectors of each half
    of the seeds (for ``inspect``'s stability check)."""

    vector: PathologyVector
    halves: tuple[PathologyVector, PathologyVector] | None = None


def _batches(seeds: Sequence[int], batch_size: int) -> list[list[int]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("no seeds given: pass at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds repeat: {sorted(s for s in set(seeds) if seeds.count(s) > 1)[:10]}")
    if any(s < 0 for s in seeds):
        raise ValueError(f"seeds must be >= 0, got {min(seeds)}")
    return [seeds[i : i + batch_size] for i in range(0, len(seeds), batch_size)]


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True)


def _estimate(model, units, split, spec, negative_prompt, scheduler, shard, progress):
    """Sample this rank's units, capturing conditional rows, and add every rank's per-unit sums in
    unit order: the whole set and, when ``split`` is a batch index, each half of the seed batches."""
    widths = model.sites.widths  # one per site (ragged on UNets)
    total = VectorEstimator(widths=widths)
    parts = (VectorEstimator(widths=widths), VectorEstimator(widths=widths)) if split else None
    mine = sum(1 for i in range(len(units)) if shard.owns(i))
    bar = _progress_bar(mine * spec.steps, "build-vector", progress and shard.main)
    try:
        for start in range(0, len(units), shard.world):
            index = start + shard.rank
            contribution = None
            if index < len(units):
                label, text, _, batch = units[index]
                # Apple's MPS has no float64; the per-unit sums there are float32 (the totals stay float64).
                precision = torch.float32 if model.device.type == "mps" else torch.float64
                contribution = VectorEstimator(widths=widths, accumulate_dtype=precision)
                model.sample(
                    text,
                    batch,
                    spec,
                    negative_prompt=negative_prompt,
                    scheduler=scheduler,
                    estimator=contribution,
                    label=label,
                    progress=lambda i, n: bar.update(1),
                )
                contribution = contribution.to("cpu")
            # Add every unit's sums in unit order, on every rank: the same bits for any world size.
            for offset, gathered in enumerate(shard.gather(contribution)):
                if gathered is None:
                    continue
                total.add(gathered)
                if parts is not None:
                    parts[0 if units[start + offset][2] < split else 1].add(gathered)
    finally:
        bar.close()
    return total, parts


def _provenance(model, prompts, negative_prompt, seeds, spec, scheduler, concept_with, concept_without, batch_size):
    """The typed provenance of a build on ``model`` (site widths and weights fingerprint hashed once
    for the vector and its halves)."""
    base = model.provenance()
    scheduler_class = type(model.scheduler(scheduler)).__name__

    provenance = build_provenance(
        prompts_with=prompts["with"],
        prompts_without=prompts["without"],
        negative_prompt=negative_prompt,
        seeds=seeds,
        steps=spec.steps,
        cfg=spec.cfg,
        sampler_name=scheduler,
        scheduler=scheduler_class,
        height=spec.height * model.latent_scale,
        width=spec.width * model.latent_scale,
        model_family=model.family,
        host="diffusers",
        sites=model.sites,  # site widths and weights fingerprint, hashed once for all halves
    ).replace(
        concept_with=concept_with or prompts["with"][0],
        concept_without=concept_without or prompts["without"][0],
        library_version=__version__,
        extra={
            "model": base["model"],
            **({"unet": base["unet"]} if base.get("unet") else {}),
            "lora": base["lora"] or "",
            "dtype": base["dtype"],
            "batch_size": str(batch_size),
        },
    )
    return provenance


def build_vector(
    model: HeadlessModel,
    prompts_with: Sequence[str],
    prompts_without: Sequence[str],
    seeds: Iterable[int],
    *,
    concept_with: str | None = None,
    concept_without: str | None = None,
    negative_prompt: str = "",
    steps: int = 20,
    cfg: float | None = None,
    scheduler: str = "default",
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 1,
    halves: bool = True,
    shard: Shard | None = None,
    progress: bool = True,
) -> BuiltVector:
    """Estimate a pathology vector: every prompt of each side x every seed, conditional rows captured.

    The paper (method.md, "Pathology vector"): Z images per prompt (Z = 50, 20 steps), the mean
    cross-attention output over seeds and tokens per class, normalised difference per layer and
    timestep. Several phrasings per side vary the context, as the paper does.

    Args:
        model: from ``load_model``.
        prompts_with / prompts_without: prompts with and without the concept.
        seeds: one image per prompt per seed.
        concept_with / concept_without: names stored in the file (default: the first prompts).
        negative_prompt: the unconditional prompt of classifier-free guidance.
        steps / cfg / scheduler / height / width: sampling settings (cfg default: the model's).
        batch_size: seeds per model call. Part of the result's bits (floating-point sums depend on
            the batch), so keep it fixed when results must match exactly.
        halves: also build one vector per half of the seed batches (``BuiltVector.halves``).
        shard: this process's rank; every rank returns the same result.
        progress: show a tqdm bar.

    Returns:
        The ``BuiltVector``.
    """
    shard = shard or Shard()
    prompts = {"with": [str(p) for p in prompts_with], "without": [str(p) for p in prompts_without]}
    for label, texts in prompts.items():
        if not texts or not all(t.strip() for t in texts):
            raise ValueError(f"build_vector needs at least one non-empty prompt {label} the concept")
    cfg = model.default_cfg if cfg is None else cfg
    spec = model.spec(steps, cfg, height, width)
    batches = _batches(list(seeds), batch_size)
    split = (len(batches) + 1) // 2 if halves and len(batches) >= 2 else None
    units = [
        (label, text, b, batch)
        for label in ("with", "without")
        for text in prompts[label]
        for b, batch in enumerate(batches)
    ]
    total, parts = _estimate(model, units, split, spec, negative_prompt, scheduler, shard, progress)
    flat = [s for batch in batches for s in batch]
    provenance = _provenance(
        model, prompts, negative_prompt, flat, spec, scheduler, concept_with, concept_without, batch_size
    )

    def seeded(seed_list: list[int]) -> Provenance:
        return provenance.replace(seeds=seed_list)

    vector = total.result(seeded(flat))
    halves_out = None
    if parts is not None:
        first = [s for batch in batches[:split] for s in batch]
        second = [s for batch in batches[split:] for s in batch]
        halves_out = (parts[0].result(seeded(first)), parts[1].result(seeded(second)))
    return BuiltVector(vector, halves_out)


def save_built(built: BuiltVector, path: str | os.PathLike) -> Path:
    """Write the vector (and its halves, next to it; stale halves are removed)."""
    written = save_vector(built.vector, path)
    a, b = halves_paths(written)
    if built.halves is not None:
        save_vector(built.halves[0], a)
        save_vector(built.halves[1], b)
    else:
        for stale in (a, b):
            stale.unlink(missing_ok=True)
    return written


def load_built(path: str | os.PathLike) -> BuiltVector:
    """Read a vector and, if present, its halves."""
    return BuiltVector(load_vector(path), load_halves(path))


def check_new_seeds(existing: PathologyVector, seeds: Iterable[int]) -> None:
    """Refuse, before any sampling, seeds that ``existing`` already holds (they would count twice).

    Raises:
        VectorMismatchError: some seeds overlap; the message lists them and the free range.
    """
    held = set(existing.provenance.seeds)
    overlap = sorted(held & {int(s) for s in seeds})
    if overlap:
        raise VectorMismatchError(
            f"cannot merge: the vector already holds seeds {overlap[:10]} (it has {len(held)} seeds, up to "
            f"{max(held)}), and their images would count twice; start the new seeds at --seed {max(held) + 1}"
        )


def merge_built(existing: BuiltVector, new: BuiltVector) -> BuiltVector:
    """Pool the seeds of two builds (``PathologyVector.merge``); halves merge pairwise when both
    builds have them, else the result has none."""
    for key in ("steps", "cfg", "scheduler", "height", "width"):
        a, b = getattr(existing.vector.provenance, key), getattr(new.vector.provenance, key)
        if a is not None and b is not None and a != b:
            log.warning("merging vectors built with different %s (%s and %s)", key, a, b)
    vector = existing.vector.merge(new.vector)
    halves = None
    if existing.halves is not None and new.halves is not None:
        halves = (existing.halves[0].merge(new.halves[0]), existing.halves[1].merge(new.halves[1]))
    return BuiltVector(vector, halves)
