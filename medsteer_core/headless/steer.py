"""``Steer``: one vector file and the flags that say how to apply it, resolved into a ``SteeringPlan``;
the Fig. 3 heatmap defaults.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..gates import PAPER_FIGURE_3
from ..inspection import sha256_file
from ..plan import SteeringPlan
from ..vector import PathologyVector, load_vector
from .build import default_window


@dataclass(frozen=True)
class Steer:
    """One vector and how to apply it (the CLI's ``--vector`` with its steering flags).

    Attributes:
        vector: a vector file or a ``PathologyVector``.
        strength / layer_start / layer_end / timestep_min / timestep_max / rows / preserve_norm /
        interpolation: as in ``SteeringPlan``. ``None`` for strength or the layer window means the
            vector's ``calibrated_*`` metadata (the shipped MedSteer-mini vectors carry it), else the
            paper's strength 2.5 and ``default_window`` (8-16, or the whole model when it has fewer
            than 16 layers, as MedSteer-mini's 6).
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

    def resolve(self, depth: int | None = None) -> tuple[SteeringPlan, dict]:
        """The ``SteeringPlan`` and its manifest entry (file, sha256 and every setting).

        Args:
            depth: the model's number of layers, for ``default_window`` (``None``: the paper's 8-16).
        """
        if isinstance(self.vector, PathologyVector):
            vector, file = self.vector, None
            hasher = hashlib.sha256()  # of what steers: directions, keys and provenance
            for tensor in (vector.directions, vector.timesteps):
                hasher.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
            hasher.update(json.dumps(vector.metadata, sort_keys=True).encode())
            digest = hasher.hexdigest()
        else:
            file = str(self.vector)
            vector = load_vector(file)
            digest = sha256_file(Path(file))

        def pick(value, key: str, default, cast):
            if value is not None:
                return cast(value)
            stored = vector.metadata.get(f"calibrated_{key}")
            return cast(stored) if stored not in (None, "") else default

        window = default_window(depth)
        plan = SteeringPlan(
            vector,
            strength=pick(self.strength, "strength", 2.5, float),
            layer_start=pick(self.layer_start, "layer_start", window[0], int),
            layer_end=pick(self.layer_end, "layer_end", window[1], int),
            timestep_min=float(self.timestep_min),
            timestep_max=float(self.timestep_max),
            rows=self.rows,
            preserve_norm=bool(self.preserve_norm),
            interpolation=self.interpolation,
        )
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


def paper_heatmap_steps(steps: int) -> str:
    """The paper's Fig. 3 steps (8, 12, 14, 19 of 20) scaled to a run of ``steps`` steps."""
    paper = [int(s) for s in PAPER_FIGURE_3.steps.split(",")]
    if steps == 20:
        return PAPER_FIGURE_3.steps
    scaled = dict.fromkeys(round(s * (steps - 1) / 19) for s in paper)
    return ",".join(str(s) for s in scaled)


def _default_heatmap_layers(plan: SteeringPlan) -> str:
    paper = int(PAPER_FIGURE_3.layers)
    return str(paper if plan.covers(paper) else plan.layer_start)
