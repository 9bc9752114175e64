"""The pathology vector: one unit direction per (timestep, layer), with its provenance.

``directions[k, l]`` is ``v_{l,t_k}`` of the paper (method.md, "Pathology vector"): the normalised
difference of the mean cross-attention output with and without the concept, at layer ``l`` and model
timestep ``timesteps[k]`` (0-999 scale). Rows are keyed by the model's timestep, not by the step
index, so one vector serves any sampler, scheduler and step count, in diffusers and in ComfyUI.

Files are safetensors with string metadata (never pickle); see ``save_vector`` / ``load_vector``.
"""

from __future__ import annotations

import ast
import json
import math
import os
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import VectorFileError, VectorMismatchError

__all__ = [
    "CALIBRATED_FIELDS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "PathologyVector",
    "calibrated_setting",
    "load_vector",
    "metadata_list",
    "save_vector",
]

FORMAT_NAME = "medsteer.pathology_vector"
FORMAT_VERSION = "1"
INTERPOLATIONS = ("nearest", "linear")

# Tensors every file carries: name -> (rank, dtype).
_TENSOR_SPEC = {
    "directions": (3, torch.float32),
    "timesteps": (1, torch.float32),
    "sum_with": (3, torch.float32),
    "sum_without": (3, torch.float32),
    "count_with": (1, torch.int64),
    "count_without": (1, torch.int64),
}
_REQUIRED_METADATA = (
    "format",
    "format_version",
    "concept_with",
    "concept_without",
    "hidden_size",
    "depth",
    "library_version",
)
_UNIT_TOLERANCE = 1e-3
_KEY_TOLERANCE = 1e-3  # two timesteps closer than this are the same key
_MAX_HEADER_BYTES = 100 * 1024 * 1024
#: Largest vector file read. A vector is 3 float32 [K, L, D] tensors: 1000 timestep keys x 28
#: layers x 1152 (every timestep of PixArt-XL-2) is 0.39 GB, so 2 GiB leaves room for 5x wider
#: models while a crafted or sparse file cannot make the loader read (and hold) terabytes.
_MAX_FILE_BYTES = 2 * 1024**3


