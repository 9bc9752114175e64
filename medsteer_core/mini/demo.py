"""``medsteer demo``: the method, seen and measured offline in minutes on the shipped mini models.

With no flags it runs both shipped backbones, MedSteer-mini (a PixArt) and MedSteer-mini-UNet (a
Stable-Diffusion-style UNet), on the same text encoder, oracle and seeds. For each it loads the
model and oracle shipped in the package, checks that the model renders every class, builds the
pathology vectors (cached, so a second run is faster), samples a fixed held-out seed set unsteered,
steered and re-prompted, scores every pair with the oracle, and writes ``medsteer_demo/``:

- ``grid_<edit>.png`` (PixArt) and ``grid_unet_<edit>.png`` (UNet): columns are seeds; rows are
  unsteered | steered | re-prompted | gate;
- ``report.md``: the two backbones side by side, what the grids show and what every metric means,
  then per backbone the rendering check and tables shaped like the paper's Tables 2-4
  (counterfactual metrics vs re-prompting; strength sweep; window sweep; seeds sweep);
- ``report.json``: the same numbers, machine-readable;
- ``cache/``: the vectors it built.

It ends by printing the absolute path of the folder and of ``report.md``. The steering window and
strength of each edit are the calibrated ones stored in each backbone's shipped vectors' metadata
(``medsteer demo --calibrate`` re-runs the scan that chose them). ``--backbone pixart`` or
``--backbone unet`` runs one of them.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..backbones import find_sites
from ..gate_drawing import overlay
from ..gates import GateRecord
from ..plan import SteeringPlan
from ..settings import resolve_setting
from ..vector import PathologyVector
from ..vector_file import load_vector, save_vector
from . import synthetic
from .metrics import rendering_rates, score_pairs
from .mini_unet import DEFAULT_UNET_PATH
from .model import DEFAULT_PATH as MODEL_PATH
from .report import markdown
from .scan import build_vector, layer_profile, prompts_for, sweep

__all__ = ["DENOISERS", "EDITS", "Denoiser", "Edit", "main", "run_demo"]

VECTOR_DIR = Path(__file__).parent / "assets" / "vectors"
#: Where the calibrated vectors of the shipped MedSteer-mini-UNet live.
UNET_VECTOR_DIR = Path(__file__).parent / "assets" / "vectors_unet"
#: Seeds of the vectors (the paper: 50 images per prompt; 40 is where the mini's vector is stable).
VECTOR_SEEDS = 40
#: Held-out seeds of every table: disjoint from the vector seeds.
EVAL_SEED_BASE = 900_000
#: The demo's strength sweep (Table 3); the calibrated strength is added.
DEMO_STRENGTHS = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0)


@dataclass(frozen=True)
class Denoiser:
    """One shipped mini model the demo runs (``--backbone``): its file, its vectors, its outputs.

    Attributes:
        name: the ``--backbone`` choice (``"pixart"``, ``"unet"``).
        title: how reports name it.
        model_path: the shipped model file.
        vector_dir: the shipped calibrated vectors (one ``<prefix><edit>.safetensors`` each).
        prefix: put before an edit's name in the demo's file names (``grid_<prefix><edit>.png``)
            and after ``calibration`` in the calibration report's.
    """

    name: str
    title: str
    model_path: Path
    vector_dir: Path
    prefix: str

    def grid_name(self, edit: str) -> str:
        return f"grid_{self.prefix}{edit}.png"

    def calibration_name(self) -> str:
        return "calibration" + (f"_{self.prefix.rstrip('_')}" if self.prefix else "")


DENOISERS = {
    "pixart": Denoiser("pixart", "MedSteer-mini (PixArt)", MODEL_PATH, VECTOR_DIR, ""),
    "unet": Denoiser("unet", "MedSteer-mini-UNet", DEFAULT_UNET_PATH, UNET_VECTOR_DIR, "unet_"),
}


@dataclass(frozen=True)
class Edit:
    """One counterfactual edit: source class -> target class, and its default setting."""

    name: str
    source: str
    target: str
    title: str
    dye: bool = False

    def shipped_path(self, vector_dir: str | Path = VECTOR_DIR, prefix: str = "") -> Path:
        """The shipped vector of this edit (default: MedSteer-mini's; ``Denoiser.vector_dir`` and
        ``Denoiser.prefix`` for another: ``vectors_unet/unet_<edit>.safetensors``, so ComfyUI's
        vector list, which goes by file name, tells the two apart)."""
        return Path(vector_dir) / f"{prefix}{self.name}.safetensors"

    def shipped_setting(self, vector_dir: str | Path = VECTOR_DIR, prefix: str = "") -> tuple[int, int, float]:
        """``setting_of`` the shipped vector (the fallback setting when none is shipped)."""
        path = self.shipped_path(vector_dir, prefix)
        return setting_of(load_vector(path) if path.is_file() else None)


EDITS = (
    Edit("dye_removal", "dyed", "polyp", "Dye removal (dyed lifted polyps -> polyps)", dye=True),
    Edit("polyp_to_normal", "polyp", "normal", "Polyp -> normal cecum"),
    Edit("colitis_to_normal", "colitis", "normal", "Ulcerative colitis -> normal cecum"),
)
FALLBACK_SETTING = (0, 1, 1.0)


def setting_of(vector: PathologyVector | None) -> tuple[int, int, float]:
    """``(layer_start, layer_end, strength)`` calibrated for a vector (from its metadata)."""
    if vector is None or "strength" not in vector.provenance.calibrated_setting():
        return FALLBACK_SETTING
    setting = resolve_setting(None, vector)  # the calibrated setting, through the one resolver
    return setting.layer_start, setting.layer_end, setting.strength


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
    backbones: tuple[str, ...] | None = None,
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

    Args:
        backbones: names of ``DENOISERS`` to run, in order (default: all; with ``model_path``, the
            backbone that file is).
        model_path: a mini file to run instead of the shipped one of its backbone (PixArt or UNet,
            read from the file).
        strengths / windows: the sweeps of Tables 3 and 4a (default 0-6 in steps of 1; single sites
            and a few spans); both always include the first edit's calibrated setting.
    """
    from .oracle import load_oracle

    started = time.time()
    out = Path(out)
    _check_arguments(out, eval_seeds, vector_seeds, grid_seeds, edits, model_path, oracle_path, backbones)
    models = _load_models(backbones, model_path)  # before the folder exists: a bad file leaves nothing behind
    oracle = load_oracle(oracle_path)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "cache" if use_cache else None
    if cache is not None:
        cache.mkdir(exist_ok=True)
    chosen = [e for e in EDITS if e.name in edits]
    seeds = [EVAL_SEED_BASE + i for i in range(eval_seeds)]
    seed_counts = tuple(sorted({min(n, vector_seeds) for n in seed_counts} | {vector_seeds}))
    runs = [
        _DemoRun(denoiser, model, oracle, seeds, vector_seeds, cache, tag, chosen, out)
        for denoiser, model, tag in models
    ]
    for run in runs:
        run.plan_sweeps(strengths, windows, seed_counts)
    progress = _Progress(sum(run.images() for run in runs), quiet)
    report: dict = {
        "eval_seeds": seeds[:1] + seeds[-1:],
        "grid_seeds": min(grid_seeds, len(seeds)),
        "vector_seeds": vector_seeds,
        "backbones": {},
    }
    for run in runs:
        run.progress = progress
        report["backbones"][run.denoiser.name] = run.run(report["grid_seeds"])
    progress.close()
    report["seconds"] = round(time.time() - started, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report, len(seeds), vector_seeds, chosen, EVAL_SEED_BASE))
    return report


