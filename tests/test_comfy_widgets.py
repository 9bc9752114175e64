"""The ComfyUI widget rules that run without ComfyUI: seeds, prompt texts, save names, chained
edits, heatmap presets, what a built vector records, and the queue-time checks."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from medsteer_core import MedSteerError, PathologyVector, load_vector, save_vector
from medsteer_core.backbones import check_latent_size
from medsteer_core.comfy_widgets import (
    HEATMAP_PRESETS,
    MAX_SEED,
    check_save_name,
    heatmap_selection,
    prompt_text,
    resolve_edit,
    seed_batches,
)
from medsteer_core.gates import PAPER_FIGURE_3, GateMaps, check_index_list, select_maps
from medsteer_core.provenance import build_provenance
from medsteer_core.vector_file import file_metadata
from tests.test_plan import make_vector

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------- latents
def test_latent_size_limit_is_where_pixart_divides_by_zero():
    # ComfyUI's PixArt: base_size = round(((H + W) // 2) / 64) * 64 // patch, zero for (H+W)//2 <= 32.
    for h in range(1, 80):
        for w in range(1, 80):
            if (h + w) // 2 <= 32:
                with pytest.raises(ValueError, match="divides by zero"):
                    check_latent_size(h, w)
            else:
                check_latent_size(h, w)


def test_latent_size_error_names_the_size_and_the_fix():
    with pytest.raises(ValueError) as error:
        check_latent_size(32, 32)
    assert "32x32" in str(error.value) and "256x256 pixels" in str(error.value) and "34x34" in str(error.value)


# ---------------------------------------------------------------------------------- seeds
@pytest.mark.parametrize(("num_seeds", "batch"), [(1, 1), (5, 2), (50, 4), (6, 6), (3, 8)])
def test_seed_batches_cover_every_seed_once_in_order(num_seeds, batch):
    batches = seed_batches(10, num_seeds, batch)
    assert [s for b in batches for s in b] == list(range(10, 10 + num_seeds))
    assert all(1 <= len(b) <= batch for b in batches) and all(len(b) == batch for b in batches[:-1])


def test_seed_batches_refuse_bad_counts_and_overflow():
    with pytest.raises(ValueError, match="num_seeds"):
        seed_batches(0, 0, 1)
    with pytest.raises(ValueError, match="batch size"):
        seed_batches(0, 3, 0)
    with pytest.raises(ValueError, match="seed range"):
        seed_batches(MAX_SEED - 1, 3, 1)
    assert seed_batches(MAX_SEED - 1, 2, 2) == [[MAX_SEED - 1, MAX_SEED]]


# ---------------------------------------------------------------------------------- edits and heatmaps
def test_resolve_edit_counts_from_both_ends():
    assert [resolve_edit(e, 3) for e in (0, 1, 2, -1, -3)] == [0, 1, 2, 2, 0]
    for bad in (3, -4):
        with pytest.raises(ValueError, match="3 chained steering edit"):
            resolve_edit(bad, 3)


def test_paper_figure_3_is_a_preset():
    assert heatmap_selection(next(k for k, v in HEATMAP_PRESETS.items() if v == PAPER_FIGURE_3), "all", "x") == (
        PAPER_FIGURE_3
    )
    custom = next(k for k, v in HEATMAP_PRESETS.items() if v is None)
    assert heatmap_selection(custom, "0,1", "mean").steps == "0,1"
    with pytest.raises(ValueError, match="unknown preset"):
        heatmap_selection("fig 4", "all", "mean")
    # on a 20-step run steered on layers 8-16 it selects layer 8 at steps 8, 12, 14, 19
    maps = torch.rand(20, 8, 1, 4, 4)
    gates = GateMaps(torch.linspace(999, 0, 20), tuple(range(8, 16)), maps)
    chosen, steps, layers = select_maps(gates, PAPER_FIGURE_3.steps, PAPER_FIGURE_3.layers)
    assert torch.equal(chosen, maps[[8, 12, 14, 19]][:, [0], 0])
    assert [s.split(" (")[0] for s in steps] == ["step 8", "step 12", "step 14", "step 19"] and layers == ["layer 8"]


# ---------------------------------------------------------------------------------- metadata
def test_prompt_text_follows_links_to_the_text_encoder():
    prompt = {
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "dyed lifted polyps", "clip": ["4", 1]}},
        "7": {"class_type": "ConditioningSetAreaStrength", "inputs": {"conditioning": ["6", 0], "strength": 1.0}},
        "8": {"class_type": "SomeEncoder", "inputs": {"text": ["9", 0]}},
        "9": {"class_type": "PrimitiveStringMultiline", "inputs": {"value": "x"}},
        "10": {
            "class_type": "BuildPathologyVector",
            "inputs": {"with_concept": ["6", 0], "without_concept": ["7", 0], "uncond": ["8", 0], "seed": 3},
        },
    }
    assert prompt_text(prompt, "10", "with_concept") == "dyed lifted polyps"
    assert prompt_text(prompt, "10", "without_concept") == "dyed lifted polyps"  # through a pass-through node
    assert prompt_text(prompt, "10", "uncond") is None  # text comes from another node: unknown
    assert prompt_text(prompt, "10", "seed") is None
    assert prompt_text(None, "10", "with_concept") is None
    loop = {"1": {"inputs": {"conditioning": ["2", 0]}}, "2": {"inputs": {"conditioning": ["1", 0]}}}
    assert prompt_text(loop, "1", "conditioning") is None


def test_build_provenance_survives_a_file_round_trip_as_strings(tmp_path):
    provenance = build_provenance(
        prompts_with=["dyed lifted polyps"],
        prompts_without=[None],
        negative_prompt=None,
        seeds=[4, 5, 6],
        steps=20,
        cfg=4.5,
        sampler_name="euler",
        scheduler="normal",
        height=512,
        width=512,
        model_family="pixart-alpha",
        host="ComfyUI BuildPathologyVector",
    )
    meta = provenance.to_metadata()
    assert all(isinstance(v, str) for v in meta.values())
    assert json.loads(meta["seeds"]) == [4, 5, 6] and json.loads(meta["prompts_without"]) == [""]
    assert meta["concept_with"] == "dyed lifted polyps" and meta["cfg"] == "4.5"
    vector = make_vector()
    vector = PathologyVector(
        vector.directions,
        vector.timesteps,
        vector.sum_with,
        vector.sum_without,
        vector.count_with,
        vector.count_without,
        provenance,
    )
    loaded = load_vector(save_vector(vector, tmp_path / "v"))
    assert all(file_metadata(loaded)[k] == v for k, v in meta.items())
    assert loaded.provenance == provenance.replace(
        site_widths=loaded.widths, origin="estimated", library_version=loaded.provenance.library_version
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("dye", "dye"),
        ("kvasir/polyp_to_normal", "kvasir/polyp_to_normal"),
        ("a\\b.safetensors", "a/b"),
        ("x//y", "x/y"),
    ],
)
def test_save_names_stay_inside_the_folder(name, expected):
    assert check_save_name(name) == expected


@pytest.mark.parametrize("name", ["", "   ", "../up", "a/../../b", "/etc/x", "C:/x", ".safetensors"])
def test_save_names_that_escape_are_refused(name):
    with pytest.raises(ValueError, match="inside models/medsteer"):
        check_save_name(name)


# ---------------------------------------------------------------------------------- packaging
def test_importing_the_pack_root_outside_comfyui_registers_nothing(monkeypatch):
    # In a full run the comfyui tests have put ComfyUI on sys.path before this test: hide its API
    # (None in sys.modules makes the import fail), as it is missing outside ComfyUI.
    monkeypatch.setitem(sys.modules, "comfy_api", None)
    monkeypatch.setitem(sys.modules, "comfy_api.latest", None)
    spec = importlib.util.spec_from_file_location(
        "medsteer_pack_under_test", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    assert not hasattr(module, "comfy_entrypoint") and not hasattr(module, "NODE_CLASS_MAPPINGS")


# ---------------------------------------------------------------------------------- huge lists at queue time (issue 12 F6)
@pytest.mark.parametrize("text", ["0-1000000000", "1000000000", "5,0-10001", "9" * 5000, "-" + "9" * 5000])
@pytest.mark.parametrize(("what", "words"), [("step", ("all",)), ("layer", ("mean", "all"))])
def test_numbers_beyond_any_run_are_refused_at_queue_time(text, what, words):
    """GateHeatmap's validate_inputs and the CLI flags run this check before sampling."""
    with pytest.raises(MedSteerError, match=rf"{what} '\d+.* is beyond any run: a {what} list names"):
        check_index_list(text, what, words)
    with pytest.raises(MedSteerError, match="is beyond any run"):
        heatmap_selection(
            "custom (steps and layers below)", text if what == "step" else "all", text if what == "layer" else "mean"
        )


def test_ten_thousand_steps_is_still_a_valid_list():
    check_index_list("0-10000", "step")
    check_index_list("9999", "step")


@pytest.mark.parametrize(
    ("command", "flag"),
    [
        ("heatmap", "--at-steps"),
        ("heatmap", "--layers"),
        ("generate", "--heatmap-steps"),
        ("generate", "--heatmap-layers"),
    ],
)
def test_the_cli_refuses_a_huge_range_before_loading_anything(command, flag, capsys):
    from medsteer_core.headless.cli import main

    argv = [command, "--vector", "missing.safetensors", flag, "0-1000000000", "--out", "never"]
    with pytest.raises(SystemExit) as exit_info:  # argparse's usage error
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: " in err and "'1000000000' in '0-1000000000' is beyond any run" in err
    assert not Path("never").exists()
