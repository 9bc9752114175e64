"""A steering plan: what one edit is, and how to make one from a host's inputs.

``SteeringPlan`` is one edit (a vector, a strength, a window of layers and timesteps, which rows);
``make_plan`` builds and validates one from the values a host's inputs carry (percents of sampling
instead of timesteps, readable row names); ``timestep_window`` converts the percents;
``chain_plans`` composes the plans of chained edits.

Example:
    >>> plan = make_plan(transformer, vector, strength=2.5, layer_start=8, layer_end=16,
    ...                  start_percent=0.0, end_percent=1.0, percent_to_timestep=to_t)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from .backbones import Sites, find_sites
from .errors import MedSteerError, VectorMismatchError
from .provenance import site_widths
from .vector import INTERPOLATIONS, PathologyVector

__all__ = [
    "MAX_STRENGTH",
    "ROWS",
    "ROW_OPTIONS",
    "SteeringPlan",
    "chain_plans",
    "check_family",
    "family_group",
    "make_plan",
    "timestep_window",
]

#: Which batch rows a plan steers: both halves of a CFG batch (as the authors' code does) or the
#: conditional rows only.
ROWS = ("all", "cond")
#: Readable names of ``ROWS`` (the ApplySSPSSteer ``rows`` widget's choices) and the value each means.
ROW_OPTIONS = {"cond and uncond": "all", "cond only": "cond"}

#: Families that are one model for vectors: PixArt-alpha and -sigma share the architecture, the T5
#: text encoder and the site layout (``Sites.family`` says "pixart", ComfyUI's nodes write
#: "pixart-alpha" / "pixart-sigma" from the checkpoint's ``image_model``).
FAMILY_GROUPS = {"pixart-alpha": "pixart", "pixart-sigma": "pixart"}
#: Families that say nothing about the model (old files, custom backbones): never refused.
UNKNOWN_FAMILIES = ("", "unknown")


def family_group(family: str) -> str:
    """The group a model family belongs to for vectors (``"pixart-alpha"`` -> ``"pixart"``; any
    other family is its own group: ``"sd1"``, ``"sd2"``, ``"sdxl"``, ``"medsteer-mini"``...)."""
    family = str(family).strip().lower()
    return FAMILY_GROUPS.get(family, family)


def check_family(vector: PathologyVector, sites: Sites) -> None:
    """Refuse a vector built on another model family than ``sites``' model (issue 10).

    A direction is a difference of one model's activations: an SD1.5 vector means nothing to
    SDXL (another text encoder and other sites), nor to PixArt, even where the widths happen to
    fit. A vector without a known family (files written before families were recorded) passes.

    Raises:
        VectorMismatchError: naming both families and the fix.
    """
    built_for = vector.provenance.model_family.strip()
    family = str(sites.family).strip()
    if built_for.lower() in UNKNOWN_FAMILIES or family.lower() in UNKNOWN_FAMILIES:
        return
    if family_group(built_for) != family_group(family):
        raise VectorMismatchError(
            f"this vector was built on a {built_for} model but the model to steer is {family}: a vector only "
            f"steers the model family it was built on. Build one on this model (BuildPathologyVector, or "
            f"`medsteer build-vector` with this model), or steer a {built_for} model with it"
        )


#: The largest ``|strength * vector.gain|`` a plan accepts. The update subtracts
#: ``strength * max(<h, v>, 0)`` along a unit direction, and half-precision models compute it in
#: their own dtype, where float16 overflows above 65504: at strength 7e4 the per-row strength itself
#: was inf (and ``0 * inf`` turned even untouched tokens into NaN), at 1e30 float32 images came out
#: black. With ``|strength| <= 1e3`` the product stays finite in float16 for gates up to 65 (a
#: token's gate is at most its norm) and in bfloat16/float32 for any realistic activation, while
#: 1e3 is 400x the paper's 2.5: the update already reverses the concept's component at strength
#: 2, so nothing useful lies beyond it.
MAX_STRENGTH = 1e3


@dataclass(frozen=True)
class SteeringPlan:
    """One edit: a vector applied with SSPS at a strength, on a window of layers and timesteps.

    Attributes:
        vector: the pathology vector.
        strength: the paper's alpha (2.5 in the paper; 0 = no change; negative amplifies);
            ``|strength * vector.gain|`` at most ``MAX_STRENGTH`` (1e3).
        layer_start: first steered block (the paper: 8).
        layer_end: one past the last steered block (exclusive; the paper: 16).
        timestep_max / timestep_min: steer rows whose model timestep t satisfies
            ``timestep_min <= t <= timestep_max`` (default: all, 0-1000).
        rows: ``"all"`` (both halves of a CFG batch, as the authors' code) or ``"cond"``.
        preserve_norm: rescale each steered token to its original norm (the authors' code).
        interpolation: ``"nearest"`` timestep key or ``"linear"`` between keys.
    """

    vector: PathologyVector
    strength: float = 2.5
    layer_start: int = 8
    layer_end: int = 16
    timestep_max: float = 1000.0
    timestep_min: float = 0.0
    rows: str = "all"
    preserve_norm: bool = False
    interpolation: str = "nearest"

    @property
    def effective_strength(self) -> float:
        """``strength * vector.gain``: what the update actually uses."""
        return float(self.strength) * float(self.vector.gain)

    def validate(self, sites: Sites) -> None:
        """Raise a clear error unless this plan can run on ``sites`` (``make_plan`` calls it when the
        plan is made; the hooks then only check that the model is still the one it was checked on)."""
        if not isinstance(self.vector, PathologyVector):
            raise TypeError(f"SteeringPlan.vector must be a PathologyVector, got {type(self.vector).__name__}")
        check_family(self.vector, sites)
        self.vector.check_compatible(site_widths(sites))
        sites.check_window(self.layer_start, self.layer_end)
        effective = self.effective_strength
        if not math.isfinite(effective) or abs(effective) > MAX_STRENGTH:
            raise MedSteerError(
                f"strength must be finite with |strength x vector gain| at most {MAX_STRENGTH:g}; got strength "
                f"{self.strength!r} x gain {self.vector.gain!r} = {effective!r}. Beyond that the steered "
                "activations overflow "
                "float16 and bfloat16 (and later layers overflow even float32), giving NaN or black images. "
                "Useful strengths are small (the paper's 2.5); lower the strength or the vector's gain"
            )
        if self.rows not in ROWS:
            raise ValueError(f"rows must be one of {ROWS}, got {self.rows!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if not self.timestep_min <= self.timestep_max:
            raise ValueError(
                f"empty timestep window: timestep_min {self.timestep_min} > timestep_max {self.timestep_max}"
            )
        object.__setattr__(self, "_validated_for", (weakref.ref(sites.transformer), tuple(sites.widths)))

    def ensure_valid(self, sites: Sites) -> None:
        """``validate`` unless this plan was already validated on these sites (the hooks call this at
        every model call, so a plan made by ``make_plan`` is not checked again per call)."""
        checked = getattr(self, "_validated_for", None)
        if checked is None or checked[0]() is not sites.transformer or checked[1] != tuple(sites.widths):
            self.validate(sites)

    def covers(self, site: int) -> bool:
        return self.layer_start <= site < self.layer_end


def timestep_window(
    start_percent: float, end_percent: float, percent_to_timestep: Callable[[float], float]
) -> tuple[float, float]:
    """``(timestep_min, timestep_max)`` of the part of sampling between two percents.

    ComfyUI's convention: 0 is the start of sampling (highest noise, timestep ~999), 1 the end
    (timestep 0). The ends are open, so the defaults 0 and 1 cover every timestep a sampler can use.

    Args:
        start_percent / end_percent: 0 <= start_percent <= end_percent <= 1.
        percent_to_timestep: the host's mapping (ComfyUI: ``model_sampling.percent_to_sigma`` then
            ``model_sampling.timestep``).

    Raises:
        ValueError: a percent outside 0-1 or an empty window.
    """
    for name, value in (("start_percent", start_percent), ("end_percent", end_percent)):
        if not (0.0 <= value <= 1.0) or math.isnan(value):
            raise ValueError(f"{name} must be between 0 and 1, got {value}")
    if start_percent > end_percent:
        raise ValueError(
            f"empty steering window: start_percent {start_percent} is after end_percent {end_percent}; "
            "0 is the start of sampling and 1 the end, so use start_percent <= end_percent"
        )
    if start_percent >= 1.0 or end_percent <= 0.0:
        # As in ComfyUI's own percent ranges: sigma 0 (percent 1) and infinite sigma (percent 0)
        # are never sampled, so such a window would silently steer nothing.
        raise ValueError(
            f"the steering window {start_percent}-{end_percent} contains no sampling step: "
            "use start_percent < 1 and end_percent > 0 (0-1 steers every step)"
        )
    timestep_max = 1000.0 if start_percent <= 0.0 else float(percent_to_timestep(start_percent))
    timestep_min = 0.0 if end_percent >= 1.0 else float(percent_to_timestep(end_percent))
    return timestep_min, timestep_max


def make_plan(
    model: nn.Module | Sites,
    vector: PathologyVector,
    *,
    strength: float,
    layer_start: int,
    layer_end: int,
    start_percent: float = 0.0,
    end_percent: float = 1.0,
    percent_to_timestep: Callable[[float], float] | None = None,
    rows: str = "cond and uncond",
    preserve_norm: bool = False,
    interpolation: str = "nearest",
    timestep_min: float | None = None,
    timestep_max: float | None = None,
) -> SteeringPlan:
    """A ``SteeringPlan`` from node inputs, validated against the model it will steer.

    Args:
        model: the PixArt transformer (or its ``Sites``).
        vector: the pathology vector.
        strength: the paper's alpha.
        layer_start / layer_end: the steered blocks, ``layer_end`` exclusive.
        start_percent / end_percent: see ``timestep_window``.
        percent_to_timestep: needed unless the window is the whole run (0 to 1).
        rows: a key of ``ROW_OPTIONS`` (or its value, ``"all"`` / ``"cond"``).
        preserve_norm / interpolation: as in ``SteeringPlan``.
        timestep_min / timestep_max: the window as model timesteps instead of percents (the CLI's
            ``--timestep-min/max``); each overrides its percent.

    Raises:
        TypeError: ``vector`` is not a ``PathologyVector``.
        UnsupportedModelError: no backbone knows the model.
        VectorMismatchError: the vector was built for another model family or geometry.
        ValueError: any other bad input (window, percents, rows, interpolation, strength).
    """
    if not isinstance(vector, PathologyVector):
        raise TypeError(
            f"pathology_vector must be a PathologyVector, got {type(vector).__name__}: connect "
            "BuildPathologyVector or LoadPathologyVector"
        )
    sites = model if isinstance(model, Sites) else find_sites(model)
    if rows in ROW_OPTIONS:
        rows = ROW_OPTIONS[rows]
    elif rows not in ROW_OPTIONS.values():
        raise ValueError(f"rows must be one of {list(ROW_OPTIONS)}, got {rows!r}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {list(INTERPOLATIONS)}, got {interpolation!r}")
    if not math.isfinite(float(strength)):
        raise ValueError(f"strength must be a finite number, got {strength!r}")
    if percent_to_timestep is None:
        if (start_percent, end_percent) != (0.0, 1.0):
            raise ValueError("a timestep window other than 0-1 needs percent_to_timestep")

        def percent_to_timestep(p: float) -> float:  # never called for the whole run
            return 1000.0 * (1.0 - p)

    low, high = timestep_window(start_percent, end_percent, percent_to_timestep)
    timestep_min = low if timestep_min is None else float(timestep_min)
    timestep_max = high if timestep_max is None else float(timestep_max)
    plan = SteeringPlan(
        vector=vector,
        strength=float(strength),
        layer_start=int(layer_start),
        layer_end=int(layer_end),
        timestep_max=timestep_max,
        timestep_min=timestep_min,
        rows=rows,
        preserve_norm=bool(preserve_norm),
        interpolation=interpolation,
    )
    plan.validate(sites)
    return plan


def chain_plans(existing: Sequence[SteeringPlan], plan: SteeringPlan) -> tuple[SteeringPlan, ...]:
    """The plans of a chained steering node: the upstream ones, then this one (a new tuple)."""
    return (*tuple(existing), plan)
