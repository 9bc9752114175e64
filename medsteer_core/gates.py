"""Gates: what the steering hooks record, how runs are told apart, and which maps a heatmap shows.

The gate ``sigma = max(<h, v>, 0)`` of every image token is the paper's spatial map of an edit.
This module owns everything about gates that is not drawing (drawing is ``heatmap``):

- ``GateEntry``: one recorded gate (one model call, site and plan); ``GateRecord`` collects them
  while sampling, with explicit run boundaries (``begin_run`` / ``end_run``) set by the host;
- ``GateMaps``: one run stacked as ``[steps, layers, images, h, w]``;
- the one selection grammar for steps and layers (``"all"``, ``"last"``, ``"mean"``,
  ``"8,12,14,19"``, ``"8-16"``), checked at queue time by ``check_index_list`` and resolved against
  a run by ``parse_steps`` / ``parse_layers`` / ``select_maps``;
- ``selection_gate``: the one mask definition both hosts (GateHeatmap and ``medsteer heatmap`` /
  ``generate --heatmaps``) use.

Grids are drawn with rows = steps and columns = layers by both hosts (``heatmap.gate_grid``):
the orientation GateHeatmap always had (workflows keep their pictures), and the step labels, which
carry the timestep (``step 8 (t=599)``), get the wide label column while layer labels stay short.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from .errors import MedSteerError

__all__ = [
    "MAX_INDEX",
    "PAPER_FIGURE_3",
    "GateEntry",
    "GateMaps",
    "GateRecord",
    "HeatmapSelection",
    "check_index_list",
    "finest_grid",
    "index_entries",
    "parse_layers",
    "parse_steps",
    "select_maps",
    "selection_gate",
]


# ------------------------------------------------------------------------------------ record
@dataclass(frozen=True, eq=False)
class GateEntry:
    """One recorded gate: the conditional rows' gates of one plan at one site in one model call.

    Attributes:
        call: the model call's number in its record (1, 2, ... in call order).
        site: the cross-attention site index.
        plan: the plan's index in the list given to ``steering``.
        timesteps: ``[B]`` model timesteps of the conditional rows.
        gate: ``[B, tokens]`` gates of the conditional rows.
        grid: the site's token grid ``(rows, columns)``, or ``None`` when unknown (square assumed).
    """

    call: int
    site: int
    plan: int
    timesteps: torch.Tensor
    gate: torch.Tensor
    grid: tuple[int, int] | None

    @property
    def timestep(self) -> float:
        """The call's model timestep (of its first conditional row)."""
        return float(self.timesteps.reshape(-1)[0])

    def token_grid(self) -> tuple[int, int]:
        """The token grid of the gate: ``grid``, or the square one its token count allows."""
        if self.grid is not None:
            return (int(self.grid[0]), int(self.grid[1]))
        tokens = self.gate.shape[1]
        side = int(round(math.sqrt(tokens)))
        if side * side != tokens:
            raise MedSteerError(f"unknown token grid for {tokens} tokens; pass CallInfo.latent_size (or grid)")
        return side, side


@dataclass(frozen=True)
class GateMaps:
    """Gate maps of one sampling run: ``maps[s, l, b]`` is the gate of image ``b`` at step ``s``,
    layer ``layers[l]``, on the token grid.

    Sites on a coarser token grid than the finest recorded one (a UNet's lower levels) are
    upsampled bilinearly to it, so means over layers (the heatmap mask) weigh every site on one
    grid; ``grids`` keeps each layer's own grid.

    Attributes:
        timesteps: ``[S]`` model timestep of each step (in sampling order).
        layers: the site indices of axis 1.
        maps: ``[S, L, B, H, W]`` float32 on the CPU (zero where a site was not steered at a step).
        grids: each layer's own token grid ``(rows, columns)`` (``(H, W)`` for every layer of a
            PixArt; empty when not known).
    """

    timesteps: torch.Tensor
    layers: tuple[int, ...]
    maps: torch.Tensor
    grids: tuple[tuple[int, int], ...] = ()


