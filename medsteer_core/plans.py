"""What a host's widgets mean: parsing and validating node inputs into engine objects.

The ComfyUI nodes are thin: every decision that does not need ComfyUI lives here, as small pure
functions, so CI tests it without ComfyUI. A host passes in what only it knows (the transformer,
a percent -> timestep mapping, the prompt graph) and gets back validated engine objects
(``SteeringPlan``, seed batches, metadata) or a ``ValueError`` that names the bad value and the fix.

Example:
    >>> plan = make_plan(transformer, vector, strength=2.5, layer_start=8, layer_end=16,
    ...                  start_percent=0.0, end_percent=1.0, percent_to_timestep=to_t)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from .backbones import Sites, check_latent_size, find_sites
from .errors import MedSteerError
from .heatmap import index_entries
from .hooks import SteeringPlan
from .provenance import Provenance, site_widths, weights_fingerprint
from .vector import INTERPOLATIONS, PathologyVector

__all__ = [
    "HEATMAP_PRESETS",
    "MAX_SEED",
    "PAPER_FIGURE_3",
    "ROW_OPTIONS",
    "HeatmapSelection",
    "build_metadata",
    "chain_plans",
    "check_index_list",
    "check_latent_size",
    "check_save_name",
    "heatmap_selection",
    "make_plan",
    "prompt_text",
    "resolve_edit",
    "seed_batches",
    "timestep_window",
]

#: The ``rows`` widget's choices and the ``SteeringPlan.rows`` value each one means.
ROW_OPTIONS = {"cond and uncond": "all", "cond only": "cond"}
#: ComfyUI's seed range (unsigned 64-bit).
MAX_SEED = 0xFFFFFFFFFFFFFFFF


@dataclass(frozen=True)
class HeatmapSelection:
    """Which gate maps a heatmap shows: ``steps`` and ``layers`` in ``heatmap.select_maps`` syntax."""

    steps: str
    layers: str


#: The paper's Fig. 3: the gate of layer 8 at steps 8, 12, 14 and 19 of a 20-step run.
PAPER_FIGURE_3 = HeatmapSelection(steps="8,12,14,19", layers="8")
#: Heatmap presets by widget label; ``None`` means "use the steps and layers widgets".
HEATMAP_PRESETS: dict[str, HeatmapSelection | None] = {
    "custom (steps and layers below)": None,
    "paper Fig. 3 (layer 8; steps 8, 12, 14, 19)": PAPER_FIGURE_3,
}


def seed_batches(seed: int, num_seeds: int, batch_size: int) -> list[list[int]]:
    """Consecutive seeds ``seed, seed + 1, ...`` split into batches of at most ``batch_size``.

    Raises:
        ValueError: ``num_seeds`` or ``batch_size`` below 1, or the seeds leave ComfyUI's range.
    """
    if num_seeds < 1:
        raise ValueError(f"num_seeds must be at least 1, got {num_seeds}")
    if batch_size < 1:
        raise ValueError(f"the latent batch size must be at least 1, got {batch_size}")
    if seed < 0 or seed + num_seeds - 1 > MAX_SEED:
        raise ValueError(
            f"seeds {seed} to {seed + num_seeds - 1} leave ComfyUI's seed range 0-{MAX_SEED}: lower the seed"
        )
    seeds = list(range(seed, seed + num_seeds))
    return [seeds[i : i + batch_size] for i in range(0, num_seeds, batch_size)]


# ---------------------------------------------------------------------------------- steering
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

    Raises:
        TypeError: ``vector`` is not a ``PathologyVector``.
        UnsupportedModelError: the model is not a PixArt transformer.
        VectorMismatchError: the vector was built for another geometry.
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

    timestep_min, timestep_max = timestep_window(start_percent, end_percent, percent_to_timestep)
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


def resolve_edit(edit: int, count: int) -> int:
    """Index of one of ``count`` chained edits; negative counts from the end (-1 = the last).

    Raises:
        ValueError: out of range.
    """
    index = edit + count if edit < 0 else edit
    if not 0 <= index < count:
        raise ValueError(
            f"edit {edit} is out of range: this model carries {count} chained steering edit(s); "
            f"use 0 to {count - 1} (first ApplySSPSSteer first) or -1 for the last"
        )
    return index


# ---------------------------------------------------------------------------------- heatmaps
def check_index_list(text: str, what: str, words: Sequence[str] = ("all",)) -> None:
    """Check a step or layer list (``"all"``, ``"8,12,14,19"``, ``"8-16"``) before sampling.

    The syntax, and that no number exceeds ``heatmap.MAX_INDEX`` (10000, ComfyUI's most steps):
    ``"0-1000000000"`` is refused here, at queue time, instead of being expanded after sampling.
    Whether the indices fit the run is known once sampling has run (``heatmap.parse_steps``).

    Raises:
        MedSteerError: naming the bad entry and the fix.
    """
    raw = str(text).strip().lower()
    if raw in words or raw == "last":
        return
    if not index_entries(raw, what):
        raise MedSteerError(
            f"no {what}s given in {text!r}: use {' or '.join(repr(w) for w in words)} or a list like '8,12'"
        )


def heatmap_selection(preset: str, steps: str, layers: str) -> HeatmapSelection:
    """The steps and layers a heatmap shows: the preset's, or the widgets' for the custom preset.

    Raises:
        ValueError: unknown preset or unreadable lists.
    """
    if preset not in HEATMAP_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {list(HEATMAP_PRESETS)}")
    chosen = HEATMAP_PRESETS[preset] or HeatmapSelection(str(steps), str(layers))
    check_index_list(chosen.steps, "step")
    check_index_list(chosen.layers, "layer", words=("mean", "all"))
    return chosen


# ---------------------------------------------------------------------------------- metadata
def prompt_text(prompt: Mapping | None, node_id: str | None, input_name: str, max_hops: int = 8) -> str | None:
    """The text behind a CONDITIONING input, found by walking an API-format prompt upstream.

    Follows the link of ``input_name`` to its source node; returns that node's ``text`` input if it
    is a literal string (CLIPTextEncode and most text encoders), else follows the source's own
    ``conditioning`` / ``conditioning_1`` input (pass-through nodes), up to ``max_hops`` nodes.

    Returns:
        The text, or ``None`` where it cannot be known (text from another node, no prompt).
    """
    if not isinstance(prompt, Mapping) or node_id is None:
        return None
    node, name = prompt.get(str(node_id)), input_name
    for _ in range(max_hops):
        if not isinstance(node, Mapping):
            return None
        link = (node.get("inputs") or {}).get(name)
        if not (isinstance(link, (list, tuple)) and len(link) == 2):
            return None
        node = prompt.get(str(link[0]))
        if not isinstance(node, Mapping):
            return None
        inputs = node.get("inputs") or {}
        text = inputs.get("text")
        if isinstance(text, str):
            return text
        name = next((k for k in ("conditioning", "conditioning_1", "conditioning_to") if k in inputs), None)
        if name is None:
            return None
    return None


def build_metadata(
    *,
    prompts_with: Sequence[str | None],
    prompts_without: Sequence[str | None],
    negative_prompt: str | None,
    seeds: Sequence[int],
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    height: int,
    width: int,
    model_family: str,
    host: str,
    sites: Sites | None = None,
    fingerprint: bool = True,
) -> dict[str, str]:
    """The provenance strings a built vector carries (``Provenance.to_metadata``, the one writer).

    Unknown prompt texts are stored as empty strings. With ``sites``, the site widths and (unless
    ``fingerprint`` is False) the ``weights_fingerprint`` of the model are recorded too: merging
    then refuses vectors built on other weights.
    """
    with_texts = [t or "" for t in prompts_with]
    without_texts = [t or "" for t in prompts_without]
    return Provenance(
        concept_with=with_texts[0] if len(set(with_texts)) == 1 else "",
        concept_without=without_texts[0] if len(set(without_texts)) == 1 else "",
        prompts_with=with_texts,
        prompts_without=without_texts,
        negative_prompt=negative_prompt or "",
        seeds=[int(s) for s in seeds],
        steps=int(steps),
        cfg=float(cfg),
        sampler=str(sampler_name),
        scheduler=str(scheduler),
        height=int(height),
        width=int(width),
        model_family=str(model_family),
        host=str(host),
        site_widths=site_widths(sites) if sites is not None else (),
        weights_fingerprint=weights_fingerprint(sites) if sites is not None and fingerprint else "",
    ).to_metadata()


def check_save_name(name: str) -> str:
    """A file name prefix that stays inside the vector folder (subfolders allowed).

    Raises:
        ValueError: empty, absolute, or climbing out with ``..``.
    """
    cleaned = str(name).strip().replace("\\", "/")
    if cleaned.endswith(".safetensors"):
        cleaned = cleaned[: -len(".safetensors")]
    parts = [p for p in cleaned.split("/") if p]
    if not parts or cleaned.startswith("/") or os.path.isabs(cleaned) or ":" in parts[0] or ".." in parts:
        raise ValueError(
            f"filename_prefix {name!r} must be a relative name inside models/medsteer/ "
            "(for example 'dye_removal' or 'kvasir/polyp_to_normal'), without '..'"
        )
    return "/".join(parts)
