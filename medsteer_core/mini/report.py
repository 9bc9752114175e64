"""The demo's ``report.md``: the backbones side by side, what the grids show, what every number
means, and per backbone the tables shaped like the paper's Tables 2-4, written from the numbers
``run_demo`` puts in ``report.json``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import synthetic
from .scan import ISSUE_BAR, window_label

if TYPE_CHECKING:
    from .demo import Edit

__all__ = ["METRIC_DEFINITIONS", "markdown"]


def _fmt(x: float, digits: int = 3) -> str:
    return "-" if x != x else f"{x:.{digits}f}"  # nan: nothing to average


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


#: What every number of report.md means (issue 11: the report used "source removed" undefined).
METRIC_DEFINITIONS = (
    "- **Oracle**: the classifier and segmenter shipped with MedSteer-mini (`oracle.safetensors`), trained on "
    "the synthetic frames; it labels each image with a class and segments lesion and dye. Every rate below is "
    "the oracle's reading of the images, not a human's.",
    "- **Rendering rate**: images of a class whose oracle label is the class that was prompted (a sanity check "
    "that the model draws what it is asked; the edits below are only as good as this).",
    "- **Flip rate**: steered images the oracle assigns to the target class (e.g. *polyps* for dye removal).",
    "- **delta-p**: mean drop of the source class's probability from the unsteered to the steered image "
    "(higher = the concept weakened more; negative = it grew).",
    "- **Source removed**: steered images the oracle no longer assigns to the source class, whatever class "
    "it assigns instead. It is at least the flip rate; the gap is edits that left the source class for a third one.",
    "- **Dye detection**: images in which the oracle still segments dye (dye removal: lower is better; "
    "shown for the dye edit only in Table 2).",
    "- **Bg-PSNR / Bg-SSIM**: how unchanged the background is: PSNR (dB, identical pixels capped at 60) and "
    "SSIM between the unsteered image and its counterfactual, over the field of view minus the (dilated) "
    "lesion and dye masks of both images. Higher = less collateral change.",
    "- **Succeeded**: pairs whose edit worked (target class; for dye removal, no dye left), out of all pairs. "
    "**Eff. Bg-PSNR / Bg-SSIM**: the background scores over those pairs only, so failed edits (which keep "
    "their background trivially) do not flatter a weak setting.",
    "- **Re-prompting**: the baseline counterfactual: the same seed sampled with the prompt of the target "
    "class instead of steering. Same seed, so the two methods are directly comparable.",
    "- **Layers a-b**: the steered cross-attention sites in execution order, `a` included and `b` excluded "
    "(0-based; MedSteer-mini has 6, one per block; MedSteer-mini-UNet has 7, named in brackets as ComfyUI names "
    "a UNet's blocks: input 3, input 5, middle 0, output 0-3). **Strength**: the paper's alpha; 0 is the "
    "unsteered image.",
)


def _figures(report: dict, edits: list[Edit], first: int) -> list[str]:
    """The section that says what each grid shows (issue 11); ``first`` is the first held-out seed."""
    from .demo import DENOISERS

    n = report.get("grid_seeds", 0)
    names = list(report["backbones"])
    files = " and ".join(f"`{DENOISERS[b].grid_name('<edit>')}` for {DENOISERS[b].title}" for b in names)
    parts = [
        "## Figures",
        "",
        f"Each grid ({files}) has one column per seed: "
        + (f"the first {n} held-out seeds ({first}, {first + 1}, ...)" if n > 1 else f"held-out seed {first}")
        + ", the same seeds in every row, so a column is one counterfactual set. Rows, top to bottom:",
        "",
        "1. **unsteered**: the source prompt (with the concept), sampled as usual;",
        "2. **steered**: the same prompt and seed with the pathology vector applied (MedSteer), at the setting "
        "of Table 2;",
        "3. **re-prompted**: the same seed sampled with the target prompt instead (the baseline);",
        "4. **gate**: where steering acted: the gate max(<h, v>, 0) averaged over the sampling steps and the "
        "steered layers (a UNet's 8x8 sites brought to its 16x16 grid first), blended over the unsteered image "
        "in viridis colours (purple to yellow = weak to strong; where the gate is zero the image shows through).",
        "",
        "A good edit changes row 2 only where row 4 is bright, and keeps the rest of row 1; re-prompting "
        "(row 3) usually redraws the whole scene.",
        "",
    ]
    for edit in edits:
        cells = [
            f"![{edit.title}{'' if b == 'pixart' else f' ({DENOISERS[b].title})'}]({DENOISERS[b].grid_name(edit.name)})"
            for b in names
        ]
        if len(names) == 1:
            parts += [cells[0], ""]
        else:
            header = [DENOISERS[b].title for b in names]
            parts += [f"**{edit.title}**", "", _table(header, [cells]), ""]
    return parts


def markdown(report: dict, eval_seeds: int, vector_seeds: int, edits: list[Edit], first_seed: int) -> str:
    """``report.md`` from ``report`` (the numbers of ``report.json``): ``eval_seeds`` held-out seeds
    from ``first_seed``, vectors from ``vector_seeds`` seeds per prompt, the tables of ``edits`` for
    every backbone of ``report["backbones"]``."""
    runs = report["backbones"]
    titles = [r["title"] for r in runs.values()]
    cfgs = sorted({r["cfg"] for r in runs.values()})
    cfg = f"CFG {cfgs[0]:g}" if len(cfgs) == 1 else "CFG per backbone below"
    times = ", ".join(f"{r['title']} {r['seconds']} s" for r in runs.values())
    parts = [
        f"# MedSteer demo on {' and '.join(titles)}",
        "",
        f"Held-out seeds: {eval_seeds} (from {first_seed}); vectors from {vector_seeds} seeds per prompt; "
        f"DDIM 20 steps, {cfg}. Wall time {report['seconds']} s ({times}).",
        "",
    ]
    if len(runs) > 1 and edits:
        parts += _side_by_side(runs, edits)
    parts += [
        *(_figures(report, edits, first_seed) if edits else []),
        "## What the numbers mean",
        "",
        *METRIC_DEFINITIONS,
        "",
    ]
    for run in runs.values():
        parts += _backbone_section(run, edits)
    parts += ["", 'Definitions of every column: see "What the numbers mean" above.', ""]
    return "\n".join(parts)


def _removal(m: dict, dye: bool) -> float:
    return 1 - m["dye_detection"] if dye else m["flip_rate"]


def _side_by_side(runs: dict, edits: list[Edit]) -> list[str]:
    """Every edit on every backbone in one table: its shipped setting against re-prompting."""
    rows = []
    for edit in edits:
        for run in runs.values():
            e = run["edits"][edit.name]
            ours, base, st = e["medsteer"], e["reprompting"], e["setting"]
            removed = _removal(ours, edit.dye)
            met = removed >= ISSUE_BAR[edit.name] and ours["bg_psnr"] >= base["bg_psnr"]
            rows.append(
                [
                    edit.title,
                    run["title"],
                    f"layers {window_label(st['layer_start'], st['layer_end'], run['site_names'])}, "
                    f"strength {st['strength']:g}",
                    f"{_fmt(removed)} / {_fmt(_removal(base, edit.dye))}",
                    f"{_fmt(ours['bg_psnr'], 2)} / {_fmt(base['bg_psnr'], 2)}",
                    f"{_fmt(ours['bg_ssim'], 4)} / {_fmt(base['bg_ssim'], 4)}",
                    f"{'met' if met else 'NOT met'} (>= {ISSUE_BAR[edit.name]:g})",
                ]
            )
    header = ["edit", "backbone", "shipped setting", "removed / flipped", "Bg-PSNR", "Bg-SSIM", "issue 10 bar"]
    return [
        "## Side by side: each backbone's shipped calibrated vectors (MedSteer / re-prompting, same seeds)",
        "",
        "Removed / flipped: dye gone (1 - dye detection) for dye removal, the flip rate for the lesion edits. "
        "Issue 10's bar: removal at least the number shown and Bg-PSNR at least re-prompting's. Every pair of "
        "numbers is MedSteer / re-prompting on the same held-out seeds.",
        "",
        _table(header, rows),
        "",
    ]


def _backbone_section(run: dict, edits: list[Edit]) -> list[str]:
    """One backbone's rendering check and tables (the whole report before there were two backbones)."""
    sites = ", ".join(f"{n} ({w})" for n, w in zip(run["site_names"], run["site_widths"], strict=True))
    parts = [
        f"## {run['title']}",
        "",
        f"{len(run['site_names'])} cross-attention sites in execution order (name (width)): {sites}. "
        f"CFG {run['cfg']:g}; this part took {run['seconds']} s.",
        "",
        "### Rendering check (oracle assigns the prompted class)",
        "",
        _table(
            ["class", "rendering rate"],
            [[f"{synthetic.CONCEPTS[k]}", _fmt(v, 2)] for k, v in run["rendering_rate"].items()],
        ),
        "",
        "### Table 2: counterfactual edits, MedSteer vs re-prompting (same seeds)",
        "",
        _table2(run, edits),
    ]
    if "strength_sweep" in run:
        parts += _sweep_tables(run, edits[0])
    parts.append("")
    return parts


