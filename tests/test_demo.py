"""A reduced `medsteer demo` runs end to end and writes its grids, tables and vector cache."""

from __future__ import annotations

import json
import os

import pytest

from medsteer_core.mini import demo


def test_reduced_demo_end_to_end(tmp_path, monkeypatch, capsys):
    """Both shipped backbones side by side (issue 10): one report, one grid per backbone and edit."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "demo"
    args = ["--quick", "--quiet", "--seeds", "2", "--vector-seeds", "2", "--edits", "dye_removal", "--out", "demo"]
    assert demo.main(args) == 0
    # It ends by saying where it wrote, as absolute paths (issue 11), even with --quiet.
    printed = capsys.readouterr().out.splitlines()
    assert printed[-3:] == [
        f"medsteer demo: wrote {out}{os.sep}",
        f"  report: {out / 'report.md'} (numbers: report.json)",
        "  grids:  grid_dye_removal.png, grid_unet_dye_removal.png in the same folder",
    ]
    report = (out / "report.md").read_text()
    assert report.startswith("# MedSteer demo on MedSteer-mini (PixArt) and MedSteer-mini-UNet\n")
    for heading in ("Side by side", "Rendering check", "Table 2", "Table 3", "Table 4a", "Table 4b", "Re-prompting"):
        assert heading in report
    for title in ("## MedSteer-mini (PixArt)\n", "## MedSteer-mini-UNet\n"):
        assert report.count(title) == 1, title
    # The report explains its grids and defines every metric it shows (issue 11).
    assert "![Dye removal (dyed lifted polyps -> polyps)](grid_dye_removal.png)" in report
    assert "(grid_unet_dye_removal.png)" in report
    assert "one column per seed: the first 2 held-out seeds (900000, 900001, ...)" in report
    for row in ("1. **unsteered**", "2. **steered**", "3. **re-prompted**", "4. **gate**"):
        assert row in report
    header = next(line for line in report.splitlines() if line.startswith("| edit | method |"))
    columns = [c.strip() for c in header.strip("|").split("|")][2:]
    definitions = {
        "flip rate": "**Flip rate**",
        "delta-p": "**delta-p**",
        "source removed": "**Source removed**",
        "dye detection": "**Dye detection**",
        "Bg-PSNR": "**Bg-PSNR / Bg-SSIM**",
        "Bg-SSIM": "**Bg-PSNR / Bg-SSIM**",
        "succeeded": "**Succeeded**",
        "eff. Bg-PSNR": "**Eff. Bg-PSNR / Bg-SSIM**",
        "eff. Bg-SSIM": "**Eff. Bg-PSNR / Bg-SSIM**",
    }
    assert columns == list(definitions)  # every Table 2 column has its definition
    for term in [*definitions.values(), "**Rendering rate**", "**Re-prompting**", "**Oracle**", "**Layers a-b**"]:
        assert f"- {term}:" in report or f"{term}:" in report, term
    assert "**Source removed**: steered images the oracle no longer assigns to the source class" in report
    data = json.loads((out / "report.json").read_text())
    assert list(data["backbones"]) == ["pixart", "unet"]
    from PIL import Image

    for name, run in data["backbones"].items():
        _check_backbone_run(name, run, out, report)
        grid = Image.open(out / demo.DENOISERS[name].grid_name("dye_removal"))
        assert grid.size[1] == 4 * (32 * 4 + 2)  # unsteered | steered | re-prompted | gate
    side = report[report.index("## Side by side") : report.index("## Figures")]
    assert side.count("| Dye removal (dyed lifted polyps -> polyps) |") == 2
    cached = sorted(p.name for p in (out / "cache").iterdir())
    assert len([n for n in cached if n.startswith("dye_removal_2seeds")]) == 2  # one per backbone (digest)
    # A second run reuses the cached vectors and reproduces the numbers exactly.
    assert demo.main(args) == 0
    again = json.loads((out / "report.json").read_text())
    for name in data["backbones"]:
        assert again["backbones"][name]["edits"] == data["backbones"][name]["edits"]


def _check_backbone_run(name: str, run: dict, out, report: str) -> None:
    """One backbone's part of report.json: every class rendered, the strength-0 row identical,
    the sweeps include the calibrated setting, site names in the UNet's tables."""
    assert set(run["rendering_rate"]) == set(demo.synthetic.CLASSES)
    assert run["strength_sweep"][0]["strength"] == 0.0
    # Strength 0 is the unsteered image: nothing flips, the background is identical (PSNR cap).
    assert run["strength_sweep"][0]["flip_rate"] == 0.0 and run["strength_sweep"][0]["bg_psnr"] == 60.0
    medsteer = run["edits"]["dye_removal"]["medsteer"]
    assert 0 <= medsteer["succeeded"] <= medsteer["images"] == 2 and "eff. Bg-PSNR" in report
    setting = run["edits"]["dye_removal"]["setting"]
    assert setting["strength"] in [r["strength"] for r in run["strength_sweep"]]
    window = [setting["layer_start"], setting["layer_end"]]
    assert window in [[r["layer_start"], r["layer_end"]] for r in run["window_sweep"]]
    if name == "unet":
        assert run["site_names"] == ["input 3", "input 5", "middle 0", "output 0", "output 1", "output 2", "output 3"]
        assert run["site_widths"] == [64, 96, 96, 96, 96, 64, 64]
        assert "| 0-1 (input 3) |" in report and "| 0-6 (input 3 - output 2) |" in report
    else:
        assert run["site_names"] == [f"block {i}" for i in range(6)] and "| 0-1 |" in report


