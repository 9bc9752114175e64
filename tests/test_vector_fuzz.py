"""Fuzz the vector loader: whatever the bytes, it returns a vector or raises VectorFileError, and
never runs code (no pickle path exists)."""

import json
import os
import re
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from medsteer_core import PathologyVector, VectorFileError, load_vector
from medsteer_core.vector_file import file_metadata, vector_from_bytes
from tests.test_vector import make_vector

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
GOOD = st_save(
    {
        n: getattr(make_vector(), n).contiguous()
        for n in ("directions", "timesteps", "sum_with", "sum_without", "count_with", "count_without")
    },
    metadata={**file_metadata(make_vector()), "hidden_size": "6", "depth": "4"},
)


def _only_our_error(data: bytes) -> None:
    try:
        result = vector_from_bytes(data)
    except VectorFileError:
        return
    assert isinstance(result, PathologyVector)


def test_the_unmutated_file_loads():
    assert vector_from_bytes(GOOD) == make_vector()


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes(data):
    _only_our_error(data)


@FUZZ
@given(st.integers(min_value=0, max_value=len(GOOD) - 1))
def test_truncated_files(cut):
    _only_our_error(GOOD[:cut])


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_flipped_bytes(flips):
    data = bytearray(GOOD)
    for pos, value in flips:
        data[pos] = value
    _only_our_error(bytes(data))


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(
    st.sampled_from(["directions", "timesteps", "sum_with", "count_with", "__metadata__"]),
    st.sampled_from(["dtype", "shape", "data_offsets", "format", "format_version", "depth", "gain"]),
    _json_values,
)
def test_mutated_headers_and_metadata(entry, field, value):
    (n,) = struct.unpack("<Q", GOOD[:8])
    header = json.loads(GOOD[8 : 8 + n])
    if isinstance(header.get(entry), dict):
        header[entry][field] = value
    body = json.dumps(header, allow_nan=True).encode()
    _only_our_error(struct.pack("<Q", len(body)) + body + GOOD[8 + n :])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.uint8, torch.bool])
def test_wrong_dtypes(dtype):
    tensors = {
        n: getattr(make_vector(), n).contiguous()
        for n in ("directions", "timesteps", "sum_with", "sum_without", "count_with", "count_without")
    }
    for name in ("directions", "count_with"):
        bad = dict(tensors)
        bad[name] = bad[name].to(dtype)
        data = st_save(bad, metadata={**file_metadata(make_vector()), "hidden_size": "6", "depth": "4"})
        with pytest.raises(VectorFileError, match=f"'{name}' has dtype"):
            vector_from_bytes(data)


# ---------------------------------------------------------------------------------- issue 12: big numbers, files
def _split(data: bytes) -> tuple[str, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return data[8 : 8 + n].decode(), data[8 + n :]


def _join(header_text: str, body: bytes) -> bytes:
    raw = header_text.encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _only_our_error_from_a_file(data: bytes) -> None:
    """The file route (``load_vector``) agrees with the bytes route: a vector or VectorFileError."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "fuzzed.safetensors")
        with open(path, "wb") as handle:
            handle.write(data)
        try:
            result = load_vector(path)
        except VectorFileError:
            return
        assert isinstance(result, PathologyVector)


_HEADER_TEXT, _BODY = _split(GOOD)
# Every JSON number of the header (offsets, shapes) and every metadata string value: where a
# crafted integer can go.
_NUMBER_SPANS = [m.span() for m in re.finditer(r"(?<![\w.])\d+(?![\w.])", _HEADER_TEXT)]
_STRING_SPANS = [m.span() for m in re.finditer(r'"[^"]*"', _HEADER_TEXT)]


@FUZZ
@given(
    st.sampled_from(_NUMBER_SPANS + _STRING_SPANS),
    st.integers(4290, 6000),
    st.sampled_from("0123456789"),
    st.booleans(),
)
def test_huge_integers_anywhere_in_the_header(span, digits, fill, negative):
    """Python refuses to convert integers over 4300 digits (a bare ValueError): ours instead."""
    number = ("-" if negative else "") + "1" + fill * (digits - 1)
    text = _HEADER_TEXT[: span[0]] + number + _HEADER_TEXT[span[1] :]
    data = _join(text, _BODY)
    _only_our_error(data)
    _only_our_error_from_a_file(data)


@FUZZ
@given(
    st.sampled_from(["directions", "timesteps", "sum_with", "sum_without", "count_with", "count_without"]),
    st.integers(0, 1),
    st.integers(0, 2**64 + 5) | st.integers(0, len(GOOD) * 2),
)
def test_declared_offsets_of_any_size(name, end, value):
    """Offsets up to 2**64 (a /dev/zero-sized file): refused from the header, nothing large read."""
    header = json.loads(_HEADER_TEXT)
    header[name]["data_offsets"][end] = value
    data = _join(json.dumps(header), _BODY)
    _only_our_error(data)
    _only_our_error_from_a_file(data)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_flipped_bytes_in_a_file(flips):
    data = bytearray(GOOD)
    for pos, value in flips:
        data[pos] = value
    _only_our_error_from_a_file(bytes(data))


@pytest.mark.parametrize("kind", ["fifo", "folder", "dev-zero", "dev-null", "link-to-dev-zero"])
def test_non_regular_files(tmp_path, kind):
    if kind == "fifo":
        path = tmp_path / "v.safetensors"
        os.mkfifo(path)
    elif kind == "folder":
        path = tmp_path / "v.safetensors"
        path.mkdir()
    elif kind == "link-to-dev-zero":
        path = tmp_path / "v.safetensors"
        path.symlink_to("/dev/zero")
    else:
        path = Path("/dev/" + kind.split("-")[1])
    if not os.path.lexists(path) or (kind == "link-to-dev-zero" and not os.path.exists("/dev/zero")):
        pytest.skip(f"no {path} here")
    with pytest.raises(VectorFileError, match="not a regular file"):
        load_vector(path)


# ---------------------------------------------------------------------------------- issue 9: format v2
def _ragged_file(site_widths: str, version: str) -> bytes:
    from tests.test_provenance import ragged_vector

    v = ragged_vector()
    tensors = {n: getattr(v, n).contiguous() for n in ("directions", "timesteps", "sum_with", "sum_without")}
    tensors |= {n: getattr(v, n).contiguous() for n in ("count_with", "count_without")}
    return st_save(tensors, metadata={**file_metadata(v), "site_widths": site_widths, "format_version": version})


@FUZZ
@given(
    st.one_of(
        st.text(max_size=40),
        st.lists(st.integers(-3, 40), max_size=5).map(json.dumps),
        st.lists(st.integers(-3, 40), max_size=5).map(lambda xs: ",".join(map(str, xs))),
    ),
    st.sampled_from(["1", "2"]),
)
def test_any_site_widths_value_loads_or_is_refused_by_name(site_widths, version):
    data = _ragged_file(site_widths, version)
    try:
        vector = vector_from_bytes(data)
    except VectorFileError:
        return
    # A file loads with exactly the widths it lists (a version 1 file without them: one width), and
    # only widths the zero-padded tensors fit: the data is zero beyond (8, 8, 16), so any widths at
    # least that wide, the widest 16, describe it ("[8, 9, 16]" does; "[8, 7, 16]" is refused).
    from medsteer_core.provenance import metadata_list

    listed = tuple(metadata_list({"site_widths": site_widths}, "site_widths", int))
    assert vector.widths == (listed or (16, 16, 16))
    assert max(vector.widths) == 16 and all(w >= e for w, e in zip(vector.widths, (8, 8, 16), strict=True))
    assert version == "1" or listed