@dataclass
class GateRecord:
    """The gates ``sigma = max(<h, v>, 0)`` of the conditional rows, per call, site and plan.

    Entries (``GateEntry``) stay on the model's device while sampling (no host sync); ``maps()``
    moves them to the CPU, ``offload()`` moves them all at once. Every model call with conditional
    rows counts as one step, so multi-evaluation samplers (Heun, DPM-2) record each evaluation.

    Runs: a host that knows where a sampling run starts and ends says so with ``begin_run()`` and
    ``end_run()`` (the ComfyUI wrapper's outer sample, ``driver.sample``); the calls between them
    are one run whatever their timesteps. Calls recorded outside any explicit run fall back to the
    old rule: a new run starts where the timestep goes back up.

    Example:
        >>> record = GateRecord()
        >>> record.begin_run()                                                # doctest: +SKIP
        >>> with steering(transformer, [plan], record=record): ...           # doctest: +SKIP
        >>> record.end_run()                                                  # doctest: +SKIP
        >>> record.maps().maps.shape    # [steps, layers, images, H, W]       # doctest: +SKIP
    """

    entries: list[GateEntry] = field(default_factory=list)
    _calls: int = 0
    #: ``[first call, last call or None while open]`` of each explicit run, in order.
    _runs: list[list] = field(default_factory=list)

    def _begin_call(self) -> int:
        self._calls += 1
        return self._calls

    def begin_run(self) -> None:
        """Start a sampling run: the following calls belong to it (closes a run left open)."""
        self.end_run()
        self._runs.append([self._calls + 1, None])

    def end_run(self) -> None:
        """End the run in progress (no-op when none is open)."""
        if self._runs and self._runs[-1][1] is None:
            self._runs[-1][1] = self._calls

    def add(self, call: int, site: int, plan: int, timesteps: torch.Tensor, gate: torch.Tensor, grid) -> None:
        self.entries.append(GateEntry(call, site, plan, timesteps.detach(), gate.detach(), grid))

    def offload(self) -> None:
        """Move every recorded tensor to the CPU (one copy per entry, after sampling)."""
        self.entries = [replace(e, timesteps=e.timesteps.cpu(), gate=e.gate.cpu()) for e in self.entries]

    def clear(self) -> None:
        """Forget everything recorded so far (entries and run boundaries)."""
        self.entries.clear()
        self._runs.clear()

    def __len__(self) -> int:
        return len(self.entries)

    def runs(self, plan: int = 0) -> int:
        """How many sampling runs the record holds for ``plan``."""
        return len(self._split_runs(plan))

    def _explicit_run(self, call: int) -> int | None:
        for index, (first, last) in enumerate(self._runs):
            if call >= first and (last is None or call <= last):
                return index
        return None

    def _split_runs(self, plan: int) -> list[list[list[GateEntry]]]:
        """The entries of ``plan`` as runs of calls: explicit runs, else split on rising timesteps."""
        calls: dict[int, list[GateEntry]] = {}
        for entry in self.entries:
            if entry.plan == plan:
                calls.setdefault(entry.call, []).append(entry)
        runs: list[list[list[GateEntry]]] = []
        current_key: object = None
        last_t = math.inf
        for call in sorted(calls):
            explicit = self._explicit_run(call)
            t = calls[call][0].timestep
            if explicit is not None:
                new_run = current_key != ("explicit", explicit)
                current_key = ("explicit", explicit)
            else:
                new_run = current_key is None or current_key != "implicit" or t > last_t + 1e-6
                current_key = "implicit"
            if new_run or not runs:
                runs.append([])
            runs[-1].append(calls[call])
            last_t = t
        return runs

    def maps(self, plan: int = 0, run: int = -1) -> GateMaps:
        """Stack the recorded gates of one run into ``[S, L, B, H, W]`` (see ``GateMaps``).

        Sites on a coarser token grid (UNet levels) are upsampled bilinearly to the finest
        recorded grid (``GateMaps.grids`` keeps each one's own).

        Args:
            plan: which steering plan (index in the list given to ``steering``).
            run: which sampling run (default: the last).

        Raises:
            MedSteerError: nothing was recorded for this plan, or the grid is unknown.
        """
        runs = self._split_runs(plan)
        if not runs:
            raise MedSteerError(
                f"no gates recorded for plan {plan}: sample with the steered model first (with "
                "record= set) and make sure the plan's window covers the sampled timesteps"
            )
        try:
            calls = runs[run]
        except IndexError:
            raise MedSteerError(f"run {run} not recorded; the record holds {len(runs)} run(s)") from None
        layers = tuple(sorted({e.site for call in calls for e in call}))
        batch = calls[0][0].gate.shape[0]
        grids = {e.site: e.token_grid() for call in calls for e in call}
        grid = finest_grid(grids.values())
        out = torch.zeros(len(calls), len(layers), batch, grid[0], grid[1])
        timesteps = torch.zeros(len(calls))
        for s, call in enumerate(calls):
            timesteps[s] = call[0].timestep
            for entry in call:
                if entry.gate.shape[0] != batch:
                    continue
                own = grids[entry.site]
                gate_map = entry.gate.float().cpu().reshape(batch, 1, own[0], own[1])
                if own != grid:  # a coarser level (UNets): upsample to the finest grid
                    gate_map = torch.nn.functional.interpolate(
                        gate_map, size=grid, mode="bilinear", align_corners=False
                    )
                out[s, layers.index(entry.site)] = gate_map[:, 0]
        return GateMaps(timesteps, layers, out, tuple(grids[site] for site in layers))


