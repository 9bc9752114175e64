"""Fuzz the vector loader: whatever the bytes, it returns a vector or raises VectorFileError, and
never runs code (no pickle path exists)."""

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from medsteer_core import PathologyVector, VectorFileError
from medsteer_core.vector import vector_from_bytes
from tests.test_vector import make_vector

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
GOOD = st_save(
    {
        n: getattr(make_vector(), n).contiguous()
        for n in ("directions", "timesteps", "sum_with", "sum_without", "count_with", "count_without")
    },
    metadata={**make_vector().metadata, "hidden_size": "6", "depth": "4"},
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
        data = st_save(bad, metadata={**make_vector().metadata, "hidden_size": "6", "depth": "4"})
        with pytest.raises(VectorFileError, match=f"'{name}' has dtype"):
            vector_from_bytes(data)
