"""Capture and steer hooks on the cross-attention sites of a PixArt transformer.

Both hook kinds are forward hooks on the site's output (before the residual add). They need, per
model call, the timestep of every batch row and which rows are conditional; a ``CallInfo`` carries
that. Hosts either pass one explicitly for each call (ComfyUI's APPLY_MODEL wrapper opens a context
per call) or let the context read it from the transformer's own arguments (``layout=``).

Hooks live only as long as their handle: ``with steering(...)`` / ``with capture(...)`` remove them
in ``finally``, so an unsteered model sharing the same weights is never affected, and nested
contexts remove only their own hooks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .backbones import Sites, find_sites
from .errors import MedSteerError
from .gates import GateRecord
from .plan import SteeringPlan
from .provenance import site_widths
from .site_forward import Callback, add_site_hook, eager_when_compiled
from .ssps import ssps

__all__ = [
    "CallInfo",
    "HookHandle",
    "LAYOUTS",
    "attach_capture",
    "attach_steering",
    "capture",
    "steering",
]

#: How a context reads the row layout from the transformer call when no ``CallInfo`` is given:
#: ``uncond_cond`` - diffusers pipelines with CFG, first half unconditional; ``cond`` - every row is
#: conditional (no CFG); ``comfyui`` - ``transformer_options["cond_or_uncond"]`` of the call.
LAYOUTS = ("uncond_cond", "cond", "comfyui")


@dataclass(frozen=True)
class CallInfo:
    """What the hooks need to know about one model call.

    Attributes:
        timesteps: ``[B]`` model timestep of each batch row (0-999 scale; any device).
        conditional: ``B`` booleans, True where the row is conditional (host-side, no sync).
        grid: one token grid ``(rows, columns)`` for every site, for gate maps; ``None`` if unknown.
        latent_size: ``(height, width)`` of the latent; each site's grid then comes from its backbone
            (sites of a UNet level have their own grids). Takes precedence over ``grid``.
    """

    timesteps: torch.Tensor
    conditional: tuple[bool, ...]
    grid: tuple[int, int] | None = None
    latent_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        t = torch.as_tensor(self.timesteps).reshape(-1)
        object.__setattr__(self, "timesteps", t)
        object.__setattr__(self, "conditional", tuple(bool(c) for c in self.conditional))
        if self.latent_size is not None:
            object.__setattr__(self, "latent_size", (int(self.latent_size[0]), int(self.latent_size[1])))
        if len(self.conditional) != t.numel():
            raise MedSteerError(
                f"CallInfo has {t.numel()} timesteps but {len(self.conditional)} conditional flags; "
                "give one of each per batch row"
            )

    @classmethod
    def from_layout(
        cls,
        timesteps: torch.Tensor,
        batch: int,
        layout: str,
        grid: tuple[int, int] | None = None,
        cond_or_uncond=None,
        latent_size: tuple[int, int] | None = None,
    ) -> CallInfo:
        """Build the call info of a batch laid out as ``layout`` (see ``LAYOUTS``).

        Args:
            timesteps: a scalar or ``[B]`` timesteps.
            batch: the batch size ``B``.
            layout: one of ``LAYOUTS``.
            grid: the token grid (one for every site).
            cond_or_uncond: for ``comfyui``: the list of 0 (cond) / 1 (uncond) per batch chunk.
            latent_size: the latent's ``(height, width)`` (each site's grid from its backbone).
        """
        t = torch.as_tensor(timesteps).reshape(-1)
        if t.numel() == 1 and batch > 1:
            t = t.expand(batch)
        if layout == "cond":
            conditional = (True,) * batch
        elif layout == "uncond_cond":
            if batch % 2:
                raise MedSteerError(
                    f"layout 'uncond_cond' needs an even batch ([uncond, cond]) but the model got {batch} "
                    "rows; use layout='cond' when sampling without classifier-free guidance"
                )
            conditional = (False,) * (batch // 2) + (True,) * (batch // 2)
        elif layout == "comfyui":
            chunks = list(cond_or_uncond or [0])
            if batch % len(chunks):
                raise MedSteerError(f"batch of {batch} rows does not split into cond_or_uncond={chunks}")
            per = batch // len(chunks)
            conditional = tuple(c == 0 for c in chunks for _ in range(per))
        else:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        return cls(t, conditional, grid, latent_size)


class HookHandle:
    """Registered hooks of one ``attach_*`` call; ``remove()`` takes off exactly these hooks."""

    def __init__(self) -> None:
        self._handles: list = []
        self._state: _CallState | None = None

    def _add(self, handle) -> None:
        self._handles.append(handle)

    def set_call(self, call: CallInfo) -> None:
        """Tell the hooks about the next model call (hosts that pass explicit call info)."""
        if self._state is None:
            raise MedSteerError("this handle was not created by attach_steering / attach_capture")
        self._state.set(call)

    def remove(self) -> None:
        """Remove the hooks (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    @property
    def active(self) -> bool:
        return bool(self._handles)


class _CallState:
    """The current call's info and the per-plan row tensors derived from it (once per call)."""

    def __init__(self, sites: Sites, plans: Sequence[SteeringPlan] = (), record: GateRecord | None = None) -> None:
        self.sites = sites
        self.plans = list(plans)
        self.record = record
        self.call: CallInfo | None = None
        self.call_id = 0
        self.plan_rows: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        self.cond_index: torch.Tensor | None = None
        self.cond_list: list[int] = []
        self._prepared_for: tuple[torch.device, torch.dtype] | None = None

    def set(self, call: CallInfo) -> None:
        self.call = call
        self.call_id = self.record._begin_call() if self.record is not None else self.call_id + 1
        self.plan_rows = []
        self._prepared_for: tuple[torch.device, torch.dtype] | None = None
        cond = [i for i, c in enumerate(call.conditional) if c]
        self.cond_list = cond
        self.cond_index = None

    def prepare(self, device: torch.device, dtype: torch.dtype) -> None:
        """Per-plan ``(directions [B, L, D], strength [B, 1, 1])`` on the activations' device."""
        if self._prepared_for == (device, dtype):
            return
        call = self.call
        t = call.timesteps.to(device)
        selected_cond = torch.tensor(call.conditional, device=device)
        self.plan_rows = []
        for plan in self.plans:
            strength = plan.effective_strength
            if strength == 0 and self.record is None:
                self.plan_rows.append(None)
                continue
            in_window = (t >= plan.timestep_min) & (t <= plan.timestep_max)
            if plan.rows == "cond":
                in_window = in_window & selected_cond
            row_strength = torch.where(in_window, strength, 0.0).to(dtype)[:, None, None]
            directions = plan.vector.lookup(t, plan.interpolation, dtype=dtype)
            self.plan_rows.append((directions, row_strength))
        self.cond_index = torch.tensor(self.cond_list, device=device, dtype=torch.long)
        self._prepared_for = (device, dtype)

    def grid(self, index: int) -> tuple[int, int] | None:
        """The token grid of site ``index`` in the current call (for gate maps)."""
        call = self.call
        if call.latent_size is not None:
            try:
                return self.sites.token_grid(index, call.latent_size)
            except MedSteerError:
                return call.grid
        return call.grid


def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output, None
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0], output[1:]
    raise MedSteerError(f"cross-attention returned {type(output).__name__}; expected a tensor")


