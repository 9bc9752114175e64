"""What the ComfyUI nodes' widgets mean: the rules behind their inputs, without ComfyUI.

The nodes are thin: every widget rule that does not need ComfyUI itself lives here, as small pure
functions, so CI tests it without ComfyUI (this module imports nothing from ComfyUI):

- ``MAX_SEED`` / ``seed_batches``: ComfyUI's seed range and BuildPathologyVector's seed batches;
- ``prompt_text``: the text behind a CONDITIONING input, walking the API-format prompt graph;
- ``check_save_name``: SavePathologyVector's name, kept inside ``models/medsteer/``;
- ``resolve_edit``: GateHeatmap's ``edit`` index into chained ApplySSPSSteer edits;
- ``HEATMAP_PRESETS`` / ``heatmap_selection``: GateHeatmap's presets and its step/layer widgets
  (the grammar itself is ``gates``).

The plan a steering node makes is ``plan.make_plan``; PixArt's latent-size rule is its backbone's
(``backbones``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from .gates import PAPER_FIGURE_3, HeatmapSelection, check_index_list

__all__ = [
    "HEATMAP_PRESETS",
    "MAX_SEED",
    "check_save_name",
    "heatmap_selection",
    "prompt_text",
    "resolve_edit",
    "seed_batches",
]

#: ComfyUI's seed range (unsigned 64-bit).
MAX_SEED = 0xFFFFFFFFFFFFFFFF
#: GateHeatmap's presets by widget label; ``None`` means "use the steps and layers widgets".
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
