"""The ``medsteer`` CLI end to end on a tiny real diffusers PixArt pipeline saved to ``tmp_path``:
build-vector -> generate -> heatmap -> inspect, resume, strength 0, LoRA, merge, torchrun
scale-out (2 gloo processes == 1 process, byte for byte), the demo hook, and interop of the file
with the ComfyUI host's call layout."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from medsteer_core import MedSteerError, SteeringPlan, inspection, load_vector, steering
from medsteer_core import headless as mp
from medsteer_core.headless.cli import main
from medsteer_core.hooks import CallInfo
from tests.checkpoint_factories import save_tiny_lora
from tests.tiny_models import save_tiny_pixart

WITH = "an endoscopic image of dyed lifted polyps"
WITHOUT = "an endoscopic image of polyps"
REPO = Path(__file__).resolve().parents[1]


def build_args(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "build-vector",
        "-q",
        "--model",
        str(model),
        "--with",
        WITH,
        "--with",
        "a colonoscopy image of dyed lifted polyps",
        "--without",
        WITHOUT,
        "--num-seeds",
        "2",
        "--steps",
        "3",
        "--out",
        str(out),
        *extra,
    ]


def generate_args(model: Path, vector: Path, out: Path, *extra: str) -> list[str]:
    return [
        "generate",
        "-q",
        "--model",
        str(model),
        "--vector",
        str(vector),
        "--layer-start",
        "1",
        "--layer-end",
        "3",
        "--steps",
        "3",
        "--out",
        str(out),
        *extra,
    ]


def tree(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / mp.MANIFEST).read_text().splitlines()]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = save_tiny_pixart(root / "model")
    vector = root / "vectors" / "dye.safetensors"
    assert main(build_args(model, vector)) == 0
    # The vector's two phrasings x seeds 0-1, one process: what resume and torchrun must reproduce.
    reference = root / "reference"
    assert main(generate_args(model, vector, reference, "--num-seeds", "2", "--heatmaps")) == 0
    return {"root": root, "model": model, "vector": vector, "reference": reference}


# ----------------------------------------------------------------------------------- help
def test_help_explains_every_command_with_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in ("build-vector", "generate", "heatmap", "inspect", "demo", "torchrun"):
        assert command in text
    for command, flags in (
        ("build-vector", ("--with", "--without", "--merge", "--num-seeds", "--scheduler", "--lora", "--offload")),
        ("generate", ("--vector", "--strength", "--layer-start", "--timestep-max", "--heatmaps", "--seed")),
        ("heatmap", ("--at-steps", "--layers", "Fig. 3")),
        ("inspect", ("--halves", "--json")),
    ):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "examples:" in text
        for flag in flags:
            assert flag in text, (command, flag)


# ----------------------------------------------------------------------------------- end to end
def test_build_generate_heatmap_inspect(work, tmp_path, capsys):
    vector = load_vector(work["vector"])
    assert vector.count_with.tolist() == [4, 4, 4]  # 2 phrasings x 2 seeds per timestep
    assert list(vector.provenance.prompts_with)[1] == "a colonoscopy image of dyed lifted polyps"
    assert all(p.is_file() for p in inspection.halves_paths(work["vector"]))

    records = manifest(work["reference"])
    assert [(r["prompt_index"], r["seed"]) for r in records] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    first = records[0]
    # default prompts: the vector's phrasings with the concept
    assert [first["prompt"], records[2]["prompt"]] == [WITH, "a colonoscopy image of dyed lifted polyps"]
    settings = first["settings"]
    assert settings["vectors"][0]["sha256"] == hashlib.sha256(work["vector"].read_bytes()).hexdigest()
    assert settings["vectors"][0]["strength"] == 2.5 and settings["vectors"][0]["layer_start"] == 1
    assert settings["steps"] == 3 and settings["model_family"] == "pixart-alpha"
    from PIL import Image

    for record in records:
        for kind in ("unsteered", "steered", "gate", "mask"):
            entry = record["files"][kind]
            data = (work["reference"] / entry["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        mask = Image.open(work["reference"] / record["files"]["mask"]["path"])
        assert mask.mode == "L" and mask.size == (16, 16)
    assert any(r["files"]["steered"]["sha256"] != r["files"]["unsteered"]["sha256"] for r in records)

    figure = tmp_path / "fig3.png"
    heat = ["heatmap", "-q", "--model", str(work["model"]), "--vector", str(work["vector"]), "--layer-start", "1"]
    heat += ["--layer-end", "3", "--steps", "3", "--seed", "1", "--layers", "1,2", "--at-steps", "all"]
    assert main([*heat, "--save-images", "--out", str(figure)]) == 0
    grid = Image.open(figure)
    assert grid.size == (150 + 2 * (128 + 4) + 4, 20 + 3 * (128 + 4) + 4)  # rows: 3 steps, columns: 2 layers
    assert (tmp_path / "fig3-steered.png").read_bytes() == (
        work["reference"] / manifest(work["reference"])[1]["files"]["steered"]["path"]  # prompt 0, seed 1
    ).read_bytes()

    capsys.readouterr()
    assert main(["inspect", str(work["vector"])]) == 0
    text = capsys.readouterr().out
    assert "per layer" in text and "stability across seeds (two halves" in text
    assert main(["inspect", str(work["vector"]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["difference_norms"]) == 3 and len(report["difference_norms"][0]) == 4
    assert report["seed_stability"]["available"] and -1 <= report["seed_stability"]["mean"] <= 1


def test_resume_skips_finished_seeds_and_redoes_the_rest_byte_identically(work, tmp_path, capsys):
    out = tmp_path / "pairs"
    shutil.copytree(work["reference"], out)
    # A crash during the last pair: three records in the per-rank part file, the fourth cut
    # short and its files never written, and one file of the third damaged.
    lines = (out / mp.MANIFEST).read_text().splitlines(keepends=True)
    (out / mp.MANIFEST).unlink()
    (out / "manifest.parts").mkdir()
    (out / "manifest.parts" / "rank-0.jsonl").write_text("".join(lines[:3]) + lines[3][:40])
    for path in (out / "images").glob("p001-s1-*"):
        path.unlink()
    (out / "images" / "p001-s0-mask.png").write_bytes(b"damaged")
    (out / "images" / ".p001-s1-steered.png.999.tmp").write_bytes(b"cut short")
    finished = {p: p.stat().st_mtime_ns for p in (out / "images").glob("p000-*")}
    capsys.readouterr()
    args = generate_args(work["model"], work["vector"], out, "--num-seeds", "2", "--heatmaps")
    assert main([a for a in args if a != "-q"]) == 0
    assert "2 pair(s) written, 2 already done" in capsys.readouterr().err
    assert tree(out) == tree(work["reference"])
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # finished pairs were not rewritten
    # Other settings into the same folder: refused, nothing mixed.
    assert main(generate_args(work["model"], work["vector"], out, "--num-seeds", "2", "--strength", "1.0")) == 2
    error = capsys.readouterr().err
    assert "other settings" in error and "vectors" in error
    assert tree(out) == tree(work["reference"])


def test_strength_zero_pairs_are_identical_images(work, tmp_path):
    out = tmp_path / "zero"
    zero = generate_args(work["model"], work["vector"], out, "--prompt", WITH, "--num-seeds", "1", "--strength", "0")
    assert main([*zero, "--heatmaps"]) == 0
    (record,) = manifest(out)
    files = record["files"]
    assert files["steered"]["sha256"] == files["unsteered"]["sha256"]
    assert (out / files["steered"]["path"]).read_bytes() == (out / files["unsteered"]["path"]).read_bytes()
    assert files["unsteered"]["sha256"] == manifest(work["reference"])[0]["files"]["unsteered"]["sha256"]


def test_lora_changes_the_output_and_is_recorded(work, tmp_path):
    lora = save_tiny_lora(tmp_path / "lora", work["model"])
    out = tmp_path / "lora_pairs"
    args = generate_args(work["model"], work["vector"], out, "--prompt", WITH, "--num-seeds", "1")
    assert main([*args, "--lora", str(lora)]) == 0
    record = manifest(out)[0]
    assert record["settings"]["lora"] == str(lora) and len(record["settings"]["lora_sha256"]) == 64
    plain = manifest(work["reference"])[0]["files"]["unsteered"]["sha256"]
    assert record["files"]["unsteered"]["sha256"] != plain


def test_merge_adds_seeds_and_refuses_overlap(work, tmp_path, capsys):
    existing = tmp_path / "dye.safetensors"
    shutil.copy(work["vector"], existing)
    shutil.copytree(inspection.halves_paths(work["vector"])[0].parent, inspection.halves_paths(existing)[0].parent)
    merged = tmp_path / "merged.safetensors"
    assert main(build_args(work["model"], merged, "--seed", "2", "--merge", str(existing))) == 0
    built = mp.load_built(merged)
    assert list(built.vector.provenance.seeds) == [0, 1, 2, 3]
    assert built.vector.count_with.tolist() == [8, 8, 8]
    assert list(built.halves[0].provenance.seeds) == [0, 2]
    assert load_vector(existing) == load_vector(work["vector"])  # --out given: the original stays
    assert main(build_args(work["model"], tmp_path / "x.safetensors", "--merge", str(existing))) == 2
    assert "already holds seeds [0, 1]" in capsys.readouterr().err


def test_input_errors_exit_2_with_the_fix(work, tmp_path, capsys):
    two = generate_args(work["model"], work["vector"], tmp_path / "o", "--vector", str(work["vector"]))
    assert main([*two, "--strength", "1", "--strength", "2", "--strength", "3"]) == 2
    assert "--strength was given 3 times for 2 vectors" in capsys.readouterr().err
    assert main(["build-vector", "--with", WITH, "--out", str(tmp_path / "v.safetensors")]) == 2
    assert "both sides" in capsys.readouterr().err
    assert main(generate_args(work["model"], work["vector"], tmp_path / "o", "--seeds", "1,x")) == 2
    assert "comma-separated" in capsys.readouterr().err
    window = ["generate", "--model", str(work["model"]), "--vector", str(work["vector"]), "--out", str(tmp_path / "o")]
    assert main([*window, "--layer-start", "2", "--layer-end", "9"]) == 2
    assert "outside this model's 4 layers" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- interop
def test_cli_vector_steers_the_same_with_the_comfyui_call_layout(work):
    """ComfyUI sends cond and uncond as separate calls (``cond_or_uncond``); the CLI sends one
    [uncond, cond] batch. The CLI's file, keyed by model timestep, steers both the same way."""
    model = mp.load_model(work["model"], device="cpu", quiet=True)
    vector = load_vector(work["vector"])
    scheduler = model.scheduler()
    scheduler.set_timesteps(3)
    assert vector.timesteps.tolist() == sorted(float(t) for t in scheduler.timesteps)
    plan = SteeringPlan(vector, strength=2.5, layer_start=1, layer_end=3)
    embeds, mask, negative, negative_mask = model.encode(WITH, "", True)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t = vector.timesteps[1]
    extra = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}, "return_dict": False}

    def call(latents, context, context_mask, call_info=None, plans=(plan,)):
        with steering(model.transformer, list(plans), call_info=call_info):
            return model.transformer(
                latents,
                encoder_hidden_states=context,
                encoder_attention_mask=context_mask,
                timestep=t.repeat(len(latents)),
                **extra,
            )[0]

    batched = call(torch.cat([x, x]), torch.cat([negative, embeds]), torch.cat([negative_mask, mask]))
    cond = call(x, embeds, mask, CallInfo.from_layout(t, 1, "comfyui", (4, 4), cond_or_uncond=[0]))
    uncond = call(x, negative, negative_mask, CallInfo.from_layout(t, 1, "comfyui", (4, 4), cond_or_uncond=[1]))
    torch.testing.assert_close(torch.cat([uncond, cond]), batched, atol=1e-5, rtol=1e-5)
    plain = model.transformer(
        x, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=t.repeat(1), **extra
    )[0]
    assert not torch.allclose(plain, cond, atol=1e-4)


