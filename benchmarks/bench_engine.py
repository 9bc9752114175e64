"""Speed and memory of the MedSteer hooks on the PixArt-XL-2 architecture (random weights, CPU).

Two measurements, one command each (``python benchmarks/bench_engine.py --help``):

``steps``
    Time of one denoising step (one transformer call on the CFG batch ``[uncond, cond]``, with
    its hooks attached and removed around the call exactly as ``medsteer_core.driver.sample``
    does) for these variants, interleaved round by round in one process:

    - ``plain``          no hooks (also the "plain run" of the capture comparison)
    - ``steered``        ``steering(...)``, paper window 8-16, strength 2.5
    - ``recorded``       the same plus a ``GateRecord``
    - ``capture``        ``capture(...)`` feeding a ``VectorEstimator``
    - ``authors_window`` / ``authors_all``  a baseline hook in the style of the authors' public
      code (see ``AuthorsStyleSteering``), steering the window or all 28 blocks

    Each round runs every variant once, starting at a different variant each round (a rotation,
    so no variant always runs first); a second, cheap loop then times each variant's hooks alone
    (attach, run at all 28 sites with the attention replaced by a pass-through, detach), which
    measures their absolute cost in milliseconds with far less noise than a whole step. Medians,
    inter-quartile ranges and the ratios to ``plain``
    are printed and written as JSON.

``memory``
    Peak memory of a ``VectorEstimator`` while capturing 10 and 100 seeds (each in a fresh
    subprocess): its ``nbytes``, the Python-heap growth seen by ``tracemalloc`` and the process's
    resident-set growth (peak while sampling, and retained after).

``all``
    Both, then a Markdown report (``--markdown``).

Run from the repository root, e.g. ``python benchmarks/bench_engine.py all --budget 600``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from bench_common import (
    TINY,
    AuthorsStyleSteering,
    Geometry,
    build_transformer,
    environment,
    fmt_load,
    log,
    paired_ratio,
    pass_through,
    random_vector,
    rss_bytes,
    stat_rows,
    summary,
)

import medsteer_core as ms
from medsteer_core.driver import SamplingSpec, sample
from medsteer_core.hooks import CallInfo

VARIANTS = ("plain", "steered", "recorded", "capture", "authors_window", "authors_all")
#: Which variant each ratio compares against ``plain`` and the target it must meet (issue 2).
TARGETS = {"steered": 1.03, "capture": 1.03}


# ---------------------------------------------------------------------------------------- model


# ------------------------------------------------------------------------- the baseline hook


# ---------------------------------------------------------------------------------- statistics


# ------------------------------------------------------------------------------- step timing
def bench_steps(args) -> dict:
    from diffusers import DPMSolverMultistepScheduler

    torch.set_num_threads(args.threads)
    geometry = TINY if args.tiny else Geometry()
    env = environment(torch.get_num_threads())
    t0 = time.perf_counter()
    model = build_transformer(geometry)
    build_s = time.perf_counter() - t0
    sites = ms.find_sites(model)
    depth, hidden = sites.depth, sites.hidden_size
    layer_start, layer_end = (8, 16) if depth >= 16 else (depth // 4, depth // 2)

    scheduler = DPMSolverMultistepScheduler()
    scheduler.set_timesteps(args.steps)
    schedule = scheduler.timesteps  # int64, like the driver's
    vector = random_vector(schedule.double(), depth, hidden)
    plan = ms.SteeringPlan(vector, strength=args.strength, layer_start=layer_start, layer_end=layer_end)
    # The baseline keys the same directions by step index (the authors key by step, not timestep).
    step_vectors = [vector.at(float(t)) for t in schedule]
    authors = {
        "authors_window": AuthorsStyleSteering(model, step_vectors, args.strength, range(layer_start, layer_end)),
        "authors_all": AuthorsStyleSteering(model, step_vectors, args.strength, range(depth)),
    }
    estimator = ms.VectorEstimator.for_model(model)
    records: dict[str, ms.GateRecord] = {"current": ms.GateRecord()}

    g = torch.Generator().manual_seed(0)
    side = args.size
    latents = torch.randn(2, 4, side, side, generator=g)
    context = torch.randn(2, args.tokens, geometry.caption_channels, generator=g)  # [uncond, cond]
    site_input = torch.randn(2, (side // 2) ** 2, hidden, generator=g)  # a CA output's shape
    conditional = (False, True)
    grid = (side // 2, side // 2)
    added = {"resolution": None, "aspect_ratio": None}

    def hooks(variant: str, call: CallInfo, step: int):
        if variant == "plain":
            return nullcontext()
        if variant == "steered":
            return ms.steering(model, plan, call_info=call)
        if variant == "recorded":
            if step == 0:
                records["current"] = ms.GateRecord()  # one record per sampling run
            return ms.steering(model, plan, call_info=call, record=records["current"])
        if variant == "capture":
            return ms.capture(model, estimator, "with", call_info=call)
        authors[variant].calls = step  # the pre-hook counts this call
        return authors[variant].attached([1])

    @torch.no_grad()
    def full_step(variant: str, step: int) -> float:
        t = schedule[step]
        start = time.perf_counter()
        t_rows = t.reshape(1).expand(2)
        call = CallInfo(t_rows, conditional, grid)
        with hooks(variant, call, step):
            out = model(
                latents,
                encoder_hidden_states=context,
                encoder_attention_mask=None,
                timestep=t_rows,
                added_cond_kwargs=added,
                return_dict=False,
            )[0].float()
        out_uncond, out_cond = out[:, :4].chunk(2)
        _ = out_uncond + 4.5 * (out_cond - out_uncond)
        return time.perf_counter() - start

    @torch.no_grad()
    def hooks_only(variant: str, step: int) -> float:
        """Attach the variant's hooks, run them at every site on a ``[2, N, D]`` activation with
        the attention itself replaced by a pass-through, detach: the hooks' whole cost per step."""
        t = schedule[step]
        start = time.perf_counter()
        t_rows = t.reshape(1).expand(2)
        call = CallInfo(t_rows, conditional, grid)
        with hooks(variant, call, step):
            if variant.startswith("authors"):
                authors[variant].calls = step + 1  # no transformer call here to count
            for module in sites.modules:
                module(site_input)
        return time.perf_counter() - start

    def run_round(r: int, record_to: dict | None) -> None:
        order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
        step = r % len(schedule)
        for variant in order:
            seconds = full_step(variant, step)
            if record_to is not None:
                record_to["full"][variant].append(seconds)
        with pass_through(sites.modules):
            for _ in range(args.hook_repeats):
                for variant in order:
                    seconds = hooks_only(variant, step)
                    if record_to is not None:
                        record_to["hooks_only"][variant].append(seconds)

    log(f"model built in {build_s:.1f} s: {depth} layers x {hidden}, {args.threads} threads")
    for r in range(args.warmup):
        run_round(r, None)
    log(f"warm-up done ({args.warmup} round(s))")
    timings = {"full": {v: [] for v in VARIANTS}, "hooks_only": {v: [] for v in VARIANTS}}
    start = time.perf_counter()
    rounds = 0
    while rounds < args.max_rounds:
        run_round(rounds, timings)
        rounds += 1
        elapsed = time.perf_counter() - start
        plain = statistics.median(timings["full"]["plain"])
        log(f"round {rounds}: {elapsed:.0f} s elapsed, plain step median {plain * 1e3:.0f} ms")
        if elapsed > args.budget and rounds >= args.min_rounds:
            break

    env["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result = {
        "kind": "steps",
        "env": env,
        "config": {
            "geometry": asdict(geometry),
            "latent": [4, side, side],
            "cfg_batch": 2,
            "caption_tokens": args.tokens,
            "layer_window": [layer_start, layer_end],
            "strength": args.strength,
            "schedule_steps": args.steps,
            "warmup_rounds": args.warmup,
            "hooks_only_repeats": args.hook_repeats,
            "build_s": build_s,
        },
        "rounds": rounds,
        "timings_s": timings,
        "stats": {},
    }
    for part, per_variant in timings.items():
        plain = per_variant["plain"]
        result["stats"][part] = {}
        for variant, values in per_variant.items():
            entry = summary(values)
            if variant != "plain":
                entry["ratio_of_medians"] = entry["median"] / statistics.median(plain)
                entry["paired_ratio"] = paired_ratio(values, plain)
                entry["overhead_ms"] = 1e3 * (entry["median"] - statistics.median(plain))
            result["stats"][part][variant] = entry
    full_plain = statistics.median(timings["full"]["plain"])
    for variant in VARIANTS[1:]:
        ca = result["stats"]["hooks_only"][variant]
        # The hooks' cost measured where it is least drowned in noise, relative to a whole step.
        ca["overhead_pct_of_full_step"] = 100.0 * ca["overhead_ms"] / 1e3 / full_plain
    return result


