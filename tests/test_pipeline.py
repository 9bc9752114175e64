"""medsteer_core.headless on a tiny real diffusers PixArt pipeline saved to disk: loading (alpha,
sigma, errors), the authors' LoRA layout applied with the right scale, build / merge / halves, the
estimator additions scale-out relies on, and vector interop with the ComfyUI host's call layout."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medsteer_core import PathologyVector, VectorEstimator, capture, inspection
from medsteer_core import headless as mp
from medsteer_core.hooks import CallInfo
from medsteer_core.provenance import Provenance
from tests.checkpoint_factories import save_tiny_lora
from tests.tiny_models import PIPELINE_LAYERS as LAYERS
from tests.tiny_models import save_tiny_pixart

WITH = "an endoscopic image of dyed lifted polyps"
WITHOUT = "an endoscopic image of polyps"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    model = save_tiny_pixart(root / "model")
    lora = save_tiny_lora(root / "lora", model, r=4, alpha=8.0)
    return {"root": root, "model": model, "lora": lora}


@pytest.fixture(scope="module")
def model(folders):
    return mp.load_model(folders["model"], device="cpu", quiet=True)


# ----------------------------------------------------------------------------------- loading
def test_loads_alpha_and_sigma_folders(folders, model, tmp_path):
    assert model.family == "pixart-alpha"
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert model.sites.depth == LAYERS
    assert model.default_size == (16, 16)  # sample_size 8 x VAE factor 2
    sigma = mp.load_model(save_tiny_pixart(tmp_path / "sigma", family="sigma"), device="cpu", quiet=True)
    assert sigma.family == "pixart-sigma"


def test_bf16_model_generates_and_records_its_dtype(folders, tmp_path):
    model = mp.load_model(folders["model"], dtype="bf16", device="cpu", quiet=True)
    assert next(model.transformer.parameters()).dtype == torch.bfloat16
    vector = _random_vector(model)
    report = mp.generate(
        model, [mp.Steer(vector, layer_start=1, layer_end=3)], [WITH], [0], tmp_path / "out", steps=2, progress=False
    )
    record = json.loads((tmp_path / "out" / mp.MANIFEST).read_text())
    assert report.written == 1 and record["settings"]["dtype"] == "bf16"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda root: root / "nope", "no model folder"),
        (lambda root: root / "lora", "--lora"),
        (lambda root: root / "model" / "transformer", "one component"),
    ],
)
def test_load_errors_name_the_problem(folders, make, message):
    with pytest.raises(mp.ModelLoadError, match=message):
        mp.load_model(make(folders["root"]), device="cpu")


def test_load_refuses_single_files_other_pipelines_and_incomplete_folders(folders, tmp_path):
    checkpoint = tmp_path / "PixArt-XL-2-512x512.pth"
    checkpoint.write_bytes(b"\x80\x02not really")
    with pytest.raises(mp.ModelLoadError, match="pickle checkpoint"):
        mp.load_model(checkpoint, device="cpu")
    other = tmp_path / "kandinsky"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(mp.ModelLoadError, match="KandinskyPipeline"):
        mp.load_model(other, device="cpu")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "model_index.json").write_text((folders["model"] / "model_index.json").read_text())
    with pytest.raises(mp.ModelLoadError, match="lacks the component folder"):
        mp.load_model(partial, device="cpu")


def test_hub_id_offline_and_not_cached_is_refused_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(mp.ModelLoadError, match="offline"):
        mp.load_model("medsteer-tests/not-a-model", device="cpu")


def test_offload_needs_an_accelerator(folders):
    with pytest.raises(mp.ModelLoadError, match="device is the CPU"):
        mp.load_model(folders["model"], device="cpu", offload=True)


# ----------------------------------------------------------------------------------- LoRA
def test_lora_is_merged_with_scale_alpha_over_r(folders, model):
    """PEFT applies lora_alpha / r (8 / 4 = 2) itself; the merged weights prove it."""
    lora = mp.load_model(folders["model"], lora=folders["lora"], device="cpu", quiet=True)
    assert lora.lora == str(folders["lora"]) and len(lora.lora_sha256) == 64
    adapter = load_file(str(folders["lora"] / "transformer_lora" / "adapter_model.safetensors"))
    prefix = "base_model.model.transformer_blocks.1.attn2.to_q"
    delta = adapter[f"{prefix}.lora_B.weight"] @ adapter[f"{prefix}.lora_A.weight"]
    base = model.transformer.transformer_blocks[1].attn2.to_q.weight
    merged = lora.transformer.transformer_blocks[1].attn2.to_q.weight
    torch.testing.assert_close(merged, base + 2.0 * delta)
    assert not torch.allclose(merged, base + delta, atol=1e-4)
    text = load_file(str(folders["lora"] / "text_encoder_lora" / "adapter_model.safetensors"))
    key = "base_model.model.encoder.block.0.layer.0.SelfAttention.q"
    t5_delta = text[f"{key}.lora_B.weight"] @ text[f"{key}.lora_A.weight"]
    t5_base = model.pipe.text_encoder.encoder.block[0].layer[0].SelfAttention.q.weight
    t5_merged = lora.pipe.text_encoder.encoder.block[0].layer[0].SelfAttention.q.weight
    torch.testing.assert_close(t5_merged, t5_base + 2.0 * t5_delta)
    # The merged model is a plain transformer again: the hooks find its sites directly.
    assert type(lora.transformer).__name__ == "PixArtTransformer2DModel"


def test_lora_layout_errors(folders, tmp_path):
    single = folders["lora"] / "transformer_lora"
    with pytest.raises(mp.ModelLoadError, match="single PEFT adapter"):
        mp.load_model(folders["model"], lora=single, device="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(mp.ModelLoadError, match="neither transformer_lora"):
        mp.load_model(folders["model"], lora=empty, device="cpu")
    with pytest.raises(mp.ModelLoadError, match="no LoRA folder"):
        mp.load_model(folders["model"], lora=tmp_path / "missing", device="cpu")


def test_lora_of_another_model_does_not_fit(folders, tmp_path):
    """An adapter trained on a wider transformer is refused with both shapes named."""
    from diffusers import PixArtTransformer2DModel
    from peft import LoraConfig, get_peft_model

    config = dict(PixArtTransformer2DModel.load_config(str(folders["model"] / "transformer")))
    config.update(attention_head_dim=16, cross_attention_dim=32)
    wide = PixArtTransformer2DModel.from_config(config)
    get_peft_model(wide, LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"])).save_pretrained(
        str(tmp_path / "wide" / "transformer_lora")
    )
    with pytest.raises(mp.ModelLoadError, match=r"does not fit .*\[32, 32\].*\[16, 16\]"):
        mp.load_model(folders["model"], lora=tmp_path / "wide", device="cpu")


# ----------------------------------------------------------------------------------- build
def test_build_vector_halves_pool_to_the_whole(model):
    built = mp.build_vector(model, [WITH], [WITHOUT], range(4), steps=2, batch_size=1, progress=False)
    vector, (a, b) = built.vector, built.halves
    assert list(a.provenance.seeds) == [0, 1] and list(b.provenance.seeds) == [2, 3]
    assert vector.count_with.tolist() == [4, 4] and a.count_with.tolist() == [2, 2]
    pooled = a.merge(b)
    torch.testing.assert_close(pooled.directions, vector.directions, atol=1e-5, rtol=0)
    # keys are the scheduler's model timesteps (0-999), the same keys ComfyUI's sampler gives
    scheduler = model.scheduler()
    scheduler.set_timesteps(2)
    assert sorted(vector.timesteps.tolist()) == sorted(float(t) for t in scheduler.timesteps)
    assert vector.provenance.model_family == "pixart-alpha" and vector.provenance.host == "diffusers"


def test_single_batch_has_no_halves_and_inspect_says_why(model):
    built = mp.build_vector(model, [WITH], [WITHOUT], [0, 1], steps=2, batch_size=2, progress=False)
    assert built.halves is None
    report = inspection.inspect_vector(built.vector)
    assert not report["seed_stability"]["available"] and "halves" in report["seed_stability"]["reason"]


def test_estimator_add_in_unit_order_equals_one_estimator(model):
    """The scale-out guarantee: per-unit estimators added in unit order give the same bits as one
    estimator fed unit after unit."""
    spec = model.spec(2, 4.5)
    one = VectorEstimator.for_model(model.transformer)
    total = VectorEstimator.for_model(model.transformer)
    for label, prompt, seeds in (("with", WITH, [0, 1]), ("with", WITH, [2]), ("without", WITHOUT, [0, 1])):
        model.sample(prompt, seeds, spec, estimator=one, label=label)
        unit = VectorEstimator.for_model(model.transformer)
        model.sample(prompt, seeds, spec, estimator=unit, label=label)
        total.add(unit.to("cpu"))
    assert one.result() == total.result()
    with pytest.raises(ValueError, match="same model"):
        total.add(VectorEstimator(LAYERS + 1, model.sites.hidden_size))


def test_estimator_to_is_a_copy(model):
    est = VectorEstimator.for_model(model.transformer)
    model.sample(WITH, [0], model.spec(2, 4.5), estimator=est, label="with")
    copy = est.to("cpu")
    copy.add(copy.to("cpu"))
    assert est.images("with") == 1 and copy.images("with") == 2


# ----------------------------------------------------------------------------------- interop
def _random_vector(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    scheduler = model.scheduler()
    scheduler.set_timesteps(2)
    k, depth, width = len(scheduler.timesteps), model.sites.depth, model.sites.hidden_size
    return PathologyVector.from_sums(
        scheduler.timesteps.float(),
        torch.randn(k, depth, width, generator=g),
        torch.randn(k, depth, width, generator=g),
        torch.full((k,), 2),
        torch.full((k,), 2),
        Provenance(concept_with="dye", concept_without="no dye", prompts_with=[WITH]),
    )


def test_vector_captured_with_comfyui_layout_equals_batched_capture(model):
    """Capturing split cond/uncond calls (ComfyUI) and one [uncond, cond] batch (CLI) gives the same vector."""
    embeds = {label: model.encode(text, "", True) for label, text in (("with", WITH), ("without", WITHOUT))}
    transformer = model.transformer
    split, batched = VectorEstimator.for_model(transformer), VectorEstimator.for_model(transformer)
    extra = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}, "return_dict": False}
    for t in (999.0, 499.0):
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(int(t)))
        ts = torch.tensor([t])
        for label, (cond, cond_mask, negative, negative_mask) in embeds.items():
            for context, context_mask, chunk in ((negative, negative_mask, 1), (cond, cond_mask, 0)):
                info = CallInfo.from_layout(ts, 1, "comfyui", (4, 4), cond_or_uncond=[chunk])
                with capture(transformer, split, label, call_info=info):
                    transformer(
                        x, encoder_hidden_states=context, encoder_attention_mask=context_mask, timestep=ts, **extra
                    )
            with capture(transformer, batched, label, layout="uncond_cond"):
                transformer(
                    torch.cat([x, x]),
                    encoder_hidden_states=torch.cat([negative, cond]),
                    encoder_attention_mask=torch.cat([negative_mask, cond_mask]),
                    timestep=ts.expand(2),
                    **extra,
                )
    a, b = split.result(), batched.result()
    assert a.timesteps.tolist() == [499.0, 999.0]
    torch.testing.assert_close(a.directions, b.directions, atol=1e-5, rtol=1e-5)
    assert math.isclose(float(a.count_with.sum()), 2.0)


# ----------------------------------------------------------------------------------- MedSteer-mini
def test_medsteer_mini_file_loads_and_samples_in_pixel_space(tmp_path):
    from medsteer_core import mini

    path = mini.save_mini(mini.new_mini(seed=0), tmp_path / "mini.safetensors")
    model = mp.load_model(path, device="cpu", quiet=True)
    assert model.family == "medsteer-mini" and model.latent_scale == 1 and model.latent_channels == 3
    assert model.default_size == (32, 32) and model.default_cfg == 4.0
    latents = model.sample("a", [0], model.spec(2, model.default_cfg))
    (image,) = model.decode(latents)
    assert image.size == (32, 32)
    with pytest.raises(mp.ModelLoadError, match="not to MedSteer-mini"):
        mp.load_model(path, lora=tmp_path, device="cpu")


# ----------------------------------------------------------------------------------- README
def test_readme_headless_pipeline_example_runs(folders, tmp_path, monkeypatch, capsys):
    """The Python API page's pipeline block, with its settings line pointed at the tiny model (4 layers)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "python-api.md").read_text()
    section = text.split("## Headless pipeline", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    settings = {
        r"MODEL, LORA = .*": f"MODEL, LORA = {str(folders['model'])!r}, {str(folders['lora'])!r}",
        r"SEEDS, STEPS, STRENGTH, WINDOW = .*": "SEEDS, STEPS, STRENGTH, WINDOW = 2, 3, 2.5, (1, 3)",
    }
    for pattern, line in settings.items():
        block, count = re.subn(pattern, line, block)
        assert count == 1, pattern
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "docs/python-api.md", "exec"), {})
    assert "4 pairs written, 0 already there" in capsys.readouterr().out
    assert (tmp_path / "fig3.png").is_file() and (tmp_path / "vectors" / "dye.halves" / "a.safetensors").is_file()
    assert len((tmp_path / "pairs" / "dye" / mp.MANIFEST).read_text().splitlines()) == 4


