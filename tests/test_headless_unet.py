"""The headless route on Stable Diffusion pipelines (issue 10), on tiny folders the tests write
(``tests.tiny_models``): SD 1.x-shaped with epsilon and v-prediction schedulers, SDXL-shaped with two
text encoders, a bare UNet over a base pipeline (MINIM's ``unets/<id>/unet``) and a single-file
checkpoint in the original layout. Unsteered sampling is diffusers' own pipeline; the CLI runs
build-vector -> generate -> heatmap -> inspect; loader mistakes get one-line errors; a vector of one
family is refused on another, naming both."""

from __future__ import annotations

import json

import pytest
import torch

from medsteer_core import VectorMismatchError, load_vector
from medsteer_core import headless as mh
from medsteer_core.driver import initial_latents
from medsteer_core.headless.cli import main
from tests.checkpoint_factories import save_single_file
from tests.tiny_models import make_family_pipeline, save_bare_unet, save_tiny_sd

WITH = "an endoscopic image of dyed lifted polyps"
WITHOUT = "an endoscopic image of polyps"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    made = {kind: save_tiny_sd(root / kind, kind) for kind in ("sd", "sd-v", "sdxl")}
    made["unet"] = save_bare_unet(root / "unets" / "oct" / "unet", seed=1)
    made["xl-unet"] = save_bare_unet(root / "unets" / "xl" / "unet", seed=1, kind="sdxl")
    made["single"] = save_single_file(made["sd"], root / "sd1-tiny.safetensors")
    return made


def _load(source, **kwargs):
    return mh.load_model(source, device="cpu", quiet=True, **kwargs)


# ------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("kind", ["sd", "sd-v", "sdxl"])
def test_unsteered_sampling_is_diffusers_own_pipeline(folders, kind):
    """The driver's CFG rows, SDXL's added conditions and the scheduler's use (epsilon, v-prediction,
    Euler) give diffusers' own pipeline's latents for the same noise."""
    model = _load(folders[kind])
    spec = model.spec(3, model.default_cfg)
    ours = model.sample(WITH, [0, 1], spec)
    theirs = model.pipe(
        WITH,
        height=16,
        width=16,
        num_inference_steps=3,
        guidance_scale=spec.cfg,
        num_images_per_prompt=2,
        latents=initial_latents([0, 1], spec),
        output_type="latent",
    ).images
    torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=1e-5)
    assert model.family == model.sites.family and model.default_size == (16, 16)


def test_sdxl_rows_are_uncond_then_cond_and_steering_cond_rows_leaves_uncond_rows(folders):
    model = _load(folders["sdxl"])
    spec = model.spec(2, 5.0)
    calls = []
    hook = model.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(k), with_kwargs=True)
    try:
        model.sample(WITH, [0, 1], spec)
    finally:
        hook.remove()
    embeds, negative, pooled, negative_pooled = model.pipe.encode_prompt(WITH, device="cpu", negative_prompt=None)
    torch.testing.assert_close(calls[0]["encoder_hidden_states"], torch.cat([negative, negative, embeds, embeds]))
    added = calls[0]["added_cond_kwargs"]
    torch.testing.assert_close(added["text_embeds"], torch.cat([negative_pooled] * 2 + [pooled] * 2))
    assert added["time_ids"].tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 4

    built = mh.build_vector(model, [WITH], [WITHOUT], [0], steps=2, halves=False, progress=False)
    plan, _ = mh.Steer(built.vector, strength=50.0, rows="cond").resolve(sites=model.sites)
    unsteered, steered = _first_output(model, spec), _first_output(model, spec, [plan])
    assert torch.equal(steered[:2], unsteered[:2]), "the unconditional rows were steered"
    assert not torch.allclose(steered[2:], unsteered[2:]), "the conditional rows were not steered"


def _first_output(model, spec, plans=()):
    """The UNet's output of the first call (all CFG rows) of one sampling run."""
    seen = []
    hook = model.transformer.register_forward_hook(lambda m, a, out: seen.append(out[0].clone()))
    try:
        model.sample(WITH, [0, 1], spec, plans=plans)
    finally:
        hook.remove()
    return seen[0]


