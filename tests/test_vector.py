"""PathologyVector: lookup, arithmetic, merge, and the safetensors file format."""

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

import medsteer_core
from medsteer_core import PathologyVector, VectorFileError, VectorMismatchError, load_vector, save_vector
from medsteer_core.provenance import Provenance, metadata_list
from medsteer_core.vector_file import FORMAT_NAME, file_metadata, vector_from_bytes


def make_vector(k=3, layers=4, d=6, seed=0, seeds=(0, 1, 2), timesteps=None) -> PathologyVector:
    g = torch.Generator().manual_seed(seed)
    ts = torch.tensor(timesteps if timesteps is not None else [100.0 * (i + 1) for i in range(k)])
    sum_with = torch.randn(k, layers, d, generator=g, dtype=torch.float64)
    sum_without = torch.randn(k, layers, d, generator=g, dtype=torch.float64)
    count = torch.full((k,), len(seeds), dtype=torch.int64)
    meta = Provenance(concept_with="dyed lifted polyps", concept_without="polyps", seeds=list(seeds))
    return PathologyVector.from_sums(ts, sum_with, sum_without, count, count.clone(), meta)


# ---------------------------------------------------------------------------------- lookup
def test_directions_are_unit_and_follow_the_means():
    v = make_vector()
    assert torch.allclose(v.directions.norm(dim=-1), torch.ones(3, 4))
    diff = v.sum_with.double() / 3 - v.sum_without.double() / 3
    assert torch.allclose(v.directions.double(), diff / diff.norm(dim=-1, keepdim=True), atol=1e-6)


def test_lookup_is_exact_at_the_keys_for_both_interpolations():
    v = make_vector(k=4)
    for k, t in enumerate(v.timesteps.tolist()):
        for mode in ("nearest", "linear"):
            assert torch.equal(v.at(t, mode), v.directions[k])


def test_nearest_lookup_and_clamping():
    v = make_vector(k=3)  # keys 100, 200, 300
    assert torch.equal(v.at(140.0), v.directions[0])
    assert torch.equal(v.at(160.0), v.directions[1])
    assert torch.equal(v.at(0.0), v.directions[0])
    assert torch.equal(v.at(999.0), v.directions[2])
    assert torch.equal(v.at(999.0, "linear"), v.directions[2])


def test_linear_interpolation_is_renormalised_blend():
    v = make_vector(k=3)
    got = v.at(125.0, "linear")
    blend = 0.75 * v.directions[0] + 0.25 * v.directions[1]
    assert torch.allclose(got, blend / blend.norm(dim=-1, keepdim=True), atol=1e-6)
    assert torch.allclose(got.norm(dim=-1), torch.ones(4))


def test_batched_lookup_matches_at():
    v = make_vector(k=3)
    ts = torch.tensor([90.0, 150.0, 260.0, 400.0])
    for mode in ("nearest", "linear"):
        batch = v.lookup(ts, mode)
        for i, t in enumerate(ts.tolist()):
            assert torch.equal(batch[i], v.at(t, mode))


# ---------------------------------------------------------------------------------- arithmetic
def test_negation_is_the_reverse_edit():
    v = make_vector()
    n = -v
    assert torch.equal(n.directions, -v.directions)
    assert n.concept_with == "polyps" and n.concept_without == "dyed lifted polyps"
    assert torch.equal(n.sum_with, v.sum_without) and torch.equal(n.count_without, v.count_with)
    assert -n == v


def test_scalar_multiplication_scales_gain_keeps_unit_directions():
    v = make_vector()
    w = 3 * v * 0.5
    assert w.gain == 1.5 and torch.equal(w.directions, v.directions)


def test_sum_is_renormalised_per_row_and_unmergeable():
    a, b = make_vector(seed=1), make_vector(seed=2)
    s = a + b
    expected = a.directions.double() + b.directions.double()
    expected = expected / expected.norm(dim=-1, keepdim=True)
    assert torch.allclose(s.directions.double(), expected, atol=1e-6)
    assert torch.allclose(s.directions.norm(dim=-1), torch.ones(3, 4))
    assert s.provenance.origin == "composed"
    with pytest.raises(VectorMismatchError, match="arithmetic"):
        s.merge(a)
    d = a - b
    assert torch.allclose(
        (d.directions.double()),
        ((a.directions - b.directions).double() / (a.directions - b.directions).double().norm(dim=-1, keepdim=True)),
        atol=1e-6,
    )


