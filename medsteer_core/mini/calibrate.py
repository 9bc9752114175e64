"""``medsteer demo --calibrate``: choose each edit's steering window and strength on calibration
seeds and ship its vector with them (``calibrate_and_ship``), and the ``calibration.md`` report.

One written rule for every backbone (MedSteer-mini's PixArt, MedSteer-mini-UNet): the same seed
sets, strengths, screening and confirmation; the windows are every contiguous span of the model's
cross-attention sites in execution order (21 for the PixArt's 6 blocks, 28 for the UNet's 7 sites).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..backbones import find_sites
from ..vector_file import save_vector
from . import synthetic
from .demo import DENOISERS, EDITS, VECTOR_SEEDS, Edit, _Progress
from .metrics import score_pairs
from .report import _fmt, _table
from .scan import (
    ISSUE_BAR,
    MIN_REMOVAL,
    all_windows,
    build_vector,
    calibrate,
    gate_localisation,
    layer_profile,
    prompts_for,
    removal,
    shortlist,
    sweep_settings,
    window_label,
)

__all__ = [
    "CALIBRATION_SEED_BASE",
    "CALIBRATION_STRENGTHS",
    "calibrate_and_ship",
    "calibration_markdown",
]

#: Calibration seeds: disjoint from the vector seeds (0..), the demo's (900000..) and the tests'.
CALIBRATION_SEED_BASE = 800_000
#: The strengths a calibration tries (the mini needs more than the paper's 2.5: see docs/results.md).
CALIBRATION_STRENGTHS = (1.0, 2.0, 3.0, 4.0, 4.5, 5.0, 5.5, 6.0, 7.0, 8.0)
#: ``meets_issue_bar`` asks each edit for ``scan.ISSUE_BAR`` (issue 10's bar) on the UNet; the
#: PixArt's shipped records were judged by issue 5's bar, 0.8 for every edit.
PIXART_BAR = {"dye_removal": 0.8, "polyp_to_normal": 0.8, "colitis_to_normal": 0.8}


def calibrate_and_ship(
    out_dir: str | Path | None = None,
    *,
    backbone: str = "pixart",
    edits: tuple[str, ...] | None = None,
    vector_seeds: int = VECTOR_SEEDS,
    screen_seeds: int = 16,
    confirm_seeds: int = 64,
    confirm_top: int = 6,
    refine: float = 0.25,
    strengths: tuple[float, ...] = CALIBRATION_STRENGTHS,
    windows: list[tuple[int, int]] | None = None,
    model_path: str | None = None,
    oracle_path: str | None = None,
    quiet: bool = False,
) -> dict:
    """Choose each edit's window and strength on calibration seeds and save its vector with them.

    For every edit: build the vector, scan the layers, then

    1. **screen**: score every contiguous window (or ``windows``) x ``strengths`` on ``screen_seeds`` seeds;
    2. **confirm**: re-score the ``confirm_top`` settings of ``scan.shortlist``, each also at
       ``strength -/+ refine`` (removal jumps over a narrow range of strengths, finer than the
       screening grid), on ``confirm_seeds`` seeds, together with re-prompting them (the baseline);
    3. **choose** by ``scan.calibrate`` on the confirmation scores: among settings that remove the
       concept in at least 85 % of the seeds, the best background.

    The vector is saved with ``calibrated_layer_start`` / ``_end`` / ``calibrated_strength`` and a
    ``calibration`` record (seeds, rule, the site names, the baseline, whether the choice meets the
    bar - removal >= ``scan.ISSUE_BAR`` (issue 10) on the UNet, >= 0.8 (issue 5) on the PixArt, and
    Bg-PSNR >= re-prompting's - and every confirmed row). Every seed used here is disjoint from the
    demo's held-out seeds, so the demo's numbers are out-of-sample.

    Args:
        out_dir: where the vectors go (default: the package's vectors of ``backbone``).
        backbone: ``"pixart"`` or ``"unet"`` (``demo.DENOISERS``): the shipped model calibrated,
            unless ``model_path`` names another file of that backbone.
    """
    model, denoiser = _load(backbone, model_path)
    from .oracle import load_oracle

    oracle = load_oracle(oracle_path)
    out_dir = Path(out_dir if out_dir is not None else denoiser.vector_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen_edits = [e for e in EDITS if edits is None or e.name in edits]
    seeds = [CALIBRATION_SEED_BASE + i for i in range(max(screen_seeds, confirm_seeds))]
    sites = find_sites(model.transformer)
    if windows is None:
        windows = all_windows(sites.depth)
    run = _Calibration(
        model=model,
        oracle=oracle,
        seeds=seeds,
        screen=seeds[:screen_seeds],
        confirm=seeds[:confirm_seeds],
        confirm_top=confirm_top,
        refine=refine,
        settings=[(a, b, float(k)) for a, b in windows for k in strengths],
        names=sites.names,
        bar=ISSUE_BAR if backbone != "pixart" else PIXART_BAR,
    )
    per_edit = 2 * vector_seeds + screen_seeds * (len(run.settings) + 1) + confirm_seeds * (3 * confirm_top + 2)
    run.progress = _Progress(len(chosen_edits) * per_edit, quiet)
    summary = {}
    for edit in chosen_edits:
        run.progress.stage(f"{edit.name}: vector")
        vector = build_vector(model, edit.source, edit.target, list(range(vector_seeds)), progress=run.progress)
        record, vector, best, baseline = run.edit(edit, vector)
        save_vector(vector, edit.shipped_path(out_dir, denoiser.prefix))
        summary[edit.name] = record
        if not quiet:
            run.progress.bar.write(_choice_line(edit, best, baseline, sites.names, confirm_seeds))
    run.progress.close()
    return summary


def _choice_line(edit: Edit, best, baseline, names, seeds: int) -> str:
    """The line ``calibrate_and_ship`` prints for each edit's choice."""
    margin = best.bg_psnr - baseline.bg_psnr
    return (
        f"{edit.name}: layers {window_label(best.layer_start, best.layer_end, names)} strength {best.strength:g}: "
        f"removed {removal(best, edit.dye):.2f}, Bg-PSNR {best.bg_psnr:.2f} dB ({margin:+.2f} vs re-prompting) "
        f"on {seeds} seeds"
    )


def _load(backbone: str, model_path: str | None):
    """``(model, denoiser)``: the model to calibrate, checked to be of ``backbone``."""
    from .mini_unet import is_unet
    from .model import load_mini

    if backbone not in DENOISERS:
        raise ValueError(f"unknown backbone {backbone!r}: choose from {list(DENOISERS)}")
    denoiser = DENOISERS[backbone]
    model = load_mini(model_path if model_path is not None else denoiser.model_path)
    kind = "unet" if is_unet(model.transformer) else "pixart"
    if kind != backbone:
        raise ValueError(
            f"{model_path} is a {DENOISERS[kind].title} file, not {denoiser.title}: pass backbone={kind!r}"
        )
    return model, denoiser


class _Calibration:
    """One calibration run's model, oracle, seeds and settings; ``edit`` calibrates one edit."""

    def __init__(self, *, model, oracle, seeds, screen, confirm, confirm_top, refine, settings, names, bar) -> None:
        self.model, self.oracle, self.seeds = model, oracle, seeds
        self.screen, self.confirm, self.confirm_top, self.refine = screen, confirm, confirm_top, refine
        self.settings, self.names, self.bar = settings, tuple(names), bar
        self.progress = None

    def _screen(self, edit: Edit, vector) -> tuple[list, list[tuple[int, int, float]]]:
        """Every setting on the screening seeds; returns the rows and the candidates to confirm (the
        shortlist, each also at strength -/+ ``refine``)."""
        model, screen, progress = self.model, self.screen, self.progress
        progress.stage(f"{edit.name}: screen {len(self.settings)} settings")
        originals = model.generate(prompts_for(edit.source, screen), screen)
        progress(len(screen))
        rows = sweep_settings(
            model, self.oracle, vector, edit.source, edit.target, screen, self.settings,
            originals=originals, progress=lambda k: progress(k * len(screen)),
        )  # fmt: skip
        picks = shortlist(rows, edit.dye, self.confirm_top)
        candidates = list(
            dict.fromkeys(
                (r.layer_start, r.layer_end, k)
                for r in picks
                for k in (r.strength, r.strength - self.refine, r.strength + self.refine)
                if k > 0 or k == r.strength
            )
        )
        return rows, candidates

    def edit(self, edit: Edit, vector):
        """Scan, screen, confirm and choose for one edit. Returns the summary record, the vector with
        its calibrated setting, the chosen row and the re-prompting baseline."""
        model, oracle, confirm, progress = self.model, self.oracle, self.confirm, self.progress
        kind = "dye" if edit.dye else "lesion"
        local, positive, _ = gate_localisation(model, oracle, vector, edit.source, self.seeds[:8], kind)
        rows, candidates = self._screen(edit, vector)
        progress.stage(f"{edit.name}: confirm {len(candidates)} settings on {len(confirm)} seeds")
        s, t = synthetic.CLASSES.index(edit.source), synthetic.CLASSES.index(edit.target)
        originals = model.generate(prompts_for(edit.source, confirm), confirm)
        reprompted = model.generate(prompts_for(edit.target, confirm), confirm)
        baseline = score_pairs(oracle, originals, reprompted, s, t)
        progress(2 * len(confirm))
        confirmed = sweep_settings(
            model, oracle, vector, edit.source, edit.target, confirm, candidates,
            originals=originals, progress=lambda k: progress(k * len(confirm)),
        )  # fmt: skip
        progress(len(confirm) * (3 * self.confirm_top - len(candidates)))
        best = calibrate(confirmed, edit.dye)
        bar = self.bar[edit.name]
        record = {
            "seeds": f"{confirm[0]}..{confirm[-1]}",
            "screen_seeds": f"{self.screen[0]}..{self.screen[-1]}",
            "rule": f"removal >= {MIN_REMOVAL} on the confirmation seeds, then the best Bg-PSNR",
            "site_names": list(self.names),
            "layer_profile": [round(x, 4) for x in layer_profile(vector)],
            "gate_localisation": [round(x, 3) for x in local],
            "gate_positive_fraction": [round(x, 3) for x in positive],
            "reprompting": baseline.as_dict(),
            "chosen": best.as_dict(),
            "bar": bar,
            "meets_issue_bar": removal(best, edit.dye) >= bar and best.bg_psnr >= baseline.bg_psnr,
            "confirmed": [r.as_dict() for r in confirmed],
        }
        provenance = vector.provenance
        vector = vector.with_provenance(
            provenance.replace(
                calibrated_layer_start=best.layer_start,
                calibrated_layer_end=best.layer_end,
                calibrated_strength=best.strength,
                extra={**provenance.extra, "calibration": json.dumps(record)},
            )
        )
        return record | {"screen": [r.as_dict() for r in rows]}, vector, best, baseline


def calibration_markdown(summary: dict, title: str = "MedSteer-mini") -> str:
    """The layer scan and the confirmation table of each edit, from ``calibrate_and_ship``'s summary."""
    parts = [f"# {title} calibration", ""]
    for name, record in summary.items():
        dye = next(e.dye for e in EDITS if e.name == name)
        parts += [
            f"## {name}",
            "",
            "Layer scan (concept difference from the vector; gate on the first 8 calibration seeds):",
            "",
            _scan_table(record),
            "",
            f"Confirmed on seeds {record['seeds']} (rule: {record['rule']}):",
            "",
            _confirmed_table(record, dye),
        ]
        bar = record.get("bar", 0.8)
        verdict = "meets" if record["meets_issue_bar"] else "does NOT meet"
        parts += ["", f"The choice {verdict} the bar (removal >= {bar:g}, Bg-PSNR >= re-prompting's).", ""]
    return "\n".join(parts)


def _scan_table(record: dict) -> str:
    """Per site: the concept difference and the gate's localisation (with the site's name where the
    model has names that say more than an index, as a UNet's)."""
    names = record.get("site_names") or []
    named = bool(names) and not all(n.startswith("block ") for n in names)
    columns = zip(record["layer_profile"], record["gate_localisation"], record["gate_positive_fraction"], strict=True)
    rows = [
        [str(i)] + ([names[i]] if named else []) + [_fmt(d), _fmt(g), _fmt(f)] for i, (d, g, f) in enumerate(columns)
    ]
    header = ["layer"] + (["site"] if named else [])
    return _table(header + ["relative concept difference", "gate on concept / area share", "positive gate"], rows)


def _confirmed_table(record: dict, dye: bool) -> str:
    """Re-prompting and every confirmed setting on the confirmation seeds, the choice marked."""
    names = record.get("site_names")
    base = record["reprompting"]
    key = "dye_detection" if dye else "flip_rate"
    label = "dye detection" if dye else "flip rate"
    rows = [["re-prompting", _fmt(base[key]), _fmt(base["bg_psnr"], 2), _fmt(base["bg_ssim"], 4), ""]]
    for r in record["confirmed"]:
        mark = "chosen" if r == record["chosen"] else ""
        setting = f"layers {window_label(r['layer_start'], r['layer_end'], names)}, strength {r['strength']:g}"
        rows.append([setting, _fmt(r[key]), _fmt(r["bg_psnr"], 2), _fmt(r["bg_ssim"], 4), mark])
    return _table(["setting", label, "Bg-PSNR", "Bg-SSIM", ""], rows)
