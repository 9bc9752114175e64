"""A vector's quality report, framework-free: ``inspect_vector`` (numbers), ``format_inspection`` (the
text ``medsteer inspect`` and the InspectPathologyVector node show) and ``profile_image``; a model's
sites (name, width, token grid): ``site_table`` and ``format_sites``.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import fields
from pathlib import Path

import torch

from .vector import PathologyVector
from .vector_file import FORMAT_NAME, FORMAT_VERSION, file_metadata, load_vector


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def halves_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """Where ``save_built`` keeps the half-seed vectors of ``path``: ``<stem>.halves/a|b.safetensors``."""
    path = Path(path)
    folder = path.with_name(path.name.removesuffix(".safetensors") + ".halves")
    return folder / "a.safetensors", folder / "b.safetensors"


def load_halves(path: str | os.PathLike) -> tuple[PathologyVector, PathologyVector] | None:
    """The half-seed vectors ``save_built`` wrote next to ``path``, or ``None`` when there are none."""
    a, b = halves_paths(path)
    return (load_vector(a), load_vector(b)) if a.is_file() and b.is_file() else None


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine along the last axis; NaN where either row is zero (undefined)."""
    a, b = a.double(), b.double()
    norms = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(norms > 0, (a * b).sum(-1) / norms.clamp_min(1e-300), torch.full_like(norms, float("nan")))