def test_sum_refuses_different_keys_or_geometry():
    with pytest.raises(VectorMismatchError, match="timestep keys"):
        make_vector(k=3) + make_vector(k=2)
    with pytest.raises(
        VectorMismatchError, match="hidden size 5 with 4 layers; the other vector has hidden size 6 and 4 layers"
    ):
        make_vector() + make_vector(d=5)


# ---------------------------------------------------------------------------------- merge
def test_merge_equals_union_of_seeds():
    g = torch.Generator().manual_seed(3)
    means_with = torch.randn(5, 2, 4, 3, generator=g, dtype=torch.float64)  # [seed, K, L, D]
    means_without = torch.randn(5, 2, 4, 3, generator=g, dtype=torch.float64)
    ts = torch.tensor([250.0, 750.0])

    def build(idx):
        n = torch.full((2,), len(idx), dtype=torch.int64)
        meta = Provenance(concept_with="a", concept_without="b", seeds=idx)
        return PathologyVector.from_sums(ts, means_with[idx].sum(0), means_without[idx].sum(0), n, n.clone(), meta)

    merged = build([0, 1]).merge(build([2, 3, 4]))
    union = build([0, 1, 2, 3, 4])
    assert torch.allclose(merged.directions, union.directions, atol=1e-6)
    assert torch.allclose(merged.sum_with, union.sum_with, atol=1e-6)
    assert torch.equal(merged.count_with, union.count_with)
    assert list(merged.provenance.seeds) == [0, 1, 2, 3, 4]


def test_merge_refuses_overlapping_seeds_and_other_concepts():
    a = make_vector(seeds=(0, 1))
    with pytest.raises(VectorMismatchError, match=r"share seeds \[1\]"):
        a.merge(make_vector(seeds=(1, 2)))
    other = make_vector(seeds=(5,))
    other = other.with_provenance(other.provenance.replace(concept_with="ulcer"))
    with pytest.raises(VectorMismatchError, match="concept_with"):
        a.merge(other)


def test_merge_keeps_keys_present_in_one_vector_only():
    a = make_vector(k=2, seeds=(0,), timesteps=[100.0, 200.0])
    b = make_vector(k=2, seeds=(1,), timesteps=[200.0, 300.0])
    m = a.merge(b)
    assert m.timesteps.tolist() == [100.0, 200.0, 300.0]
    assert m.count_with.tolist() == [1, 2, 1]


def test_mismatch_names_both_numbers():
    v = make_vector(layers=4, d=6)
    with pytest.raises(VectorMismatchError, match="hidden size 6 with 4 layers; the model has hidden size 1152 and 28"):
        v.check_compatible(28, 1152)


# ---------------------------------------------------------------------------------- files
def test_save_load_round_trips_exactly(tmp_path):
    v = make_vector() * 1.25
    path = save_vector(v, tmp_path / "dye")
    assert path.name == "dye.safetensors"
    w = load_vector(path)
    assert w == v
    for name in ("directions", "timesteps", "sum_with", "sum_without", "count_with", "count_without"):
        assert torch.equal(getattr(w, name), getattr(v, name))
    assert w.gain == 1.25


def _tensors(v):
    return {
        n: getattr(v, n).contiguous()
        for n in ("directions", "timesteps", "sum_with", "sum_without", "count_with", "count_without")
    }


def _write(tmp_path, tensors, metadata, name="bad.safetensors"):
    p = tmp_path / name
    p.write_bytes(st_save(tensors, metadata=metadata))
    return p


