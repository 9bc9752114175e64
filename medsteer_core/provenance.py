"""Where a pathology vector came from: one typed record, one writer, one reader (issue 9).

A vector file stores its provenance as safetensors string metadata. ``Provenance.to_metadata`` is
the only writer (lists as JSON, numbers as Python literals) and ``Provenance.from_metadata`` the
only reader; the reader also parses every form medsteer 0.1.0 wrote (the MedSteer-mini vectors
shipped then store prompts as a Python list ``repr`` and seeds as ``0,1,2``).

``weights_fingerprint`` hashes the weights that produce each site's cross-attention output, so a
vector built on other weights of the same size can be told apart (merging refuses it).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .errors import VectorFileError, VectorMismatchError

__all__ = [
    "CALIBRATED_FIELDS",
    "ORIGINS",
    "STRUCTURAL_KEYS",
    "Provenance",
    "build_provenance",
    "calibrated_setting",
    "metadata_list",
    "site_widths",
    "weights_fingerprint",
]

#: Metadata keys that describe the file's layout, owned by the vector file code, not provenance.
STRUCTURAL_KEYS = ("format", "format_version", "hidden_size", "depth", "gain")
#: Metadata a calibrated vector carries (``demo.calibrate``); hosts read them as the default setting.
CALIBRATED_FIELDS = {"calibrated_layer_start": int, "calibrated_layer_end": int, "calibrated_strength": float}
_MAX_NUMBER_CHARS = 40
_TEXT_FIELDS = (
    "concept_with",
    "concept_without",
    "origin",
    "negative_prompt",
    "sampler",
    "scheduler",
    "model_family",
    "weights_fingerprint",
    "host",
    "library_version",
)
_LIST_FIELDS = {"prompts_with": str, "prompts_without": str, "seeds": int, "site_widths": int}
_NUMBER_FIELDS = {"steps": int, "cfg": float, "width": int, "height": int}
#: Written next to ``seeds`` for people reading the metadata; derived, so the reader drops it.
_DERIVED_KEYS = ("num_seeds",)
#: JSON fields: ``composed_of`` lists the parts of a vector made by ``v1 + v2``.
_JSON_FIELDS = ("composed_of",)
_OWNED_KEYS = frozenset(
    (
        *_TEXT_FIELDS,
        *_LIST_FIELDS,
        *_NUMBER_FIELDS,
        *CALIBRATED_FIELDS,
        *STRUCTURAL_KEYS,
        *_DERIVED_KEYS,
        *_JSON_FIELDS,
    )
)
#: How a vector came to be: estimated from seeds (``VectorEstimator``), given as directions
#: (``from_directions``), or made by arithmetic (``v1 + v2``). Only the first two carry real sums.
ORIGINS = ("estimated", "external", "composed")


@dataclass(frozen=True)
class Provenance:
    """How a pathology vector was built.

    Lists are stored as tuples (pass lists or tuples). Text fields are ``""`` and numbers ``None``
    when unknown.

    Attributes:
        concept_with / concept_without: the concept text of each class.
        origin: ``"estimated"`` (from seeds), ``"external"`` (``from_directions``) or
            ``"composed"`` (``v1 + v2``); ``""`` until a vector is made with it (then
            ``"estimated"``, or ``"external"`` for ``from_directions``).
        prompts_with / prompts_without: every prompt sampled for each class.
        negative_prompt: the unconditional prompt.
        seeds: the seeds whose images the sums hold (a merge refuses seeds both vectors hold).
        steps / sampler / scheduler / cfg: the sampling settings.
        width / height: image size in pixels.
        model_family: e.g. ``"pixart-alpha"``, ``"medsteer-mini"``.
        site_widths: width of each cross-attention site, in execution order.
        weights_fingerprint: ``weights_fingerprint(sites)`` of the model the vector was built on.
        calibrated_layer_start / calibrated_layer_end / calibrated_strength: a calibrated default
            setting (``medsteer demo`` writes one), or ``None``.
        host: what built it (``"diffusers"``, ``"ComfyUI BuildPathologyVector"``).
        library_version: the medsteer version that wrote it.
        composed_of: for ``v1 + v2``: each part's concepts, gain and origin.
        extra: every other metadata key, kept verbatim (``origin``, ``calibration``, ``model``, ...).

    Example:
        >>> p = Provenance.from_metadata({"seeds": "0,1,2", "prompts_with": "['a', 'b']"})
        >>> p.seeds, p.prompts_with
        ((0, 1, 2), ('a', 'b'))
        >>> p.to_metadata()["seeds"]
        '[0, 1, 2]'
    """

    concept_with: str = ""
    concept_without: str = ""
    origin: str = ""
    prompts_with: tuple[str, ...] = ()
    prompts_without: tuple[str, ...] = ()
    negative_prompt: str = ""
    seeds: tuple[int, ...] = ()
    steps: int | None = None
    sampler: str = ""
    scheduler: str = ""
    cfg: float | None = None
    width: int | None = None
    height: int | None = None
    model_family: str = ""
    site_widths: tuple[int, ...] = ()
    weights_fingerprint: str = ""
    calibrated_layer_start: int | None = None
    calibrated_layer_end: int | None = None
    calibrated_strength: float | None = None
    host: str = ""
    library_version: str = ""
    composed_of: tuple[Mapping[str, object], ...] = ()
    extra: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, item in _LIST_FIELDS.items():
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise TypeError(f"Provenance.{name} must be a list of {item.__name__}, got {value!r:.80}")
            if not all(isinstance(x, item) and not isinstance(x, bool) for x in value):
                raise TypeError(f"Provenance.{name} must hold only {item.__name__} values, got {list(value)!r:.80}")
            object.__setattr__(self, name, tuple(value))
        for name in _TEXT_FIELDS:
            object.__setattr__(self, name, "" if getattr(self, name) is None else str(getattr(self, name)))
        clash = sorted(set(self.extra) & _OWNED_KEYS)
        if clash:
            raise ValueError(f"Provenance.extra must not hold {clash}: set the typed fields instead")
        object.__setattr__(self, "extra", {str(k): str(v) for k, v in self.extra.items()})
        if self.origin and self.origin not in ORIGINS:
            raise ValueError(f"Provenance.origin must be one of {ORIGINS}, got {self.origin!r}")
        if isinstance(self.composed_of, Mapping) or not isinstance(self.composed_of, Sequence):
            raise TypeError(f"Provenance.composed_of must be a list of dicts, got {self.composed_of!r:.80}")
        object.__setattr__(self, "composed_of", tuple(dict(part) for part in self.composed_of))

    # ------------------------------------------------------------------ the one reader
    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> Provenance:
        """Parse a vector's metadata (every form medsteer has written; see ``metadata_list``).

        Raises:
            VectorFileError: a list, number or calibrated field cannot be read; the message names
                the field, its value and the form to write.
        """
        md = {str(k): str(v) for k, v in metadata.items()}
        lists = {name: tuple(metadata_list(md, name, item)) for name, item in _LIST_FIELDS.items()}
        numbers = {name: _number(md, name, kind) for name, kind in _NUMBER_FIELDS.items()}
        calibrated = calibrated_setting(md)
        origin = md.get("origin", "")
        if origin not in ("", *ORIGINS):
            raise VectorFileError(f"metadata origin={origin[:40]!r} is not one of {ORIGINS}: fix or remove it")
        return cls(
            **{name: md.get(name, "") for name in _TEXT_FIELDS},
            **lists,
            **numbers,
            calibrated_layer_start=calibrated.get("layer_start"),
            calibrated_layer_end=calibrated.get("layer_end"),
            calibrated_strength=calibrated.get("strength"),
            composed_of=_composed_of(md),
            extra={k: v for k, v in md.items() if k not in _OWNED_KEYS},
        )

    # ------------------------------------------------------------------ the one writer
    def to_metadata(self) -> dict[str, str]:
        """The metadata strings of this provenance: lists as JSON, unknown fields left out.

        ``concept_with`` / ``concept_without`` are always written; ``num_seeds`` is written next to
        ``seeds`` for readers of the raw metadata.
        """
        out = {"concept_with": self.concept_with, "concept_without": self.concept_without}
        for name in _LIST_FIELDS:
            value = getattr(self, name)
            if value:
                out[name] = json.dumps(list(value))
        if self.seeds:
            out["num_seeds"] = str(len(self.seeds))
        for name in _TEXT_FIELDS[2:]:
            if getattr(self, name):
                out[name] = getattr(self, name)
        for name, kind in (*_NUMBER_FIELDS.items(), *CALIBRATED_FIELDS.items()):
            value = getattr(self, name)
            if value is not None:
                out[name] = repr(float(value)) if kind is float else str(int(value))
        if self.composed_of:
            out["composed_of"] = json.dumps(list(self.composed_of))
        out.update(self.extra)
        return out

    def replace(self, **changes) -> Provenance:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def calibrated_setting(self) -> dict[str, int | float]:
        """The calibrated setting as ``calibrated_setting`` returns it (only the fields present)."""
        values = {
            "layer_start": self.calibrated_layer_start,
            "layer_end": self.calibrated_layer_end,
            "strength": self.calibrated_strength,
        }
        return {k: v for k, v in values.items() if v is not None}


def _composed_of(metadata: Mapping[str, str]) -> tuple[dict, ...]:
    raw = metadata.get("composed_of", "").strip()
    if not raw:
        return ()
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, list) or not all(isinstance(part, dict) for part in value):
        raise VectorFileError(
            f"metadata composed_of={raw[:80]!r} is not a JSON list of objects: fix or remove the field"
        )
    return tuple(value)


def _number(metadata: Mapping[str, str], key: str, kind: type) -> int | float | None:
    raw = metadata.get(key, "").strip()
    if not raw:
        return None
    value = _plain_number(raw, kind, negative=True)
    if value is None:
        example = "a whole number such as 20" if kind is int else "a finite decimal such as 4.5"
        raise VectorFileError(f"metadata {key}={raw[:80]!r} is not {example}: write it so, or remove the field")
    return value


def _plain_number(raw: str, kind: type, negative: bool) -> int | float | None:
    """``raw`` as a plain decimal ``int`` (``negative``: a leading ``-`` allowed) or finite
    ``float``, or ``None``. Longer strings are refused before conversion (Python's int/float
    parsing of thousands of digits is slow or raises its own errors)."""
    if len(raw) > _MAX_NUMBER_CHARS:
        return None
    if kind is int:
        return int(raw) if re.fullmatch(r"-?[0-9]+" if negative else r"[0-9]+", raw) else None
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


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
        value = _plain_number(raw, kind, negative=False)
        if value is None:
            example = "a whole number such as 8" if kind is int else "a finite decimal such as 2.5"
            raise VectorFileError(
                f"metadata {key}={raw[:80]!r} is not {example}: write it so (or remove the field to use "
                "the default setting), or rebuild the vector"
            )
        out[key[len("calibrated_") :]] = value
    return out


# ---------------------------------------------------------------------- model facts
def site_widths(sites) -> tuple[int, ...]:
    """The width of each cross-attention site of ``sites`` (``Sites.widths``), in execution order."""
    return tuple(int(w) for w in sites.widths)


def _output_projection(module: torch.nn.Module) -> torch.nn.Module:
    """The last linear layer of a site: the one whose output is the site's output."""
    linears = [m for m in module.modules() if hasattr(m, "out_features") and hasattr(m, "weight")]
    if not linears:
        raise VectorMismatchError(
            f"cannot fingerprint cross-attention module {type(module).__name__}: it has no linear layer"
        )
    return linears[-1]


