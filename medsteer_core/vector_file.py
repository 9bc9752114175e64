"""Pathology vector files: safetensors with string metadata, never pickle (issue 9: format v2).

Version 2 (written by ``save_vector``) stores per-site widths as the ``site_widths`` metadata (the
``[K, L, D]`` tensors are zero beyond each site's width) and the provenance through the one writer,
``Provenance.to_metadata``. Version 1 files (medsteer 0.1.0: one width for every site) still load,
their provenance parsed once by ``Provenance.from_metadata``; any other version is refused.

This module and ``provenance`` are the only code that touches metadata strings: a loaded vector
carries its typed ``Provenance``, and ``file_metadata`` gives the strings a file holds (for
``medsteer inspect``'s raw listing and digests).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import struct
from pathlib import Path

import torch

from .errors import VectorFileError
from .provenance import Provenance
from .vector import TENSOR_SPEC, PathologyVector
from .vector_checks import UNIT_TOLERANCE, short_widths

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "check_vector_header",
    "file_metadata",
    "load_vector",
    "save_vector",
    "vector_digest",
    "vector_from_bytes",
]

FORMAT_NAME = "medsteer.pathology_vector"
#: Written by ``save_vector``. Version 2 (issue 9) adds per-site widths (``site_widths``, rows zero
#: beyond each site's width) and the typed provenance of ``provenance.Provenance``.
FORMAT_VERSION = "2"
#: Versions ``load_vector`` reads: 1 (medsteer 0.1.0, one width for every site) and 2.
READABLE_VERSIONS = ("1", "2")

_REQUIRED_METADATA = (
    "format",
    "format_version",
    "concept_with",
    "concept_without",
    "hidden_size",
    "depth",
    "library_version",
)
_MAX_HEADER_BYTES = 100 * 1024 * 1024
#: Largest vector file read. A vector is 3 float32 [K, L, D] tensors: 1000 timestep keys x 28
#: layers x 1152 (every timestep of PixArt-XL-2) is 0.39 GB, so 2 GiB leaves room for 5x wider
#: models while a crafted or sparse file cannot make the loader read (and hold) terabytes.
_MAX_FILE_BYTES = 2 * 1024**3


# ---------------------------------------------------------------------- file I/O
def save_vector(vector: PathologyVector, path: str | os.PathLike) -> Path:
    """Write a vector as ``.safetensors`` with string metadata (atomic: a temp file, then rename).

    Always writes format version 2: the provenance through ``Provenance.to_metadata`` (so 0.1.0
    list forms become JSON) and the per-site widths as the ``site_widths`` JSON list.

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
    metadata = file_metadata(vector, saving=True)
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, (_, dtype) in TENSOR_SPEC.items():
        tensor = getattr(vector, name).detach().to(dtype).contiguous().cpu()
        storage = tensor.untyped_storage().data_ptr()
        if storage in storages and tensor.numel():
            # safetensors refuses tensors that share memory ("Some tensors share memory"), e.g.
            # one zero tensor passed as both sums; a copy costs nothing on disk.
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    data = _sorted_header(st_save(tensors, metadata=metadata))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def file_metadata(vector: PathologyVector, saving: bool = False) -> dict[str, str]:
    """The metadata strings of ``vector``'s file: its provenance (``Provenance.to_metadata``) plus
    the layout keys (format, version, hidden size, depth; ``gain`` when ``saving``).

    The format version is the one the vector was loaded from (``saving``: the one written now).
    """
    metadata = vector.provenance.to_metadata()
    metadata["format"] = FORMAT_NAME
    metadata["format_version"] = FORMAT_VERSION if saving else (vector.file_format_version or FORMAT_VERSION)
    metadata["hidden_size"] = str(vector.hidden_size)
    metadata["depth"] = str(vector.depth)
    if saving:
        metadata["gain"] = repr(float(vector.gain))
    return metadata


def vector_digest(vector: PathologyVector) -> str:
    """sha256 of what steers: the directions, the timestep keys and the file metadata (hex).

    For a vector that has no file (a manifest records the file's own sha256 otherwise).
    """
    hasher = hashlib.sha256()
    for tensor in (vector.directions, vector.timesteps):
        hasher.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
    hasher.update(json.dumps(file_metadata(vector), sort_keys=True).encode())
    return hasher.hexdigest()


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
    return vector_from_bytes(_read_file(path, source), source=source)