def test_vector_saved_by_the_core_like_the_nodes_is_used_by_the_cli(work, tmp_path, capsys):
    """The nodes write vectors with ``save_vector``; the CLI's generate and inspect read them."""
    from medsteer_core import save_vector

    original = load_vector(work["vector"])
    node_file = save_vector(-original, tmp_path / "reverse.safetensors")  # the reverse edit, as a node would save it
    out = tmp_path / "pairs"
    assert main(generate_args(work["model"], node_file, out, "--num-seeds", "1", "--prompt", WITHOUT)) == 0
    assert manifest(out)[0]["settings"]["vectors"][0]["concept_with"] == original.concept_without
    assert main(["inspect", str(node_file)]) == 0
    assert "not available" in capsys.readouterr().out  # no halves next to it, and it says so


# ----------------------------------------------------------------------------------- scale-out
@pytest.mark.slow
def test_torchrun_two_gloo_processes_equal_one_process(work, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "medsteer_core.headless.cli",
    ]
    vector = tmp_path / "dye.safetensors"
    pairs = tmp_path / "pairs"
    for args in (
        build_args(work["model"], vector),
        generate_args(work["model"], work["vector"], pairs, "--num-seeds", "2", "--heatmaps"),
    ):
        done = subprocess.run([*launch, *args], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    assert vector.read_bytes() == work["vector"].read_bytes()
    for mine, theirs in zip(inspection.halves_paths(vector), inspection.halves_paths(work["vector"]), strict=True):
        assert mine.read_bytes() == theirs.read_bytes()
    assert tree(pairs) == tree(work["reference"])


# ----------------------------------------------------------------------------------- demo
def test_demo_is_dispatched_lazily(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "medsteer_core.mini.demo", None)  # as if the module were not installed
    assert main(["demo"]) == 2
    assert "medsteer_core.mini.demo is missing" in capsys.readouterr().err
    seen = []
    stub = types.ModuleType("medsteer_core.mini.demo")
    stub.main = lambda args: seen.append(args) or 0
    monkeypatch.setitem(sys.modules, "medsteer_core.mini.demo", stub)
    assert main(["demo", "--seeds", "8", "--out", "x"]) == 0
    assert seen == [["--seeds", "8", "--out", "x"]]


# ----------------------------------------------------------------------------------- MedSteer-mini defaults (issue 11)
SHIPPED_VECTORS = REPO / "medsteer_core" / "mini" / "assets" / "vectors"


def test_generate_with_a_shipped_vector_and_no_prompt_uses_its_prompts(tmp_path, capsys):
    vector = SHIPPED_VECTORS / "dye_removal.safetensors"
    out = tmp_path / "pairs"
    assert main(["generate", "-q", "--vector", str(vector), "--num-seeds", "1", "--steps", "2", "--out", str(out)]) == 0
    records = manifest(out)
    prompts = {r["prompt"] for r in records}
    assert len(records) > 1 and all("dyed lifted polyps" in p for p in prompts), prompts


def test_build_vector_then_generate_on_the_defaults_works_on_the_mini(tmp_path, capsys):
    """No --model (MedSteer-mini, 6 layers) and no window flags: the paper's 8-16 does not fit, so the
    default is the model's whole window, and --help says so."""
    vector = tmp_path / "v.safetensors"
    build = ["build-vector", "-q", "--with", "a colonoscopy image of dyed lifted polyps"]
    build += ["--without", "a colonoscopy image of polyps", "--num-seeds", "2", "--steps", "2", "--out", str(vector)]
    assert main(build) == 0
    out = tmp_path / "pairs"
    assert main(["generate", "-q", "--vector", str(vector), "--num-seeds", "1", "--steps", "2", "--out", str(out)]) == 0
    (record,) = manifest(out)
    (steer,) = record["settings"]["vectors"]
    assert (steer["layer_start"], steer["layer_end"], steer["strength"]) == (0, 6, 2.5)
    assert record["prompt"] == "a colonoscopy image of dyed lifted polyps"  # the vector's, JSON written
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert (
        "the paper's 8-16 on a PixArt with at least 16 layers, all layers of a smaller one (0-6 on MedSteer-mini)"
        in help_text
    )


def test_missing_local_model_path_is_one_line_and_exit_2_without_the_hub(tmp_path, monkeypatch, capsys):
    from diffusers import DiffusionPipeline

    monkeypatch.setattr(DiffusionPipeline, "load_config", lambda *a, **k: pytest.fail(f"hub asked for {a[:1]}"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    vector = SHIPPED_VECTORS / "dye_removal.safetensors"
    for source in ("./nope", "models/x"):
        assert main(["generate", "-q", "--model", source, "--vector", str(vector), "--out", "o"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"no model folder or file at '{source}'" in err and "check the path" in err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------- issue 12: F2 F3 F10 F11
def _cli(*args: str, limit_bytes: int | None = None) -> subprocess.Popen:
    """``medsteer`` in a separate process (optionally with a file-size limit: writes past it fail with EFBIG)."""

    def limit():
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "medsteer_core.headless.cli", *args]
    return subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limit if limit_bytes else None,
    )


def _complete_lines(path: Path) -> int:
    if not path.is_file():
        return 0
    return path.read_bytes().count(b"\n")


def _check_records(folder: Path) -> list[dict]:
    """Every manifest record's files exist with the recorded sha256."""
    records = manifest(folder)
    for record in records:
        for entry in record["files"].values():
            assert hashlib.sha256((folder / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]
    return records


def test_a_second_writer_is_refused_while_the_first_holds_the_folder_and_a_crash_frees_it(work, tmp_path, capsys):
    """F2: two runs on one --out mixed strengths in one manifest (or crashed on the part file);
    the folder is now locked from before the model loads, and SIGKILL releases the lock."""
    out = tmp_path / "pairs"
    args = generate_args(work["model"], work["vector"], out, "--prompt", WITH, "--num-seeds", "30")
    first = _cli(*args)
    try:
        part = out / "manifest.parts" / "rank-0.jsonl"
        for _ in range(1200):
            if _complete_lines(part) >= 1 or first.poll() is not None:
                break
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()[1][-2000:]
        capsys.readouterr()
        for extra in (("--strength", "5.25"), ()):  # other settings, and the very same command
            assert main([*args, *extra]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1, err
            assert f"{str(out)!r} is being written by another medsteer run (pid {first.pid})" in err
            assert "pass another --out folder" in err
        first.kill()  # a crash while holding the lock
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert main(args) == 0  # the OS released the lock; the same command resumes
    records = _check_records(out)
    assert [r["seed"] for r in records] == list(range(30))
    assert {r["settings"]["vectors"][0]["strength"] for r in records} == {2.5}
    assert not (out / ".medsteer.lock").exists() and not (out / "manifest.parts").exists()
    for seed in (0, 1):  # the same bytes as the uninterrupted reference run
        for kind in ("unsteered", "steered"):
            name = f"images/p000-s{seed}-{kind}.png"
            assert (out / name).read_bytes() == (work["reference"] / name).read_bytes()


def test_resume_after_a_record_cut_short_keeps_every_pair(work, tmp_path, capsys):
    """F3: the next record was appended to the cut-off line, the merged line was dropped, and the
    resumed run exited 0 with 3 of 4 pairs in the manifest."""
    out = tmp_path / "pairs"
    shutil.copytree(work["reference"], out)
    lines = (out / mp.MANIFEST).read_text().splitlines(keepends=True)
    (out / mp.MANIFEST).unlink()
    (out / "manifest.parts").mkdir()
    (out / "manifest.parts" / "rank-0.jsonl").write_text("".join(lines[:2]) + lines[2][:40])
    for path in (out / "images").glob("p001-*"):
        path.unlink()
    assert main(generate_args(work["model"], work["vector"], out, "--num-seeds", "2", "--heatmaps")) == 0
    assert len(manifest(out)) == 4
    assert tree(out) == tree(work["reference"])


def _reference_copy(work, tmp_path: Path) -> Path:
    out = tmp_path / "pairs"
    shutil.copytree(work["reference"], out)
    return out


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda r: [1, 2], "a JSON list, not an object"),
        (lambda r: {**r, "prompt_index": "0"}, "prompt_index is '0', not an integer >= 0"),
        (lambda r: {k: v for k, v in r.items() if k != "settings"}, "settings is NoneType, not an object"),
        (lambda r: {**r, "files": {"steered": {"path": "../../x.png", "sha256": "0" * 64}}}, "does not name"),
        (lambda r: {**r, "files": {"steered": "x"}}, "does not name 'images/p000-s1-steered.png'"),
        (lambda r: {**r, "settings": {**r["settings"], "vectors": [3]}}, "settings.vectors is not a list of objects"),
        (lambda r: '{"prompt_index": 0', "not JSON (JSONDecodeError)"),
    ],
)
def test_a_malformed_manifest_line_is_an_error_naming_file_and_line(work, tmp_path, capsys, edit, problem):
    """F10: KeyError / TypeError from crafted manifest lines (and a ../ path read outside the folder)."""
    out = _reference_copy(work, tmp_path)
    lines = (out / mp.MANIFEST).read_text().splitlines()
    changed = edit(json.loads(lines[1]))
    lines[1] = changed if isinstance(changed, str) else json.dumps(changed)
    (out / mp.MANIFEST).write_text("\n".join(lines) + "\n")
    before = tree(out)
    capsys.readouterr()
    assert main(generate_args(work["model"], work["vector"], out, "--num-seeds", "2", "--heatmaps")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"{out / mp.MANIFEST}:2: " in err and problem in err and "delete that line" in err
    assert tree(out) == before


def test_a_broken_line_inside_a_part_file_is_an_error_but_a_cut_off_last_line_is_redone(work, tmp_path, capsys):
    out = _reference_copy(work, tmp_path)
    lines = (out / mp.MANIFEST).read_text().splitlines(keepends=True)
    (out / mp.MANIFEST).unlink()
    (out / "manifest.parts").mkdir()
    part = out / "manifest.parts" / "rank-0.jsonl"
    part.write_text(lines[0] + lines[1][:40] + lines[2])  # two records merged by the old writer
    capsys.readouterr()
    args = generate_args(work["model"], work["vector"], out, "--num-seeds", "2", "--heatmaps")
    assert main(args) == 2
    assert f"{part}:2: not JSON" in capsys.readouterr().err
    part.write_text(lines[0] + lines[1] + lines[2][:40])  # only the last record cut short: redone
    assert main(args) == 0
    assert tree(out) == tree(work["reference"])


@pytest.mark.parametrize(("limit", "heatmaps"), [(1000, True), (3000, False)])
def test_a_full_disk_is_one_line_and_leaves_only_whole_records(work, tmp_path, limit, heatmaps):
    """F11: a full disk ended in an OSError traceback (exit 1) and could leave half a record.

    Simulated with RLIMIT_FSIZE (writes past the limit fail with EFBIG, as ENOSPC would): at 1000
    bytes the first gate image fails; at 3000 bytes, without gate images (one alone is larger than
    that since the gate grids were redrawn with steps as rows), the third record of the part file
    is cut mid-line."""
    out = tmp_path / "pairs"
    extra = ("--num-seeds", "2", "--heatmaps") if heatmaps else ("--num-seeds", "2")
    args = generate_args(work["model"], work["vector"], out, *extra)
    if heatmaps:
        reference = work["reference"]
    else:
        reference = tmp_path / "reference_without_heatmaps"
        assert main(generate_args(work["model"], work["vector"], reference, *extra)) == 0
    run = _cli(*args, limit_bytes=limit)
    _, err = run.communicate(timeout=300)
    assert run.returncode == 2, err[-3000:]
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"cannot write to the output folder {str(out)!r}: File too large" in err
    assert "rerun the same command" in err
    assert not (out / mp.MANIFEST).exists()
    assert not list(out.rglob("*.tmp")) and not (out / ".medsteer.lock").exists()
    part = out / "manifest.parts" / "rank-0.jsonl"
    data = part.read_bytes()
    assert data == b"" or data.endswith(b"\n")  # no half record
    assert data.count(b"\n") == {1000: 0, 3000: 2}[limit]
    assert main(args) == 0  # with space again, the same command completes the dataset
    assert tree(out) == tree(reference)


def test_unwritable_outputs_are_refused_before_the_model_loads(work, tmp_path, capsys):
    """F11: --out under a file / a read-only place was found only after loading (generate) or after
    all sampling (build-vector, heatmap). A missing model proves the check comes first."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    vector = str(work["vector"])
    missing_model = str(tmp_path / "no_model")
    under_file = str(blocker / "v.safetensors")
    capsys.readouterr()
    for command in (
        ["generate", "-q", "--model", missing_model, "--vector", vector, "--out", str(blocker / "pairs")],
        ["build-vector", "-q", "--model", missing_model, "--with", WITH, "--without", WITHOUT, "--out", under_file],
        ["heatmap", "-q", "--model", missing_model, "--vector", vector, "--out", str(blocker / "fig.png")],
    ):
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is a file, not a folder" in err, err
        assert "no_model" not in err
    assert main(["heatmap", "--model", missing_model, "--vector", vector, "--out", str(tmp_path)]) == 2
    assert "is a folder: give a file name" in capsys.readouterr().err


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nobody may write: a read-only tmpfs when root can mount one, else chmod 555."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"root cannot mount a read-only tmpfs here: {mounted.stderr!r}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_read_only_outputs_are_one_line_exit_2(work, read_only_folder, capsys):
    vector = str(work["vector"])
    capsys.readouterr()
    for command, flag in (
        (generate_args(work["model"], work["vector"], read_only_folder / "pairs"), "output folder"),
        (
            ["build-vector", "-q", "--with", WITH, "--without", WITHOUT, "--out", str(read_only_folder / "v")],
            "--out file",
        ),
        (["heatmap", "-q", "--vector", vector, "--out", str(read_only_folder / "fig.png")], "--out file"),
    ):
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "cannot write" in err and flag in err, err
        assert "Read-only file system" in err or "Permission denied" in err


def test_device_and_cell_arguments_are_checked_before_loading(work, tmp_path, capsys):
    """F11: --device nonsense was a RuntimeError, --device cuda without CUDA an AssertionError,
    heatmap --cell 0 a RuntimeError after sampling."""
    vector = str(work["vector"])
    capsys.readouterr()
    cases = [("nonsense", "unknown device 'nonsense': pass auto, cpu, cuda")]
    if not torch.cuda.is_available():
        cases.append(("cuda", "CUDA is not available here"))
    for device, message in cases:
        for command in (
            generate_args(work["model"], work["vector"], tmp_path / "pairs", "--device", device),
            ["heatmap", "-q", "--vector", vector, "--device", device, "--out", str(tmp_path / "f.png")],
            [
                "build-vector",
                "-q",
                "--with",
                WITH,
                "--without",
                WITHOUT,
                "--device",
                device,
                "--out",
                str(tmp_path / "v"),
            ],
        ):
            assert main(command) == 2, command
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "pairs").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["heatmap", "--vector", vector, "--cell", "0", "--out", str(tmp_path / "f.png")])
    assert exit_info.value.code == 2
    assert "--cell: must be a whole number >= 1, got 0" in capsys.readouterr().err
    heat = [
        "heatmap",
        "-q",
        "--model",
        str(work["model"]),
        "--vector",
        vector,
        "--layer-start",
        "1",
        "--layer-end",
        "3",
    ]
    assert main([*heat, "--steps", "3", "--at-steps", "7", "--out", str(tmp_path / "f.png")]) == 2
    assert "step 7 is out of range: this run has 3 steps" in capsys.readouterr().err
    model = mp.load_model(work["model"], device="cpu", quiet=True)
    with pytest.raises(MedSteerError, match="cell must be a whole number of pixels >= 1, got 0"):
        mp.gate_heatmap(model, [mp.Steer(work["vector"])], WITH, 0, cell=0)