def _load_models(backbones: tuple[str, ...] | None, model_path: str | None) -> list[tuple[Denoiser, object, str]]:
    """``(denoiser, model, file digest)`` of each backbone to run; ``model_path`` replaces the
    shipped file of the backbone it is (and alone is run when ``backbones`` is not given)."""
    from .mini_unet import is_unet
    from .model import load_mini

    custom = load_mini(model_path) if model_path else None
    kind = None if custom is None else ("unet" if is_unet(custom.transformer) else "pixart")
    if backbones is None:
        backbones = (kind,) if kind else tuple(DENOISERS)
    if kind is not None and kind not in backbones:
        raise ValueError(
            f"--model {str(model_path)!r} is a {DENOISERS[kind].title} file, but --backbone asks for "
            f"{', '.join(backbones)}: pass --backbone {kind} (or both)"
        )
    models = []
    for name in backbones:
        denoiser = DENOISERS[name]
        if name == kind:
            models.append((denoiser, custom, _file_digest(Path(model_path))))
        else:
            models.append((denoiser, load_mini(denoiser.model_path), _file_digest(denoiser.model_path)))
    return models


class _DemoRun:
    """What one backbone's demo run shares between its stages: model, oracle, held-out seeds, the
    unsteered images of every class (``by_class``), the vectors built so far, the vector cache,
    the sweeps' settings and progress."""

    def __init__(self, denoiser, model, oracle, seeds, vector_seeds, cache, tag, edits, out) -> None:
        self.denoiser, self.model, self.oracle, self.seeds = denoiser, model, oracle, seeds
        self.vector_seeds, self.cache, self.tag, self.edits, self.out = vector_seeds, cache, tag, edits, out
        self.sites = find_sites(model.transformer)
        self.by_class: dict[int, torch.Tensor] = {}
        self.vectors: dict[str, PathologyVector] = {}
        self.progress = None
        self.sweep_plan = None

    def plan_sweeps(self, strengths, windows, seed_counts) -> None:
        """The sweeps of the first edit: around its shipped setting, windows within this model."""
        if not self.edits:
            return
        depth = self.sites.depth
        setting = self.edits[0].shipped_setting(self.denoiser.vector_dir, self.denoiser.prefix)
        start, end, strength = setting
        windows = [w for w in (windows if windows is not None else _windows(depth)) if w[1] <= depth]
        strengths = tuple(sorted(set(DEMO_STRENGTHS if strengths is None else strengths) | {strength}))
        windows = sorted(set(windows) | {(start, end)}, key=lambda w: (w[1] - w[0], w))
        self.sweep_plan = (setting, strengths, windows, seed_counts)

    def images(self) -> int:
        """How many images the run samples (for the progress bar)."""
        n = len(self.seeds)
        total = len(synthetic.CLASSES) * n + len(self.edits) * (2 * self.vector_seeds + 3 * n)
        if self.sweep_plan is not None:
            _, strengths, windows, counts = self.sweep_plan
            total += (len(strengths) + len(windows) + len(counts) - 1) * n + 2 * (sum(counts) - self.vector_seeds)
        return total

    def run(self, grid_seeds: int) -> dict:
        """Everything for this backbone: rendering check, Table 2 per edit, the sweeps."""
        started = time.time()
        model, seeds, progress = self.model, self.seeds, self.progress
        report: dict = {
            "title": self.denoiser.title,
            "model": model.metadata.get("training", ""),
            "cfg": model.default_cfg,
            "site_names": list(self.sites.names),
            "site_widths": list(self.sites.widths),
        }
        progress.stage(f"{self.denoiser.name}: rendering check")
        for c, name in enumerate(synthetic.CLASSES):
            self.by_class[c] = model.generate(prompts_for(name, seeds), seeds)
            progress(len(seeds))
        rates = rendering_rates(self.oracle, self.by_class)
        report["rendering_rate"] = {synthetic.CLASSES[c]: r for c, r in rates.items()}
        report["edits"] = {}
        for edit in self.edits:
            report["edits"][edit.name] = self.edit(edit, self.out / self.denoiser.grid_name(edit.name), grid_seeds)
        if self.sweep_plan is not None:
            report.update(self.sweeps(self.edits[0], *self.sweep_plan))
        report["seconds"] = round(time.time() - started, 1)
        return report

    def edit(self, edit: Edit, grid_path: Path, grid_seeds: int) -> dict:
        """Table 2 for one edit: build its vector, steer the held-out seeds at the shipped setting,
        score them and re-prompting against the unsteered images, write its grid."""
        model, seeds, progress = self.model, self.seeds, self.progress
        progress.stage(f"{self.denoiser.name}: {edit.name}: vector")
        start, end, strength = edit.shipped_setting(self.denoiser.vector_dir, self.denoiser.prefix)
        vector = _vector(model, edit, list(range(self.vector_seeds)), self.cache, self.tag, progress)
        self.vectors[edit.name] = vector
        progress.stage(f"{self.denoiser.name}: {edit.name}: pairs")
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
        # [B, h, w]: mean over steps and steered sites (coarser UNet levels upsampled to the finest grid)
        gates = record.maps().maps.mean(dim=(0, 1))
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
        progress.stage(f"{self.denoiser.name}: {first.name}: strength sweep")
        rows = sweep(
            model, oracle, vector, first.source, first.target, seeds, [(start, end)], strengths,
            originals=originals, progress=lambda k: progress(k * len(seeds)),
        )  # fmt: skip
        tables["strength_sweep"] = [r.as_dict() for r in rows]
        progress.stage(f"{self.denoiser.name}: {first.name}: window sweep")
        rows = sweep(
            model, oracle, vector, first.source, first.target, seeds, windows, [strength],
            originals=originals, progress=lambda k: progress(k * len(seeds)),
        )  # fmt: skip
        tables["window_sweep"] = [r.as_dict() for r in rows]
        progress.stage(f"{self.denoiser.name}: {first.name}: seeds sweep")
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
    backbones: tuple[str, ...] | None = None,
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
    if backbones is not None and (not backbones or not set(backbones) <= set(DENOISERS)):
        raise ValueError(f"unknown backbone(s) {list(backbones)}: choose from {list(DENOISERS)}")
    for flag, path in (("--model", model_path), ("--oracle", oracle_path)):
        if path is not None and not Path(path).expanduser().is_file():
            raise ValueError(f"{flag} {str(path)!r}: no such file; pass an existing .safetensors file or leave it out")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a folder: pass a folder name")


def _windows(depth: int) -> list[tuple[int, int]]:
    singles = [(i, i + 1) for i in range(depth)]
    spans = [(0, 2), (0, depth // 2), (depth // 2, depth), (0, depth)]
    return singles + [s for s in spans if s not in singles]


def main(argv: list[str] | None = None) -> int:
    """``medsteer demo [options]`` (every option has a default; no flags runs the full demo)."""
    from .demo_cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