def test_unknown_edit_is_refused(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit):
        demo.main(["--edits", "esophagitis", "--out", str(tmp_path)])
    assert "unknown edit" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("backbone", "windows", "bar", "family"),
    [("pixart", [(0, 1), (1, 4)], 0.8, "medsteer-mini"), ("unet", [(0, 1), (2, 5)], 0.85, "medsteer-mini-unet")],
)
def test_calibration_screens_confirms_and_ships_the_rule_s_choice(tmp_path, backbone, windows, bar, family):
    """The same written rule on both backbones (issue 10): the UNet's record names its sites and
    judges dye removal by issue 10's 0.85."""
    from medsteer_core.mini.calibrate import calibrate_and_ship, calibration_markdown
    from medsteer_core.mini.demo import setting_of
    from medsteer_core.mini.scan import SweepRow, calibrate, removal, shortlist
    from medsteer_core.vector_file import load_vector

    summary = calibrate_and_ship(
        tmp_path, backbone=backbone, edits=("dye_removal",), vector_seeds=2, screen_seeds=2, confirm_seeds=3,
        confirm_top=2, strengths=(0.0, 6.0), windows=windows, quiet=True,
    )  # fmt: skip
    record = summary["dye_removal"]
    assert len(record["screen"]) == 4
    confirmed = {(r["layer_start"], r["layer_end"], r["strength"]) for r in record["confirmed"]}
    picks = shortlist([SweepRow(**r) for r in record["screen"]], dye=True, count=2)
    expected = {  # every pick, also at strength -/+ 0.25 where that is positive
        (r.layer_start, r.layer_end, k)
        for r in picks
        for k in (r.strength, r.strength - 0.25, r.strength + 0.25)
        if k > 0 or k == r.strength
    }
    assert confirmed == expected
    assert len(confirmed) == len(record["confirmed"]) <= 3 * 2
    assert record["seeds"] == "800000..800002" and record["screen_seeds"] == "800000..800001"
    rows = [SweepRow(**r) for r in record["confirmed"]]
    chosen = calibrate(rows, dye=True)
    assert record["chosen"] == chosen.as_dict()
    # Strength 0 is the unsteered image: background identical (the PSNR cap) wherever it was confirmed.
    assert all(r.bg_psnr == 60.0 for r in rows if r.strength == 0.0)
    met = removal(chosen, True) >= bar and chosen.bg_psnr >= record["reprompting"]["bg_psnr"]
    assert record["bar"] == bar and record["meets_issue_bar"] == met
    depth = len(record["site_names"])
    assert (
        len(record["layer_profile"]) == len(record["gate_localisation"]) == depth == {"pixart": 6, "unet": 7}[backbone]
    )
    assert all(x == x and x >= 0 for x in record["gate_localisation"])  # both token grids scored
    vector = load_vector(
        tmp_path / {"pixart": "dye_removal.safetensors", "unet": "unet_dye_removal.safetensors"}[backbone]
    )
    assert setting_of(vector) == (chosen.layer_start, chosen.layer_end, chosen.strength)
    assert json.loads(vector.provenance.extra["calibration"])["chosen"] == record["chosen"]
    assert vector.provenance.model_family == family
    text = calibration_markdown(summary)
    assert text.count("| chosen |") == 1 and "| re-prompting |" in text
    assert (f"The choice meets the bar (removal >= {bar:g}," in text) == met
    if backbone == "unet":
        assert vector.widths == (64, 96, 96, 96, 96, 64, 64)
        assert "| layer | site |" in text and "| 2 | middle 0 |" in text
        assert "| layers 2-5 (middle 0 - output 1), strength " in text or "| layers 0-1 (input 3), strength " in text
    else:
        assert "| layer | relative concept difference |" in text


