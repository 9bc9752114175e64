"""MedSteer-mini: the shipped model loads, renders every class, and steers with its shipped vector."""

from __future__ import annotations

import pytest
import torch

from medsteer_core.backbones import find_sites
from medsteer_core.mini import build_tokenizer, load_mini, new_mini, save_mini, synthetic
from medsteer_core.mini.demo import EDITS, setting_of
from medsteer_core.mini.metrics import score_pairs
from medsteer_core.mini.scan import prompts_for
from medsteer_core.plan import SteeringPlan
from medsteer_core.vector_file import load_vector
from tests._mini import shipped_mini, shipped_oracle


@pytest.fixture()
def oracle():
    return shipped_oracle()


@pytest.fixture()
def mini():
    return shipped_mini()


#: A fixed held-out seed set (disjoint from the vector seeds 0-39 and the calibration seeds).
HELD_OUT = [950_000 + i for i in range(8)]


def test_tokenizer_is_t5_like():
    tok = build_tokenizer()
    ids = tok("An endoscopic image of polyps")["input_ids"]
    assert ids[-1] == tok.eos_token_id == 1
    assert tok("zebra")["input_ids"] == [tok.unk_token_id, 1]
    assert tok("")["input_ids"] == [1]


def test_save_load_round_trip(tmp_path):
    model = new_mini(seed=3)
    path = save_mini(model, tmp_path / "m.safetensors", {"note": "test"})
    loaded = load_mini(path)
    assert loaded.metadata["note"] == "test"
    a = model.generate("polyps", [1], steps=2)
    b = loaded.generate("polyps", [1], steps=2)
    assert torch.equal(a, b)


def test_not_a_mini_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "x.safetensors"), metadata={"format": "other"})
    with pytest.raises(ValueError, match="not a MedSteer-mini file"):
        load_mini(tmp_path / "x.safetensors")


@pytest.mark.parametrize("content", [b"", b"\x08\x00\x00\x00\x00\x00\x00\x00{not json", b"garbage" * 10])
def test_corrupt_or_missing_mini_file_gets_a_clear_error(tmp_path, content):
    path = tmp_path / "mini.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a readable MedSteer-mini file.*mini train"):
        load_mini(path)
    assert path.read_bytes() == content  # nothing is lost
    with pytest.raises(ValueError, match="no MedSteer-mini file at .*missing"):
        load_mini(tmp_path / "missing.safetensors")