def _call_from_arguments(sites: Sites, layout: str, args: tuple, kwargs: dict) -> CallInfo:
    """Read timesteps, batch and latent size from the transformer's own arguments (its backbone knows how)."""
    latents, timesteps, options = sites.read_call(args, kwargs)
    return CallInfo.from_layout(
        timesteps,
        latents.shape[0],
        layout,
        cond_or_uncond=options.get("cond_or_uncond"),
        latent_size=latents.shape[-2:],
    )


def _attach(
    sites: Sites,
    state: _CallState,
    site_hook,
    site_indices: Sequence[int],
    call_info: CallInfo | None,
    layout: str,
) -> HookHandle:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    handle = HookHandle()
    handle._state = state
    try:
        if call_info is not None:
            state.set(call_info)
        else:

            def read_call(module, args, kwargs):
                state.set(_call_from_arguments(sites, layout, args, kwargs))

            handle._add(sites.transformer.register_forward_pre_hook(read_call, with_kwargs=True))
        for index in site_indices:
            handle._add(add_site_hook(sites.modules[index], site_hook(index)))
    except BaseException:
        handle.remove()
        raise
    return handle


def _steer_hooks(plans: list[SteeringPlan], state: _CallState, widths: Sequence[int], record, pending: list):
    """``site_hook(index)`` -> the hook that steers site ``index`` with every plan covering it.

    Gates of the conditional rows go to ``record``, or to ``pending`` while torch.compile traces.
    """

    def site_hook(index: int):
        plan_ids = [j for j, plan in enumerate(plans) if plan.covers(index)]
        # A site narrower than the widest reads its part of the zero-padded rows (issue 9).
        width = widths[index] if widths[index] < max(widths) else None

        def hook(module, args, output):
            h, rest = _first_tensor(output)
            state.prepare(h.device, h.dtype)
            for j in plan_ids:
                rows = state.plan_rows[j]
                if rows is None:
                    continue
                directions, row_strength = rows
                plan = plans[j]
                h, gate = ssps(h, directions[:, index, None, :width], row_strength, plan.preserve_norm)
                if record is not None and state.cond_list:
                    entry = (
                        index,
                        j,
                        state.call.timesteps.to(h.device).index_select(0, state.cond_index),
                        gate.index_select(0, state.cond_index),
                        state.grid(index),
                    )
                    if torch.compiler.is_compiling():
                        pending.append(entry)
                    else:
                        record.add(state.call_id, *entry)
            return h if rest is None else (h, *rest)

        return hook

    return site_hook