def test_window_labels_name_unet_sites_and_leave_pixart_indices_alone():
    from medsteer_core.mini.scan import window_label

    unet = ("input 3", "input 5", "middle 0", "output 0", "output 1", "output 2", "output 3")
    assert window_label(2, 5, unet) == "2-5 (middle 0 - output 1)"
    assert window_label(0, 1, unet) == "0-1 (input 3)"
    assert window_label(1, 4, [f"block {i}" for i in range(6)]) == "1-4"
    assert window_label(1, 4) == "1-4"


def test_pixel_gates_bring_both_token_grids_to_the_image():
    """Each token's gate covers the 2x2 (16x16 grid) or 4x4 (8x8 grid) pixels it sees; a map
    already at image size is returned as it is."""
    import torch

    from medsteer_core.mini.scan import pixel_gates

    coarse = torch.arange(2 * 64, dtype=torch.float32).reshape(2, 1, 8, 8)
    fine = torch.arange(256, dtype=torch.float32).reshape(1, 1, 16, 16)
    up = pixel_gates(coarse, (32, 32))
    assert up.shape == (2, 1, 32, 32)
    assert torch.equal(up, coarse.repeat_interleave(4, -2).repeat_interleave(4, -1))
    assert torch.equal(pixel_gates(fine, (32, 32)), fine.repeat_interleave(2, -2).repeat_interleave(2, -1))
    same = torch.rand(3, 32, 32)
    assert pixel_gates(same, (32, 32)) is same


def test_a_model_file_of_the_other_backbone_is_refused_before_anything_is_created(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    from medsteer_core.mini.mini_unet import DEFAULT_UNET_PATH

    status = demo.main(["--backbone", "pixart", "--model", str(DEFAULT_UNET_PATH), "--out", "out"])
    assert status == 2
    err = capsys.readouterr().err
    assert "is a MedSteer-mini-UNet file, but --backbone asks for pixart: pass --backbone unet" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seeds", "0"], "argument --seeds: 0 is not a positive count: use 1 or more"),
        (["--seeds", "-5"], "argument --seeds: -5 is not a positive count"),
        (["--seeds", "many"], "argument --seeds: 'many' is not a whole number"),
        (["--vector-seeds", "0"], "argument --vector-seeds: 0 is not a positive count"),
        (["--model", "nope.safetensors"], "--model 'nope.safetensors': no such file"),
        (["--oracle", "nope.safetensors", "--calibrate"], "--oracle 'nope.safetensors': no such file"),
    ],
)
def test_bad_arguments_exit_2_in_one_line_before_anything_is_created(tmp_path, monkeypatch, capsys, args, message):
    """Issue 11: ``--seeds 0`` was a raw IndexError after creating an empty output folder."""
    monkeypatch.chdir(tmp_path)
    try:
        status = demo.main([*args, "--out", "out"])
    except SystemExit as exit_info:  # argparse's own checks exit
        status = exit_info.code
    assert status == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("medsteer demo: error: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_run_demo_refuses_zero_seeds_before_creating_the_folder(tmp_path):
    with pytest.raises(ValueError, match="eval_seeds must be a whole number of at least 1, got 0"):
        demo.run_demo(tmp_path / "out", eval_seeds=0)
    assert not (tmp_path / "out").exists()


def test_help_is_plain_text_that_names_the_outputs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and "**" not in text  # issue 11: raw RST markup in --help
    assert "medsteer demo: the method, seen and measured offline" in text
    for name in ("grid_<edit>.png", "report.md", "report.json", "cache/", "--seeds", "--quick"):
        assert name in text