def check_vector_header(path: str | os.PathLike) -> None:
    """Check that ``path`` is a regular file with a pathology vector's safetensors header, reading
    the header only (not the tensors): what a queue-time check can afford.

    ``load_vector`` still validates everything when the file is used.

    Raises:
        VectorFileError: as ``load_vector`` for a missing file, a non-regular file, a pickle, a
            corrupt header, another format or version, or missing fields.
    """
    source = str(path)
    _read_header(_read_file(path, source, header_only=True), source)


def _read_file(path: str | os.PathLike, source: str, header_only: bool = False) -> bytes:
    """``_read_regular_file`` with the OS errors said as ``VectorFileError``s."""
    try:
        return _read_regular_file(Path(path), source, header_only)
    except FileNotFoundError:
        raise VectorFileError(f"no pathology vector file at {source!r}: check the path") from None
    except IsADirectoryError:
        raise _not_regular(source, "a folder") from None
    except OSError as exc:
        raise VectorFileError(f"cannot read {source!r}: {exc.strerror or exc}") from None


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


def _read_regular_file(path: Path, source: str, header_only: bool = False) -> bytes:
    """The bytes of a regular file, no more than its safetensors header accounts for (``header_only``:
    the 8 length bytes and the header, not the tensors).

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
        if header_only:
            return head + header_bytes
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
    if version not in READABLE_VERSIONS:
        raise _fail(
            source,
            f"unknown format_version {str(version)[:40]!r} (this medsteer reads versions "
            f"{', '.join(repr(v) for v in READABLE_VERSIONS)})",
            "upgrade medsteer if the file is newer, or rebuild the vector",
        )
    required = _REQUIRED_METADATA + (("site_widths",) if version != "1" else ())
    missing_meta = [k for k in required if k not in metadata]
    if missing_meta:
        raise _fail(source, f"missing metadata field(s) {missing_meta}")
    missing = [k for k in TENSOR_SPEC if k not in header]
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
    for name, (rank, dtype) in TENSOR_SPEC.items():
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
    bad = ~((norms - 1).abs() <= UNIT_TOLERANCE) & (norms != 0)
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
    try:
        provenance = Provenance.from_metadata(metadata)  # parsed once, here
    except VectorFileError as exc:
        raise VectorFileError(f"{source}: {exc}") from None
    _check_calibrated(provenance, layers, source)
    widths = _checked_widths(tensors, provenance.site_widths, metadata["format_version"], source)
    return PathologyVector(
        directions=d.clone(),
        timesteps=ts.clone(),
        sum_with=tensors["sum_with"].clone(),
        sum_without=tensors["sum_without"].clone(),
        count_with=tensors["count_with"].clone(),
        count_without=tensors["count_without"].clone(),
        provenance=provenance.replace(site_widths=()),
        gain=gain,
        widths=widths,
        file_format_version=metadata["format_version"],
    )


def _checked_widths(
    tensors: dict[str, torch.Tensor], widths: tuple[int, ...], version: str, source: str
) -> tuple[int, ...]:
    """The per-site widths of a file (version 1: the tensors' width for every site), checked
    against the tensors: one per site, the widest equal to ``D``, zeros beyond each width."""
    _, layers, width = tensors["directions"].shape
    if not widths and version != "1":
        raise _fail(
            source, f"metadata site_widths is empty; format version 2 lists the width of each of the {layers} sites"
        )
    widths = widths or (width,) * layers
    if len(widths) != layers or not all(1 <= w <= width for w in widths) or max(widths) != width:
        raise _fail(
            source,
            f"metadata site_widths {str(list(widths))[:120]} do not fit the tensors ({layers} sites of at most "
            f"{width}): one width per site, each 1-{width}, the widest {width}",
        )
    if len(set(widths)) > 1:
        beyond = torch.arange(width)[None, :] >= torch.tensor(widths)[:, None]  # [L, D]
        for name in ("directions", "sum_with", "sum_without"):
            if bool(tensors[name][:, beyond].any()):
                raise _fail(source, f"tensor {name!r} is not zero beyond the width of each site {short_widths(widths)}")
    return widths


def _check_calibrated(provenance: Provenance, depth: int, source: str) -> None:
    setting = provenance.calibrated_setting()
    start, end = setting.get("layer_start", 0), setting.get("layer_end", depth)
    if not 0 <= start < end <= depth:
        raise _fail(
            source,
            f"metadata calibrated_layer_start={start}, calibrated_layer_end={end} is not a layer window "
            f"of this {depth}-layer vector (0 <= start < end <= {depth})",
            "fix or remove the calibrated_* fields, or rebuild the vector",
        )
