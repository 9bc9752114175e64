"""Typed provenance, vector file format v2, merge refusals and ``PathologyVector.from_directions``
(issue 9, item 2)."""

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch import nn

import medsteer_core
from medsteer_core import PathologyVector, VectorFileError, VectorMismatchError, load_vector, save_vector
from medsteer_core.provenance import Provenance, weights_fingerprint
from medsteer_core.vector_file import FORMAT_VERSION, file_metadata, vector_from_bytes
from tests.test_vector import make_vector

SHIPPED = sorted((Path(medsteer_core.__file__).parent / "mini" / "assets" / "vectors").glob("*.safetensors"))


def _raw_metadata(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as handle:
        return dict(handle.metadata())


def _with_metadata(vector: PathologyVector, **changes: str) -> PathologyVector:
    meta = {**file_metadata(vector), **changes}
    return PathologyVector(
        vector.directions,
        vector.timesteps,
        vector.sum_with,
        vector.sum_without,
        vector.count_with,
        vector.count_without,
        Provenance.from_metadata(meta).replace(site_widths=()),
        widths=vector.widths,
    )


def ragged_vector(widths=(8, 8, 16), k=3, seeds=(0, 1), seed=0) -> PathologyVector:
    """A vector of sites with different widths, built from random sums zero beyond each width."""
    g = torch.Generator().manual_seed(seed)
    d = max(widths)
    mask = (torch.arange(d)[None, :] < torch.tensor(widths)[:, None]).double()  # [L, D]
    sum_with = torch.randn(k, len(widths), d, generator=g, dtype=torch.float64) * mask
    sum_without = torch.randn(k, len(widths), d, generator=g, dtype=torch.float64) * mask
    count = torch.full((k,), len(seeds))
    meta = Provenance(concept_with="dyed", concept_without="plain", seeds=list(seeds))
    return PathologyVector.from_sums(
        torch.tensor([100.0 * (i + 1) for i in range(k)]), sum_with, sum_without, count, count, meta, widths=widths
    )


# ---------------------------------------------------------------------------------- provenance
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_v1_vectors_load_with_their_provenance_parsed(path):
    raw = _raw_metadata(path)
    assert raw["format_version"] == "1" and raw["seeds"].startswith("0,1,2")  # the 0.1.0 forms
    vector = load_vector(path)
    prov = vector.provenance
    assert prov.seeds == tuple(range(40))
    assert len(prov.prompts_with) > 1 and all(prov.concept_with in p for p in prov.prompts_with)
    assert prov.prompts_with == tuple(eval(raw["prompts_with"], {}))  # the repr, read as literals
    assert (prov.steps, prov.cfg, prov.width, prov.height) == (20, 2.0, 32, 32)
    assert (prov.sampler, prov.model_family, prov.library_version) == ("ddim", "medsteer-mini", "0.1.0")
    assert prov.site_widths == (128,) * 6 and prov.weights_fingerprint == ""
    assert prov.calibrated_setting() == {
        "layer_start": int(raw["calibrated_layer_start"]),
        "layer_end": int(raw["calibrated_layer_end"]),
        "strength": float(raw["calibrated_strength"]),
    }
    assert prov.extra["class_with"] == raw["class_with"] and prov.extra["calibration"] == raw["calibration"]
    assert vector.file_format_version == "1"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_a_v1_file_saved_again_is_v2_with_the_same_provenance(path, tmp_path):
    vector = load_vector(path)
    again = load_vector(save_vector(vector, tmp_path / "v"))
    raw = _raw_metadata(tmp_path / "v.safetensors")
    assert raw["format_version"] == FORMAT_VERSION == "2"
    assert json.loads(raw["seeds"]) == list(range(40)) and json.loads(raw["site_widths"]) == [128] * 6
    assert json.loads(raw["prompts_with"]) == list(vector.provenance.prompts_with)
    assert again.provenance == vector.provenance
    assert torch.equal(again.directions, vector.directions) and again.gain == vector.gain


def test_one_writer_and_one_reader_round_trip_every_field():
    prov = Provenance(
        concept_with="dyed lifted polyps",
        concept_without="polyps",
        prompts_with=["a, b", 'quote " and \\ backslash'],
        prompts_without=["c"],
        negative_prompt="blurry",
        seeds=[3, 4, 5],
        steps=20,
        sampler="euler",
        scheduler="normal",
        cfg=4.5,
        width=512,
        height=384,
        model_family="pixart-alpha",
        site_widths=[8, 8, 16],
        weights_fingerprint="0123456789abcdef",
        calibrated_layer_start=1,
        calibrated_layer_end=3,
        calibrated_strength=2.5,
        host="diffusers",
        library_version="0.2.0",
        origin="estimated",
        composed_of=[{"concept_with": "a", "gain": 2.0}],
        extra={"lora": "kvasir"},
    )
    meta = prov.to_metadata()
    assert all(isinstance(v, str) for v in meta.values())
    assert json.loads(meta["prompts_with"]) == ["a, b", 'quote " and \\ backslash']
    assert meta["seeds"] == "[3, 4, 5]" and meta["num_seeds"] == "3" and meta["cfg"] == "4.5"
    assert Provenance.from_metadata(meta) == prov
    assert isinstance(prov.seeds, tuple)


def test_unknown_keys_are_kept_verbatim_and_typed_keys_cannot_hide_in_extra():
    prov = Provenance.from_metadata({"seeds": "7", "my_note": "[not json", "origin": "estimated"})
    assert prov.seeds == (7,) and prov.extra == {"my_note": "[not json"} and prov.origin == "estimated"
    assert prov.to_metadata()["my_note"] == "[not json"
    with pytest.raises(ValueError, match=r"extra must not hold \['seeds'\]"):
        Provenance(extra={"seeds": "[1]"})
    with pytest.raises(TypeError, match="seeds must hold only int"):
        Provenance(seeds=[1, "2"])


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("steps", "twenty", "steps='twenty' is not a whole number"),
        ("cfg", "nan", "cfg='nan' is not a finite decimal"),
        ("seeds", "0,x", "seeds='0,x' is not a list of integers"),
        ("site_widths", "[8, 1.5]", "site_widths=.* is not a list of integers"),
    ],
)
def test_a_bad_provenance_field_is_named_when_the_file_loads(tmp_path, key, value, message):
    v = make_vector()
    data = st_save(
        {n: getattr(v, n).contiguous() for n in ("directions", "timesteps", "sum_with", "sum_without")}
        | {n: getattr(v, n).contiguous() for n in ("count_with", "count_without")},
        metadata={**file_metadata(v), key: value},
    )
    with pytest.raises(VectorFileError, match=message):
        vector_from_bytes(data)


