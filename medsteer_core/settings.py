"""The one settings resolver: which strength and layer window a steering run uses (issue 18).

Every route (the ApplySSPSSteer node, ``medsteer generate`` / ``heatmap``, ``medsteer demo``)
asks ``resolve_setting``, which takes each value from the first of:

1. the explicit value (a node widget, a CLI flag, an argument);
2. the vector's calibrated setting (``Provenance.calibrated_*``; ``medsteer demo`` ships them);
3. the backbone's preset (``Sites.default_window``: the UNets' semantic levels, PixArt's 8-16);
4. the paper's default (strength 2.5; blocks 8-16 where the model has them, else every block).

``source`` says where each value came from, so a host can show it ("strength 6 (calibrated)").

Example:
    >>> setting = resolve_setting(sites, vector)                 # doctest: +SKIP
    >>> setting.strength, setting.window, setting.source         # doctest: +SKIP
    (6.0, (0, 3), {'strength': 'calibrated', 'window': 'calibrated'})
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .backbones import PAPER_WINDOW, Sites, paper_window
from .vector import PathologyVector

__all__ = ["PAPER_STRENGTH", "PAPER_WINDOW", "SOURCES", "SteeringSetting", "paper_window", "resolve_setting"]

#: The paper's alpha (method.md: 2.5 gives the reported 0.800 flip rate).
PAPER_STRENGTH = 2.5
#: Where a resolved value came from, in the order the resolver tries them.
SOURCES = ("explicit", "calibrated", "preset", "paper")


@dataclass(frozen=True)
class SteeringSetting:
    """A resolved strength and layer window (``layer_end`` exclusive), with each value's source.

    Attributes:
        strength: the paper's alpha.
        layer_start / layer_end: the steered sites, end exclusive.
        source: ``{"strength": ..., "window": ...}``, each one of ``SOURCES``.
    """

    strength: float
    layer_start: int
    layer_end: int
    source: dict[str, str] = field(default_factory=dict)

    @property
    def window(self) -> tuple[int, int]:
        return self.layer_start, self.layer_end


def resolve_setting(
    sites: Sites | None,
    vector: PathologyVector | None,
    *,
    strength: float | None = None,
    layer_start: int | None = None,
    layer_end: int | None = None,
    window: str | None = None,
    use_calibration: bool = True,
) -> SteeringSetting:
    """The strength and window a run uses: explicit, else calibrated, else preset, else the paper's.

    Args:
        sites: the model's sites (their backbone's preset window; a named ``window`` needs them).
            ``None``: no model at hand; the paper's rule on the vector's depth.
        vector: the vector to apply (its calibrated setting), or ``None``.
        strength / layer_start / layer_end: explicit values (``None``: not given). The window is
            explicit only when both ends are given.
        window: the window as text (``"8-16"``, ``"input 7 - output 2"``, ``"middle"``), resolved by
            ``Sites.resolve_layers``; ``"preset"`` asks for the backbone's preset (skipping the
            calibration); ``""`` / ``None``: not given.
        use_calibration: ``False`` skips step 2 (a host that shows widgets with their own values).

    Raises:
        ValueError: both ``window`` and ``layer_start``/``layer_end`` given, or a named window
            without ``sites``, or a window the model does not have.
    """
    text = (window or "").strip()
    given_ends = layer_start is not None or layer_end is not None
    if text and given_ends:
        raise ValueError(
            f"give the layer window once: {text!r} or layer_start/layer_end ({layer_start}, {layer_end}), not both"
        )
    if text and text.lower() != "preset" and sites is None:
        raise ValueError(f"the window {text!r} is resolved against the model's site names: pass its sites")
    calibrated = vector.provenance.calibrated_setting() if (vector is not None and use_calibration) else {}
    depth = sites.depth if sites is not None else (vector.depth if vector is not None else PAPER_WINDOW[1])
    preset = sites.default_window if sites is not None else None

    if strength is not None:
        value, strength_source = float(strength), "explicit"
    elif "strength" in calibrated:
        value, strength_source = float(calibrated["strength"]), "calibrated"
    else:
        value, strength_source = PAPER_STRENGTH, "paper"

    if text.lower() == "preset":
        ends, window_source = (preset or paper_window(depth)), ("preset" if preset else "paper")
    elif text:
        ends, window_source = sites.resolve_layers(text), "explicit"
    elif layer_start is not None and layer_end is not None:
        ends, window_source = (int(layer_start), int(layer_end)), "explicit"
    elif "layer_start" in calibrated and "layer_end" in calibrated:
        ends, window_source = (int(calibrated["layer_start"]), int(calibrated["layer_end"])), "calibrated"
    elif preset is not None:
        ends, window_source = preset, "preset"
    else:
        ends, window_source = paper_window(depth), "paper"
    start, end = ends
    if layer_start is not None and layer_end is None:  # one end given: the other from the resolved window
        start, window_source = int(layer_start), "explicit"
    elif layer_end is not None and layer_start is None:
        end, window_source = int(layer_end), "explicit"
    if sites is not None:
        sites.check_window(start, end)
    return SteeringSetting(value, int(start), int(end), {"strength": strength_source, "window": window_source})
