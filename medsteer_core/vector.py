"""The pathology vector: one unit direction per (timestep, layer), with its provenance.

``directions[k, l]`` is ``v_{l,t_k}`` of the paper (method.md, "Pathology vector"): the normalised
difference of the mean cross-attention output with and without the concept, at layer ``l`` and model
timestep ``timesteps[k]`` (0-999 scale). Rows are keyed by the model's timestep, not by the step
index, so one vector serves any sampler, scheduler and step count, in diffusers and in ComfyUI.

Where a vector came from is its typed ``provenance`` (``provenance.Provenance``); strings exist only
in the file (``vector_file.save_vector`` / ``load_vector``, safetensors, never pickle). This module
does not import ``vector_file``: the file format depends on the vector, not the other way round.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from . import vector_algebra
from .errors import VectorMismatchError
from .provenance import Provenance, weights_fingerprint
from .vector_checks import external_rows, short_widths

__all__ = ["INTERPOLATIONS", "TENSOR_SPEC", "PathologyVector"]

INTERPOLATIONS = ("nearest", "linear")

#: The tensors of a vector (and of its file): name -> (rank, dtype).
TENSOR_SPEC = {
    "directions": (3, torch.float32),
    "timesteps": (1, torch.float32),
    "sum_with": (3, torch.float32),
    "sum_without": (3, torch.float32),
    "count_with": (1, torch.int64),
    "count_without": (1, torch.int64),
}


@dataclass(eq=False)
class PathologyVector:
    """Per-(timestep, layer) unit directions of one concept, plus the sums they came from.

    Sites may have different widths (``widths``); every ``[..., D]`` tensor is then as wide as the
    widest site, ``D = max(widths)``, and zero beyond each site's width.

    Attributes:
        directions: ``[K, L, D]`` float32 unit rows (all-zero rows where undefined).
        timesteps: ``[K]`` float32, strictly increasing model timesteps (0-999) of the rows.
        sum_with: ``[K, L, D]`` float32 sum over seeds of the per-image token mean, with the concept.
        sum_without: ``[K, L, D]`` the same without the concept.
        count_with: ``[K]`` int64 number of images summed per row, with the concept.
        count_without: ``[K]`` int64 the same without the concept.
        provenance: where the vector came from (concepts, prompts, seeds, sampler, model family,
            calibrated setting, ...); its ``site_widths`` are always this vector's ``widths``.
        gain: multiplies the strength of every plan that uses this vector (``vector * k``).
        widths: width of each site (default: the provenance's ``site_widths``, else ``D`` for
            every site).
        file_format_version: the format version of the file it was loaded from (``"1"``, ``"2"``),
            ``""`` for a vector made in memory.

    Example:
        >>> v = load_vector("dye.safetensors")          # doctest: +SKIP
        >>> v.at(500.0).shape                           # doctest: +SKIP
        torch.Size([28, 1152])
        >>> v.provenance.model_family                   # doctest: +SKIP
        'pixart'
    """

    directions: torch.Tensor
    timesteps: torch.Tensor
    sum_with: torch.Tensor
    sum_without: torch.Tensor
    count_with: torch.Tensor
    count_without: torch.Tensor
    provenance: Provenance = field(default_factory=Provenance)
    gain: float = 1.0
    widths: tuple[int, ...] | None = None
    file_format_version: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.provenance, Provenance):
            raise TypeError(
                f"PathologyVector.provenance must be a Provenance, got {type(self.provenance).__name__}: "
                "build one with medsteer_core.provenance.Provenance(...)"
            )
        self.widths = self._resolve_widths(self.widths, self.provenance.site_widths)
        from . import __version__

        self.provenance = self.provenance.replace(
            site_widths=self.widths,
            origin=self.provenance.origin or "estimated",
            library_version=self.provenance.library_version or __version__,
        )
        self._device_cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _resolve_widths(self, widths, stored: tuple[int, ...]) -> tuple[int, ...]:
        layers, width = self.depth, self.hidden_size
        if widths is None:
            widths = stored or (width,) * layers
        widths = tuple(int(w) for w in widths)
        if stored and stored != widths:
            raise ValueError(f"widths {list(widths)} disagree with the provenance's site_widths {list(stored)}")
        if len(widths) != layers or not all(1 <= w <= width for w in widths) or max(widths) != width:
            raise ValueError(
                f"widths {list(widths)[:40]} do not fit directions of shape {tuple(self.directions.shape)}: "
                f"give one width per site ({layers}), each 1-{width}, the widest equal to {width}"
            )
        return widths

    @property
    def ragged(self) -> bool:
        """True when the sites have different widths."""
        return len(set(self.widths)) > 1

    def with_provenance(self, provenance: Provenance) -> PathologyVector:
        """The same vector (tensors shared, gain kept) with another provenance.

        Example:
            >>> calibrated = vector.with_provenance(vector.provenance.replace(calibrated_strength=2.5))  # doctest: +SKIP
        """
        return PathologyVector(
            self.directions,
            self.timesteps,
            self.sum_with,
            self.sum_without,
            self.count_with,
            self.count_without,
            provenance.replace(site_widths=()),
            gain=self.gain,
            widths=self.widths,
            file_format_version=self.file_format_version,
        )

    def check_weights(self, sites) -> None:
        """Raise ``VectorMismatchError`` if the vector was built on other weights than ``sites``'.

        Hashing the weights costs a pass over every site's output projection, so hosts call this
        once (when a vector is loaded for a model), not at every model call. A vector without a
        recorded fingerprint (0.1.0 files) passes.
        """
        recorded = self.provenance.weights_fingerprint
        if not recorded:
            return
        actual = weights_fingerprint(sites)
        if actual and actual != recorded:
            raise VectorMismatchError(
                f"this pathology vector was built on other weights (fingerprint {recorded}) than the "
                f"model's (fingerprint {actual}): the shapes fit but the directions may not. Rebuild the "
                "vector on this model (BuildPathologyVector / `medsteer build-vector`)"
            )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_sums(
        cls,
        timesteps: torch.Tensor,
        sum_with: torch.Tensor,
        sum_without: torch.Tensor,
        count_with: torch.Tensor,
        count_without: torch.Tensor,
        provenance: Provenance | None = None,
        widths: tuple[int, ...] | None = None,
    ) -> PathologyVector:
        """Build a vector from per-class sums of token means (what ``VectorEstimator`` collects).

        Args:
            timesteps: ``[K]`` model timesteps of the rows (any order; they are sorted).
            sum_with / sum_without: ``[K, L, D]`` sums of per-image token means (zero beyond each
                site's width).
            count_with / count_without: ``[K]`` number of images in each sum.
            provenance: where the sums came from.
            widths: width of each site (default: ``D`` for every site).

        Returns:
            The vector; rows where a class has no images, or the two means coincide, are zero.
        """
        order = torch.argsort(timesteps.double())
        timesteps = timesteps.double()[order]
        sum_with = sum_with.double()[order]
        sum_without = sum_without.double()[order]
        count_with = count_with.long()[order]
        count_without = count_without.long()[order]
        directions = directions_from_sums(sum_with, sum_without, count_with, count_without)
        return cls(
            directions=directions.float(),
            timesteps=timesteps.float(),
            sum_with=sum_with.float(),
            sum_without=sum_without.float(),
            count_with=count_with,
            count_without=count_without,
            provenance=provenance if provenance is not None else Provenance(),
            widths=widths,
        )

    @classmethod
    def from_directions(
        cls,
        directions,
        timesteps: Sequence[float] | torch.Tensor | None = None,
        widths: Sequence[int] | None = None,
        provenance: Provenance | None = None,
    ) -> PathologyVector:
        """Build a vector from directions computed elsewhere, checked as a loaded file is.

        For directions from another implementation (e.g. the authors' per-step ``.pt`` arrays,
        converted in a trusted session): give the rows and the model timestep each row belongs to.
        The sums are the directions themselves with one image per class and row (``sum_with`` =
        direction, ``sum_without`` = 0, counts 1), so ``inspect`` reads them and ``merge`` averages
        directions (a merge still needs seeds in the provenance).

        Args:
            directions: ``[K, L, D]`` rows (a tensor, a NumPy array, or a list of K ``[L, D]``
                arrays, e.g. indexed by sampling step), or a mapping ``{timestep: [L, D]}``.
                With ``widths``, zero beyond each site's width.
            timesteps: ``K`` model timesteps (0-1000), one per row, distinct, in any order (step
                order is decreasing); rows are sorted by timestep. ``None`` with a mapping.
            widths: width of each site (default: ``D`` for every site).
            provenance: where the directions came from.

        Returns:
            A vector with ``origin`` ``"external"`` unless the provenance says otherwise.

        Raises:
            ValueError: the shapes do not agree, a value is not finite, a row is neither unit
                length (within 1e-3) nor zero, a timestep repeats or is outside 0-1000; the message
                names the row and the fix.

        Example:
            >>> rows = [torch.nn.functional.normalize(torch.randn(28, 1152), dim=-1) for _ in range(20)]
            >>> v = PathologyVector.from_directions(rows, scheduler_timesteps)   # doctest: +SKIP
        """
        keys, rows = external_rows(directions, timesteps)
        provenance = provenance if provenance is not None else Provenance()
        widths = tuple(int(w) for w in widths) if widths is not None else provenance.site_widths or None
        if widths is not None and len(widths) == rows.shape[1] and all(0 <= w <= rows.shape[2] for w in widths):
            beyond = torch.arange(rows.shape[2])[None, :] >= torch.tensor(widths)[:, None]
            if bool(rows[:, beyond].any()):
                raise ValueError(f"directions are not zero beyond the width of each site {short_widths(widths)}")
        ones = torch.ones(keys.shape[0], dtype=torch.int64)
        rows = rows.float()
        return cls(
            directions=rows,
            timesteps=keys.float(),
            sum_with=rows.clone(),
            sum_without=torch.zeros_like(rows),
            count_with=ones,
            count_without=ones.clone(),
            provenance=provenance.replace(origin=provenance.origin or "external", site_widths=()),
            widths=widths,
        )

    # ------------------------------------------------------------------ geometry
    @property
    def num_timesteps(self) -> int:
        """K, the number of timestep rows."""
        return int(self.directions.shape[0])

    @property
    def depth(self) -> int:
        """L, the number of transformer blocks (sites) the vector covers."""
        return int(self.directions.shape[1])

    @property
    def hidden_size(self) -> int:
        """D, the width of the cross-attention output (of the widest site when they differ)."""
        return int(self.directions.shape[2])

    @property
    def concept_with(self) -> str:
        """The concept of the "with" class (``provenance.concept_with``)."""
        return self.provenance.concept_with

    @property
    def concept_without(self) -> str:
        """The concept of the "without" class (``provenance.concept_without``)."""
        return self.provenance.concept_without

    def check_compatible(
        self, depth_or_widths: int | Sequence[int], hidden_size: int | None = None, what: str = "the model"
    ) -> None:
        """Raise ``VectorMismatchError`` unless the vector fits a model with these site widths.

        Args:
            depth_or_widths: the width of each site (``site_widths(sites)``), or the number of
                sites when ``hidden_size`` gives their one width.
            hidden_size: width of every site's cross-attention output, with a depth.
            what: how to name the model in the message.

        Example:
            >>> vector.check_compatible(site_widths(find_sites(model)))   # doctest: +SKIP
        """
        if hidden_size is not None:
            widths = (int(hidden_size),) * int(depth_or_widths)
        elif isinstance(depth_or_widths, int):
            raise TypeError("check_compatible needs the sites' widths, or a depth and a hidden_size")
        else:
            widths = tuple(int(w) for w in depth_or_widths)
        if widths == self.widths:
            return
        if len(set(widths)) <= 1 and not self.ragged:
            width = widths[0] if widths else 0
            raise VectorMismatchError(
                f"this pathology vector was built for hidden size {self.hidden_size} with "
                f"{self.depth} layers; {what} has hidden size {width} and {len(widths)} layers. "
                "Rebuild the vector on this model (BuildPathologyVector / `medsteer build-vector`)."
            )
        raise VectorMismatchError(
            f"this pathology vector was built for widths {short_widths(self.widths)} ({self.depth} sites); "
            f"{what} has widths {short_widths(widths)} ({len(widths)} sites): rebuild it on this model "
            "(BuildPathologyVector / `medsteer build-vector`)."
        )

    # ------------------------------------------------------------------ lookup
    def at(self, timestep: float, interpolation: str = "nearest") -> torch.Tensor:
        """The ``[L, D]`` directions for one model timestep.

        Args:
            timestep: model timestep (0-999 scale). Outside the key range it clamps to the end row.
            interpolation: ``"nearest"`` key (default; exact at the keys) or ``"linear"``
                interpolation between the two neighbouring keys, renormalised per layer.

        Returns:
            ``[L, D]`` float32 tensor (a new tensor).
        """
        rows = self.lookup(torch.tensor([float(timestep)]), interpolation=interpolation)
        return rows[0].clone()

    def lookup(
        self,
        timesteps: torch.Tensor,
        interpolation: str = "nearest",
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Directions for a batch of timesteps, on the timesteps' device, without a host sync.

        Args:
            timesteps: ``[B]`` model timesteps (any float dtype, any device).
            interpolation: ``"nearest"`` or ``"linear"`` (see ``at``).
            dtype: dtype of the result (default float32).

        Returns:
            ``[B, L, D]`` directions.
        """
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
        dtype = dtype or torch.float32
        keys, directions = self._on(timesteps.device, dtype)
        t = timesteps.reshape(-1).to(keys.dtype).contiguous()  # searchsorted warns on expanded views
        k = keys.shape[0]
        upper = torch.searchsorted(keys, t).clamp(0, k - 1)
        lower = (upper - 1).clamp_min(0)
        k_low, k_up = keys[lower], keys[upper]
        if interpolation == "nearest":
            # Ties go to the lower key; outside the range both candidates are the end row.
            index = torch.where((t - k_low).abs() <= (k_up - t).abs(), lower, upper)
            return directions[index].to(dtype)
        span = (k_up - k_low).clamp_min(1e-12)
        w = ((t - k_low) / span).clamp(0, 1)
        w = torch.where(upper == lower, torch.zeros_like(w), w)[:, None, None]
        d_low, d_up = directions[lower], directions[upper]
        mixed = (1 - w) * d_low + w * d_up
        mixed = mixed / mixed.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        # Exact at the keys (and outside the range), where no interpolation is needed.
        mixed = torch.where(w == 0, d_low, torch.where(w == 1, d_up, mixed))
        return mixed.to(dtype)

    def _on(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Copy once per device, not per hook call (the authors' code copies on every call).
        key = (torch.device(device), dtype)
        cached = self._device_cache.get(key)
        if cached is None:
            cached = (
                self.timesteps.to(device=device, dtype=torch.float32),
                self.directions.to(device=device, dtype=dtype),
            )
            self._device_cache[key] = cached
        return cached

    # ------------------------------------------------------------------ combination (vector_algebra)
    def merge(self, other: PathologyVector) -> PathologyVector:
        """Pool the seeds of two vectors built on the same model with the same concepts.

        The result equals a vector built from the union of both seed sets (sums and counts add;
        directions are recomputed). Timestep keys present in only one vector are kept.

        Raises:
            VectorMismatchError: different site widths, concepts, model family or weights
                fingerprint; overlapping seeds, or a vector that records no seeds (the overlap
                cannot be ruled out); a vector made by arithmetic (which has no sums).
        """
        return vector_algebra.merge(self, other)

    def __neg__(self) -> PathologyVector:
        """The reverse edit: the same vector built the other way round (with and without swapped)."""
        return vector_algebra.negate(self)

    def __mul__(self, k: float) -> PathologyVector:
        """Scale the edit: steering with ``vector * k`` at strength ``s`` equals ``vector`` at ``s * k``.

        The directions stay unit vectors (the gate is a dot product with them); ``k`` multiplies the
        vector's ``gain``. A negative ``k`` amplifies the concept; ``-vector`` is the reverse edit.
        """
        if not isinstance(k, (int, float)) or isinstance(k, bool) or not math.isfinite(k):
            return NotImplemented
        return vector_algebra.scale(self, k)

    __rmul__ = __mul__

    def __add__(self, other: PathologyVector) -> PathologyVector:
        """Compose two concepts into one direction: ``normalize(g1 * v1 + g2 * v2)`` per row.

        Both vectors must share geometry and timestep keys. The result has gain 1 and no sums
        (it cannot be merged). To apply two edits one after the other, chain two steering plans
        instead; that is what the paper's compositional edits do.
        """
        if not isinstance(other, PathologyVector):
            return NotImplemented
        return vector_algebra.compose(self, other)

    def __sub__(self, other: PathologyVector) -> PathologyVector:
        if not isinstance(other, PathologyVector):
            return NotImplemented
        return self + (-other)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PathologyVector):
            return NotImplemented
        return (
            self.gain == other.gain
            and self.widths == other.widths
            and self.provenance == other.provenance
            and all(torch.equal(getattr(self, n), getattr(other, n)) for n in TENSOR_SPEC)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"PathologyVector({self.concept_with!r} vs {self.concept_without!r}, "
            f"K={self.num_timesteps}, L={self.depth}, D={self.hidden_size}, "
            + (f"widths={short_widths(self.widths)}, " if self.ragged else "")
            + f"gain={self.gain:g}, "
            f"images={int(self.count_with.max()) if self.count_with.numel() else 0}+"
            f"{int(self.count_without.max()) if self.count_without.numel() else 0})"
        )

    def difference_norms(self) -> torch.Tensor:
        """``[K, L]`` L2 norm of the mean difference (with minus without) before normalisation."""
        mean_with = self.sum_with.double() / self.count_with.clamp_min(1).double()[:, None, None]
        mean_without = self.sum_without.double() / self.count_without.clamp_min(1).double()[:, None, None]
        return (mean_with - mean_without).norm(dim=-1).float()


# ---------------------------------------------------------------------- construction helpers


def directions_from_sums(
    sum_with: torch.Tensor, sum_without: torch.Tensor, count_with: torch.Tensor, count_without: torch.Tensor
) -> torch.Tensor:
    defined = (count_with > 0) & (count_without > 0)
    mean_with = sum_with / count_with.clamp_min(1).to(sum_with.dtype)[:, None, None]
    mean_without = sum_without / count_without.clamp_min(1).to(sum_without.dtype)[:, None, None]
    diff = mean_with - mean_without
    norm = diff.norm(dim=-1, keepdim=True)
    directions = diff / norm.clamp_min(1e-30)
    keep = defined[:, None, None] & (norm > 0)
    return torch.where(keep, directions, torch.zeros_like(directions))