# ---------------------------------------------------------------------------------- format v2
def test_v2_round_trip_with_ragged_widths(tmp_path):
    v = ragged_vector() * 1.5
    assert v.widths == (8, 8, 16) and v.ragged and v.hidden_size == 16
    assert float(v.directions[:, :2, 8:].abs().max()) == 0.0  # zero beyond the narrow sites
    assert torch.allclose(v.directions.norm(dim=-1), torch.ones(3, 3))
    w = load_vector(save_vector(v, tmp_path / "ragged"))
    assert w == v and w.widths == (8, 8, 16) and w.gain == 1.5
    assert _raw_metadata(tmp_path / "ragged.safetensors")["site_widths"] == "[8, 8, 16]"
    # lookups keep returning padded [L, Dmax] rows
    assert w.at(150.0).shape == (3, 16)


def test_v2_files_refuse_widths_that_do_not_fit_the_tensors():
    v = ragged_vector()
    tensors = {n: getattr(v, n).contiguous() for n in ("directions", "timesteps", "sum_with", "sum_without")}
    tensors |= {n: getattr(v, n).contiguous() for n in ("count_with", "count_without")}
    meta = {**file_metadata(v), "format_version": "2"}
    with pytest.raises(VectorFileError, match=r"site_widths \[8, 8\] do not fit the tensors \(3 sites"):
        vector_from_bytes(st_save(tensors, metadata={**meta, "site_widths": "[8, 8]"}))
    with pytest.raises(VectorFileError, match="site_widths .* the widest 16"):
        vector_from_bytes(st_save(tensors, metadata={**meta, "site_widths": "[8, 8, 8]"}))
    padded = dict(tensors, sum_with=tensors["sum_with"].clone())
    padded["sum_with"][0, 0, 12] = 1.0
    with pytest.raises(VectorFileError, match="'sum_with' is not zero beyond the width"):
        vector_from_bytes(st_save(padded, metadata=meta))
    missing = {k: v for k, v in meta.items() if k != "site_widths"}
    with pytest.raises(VectorFileError, match=r"missing metadata field\(s\) \['site_widths'\]"):
        vector_from_bytes(st_save(tensors, metadata=missing))


