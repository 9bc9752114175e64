"""``medsteer demo``: the method, seen and measured offline in minutes on the shipped MedSteer-mini.

With no flags it loads the model and oracle shipped in the package, checks that the model renders
every class, builds the pathology vectors (cached, so a second run is faster), samples a fixed
held-out seed set unsteered, steered and re-prompted, scores every pair with the oracle, and writes
``medsteer_demo/``:

- ``grid_<edit>.png``: columns are seeds; rows are unsteered | steered | re-prompted | gate;
- ``report.md``: what the grids show and what every metric means, the rendering check, and tables
  shaped like the paper's Tables 2-4 (counterfactual metrics vs re-prompting; strength sweep;
  window sweep; seeds sweep);
- ``report.json``: the same numbers, machine-readable;
- ``cache/``: the vectors it built.

It ends by printing the absolute path of the folder and of ``report.md``. The steering window and
strength of each edit are the calibrated ones stored in the shipped vectors' metadata
(``medsteer demo --calibrate`` re-runs the scan that chose them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MedSteerError
from ..gates import GateRecord
from ..heatmap import overlay
from ..plan import SteeringPlan
from ..vector import PathologyVector, load_vector, save_vector
from . import synthetic
from .metrics import rendering_rates, score_pairs
from .scan import build_vector, calibrate, gate_localisation, layer_profile, prompts_for, sweep

__all__ = ["EDITS", "Edit", "main", "run_demo"]

VECTOR_DIR = Path(__file__).parent / "assets" / "vectors"
#: Seeds of the vectors (the paper: 50 images per prompt; 40 is where the mini's vector is stable).
VECTOR_SEEDS = 40
#: Held-out seeds of every table: disjoint from the vector seeds.
EVAL_SEED_BASE = 900_000
#: The demo's strength sweep (Table 3); the calibrated strength is added.
DEMO_STRENGTHS = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0)


@dataclass(frozen=True)
class Edit:
    """One counterfactual edit: source class -> target class, and its default setting."""

    name: str
    source: str
    target: str
    title: str
    dye: bool = False

    def shipped_path(self) -> Path:
        return VECTOR_DIR / f"{self.name}.safetensors"

    def shipped_setting(self) -> tuple[int, int, float]:
        """``setting_of`` the shipped vector (the fallback setting when none is shipped)."""
        path = self.shipped_path()
        return setting_of(load_vector(path) if path.is_file() else None)


EDITS = (
    Edit("dye_removal", "dyed", "polyp", "Dye removal (dyed lifted polyps -> polyps)", dye=True),
    Edit("polyp_to_normal", "polyp", "normal", "Polyp -> normal cecum"),
    Edit("colitis_to_normal", "colitis", "normal", "Ulcerative colitis -> normal cecum"),
)
FALLBACK_SETTING = (0, 1, 1.0)


def setting_of(vector: PathologyVector | None) -> tuple[int, int, float]:
    """``(layer_start, layer_end, strength)`` calibrated for a vector (from its metadata)."""
    setting = vector.provenance.calibrated_setting() if vector is not None else {}
    if "strength" not in setting:
        return FALLBACK_SETTING
    return int(setting["layer_start"]), int(setting["layer_end"]), float(setting["strength"])


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


class _Progress:
    def __init__(self, total: int, quiet: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="img", disable=quiet, dynamic_ncols=True)

    def stage(self, text: str) -> None:
        self.bar.set_description(text)

    def __call__(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def _vector(model, edit: Edit, seeds: list[int], cache: Path | None, tag: str, progress) -> PathologyVector:
    path = cache / f"{edit.name}_{len(seeds)}seeds_{tag}.safetensors" if cache else None
    if path is not None and path.is_file():
        progress(2 * len(seeds))
        return load_vector(path)
    vector = build_vector(model, edit.source, edit.target, seeds, progress=progress)
    if path is not None:
        save_vector(vector, path)
    return vector


def _to_uint8(images: torch.Tensor):
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def _grid(rows: list[tuple[str, torch.Tensor]], scale: int = 4):
    """A labelled PNG grid: one row per entry, ``[B, 3, H, W]`` images as columns."""
    from PIL import Image, ImageDraw

    left, pad = 96, 2
    b, _, h, w = rows[0][1].shape
    cell_h, cell_w = h * scale, w * scale
    canvas = Image.new("RGB", (left + b * (cell_w + pad), len(rows) * (cell_h + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        draw.text((4, r * (cell_h + pad) + cell_h // 2 - 6), label, fill=(0, 0, 0))
        for c in range(b):
            tile = Image.fromarray(_to_uint8(images[c]).permute(1, 2, 0).numpy()).resize(
                (cell_w, cell_h), Image.NEAREST
            )
            canvas.paste(tile, (left + c * (cell_w + pad), r * (cell_h + pad)))
    return canvas


def _fmt(x: float, digits: int = 3) -> str:
    return "-" if x != x else f"{x:.{digits}f}"  # nan: nothing to average


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def run_demo(
    out: str | Path = "medsteer_demo",
    *,
    eval_seeds: int = 32,
    vector_seeds: int = VECTOR_SEEDS,
    grid_seeds: int = 6,
    strengths: tuple[float, ...] | None = None,
    seed_counts: tuple[int, ...] = (5, 10, 20, 40),
    windows: tuple[tuple[int, int], ...] | None = None,
    edits: tuple[str, ...] = ("dye_removal", "polyp_to_normal", "colitis_to_normal"),
    model_path: str | None = None,
    oracle_path: str | None = None,
    use_cache: bool = True,
    quiet: bool = False,
) -> dict:
    """Run the demo and write its folder; returns the numbers of ``report.json``.

    The strength sweep defaults to 0-6 in steps of 1 and the window sweep to single layers and a few
    spans; both always include the first edit's calibrated setting.
    """
    from .model import DEFAULT_PATH as MODEL_PATH
    from .model import load_mini
    from .oracle import load_oracle

    started = time.time()
    out = Path(out)
    _check_arguments(out, eval_seeds, vector_seeds, grid_seeds, edits, model_path, oracle_path)
    model = load_mini(model_path)  # before the folder exists: a bad file leaves nothing behind
    oracle = load_oracle(oracle_path)
    out.mkdir(parents=True, exist_ok=True)
    tag = _file_digest(Path(model_path) if model_path else MODEL_PATH)
    cache = out / "cache" if use_cache else None
    if cache is not None:
        cache.mkdir(exist_ok=True)
    chosen = [e for e in EDITS if e.name in edits]
    seeds = [EVAL_SEED_BASE + i for i in range(eval_seeds)]
    seed_counts = tuple(sorted({min(n, vector_seeds) for n in seed_counts} | {vector_seeds}))
    windows = list(windows) if windows is not None else _windows(model.transformer.config.num_layers)
    strengths = DEMO_STRENGTHS if strengths is None else tuple(strengths)
    first = chosen[0] if chosen else None
    if first is not None:  # the sweeps always include the setting that Table 2 reports
        first_setting = first.shipped_setting()
        start, end, strength = first_setting
        strengths = tuple(sorted(set(strengths) | {strength}))
        windows = sorted(set(windows) | {(start, end)}, key=lambda w: (w[1] - w[0], w))

    # Work in images, for the progress bar.
    per_edit = 2 * vector_seeds + 3 * eval_seeds
    sweeps = (len(strengths) + len(windows) + len(seed_counts) - 1) * eval_seeds + 2 * (sum(seed_counts) - vector_seeds)
    total = len(synthetic.CLASSES) * eval_seeds + len(chosen) * per_edit + (sweeps if first else 0)
    progress = _Progress(total, quiet)
    report: dict = {
        "model": model.metadata.get("training", ""),
        "cfg": model.default_cfg,
        "eval_seeds": seeds[:1] + seeds[-1:],
        "grid_seeds": min(grid_seeds, len(seeds)),
    }

    progress.stage("rendering check")
    by_class = {}
    for c, name in enumerate(synthetic.CLASSES):
        by_class[c] = model.generate(prompts_for(name, seeds), seeds)
        progress(len(seeds))
    rates = rendering_rates(oracle, by_class)
    report["rendering_rate"] = {synthetic.CLASSES[c]: r for c, r in rates.items()}

    report["edits"] = {}
    vectors: dict[str, PathologyVector] = {}
    for edit in chosen:
        progress.stage(f"{edit.name}: vector")
        start, end, strength = edit.shipped_setting()
        vector = _vector(model, edit, list(range(vector_seeds)), cache, tag, progress)
        vectors[edit.name] = vector
        progress.stage(f"{edit.name}: pairs")
        s = synthetic.CLASSES.index(edit.source)
        t = synthetic.CLASSES.index(edit.target)
        originals = by_class[s]
        record = GateRecord()
        plan = SteeringPlan(vector, strength=strength, layer_start=start, layer_end=end)
        steered = model.generate(prompts_for(edit.source, seeds), seeds, plans=[plan], record=record)
        progress(len(seeds))
        reprompted = by_class[t]  # same seeds, same template, the without-concept prompt
        progress(len(seeds))
        ours = score_pairs(oracle, originals, steered, s, t, dye_edit=edit.dye)
        baseline = score_pairs(oracle, originals, reprompted, s, t, dye_edit=edit.dye)
        gates = record.maps().maps.mean(dim=(0, 1))  # [B, h, w] mean over steps and steered layers
        n = min(grid_seeds, len(seeds))
        heat = torch.stack([overlay(originals[i].permute(1, 2, 0), gates[i], 0.7) for i in range(n)])
        _grid(
            [
                ("unsteered", originals[:n]),
                ("steered", steered[:n]),
                ("re-prompted", reprompted[:n]),
                ("gate", heat.permute(0, 3, 1, 2)),
            ]
        ).save(out / f"grid_{edit.name}.png")
        report["edits"][edit.name] = {
            "title": edit.title,
            "setting": {"layer_start": start, "layer_end": end, "strength": strength},
            "medsteer": ours.as_dict(),
            "reprompting": baseline.as_dict(),
            "layer_profile": layer_profile(vector),
        }
        progress(len(seeds))

    if first is not None:
        vector = vectors[first.name]
        start, end, strength = first_setting
        originals = by_class[synthetic.CLASSES.index(first.source)]
        progress.stage(f"{first.name}: strength sweep")
        rows = sweep(
            model, oracle, vector, first.source, first.target, seeds, [(start, end)], strengths,
            originals=originals, progress=lambda k: progress(k * len(seeds)),
        )  # fmt: skip
        report["strength_sweep"] = [r.as_dict() for r in rows]
        progress.stage(f"{first.name}: window sweep")
        rows = sweep(
            model, oracle, vector, first.source, first.target, seeds, windows, [strength],
            originals=originals, progress=lambda k: progress(k * len(seeds)),
        )  # fmt: skip
        report["window_sweep"] = [r.as_dict() for r in rows]
        progress.stage(f"{first.name}: seeds sweep")
        seed_rows = []
        for count in seed_counts:
            if count == vector_seeds:
                vec = vector
            else:
                vec = _vector(model, first, list(range(count)), cache, tag, progress)
            row = sweep(model, oracle, vec, first.source, first.target, seeds, [(start, end)], [strength],
                        originals=originals)[0]  # fmt: skip
            if count != vector_seeds:
                progress(len(seeds))
            cosine = float(torch.nn.functional.cosine_similarity(vec.directions, vector.directions, dim=-1).mean())
            seed_rows.append({"seeds": count, "cosine_to_full": cosine} | row.as_dict())
        report["seeds_sweep"] = seed_rows
    progress.close()
    report["seconds"] = round(time.time() - started, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(_markdown(report, len(seeds), vector_seeds, chosen))
    return report


def _check_arguments(
    out: Path,
    eval_seeds: int,
    vector_seeds: int,
    grid_seeds: int,
    edits: tuple[str, ...],
    model_path: str | None,
    oracle_path: str | None,
) -> None:
    """Refuse bad arguments before anything is created (issue 11: ``--seeds 0`` was an IndexError
    and an empty output folder)."""
    for name, value in (("eval_seeds", eval_seeds), ("vector_seeds", vector_seeds), ("grid_seeds", grid_seeds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
    known = [e.name for e in EDITS]
    unknown = [e for e in edits if e not in known]
    if unknown:
        raise ValueError(f"unknown edit(s) {unknown}: choose from {known}")
    for flag, path in (("--model", model_path), ("--oracle", oracle_path)):
        if path is not None and not Path(path).expanduser().is_file():
            raise ValueError(f"{flag} {str(path)!r}: no such file; pass an existing .safetensors file or leave it out")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a folder: pass a folder name")


def _windows(depth: int) -> list[tuple[int, int]]:
    singles = [(i, i + 1) for i in range(depth)]
    spans = [(0, 2), (0, depth // 2), (depth // 2, depth), (0, depth)]
    return singles + [s for s in spans if s not in singles]


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
    "- **Layers a-b**: the steered blocks, `a` included and `b` excluded (0-based; MedSteer-mini has 6). "
    "**Strength**: the paper's alpha; 0 is the unsteered image.",
)


def _figures(report: dict, edits: list[Edit]) -> list[str]:
    """The section that says what each grid shows (issue 11)."""
    n = report.get("grid_seeds", 0)
    first = report["eval_seeds"][0] if report.get("eval_seeds") else EVAL_SEED_BASE
    parts = [
        "## Figures",
        "",
        "Each `grid_<edit>.png` has one column per seed: "
        + (f"the first {n} held-out seeds ({first}, {first + 1}, ...)" if n > 1 else f"held-out seed {first}")
        + ", the same seeds in every row, so a column is one counterfactual set. Rows, top to bottom:",
        "",
        "1. **unsteered**: the source prompt (with the concept), sampled as usual;",
        "2. **steered**: the same prompt and seed with the pathology vector applied (MedSteer), at the setting "
        "of Table 2;",
        "3. **re-prompted**: the same seed sampled with the target prompt instead (the baseline);",
        "4. **gate**: where steering acted: the gate max(<h, v>, 0) averaged over the sampling steps and the "
        "steered layers, blended over the unsteered image in viridis colours (purple to yellow = weak to strong; "
        "where the gate is zero the image shows through).",
        "",
        "A good edit changes row 2 only where row 4 is bright, and keeps the rest of row 1; re-prompting "
        "(row 3) usually redraws the whole scene.",
        "",
    ]
    for edit in edits:
        parts += [f"![{edit.title}](grid_{edit.name}.png)", ""]
    return parts


def _markdown(report: dict, eval_seeds: int, vector_seeds: int, edits: list[Edit]) -> str:
    parts = [
        "# MedSteer demo on MedSteer-mini",
        "",
        f"Held-out seeds: {eval_seeds} (from {EVAL_SEED_BASE}); vectors from {vector_seeds} seeds per prompt; "
        f"DDIM 20 steps, CFG {report['cfg']:g}. Wall time {report['seconds']} s.",
        "",
        *(_figures(report, edits) if edits else []),
        "## What the numbers mean",
        "",
        *METRIC_DEFINITIONS,
        "",
        "## Rendering check (oracle assigns the prompted class)",
        "",
        _table(
            ["class", "rendering rate"],
            [[f"{synthetic.CONCEPTS[k]}", _fmt(v, 2)] for k, v in report["rendering_rate"].items()],
        ),
        "",
        "## Table 2: counterfactual edits, MedSteer vs re-prompting (same seeds)",
        "",
    ]
    rows = []
    for edit in edits:
        e = report["edits"][edit.name]
        st = e["setting"]
        for method, key in (
            (f"MedSteer (layers {st['layer_start']}-{st['layer_end']}, strength {st['strength']:g})", "medsteer"),
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
    parts.append(_table(header + ["succeeded", "eff. Bg-PSNR", "eff. Bg-SSIM"], rows))
    sweep_header = ["flip rate", "source removed", "dye detection", "Bg-PSNR", "Bg-SSIM"]

    def sweep_cells(r: dict) -> list[str]:
        return [
            _fmt(r["flip_rate"]),
            _fmt(r["source_removed"]),
            _fmt(r["dye_detection"]),
            _fmt(r["bg_psnr"], 2),
            _fmt(r["bg_ssim"], 4),
        ]

    if "strength_sweep" in report:
        title = edits[0].title
        parts += ["", f"## Table 3: strength sweep ({title})", "", "The Table 2 window, strength varied.", ""]
        parts.append(
            _table(
                ["strength"] + sweep_header, [[f"{r['strength']:g}"] + sweep_cells(r) for r in report["strength_sweep"]]
            )
        )
        parts += [
            "",
            f"## Table 4a: window sweep ({title}; layer_end exclusive)",
            "",
            "The Table 2 strength, steered layers varied.",
            "",
        ]
        parts.append(
            _table(
                ["layers"] + sweep_header,
                [[f"{r['layer_start']}-{r['layer_end']}"] + sweep_cells(r) for r in report["window_sweep"]],
            )
        )
        parts += [
            "",
            f"## Table 4b: seeds sweep ({title})",
            "",
            "Vectors built from fewer seeds per prompt, applied at the Table 2 setting. Cosine to full vector: the "
            "mean cosine similarity of their directions to those of the full vector (1 = the same direction).",
            "",
        ]
        parts.append(
            _table(
                ["seeds per prompt", "cosine to full vector"] + sweep_header,
                [[str(r["seeds"]), _fmt(r["cosine_to_full"])] + sweep_cells(r) for r in report["seeds_sweep"]],
            )
        )
        profile = report["edits"][edits[0].name]["layer_profile"]
        parts += [
            "",
            "Relative concept difference per layer (|mean with - mean without| / |mean|): "
            + ", ".join(f"{i}: {v:.3f}" for i, v in enumerate(profile)),
        ]
    parts += ["", 'Definitions of every column: see "What the numbers mean" above.', ""]
    return "\n".join(parts)


#: Calibration seeds: disjoint from the vector seeds (0..), the demo's (900000..) and the tests'.
CALIBRATION_SEED_BASE = 800_000
#: The strengths a calibration tries (the mini needs more than the paper's 2.5: see README).
CALIBRATION_STRENGTHS = (1.0, 2.0, 3.0, 4.0, 4.5, 5.0, 5.5, 6.0, 7.0, 8.0)


def calibrate_and_ship(
    out_dir: str | Path = VECTOR_DIR,
    *,
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
    ``calibration`` record (seeds, rule, the baseline, whether the choice meets issue 5's bar of
    removal >= 0.8 and Bg-PSNR >= re-prompting, every confirmed row). Every seed used here is
    disjoint from the demo's held-out seeds, so the demo's numbers are out-of-sample.
    """
    from .model import load_mini
    from .oracle import load_oracle
    from .scan import MIN_REMOVAL, all_windows, removal, shortlist, sweep_settings

    model = load_mini(model_path)
    oracle = load_oracle(oracle_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen_edits = [e for e in EDITS if edits is None or e.name in edits]
    seeds = [CALIBRATION_SEED_BASE + i for i in range(max(screen_seeds, confirm_seeds))]
    screen, confirm = seeds[:screen_seeds], seeds[:confirm_seeds]
    if windows is None:
        windows = all_windows(model.transformer.config.num_layers)
    settings = [(a, b, float(k)) for a, b in windows for k in strengths]
    per_edit = 2 * vector_seeds + screen_seeds * (len(settings) + 1) + confirm_seeds * (3 * confirm_top + 2)
    progress = _Progress(len(chosen_edits) * per_edit, quiet)
    summary = {}
    for edit in chosen_edits:
        progress.stage(f"{edit.name}: vector")
        vector = build_vector(model, edit.source, edit.target, list(range(vector_seeds)), progress=progress)
        kind = "dye" if edit.dye else "lesion"
        local, positive, _ = gate_localisation(model, oracle, vector, edit.source, seeds[:8], kind)
        progress.stage(f"{edit.name}: screen {len(settings)} settings")
        originals = model.generate(prompts_for(edit.source, screen), screen)
        progress(screen_seeds)
        rows = sweep_settings(
            model, oracle, vector, edit.source, edit.target, screen, settings,
            originals=originals, progress=lambda k: progress(k * screen_seeds),
        )  # fmt: skip
        picks = shortlist(rows, edit.dye, confirm_top)
        candidates = list(
            dict.fromkeys(
                (r.layer_start, r.layer_end, k)
                for r in picks
                for k in (r.strength, r.strength - refine, r.strength + refine)
                if k > 0 or k == r.strength
            )
        )
        progress.stage(f"{edit.name}: confirm {len(candidates)} settings on {confirm_seeds} seeds")
        s, t = synthetic.CLASSES.index(edit.source), synthetic.CLASSES.index(edit.target)
        originals = model.generate(prompts_for(edit.source, confirm), confirm)
        reprompted = model.generate(prompts_for(edit.target, confirm), confirm)
        baseline = score_pairs(oracle, originals, reprompted, s, t)
        progress(2 * confirm_seeds)
        confirmed = sweep_settings(
            model, oracle, vector, edit.source, edit.target, confirm,
            candidates,
            originals=originals, progress=lambda k: progress(k * confirm_seeds),
        )  # fmt: skip
        progress(confirm_seeds * (3 * confirm_top - len(candidates)))
        best = calibrate(confirmed, edit.dye)
        meets = removal(best, edit.dye) >= 0.8 and best.bg_psnr >= baseline.bg_psnr
        record = {
            "seeds": f"{confirm[0]}..{confirm[-1]}",
            "screen_seeds": f"{screen[0]}..{screen[-1]}",
            "rule": f"removal >= {MIN_REMOVAL} on the confirmation seeds, then the best Bg-PSNR",
            "layer_profile": [round(x, 4) for x in layer_profile(vector)],
            "gate_localisation": [round(x, 3) for x in local],
            "gate_positive_fraction": [round(x, 3) for x in positive],
            "reprompting": baseline.as_dict(),
            "chosen": best.as_dict(),
            "meets_issue_bar": meets,
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
        save_vector(vector, out_dir / f"{edit.name}.safetensors")
        summary[edit.name] = record | {"screen": [r.as_dict() for r in rows]}
        if not quiet:
            margin = best.bg_psnr - baseline.bg_psnr
            progress.bar.write(
                f"{edit.name}: layers {best.layer_start}-{best.layer_end} strength {best.strength:g}: "
                f"removed {removal(best, edit.dye):.2f}, Bg-PSNR {best.bg_psnr:.2f} dB "
                f"({margin:+.2f} vs re-prompting) on {confirm_seeds} seeds"
            )
    progress.close()
    return summary


def calibration_markdown(summary: dict) -> str:
    """The layer scan and the confirmation table of each edit, from ``calibrate_and_ship``'s summary."""
    parts = ["# MedSteer-mini calibration", ""]
    for name, record in summary.items():
        dye = next(e.dye for e in EDITS if e.name == name)
        base = record["reprompting"]
        parts += [
            f"## {name}",
            "",
            "Layer scan (concept difference from the vector; gate on the first 8 calibration seeds):",
            "",
        ]
        rows = [
            [str(i), _fmt(d), _fmt(g), _fmt(f)]
            for i, (d, g, f) in enumerate(
                zip(
                    record["layer_profile"],
                    record["gate_localisation"],
                    record["gate_positive_fraction"],
                    strict=True,
                )
            )
        ]
        parts.append(
            _table(["layer", "relative concept difference", "gate on concept / area share", "positive gate"], rows)
        )
        parts += ["", f"Confirmed on seeds {record['seeds']} (rule: {record['rule']}):", ""]
        key = "dye_detection" if dye else "flip_rate"
        label = "dye detection" if dye else "flip rate"
        rows = [["re-prompting", _fmt(base[key]), _fmt(base["bg_psnr"], 2), _fmt(base["bg_ssim"], 4), ""]]
        for r in record["confirmed"]:
            mark = "chosen" if r == record["chosen"] else ""
            setting = f"layers {r['layer_start']}-{r['layer_end']}, strength {r['strength']:g}"
            rows.append([setting, _fmt(r[key]), _fmt(r["bg_psnr"], 2), _fmt(r["bg_ssim"], 4), mark])
        parts.append(_table(["setting", label, "Bg-PSNR", "Bg-SSIM", ""], rows))
        verdict = "meets" if record["meets_issue_bar"] else "does NOT meet"
        parts += ["", f"The choice {verdict} the bar (removal >= 0.8, Bg-PSNR >= re-prompting's).", ""]
    return "\n".join(parts)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (no usage block) and exits 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _count(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive count: use 1 or more")
    return value


def _plain(text: str) -> str:
    """A docstring as terminal text: RST literals (````x````) and emphasis (``**x**``) unmarked."""
    return re.sub(r"``(.+?)``|\*\*(.+?)\*\*", lambda m: m.group(1) or m.group(2), text)


def main(argv: list[str] | None = None) -> int:
    """``medsteer demo [options]`` (every option has a default; no flags runs the full demo)."""
    parser = _Parser(
        prog="medsteer demo",
        description=_plain(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="medsteer_demo", help="output folder (default medsteer_demo/)")
    parser.add_argument("--seeds", type=_count, default=32, help="held-out seeds per table row, 1 or more (default 32)")
    parser.add_argument(
        "--vector-seeds",
        type=_count,
        default=VECTOR_SEEDS,
        help=f"seeds per prompt for each vector, 1 or more (default {VECTOR_SEEDS})",
    )
    parser.add_argument(
        "--edits",
        default=",".join(e.name for e in EDITS),
        help="comma-separated edits (default: all three, each with its calibrated shipped vector)",
    )
    parser.add_argument("--model", default=None, help="a MedSteer-mini .safetensors (default: the shipped one)")
    parser.add_argument("--oracle", default=None, help="an oracle .safetensors (default: the shipped one)")
    parser.add_argument("--no-cache", action="store_true", help="rebuild the vectors even if cached")
    parser.add_argument("--quick", action="store_true", help="a reduced run (few seeds and sweep points)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no report on the terminal")
    parser.add_argument(
        "--calibrate", action="store_true", help="re-run the layer scan and write calibrated vectors to --out"
    )
    args = parser.parse_args(argv)
    known = {e.name for e in EDITS}
    edits = tuple(x.strip() for x in args.edits.split(",") if x.strip())
    unknown = [e for e in edits if e not in known]
    if unknown:
        parser.error(f"unknown edit(s) {unknown}; choose from {sorted(known)}")
    try:
        return _run(args, edits)
    except (MedSteerError, ValueError) as exc:  # bad input: one line (MEDSTEER_DEBUG=1 for the traceback)
        if os.environ.get("MEDSTEER_DEBUG"):
            raise
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, edits: tuple[str, ...]) -> int:
    out = Path(args.out)
    if args.calibrate:
        _check_arguments(out, 1, 1, 1, edits, args.model, args.oracle)
        summary = calibrate_and_ship(
            args.out, edits=edits, model_path=args.model, oracle_path=args.oracle, quiet=args.quiet
        )
        Path(args.out, "calibration.json").write_text(json.dumps(summary, indent=2))
        text = calibration_markdown(summary)
        Path(args.out, "calibration.md").write_text(text)
        if not args.quiet:
            print(text)
        print(f"wrote {out.resolve()}/: calibrated vectors, calibration.md, calibration.json")
        return 0
    kwargs = {}
    if args.quick:
        kwargs = {"strengths": (0.0, 1.0), "seed_counts": (2, 4), "grid_seeds": 2, "windows": ((0, 1), (0, 6))}
    run_demo(
        args.out,
        eval_seeds=args.seeds,
        vector_seeds=args.vector_seeds,
        edits=edits,
        model_path=args.model,
        oracle_path=args.oracle,
        use_cache=not args.no_cache,
        quiet=args.quiet,
        **kwargs,
    )
    if not args.quiet:
        print(Path(args.out, "report.md").read_text())
    print(_where(out, edits))
    return 0


def _where(out: Path, edits: tuple[str, ...]) -> str:
    """The closing lines: where the demo wrote (absolute paths, to open or copy)."""
    folder = out.resolve()
    grids = ", ".join(f"grid_{e.name}.png" for e in EDITS if e.name in edits)
    return (
        f"medsteer demo: wrote {folder}{os.sep}\n"
        f"  report: {folder / 'report.md'} (numbers: report.json)\n"
        f"  grids:  {grids or 'none (no edits chosen)'} in the same folder"
    )


if __name__ == "__main__":
    sys.exit(main())