def _table2(report: dict, edits: list[Edit]) -> str:
    """Table 2: each edit's MedSteer row at its setting, and its re-prompting row."""
    rows = []
    for edit in edits:
        e = report["edits"][edit.name]
        st = e["setting"]
        window = window_label(st["layer_start"], st["layer_end"], report["site_names"])
        for method, key in (
            (f"MedSteer (layers {window}, strength {st['strength']:g})", "medsteer"),
            ("Re-prompting", "reprompting"),
        ):
            m = e[key]
            rows.append(
                [
                    edit.title,
                    method,
                    _fmt(m["flip_rate"]),
                    _fmt(m["delta_p"]),
                    _fmt(m["source_removed"]),
                    _fmt(m["dye_detection"]) if edit.dye else "-",
                    _fmt(m["bg_psnr"], 2),
                    _fmt(m["bg_ssim"], 4),
                    f"{m['succeeded']}/{m['images']}",
                    _fmt(m["effective_bg_psnr"], 2),
                    _fmt(m["effective_bg_ssim"], 4),
                ]
            )
    header = ["edit", "method", "flip rate", "delta-p", "source removed", "dye detection", "Bg-PSNR", "Bg-SSIM"]
    return _table(header + ["succeeded", "eff. Bg-PSNR", "eff. Bg-SSIM"], rows)