def test_steer_defaults_come_from_a_vectors_calibrated_metadata(model):
    vector = _random_vector(model)
    assert mp.Steer(vector).resolve()[0].strength == 2.5  # the paper's, when nothing is calibrated
    vector = vector.with_provenance(
        vector.provenance.replace(calibrated_strength=1.5, calibrated_layer_start=0, calibrated_layer_end=2)
    )
    plan, entry = mp.Steer(vector).resolve()
    assert (plan.strength, plan.layer_start, plan.layer_end) == (1.5, 0, 2)
    assert mp.Steer(vector, strength=3.0).resolve()[0].strength == 3.0  # an explicit value wins
    assert entry["file"] is None and len(entry["sha256"]) == 64


def test_profile_image_puts_the_noisiest_timestep_first_and_scales_to_the_largest_cell():
    from medsteer_core.gate_drawing import apply_colormap

    timesteps = [49.0, 549.0, 999.0]  # stored ascending; shown noisiest first
    relative = [[0.1, 0.2], [0.3, 0.4], [0.5, 2.0]]  # [K, L]: the largest is t=999, layer 1
    report = {"timesteps": timesteps, "relative_norms": relative}
    image = inspection.profile_image(report, "viridis", cell=12)
    left, head = 44, 14
    assert image.shape == (head + 3 * 12, left + 2 * 12, 3)
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0

    def cell(row, layer):  # centre pixel of a cell
        return image[head + row * 12 + 6, left + layer * 12 + 6]

    top = apply_colormap(torch.tensor(1.0), "viridis")
    assert torch.allclose(cell(0, 1), (top * 255).round() / 255, atol=1 / 255)  # t=999 is row 0
    low = apply_colormap(torch.tensor(0.1 / 2.0), "viridis")
    assert torch.allclose(cell(2, 0), (low * 255).round() / 255, atol=1 / 255)  # t=49 is the last row
    text = inspection.format_inspection(inspection.inspect_vector(_tiny_vector()))
    assert "per layer" in text and "per timestep" in text