def _finite_or_none(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _seed_stability(directions: torch.Tensor, halves) -> dict:
    """Per layer and step: the cosine between the directions built from each half of the seeds."""
    k, depth, _ = directions.shape
    if halves is None:
        return {
            "available": False,
            "reason": "no halves: build with `medsteer build-vector` from at least two seed batches (it writes "
            "<name>.halves/), or build two vectors on disjoint seed ranges and pass them with --halves",
        }
    a, b = halves
    if a.directions.shape != directions.shape or b.directions.shape != directions.shape:
        return {"available": False, "reason": "the halves do not have the vector's shape (different steps or model)"}
    cosines = _cosine(a.directions, b.directions)  # [K, L]
    finite = cosines[torch.isfinite(cosines)]
    return {
        "available": True,
        "per_layer": [_finite_or_none(cosines[:, layer].nanmean()) for layer in range(depth)],
        "per_step": [_finite_or_none(cosines[i].nanmean()) for i in range(k)],
        "mean": _finite_or_none(cosines.nanmean()),
        "min": _finite_or_none(finite.min()) if finite.numel() else None,
        "images": [int(a.count_with.max()), int(b.count_with.max())],
    }


def site_table(sites, latent_size: tuple[int, int]) -> list[dict]:
    """Every site of a model (a ``Sites``) as ``{"layer", "name", "width", "grid"}``, in execution
    order; ``grid`` is ``[rows, columns]`` of its image tokens for a latent of ``latent_size``."""
    names = sites.names
    return [
        {"layer": i, "name": names[i], "width": int(sites.widths[i]), "grid": list(sites.token_grid(i, latent_size))}
        for i in range(sites.depth)
    ]


def format_sites(info: dict) -> str:
    """The text ``medsteer inspect --model`` prints: ``info`` is ``{"family", "image_size", "sites"}``
    with ``sites`` from ``site_table``."""
    height, width = info["image_size"]
    lines = [
        f"model family {info['family']}: {len(info['sites'])} cross-attention sites in execution order "
        f"(token grids for {width}x{height} px, rows x columns)",
        "  layer  name            width  grid",
    ]
    for site in info["sites"]:
        grid = "x".join(str(n) for n in site["grid"])
        lines.append(f"  {site['layer']:>5}  {site['name']:<14}  {site['width']:>5}  {grid}")
    return "\n".join(lines)


def inspect_vector(
    vector: PathologyVector | str | os.PathLike,
    halves: tuple[PathologyVector, PathologyVector] | None = None,
    sites: dict | None = None,
) -> dict:
    """A vector's metadata, shapes and quality numbers, as plain JSON-able data.

    Args:
        vector: a vector or a file (whose halves, if ``save_built`` wrote them, are read too).
        halves: two vectors built from disjoint halves of the seeds (overrides the files).
        sites: the model's sites ``{"family", "image_size", "sites": site_table(...)}``: each
            per-layer entry then carries its site's name and token grid, and the report says
            whether the vector fits the model (``sites["fits"]``).

    Returns:
        A dict with ``metadata``, ``shapes``, ``images`` (per class), ``timesteps``,
        ``difference_norms`` ``[K][L]`` (norm of mean-with minus mean-without), ``relative_norms``
        (that norm over the mean activation norm), ``per_layer`` and ``per_step`` summaries,
        ``timestep_stability`` (per layer: mean cosine between directions at adjacent timesteps,
        and between the first and last timestep) and ``seed_stability`` (per layer: mean cosine
        between the two halves' directions; ``None`` with a reason when there are no halves).
    """
    file = None
    if not isinstance(vector, PathologyVector):
        file = Path(vector)
        vector, halves = load_vector(file), halves or load_halves(file)
    k, depth, width = vector.directions.shape
    counts_with, counts_without = vector.count_with.double(), vector.count_without.double()
    mean_with = vector.sum_with.double() / counts_with.clamp_min(1)[:, None, None]
    mean_without = vector.sum_without.double() / counts_without.clamp_min(1)[:, None, None]
    norms = vector.difference_norms().double()
    scale = (mean_with.norm(dim=-1) + mean_without.norm(dim=-1)) / 2
    relative = torch.where(scale > 0, norms / scale.clamp_min(1e-300), torch.full_like(norms, float("nan")))
    directions = vector.directions
    adjacent = _cosine(directions[1:], directions[:-1]) if k > 1 else torch.full((0, depth), float("nan"))
    ends = _cosine(directions[0], directions[-1])
    per_layer = []
    for layer in range(depth):
        per_layer.append(
            {
                "layer": layer,
                "difference_norm": _finite_or_none(norms[:, layer].mean()),
                "relative_norm": _finite_or_none(relative[:, layer].nanmean()),
                "adjacent_cosine": _finite_or_none(adjacent[:, layer].nanmean()) if k > 1 else None,
                "first_last_cosine": _finite_or_none(ends[layer]),
            }
        )
    per_step = [
        {
            "timestep": float(vector.timesteps[i]),
            "difference_norm": _finite_or_none(norms[i].mean()),
            "relative_norm": _finite_or_none(relative[i].nanmean()),
            "images_with": int(vector.count_with[i]),
            "images_without": int(vector.count_without[i]),
        }
        for i in range(k)
    ]
    seed_stability = _seed_stability(directions, halves)
    sites = _label_layers(per_layer, vector, seed_stability, sites)
    return {
        "file": str(file) if file is not None else None,
        "sha256": sha256_file(file) if file is not None else None,
        "metadata": file_metadata(vector),
        "format_version": vector.file_format_version or FORMAT_VERSION,
        "provenance": _provenance_report(vector),
        "gain": vector.gain,
        "shapes": {"timesteps": k, "layers": depth, "hidden_size": width, "widths": list(vector.widths)},
        "images": {"with": int(vector.count_with.max()), "without": int(vector.count_without.max())},
        "timesteps": [float(t) for t in vector.timesteps],
        "difference_norms": norms.float().tolist(),
        "relative_norms": relative.float().tolist(),
        "per_layer": per_layer,
        "per_step": per_step,
        "timestep_stability": {
            "mean_adjacent_cosine": _finite_or_none(adjacent.nanmean()) if k > 1 else None,
            "mean_first_last_cosine": _finite_or_none(ends.nanmean()),
        },
        "seed_stability": seed_stability,
        **({"sites": sites} if sites is not None else {}),
    }


def _label_layers(per_layer: list[dict], vector: PathologyVector, seed_stability: dict, sites: dict | None):
    """Add each layer's halves cosine and width and, when the model's ``sites`` fit the vector
    (same widths), its name and grid; returns ``sites`` with ``fits`` (or ``None``)."""
    for layer, entry in enumerate(per_layer):
        entry["halves_cosine"] = seed_stability["per_layer"][layer] if seed_stability["available"] else None
        entry["width"] = int(vector.widths[layer])
    if sites is None:
        return None
    fits = [s["width"] for s in sites["sites"]] == [int(w) for w in vector.widths]
    if fits:
        for entry, site in zip(per_layer, sites["sites"], strict=True):
            entry["name"], entry["grid"] = site["name"], site["grid"]
    return {**sites, "fits": fits}


def _provenance_report(vector: PathologyVector) -> dict:
    """The typed provenance as JSON-able data (lists for tuples)."""
    provenance = vector.provenance
    report = {f.name: getattr(provenance, f.name) for f in fields(provenance)}
    return {k: list(v) if isinstance(v, tuple) else dict(v) if k == "extra" else v for k, v in report.items()}


def _provenance_lines(prov: dict) -> list[str]:
    """The provenance block of ``format_inspection``: what built the vector, on which weights."""

    def known(value, suffix: str = "") -> str:
        return "unknown" if value in (None, "", []) else f"{value}{suffix}"

    seeds = prov["seeds"]
    if not seeds:
        seed_text = "none recorded (merging refuses it)"
    elif seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        seed_text = f"{len(seeds)} ({seeds[0]}-{seeds[-1]})"
    else:
        seed_text = f"{len(seeds)} ({', '.join(map(str, seeds[:8]))}{', ...' if len(seeds) > 8 else ''})"
    size = f"{prov['width']}x{prov['height']}" if prov["width"] and prov["height"] else "unknown"
    calibrated = [prov[f"calibrated_{k}"] for k in ("layer_start", "layer_end", "strength")]
    lines = [
        "provenance:",
        f"  prompts: {len(prov['prompts_with'])} with, {len(prov['prompts_without'])} without; "
        f"negative {prov['negative_prompt']!r}",
        f"  seeds: {seed_text}",
        f"  sampling: {known(prov['steps'], ' steps')}, sampler {known(prov['sampler'])}, scheduler "
        f"{known(prov['scheduler'])}, cfg {known(prov['cfg'])}, {size} px",
        f"  model: {known(prov['model_family'])}, weights fingerprint "
        f"{prov['weights_fingerprint'] or 'not recorded (built before format 2)'}",
        f"  built by: {known(prov['host'])}, medsteer {known(prov['library_version'])}",
    ]
    if any(c is not None for c in calibrated):
        lines.append(f"  calibrated setting: layers {calibrated[0]}-{calibrated[1]}, strength {calibrated[2]}")
    return lines


def _fmt_value(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def _per_layer_lines(report: dict) -> list[str]:
    """The per-layer table of ``format_inspection``; with a model's sites, each row's name and grid."""
    sites = report.get("sites")
    lines = []
    if sites is not None and not sites["fits"]:
        lines.append(
            f"the model ({sites['family']}, {len(sites['sites'])} sites) does not fit this vector "
            f"({report['shapes']['layers']} sites of widths {report['shapes'].get('widths')}): built for another model"
        )
    named = sites is not None and sites["fits"]
    height, width = sites["image_size"] if named else (0, 0)
    lines.append("per layer (means over timesteps; |diff| = norm of mean-with minus mean-without):")
    head = f"  layer  {'name':<14}  grid@{width}x{height}" if named else "  layer"
    lines.append(f"{head}  width      |diff|   relative  adjacent-t cos  first-last cos  seed-halves cos")
    for e in report["per_layer"]:
        start = f"  {e['layer']:>5}"
        if named:
            grid = "x".join(str(n) for n in e["grid"])
            start += f"  {e['name']:<14}  {grid:<{len(f'grid@{width}x{height}')}}"
        width_text = e.get("width", report["shapes"]["hidden_size"])
        lines.append(
            f"{start}  {width_text:>5}  {_fmt_value(e['difference_norm'], '10.4g')}"
            f"  {_fmt_value(e['relative_norm'], '9.4f')}  {_fmt_value(e['adjacent_cosine'], '14.4f')}"
            f"  {_fmt_value(e['first_last_cosine'], '14.4f')}  {_fmt_value(e['halves_cosine'], '15.4f')}"
        )
    lines.append("")
    return lines


def format_inspection(report: dict) -> str:
    """The text ``medsteer inspect`` and the InspectPathologyVector node show for an ``inspect_vector`` report."""
    meta = report["metadata"]
    shapes = report["shapes"]
    lines = [f"vector: {report['file']}" + (f"  (sha256 {report['sha256'][:16]}...)" if report["sha256"] else "")]
    concepts = report.get("provenance") or {}
    lines.append(
        f"concept: {concepts.get('concept_with', '')!r} vs {concepts.get('concept_without', '')!r}   "
        f"gain {report['gain']:g}"
    )
    lines.append(
        f"shape: {shapes['timesteps']} timesteps x {shapes['layers']} layers x {shapes['hidden_size']}; "
        f"images per timestep: {report['images']['with']} with, {report['images']['without']} without"
    )
    widths = shapes.get("widths") or [shapes["hidden_size"]] * shapes["layers"]
    width_text = f"{widths[0]} at every site" if len(set(widths)) == 1 else f"per site {widths}"
    lines.append(f"format: {FORMAT_NAME} version {report.get('format_version') or '?'}; widths {width_text}")
    if "provenance" in report:
        lines.extend(_provenance_lines(report["provenance"]))
    lines.append("metadata:")
    for key in sorted(meta):
        value = meta[key]
        lines.append(f"  {key}: {value if len(value) <= 100 else value[:97] + '...'}")
    lines.append("")
    lines.extend(_per_layer_lines(report))
    lines.append("per timestep (means over layers):")
    lines.append("  timestep      |diff|   relative  images with/without")
    for e in report["per_step"]:
        lines.append(
            f"  {e['timestep']:>8.1f}  {_fmt_value(e['difference_norm'], '10.4g')}  {_fmt_value(e['relative_norm'], '9.4f')}"
            f"  {e['images_with']}/{e['images_without']}"
        )
    lines.append("")
    ts = report["timestep_stability"]
    lines.append(
        f"stability across timesteps: mean cosine of adjacent timesteps {_fmt_value(ts['mean_adjacent_cosine'])}, "
        f"first vs last {_fmt_value(ts['mean_first_last_cosine'])}"
    )
    ss = report["seed_stability"]
    if ss["available"]:
        lines.append(
            f"stability across seeds (two halves, {ss['images'][0]} + {ss['images'][1]} images per class): "
            f"mean cosine {_fmt_value(ss['mean'])}, min {_fmt_value(ss['min'])} (1 = the direction does not depend on the seeds)"
        )
    else:
        lines.append(f"stability across seeds: not available ({ss['reason']})")
    return "\n".join(lines)


def profile_image(report: dict, colormap: str = "viridis", cell: int = 12) -> torch.Tensor:
    """The relative concept difference of an ``inspect_vector`` report as a labelled heatmap.

    Rows are the vector's timesteps in sampling order (noisiest first), columns its layers; each
    cell is ``|mean with - mean without| / |mean|`` at that layer and timestep, scaled to the
    largest (the brightest cells are where the concept is most of the activation). Returns
    ``[H, W, 3]`` float in 0-1.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    from .gate_drawing import apply_colormap

    values = torch.tensor(report["relative_norms"], dtype=torch.float32)  # [K, L]
    order = sorted(range(len(report["timesteps"])), key=lambda i: -report["timesteps"][i])
    values = torch.nan_to_num(values[order], nan=0.0)
    top = float(values.max())
    colours = apply_colormap(values / top if top > 0 else values, colormap)  # [K, L, 3]
    k, layers = values.shape
    left, head = 44, 14
    cells = (colours * 255).round().to(torch.uint8).repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    canvas = Image.new("RGB", (left + layers * cell, head + k * cell), (255, 255, 255))
    canvas.paste(Image.fromarray(cells.numpy()), (left, head))
    draw = ImageDraw.Draw(canvas)
    layer_step = 1 if layers <= 10 else 2  # two-digit labels need two cells
    for layer in range(0, layers, layer_step):
        draw.text((left + layer * cell + 1, 1), str(layer), fill=(0, 0, 0))
    row_step = 1 if cell >= 12 else 2
    for row in range(0, k, row_step):
        draw.text((1, head + row * cell), f"t={report['timesteps'][order[row]]:.0f}", fill=(0, 0, 0))
    return torch.from_numpy(np.asarray(canvas).copy()).float() / 255