def attach_steering(
    model: nn.Module | Sites,
    plans: SteeringPlan | Sequence[SteeringPlan],
    *,
    call_info: CallInfo | None = None,
    layout: str = "uncond_cond",
    record: GateRecord | None = None,
) -> HookHandle:
    """Register SSPS hooks on the model's cross-attention sites; see ``steering``.

    ``model`` may also be its ``Sites`` (``find_sites``), which a host attaching around every model
    call finds once instead of walking the model's modules each time.

    Returns:
        A ``HookHandle``; call ``.remove()`` when done.
    """
    sites = model if isinstance(model, Sites) else find_sites(model)
    plans = [plans] if isinstance(plans, SteeringPlan) else list(plans)
    if not plans:
        raise ValueError("steering needs at least one SteeringPlan")
    for plan in plans:
        plan.ensure_valid(sites)  # validated when made (make_plan); checked again only on another model
    # Copy the vectors to the model's device and dtype now, not in the first steered call: a
    # compiled model that traced an empty copy cache would compile a second steered graph.
    parameter = next(sites.transformer.parameters(), None)
    if parameter is not None:
        for plan in plans:
            plan.vector._on(parameter.device, parameter.dtype)
    state = _CallState(sites, plans, record)
    covered = sorted({i for plan in plans for i in range(plan.layer_start, plan.layer_end)})
    # Under torch.compile a call's gates wait here and reach `record` outside the graph, at the
    # next call and when the hooks come off: appended inside the graph, the record's growing
    # length would be a guard and the model would recompile at every step.
    pending: list = []

    def flush() -> None:
        for entry in pending:
            record.add(state.call_id, *entry)
        pending.clear()

    site_hook = _steer_hooks(plans, state, site_widths(sites), record, pending)

    if record is None:
        return _attach(sites, state, site_hook, covered, call_info, layout)
    flush = eager_when_compiled(flush)
    set_call = state.set

    def flush_and_set(call: CallInfo) -> None:
        flush()
        set_call(call)

    state.set = flush_and_set  # type: ignore[method-assign]
    handle = _attach(sites, state, site_hook, covered, call_info, layout)
    handle._add(Callback(flush))
    return handle