def _crafted_mini(tmp_path, drop=(), **changes):
    """The shipped mini's tensors with its metadata edited (values given as Python objects are JSON-encoded)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from medsteer_core.mini import DEFAULT_PATH

    with safe_open(str(DEFAULT_PATH), framework="pt") as handle:
        meta = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    for key in ("transformer_config", "text_encoder_config"):
        if isinstance(changes.get(key), dict) and not changes[key].get("_replace"):
            changes[key] = {**json.loads(meta[key]), **changes[key]}
    for key, value in changes.items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    for key in drop:
        meta.pop(key)
    path = tmp_path / "crafted.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize(
    "drop, changes, message",
    [
        (("vocabulary",), {}, "no 'vocabulary' metadata entry"),  # KeyError before
        ((), {"text_encoder_config": "[1, 2]"}, "'text_encoder_config' is a list"),  # TypeError before
        ((), {"text_encoder_config": "{"}, "'text_encoder_config' is not valid JSON"),
        ((), {"vocabulary": "[" * 100_000}, "'vocabulary' is not valid JSON"),  # RecursionError
        ((), {"vocabulary": ["<pad>", "</s>", "<unk>", 7]}, "distinct words"),
        ((), {"text_encoder_config": {"num_layers": 10**6}}, "num_layers is 1000000, the weights hold 2"),
        ((), {"text_encoder_config": {"d_model": 4096}}, "does not match the model"),
        ((), {"text_encoder_config": {"vocab_size": 10**6}}, "vocab_size 1000000 differs"),
        ((), {"text_encoder_config": {"num_heads": "4"}}, "num_heads is 4, not a whole number"),
        ((), {"transformer_config": {"num_layers": 100000}}, "num_layers = 100000, but the weights have 6 blocks"),
        ((), {"transformer_config": {"sample_size": 10**9}}, "sample_size .* is 1000000000"),
        ((), {"transformer_config": {"sample_size": 30}}, "not a multiple of patch_size 4"),
        ((), {"transformer_config": {"num_attention_heads": 0}}, "num_attention_heads"),
        ((), {"transformer_config": {"interpolation_scale": 1}}, "unknown entries"),
        ((), {"default_cfg": "nan"}, "default_cfg 'nan'"),
        ((), {"prediction_type": "x0"}, "prediction_type 'x0'"),
    ],
)
def test_crafted_mini_metadata_is_a_medsteer_error_before_anything_is_built(tmp_path, drop, changes, message):
    """Issue 12, F10: KeyError / TypeError from a crafted file, and declared sizes that were trusted."""
    from medsteer_core.errors import MedSteerError
    from medsteer_core.mini import load_mini_parts

    path = _crafted_mini(tmp_path, drop, **changes)
    with pytest.raises(MedSteerError, match=message):
        load_mini_parts(path)


def test_unedited_copy_of_the_shipped_mini_loads(tmp_path):
    from medsteer_core.mini import load_mini_parts

    parts = load_mini_parts(_crafted_mini(tmp_path))
    assert parts.transformer_config["num_layers"] == 6


def test_shipped_model_is_a_pixart_with_six_sites(mini):
    sites = find_sites(mini.transformer)
    assert sites.family == "medsteer-mini"
    assert (sites.host, sites.depth, sites.hidden_size, sites.token_grid(0, (32, 32))) == ("diffusers", 6, 128, (8, 8))
    assert (sites.latent_channels, sites.pixel_scale) == (3, 1)  # pixel space
    assert int(mini.metadata["trained_steps"]) > 0


def test_the_mini_is_its_own_model_family_and_a_plain_pixart_is_not():
    """Issue 9, item 6: importing the mini registers its backbone first; it claims the transformers
    ``new_mini`` / ``load_mini`` build (also after ``.to()`` and ``torch.compile``) and nothing else,
    so an untagged PixArt of the very same config stays "pixart"."""
    from diffusers import PixArtTransformer2DModel

    from medsteer_core.backbones import registered_backbones
    from medsteer_core.mini import FAMILY, MiniDiffusers
    from medsteer_core.mini.model import TRANSFORMER_CONFIG

    assert FAMILY == "medsteer-mini"
    first_two = registered_backbones()[:2]  # both mini backbones come before PixArt's and the UNets'
    assert any(isinstance(b, MiniDiffusers) for b in first_two)
    assert sorted(type(b).__name__ for b in first_two) == ["MiniDiffusers", "MiniUNetDiffusers"]
    fresh = new_mini(1).transformer
    for model in (fresh, fresh.to(torch.float64), torch.compile(new_mini(2).transformer)):
        sites = find_sites(model)
        assert (sites.family, sites.host, sites.depth) == ("medsteer-mini", "diffusers", 6)
    plain = PixArtTransformer2DModel(**TRANSFORMER_CONFIG)
    assert find_sites(plain).family == "pixart"
    assert list(find_sites(plain).modules) == [b.attn2 for b in plain.transformer_blocks]


def test_shipped_model_renders_every_class(mini, oracle):
    """Rendering rate by the oracle >= 0.8 for every class (issue 5's precondition)."""
    for c, name in enumerate(synthetic.CLASSES):
        images = mini.generate(prompts_for(name, HELD_OUT), HELD_OUT)
        rate = float((oracle.read(images).labels == c).float().mean())
        assert rate >= 0.8, f"{name}: rendering rate {rate}"


def test_strength_zero_pair_is_identical(mini):
    vector = load_vector(EDITS[0].shipped_path())
    seeds = HELD_OUT[:2]
    plain = mini.generate("an endoscopic image of dyed lifted polyps", seeds)
    zero = mini.generate(
        "an endoscopic image of dyed lifted polyps",
        seeds,
        plans=[SteeringPlan(vector, strength=0.0, layer_start=0, layer_end=6)],
    )
    assert torch.equal(plain, zero)


#: Issue 5's bar (dye removed in >= 80 %, background at least re-prompting's) is checked on these 32
#: held-out seeds. They were fixed before the calibration of 2026-11-22 looked at anything; the
#: earlier 8 seeds (the first 8 here) could not tell the shipped setting's ~0.5-1.4 dB margin from
#: noise (per-seed differences have an SD of about 2 dB).
BAR_SEEDS = [950_000 + i for i in range(32)]


def score_shipped_edit(edit, seeds):
    """``(originals, ours, re-prompting)``: the unsteered images of ``seeds`` and the scores of the
    edit's shipped, calibrated setting and of re-prompting the same seeds."""
    mini, oracle = shipped_mini(), shipped_oracle()
    vector = load_vector(edit.shipped_path())
    assert vector.provenance.calibrated_strength is not None
    start, end, strength = setting_of(vector)
    plan = SteeringPlan(vector, strength=strength, layer_start=start, layer_end=end)
    source = prompts_for(edit.source, seeds)
    originals = mini.generate(source, seeds)
    steered = mini.generate(source, seeds, plans=[plan])
    reprompted = mini.generate(prompts_for(edit.target, seeds), seeds)
    s, t = synthetic.CLASSES.index(edit.source), synthetic.CLASSES.index(edit.target)
    return originals, score_pairs(oracle, originals, steered, s, t), score_pairs(oracle, originals, reprompted, s, t)


@pytest.fixture(scope="module")
def dye_pairs():
    """Scores of the shipped dye-removal setting and of re-prompting, on BAR_SEEDS."""
    originals, ours, baseline = score_shipped_edit(EDITS[0], BAR_SEEDS)
    had_dye = float(shipped_oracle().read(originals).dye_detected.float().mean())
    return had_dye, ours, baseline


def test_shipped_vector_removes_dye(dye_pairs):
    """With its calibrated window and strength: dye gone in >= 80 % of held-out seeds."""
    had_dye, ours, _ = dye_pairs
    assert had_dye >= 0.8  # there was dye to remove
    assert 1 - ours.dye_detection >= 0.8, ours


def test_shipped_vector_background_at_least_reprompting(dye_pairs):
    """Issue 5's second half: the steered pair keeps the background at least as well as re-prompting
    the same seed (Bg-PSNR over the background mask; 34.60 vs 34.30 dB when this was written)."""
    _, ours, baseline = dye_pairs
    assert ours.bg_psnr >= baseline.bg_psnr, (ours, baseline)


@pytest.mark.parametrize("edit", EDITS, ids=lambda e: e.name)
def test_every_edit_ships_a_calibrated_vector_that_met_the_bar_on_calibration_seeds(edit):
    import json

    vector = load_vector(edit.shipped_path())
    start, end, strength = setting_of(vector)
    assert 0 <= start < end <= vector.depth and strength > 0
    record = json.loads(vector.provenance.extra["calibration"])
    assert record["chosen"]["layer_start"] == start and record["chosen"]["strength"] == strength
    assert record["meets_issue_bar"] is True, record["chosen"]
    assert (
        vector.provenance.extra["class_with"] == edit.source and vector.provenance.extra["class_without"] == edit.target
    )


@pytest.mark.parametrize("edit", EDITS[1:], ids=lambda e: e.name)
def test_lesion_edits_flip_and_keep_the_background_better_than_reprompting(edit):
    """Polyp / colitis -> normal at the shipped setting, on the 8 held-out seeds: the source class
    mostly goes and the background beats re-prompting (calibration margins: +5.5 and +3.1 dB)."""
    _, ours, baseline = score_shipped_edit(edit, HELD_OUT)
    assert ours.delta_p > 0.5 and ours.source_removed >= 0.75, ours
    assert ours.bg_psnr > baseline.bg_psnr, (ours, baseline)


def test_the_mini_wing_keeps_modules_and_functions_small():
    """Issue 9, item 8, for the mini's wing: no module over 500 lines, no function over 80."""
    import ast
    from pathlib import Path

    import medsteer_core.mini

    too_long = []
    for module in sorted(Path(medsteer_core.mini.__file__).parent.glob("*.py")):
        text = module.read_text()
        if len(text.splitlines()) > 500:
            too_long.append(f"{module.name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                too_long.append(f"{module.name}:{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, too_long


def test_train_writes_a_loadable_checkpoint_and_resumes_from_its_state(tmp_path):
    """``mini/train.py`` (moved out of ``model.py``): a few steps write a MedSteer-mini file and its
    resume state; resuming continues the step count; the result is the mini's family."""
    from medsteer_core.mini import train

    out = tmp_path / "mini.safetensors"
    train(out, max_steps=2, per_class=1, batch=2, checkpoint_every=1, log=lambda _: None)
    assert load_mini(out).metadata["trained_steps"] == "2"
    assert (tmp_path / "mini.safetensors.state.pt").is_file()
    lines = []
    train(out, max_steps=3, per_class=1, batch=2, resume=True, log=lines.append)
    assert lines[0].startswith("resumed at step 2 (")
    reloaded = load_mini(out)
    assert reloaded.metadata["trained_steps"] == "3"
    assert find_sites(reloaded.transformer).family == "medsteer-mini"