def weights_fingerprint(sites) -> str:
    """A short hash of the weights that produce each site's cross-attention output.

    sha256 over every site's output projection (weight and bias, as float32, with their shapes).
    A vector built on other weights of the same size (another checkpoint, a LoRA merged into
    that projection) gets another fingerprint. The same checkpoint loaded in another dtype also
    does: float16 and float32 weights differ in their bits.

    Args:
        sites: the model's ``Sites`` (``find_sites(model)``).

    Returns:
        16 hex characters, or ``""`` when the weights cannot be read (offloaded to the meta
        device, or a quantised tensor type without a float32 view).

    Example:
        >>> weights_fingerprint(find_sites(transformer))   # doctest: +SKIP
        '3f1c0a9e5b7d2c41'
    """
    digest = hashlib.sha256()
    try:
        for index, module in enumerate(sites.modules):
            projection = _output_projection(module)
            for name in ("weight", "bias"):
                tensor = getattr(projection, name, None)
                if not isinstance(tensor, torch.Tensor):
                    continue
                values = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
                digest.update(f"{index}:{name}:{tuple(values.shape)};".encode())
                digest.update(values.numpy().tobytes())
    except (NotImplementedError, RuntimeError, TypeError):
        return ""  # meta tensors ("Cannot copy out of meta tensor") or exotic tensor types
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------- builds
def build_provenance(
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
    sites=None,
    fingerprint: bool = True,
) -> Provenance:
    """The provenance of a vector built by sampling prompts (``origin`` ``"estimated"``).

    The ComfyUI and headless builds write through it. Unknown prompt texts are stored as empty
    strings. With ``sites`` (a ``Sites``), the site widths and (unless ``fingerprint`` is False)
    the ``weights_fingerprint`` of the model are recorded too: merging then refuses vectors built
    on other weights.
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
    )