def _meta(v):
    m = file_metadata(v)
    m.update(format=FORMAT_NAME, format_version="1", hidden_size=str(v.hidden_size), depth=str(v.depth))
    return m


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t, m: t.pop("sum_with"), r"missing tensor\(s\) \['sum_with'\]"),
        (lambda t, m: t.__setitem__("timesteps", torch.zeros(2)), r"'timesteps' has shape \(2,\), expected \(3,\)"),
        (lambda t, m: t.__setitem__("sum_without", torch.zeros(3, 4, 5)), "'sum_without' has shape"),
        (lambda t, m: t["directions"].__setitem__((0, 0, 0), float("nan")), "'directions' contains NaN"),
        (lambda t, m: t["sum_with"].__setitem__((1, 1, 1), float("inf")), "'sum_with' contains NaN or infinite"),
        (lambda t, m: t["directions"].mul_(2.0), "norm 2, not 1 or 0"),
        (
            lambda t, m: t.__setitem__("directions", t["directions"].double()),
            "dtype torch.float64, expected torch.float32",
        ),
        (lambda t, m: m.__setitem__("format_version", "7"), "unknown format_version '7'"),
        (lambda t, m: m.__setitem__("format", "something.else"), "not a medsteer pathology vector"),
        (lambda t, m: m.pop("concept_with"), r"missing metadata field\(s\) \['concept_with'\]"),
        (lambda t, m: m.__setitem__("depth", "9"), "metadata depth='9' disagrees"),
        (lambda t, m: t.__setitem__("timesteps", torch.tensor([300.0, 200.0, 100.0])), "not strictly increasing"),
        (lambda t, m: m.__setitem__("gain", "lots"), "gain='lots' is not a number"),
    ],
)
def test_each_kind_of_corrupt_file_gets_its_own_error(tmp_path, mutate, message):
    v = make_vector()
    tensors, meta = _tensors(v), _meta(v)
    tensors = {k: t.clone() for k, t in tensors.items()}
    mutate(tensors, meta)
    path = _write(tmp_path, tensors, meta)
    with pytest.raises(VectorFileError, match=message):
        load_vector(path)


def test_pickles_are_refused_without_being_unpickled(tmp_path):
    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    p = tmp_path / "evil.pt"
    p.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(VectorFileError, match="pickle"):
        load_vector(p)
    torch.save({"directions": torch.zeros(1)}, tmp_path / "torch.pt")
    with pytest.raises(VectorFileError, match="pickle"):
        load_vector(tmp_path / "torch.pt")
    assert not (tmp_path / "pwned").exists()


