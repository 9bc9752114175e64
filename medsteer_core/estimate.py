"""Streaming estimation of a pathology vector from captured cross-attention outputs.

For every (timestep, site) the estimator keeps, per class, the sum over images of the image's mean
token activation, and the number of images. That is all the vector needs (method.md: average over
all Z seeds and all spatial tokens, then normalise the difference), so memory is O(K * L * D) and
does not grow with the number of seeds. Sums stay on the model's device during sampling.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .backbones import Sites, find_sites
from .errors import MedSteerError
from .provenance import Provenance, site_widths
from .vector import PathologyVector

__all__ = ["LABELS", "VectorEstimator"]

#: The two classes of a concept pair: images of the prompt with the concept, and without.
LABELS = ("with", "without")
_KEY_DECIMALS = 3


class VectorEstimator:
    """Accumulates per-(timestep, site) token means of the conditional rows of both classes.

    Args:
        depth: number of sites (transformer blocks).
        hidden_size: width ``D`` of the cross-attention output.
        accumulate_dtype: dtype of the running sums (float64 by default; use float32 on devices
            without float64 support).
        widths: the width of each site instead of ``depth`` and ``hidden_size``, for models whose
            sites differ in width; the sums are ``[L, max(widths)]``, zero beyond each site's width.

    Example:
        >>> est = VectorEstimator.for_model(transformer)               # doctest: +SKIP
        >>> with capture(transformer, est, "with"): ...                 # doctest: +SKIP
        >>> with capture(transformer, est, "without"): ...              # doctest: +SKIP
        >>> vector = est.result({"concept_with": "dyed lifted polyps"})  # doctest: +SKIP
    """

    def __init__(
        self,
        depth: int | None = None,
        hidden_size: int | None = None,
        accumulate_dtype: torch.dtype = torch.float64,
        *,
        widths: Sequence[int] | None = None,
    ) -> None:
        if widths is None:
            if depth is None or hidden_size is None or depth <= 0 or hidden_size <= 0:
                raise ValueError(f"depth and hidden_size must be positive, got {depth} and {hidden_size}")
            widths = (hidden_size,) * depth
        widths = tuple(int(w) for w in widths)
        if not widths or min(widths) <= 0:
            raise ValueError(f"widths must be one positive width per site, got {list(widths)}")
        if (depth, hidden_size) != (None, None) and (depth, hidden_size) != (len(widths), max(widths)):
            raise ValueError(
                f"widths {list(widths)} disagree with depth {depth} and hidden_size {hidden_size}: give widths only"
            )
        self.widths = widths
        self.depth = len(widths)
        self.hidden_size = max(widths)
        self.accumulate_dtype = accumulate_dtype
        # label -> timestep key -> [L, D] sum of per-image token means
        self._sums: dict[str, dict[float, torch.Tensor]] = {label: {} for label in LABELS}
        self._counts: dict[str, dict[float, int]] = {label: {} for label in LABELS}
        self._call_keys: list[float] = []
        # The current call's per-site sums, committed only once every site has been observed, so
        # a call interrupted part-way (KeyboardInterrupt, OOM, a cancelled queue item) adds nothing.
        self._call_label: str | None = None
        self._staged: list[tuple[float, int, torch.Tensor]] = []
        self._staged_sites: set[int] = set()

    @classmethod
    def for_model(cls, model: nn.Module, accumulate_dtype: torch.dtype = torch.float64) -> VectorEstimator:
        """An estimator sized for ``model``'s sites."""
        return cls(accumulate_dtype=accumulate_dtype, widths=site_widths(find_sites(model)))

    def check_sites(self, sites: Sites) -> None:
        widths = site_widths(sites)
        if widths != self.widths:
            raise MedSteerError(
                f"this estimator collects {_describe(self.widths)}; the model has {_describe(widths)}. "
                "Use one estimator per model."
            )

    # Called by capture hooks ------------------------------------------------------------------
    def _begin_call(self, label: str, call) -> None:
        # A call that never completed (every site observed) is dropped here: it counts for nothing.
        self._discard_call()
        cond = [i for i, c in enumerate(call.conditional) if c]
        # One small host read of the timesteps per model call (not per site): the keys of the sums.
        t = call.timesteps.detach().reshape(-1).tolist()
        self._call_keys = [round(float(t[i]), _KEY_DECIMALS) for i in cond]
        self._call_label = label

    def _discard_call(self) -> None:
        self._call_label = None
        self._call_keys = []
        self._staged = []
        self._staged_sites = set()

    def _commit_call(self) -> None:
        """Add the completed call's sums and its images to the running totals."""
        label = self._call_label
        sums, counts = self._sums[label], self._counts[label]
        for key, site, total in self._staged:
            self._sum_for(sums, key, total.device)[site, : total.shape[-1]].add_(total)
        for key in self._call_keys:
            counts[key] = counts.get(key, 0) + 1
        self._discard_call()

    def _observe(self, label: str, site: int, h: torch.Tensor, cond_rows: list[int]) -> None:
        if label != self._call_label or site in self._staged_sites:
            return  # no open call for this label (or a site seen twice): never half-count
        self._stage(site, h, cond_rows)
        self._staged_sites.add(site)
        if len(self._staged_sites) == self.depth:
            self._commit_call()

    def _stage(self, site: int, h: torch.Tensor, cond_rows: list[int]) -> None:
        first, last = cond_rows[0], cond_rows[-1]
        if last - first + 1 == len(cond_rows):
            rows = h[first : last + 1]  # contiguous (always, for [uncond, cond]): a view, no copy
        else:
            rows = h.index_select(0, torch.tensor(cond_rows, device=h.device))
        means = rows.to(self.accumulate_dtype).mean(dim=1)  # [b, D]
        keys = self._call_keys
        if len(set(keys)) == 1:
            self._staged.append((keys[0], site, means.sum(dim=0)))
            return
        for key in dict.fromkeys(keys):
            picked = [i for i, k in enumerate(keys) if k == key]
            self._staged.append((key, site, means[picked].sum(dim=0)))

    def _sum_for(self, sums: dict[float, torch.Tensor], key: float, device: torch.device) -> torch.Tensor:
        buffer = sums.get(key)
        if buffer is None:
            buffer = torch.zeros(self.depth, self.hidden_size, dtype=self.accumulate_dtype, device=device)
            sums[key] = buffer
        return buffer

    # Combination --------------------------------------------------------------------------------
    def add(self, other: VectorEstimator) -> VectorEstimator:
        """Add another estimator's sums and counts into this one, in place; returns ``self``.

        Adding per-batch estimators in one fixed order gives the same bits however the batches
        were spread over processes, which is how ``medsteer build-vector`` under ``torchrun``
        matches a single process exactly.

        Raises:
            MedSteerError: the two estimators have different geometry.
        """
        if other.widths != self.widths:
            raise MedSteerError(
                f"cannot add an estimator of {_describe(other.widths, 'x')} to one of "
                f"{_describe(self.widths, 'x')}: both must come from the same model"
            )
        for label in LABELS:
            sums = self._sums[label]
            for key, total in other._sums[label].items():
                device = sums[key].device if key in sums else total.device
                self._sum_for(sums, key, device).add_(total.to(device=device, dtype=self.accumulate_dtype))
            counts = self._counts[label]
            for key, n in other._counts[label].items():
                counts[key] = counts.get(key, 0) + n
        return self

    def to(self, device: torch.device | str) -> VectorEstimator:
        """A copy with the running sums on ``device`` (e.g. ``"cpu"`` before sending it elsewhere)."""
        copy = VectorEstimator(accumulate_dtype=self.accumulate_dtype, widths=self.widths)
        for label in LABELS:
            copy._sums[label] = {k: v.to(device, copy=True) for k, v in self._sums[label].items()}
            copy._counts[label] = dict(self._counts[label])
        return copy

    # Results ------------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes held by the running sums (independent of the number of seeds)."""
        return sum(t.numel() * t.element_size() for per in self._sums.values() for t in per.values())

    def images(self, label: str) -> int:
        """Largest number of images seen at any timestep for ``label``."""
        return max(self._counts[label].values(), default=0)

    def result(self, provenance: Provenance | None = None) -> PathologyVector:
        """Build the pathology vector from everything captured so far.

        Args:
            provenance: where the activations came from (concepts, prompts, seeds, sampler, ...);
                its ``site_widths`` are replaced by the estimator's.

        Raises:
            MedSteerError: one of the classes was never captured.
        """
        for label in LABELS:
            if not self._counts[label]:
                raise MedSteerError(
                    f"no images captured for the {label!r} class: sample with capture(..., {label!r}) "
                    "before calling result()"
                )
        keys = sorted(set(self._counts["with"]) | set(self._counts["without"]))
        zeros = torch.zeros(self.depth, self.hidden_size, dtype=torch.float64)

        def stacked(label: str) -> tuple[torch.Tensor, torch.Tensor]:
            sums = [self._sums[label].get(k, zeros).detach().double().cpu() for k in keys]
            counts = [self._counts[label].get(k, 0) for k in keys]
            return torch.stack(sums), torch.tensor(counts, dtype=torch.int64)

        sum_with, count_with = stacked("with")
        sum_without, count_without = stacked("without")
        provenance = (provenance or Provenance()).replace(site_widths=())  # the estimator's widths are the vector's
        return PathologyVector.from_sums(
            torch.tensor(keys, dtype=torch.float64),
            sum_with,
            sum_without,
            count_with,
            count_without,
            provenance,
            widths=self.widths,
        )


def _describe(widths: tuple[int, ...], joiner: str = "of width") -> str:
    """``28 layers of width 1152`` (one width) or ``3 layers of widths [8, 8, 16]``."""
    if len(set(widths)) == 1:
        return f"{len(widths)} layers {joiner} {widths[0]}"
    return f"{len(widths)} layers of widths {list(widths)}"
