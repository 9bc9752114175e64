"""``Steer``: one vector file and the flags that say how to apply it, resolved into a ``SteeringPlan``;
the Fig. 3 heatmap defaults.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..backbones import Sites
from ..gates import PAPER_FIGURE_3, parse_layers
from ..inspection import sha256_file
from ..plan import SteeringPlan
from ..plan import default_window as plan_default_window
from ..vector import PathologyVector, load_vector
from .vector_build import default_window


@dataclass(frozen=True)
class Steer:
    """One vector and how to apply it (the CLI's ``--vector`` with its steering flags).

    Attributes:
        vector: a vector file or a ``PathologyVector``.
        strength / layer_start / layer_end / timestep_min / timestep_max / rows / preserve_norm /
        interpolation: as in ``SteeringPlan``. ``None`` for strength or the layer window means the
            vector's ``calibrated_*`` metadata (the shipped MedSteer-mini vectors carry it), else the
            paper's strength 2.5 and ``default_window`` (8-16 on PixArt with at least 16 layers,
            else the whole model, as MedSteer-mini's 6 and the UNets').
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

        Args:
            depth: the model's number of layers, for ``default_window`` (``None``: the paper's 8-16).
            sites: the model's sites (their depth and family choose the default window; a named
                ``window`` needs them).
        """
        if self.window is not None and (self.layer_start is not None or self.layer_end is not None):
            raise ValueError(
                f"give the layer window once: --window {self.window!r} or --layer-start/--layer-end, not both"
            )
        if self.window is not None and sites is None:
            raise ValueError(f"the window {self.window!r} is resolved against the model: pass sites=model.sites")
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

        if sites is not None:
            window = plan_default_window(sites)  # the UNet preset, or the paper's 8-16 where it fits
        else:
            window = default_window(depth)
        start, end = sites.resolve_layers(self.window) if self.window is not None else (None, None)
        plan = SteeringPlan(
            vector,
            strength=pick(self.strength, "strength", 2.5, float),
            layer_start=start if start is not None else pick(self.layer_start, "layer_start", window[0], int),
            layer_end=end if end is not None else pick(self.layer_end, "layer_end", window[1], int),
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


def layer_selection(sites: Sites, text: str) -> str:
    """A heatmap's layer list with site names resolved to indices (``Sites.resolve_layers``):
    ``"middle 0,output 3"`` -> ``"6,10"`` on SD1.x, ``"input 7 - output 2"`` -> ``"4-9"``. Index
    entries and the words ``mean`` / ``all`` pass through unchanged."""
    raw = str(text).strip()
    if not any(c.isalpha() for c in raw) or raw.lower() in ("mean", "all", "last"):
        return raw
    entries = []
    for part in raw.replace(";", ",").split(","):
        part = part.strip()
        if part and any(c.isalpha() for c in part):
            start, end = sites.resolve_layers(part)
            entries.append(str(start) if end == start + 1 else f"{start}-{end}")
        elif part:
            entries.append(part)
    return ",".join(entries)


def layer_labels(sites: Sites, layers: str, recorded) -> list[str] | None:
    """Column labels naming each drawn site (``"layer 10: output 3"``) where the model's sites have
    names of their own (UNets), else ``None`` (the grid's ``"layer 10"``)."""
    chosen = parse_layers(layers, recorded)
    names = sites.names
    if chosen == "mean" or all(name == f"block {i}" for i, name in enumerate(names)):
        return None
    return [f"layer {c}: {names[c]}" for c in chosen]