def _tiny_vector():
    from medsteer_core.vector import PathologyVector

    g = torch.Generator().manual_seed(5)
    counts = torch.full((3,), 2, dtype=torch.int64)
    return PathologyVector.from_sums(
        torch.tensor([49.0, 549.0, 999.0]),
        torch.randn(3, 2, 8, generator=g, dtype=torch.float64),
        torch.randn(3, 2, 8, generator=g, dtype=torch.float64),
        counts,
        counts.clone(),
        Provenance(concept_with="x", concept_without="y"),
    )


# ----------------------------------------------------------------------------------- shipped vectors (issue 11)
def test_check_new_seeds_reads_the_shipped_vectors_comma_seeds():
    from pathlib import Path

    from medsteer_core import VectorMismatchError, load_vector

    shipped = Path(mp.__file__).parents[1] / "mini" / "assets" / "vectors" / "dye_removal.safetensors"
    vector = load_vector(shipped)
    with pytest.raises(VectorMismatchError, match=r"already holds seeds \[0, 1, 2\] .* start the new seeds at --seed"):
        mp.check_new_seeds(vector, [0, 1, 2])
    held = int(vector.count_with.max())
    mp.check_new_seeds(vector, [held, held + 1])  # fresh seeds pass


def test_default_window_is_the_paper_s_where_it_fits_else_the_whole_model(model):
    from medsteer_core.settings import paper_window

    assert paper_window(28) == (8, 16) and paper_window(16) == (8, 16) and paper_window(6) == (0, 6)
    plan, _ = mp.Steer(_random_vector(model)).resolve(model.sites.depth)  # the tiny model has 4 layers
    assert (plan.layer_start, plan.layer_end) == (0, model.sites.depth)
    plan, _ = mp.Steer(_random_vector(model), layer_start=1).resolve(model.sites.depth)
    assert (plan.layer_start, plan.layer_end) == (1, model.sites.depth)