@dataclass(eq=False)
class PathologyVector:
    """Per-(timestep, layer) unit directions of one concept, plus the sums they came from.

    Attributes:
        directions: ``[K, L, D]`` float32 unit rows (all-zero rows where undefined).
        timesteps: ``[K]`` float32, strictly increasing model timesteps (0-999) of the rows.
        sum_with: ``[K, L, D]`` float32 sum over seeds of the per-image token mean, with the concept.
        sum_without: ``[K, L, D]`` the same without the concept.
        count_with: ``[K]`` int64 number of images summed per row, with the concept.
        count_without: ``[K]`` int64 the same without the concept.
        metadata: provenance strings (concepts, prompts, seeds, sampler, model geometry, ...).
        gain: multiplies the strength of every plan that uses this vector (``vector * k``).

    Example:
        >>> v = load_vector("dye.safetensors")          # doctest: +SKIP
        >>> v.at(500.0).shape                           # doctest: +SKIP
        torch.Size([28, 1152])
    """

    directions: torch.Tensor
    timesteps: torch.Tensor
    sum_with: torch.Tensor
    sum_without: torch.Tensor
    count_with: torch.Tensor
    count_without: torch.Tensor
    metadata: dict[str, str] = field(default_factory=dict)
    gain: float = 1.0

    def __post_init__(self) -> None:
        self.metadata = {str(k): str(v) for k, v in self.metadata.items()}
        self.metadata.setdefault("format", FORMAT_NAME)
        self.metadata.setdefault("format_version", FORMAT_VERSION)
        self.metadata.setdefault("hidden_size", str(self.hidden_size))
        self.metadata.setdefault("depth", str(self.depth))
        self.metadata.setdefault("concept_with", "")
        self.metadata.setdefault("concept_without", "")
        self.metadata.setdefault("origin", "estimated")
        from . import __version__

        self.metadata.setdefault("library_version", __version__)
        self._device_cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_sums(
        cls,
        timesteps: torch.Tensor,
        sum_with: torch.Tensor,
        sum_without: torch.Tensor,
        count_with: torch.Tensor,
        count_without: torch.Tensor,
        metadata: Mapping[str, str] | None = None,
    ) -> PathologyVector:
        """Build a vector from per-class sums of token means (what ``VectorEstimator`` collects).

        Args:
            timesteps: ``[K]`` model timesteps of the rows (any order; they are sorted).
            sum_with / sum_without: ``[K, L, D]`` sums of per-image token means.
            count_with / count_without: ``[K]`` number of images in each sum.
            metadata: provenance strings.

        Returns:
            The vector; rows where a class has no images, or the two means coincide, are zero.
        """
        order = torch.argsort(timesteps.double())
        timesteps = timesteps.double()[order]
        sum_with = sum_with.double()[order]
        sum_without = sum_without.double()[order]
        count_with = count_with.long()[order]
        count_without = count_without.long()[order]
        directions = _directions_from_sums(sum_with, sum_without, count_with, count_without)
        return cls(
            directions=directions.float(),
            timesteps=timesteps.float(),
            sum_with=sum_with.float(),
            sum_without=sum_without.float(),
            count_with=count_with,
            count_without=count_without,
            metadata=dict(metadata or {}),
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
        """D, the width of the cross-attention output."""
        return int(self.directions.shape[2])

    @property
    def concept_with(self) -> str:
        return self.metadata.get("concept_with", "")

    @property
    def concept_without(self) -> str:
        return self.metadata.get("concept_without", "")

    def check_compatible(self, depth: int, hidden_size: int, what: str = "the model") -> None:
        """Raise ``VectorMismatchError`` unless the vector fits a model of this depth and width.

        Args:
            depth: number of transformer blocks of the model.
            hidden_size: width of its cross-attention output.
            what: how to name the model in the message.
        """
        if (self.depth, self.hidden_size) != (depth, hidden_size):
            raise VectorMismatchError(
                f"this pathology vector was built for hidden size {self.hidden_size} with "
                f"{self.depth} layers; {what} has hidden size {hidden_size} and {depth} layers. "
                "Rebuild the vector on this model (BuildPathologyVector / `medsteer build-vector`)."
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

    # ------------------------------------------------------------------ combination
    def merge(self, other: PathologyVector) -> PathologyVector:
        """Pool the seeds of two vectors built on the same model with the same concepts.

        The result equals a vector built from the union of both seed sets (sums and counts add;
        directions are recomputed). Timestep keys present in only one vector are kept.

        Raises:
            VectorMismatchError: different geometry, concepts, or overlapping seeds, or a vector
                made by arithmetic (which has no sums).
        """
        for vec in (self, other):
            if vec.metadata.get("origin", "estimated") != "estimated":
                raise VectorMismatchError(
                    f"cannot merge a vector made by arithmetic (origin {vec.metadata['origin']!r}): "
                    "only vectors estimated from seeds carry the sums a merge needs"
                )
        other.check_compatible(self.depth, self.hidden_size, what="the vector it is merged into")
        for key in ("concept_with", "concept_without", "model_family"):
            a, b = self.metadata.get(key, ""), other.metadata.get(key, "")
            if a != b:
                raise VectorMismatchError(f"cannot merge vectors with different {key}: {a!r} vs {b!r}")
        seeds_a, seeds_b = _seed_list(self.metadata), _seed_list(other.metadata)
        overlap = sorted(set(seeds_a) & set(seeds_b))
        if overlap:
            raise VectorMismatchError(
                f"cannot merge vectors that share seeds {overlap[:10]}: their images would count "
                "twice. Build the extra vector with a different seed range."
            )
        keys = list(self.timesteps.double().tolist())
        sums = {n: list(getattr(self, n).double().unbind(0)) for n in ("sum_with", "sum_without")}
        counts = {n: list(getattr(self, n).tolist()) for n in ("count_with", "count_without")}
        for j, t in enumerate(other.timesteps.double().tolist()):
            match = next((i for i, k in enumerate(keys) if abs(k - t) <= _KEY_TOLERANCE), None)
            if match is None:
                keys.append(t)
                for n in sums:
                    sums[n].append(getattr(other, n)[j].double())
                for n in counts:
                    counts[n].append(int(getattr(other, n)[j]))
            else:
                for n in sums:
                    sums[n][match] = sums[n][match] + getattr(other, n)[j].double()
                for n in counts:
                    counts[n][match] += int(getattr(other, n)[j])
        metadata = dict(self.metadata)
        metadata["seeds"] = json.dumps(seeds_a + seeds_b)
        metadata.pop("library_version", None)
        return PathologyVector.from_sums(
            torch.tensor(keys),
            torch.stack(sums["sum_with"]),
            torch.stack(sums["sum_without"]),
            torch.tensor(counts["count_with"]),
            torch.tensor(counts["count_without"]),
            metadata,
        )

    def __neg__(self) -> PathologyVector:
        """The reverse edit: the same vector built the other way round (with and without swapped)."""
        metadata = dict(self.metadata)
        metadata["concept_with"], metadata["concept_without"] = self.concept_without, self.concept_with
        for a, b in (("prompts_with", "prompts_without"),):
            if a in metadata or b in metadata:
                metadata[a], metadata[b] = self.metadata.get(b, ""), self.metadata.get(a, "")
        return PathologyVector(
            directions=-self.directions,
            timesteps=self.timesteps.clone(),
            sum_with=self.sum_without.clone(),
            sum_without=self.sum_with.clone(),
            count_with=self.count_without.clone(),
            count_without=self.count_with.clone(),
            metadata=metadata,
            gain=self.gain,
        )

    def __mul__(self, k: float) -> PathologyVector:
        """Scale the edit: steering with ``vector * k`` at strength ``s`` equals ``vector`` at ``s * k``.

        The directions stay unit vectors (the gate is a dot product with them); ``k`` multiplies the
        vector's ``gain``. A negative ``k`` amplifies the concept; ``-vector`` is the reverse edit.
        """
        if not isinstance(k, (int, float)) or isinstance(k, bool) or not math.isfinite(k):
            return NotImplemented
        return PathologyVector(
            self.directions.clone(),
            self.timesteps.clone(),
            self.sum_with.clone(),
            self.sum_without.clone(),
            self.count_with.clone(),
            self.count_without.clone(),
            dict(self.metadata),
            gain=self.gain * float(k),
        )

    __rmul__ = __mul__

    def __add__(self, other: PathologyVector) -> PathologyVector:
        """Compose two concepts into one direction: ``normalize(g1 * v1 + g2 * v2)`` per row.

        Both vectors must share geometry and timestep keys. The result has gain 1 and no sums
        (it cannot be merged). To apply two edits one after the other, chain two steering plans
        instead; that is what the paper's compositional edits do.
        """
        if not isinstance(other, PathologyVector):
            return NotImplemented
        other.check_compatible(self.depth, self.hidden_size, what="the other vector")
        if other.timesteps.shape != self.timesteps.shape or not torch.allclose(
            other.timesteps, self.timesteps, atol=_KEY_TOLERANCE, rtol=0
        ):
            raise VectorMismatchError(
                f"cannot add vectors with different timestep keys ({self.num_timesteps} vs "
                f"{other.num_timesteps} rows): build both with the same scheduler and steps, or "
                "chain two steering plans instead"
            )
        mixed = self.gain * self.directions.double() + other.gain * other.directions.double()
        directions = mixed / mixed.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        directions = torch.where(mixed.norm(dim=-1, keepdim=True) > 1e-12, directions, torch.zeros_like(directions))
        zeros = torch.zeros_like(self.sum_with)
        metadata = {
            "origin": "composed",
            "concept_with": f"({self.concept_with}) + ({other.concept_with})",
            "concept_without": f"({self.concept_without}) + ({other.concept_without})",
            "model_family": self.metadata.get("model_family", ""),
            "composed_of": json.dumps([_provenance(self), _provenance(other)]),
        }
        return PathologyVector(
            directions.float(),
            self.timesteps.clone(),
            zeros,
            zeros.clone(),
            torch.zeros_like(self.count_with),
            torch.zeros_like(self.count_without),
            metadata,
        )

    def __sub__(self, other: PathologyVector) -> PathologyVector:
        if not isinstance(other, PathologyVector):
            return NotImplemented
        return self + (-other)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PathologyVector):
            return NotImplemented
        return (
            self.gain == other.gain
            and self.metadata == other.metadata
            and all(torch.equal(getattr(self, n), getattr(other, n)) for n in _TENSOR_SPEC)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"PathologyVector({self.concept_with!r} vs {self.concept_without!r}, "
            f"K={self.num_timesteps}, L={self.depth}, D={self.hidden_size}, gain={self.gain:g}, "
            f"images={int(self.count_with.max()) if self.count_with.numel() else 0}+"
            f"{int(self.count_without.max()) if self.count_without.numel() else 0})"
        )

    def difference_norms(self) -> torch.Tensor:
        """``[K, L]`` L2 norm of the mean difference (with minus without) before normalisation."""
        mean_with = self.sum_with.double() / self.count_with.clamp_min(1).double()[:, None, None]
        mean_without = self.sum_without.double() / self.count_without.clamp_min(1).double()[:, None, None]
        return (mean_with - mean_without).norm(dim=-1).float()


def _directions_from_sums(
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


def metadata_list(metadata: Mapping[str, str], key: str, item: type = str) -> list:
    """The list of prompts or seeds stored under ``key`` in a vector's metadata (``[]`` if absent).

    medsteer writes JSON (``["a", "b"]``, ``[0, 1]``). The MedSteer-mini vectors shipped before
    issue 11 hold prompts as a Python list ``repr`` and seeds as ``0,1,2``; both are read too, with
    ``ast.literal_eval`` (literals only, never code). A bare string reads as one prompt.

    Args:
        metadata: a vector's metadata.
        key: ``"prompts_with"``, ``"prompts_without"``, ``"seeds"``, ...
        item: ``str`` for prompts, ``int`` for seeds; every element must be one.

    Returns:
        The list, each element of type ``item``.

    Raises:
        VectorFileError: the value is not a list of ``item`` in any of these forms.

    Example:
        >>> metadata_list({"seeds": "0,1,2"}, "seeds", int)
        [0, 1, 2]
    """
    raw = metadata.get(key, "")
    if not raw.strip():
        return []
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # JSONDecodeError, or an integer past the 4300-digit limit
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            value = None
    if item is str and not isinstance(value, (list, tuple, str)) and not raw.lstrip().startswith(("[", "(")):
        value = raw  # one prompt, written by hand
    if isinstance(value, item) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, (list, tuple)) and all(isinstance(x, item) and not isinstance(x, bool) for x in value):
        return list(value)
    kind = "prompts (strings)" if item is str else "integers"
    raise VectorFileError(
        f"metadata {key}={raw[:80]!r} is not a list of {kind}: write it as JSON, e.g. "
        + ('["a prompt", "another"]' if item is str else "[0, 1, 2]")
    )


def _seed_list(metadata: Mapping[str, str]) -> list[int]:
    return metadata_list(metadata, "seeds", int)


def _provenance(vector: PathologyVector) -> dict:
    return {
        "concept_with": vector.concept_with,
        "concept_without": vector.concept_without,
        "gain": vector.gain,
        "origin": vector.metadata.get("origin", "estimated"),
    }


# ---------------------------------------------------------------------- file I/O
def save_vector(vector: PathologyVector, path: str | os.PathLike) -> Path:
    """Write a vector as ``.safetensors`` with string metadata (atomic: a temp file, then rename).

    Args:
        vector: the vector to write.
        path: destination; ``.safetensors`` is appended if missing.

    Returns:
        The path written.
    """
    from safetensors.torch import save as st_save

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    metadata = dict(vector.metadata)
    metadata["format"] = FORMAT_NAME
    metadata["format_version"] = FORMAT_VERSION
    metadata["hidden_size"] = str(vector.hidden_size)
    metadata["depth"] = str(vector.depth)
    metadata["gain"] = repr(float(vector.gain))
    tensors = {name: getattr(vector, name).to(dtype).contiguous().cpu() for name, (_, dtype) in _TENSOR_SPEC.items()}
    data = _sorted_header(st_save(tensors, metadata=metadata))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def _sorted_header(data: bytes) -> bytes:
    """The same safetensors bytes with the JSON header's keys sorted.

    safetensors writes the metadata map in hash order, which changes from process to process;
    sorted, equal vectors give equal files (``torchrun`` build-vector == one process).
    """
    (n,) = struct.unpack("<Q", data[:8])
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the tensor data stays 8-byte aligned
    return struct.pack("<Q", len(header)) + header + data[8 + n :]


def load_vector(path: str | os.PathLike) -> PathologyVector:
    """Read and validate a pathology vector file.

    Only safetensors is accepted; pickles (``torch.save``, ``.pt``, ``.pkl``) are refused without
    being unpickled, because unpickling runs code chosen by whoever wrote the file. Only regular
    files are read (a FIFO, a device such as ``/dev/zero`` or a folder is refused before any byte is
    read), and only as many bytes as the header accounts for: 8 bytes of header length, a header
    of at most 100 MB, then the tensor data up to the largest end offset the header declares.

    Raises:
        VectorFileError: the file is missing, not a regular file, not safetensors, corrupt, of an
            unknown format or version, has a missing key, a wrong shape or dtype, a non-finite
            value, or non-unit rows. The message says which and what to do.
    """
    source = str(path)
    try:
        data = _read_regular_file(Path(path), source)
    except FileNotFoundError:
        raise VectorFileError(f"no pathology vector file at {source!r}: check the path") from None
    except IsADirectoryError:
        raise _not_regular(source, "a folder") from None
    except OSError as exc:
        raise VectorFileError(f"cannot read {source!r}: {exc.strerror or exc}") from None
    return vector_from_bytes(data, source=source)


def _not_regular(source: str, kind: str) -> VectorFileError:
    return VectorFileError(
        f"{source!r} is {kind}, not a regular file: a pathology vector is a .safetensors file; "
        "give the path of one (SavePathologyVector and `medsteer build-vector` write them)"
    )


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def _read_regular_file(path: Path, source: str) -> bytes:
    """The bytes of a regular file, no more than its safetensors header accounts for.

    ``os.stat`` first (it never blocks, unlike opening a FIFO), then open without blocking and check
    with ``fstat`` that the opened file is the same regular file (no swap in between).
    """
    before = os.stat(path)
    if not stat.S_ISREG(before.st_mode):
        raise _not_regular(source, _file_kind(before.st_mode))
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    with os.fdopen(fd, "rb") as handle:
        opened = os.fstat(handle.fileno())
        if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (before.st_dev, before.st_ino):
            raise _not_regular(source, _file_kind(opened.st_mode))
        size = opened.st_size
        head = handle.read(8)
        if len(head) < 8:
            return head  # vector_from_bytes names the problem
        (n,) = struct.unpack("<Q", head)
        if (n == 0 or n > _MAX_HEADER_BYTES or 8 + n > size) and _looks_like_pickle(head):
            return head  # vector_from_bytes refuses it by name (pickles start with 'PK' or 0x80)
        if n == 0 or n > _MAX_HEADER_BYTES or 8 + n > size:
            raise _fail(
                source,
                f"not a safetensors file or truncated (header length {n}, file length {size}; "
                f"a header may be at most {_MAX_HEADER_BYTES} bytes)",
            )
        header_bytes = handle.read(n)
        expected = _declared_size(header_bytes, source)
        if expected is None:  # not parseable: vector_from_bytes says why
            return head + header_bytes
        if expected > _MAX_FILE_BYTES:
            raise _fail(
                source,
                f"its header declares {expected} bytes of tensors; a pathology vector is at most "
                f"{_MAX_FILE_BYTES} bytes (1000 timesteps x 28 layers x 1152 is 0.39 GB)",
            )
        if expected != size:
            raise _fail(
                source,
                f"the file is {size} bytes but its safetensors header accounts for {expected} "
                f"(8 + header {n} + tensor data {expected - 8 - n}): truncated or padded",
            )
        rest = handle.read(size - 8 - n)
        if len(rest) != size - 8 - n:
            raise _fail(source, f"the file changed while it was read ({8 + n + len(rest)} of {size} bytes)")
        return head + header_bytes + rest


def _declared_size(header_bytes: bytes, source: str) -> int | None:
    """``8 + len(header) + max end offset`` declared by a safetensors header, or ``None`` if unreadable."""
    header = _parse_header_json(header_bytes, source)
    if not isinstance(header, dict):
        return None
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise _fail(
                source,
                f"tensor {str(name)[:80]!r} has data_offsets {str(offsets)[:80]}, expected [begin, end] "
                "with 0 <= begin <= end (corrupt file)",
            )
        end = max(end, offsets[1])
    return 8 + len(header_bytes) + end


def _parse_header_json(header_bytes: bytes, source: str):
    """The JSON of a safetensors header, ``None`` if it is not UTF-8 JSON.

    Raises:
        VectorFileError: the header holds an integer longer than Python converts (4300 digits).
    """
    try:
        return json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    except ValueError as exc:  # int() digit limit: "Exceeds the limit (4300 digits) ..."
        raise _fail(
            source,
            f"the safetensors header holds a number too long to read ({str(exc)[:80]}); "
            "no real offset, shape or setting has that many digits (corrupt or crafted file)",
        ) from None


def vector_from_bytes(data: bytes, source: str = "<bytes>") -> PathologyVector:
    """Parse and validate the bytes of a vector file (see ``load_vector``)."""
    header, metadata = _read_header(data, source)
    tensors = _read_tensors(data, header, source)
    return _validated(tensors, metadata, source)


def _fail(source: str, problem: str, fix: str = "") -> VectorFileError:
    fix = fix or "rebuild it with BuildPathologyVector or `medsteer build-vector`"
    return VectorFileError(f"{source}: {problem}; {fix}")


def _looks_like_pickle(data: bytes) -> bool:
    # torch.save writes a zip archive ("PK"); plain pickles start with PROTO (0x80) + version.
    return data[:2] == b"PK" or (len(data) > 1 and data[0] == 0x80 and 2 <= data[1] <= 5)


def _read_header(data: bytes, source: str) -> tuple[dict, dict[str, str]]:
    header = None
    if len(data) >= 8:
        (n,) = struct.unpack("<Q", data[:8])
        if 0 < n <= _MAX_HEADER_BYTES and 8 + n <= len(data):
            header = _parse_header_json(data[8 : 8 + n], source)
    if header is None:
        if _looks_like_pickle(data):
            raise _fail(
                source,
                "this is a pickle / torch.save file, which medsteer refuses to load because "
                "unpickling can run arbitrary code",
                "use a .safetensors pathology vector (rebuild it, or convert it in a trusted session)",
            )
        if len(data) < 8:
            raise _fail(source, f"not a safetensors file (only {len(data)} bytes)")
        (n,) = struct.unpack("<Q", data[:8])
        if n == 0 or n > _MAX_HEADER_BYTES or 8 + n > len(data):
            raise _fail(
                source,
                f"not a safetensors file or truncated (header length {n}, file length {len(data)})",
            )
        raise _fail(source, "the safetensors header is not valid JSON (corrupt file)")
    if not isinstance(header, dict):
        raise _fail(source, "the safetensors header is not a JSON object (corrupt file)")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _fail(source, "the file's metadata is not a map of strings (corrupt file)")
    if metadata.get("format") != FORMAT_NAME:
        raise _fail(
            source,
            f"not a medsteer pathology vector (format {metadata.get('format')!r}, expected {FORMAT_NAME!r})",
            "load a file written by SavePathologyVector or `medsteer build-vector`",
        )
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise _fail(
            source,
            f"unknown format_version {version!r} (this medsteer reads version {FORMAT_VERSION!r})",
            "upgrade medsteer if the file is newer, or rebuild the vector",
        )
    missing_meta = [k for k in _REQUIRED_METADATA if k not in metadata]
    if missing_meta:
        raise _fail(source, f"missing metadata field(s) {missing_meta}")
    missing = [k for k in _TENSOR_SPEC if k not in header]
    if missing:
        raise _fail(source, f"missing tensor(s) {missing}")
    return header, metadata


def _read_tensors(data: bytes, header: dict, source: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as st_load

    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error types (and OverflowError/...) on corrupt input
        raise _fail(source, f"corrupt safetensors data ({type(exc).__name__}: {str(exc)[:200]})") from None
    return tensors


def _validated(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str) -> PathologyVector:
    for name, (rank, dtype) in _TENSOR_SPEC.items():
        t = tensors[name]
        if t.dtype != dtype:
            raise _fail(source, f"tensor {name!r} has dtype {t.dtype}, expected {dtype}")
        if t.dim() != rank:
            raise _fail(source, f"tensor {name!r} has shape {tuple(t.shape)}, expected rank {rank}")
    d = tensors["directions"]
    k, layers, width = d.shape
    if k == 0 or layers == 0 or width == 0:
        raise _fail(source, f"'directions' is empty (shape {tuple(d.shape)})")
    for name in ("sum_with", "sum_without"):
        if tensors[name].shape != d.shape:
            raise _fail(source, f"tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {tuple(d.shape)}")
    for name in ("timesteps", "count_with", "count_without"):
        if tensors[name].shape != (k,):
            raise _fail(source, f"tensor {name!r} has shape {tuple(tensors[name].shape)}, expected ({k},)")
    for name in ("directions", "timesteps", "sum_with", "sum_without"):
        if not torch.isfinite(tensors[name]).all():
            raise _fail(source, f"tensor {name!r} contains NaN or infinite values")
    ts = tensors["timesteps"]
    if k > 1 and not bool((ts[1:] > ts[:-1]).all()):
        raise _fail(source, "'timesteps' are not strictly increasing")
    if bool((ts < 0).any()) or bool((ts > 1000).any()):
        raise _fail(source, f"'timesteps' outside the model range 0-1000 (min {ts.min():g}, max {ts.max():g})")
    if bool((tensors["count_with"] < 0).any()) or bool((tensors["count_without"] < 0).any()):
        raise _fail(source, "negative image counts")
    norms = d.double().norm(dim=-1)
    bad = ~((norms - 1).abs() <= _UNIT_TOLERANCE) & (norms != 0)
    if bool(bad.any()):
        i, j = (int(x) for x in bad.nonzero()[0])
        raise _fail(source, f"direction row (timestep {i}, layer {j}) has norm {float(norms[i, j]):.6g}, not 1 or 0")
    for key, expected in (("hidden_size", width), ("depth", layers)):
        if metadata[key] != str(expected):
            raise _fail(source, f"metadata {key}={metadata[key]!r} disagrees with the tensors ({expected})")
    try:
        gain = float(metadata.get("gain", "1.0"))
    except ValueError:
        raise _fail(source, f"metadata gain={metadata.get('gain')!r} is not a number") from None
    if not math.isfinite(gain):
        raise _fail(source, f"metadata gain={metadata.get('gain')!r} is not finite")
    _check_calibrated(metadata, layers, source)
    metadata = dict(metadata)
    metadata.pop("gain", None)
    return PathologyVector(
        directions=d.clone(),
        timesteps=ts.clone(),
        sum_with=tensors["sum_with"].clone(),
        sum_without=tensors["sum_without"].clone(),
        count_with=tensors["count_with"].clone(),
        count_without=tensors["count_without"].clone(),
        metadata=metadata,
        gain=gain,
    )


#: Metadata a calibrated vector carries (``demo.calibrate``); hosts read them as the default setting.
CALIBRATED_FIELDS = {"calibrated_layer_start": int, "calibrated_layer_end": int, "calibrated_strength": float}
_MAX_NUMBER_CHARS = 40


def calibrated_setting(metadata: Mapping[str, str]) -> dict[str, int | float]:
    """The ``calibrated_*`` settings present in a vector's metadata, as numbers.

    Args:
        metadata: a vector's metadata.

    Returns:
        ``{"layer_start": int, "layer_end": int, "strength": float}``, with only the keys present.

    Raises:
        VectorFileError: a value is not a plain decimal number (layers: a whole number >= 0;
            strength: finite), naming the field and the fix.

    Example:
        >>> calibrated_setting({"calibrated_layer_start": "0", "calibrated_strength": "1.5"})
        {'layer_start': 0, 'strength': 1.5}
    """
    out: dict[str, int | float] = {}
    for key, kind in CALIBRATED_FIELDS.items():
        if key not in metadata:
            continue
        raw = str(metadata[key]).strip()
        value: int | float | None = None
        if len(raw) <= _MAX_NUMBER_CHARS:
            if kind is int and raw.isascii() and raw.isdigit():
                value = int(raw)
            elif kind is float:
                try:
                    value = float(raw)
                except ValueError:
                    value = None
                if value is not None and not math.isfinite(value):
                    value = None
        if value is None:
            example = "a whole number such as 8" if kind is int else "a finite decimal such as 2.5"
            raise VectorFileError(
                f"metadata {key}={raw[:80]!r} is not {example}: write it so (or remove the field to use "
                "the default setting), or rebuild the vector"
            )
        out[key[len("calibrated_") :]] = value
    return out


def _check_calibrated(metadata: Mapping[str, str], depth: int, source: str) -> None:
    try:
        setting = calibrated_setting(metadata)
    except VectorFileError as exc:
        raise VectorFileError(f"{source}: {exc}") from None
    start, end = setting.get("layer_start", 0), setting.get("layer_end", depth)
    if not 0 <= start < end <= depth:
        raise _fail(
            source,
            f"metadata calibrated_layer_start={start}, calibrated_layer_end={end} is not a layer window "
            f"of this {depth}-layer vector (0 <= start < end <= {depth})",
            "fix or remove the calibrated_* fields, or rebuild the vector",
        )