@pytest.mark.parametrize("version", ["3", "2.0", ""])
def test_unknown_format_versions_are_refused(version):
    v = make_vector()
    tensors = {n: getattr(v, n).contiguous() for n in ("directions", "timesteps", "sum_with", "sum_without")}
    tensors |= {n: getattr(v, n).contiguous() for n in ("count_with", "count_without")}
    with pytest.raises(VectorFileError, match=f"unknown format_version '{version}'.*reads versions '1', '2'"):
        vector_from_bytes(st_save(tensors, metadata={**file_metadata(v), "format_version": version}))


def test_save_accepts_the_same_tensor_as_both_sums(tmp_path):
    v = make_vector()
    zeros = torch.zeros_like(v.sum_with)
    shared = PathologyVector(v.directions, v.timesteps, zeros, zeros, v.count_with, v.count_with, v.provenance)
    loaded = load_vector(save_vector(shared, tmp_path / "shared"))
    assert torch.equal(loaded.sum_with, zeros) and torch.equal(loaded.sum_without, zeros)
    assert torch.equal(loaded.count_without, v.count_with)
    # the composed vectors of `+` hold such sums too
    assert load_vector(save_vector(make_vector(seed=1) + make_vector(seed=2), tmp_path / "sum")).depth == 4


def test_check_compatible_names_both_width_lists():
    v = ragged_vector()
    v.check_compatible((8, 8, 16))
    with pytest.raises(
        VectorMismatchError,
        match=r"built for widths \[8, 8, 16\] \(3 sites\); the model has widths \[16\] x 3 \(3 sites\): rebuild it",
    ):
        v.check_compatible((16, 16, 16))
    with pytest.raises(VectorMismatchError, match=r"widths \[8, 8, 16\] \(3 sites\); the model has widths \[8, 16\]"):
        v.check_compatible([8, 16])


# ---------------------------------------------------------------------------------- merge
def test_merge_refuses_overlap_for_every_seed_form():
    legacy = _with_metadata(make_vector(seeds=(0, 1, 2)), seeds="0,1,2")
    assert legacy.provenance.seeds == (0, 1, 2)
    with pytest.raises(VectorMismatchError, match=r"share seeds \[2\]"):
        legacy.merge(make_vector(seeds=(2, 3)))
    with pytest.raises(VectorMismatchError, match=r"share seeds \[0, 1, 2\]"):
        legacy.merge(legacy)
    merged = legacy.merge(make_vector(seeds=(5, 6)))
    assert merged.provenance.seeds == (0, 1, 2, 5, 6) and file_metadata(merged)["num_seeds"] == "5"


def test_merge_refuses_a_vector_without_seeds():
    seedless = make_vector(seeds=())
    with pytest.raises(VectorMismatchError, match="the first vector records no seeds"):
        seedless.merge(seedless)
    with pytest.raises(VectorMismatchError, match="the second vector records no seeds"):
        make_vector(seeds=(1,)).merge(seedless)


def test_merge_refuses_different_weights_and_keeps_the_fingerprint():
    a = _with_metadata(make_vector(seeds=(0,)), weights_fingerprint="aaaaaaaaaaaaaaaa")
    b = _with_metadata(make_vector(seeds=(1,)), weights_fingerprint="bbbbbbbbbbbbbbbb")
    with pytest.raises(
        VectorMismatchError,
        match=r"different weights \(weights_fingerprint aaaaaaaaaaaaaaaa vs bbbbbbbbbbbbbbbb\).*Build both on the same",
    ):
        a.merge(b)
    unknown = make_vector(seeds=(2,))  # a 0.1.0 vector has no fingerprint: nothing to compare
    assert a.merge(unknown).provenance.weights_fingerprint == "aaaaaaaaaaaaaaaa"
    assert unknown.merge(a).provenance.weights_fingerprint == "aaaaaaaaaaaaaaaa"