# ------------------------------------------------------------------------------ loaders
def test_bare_unet_replaces_the_pipeline_s_and_is_recorded(folders):
    from diffusers import UNet2DConditionModel

    base = _load(folders["sd"])
    model = _load(folders["sd"], unet=folders["unet"])
    own = UNet2DConditionModel.from_pretrained(str(folders["unet"])).state_dict()
    loaded = model.transformer.state_dict()
    assert all(torch.equal(loaded[k], own[k]) for k in own)
    assert not torch.equal(loaded["conv_in.weight"], base.transformer.state_dict()["conv_in.weight"])
    assert model.provenance()["unet"] == str(folders["unet"]) and "unet" not in base.provenance()


def test_single_file_checkpoint_loads_offline_with_config(folders, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = _load(folders["sd"])
    single = _load(folders["single"], config=folders["sd"])
    for part in ("unet", "vae", "text_encoder"):
        theirs, ours = getattr(folder.pipe, part).state_dict(), getattr(single.pipe, part).state_dict()
        assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs), part
    spec = folder.spec(2, 7.5)
    assert torch.equal(single.sample(WITH, [3], spec), folder.sample(WITH, [3], spec))


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_loader_mistakes_are_one_line_errors_naming_the_fix(folders, tmp_path, capsys):
    sd, unet = str(folders["sd"]), str(folders["unet"])
    inspect = ["inspect", "-q", "--model"]
    assert "no UNet folder" in _error(capsys, [*inspect, sd, "--unet", str(tmp_path / "missing")])
    parent = _error(capsys, [*inspect, sd, "--unet", str(folders["unet"].parent)])
    assert f"pass {unet!r} with --unet" in parent
    assert "is a whole pipeline" in _error(capsys, [*inspect, sd, "--unet", sd])
    assert "bare diffusers UNet" in _error(capsys, [*inspect, unet])
    wrong = _error(capsys, [*inspect, sd, "--unet", str(folders["xl-unet"])])
    assert "reads text of width 32" in wrong and "give 16" in wrong
    assert "--config" in _error(capsys, [*inspect, str(folders["single"])])
    assert "not a file" in _error(capsys, [*inspect, sd, "--config", sd])
    lora = tmp_path / "lora"
    lora.mkdir()
    assert "fuse it into the pipeline" in _error(capsys, [*inspect, sd, "--unet", unet, "--lora", str(lora)])


def test_unet_over_pixart_and_single_file_over_pixart_config_are_refused(folders, tmp_path):
    from tests.tiny_models import save_tiny_pixart

    pixart = save_tiny_pixart(tmp_path / "pixart")
    with pytest.raises(mh.ModelLoadError, match="replaces the UNet of a Stable Diffusion pipeline"):
        _load(pixart, unet=folders["unet"])
    with pytest.raises(mh.ModelLoadError, match="single-file checkpoints are read as Stable Diffusion"):
        _load(folders["single"], config=pixart)
    with pytest.raises(mh.ModelLoadError, match="same architecture"):
        _load(folders["single"], config=folders["sdxl"])