# ------------------------------------------------------------------------------------- memory


class _PeakRss:
    """Polls the resident set size in a thread; ``peak`` is the largest value seen."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = rss_bytes()
            if rss is not None and (self.peak is None or rss > self.peak):
                self.peak = rss
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def bench_memory_once(args) -> dict:
    """One subprocess: capture ``args.seeds`` seeds of both classes into a fresh estimator."""
    from diffusers import DPMSolverMultistepScheduler

    torch.set_num_threads(args.threads)
    geometry = TINY if args.tiny else Geometry()
    model = build_transformer(geometry)
    scheduler = DPMSolverMultistepScheduler()
    spec = SamplingSpec(steps=args.steps, cfg=4.5, height=args.size, width=args.size)
    g = torch.Generator().manual_seed(0)
    embeds = {
        k: torch.randn(1, args.tokens, geometry.caption_channels, generator=g) for k in ("with", "without", "neg")
    }
    seeds = list(range(args.seeds))
    chunks = [seeds[i : i + args.batch] for i in range(0, len(seeds), args.batch)]

    # Warm-up without hooks at the same batch size, so the allocator's pools exist before the
    # baseline is taken and the growth below belongs to the capture.
    sample(model, scheduler, embeds["with"], chunks[0], spec, negative_embeds=embeds["neg"])
    gc.collect()
    rss_before = rss_bytes()
    tracemalloc.start()
    estimator = ms.VectorEstimator.for_model(model)
    rss_trace: list[int | None] = []
    nbytes_trace: list[int] = []
    start = time.perf_counter()
    with _PeakRss() as peak:
        for chunk in chunks:
            for label in ("with", "without"):
                sample(
                    model,
                    scheduler,
                    embeds[label],
                    chunk,
                    spec,
                    negative_embeds=embeds["neg"],
                    estimator=estimator,
                    label=label,
                )
            # Growth after each chunk of seeds: flat if nothing accumulates per seed.
            rss_trace.append(rss_bytes())
            nbytes_trace.append(estimator.nbytes)
    seconds = time.perf_counter() - start
    gc.collect()
    traced_current, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_after = rss_bytes()
    vector = estimator.result()
    keys = len(vector.timesteps)
    return {
        "kind": "memory",
        "seeds": args.seeds,
        "batch": args.batch,
        "steps": args.steps,
        "latent": [4, args.size, args.size],
        "caption_tokens": args.tokens,
        "geometry": asdict(geometry),
        "threads": torch.get_num_threads(),
        "seconds": seconds,
        "images_per_class": estimator.images("with"),
        "timestep_keys": keys,
        "estimator_nbytes": estimator.nbytes,
        "estimator_nbytes_formula": 2 * keys * geometry.num_layers * geometry.hidden_size * 8,
        "tracemalloc_current_bytes": traced_current,
        "tracemalloc_peak_bytes": traced_peak,
        "rss_before_bytes": rss_before,
        "rss_after_bytes": rss_after,
        "rss_retained_bytes": None if rss_before is None else rss_after - rss_before,
        "rss_peak_growth_bytes": None if rss_before is None or peak.peak is None else peak.peak - rss_before,
        "rss_growth_after_each_chunk_bytes": [
            None if r is None or rss_before is None else r - rss_before for r in rss_trace
        ],
        "estimator_nbytes_after_each_chunk": nbytes_trace,
    }


def bench_memory(args) -> list[dict]:
    results = []
    for seeds in args.seed_counts:
        command = [sys.executable, __file__, "memory-once", "--seeds", str(seeds)]
        command += ["--batch", str(args.batch), "--steps", str(args.memory_steps), "--size", str(args.memory_size)]
        command += ["--tokens", str(args.memory_tokens), "--threads", str(args.threads)]
        command += ["--tiny"] if args.tiny else []
        log(f"memory: {seeds} seeds in a subprocess")
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        log(f"  estimator {results[-1]['estimator_nbytes']} bytes, {results[-1]['seconds']:.0f} s")
    return results


# ------------------------------------------------------------------------------------- report


def markdown(steps: dict | None, memory: list[dict] | None, command: str) -> str:
    lines = ["# Engine benchmark results", "", f"Command: `{command}`", ""]
    if steps:
        env, cfg = steps["env"], steps["config"]
        geo = cfg["geometry"]
        lines += [
            f"Date {env['date']}; torch {env['torch']}, diffusers {env['diffusers']}, medsteer {env['medsteer']}, "
            f"Python {env['python']}; CPU: {env['cpu']} ({env['cpu_count']} logical cores), "
            f"torch threads {env['torch_threads']} (interop {env['torch_interop_threads']}); "
            f"load average at start {fmt_load(env['loadavg_start'])}, at end {fmt_load(env['loadavg_end'])}.",
            "",
            f"Model: random-weight PixArtTransformer2DModel, {geo['num_layers']} layers, "
            f"{geo['num_attention_heads']} heads x {geo['attention_head_dim']}, caption channels "
            f"{geo['caption_channels']}, float32, CPU (built in {cfg['build_s']:.0f} s). "
            f"Latent {cfg['latent']} with CFG (batch 2 = [uncond, cond]), {cfg['caption_tokens']} caption tokens; "
            f"steering window [{cfg['layer_window'][0]}, {cfg['layer_window'][1]}), strength {cfg['strength']}. "
            f"{steps['rounds']} timed rounds after {cfg['warmup_rounds']} warm-up round(s); each round runs every "
            f"variant once, in a rotated order, at one timestep of a {cfg['schedule_steps']}-step DPM-Solver schedule.",
            "",
            "## Time per denoising step (one transformer call, hooks attached and removed around it)",
            "",
            "| variant | median ms | IQR ms (% of median) | ratio of medians | paired ratio [95% CI] |",
            "|---|---:|---:|---:|---:|",
        ]
        lines += stat_rows(steps["stats"]["full"], 1)
        lines += [
            "",
            f"## The hooks alone ({cfg['hooks_only_repeats']} per variant and round)",
            "",
            "Attach, run at every site on a CA-output-shaped activation (the attention itself replaced by a "
            "pass-through), detach: the hooks' whole cost per step, measured where the model's own work does not "
            "drown it. `plain` is the bare module calls.",
            "",
            "| variant | median ms | IQR ms (% of median) | overhead ms | overhead as % of a plain step |",
            "|---|---:|---:|---:|---:|",
        ]
        for variant, s in steps["stats"]["hooks_only"].items():
            overhead = "" if variant == "plain" else f"{s['overhead_ms']:.2f}"
            pct = "" if variant == "plain" else f"{s['overhead_pct_of_full_step']:.2f}%"
            lines.append(
                f"| {variant} | {s['median'] * 1e3:.2f} | {s['iqr'] * 1e3:.2f} ({s['iqr_pct']:.1f}%) | {overhead} | {pct} |"
            )
        lines += ["", "## Raw step times (ms) per round (fixed column order; the run order rotates each round)", ""]
        lines.append("| round | " + " | ".join(VARIANTS) + " |")
        lines.append("|---:|" + "---:|" * len(VARIANTS))
        full = steps["timings_s"]["full"]
        for r in range(steps["rounds"]):
            lines.append(f"| {r + 1} | " + " | ".join(f"{full[v][r] * 1e3:.0f}" for v in VARIANTS) + " |")
    if memory:
        first = memory[0]
        geo = first["geometry"]
        lines += [
            "",
            "## Estimator memory (each seed count in a fresh process)",
            "",
            f"Model {geo['num_layers']} layers x {geo['num_attention_heads'] * geo['attention_head_dim']}, caption "
            f"channels {geo['caption_channels']}; latent {first['latent']}, {first['caption_tokens']} caption tokens, "
            f"{first['steps']} steps, CFG, seeds captured {first['batch']} at a time for both classes "
            "(with / without). RSS growth is measured from after a warm-up sample of the same batch size.",
            "",
            "| seeds per class | images counted | timestep keys | estimator nbytes | tracemalloc peak | "
            "RSS peak growth | RSS retained | seconds |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for m in memory:
            lines.append(
                f"| {m['seeds']} | {m['images_per_class']} | {m['timestep_keys']} | {m['estimator_nbytes']:,} | "
                f"{m['tracemalloc_peak_bytes']:,} | {fmt_bytes(m['rss_peak_growth_bytes'])} | "
                f"{fmt_bytes(m['rss_retained_bytes'])} | {m['seconds']:.0f} |"
            )
        lines += ["", "RSS growth after each chunk of seeds (MiB) and the estimator's nbytes after each chunk:", ""]
        for m in memory:
            growth = ", ".join(
                "n/a" if b is None else f"{b / 2**20:.1f}" for b in m.get("rss_growth_after_each_chunk_bytes", [])
            )
            sizes = sorted(set(m.get("estimator_nbytes_after_each_chunk", [])))
            lines.append(f"- {m['seeds']} seeds: RSS growth [{growth}]; nbytes values seen {sizes}")
    return "\n".join(lines) + "\n"


def fmt_bytes(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:+.1f} MiB"


def check_targets(steps: dict) -> list[str]:
    problems = []
    for variant, target in TARGETS.items():
        ratio = steps["stats"]["full"][variant]["paired_ratio"]["median"]
        if ratio > target:
            problems.append(f"{variant}/plain = {ratio:.3f} > {target}")
    return problems


# --------------------------------------------------------------------------------------- main
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("steps", "memory", "all", "memory-once"))
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--tiny", action="store_true", help="a 4-layer toy model (smoke test of the script)")
    parser.add_argument("--budget", type=float, default=600, help="seconds of timed rounds (default 600)")
    parser.add_argument("--min-rounds", type=int, default=5)
    parser.add_argument("--max-rounds", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--hook-repeats", type=int, default=10, help="hooks-only timings per variant and round")
    parser.add_argument("--size", type=int, default=32, help="latent side (default 32 = 256x256 px)")
    parser.add_argument("--tokens", type=int, default=120, help="caption tokens (default 120)")
    parser.add_argument("--steps", type=int, default=20, help="schedule length (steps) / memory-once steps")
    parser.add_argument("--strength", type=float, default=2.5)
    parser.add_argument("--seed-counts", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--seeds", type=int, default=10, help="memory-once: seeds per class")
    parser.add_argument("--batch", type=int, default=10, help="memory: seeds per sampling call")
    parser.add_argument("--memory-steps", type=int, default=4)
    parser.add_argument("--memory-size", type=int, default=4, help="memory: latent side (default 4)")
    parser.add_argument("--memory-tokens", type=int, default=8, help="memory: caption tokens (default 8)")
    parser.add_argument("--json", type=Path, help="write all results here")
    parser.add_argument("--markdown", type=Path, help="write a Markdown report here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.what == "memory-once":
        print(json.dumps(bench_memory_once(args)))
        return 0
    command = "python benchmarks/bench_engine.py " + " ".join(sys.argv[1:] if argv is None else argv)
    steps = bench_steps(args) if args.what in ("steps", "all") else None
    memory = bench_memory(args) if args.what in ("memory", "all") else None
    report = markdown(steps, memory, command)
    print(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": command, "steps": steps, "memory": memory}, indent=1))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(report)
    problems = check_targets(steps) if steps else []
    for problem in problems:
        log(f"TARGET MISSED: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
