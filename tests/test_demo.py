"""A reduced `medsteer demo` runs end to end and writes its grids, tables and vector cache."""

from __future__ import annotations

import json

from medsteer_core import demo


def test_reduced_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    args = ["--quick", "--quiet", "--seeds", "2", "--vector-seeds", "2", "--edits", "dye_removal", "--out", str(out)]
    assert demo.main(args) == 0
    report = (out / "report.md").read_text()
    for heading in ("Rendering check", "Table 2", "Table 3", "Table 4a", "Table 4b", "Re-prompting"):
        assert heading in report
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
    from medsteer_core.demo import calibrate_and_ship, setting_of
    from medsteer_core.scan import SweepRow, calibrate, removal
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
    text = demo.calibration_markdown(summary)
    assert text.count("| chosen |") == 1 and "| re-prompting |" in text
    assert ("The choice meets the bar" in text) == bar
