"""A reduced `medsteer demo` runs end to end and writes its grids, tables and vector cache."""

from __future__ import annotations

import json
import os

import pytest

from medsteer_core.mini import demo


def test_reduced_demo_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "demo"
    args = ["--quick", "--quiet", "--seeds", "2", "--vector-seeds", "2", "--edits", "dye_removal", "--out", "demo"]
    assert demo.main(args) == 0
    # It ends by saying where it wrote, as absolute paths (issue 11), even with --quiet.
    printed = capsys.readouterr().out.splitlines()
    assert printed[-3:] == [
        f"medsteer demo: wrote {out}{os.sep}",
        f"  report: {out / 'report.md'} (numbers: report.json)",
        "  grids:  grid_dye_removal.png in the same folder",
    ]
    report = (out / "report.md").read_text()
    for heading in ("Rendering check", "Table 2", "Table 3", "Table 4a", "Table 4b", "Re-prompting"):
        assert heading in report
    # The report explains its grid and defines every metric it shows (issue 11).
    assert "![Dye removal (dyed lifted polyps -> polyps)](grid_dye_removal.png)" in report
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
    for term in [*definitions.values(), "**Rendering rate**", "**Re-prompting**", "**Oracle**"]:
        assert f"- {term}:" in report or f"{term}:" in report, term
    assert "**Source removed**: steered images the oracle no longer assigns to the source class" in report
    data = json.loads((out / "report.json").read_text())
    assert set(data["rendering_rate"]) == set(demo.synthetic.CLASSES)
    assert data["strength_sweep"][0]["strength"] == 0.0
    # Strength 0 is the unsteered image: nothing flips, the background is identical (PSNR cap).
    assert data["strength_sweep"][0]["flip_rate"] == 0.0 and data["strength_sweep"][0]["bg_psnr"] == 60.0
    medsteer = data["edits"]["dye_removal"]["medsteer"]
    assert 0 <= medsteer["succeeded"] <= medsteer["images"] == 2 and "eff. Bg-PSNR" in report
    # The sweeps always contain the calibrated setting that Table 2 reports.
    setting = data["edits"]["dye_removal"]["setting"]
    assert setting["strength"] in [r["strength"] for r in data["strength_sweep"]]
    window = [setting["layer_start"], setting["layer_end"]]
    assert window in [[r["layer_start"], r["layer_end"]] for r in data["window_sweep"]]
    from PIL import Image

    grid = Image.open(out / "grid_dye_removal.png")
    assert grid.size[1] == 4 * (32 * 4 + 2)  # unsteered | steered | re-prompted | gate
    cached = sorted(p.name for p in (out / "cache").iterdir())
    assert any(name.startswith("dye_removal_2seeds") for name in cached)
    # A second run reuses the cached vectors and reproduces the numbers exactly.
    assert demo.main(args) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["edits"] == data["edits"]


def test_unknown_edit_is_refused(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit):
        demo.main(["--edits", "esophagitis", "--out", str(tmp_path)])
    assert "unknown edit" in capsys.readouterr().err


def test_calibration_screens_confirms_and_ships_the_rule_s_choice(tmp_path):
    from medsteer_core.mini.calibrate import calibrate_and_ship, calibration_markdown
    from medsteer_core.mini.demo import setting_of
    from medsteer_core.mini.scan import SweepRow, calibrate, removal
    from medsteer_core.vector import load_vector

    summary = calibrate_and_ship(
        tmp_path, edits=("dye_removal",), vector_seeds=2, screen_seeds=2, confirm_seeds=3, confirm_top=2,
        strengths=(0.0, 6.0), windows=[(0, 1), (1, 4)], quiet=True,
    )  # fmt: skip
    record = summary["dye_removal"]
    assert len(record["screen"]) == 4
    confirmed = {(r["layer_start"], r["layer_end"], r["strength"]) for r in record["confirmed"]}
    assert any(k == 6.0 for *_, k in confirmed)
    for start, end, strength in list(confirmed):  # every non-zero pick is refined by +/- 0.25
        if strength == 6.0:
            assert {(start, end, 5.75), (start, end, 6.25)} <= confirmed
    assert len(confirmed) == len(record["confirmed"]) <= 3 * 2
    assert record["seeds"] == "800000..800002" and record["screen_seeds"] == "800000..800001"
    rows = [SweepRow(**r) for r in record["confirmed"]]
    chosen = calibrate(rows, dye=True)
    assert record["chosen"] == chosen.as_dict()
    # Strength 0 is the unsteered image: background identical (the PSNR cap) wherever it was confirmed.
    assert all(r.bg_psnr == 60.0 for r in rows if r.strength == 0.0)
    bar = removal(chosen, True) >= 0.8 and chosen.bg_psnr >= record["reprompting"]["bg_psnr"]
    assert record["meets_issue_bar"] == bar
    vector = load_vector(tmp_path / "dye_removal.safetensors")
    assert setting_of(vector) == (chosen.layer_start, chosen.layer_end, chosen.strength)
    assert json.loads(vector.metadata["calibration"])["chosen"] == record["chosen"]
    text = calibration_markdown(summary)
    assert text.count("| chosen |") == 1 and "| re-prompting |" in text
    assert ("The choice meets the bar" in text) == bar


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