# ----------------------------------------------------------------------------------- local paths (issue 11)
@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    """cwd = an empty folder with models/ in it; any hub lookup fails the test."""
    from diffusers import DiffusionPipeline

    def reached(*args, **kwargs):
        raise AssertionError(f"the hub was asked for {args[:1]}")

    monkeypatch.setattr(DiffusionPipeline, "load_config", reached)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    return tmp_path


@pytest.mark.parametrize(
    "source", ["./nope", "../nope", "~/nope-medsteer", "models/x", "x.safetensors", "other/x.ckpt", "a/b/c", "x"]
)
def test_missing_local_path_fails_at_once_without_the_hub(no_hub, source):
    from medsteer_core.weights import looks_like_local_path

    assert looks_like_local_path(source) or source == "x"
    with pytest.raises(mp.ModelLoadError, match=rf"no model folder or file at '{re.escape(source)}' .*check the path"):
        mp.load_model(source, device="cpu")


def test_hub_ids_do_not_look_local(no_hub):
    from medsteer_core.weights import looks_like_local_path

    assert not looks_like_local_path("PixArt-alpha/PixArt-XL-2-512x512")
    assert not looks_like_local_path("other/x")  # ./other does not exist: may be a hub id
    (no_hub / "PixArt-alpha").mkdir()
    assert looks_like_local_path("PixArt-alpha/PixArt-XL-2-512x512")  # ./PixArt-alpha exists: local