@contextmanager
def steering(
    model: nn.Module | Sites,
    plans: SteeringPlan | Sequence[SteeringPlan],
    *,
    call_info: CallInfo | None = None,
    layout: str = "uncond_cond",
    record: GateRecord | None = None,
) -> Iterator[HookHandle]:
    """Steer the model's cross-attention with one or more plans while the context is open.

    Plans compose in order at every site they share (plan 2 sees plan 1's output), which is how
    the paper chains vectors for compositional edits.

    Args:
        model: a model ``find_sites`` knows (PixArt, the SD UNets, ...), or its ``Sites``.
        plans: one ``SteeringPlan`` or a list of them.
        call_info: the row layout of every call made inside the context (hosts that open one
            context per model call). If ``None``, each call's timesteps and grid are read from the
            transformer's arguments and its rows are laid out as ``layout``.
        layout: see ``LAYOUTS``; the default matches diffusers pipelines with CFG.
        record: a ``GateRecord`` to append the gates of the conditional rows to.

    Example:
        >>> plan = SteeringPlan(vector, strength=2.5, layer_start=8, layer_end=16)   # doctest: +SKIP
        >>> with steering(pipe.transformer, plan):                                   # doctest: +SKIP
        ...     image = pipe(prompt, generator=torch.Generator().manual_seed(0)).images[0]
    """
    handle = attach_steering(model, plans, call_info=call_info, layout=layout, record=record)
    try:
        yield handle
    finally:
        handle.remove()


def attach_capture(
    model: nn.Module,
    estimator,
    label: str,
    *,
    call_info: CallInfo | None = None,
    layout: str = "uncond_cond",
) -> HookHandle:
    """Register hooks that feed the conditional rows' token means to ``estimator``; see ``capture``."""
    from .estimate import LABELS

    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    sites = find_sites(model)
    estimator.check_sites(sites)
    state = _CallState(sites)
    original_set = state.set

    def set_and_count(call: CallInfo) -> None:
        original_set(call)
        estimator._begin_call(label, call)

    # The estimator's counts and sums are Python-side state: kept out of compiled graphs (issue 12).
    state.set = eager_when_compiled(set_and_count)  # type: ignore[method-assign]

    def site_hook(index: int):
        def hook(module, args, output):
            h, _ = _first_tensor(output)
            if state.cond_list:
                estimator._observe(label, index, h, state.cond_list)

        return eager_when_compiled(hook)

    return _attach(sites, state, site_hook, range(sites.depth), call_info, layout)


@contextmanager
def capture(
    model: nn.Module,
    estimator,
    label: str,
    *,
    call_info: CallInfo | None = None,
    layout: str = "uncond_cond",
) -> Iterator[HookHandle]:
    """Record the conditional rows' cross-attention outputs into a ``VectorEstimator``.

    Args:
        model: a PixArt transformer.
        estimator: the ``VectorEstimator`` to feed.
        label: ``"with"`` (prompt with the concept) or ``"without"``.
        call_info / layout: as in ``steering``.

    Example:
        >>> est = VectorEstimator.for_model(transformer)               # doctest: +SKIP
        >>> with capture(transformer, est, "with"): sample(...)      # doctest: +SKIP
        >>> vector = est.result()                                     # doctest: +SKIP
    """
    handle = attach_capture(model, estimator, label, call_info=call_info, layout=layout)
    try:
        yield handle
    finally:
        handle.remove()