def test_merge_of_ragged_vectors_equals_the_union_and_refuses_other_widths():
    a, b = ragged_vector(seeds=(0, 1), seed=1), ragged_vector(seeds=(2,), seed=2)
    m = a.merge(b)
    assert m.widths == (8, 8, 16)
    torch.testing.assert_close(m.sum_with, a.sum_with + b.sum_with)
    assert float(m.directions[:, :2, 8:].abs().max()) == 0.0
    with pytest.raises(
        VectorMismatchError,
        match=r"widths \[8, 16, 16\] \(3 sites\); the vector it is merged into has widths \[8, 8, 16\]",
    ):
        a.merge(ragged_vector(widths=(8, 16, 16), seeds=(9,)))


# ---------------------------------------------------------------------------------- fingerprint
class _Site(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.q = nn.Linear(width, width)
        self.out = nn.Linear(width, width)


class _Sites:
    """What ``weights_fingerprint`` reads of a ``Sites``: the site modules in order."""

    def __init__(self, modules) -> None:
        self.modules = tuple(modules)


def test_weights_fingerprint_follows_the_output_projection():
    torch.manual_seed(0)
    sites = _Sites([_Site(8), _Site(16)])
    first = weights_fingerprint(sites)
    assert len(first) == 16 and first == weights_fingerprint(sites)
    with torch.no_grad():
        sites.modules[1].out.weight[0, 0] += 1e-3
    assert weights_fingerprint(sites) != first
    with torch.no_grad():
        sites.modules[1].out.weight[0, 0] -= 1e-3
        sites.modules[0].q.weight.add_(1.0)  # not the output projection
    assert weights_fingerprint(sites) == first
    with torch.device("meta"):
        offloaded = _Sites([_Site(8)])
    assert weights_fingerprint(offloaded) == ""


def test_check_weights_compares_the_recorded_fingerprint():
    torch.manual_seed(0)
    sites, other = _Sites([_Site(6)] * 4), _Sites([_Site(6)] * 4)
    v = _with_metadata(make_vector(), weights_fingerprint=weights_fingerprint(sites))
    v.check_weights(sites)
    with pytest.raises(VectorMismatchError, match="built on other weights .* Rebuild the vector"):
        v.check_weights(other)
    make_vector().check_weights(other)  # no fingerprint recorded: nothing to check


# ---------------------------------------------------------------------------------- from_directions
def _unit_rows(k=4, layers=3, d=5, seed=0):
    rows = torch.randn(k, layers, d, generator=torch.Generator().manual_seed(seed))
    return rows / rows.norm(dim=-1, keepdim=True)


def test_from_directions_maps_steps_to_timesteps_and_round_trips(tmp_path):
    rows = _unit_rows()
    step_timesteps = [999.0, 749.0, 499.0, 249.0]  # step order: noisiest first
    v = PathologyVector.from_directions(
        [r.numpy() for r in rows],
        step_timesteps,
        provenance=Provenance(concept_with="dyed", concept_without="plain", seeds=[0], steps=4),
    )
    assert v.timesteps.tolist() == [249.0, 499.0, 749.0, 999.0]
    for step, t in enumerate(step_timesteps):
        torch.testing.assert_close(v.at(t), rows[step].float())
    assert v.provenance.origin == "external" and v.provenance.steps == 4
    assert torch.equal(v.sum_with, v.directions) and v.count_with.tolist() == [1] * 4
    loaded = load_vector(save_vector(v, tmp_path / "external"))
    assert loaded == v
    same = Provenance(seeds=[1], concept_with="dyed", concept_without="plain")
    merged = v.merge(PathologyVector.from_directions(rows, step_timesteps, provenance=same))
    assert merged.provenance.seeds == (0, 1)
    by_timestep = PathologyVector.from_directions(dict(zip(step_timesteps, rows, strict=True)))
    assert torch.equal(by_timestep.directions, v.directions)


def test_from_directions_with_ragged_widths():
    rows = _unit_rows(k=2, layers=3, d=16)
    rows[:, :2, 8:] = 0
    rows = rows / rows.norm(dim=-1, keepdim=True)
    v = PathologyVector.from_directions(rows, [100.0, 200.0], widths=(8, 8, 16))
    assert v.widths == (8, 8, 16)
    with pytest.raises(ValueError, match=r"not zero beyond the width of each site \[8, 16, 16\]"):
        PathologyVector.from_directions(_unit_rows(k=2, layers=3, d=16), [1.0, 2.0], widths=(8, 16, 16))


@pytest.mark.parametrize(
    ("rows", "timesteps", "message"),
    [
        (_unit_rows() * 2, [1.0, 2.0, 3.0, 4.0], r"timestep 1, layer 0 has norm 2: .*normalise the rows"),
        (_unit_rows(), [1.0, 2.0, 3.0], "3 timesteps for 4 rows"),
        (_unit_rows(), [1.0, 2.0, 2.0, 4.0], "timestep 2 is given twice"),
        (_unit_rows(), [1.0, 2.0, 3.0, 1001.0], "0-1000"),
        (_unit_rows().where(torch.tensor(False), torch.tensor(float("nan"))), [1.0, 2.0, 3.0, 4.0], "finite"),
        (torch.ones(4, 5), [1.0, 2.0, 3.0, 4.0], r"\[K, L, D\]"),
    ],
)
def test_from_directions_is_validated_like_a_loaded_file(rows, timesteps, message):
    with pytest.raises(ValueError, match=message):
        PathologyVector.from_directions(rows, timesteps)


def test_zero_rows_are_allowed_and_stay_zero():
    rows = _unit_rows(k=2)
    rows[1, 2] = 0
    v = PathologyVector.from_directions(rows, [10.0, 20.0])
    assert float(v.directions[1, 2].abs().max()) == 0.0 and v.difference_norms()[1, 2] == 0


def test_header_of_a_v2_file_is_sorted_and_stable(tmp_path):
    a = save_vector(ragged_vector(), tmp_path / "a").read_bytes()
    b = save_vector(ragged_vector(), tmp_path / "b").read_bytes()
    (n,) = struct.unpack("<Q", a[:8])
    header = json.loads(a[8 : 8 + n])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"]) and a == b


def test_builders_write_through_the_one_writer():
    from medsteer_core.provenance import build_provenance

    prov = build_provenance(
        prompts_with=["dyed"],
        prompts_without=[None],
        negative_prompt=None,
        seeds=[4, 5],
        steps=20,
        cfg=4.5,
        sampler_name="euler",
        scheduler="normal",
        height=512,
        width=512,
        model_family="pixart-alpha",
        host="ComfyUI BuildPathologyVector",
    )
    meta = prov.to_metadata()
    assert meta == Provenance.from_metadata(meta).to_metadata() and Provenance.from_metadata(meta) == prov
    assert prov.prompts_without == ("",)


@pytest.mark.parametrize("path", SHIPPED[:1], ids=lambda p: p.stem)
def test_medsteer_inspect_shows_the_format_version_and_the_provenance(path, tmp_path, capsys):
    from medsteer_core.headless.cli import main

    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "format: medsteer.pathology_vector version 1; widths 128 at every site" in out
    assert "seeds: 40 (0-39)" in out and "weights fingerprint not recorded" in out
    assert "sampling: 20 steps, sampler ddim" in out and "calibrated setting: layers" in out
    ragged = _with_metadata(ragged_vector(seeds=(3, 9)), weights_fingerprint="0123456789abcdef", steps="4")
    written = save_vector(ragged, tmp_path / "ragged")
    assert main(["inspect", str(written), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format_version"] == "2" and report["shapes"]["widths"] == [8, 8, 16]
    assert report["provenance"]["seeds"] == [3, 9] and report["provenance"]["steps"] == 4
    assert main(["inspect", str(written)]) == 0
    out = capsys.readouterr().out
    assert "version 2; widths per site [8, 8, 16]" in out and "seeds: 2 (3, 9)" in out
    assert "weights fingerprint 0123456789abcdef" in out


def test_build_provenance_records_the_sites_widths_and_weights():
    from medsteer_core.provenance import build_provenance

    torch.manual_seed(0)
    sites = _Sites([_Site(8), _Site(16)])
    sites.widths = (8, 16)
    common = dict(
        prompts_with=["a"],
        prompts_without=["b"],
        negative_prompt="",
        seeds=[0],
        steps=2,
        cfg=1.0,
        sampler_name="euler",
        scheduler="normal",
        height=64,
        width=64,
        model_family="custom",
        host="test",
    )
    prov = build_provenance(**common, sites=sites)
    assert prov.site_widths == (8, 16) and prov.weights_fingerprint == weights_fingerprint(sites) != ""
    unhashed = build_provenance(**common, sites=sites, fingerprint=False)
    assert unhashed.site_widths == (8, 16) and unhashed.weights_fingerprint == ""