_SWEEP_HEADER = ["flip rate", "source removed", "dye detection", "Bg-PSNR", "Bg-SSIM"]


def _sweep_cells(r: dict) -> list[str]:
    return [
        _fmt(r["flip_rate"]),
        _fmt(r["source_removed"]),
        _fmt(r["dye_detection"]),
        _fmt(r["bg_psnr"], 2),
        _fmt(r["bg_ssim"], 4),
    ]


def _sweep_tables(report: dict, first: Edit) -> list[str]:
    """Tables 3, 4a and 4b (strength, window and seeds sweeps of the first edit) and its layer profile."""
    title = first.title
    names = report["site_names"]
    parts = ["", f"### Table 3: strength sweep ({title})", "", "The Table 2 window, strength varied.", ""]
    parts.append(
        _table(
            ["strength"] + _SWEEP_HEADER,
            [[f"{r['strength']:g}"] + _sweep_cells(r) for r in report["strength_sweep"]],
        )
    )
    parts += [
        "",
        f"### Table 4a: window sweep ({title}; layer_end exclusive)",
        "",
        "The Table 2 strength, steered layers varied.",
        "",
    ]
    parts.append(
        _table(
            ["layers"] + _SWEEP_HEADER,
            [[window_label(r["layer_start"], r["layer_end"], names)] + _sweep_cells(r) for r in report["window_sweep"]],
        )
    )
    parts += [
        "",
        f"### Table 4b: seeds sweep ({title})",
        "",
        "Vectors built from fewer seeds per prompt, applied at the Table 2 setting. Cosine to full vector: the "
        "mean cosine similarity of their directions to those of the full vector (1 = the same direction).",
        "",
    ]
    parts.append(
        _table(
            ["seeds per prompt", "cosine to full vector"] + _SWEEP_HEADER,
            [[str(r["seeds"]), _fmt(r["cosine_to_full"])] + _sweep_cells(r) for r in report["seeds_sweep"]],
        )
    )
    profile = report["edits"][first.name]["layer_profile"]
    parts += [
        "",
        "Relative concept difference per layer (|mean with - mean without| / |mean|): "
        + ", ".join(f"{_site(i, names)}: {v:.3f}" for i, v in enumerate(profile)),
    ]
    return parts


def _site(index: int, names: list[str]) -> str:
    """A site's index, with its name where names say more than an index (UNets)."""
    label = window_label(index, index + 1, names)
    return label[label.index("(") + 1 : -1] if "(" in label else str(index)
