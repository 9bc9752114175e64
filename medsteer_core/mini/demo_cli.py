"""``medsteer demo``'s command line: the options, the calibration route and the closing lines.

``demo.main`` calls ``main`` here; the demo itself (``run_demo``) and the calibration
(``calibrate.calibrate_and_ship``) are library functions, so this module only parses, dispatches
and prints.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from ..errors import MedSteerError
from . import demo
from .demo import DENOISERS, EDITS, VECTOR_SEEDS, _check_arguments, run_demo

__all__ = ["main"]


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


def build_parser() -> argparse.ArgumentParser:
    """The ``medsteer demo`` options (every one has a default)."""
    parser = _Parser(
        prog="medsteer demo",
        description=_plain(demo.__doc__),
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
    parser.add_argument(
        "--backbone",
        choices=[*DENOISERS, "both"],
        default=None,
        help="pixart (MedSteer-mini), unet (MedSteer-mini-UNet) or both (default: both; with --model, "
        "the backbone of that file)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="a MedSteer-mini or MedSteer-mini-UNet .safetensors to use instead of the shipped one of its backbone",
    )
    parser.add_argument("--oracle", default=None, help="an oracle .safetensors (default: the shipped one)")
    parser.add_argument("--no-cache", action="store_true", help="rebuild the vectors even if cached")
    parser.add_argument("--quick", action="store_true", help="a reduced run (few seeds and sweep points)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no report on the terminal")
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="re-run the layer scan and write calibrated vectors to --out (PixArt's in it, the UNet's in "
        "--out/vectors_unet/) with calibration.md / calibration_unet.md",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """``medsteer demo [options]`` (every option has a default; no flags runs the full demo)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    known = {e.name for e in EDITS}
    edits = tuple(x.strip() for x in args.edits.split(",") if x.strip())
    unknown = [e for e in edits if e not in known]
    if unknown:
        parser.error(f"unknown edit(s) {unknown}; choose from {sorted(known)}")
    backbones = None if args.backbone is None else tuple(DENOISERS) if args.backbone == "both" else (args.backbone,)
    try:
        if args.calibrate:
            return _calibrate(args, edits, backbones)
        return _run(args, edits, backbones)
    except (MedSteerError, ValueError) as exc:  # bad input: one line (MEDSTEER_DEBUG=1 for the traceback)
        if os.environ.get("MEDSTEER_DEBUG"):
            raise
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2


def _calibrate(args: argparse.Namespace, edits: tuple[str, ...], backbones: tuple[str, ...] | None) -> int:
    """``--calibrate``: per backbone, the scan, the calibrated vectors and ``calibration*.md/.json``."""
    from .calibrate import calibrate_and_ship, calibration_markdown

    out = Path(args.out)
    _check_arguments(out, 1, 1, 1, edits, args.model, args.oracle, backbones)
    if backbones is None:
        backbones = (_kind_of(args.model),) if args.model else tuple(DENOISERS)
    if args.model and len(backbones) > 1:
        raise ValueError("--calibrate with --model calibrates that one file: pass --backbone pixart or unet")
    written = []
    for name in backbones:
        denoiser = DENOISERS[name]
        vectors = out if name == "pixart" else out / denoiser.vector_dir.name
        summary = calibrate_and_ship(
            vectors, backbone=name, edits=edits, model_path=args.model, oracle_path=args.oracle, quiet=args.quiet
        )
        report = out / denoiser.calibration_name()
        report.with_suffix(".json").write_text(json.dumps(summary, indent=2))
        text = calibration_markdown(summary, title=denoiser.title)
        report.with_suffix(".md").write_text(text)
        if not args.quiet:
            print(text)
        written.append(f"{denoiser.title}: vectors in {vectors.resolve()}, {report.name}.md/.json")
    print(f"wrote {out.resolve()}/: " + "; ".join(written))
    return 0


def _kind_of(model_path: str) -> str:
    """``"unet"`` or ``"pixart"``: the backbone of a mini file, from its metadata."""
    from safetensors import safe_open

    try:
        with safe_open(str(Path(model_path).expanduser()), framework="pt") as handle:
            meta = handle.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types on a corrupt header
        raise MedSteerError(f"--model {model_path!r} is not a readable MedSteer-mini file ({exc})") from exc
    return "unet" if meta.get("denoiser") == "unet" else "pixart"


def _run(args: argparse.Namespace, edits: tuple[str, ...], backbones: tuple[str, ...] | None) -> int:
    out = Path(args.out)
    kwargs = {}
    if args.quick:
        kwargs = {"strengths": (0.0, 1.0), "seed_counts": (2, 4), "grid_seeds": 2, "windows": ((0, 1), (0, 6))}
    report = run_demo(
        args.out,
        backbones=backbones,
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
    print(_where(out, edits, tuple(report["backbones"])))
    return 0


def _where(out: Path, edits: tuple[str, ...], backbones: tuple[str, ...]) -> str:
    """The closing lines: where the demo wrote (absolute paths, to open or copy)."""
    folder = out.resolve()
    grids = ", ".join(DENOISERS[b].grid_name(e.name) for b in backbones for e in EDITS if e.name in edits)
    return (
        f"medsteer demo: wrote {folder}{os.sep}\n"
        f"  report: {folder / 'report.md'} (numbers: report.json)\n"
        f"  grids:  {grids or 'none (no edits chosen)'} in the same folder"
    )
