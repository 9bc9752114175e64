"""``Steer``: one vector file and the flags that say how to apply it, resolved into a ``SteeringPlan``
(through ``settings.resolve_setting`` and ``plan.make_plan``, as every route)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..backbones import Sites
from ..inspection import sha256_file
from ..plan import SteeringPlan, make_plan
from ..settings import resolve_setting
from ..vector import PathologyVector
from ..vector_file import load_vector, vector_digest


@dataclass(frozen=True)
class Steer:
    """One vector and how to apply it (the CLI's ``--vector`` with its steering flags).

    Attributes:
        vector: a vector file or a ``PathologyVector``.
        strength / layer_start / layer_end / timestep_min / timestep_max / rows / preserve_norm /
        interpolation: as in ``SteeringPlan``. ``None`` for strength or the layer window means
            ``settings.resolve_setting``'s choice: the vector's calibrated setting (the shipped
            MedSteer-mini vectors carry one), else the backbone's preset, else the paper's.
        window: the layer window as text instead of ``layer_start`` / ``layer_end``, resolved by
            ``Sites.resolve_layers``: ``"input 7 - output 2"``, ``"middle"``, ``"8-16"``.
    """

    vector: str | os.PathLike | PathologyVector
    strength: float | None = None
    layer_start: int | None = None
    layer_end: int | None = None
    timestep_min: float = 0.0
    timestep_max: float = 1000.0
    rows: str = "all"
    preserve_norm: bool = False
    interpolation: str = "nearest"
    window: str | None = None

    def resolve(self, depth: int | None = None, sites: Sites | None = None) -> tuple[SteeringPlan, dict]:
        """The ``SteeringPlan`` and its manifest entry (file, sha256 and every setting).

        Strength and window come from ``settings.resolve_setting``: the flags, else the vector's
        calibrated setting, else the backbone's preset, else the paper's.

        Args:
            depth: unused; the depth comes from ``sites`` (or the vector without them). Kept for
                callers of medsteer 0.1.0.
            sites: the model's sites (their preset window; a named ``window`` needs them).
        """
        if isinstance(self.vector, PathologyVector):
            vector, file = self.vector, None
            digest = vector_digest(vector)
        else:
            file = str(self.vector)
            vector = load_vector(file)
            digest = sha256_file(Path(file))
        setting = resolve_setting(
            sites,
            vector,
            strength=self.strength,
            layer_start=self.layer_start,
            layer_end=self.layer_end,
            window=self.window,
        )
        options = {
            "strength": setting.strength,
            "layer_start": setting.layer_start,
            "layer_end": setting.layer_end,
            "timestep_min": float(self.timestep_min),
            "timestep_max": float(self.timestep_max),
            "rows": self.rows,
            "preserve_norm": bool(self.preserve_norm),
            "interpolation": self.interpolation,
        }
        # With the model at hand the plan is made (and validated) by make_plan, as in every host;
        # without it, it is validated when it is first attached to a model.
        plan = make_plan(sites, vector, **options) if sites is not None else SteeringPlan(vector, **options)
        entry = {
            "file": file,
            "sha256": digest,
            "concept_with": vector.concept_with,
            "concept_without": vector.concept_without,
            "gain": vector.gain,
            "strength": plan.strength,
            "layer_start": plan.layer_start,
            "layer_end": plan.layer_end,
            "timestep_min": plan.timestep_min,
            "timestep_max": plan.timestep_max,
            "rows": plan.rows,
            "preserve_norm": plan.preserve_norm,
            "interpolation": plan.interpolation,
        }
        return plan, entry
