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
from .report import markdown
from .scan import build_vector, layer_profile, prompts_for, sweep

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
    run = _DemoRun(model, oracle, seeds, vector_seeds, cache, tag, _Progress(total, quiet))
    report: dict = {
        "model": model.metadata.get("training", ""),
        "cfg": model.default_cfg,
        "eval_seeds": seeds[:1] + seeds[-1:],
        "grid_seeds": min(grid_seeds, len(seeds)),
    }
    run.progress.stage("rendering check")
    for c, name in enumerate(synthetic.CLASSES):
        run.by_class[c] = model.generate(prompts_for(name, seeds), seeds)
        run.progress(len(seeds))
    rates = rendering_rates(oracle, run.by_class)
    report["rendering_rate"] = {synthetic.CLASSES[c]: r for c, r in rates.items()}
    report["edits"] = {}
    for edit in chosen:
        report["edits"][edit.name] = run.edit(edit, out / f"grid_{edit.name}.png", report["grid_seeds"])
    if first is not None:
        report.update(run.sweeps(first, first_setting, strengths, windows, seed_counts))
    run.progress.close()
    report["seconds"] = round(time.time() - started, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report, len(seeds), vector_seeds, chosen, EVAL_SEED_BASE))
    return report


class _DemoRun:
    """What one demo run shares between its stages: model, oracle, held-out seeds, the unsteered
    images of every class (``by_class``), the vectors built so far, the vector cache and progress."""

    def __init__(self, model, oracle, seeds, vector_seeds, cache, tag, progress) -> None:
        self.model, self.oracle, self.seeds, self.vector_seeds = model, oracle, seeds, vector_seeds
        self.cache, self.tag, self.progress = cache, tag, progress
        self.by_class: dict[int, torch.Tensor] = {}
        self.vectors: dict[str, PathologyVector] = {}

    def edit(self, edit: Edit, grid_path: Path, grid_seeds: int) -> dict:
        """Table 2 for one edit: build its vector, steer the held-out seeds at the shipped setting,
        score them and re-prompting against the unsteered images, write its grid."""
        model, seeds, progress = self.model, self.seeds, self.progress
        progress.stage(f"{edit.name}: vector")
        start, end, strength = edit.shipped_setting()
        vector = _vector(model, edit, list(range(self.vector_seeds)), self.cache, self.tag, progress)
        self.vectors[edit.name] = vector
        progress.stage(f"{edit.name}: pairs")
        s = synthetic.CLASSES.index(edit.source)
        t = synthetic.CLASSES.index(edit.target)
        originals = self.by_class[s]
        record = GateRecord()
        plan = SteeringPlan(vector, strength=strength, layer_start=start, layer_end=end)
        steered = model.generate(prompts_for(edit.source, seeds), seeds, plans=[plan], record=record)
        progress(len(seeds))
        reprompted = self.by_class[t]  # same seeds, same template, the without-concept prompt
        progress(len(seeds))
        ours = score_pairs(self.oracle, originals, steered, s, t, dye_edit=edit.dye)
        baseline = score_pairs(self.oracle, originals, reprompted, s, t, dye_edit=edit.dye)
        gates = record.maps().maps.mean(dim=(0, 1))  # [B, h, w] mean over steps and steered layers
        n = grid_seeds
        heat = torch.stack([overlay(originals[i].permute(1, 2, 0), gates[i], 0.7) for i in range(n)])
        _grid(
            [
                ("unsteered", originals[:n]),
                ("steered", steered[:n]),
                ("re-prompted", reprompted[:n]),
                ("gate", heat.permute(0, 3, 1, 2)),
            ]
        ).save(grid_path)
        progress(len(seeds))
        return {
            "title": edit.title,
            "setting": {"layer_start": start, "layer_end": end, "strength": strength},
            "medsteer": ours.as_dict(),
            "reprompting": baseline.as_dict(),
            "layer_profile": layer_profile(vector),
        }

    def sweeps(self, first: Edit, setting, strengths, windows, seed_counts) -> dict:
        """Tables 3, 4a and 4b on the first edit: strength, window and seeds sweeps around ``setting``."""
        model, oracle, seeds, progress = self.model, self.oracle, self.seeds, self.progress
        vector = self.vectors[first.name]
        start, end, strength = setting
        originals = self.by_class[synthetic.CLASSES.index(first.source)]
        tables = {}
        progress.stage(f"{first.name}: strength sweep")
        rows = sweep(
            model, oracle, vector, first.source, first.target, seeds, [(start, end)], strengths,
            originals=originals, progress=lambda k: progress(k * len(seeds)),
        )  # fmt: skip
        tables["strength_sweep"] = [r.as_dict() for r in rows]
        progress.stage(f"{first.name}: window sweep")
        rows = sweep(
            model, oracle, vector, first.source, first.target, seeds, windows, [strength],
            originals=originals, progress=lambda k: progress(k * len(seeds)),
        )  # fmt: skip
        tables["window_sweep"] = [r.as_dict() for r in rows]
        progress.stage(f"{first.name}: seeds sweep")
        seed_rows = []
        for count in seed_counts:
            if count == self.vector_seeds:
                vec = vector
            else:
                vec = _vector(model, first, list(range(count)), self.cache, self.tag, progress)
            row = sweep(model, oracle, vec, first.source, first.target, seeds, [(start, end)], [strength],
                        originals=originals)[0]  # fmt: skip
            if count != self.vector_seeds:
                progress(len(seeds))
            cosine = float(torch.nn.functional.cosine_similarity(vec.directions, vector.directions, dim=-1).mean())
            seed_rows.append({"seeds": count, "cosine_to_full": cosine} | row.as_dict())
        tables["seeds_sweep"] = seed_rows
        return tables


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
        from .calibrate import calibrate_and_ship, calibration_markdown

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
