"""``generate``: counterfactual pair datasets (unsteered / steered images, optional gate heatmaps),
resumable, sharded over processes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..gate_figure import figure3_selection, layer_indices
from ..gates import GateRecord, parse_steps
from ..plan import SteeringPlan
from .distributed import Shard
from .figures import _pair_heatmap
from .manifest import (
    _PARTS,
    MANIFEST,
    _append_record,
    _existing_records,
    _files_intact,
    _settings_difference,
    _trim_unfinished_line,
)
from .models import HeadlessModel
from .outputs import OutputFolderError, _os_reason, _write_atomic, lock_output_folder
from .steer_options import Steer
from .vector_build import _batches, _progress_bar


@dataclass
class GenerateReport:
    """What ``generate`` did: the manifest, the records of this run's pairs, and counts."""

    out_dir: Path
    manifest: Path
    written: int
    skipped: int
    records: list[dict] = field(default_factory=list)


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _settings(model, spec, negative_prompt, scheduler, batch_size, resolved, heatmaps) -> dict:
    """What every record of a ``generate`` folder stores; a rerun with other settings is refused."""
    return {
        **model.provenance(),
        "negative_prompt": negative_prompt,
        "steps": spec.steps,
        "cfg": spec.cfg,
        "scheduler": scheduler,
        "height": spec.height * model.latent_scale,
        "width": spec.width * model.latent_scale,
        "batch_size": batch_size,
        "vectors": [entry for _, entry in resolved],
        "heatmaps": heatmaps,
        "medsteer_version": __version__,
    }


def _resolve_plans(model, steers: Sequence[Steer], heatmap_plan: int) -> tuple[list, list[SteeringPlan]]:
    """Every ``Steer`` resolved and checked against the model, before anything is sampled."""
    if not steers:
        raise ValueError("generate needs at least one vector to steer with")
    resolved = [steer.resolve(sites=model.sites) for steer in steers]
    plans = [plan for plan, _ in resolved]
    if not 0 <= heatmap_plan < len(plans):
        raise ValueError(f"heatmap_plan {heatmap_plan} is out of range: {len(plans)} vector(s) given")
    return resolved, plans


def _heatmap_choice(steps: str | None, layers: str | None, plan: SteeringPlan, run_steps: int, sites) -> dict:
    """The heatmaps' step and layer selection (defaults: the paper's Fig. 3; site names resolved), checked."""
    preset = figure3_selection(run_steps, range(plan.layer_start, plan.layer_end))
    steps = steps or preset.steps
    parse_steps(steps, run_steps)
    return {"steps": steps, "layers": layer_indices(sites, layers or preset.layers)}


def generate(
    model: HeadlessModel,
    steers: Sequence[Steer],
    prompts: Sequence[str],
    seeds: Iterable[int],
    out_dir: str | os.PathLike,
    *,
    negative_prompt: str = "",
    steps: int = 20,
    cfg: float | None = None,
    scheduler: str = "default",
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 1,
    heatmaps: bool = False,
    heatmap_steps: str | None = None,
    heatmap_layers: str | None = None,
    heatmap_plan: int = 0,
    colormap: str = "viridis",
    shard: Shard | None = None,
    progress: bool = True,
) -> GenerateReport:
    """Generate counterfactual pairs: per prompt and seed, the unsteered and the steered image.

    Both images of a pair use the same prompt (the one WITH the concept), seed and model; the
    steered one runs with every ``Steer`` chained in order (method.md, "SSPS"). Files go to
    ``out_dir/images/p{prompt:03d}-s{seed}-{unsteered,steered,gate,mask}.png`` and one JSON line per
    pair to ``out_dir/manifest.jsonl`` (seed, prompt, every setting, vector files and sha256, the
    paths and sha256 of the images), sorted by prompt and seed.

    Resumable: pairs already in the folder with intact files are skipped, and since every batch of
    seeds is the same unit of work in every run, redone pairs get the same bytes. A folder made
    with other settings is refused.

    Args:
        model: from ``load_model``.
        steers: the vectors to apply, in order (chained).
        prompts: prompts with the concept (each gets every seed).
        seeds: one pair per prompt and seed.
        out_dir: the output folder.
        negative_prompt / steps / cfg / scheduler / height / width / batch_size: sampling settings.
        heatmaps: also write, per pair, the gate grid (``-gate.png``: rows are steps, columns are
            layers) and a mask (``-mask.png``: the gate averaged over those steps and layers,
            resized to the image and scaled to 0-255).
        heatmap_steps / heatmap_layers: ``gates`` selection grammar (default: the paper's Fig. 3
            steps scaled to ``steps``; layer 8, or the window's first layer if 8 is not steered).
        heatmap_plan: which steer's gates to show.
        colormap: the heatmaps' colormap.
        shard: this process's rank; units are dealt round-robin and rank 0 writes the manifest.
        progress: show a tqdm bar.

    Raises:
        OutputFolderError: ``out_dir`` holds pairs made with other settings.
    """
    shard = shard or Shard()
    prompts = [str(p) for p in prompts]
    if not prompts or not all(p.strip() for p in prompts):
        raise ValueError("generate needs at least one non-empty prompt (the prompt WITH the concept)")
    cfg = model.default_cfg if cfg is None else cfg
    spec = model.spec(steps, cfg, height, width)
    resolved, plans = _resolve_plans(model, steers, heatmap_plan)
    heatmap = None
    if heatmaps:  # the selection is checked before sampling, not after the first pair
        heatmap = _heatmap_choice(heatmap_steps, heatmap_layers, plans[heatmap_plan], spec.steps, model.sites)
        heatmap.update(plan=heatmap_plan, colormap=colormap)
    settings = _settings(model, spec, negative_prompt, scheduler, batch_size, resolved, heatmap)
    out_dir = Path(out_dir)
    batches = _batches(list(seeds), batch_size)
    units = [(p, batch) for p in range(len(prompts)) for batch in batches]
    with lock_output_folder(out_dir, shard):
        try:
            common = {"negative_prompt": negative_prompt, "scheduler": scheduler}
            return _generate_units(
                model, plans, prompts, units, out_dir, settings, spec, common, heatmap, shard, progress
            )
        except OSError as exc:  # a full disk, a folder made read-only mid-run, ...
            raise OutputFolderError(
                f"cannot write to the output folder {str(out_dir)!r}: {_os_reason(exc)}: free space (or fix "
                "permissions) and rerun the same command; finished pairs are kept"
            ) from exc