def finest_grid(grids) -> tuple[int, int]:
    """The finest of some token grids (most tokens; ties by rows): the grid gate maps are drawn on,
    coarser sites (a UNet's lower levels) upsampled to it."""
    return max((tuple(int(n) for n in g) for g in grids), key=lambda g: (g[0] * g[1], g))


# --------------------------------------------------------------------------------- selection
@dataclass(frozen=True)
class HeatmapSelection:
    """Which gate maps a heatmap shows: ``steps`` and ``layers`` in the selection grammar."""

    steps: str
    layers: str


#: The paper's Fig. 3: the gate of layer 8 at steps 8, 12, 14 and 19 of a 20-step run.
PAPER_FIGURE_3 = HeatmapSelection(steps="8,12,14,19", layers="8")

#: The largest step or layer index a list may name. ComfyUI's samplers allow at most 10000 steps
#: and no PixArt has that many layers, so a larger number cannot select anything in any run; it is
#: refused while reading the text, before a range such as ``0-1000000000`` could be expanded.
MAX_INDEX = 10_000
_ENTRY = re.compile(r"(?P<minus>-)?\s*(?P<start>[0-9]+)(?:\s*-\s*(?P<end>[0-9]+))?")


def index_entries(text: str, what: str) -> list[int | range]:
    """The entries of a step or layer list, without expanding its ranges.

    ``"8,12"`` -> ``[8, 12]``; ``"8-16"`` -> ``[range(8, 16)]`` (end exclusive); ``"-1"`` -> ``[-1]``
    (from the end). Entries are separated by ``,`` or ``;``. Every number must be at most
    ``MAX_INDEX``, so no selection is larger than ``MAX_INDEX`` per entry whatever the text says.

    Args:
        text: the list (not ``"all"`` / ``"last"`` / ``"mean"``: callers handle those words).
        what: ``"step"`` or ``"layer"``, for the messages.

    Raises:
        MedSteerError: an unreadable entry, an empty range, or a number above ``MAX_INDEX``.
    """
    entries: list[int | range] = []
    for part in str(text).replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        match = _ENTRY.fullmatch(part)
        if match is None:
            raise MedSteerError(
                f"cannot read {what} {part[:40]!r} in {_short(text)}: use numbers like '8,12,14,19' or a range "
                "'8-16' (end exclusive)"
            )
        numbers = [g for g in (match["start"], match["end"]) if g is not None]
        for number in numbers:
            if len(number) > len(str(MAX_INDEX)) or int(number) > MAX_INDEX:
                raise MedSteerError(
                    f"{what} {_short(number)} in {_short(text)} is beyond any run: a {what} list names "
                    f"indices 0 to {MAX_INDEX} at most (the run's own count is checked once it is known)"
                )
        first = int(match["start"])
        if match["end"] is None:
            entries.append(-first if match["minus"] else first)
            continue
        last = int(match["end"])
        if match["minus"] or last <= first:
            raise MedSteerError(
                f"{what} range {part!r} is empty: write start-end with 0 <= start < end (end exclusive)"
            )
        entries.append(range(first, last))
    return entries