# ------------------------------------------------------------------------------ the CLI
def test_cli_build_generate_heatmap_inspect_on_a_bare_unet(folders, tmp_path, capsys):
    model = ["--model", str(folders["sd"]), "--unet", str(folders["unet"])]
    vector = tmp_path / "dye.safetensors"
    build = ["build-vector", "-q", *model, "--with", WITH, "--without", WITHOUT, "--num-seeds", "2", "--steps", "3"]
    assert main([*build, "--out", str(vector)]) == 0
    built = load_vector(vector)
    assert built.provenance.model_family == "sd-unet" and built.provenance.extra["unet"] == str(folders["unet"])
    assert built.widths == (8, 8, 16, 16, 16, 16, 16, 16, 8, 8, 8)  # ragged, as the tiny UNet's sites

    common = ["generate", "-q", *model, "--vector", str(vector), "--steps", "3", "--seed", "5", "--num-seeds", "1"]
    window = ["--window", "input 4 - output 5", "--heatmaps", "--heatmap-layers", "middle 0,output 3"]
    assert main([*common, *window, "--out", str(tmp_path / "pairs")]) == 0
    record = json.loads((tmp_path / "pairs" / "manifest.jsonl").read_text().splitlines()[0])
    steering = record["settings"]["vectors"][0]
    assert (steering["layer_start"], steering["layer_end"]) == (2, 8)  # input 4 is site 2, output 5 site 7
    assert record["settings"]["heatmaps"]["layers"] == "4,5" and record["settings"]["unet"] == str(folders["unet"])
    images = {kind: (tmp_path / "pairs" / f["path"]).read_bytes() for kind, f in record["files"].items()}
    assert images["steered"] != images["unsteered"] and set(images) == {"steered", "unsteered", "gate", "mask"}

    assert main([*common, "--strength", "0", "--out", str(tmp_path / "zero")]) == 0
    zero = json.loads((tmp_path / "zero" / "manifest.jsonl").read_text())["files"]
    assert zero["steered"]["sha256"] == zero["unsteered"]["sha256"]  # strength 0: the same bytes

    figure = tmp_path / "fig.png"
    assert main(["heatmap", "-q", *model, "--vector", str(vector), "--layers", "middle", "--out", str(figure)]) == 0
    assert figure.stat().st_size > 0

    capsys.readouterr()
    assert main(["inspect", str(vector), *model]) == 0
    text = capsys.readouterr().out
    assert "grid@16x16" in text and "middle 0" in text
    rows = [line.split() for line in text.splitlines() if line.strip().startswith(("2  input 4", "4  middle 0"))]
    assert [row[:5] for row in rows] == [["2", "input", "4", "4x4", "16"], ["4", "middle", "0", "2x2", "16"]]


def test_inspect_lists_the_sites_of_an_sdxl_model(folders, capsys):
    assert main(["inspect", "-q", "--model", str(folders["sdxl"]), "--width", "24", "--height", "16"]) == 0
    text = capsys.readouterr().out
    assert "17 cross-attention sites" in text and "token grids for 24x16 px" in text
    assert "input 7.1" in text and "middle 0.0" in text
    report = capsys.readouterr()
    assert main(["inspect", "-q", "--model", str(folders["sdxl"]), "--json"]) == 0
    sites = json.loads(capsys.readouterr().out)["sites"]
    assert [s["grid"] for s in sites][:3] == [[4, 4], [4, 4], [2, 2]] and sites[2]["width"] == 24
    assert report.err == ""


def test_an_sd1_vector_on_sdxl_or_pixart_is_refused_naming_both(tmp_path):
    def wrap(family):
        from medsteer_core.headless.sd_models import stable_diffusion_model

        name = "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline"
        pipe = make_family_pipeline(family, scratch=tmp_path / family)
        return stable_diffusion_model(pipe, name, f"tiny-{family}", torch.float32, torch.device("cpu"))

    sd1, sdxl = wrap("sd1"), wrap("sdxl")
    assert (sd1.family, sdxl.family) == ("sd1", "sdxl")
    built = mh.build_vector(
        sd1, [WITH], [WITHOUT], [0], steps=1, cfg=1.0, height=8, width=8, halves=False, progress=False
    )
    assert built.vector.provenance.model_family == "sd1"
    with pytest.raises(VectorMismatchError, match="sd1.*sdxl"):
        mh.generate(sdxl, [mh.Steer(built.vector)], [WITH], [0], tmp_path / "out", steps=1, height=8, width=8)
    from tests.tiny_models import save_tiny_pixart

    pixart = _load(save_tiny_pixart(tmp_path / "pixart"))
    with pytest.raises(VectorMismatchError, match="sd1.*pixart"):
        mh.generate(pixart, [mh.Steer(built.vector)], [WITH], [0], tmp_path / "out2", steps=1)