def _done_pairs(out_dir: Path, units, prompts, settings) -> set[tuple[int, int]]:
    """The (prompt, seed) pairs already in ``out_dir`` with intact files; a pair made with other
    settings is refused."""
    existing = _existing_records(out_dir)
    done = set()
    for p, batch in units:
        for seed in batch:
            record = existing.get((p, seed))
            if record is None:
                continue
            changes = _settings_difference(record["settings"], settings)
            if record["prompt"] != prompts[p]:
                changes.insert(0, f"prompt {p}: {record['prompt']!r} -> {prompts[p]!r}")
            if changes:
                raise OutputFolderError(
                    f"{str(out_dir)!r} already holds pair (prompt {p}, seed {seed}) made with other settings "
                    f"({'; '.join(changes[:4])}): use another --out folder, or delete this one"
                )
            if _files_intact(out_dir, record):
                done.add((p, seed))
    return done


def _fold_parts(out_dir: Path, manifest: Path) -> None:
    """Rank 0, after every rank finished: the sorted manifest from all records, then the parts and
    any half-written images of a crashed run removed."""
    records = _existing_records(out_dir)
    lines = [json.dumps(records[key], sort_keys=True) + "\n" for key in sorted(records)]
    _write_atomic(manifest, "".join(lines).encode())
    for leftover in (out_dir / _PARTS).glob("rank-*.jsonl"):
        leftover.unlink()
    (out_dir / _PARTS).rmdir()
    for stale in (out_dir / "images").glob(".*.tmp"):  # half-written files of a crashed run
        stale.unlink()


def _generate_units(
    model, plans, prompts, units, out_dir, settings, spec, common, heatmap, shard, progress
) -> GenerateReport:
    """``generate``'s work, with ``out_dir`` locked."""
    done = _done_pairs(out_dir, units, prompts, settings)
    shard.barrier()  # every rank has read the folder before anyone writes to it
    todo = [i for i, (p, batch) in enumerate(units) if not all((p, s) in done for s in batch)]
    mine = [i for i in todo if shard.owns(i)]
    bar = _progress_bar(len(mine) * 2 * spec.steps, "generate", progress and shard.main)
    parts = out_dir / _PARTS / f"rank-{shard.rank}.jsonl"
    parts.parent.mkdir(parents=True, exist_ok=True)
    _trim_unfinished_line(parts)  # a record cut short by a crash must not swallow the next one
    written: list[dict] = []
    handle = os.open(parts, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for i in mine:
            p, batch = units[i]
            step = lambda k, n: bar.update(1)  # noqa: E731
            plain = model.sample(prompts[p], batch, spec, progress=step, **common)
            record = GateRecord() if heatmap is not None else None
            steered = model.sample(prompts[p], batch, spec, plans=plans, record=record, progress=step, **common)
            gates = record.maps(heatmap["plan"]) if record is not None else None
            images = {"unsteered": model.decode(plain), "steered": model.decode(steered)}
            for b, seed in enumerate(batch):
                stem = f"images/p{p:03d}-s{seed}"
                files = {}
                blobs = {kind: _png(images[kind][b]) for kind in ("unsteered", "steered")}
                if gates is not None:
                    grid, mask = _pair_heatmap(
                        gates,
                        b,
                        heatmap["steps"],
                        heatmap["layers"],
                        heatmap["colormap"],
                        images["steered"][b],
                        model.sites,
                    )
                    blobs["gate"], blobs["mask"] = _png(grid), _png(mask)
                for kind, data in blobs.items():  # the images first, then their record
                    _write_atomic(out_dir / f"{stem}-{kind}.png", data)
                    files[kind] = {"path": f"{stem}-{kind}.png", "sha256": hashlib.sha256(data).hexdigest()}
                entry = {"prompt_index": p, "prompt": prompts[p], "seed": seed, "files": files, "settings": settings}
                _append_record(handle, (json.dumps(entry, sort_keys=True) + "\n").encode())
                written.append(entry)
    finally:
        os.close(handle)
        bar.close()
    shard.barrier()
    manifest = out_dir / MANIFEST
    if shard.main:
        _fold_parts(out_dir, manifest)
    shard.barrier()
    written_total = sum(shard.gather(len(written)))
    skipped = sum(len(batch) for p, batch in units) - written_total
    return GenerateReport(out_dir, manifest, written_total, skipped, written)