def test_missing_truncated_and_non_safetensors_files(tmp_path):
    with pytest.raises(VectorFileError, match="no pathology vector file"):
        load_vector(tmp_path / "nope.safetensors")
    good = save_vector(make_vector(), tmp_path / "good").read_bytes()
    with pytest.raises(VectorFileError, match="truncated"):
        vector_from_bytes(good[: len(good) // 3])
    with pytest.raises(VectorFileError, match="corrupt safetensors data"):
        vector_from_bytes(good[:-10])
    with pytest.raises(VectorFileError, match="not valid JSON"):
        vector_from_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(VectorFileError, match="not a safetensors file"):
        vector_from_bytes(b"hello")


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    save_vector(make_vector(), tmp_path / "v.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["v.safetensors"]


# ---------------------------------------------------------------------------------- shipped metadata (issue 11)
SHIPPED = sorted((Path(medsteer_core.__file__).parent / "mini" / "assets" / "vectors").glob("*.safetensors"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_vectors_prompts_and_seeds_read_and_merge_refuses_their_overlap(path):
    vector = load_vector(path)
    prompts = list(vector.provenance.prompts_with)
    assert len(prompts) > 1 and all(vector.concept_with in p for p in prompts)
    seeds = list(vector.provenance.seeds)
    assert seeds == list(range(len(seeds))) and len(seeds) == int(vector.count_with.max())
    with pytest.raises(VectorMismatchError, match=r"share seeds \[0, 1, 2"):
        vector.merge(vector)


@pytest.mark.parametrize(
    ("raw", "item", "expected"),
    [
        ('["a, b", "c"]', str, ["a, b", "c"]),  # JSON, what medsteer writes
        ("['a, b', 'c']", str, ["a, b", "c"]),  # the legacy Python repr
        ("An endoscopic image of polyps", str, ["An endoscopic image of polyps"]),  # one prompt by hand
        ("[0, 1, 2]", int, [0, 1, 2]),
        ("0,1,2", int, [0, 1, 2]),  # the legacy comma list
        ("7", int, [7]),
        ("", int, []),
    ],
)
def test_metadata_list_reads_json_and_the_legacy_forms(raw, item, expected):
    assert metadata_list({"k": raw}, "k", item) == expected


@pytest.mark.parametrize(("raw", "item"), [("a,b", int), ("[1.5]", int), ("[true]", int), ("[1, 2]", str)])
def test_metadata_list_refuses_other_values_by_name(raw, item):
    with pytest.raises(VectorFileError, match=r"metadata k=.* is not a list of .*write it as JSON"):
        metadata_list({"k": raw}, "k", item)


def test_metadata_list_never_evaluates_code(tmp_path):
    marker = tmp_path / "ran"
    raw = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    with pytest.raises(VectorFileError):
        metadata_list({"k": raw}, "k", int)
    assert not marker.exists()


# ---------------------------------------------------------------------------------- crafted files (issue 12)
def _header_and_body(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _with_header(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def test_a_fifo_is_refused_at_once_without_opening_it(tmp_path):
    import os
    import threading
    import time

    fifo = tmp_path / "vector.safetensors"
    os.mkfifo(fifo)
    outcome = {}

    def load():
        start = time.perf_counter()
        try:
            load_vector(fifo)
        except Exception as exc:  # noqa: BLE001 - the test inspects whatever comes out
            outcome["error"] = exc
        outcome["seconds"] = time.perf_counter() - start

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(5)
    if worker.is_alive():  # the old loader blocks in open(): give it a writer so the thread ends
        with open(fifo, "wb"):
            pass
        worker.join(5)
        pytest.fail("load_vector blocked on a FIFO")
    assert isinstance(outcome["error"], VectorFileError)
    assert "named pipe (FIFO), not a regular file" in str(outcome["error"]) and str(fifo) in str(outcome["error"])
    assert outcome["seconds"] < 1.0


@pytest.mark.parametrize("special", ["/dev/zero", "folder"])
def test_devices_and_folders_are_refused_before_reading(tmp_path, special):
    path = tmp_path if special == "folder" else Path(special)
    if not path.exists():
        pytest.skip(f"{special} does not exist here")
    kind = "a folder" if special == "folder" else "a character device"
    with pytest.raises(VectorFileError, match=f"is {kind}, not a regular file"):
        load_vector(path)


def test_the_file_size_must_be_what_the_header_declares(tmp_path):
    good = save_vector(make_vector(), tmp_path / "good").read_bytes()
    padded = tmp_path / "padded.safetensors"
    padded.write_bytes(good + b"\0" * 64)
    with pytest.raises(
        VectorFileError, match=rf"is {len(good) + 64} bytes but its safetensors header accounts for {len(good)}"
    ):
        load_vector(padded)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good[:-8])
    with pytest.raises(VectorFileError, match="truncated or padded"):
        load_vector(cut)


def test_a_huge_declared_size_is_refused_without_reading_it(tmp_path):
    """A sparse file as big as its header says (3 GiB) is refused by the size cap, not read."""
    import time

    header, body = _header_and_body(save_vector(make_vector(), tmp_path / "good").read_bytes())
    end = 3 * 1024**3
    header["sum_without"]["data_offsets"][1] = end  # the last tensor, grown to 3 GiB
    data = _with_header(header, body)
    (n,) = struct.unpack("<Q", data[:8])
    sparse = tmp_path / "sparse.safetensors"
    sparse.write_bytes(data)
    with open(sparse, "r+b") as handle:
        handle.truncate(8 + n + end)
    start = time.perf_counter()
    with pytest.raises(VectorFileError, match=r"declares \d+ bytes of tensors; a pathology vector is at most"):
        load_vector(sparse)
    assert time.perf_counter() - start < 1.0
    # declared larger than the file: refused as a size mismatch, also without reading
    header["sum_without"]["data_offsets"][1] = 10**15
    small = tmp_path / "small.safetensors"
    small.write_bytes(_with_header(header, body))
    with pytest.raises(VectorFileError, match="declares|accounts for"):
        load_vector(small)


def test_a_header_length_beyond_the_cap_is_refused(tmp_path):
    p = tmp_path / "big_header.safetensors"
    p.write_bytes(struct.pack("<Q", 200 * 1024 * 1024) + b"{}" + b" " * 30)
    with pytest.raises(VectorFileError, match=r"header length 209715200, file length 40; a header may be at most"):
        load_vector(p)


@pytest.mark.parametrize("where", ["data_offsets", "shape", "metadata", "top level"])
def test_integers_past_pythons_digit_limit_are_a_vector_file_error(tmp_path, where):
    header, body = _header_and_body(save_vector(make_vector(), tmp_path / "good").read_bytes())
    raw = json.dumps(header)
    huge = "9" * 5000
    if where == "data_offsets":
        offsets = header["timesteps"]["data_offsets"]
        raw = raw.replace(json.dumps(offsets), f"[{offsets[0]}, {huge}]", 1)
    elif where == "shape":
        raw = raw.replace(json.dumps(header["timesteps"]["shape"]), f"[{huge}]", 1)
    elif where == "metadata":
        raw = raw.replace('"depth": "4"', f'"depth": {huge}', 1)
        assert huge in raw
    else:
        raw = raw[:-1] + f', "x": {huge}}}'
    encoded = raw.encode()
    data = struct.pack("<Q", len(encoded)) + encoded + body
    with pytest.raises(VectorFileError, match="a number too long to read"):
        vector_from_bytes(data)
    path = tmp_path / "huge.safetensors"
    path.write_bytes(data)
    with pytest.raises(VectorFileError, match="a number too long to read"):
        load_vector(path)


@pytest.mark.parametrize("item", [int, str])
def test_metadata_list_with_a_5000_digit_integer(item):
    huge = "7" * 5000
    if item is int:
        with pytest.raises(VectorFileError, match="metadata seeds=.* is not a list of integers"):
            metadata_list({"seeds": f"[{huge}]"}, "seeds", int)
        with pytest.raises(VectorFileError, match="is not a list of integers"):
            metadata_list({"seeds": huge}, "seeds", int)
    else:
        with pytest.raises(VectorFileError, match="is not a list of prompts"):
            metadata_list({"prompts_with": f"[{huge}]"}, "prompts_with", str)


@pytest.mark.parametrize(
    ("field", "raw", "message"),
    [
        ("calibrated_layer_start", "1.5", "calibrated_layer_start='1.5' is not a whole number"),
        ("calibrated_layer_end", "9" * 5000, "calibrated_layer_end='9999.* is not a whole number"),
        ("calibrated_layer_start", "-1", "calibrated_layer_start='-1' is not a whole number"),
        ("calibrated_strength", "lots", "calibrated_strength='lots' is not a finite decimal"),
        ("calibrated_strength", "nan", "calibrated_strength='nan' is not a finite decimal"),
        ("calibrated_strength", "1" * 400, "calibrated_strength='1111.* is not a finite decimal"),
        ("calibrated_layer_end", "9", r"calibrated_layer_end=9 is not a layer window of this 4-layer vector"),
    ],
)
def test_calibrated_settings_are_checked_on_load(tmp_path, field, raw, message):
    """Hosts cast calibrated_* with int()/float(): a crafted value failed there as a bare ValueError."""
    v = make_vector()
    meta = _meta(v)
    meta.update({"calibrated_layer_start": "0", "calibrated_layer_end": "2", "calibrated_strength": "1.5"})
    meta[field] = raw
    with pytest.raises(VectorFileError, match=message):
        load_vector(_write(tmp_path, _tensors(v), meta))


def test_calibrated_setting_reads_the_numbers():
    from medsteer_core.provenance import calibrated_setting

    meta = {"calibrated_layer_start": "0", "calibrated_layer_end": "2", "calibrated_strength": "1.5"}
    assert calibrated_setting(meta) == {"layer_start": 0, "layer_end": 2, "strength": 1.5}
    assert calibrated_setting({}) == {}
