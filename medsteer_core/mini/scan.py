"""Layer scan and calibration: where in the model does a concept live, and how hard to push?

The paper's window (layers 8-16) and strength (2.5) belong to its 28-layer PixArt-XL-2 with the
Kvasir LoRA; the feasibility run behind issue 5 found that they do not transfer (on a 6-layer model
one early layer at strength 1 removed the dye; other layers carried a common-mode component and
steering there only added noise). So the window is measured, per model:

- ``layer_profile``: per layer, the size of the concept difference ``|mean_with - mean_without|``
  relative to the mean activation's norm (how much of the layer's output is the concept);
- ``gate_localisation``: per layer, how much of the gate ``max(<h, v>, 0)`` falls on the concept's
  pixels (from the oracle's mask of the unsteered image) compared with an even spread (1 = no better
  than uniform), and the fraction of tokens with a positive gate; every site's gate is brought to
  the image's pixels first, so a UNet's two token grids are scored alike (``pixel_gates``);
- ``sweep``: windows x strengths scored with the oracle (``metrics.score_pairs``);
- ``calibrate``: among the settings that remove the concept in at least 85 % of the calibration
  seeds, picks the one that keeps the background best (``shortlist`` names the candidates a
  screening sweep on few seeds should confirm on more).

These work on any model that ``MiniModel.generate`` wraps (MedSteer-mini's PixArt and
MedSteer-mini-UNet: windows run over ``find_sites(model).depth`` sites in execution order);
``build_vector`` builds the vectors the way ``medsteer build-vector`` does (varied caption
templates, one seed per image, both prompts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..backbones import find_sites
from ..estimate import VectorEstimator
from ..gates import GateRecord
from ..plan import SteeringPlan
from ..provenance import Provenance, weights_fingerprint
from ..vector import PathologyVector
from . import synthetic
from .metrics import score_pairs

__all__ = [
    "ISSUE_BAR",
    "MIN_REMOVAL",
    "LayerStats",
    "SweepRow",
    "build_vector",
    "all_windows",
    "calibrate",
    "gate_localisation",
    "layer_profile",
    "pixel_gates",
    "prompts_for",
    "removal",
    "shortlist",
    "sweep",
    "sweep_settings",
    "window_label",
]


def prompts_for(name: str, seeds: Sequence[int], offset: int = 0) -> list[str]:
    """One caption per seed for class ``name``, cycling through the templates (varied phrasing)."""
    n = len(synthetic.TEMPLATES)
    return [synthetic.caption(name, (offset + i) % n) for i in range(len(seeds))]


def build_vector(
    model,
    with_class: str,
    without_class: str,
    seeds: Sequence[int],
    *,
    batch: int = 40,
    progress: Callable[[int], None] | None = None,
) -> PathologyVector:
    """Estimate the pathology vector ``with_class`` minus ``without_class`` on a MiniModel.

    Every seed is sampled once with each prompt; the caption template cycles with the seed index, so
    the two classes share seeds and phrasing and differ only in the concept (method.md).

    Args:
        model: a ``mini.MiniModel``.
        with_class / without_class: class names of ``synthetic.CLASSES``.
        seeds: the seeds (the paper uses 50).
        batch: images per sampling run.
        progress: called with the number of images finished after every run.
    """
    estimator = VectorEstimator.for_model(model.transformer)
    seeds = list(seeds)
    for label, name in (("with", with_class), ("without", without_class)):
        prompts = prompts_for(name, seeds)
        for i in range(0, len(seeds), batch):
            model.generate(prompts[i : i + batch], seeds[i : i + batch], estimator=estimator, label=label)
            if progress is not None:
                progress(len(seeds[i : i + batch]))
    spec = model.spec()
    sites = find_sites(model.transformer)
    provenance = Provenance(  # the one writer of every vector's metadata (issue 9)
        concept_with=synthetic.CONCEPTS[with_class],
        concept_without=synthetic.CONCEPTS[without_class],
        prompts_with=sorted(set(prompts_for(with_class, seeds))),
        prompts_without=sorted(set(prompts_for(without_class, seeds))),
        seeds=[int(s) for s in seeds],
        steps=int(spec.steps),
        cfg=float(spec.cfg),
        sampler="ddim",
        scheduler="trailing, clip_sample",
        width=int(spec.width),
        height=int(spec.height),
        model_family=sites.family,  # "medsteer-mini" or "medsteer-mini-unet" (mini/backbone.py)
        weights_fingerprint=weights_fingerprint(sites),
        extra={"class_with": with_class, "class_without": without_class},
    )
    return estimator.result(provenance)


@dataclass(frozen=True)
class LayerStats:
    """Per-layer scan results (lists indexed by layer).

    Attributes:
        relative_difference: ``|mean_with - mean_without| / |mean activation|``, averaged over timesteps.
        localisation: gate mass on the concept's pixels divided by the concept's area fraction
            (1 = spread evenly; higher = concentrated on the concept).
        positive_fraction: fraction of tokens whose gate is positive.
    """

    relative_difference: list[float]
    localisation: list[float]
    positive_fraction: list[float]

    def as_dict(self) -> dict:
        return asdict(self)


def layer_profile(vector: PathologyVector) -> list[float]:
    """Per layer: the concept difference relative to the mean activation norm, averaged over timesteps."""
    mean_with = vector.sum_with.double() / vector.count_with.clamp_min(1).double()[:, None, None]
    mean_without = vector.sum_without.double() / vector.count_without.clamp_min(1).double()[:, None, None]
    scale = ((mean_with + mean_without) / 2).norm(dim=-1).clamp_min(1e-12)
    return ((mean_with - mean_without).norm(dim=-1) / scale).mean(0).tolist()


def gate_localisation(
    model,
    oracle,
    vector: PathologyVector,
    concept: str,
    seeds: Sequence[int],
    mask_kind: str = "dye",
) -> tuple[list[float], list[float], torch.Tensor]:
    """Gate localisation per site on images of the ``concept`` prompt (with-concept class name).

    Samples the seeds once with a strength-0 plan over every site (the images are exactly the
    unsteered ones) while recording the gates, and compares them with the oracle's mask. Each
    site's gate is brought to the image's pixels first (nearest neighbour), so sites on different
    token grids (a UNet's 16x16 and 8x8 levels) are scored on the same mask.

    Returns:
        ``(localisation[L], positive_fraction[L], images)``.
    """
    depth = vector.depth
    record = GateRecord()
    plan = SteeringPlan(vector, strength=0.0, layer_start=0, layer_end=depth)
    images = model.generate(prompts_for(concept, seeds), list(seeds), plans=[plan], record=record)
    gates = pixel_gates(record.maps().maps, tuple(images.shape[-2:]))  # [S, L, B, H, W]
    read = oracle.read(images)
    mask = ((read.dye if mask_kind == "dye" else read.lesion) > 0.5).float()  # [B, H, W]
    area = mask.flatten(1).mean(-1)  # [B] the concept's share of the image
    mass = gates.clamp_min(0)
    total = mass.flatten(-2).sum(-1).clamp_min(1e-12)  # [S, L, B]
    inside = (mass * mask).flatten(-2).sum(-1) / total
    valid = area > 0
    lift = (inside[..., valid] / area[valid]).mean(dim=(0, 2))
    positive = (gates > 0).float().mean(dim=(0, 2, 3, 4))
    return lift.tolist(), positive.tolist(), images


def pixel_gates(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Gate maps ``[..., h, w]`` on a token grid brought to ``size`` pixels by nearest neighbour:
    each token's gate covers the pixels it sees, whatever its site's grid."""
    lead, grid = maps.shape[:-2], maps.shape[-2:]
    if tuple(grid) == tuple(size):
        return maps
    flat = maps.reshape(-1, 1, *grid).float()
    return F.interpolate(flat, size=tuple(size), mode="nearest").reshape(*lead, *size)


def window_label(start: int, end: int, names: Sequence[str] | None = None) -> str:
    """``"a-b"`` for the window ``[a, b)``, with its sites' names where they say more than an index
    (UNets: ``"2-5 (middle 0 - output 1)"``; PixArt's ``"block i"`` names add nothing)."""
    label = f"{start}-{end}"
    if not names or all(n.startswith("block ") for n in names):
        return label
    span = names[start] if end - start == 1 else f"{names[start]} - {names[end - 1]}"
    return f"{label} ({span})"


@dataclass(frozen=True)
class SweepRow:
    layer_start: int
    layer_end: int
    strength: float
    flip_rate: float
    delta_p: float
    source_removed: float
    dye_detection: float
    bg_psnr: float
    bg_ssim: float

    def as_dict(self) -> dict:
        return asdict(self)


def all_windows(depth: int) -> list[tuple[int, int]]:
    """Every contiguous window ``[start, end)`` of a ``depth``-layer model (``depth * (depth + 1) / 2``)."""
    return [(start, end) for start in range(depth) for end in range(start + 1, depth + 1)]


def sweep(
    model,
    oracle,
    vector: PathologyVector,
    source: str,
    target: str,
    seeds: Sequence[int],
    windows: Sequence[tuple[int, int]],
    strengths: Sequence[float],
    *,
    originals: torch.Tensor | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[SweepRow]:
    """Score every window x strength on the seeds (prompt: the source class, template cycling).

    Args:
        originals: the unsteered images of these seeds, if already sampled.
        progress: called with 1 after every setting.
    """
    settings = [(start, end, float(strength)) for start, end in windows for strength in strengths]
    return sweep_settings(
        model, oracle, vector, source, target, seeds, settings, originals=originals, progress=progress
    )


def sweep_settings(
    model,
    oracle,
    vector: PathologyVector,
    source: str,
    target: str,
    seeds: Sequence[int],
    settings: Sequence[tuple[int, int, float]],
    *,
    originals: torch.Tensor | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[SweepRow]:
    """Score each ``(layer_start, layer_end, strength)`` on the seeds, in order (see ``sweep``)."""
    prompts = prompts_for(source, seeds)
    if originals is None:
        originals = model.generate(prompts, list(seeds))
    s, t = synthetic.CLASSES.index(source), synthetic.CLASSES.index(target)
    rows = []
    for start, end, strength in settings:
        plan = SteeringPlan(vector, strength=float(strength), layer_start=start, layer_end=end)
        edits = model.generate(prompts, list(seeds), plans=[plan])
        scores = score_pairs(oracle, originals, edits, s, t)
        rows.append(
            SweepRow(
                start,
                end,
                float(strength),
                scores.flip_rate,
                scores.delta_p,
                scores.source_removed,
                scores.dye_detection,
                scores.bg_psnr,
                scores.bg_ssim,
            )
        )
        if progress is not None:
            progress(1)
    return rows


def removal(row: SweepRow, dye: bool) -> float:
    """How often the concept went: 1 - dye detection for dye, else the flip rate."""
    return 1 - row.dye_detection if dye else row.flip_rate


#: Calibration asks for the concept to go in at least this fraction of the calibration seeds: a
#: margin above the 0.8 that issue 5 asks of held-out seeds.
MIN_REMOVAL = 0.85
#: Issue 10's bar on held-out seeds, per edit: the least removal (dye gone / flipped to the target),
#: with a background PSNR at least re-prompting's. Dye removal >= 0.85 and polyp -> normal >= 0.8
#: as the issue states; colitis -> normal, which it does not name, as polyp -> normal.
ISSUE_BAR = {"dye_removal": 0.85, "polyp_to_normal": 0.8, "colitis_to_normal": 0.8}


def calibrate(rows: Sequence[SweepRow], dye: bool, min_removal: float = MIN_REMOVAL) -> SweepRow:
    """The calibration rule: among the settings that remove the concept in at least ``min_removal``
    of the seeds, the one that keeps the background best (highest Bg-PSNR; scored against the same
    unsteered images, so also the largest margin over re-prompting those seeds).

    If no setting reaches ``min_removal``, the one that removes it most often (within 0.05 of the
    best), then the best Bg-PSNR.
    """
    if not rows:
        raise ValueError("calibrate needs at least one sweep row")
    eligible = [r for r in rows if removal(r, dye) >= min_removal]
    if not eligible:
        best = max(removal(r, dye) for r in rows)
        eligible = [r for r in rows if removal(r, dye) >= best - 0.05]
    return max(eligible, key=lambda r: r.bg_psnr)


def shortlist(
    rows: Sequence[SweepRow], dye: bool, count: int, min_removal: float = MIN_REMOVAL, slack: float = 0.1
) -> list[SweepRow]:
    """Up to ``count`` settings worth confirming on more seeds: those within ``slack`` of
    ``min_removal`` on the screening seeds, best background first; always includes ``calibrate``'s
    choice (a screen of few seeds is noisy near the threshold)."""
    near = sorted((r for r in rows if removal(r, dye) >= min_removal - slack), key=lambda r: -r.bg_psnr)
    chosen = calibrate(rows, dye, min_removal)
    picks = [chosen] + [r for r in near if r != chosen]
    return picks[: max(1, count)]