def test_missing_lora_folder_is_refused_before_loading_the_model(no_hub):
    with pytest.raises(mp.ModelLoadError, match="no LoRA folder at 'loras/medsteer'"):
        mp.load_model("models/x", lora="loras/medsteer", device="cpu")


# ----------------------------------------------------------------------------------- crafted folders (issue 12)
def _copy_model(folders, tmp_path):
    import shutil

    return Path(shutil.copytree(folders["model"], tmp_path / "copy"))


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("layers", [LAYERS - 1, LAYERS + 1])
def test_config_with_another_layer_count_than_the_weights_is_refused(folders, tmp_path, layers):
    """F12: fewer layers loaded silently (exit 0, blocks dropped); more gave 'Cannot copy out of meta tensor'."""
    folder = _copy_model(folders, tmp_path)
    _edit_json(folder / "transformer" / "config.json", num_layers=layers)
    with pytest.raises(mp.ModelLoadError, match=rf"num_layers = {layers}, but the weights have {LAYERS} blocks"):
        mp.load_model(folder, device="cpu", quiet=True)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"interpolation_scale": float("nan")}, "interpolation_scale"),
        ({"num_attention_heads": -1}, "num_attention_heads"),
        ({"attention_head_dim": 4}, "num_attention_heads x attention_head_dim = 8"),
    ],
)
def test_config_fields_are_checked_before_diffusers_builds_the_model(folders, tmp_path, entry, message):
    folder = _copy_model(folders, tmp_path)
    _edit_json(folder / "transformer" / "config.json", **entry)
    with pytest.raises(mp.ModelLoadError, match=message):
        mp.load_model(folder, device="cpu", quiet=True)


def test_shard_index_outside_the_folder_is_refused(folders, tmp_path):
    """F13: diffusers loads whatever file a *.index.json weight_map names, ../ and absolute included."""
    folder = _copy_model(folders, tmp_path)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    outside = tmp_path / "outside.safetensors"
    weights.rename(outside)
    keys = list(load_file(str(outside)))
    index = {"metadata": {}, "weight_map": dict.fromkeys(keys, "../../outside.safetensors")}
    (weights.parent / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(mp.ModelLoadError, match="shards must be plain file names in the same folder"):
        mp.load_model(folder, device="cpu", quiet=True)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"lora_alpha": float("nan")}, "lora_alpha in .* is nan"),
        ({"lora_alpha": 1e30}, r"lora_alpha in .* is 1e\+30"),
        ({"rank_pattern": {"(a+)+$": 2}}, r"rank_pattern key '\(a\+\)\+\$'"),
        ({"target_modules": "(.*)*to_q"}, r"target_modules '\(\.\*\)\*to_q'"),
    ],
)
def test_crafted_lora_config_is_refused_before_peft_sees_it(folders, tmp_path, entry, message):
    """F5 / F8: NaN / 1e30 alphas were merged (black images, exit 0); PEFT's regex hung on (a+)+$."""
    import shutil

    lora = Path(shutil.copytree(folders["lora"], tmp_path / "lora"))
    _edit_json(lora / "transformer_lora" / "adapter_config.json", **entry)
    with pytest.raises(mp.ModelLoadError, match=message):
        mp.load_model(folders["model"], lora=lora, device="cpu", quiet=True)