def check_index_list(text: str, what: str, words: Sequence[str] = ("all",)) -> None:
    """Check a step or layer list (``"all"``, ``"8,12,14,19"``, ``"8-16"``) before sampling.

    The syntax, and that no number exceeds ``MAX_INDEX`` (10000, ComfyUI's most steps):
    ``"0-1000000000"`` is refused here, at queue time, instead of being expanded after sampling.
    Whether the indices fit the run is known once sampling has run (``parse_steps``).

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


def parse_steps(text: str | Sequence[int], num_steps: int) -> list[int]:
    """Step indices from ``"all"``, ``"last"`` or a list such as ``"8,12,14,19"`` (0-based).

    Negative indices count from the end. Raises ``MedSteerError`` naming the bad entry and the range.
    """
    return _parse_indices(text, num_steps, "step", allow_all=True)


def parse_layers(text: str | Sequence[int], layers: Sequence[int]) -> list[int] | str:
    """Layer (site) indices from a list such as ``"8,10,12"`` or ``"8-16"`` (end exclusive), or
    ``"mean"`` (average over every recorded layer). Only recorded layers are valid."""
    if isinstance(text, str) and text.strip().lower() == "mean":
        return "mean"
    wanted = _parse_indices(text, max(layers) + 1 if layers else 0, "layer", allow_all=True, absolute=True)
    missing = [w for w in wanted if w not in layers]
    if missing:
        raise MedSteerError(
            f"layer(s) {missing} were not steered, so they have no gate; recorded layers are "
            f"{list(layers)} (the steering window)"
        )
    return wanted


def _short(text) -> str:
    text = str(text)
    return repr(text) if len(text) <= 60 else repr(text[:57] + "...") + f" ({len(text)} characters)"


def _parse_indices(text, count: int, what: str, allow_all: bool, absolute: bool = False) -> list[int]:
    if isinstance(text, str):
        raw = text.strip().lower()
        if allow_all and raw in ("all", ""):
            return list(range(count))
        if raw == "last":
            return [count - 1]
        entries = index_entries(raw, what)
    else:
        entries = [int(i) for i in text]
    out: list[int] = []
    for entry in entries:
        if isinstance(entry, range):
            # Checked before expanding, so the list never holds more than `count` items per entry.
            if entry.stop > count:
                raise MedSteerError(
                    f"{what} range {entry.start}-{entry.stop} is out of range: this run has {count} {what}s "
                    f"(0 to {count - 1}; a range's end is exclusive, so at most {entry.start}-{count})"
                )
            out.extend(entry)
            continue
        j = entry + count if (entry < 0 and not absolute) else entry
        if not 0 <= j < count:
            raise MedSteerError(f"{what} {entry} is out of range: this run has {count} {what}s (0 to {count - 1})")
        out.append(j)
    if not out:
        raise MedSteerError(f"no {what}s selected in {_short(text)}")
    return out


def select_maps(
    gates: GateMaps, steps: str | Sequence[int] = "all", layers: str | Sequence[int] = "mean", image: int = 0
):
    """Pick ``[S', L', H, W]`` maps of one image plus row (step) and column (layer) labels.

    Returns:
        ``(maps, step_labels, layer_labels)``: ``maps[s, l]`` is the ``s``-th chosen step at the
        ``l``-th chosen layer (or the layer mean), ready for ``heatmap.gate_grid`` as rows x columns.
    """
    num_steps, _, batch = gates.maps.shape[:3]
    if not 0 <= image < batch:
        raise MedSteerError(f"image {image} is out of range: the run has {batch} image(s)")
    step_ids = parse_steps(steps, num_steps)
    chosen = parse_layers(layers, gates.layers)
    maps = gates.maps[step_ids, :, image]  # [S', L, H, W]
    if chosen == "mean":
        maps = maps.mean(dim=1, keepdim=True)
        layer_labels = [f"layers {gates.layers[0]}-{gates.layers[-1]} mean"]
    else:
        maps = maps[:, [gates.layers.index(c) for c in chosen]]
        layer_labels = [f"layer {c}" for c in chosen]
    step_labels = [f"step {s} (t={gates.timesteps[s]:.0f})" for s in step_ids]
    return maps, step_labels, layer_labels


def selection_gate(maps: torch.Tensor) -> torch.Tensor:
    """The one gate map behind a heatmap's mask: the mean over the chosen steps and layers.

    ``maps`` is ``[steps, layers, h, w]`` as ``select_maps`` returns it; the result is ``[h, w]``.
    Why the mean and not the last chosen step: the mask then summarises exactly the maps the grid
    shows (what you see is what the mask is), it is stable where a single late step is a few
    sparse patches (the paper's Fig. 3: broad early, sparse late), and it matches the demo's and
    the scan's background measure. The last step's mask is still one selection away: ``steps="last"``.
    Both hosts use it: GateHeatmap's MASK and ``medsteer generate --heatmaps``' ``-mask.png``.
    """
    if maps.dim() != 4:
        raise MedSteerError(f"selection_gate needs [steps, layers, h, w] maps, got shape {tuple(maps.shape)}")
    return maps.float().mean(dim=(0, 1))
