"""The Markdown report of ``bench_unet.py`` and its duration estimate (``--dry-run``)."""

from __future__ import annotations

import math
import statistics

import bench_common as common

TEXT_TOKENS = 77  # CLIP's context length, as in bench_unet
#: The header of a configuration's step-time tables (wall time, and CPU time where recorded).
STEP_TABLE = (
    "| variant | median ms | IQR ms (% of median) | ratio of medians | paired ratio [95% CI] |",
    "|---|---:|---:|---:|---:|",
)


def statistics_of(timings: dict) -> dict:
    stats = {}
    for part, per_variant in timings.items():
        plain = per_variant["plain"]
        stats[part] = {}
        for variant, values in per_variant.items():
            entry = common.summary(values)
            if variant != "plain":
                entry["ratio_of_medians"] = entry["median"] / statistics.median(plain)
                entry["paired_ratio"] = common.paired_ratio(values, plain)
                entry["overhead_ms"] = 1e3 * (entry["median"] - statistics.median(plain))
            stats[part][variant] = entry
    full_plain = statistics.median(timings["full"]["plain"])
    for variant, entry in stats["hooks_only"].items():
        if variant != "plain":
            entry["overhead_pct_of_full_step"] = 100.0 * entry["overhead_ms"] / 1e3 / full_plain
    return stats


def expected_seconds(flops: int, gflops: float, variants: int, args) -> dict:
    """How long one configuration takes at ``gflops`` (a throughput measured on this machine):
    the warm-up rounds, then whole rounds until ``--budget`` has passed and ``--min-rounds`` are done
    (the build and the process start come on top)."""
    step = flops / (gflops * 1e9)
    round_s = variants * step
    rounds = max(args.min_rounds, math.ceil(args.budget / round_s))
    return {"step_s": step, "rounds": rounds, "total_s": (args.warmup + rounds) * round_s}


def dry_run(architectures: list[dict], args) -> str:
    lines = [
        "| model | latent | TFLOP per CFG step |"
        + (" expected s per step | rounds | expected s |" if args.gflops else "")
    ]
    lines.append("|---|---|---:|" + ("---:|---:|---:|" if args.gflops else ""))
    total = 0.0
    for a in architectures:
        for size, flops in a["flops_per_step"].items():
            row = f"| {a['model']} | {size}x{size} | {flops / 1e12:.2f} |"
            if args.gflops:
                e = expected_seconds(flops, args.gflops, len(args.variants), args)
                total += e["total_s"]
                row += f" {e['step_s']:.1f} | {e['rounds']} | {e['total_s']:.0f} |"
            lines.append(row)
    if args.gflops:
        lines += ["", f"Expected at {args.gflops:g} GFLOP/s: {total / 3600:.1f} h of rounds, plus each model's build."]
    return "\n".join(lines) + "\n"


def summary_row(r: dict, flops: dict) -> str:
    if "error" in r:
        return f"| {r['model']} | {r['size']}x{r['size']} | failed: {r['error']} |" + " |" * 9
    full, hooks = r["stats"]["full"], r["stats"]["hooks_only"]

    def ratio(variant: str, part: dict = full) -> str:
        if variant not in part:
            return "-"
        p = part[variant]["paired_ratio"]
        return f"{p['median']:.3f} [{p['ci95'][0]:.3f}, {p['ci95'][1]:.3f}]"

    alone = " / ".join(
        f"{hooks[v]['overhead_ms']:.1f} ({hooks[v]['overhead_pct_of_full_step']:.2f}%)" if v in hooks else "-"
        for v in ("steered", "recorded", "authors")
    )
    plain = full["plain"]
    steered = f"{full['steered']['median']:.2f}" if "steered" in full else "-"
    # absent in reports written before CPU time was recorded
    cpu = ratio("steered", r["stats"].get("full_cpu", {}))
    rate = flops.get((r["model"], str(r["size"])))
    rate = f"{rate / plain['median'] / 1e9:.3g}" if rate else "-"
    return (
        f"| {r['model']} | {r['size']}x{r['size']} | {r['rounds']} | {plain['median']:.2f} ({plain['iqr_pct']:.1f}%) | "
        f"{rate} | {steered} | **{ratio('steered')}** | {cpu} | {ratio('recorded')} | {ratio('authors')} | {alone} | "
        f"{r['peak_rss_bytes'] / 2**30:.1f} GiB |"
    )


def configuration_section(r: dict) -> list[str]:
    env = r["env"]
    lines = [
        "",
        f"### {r['model']}, latent {r['size']}x{r['size']}",
        "",
        f"{r['sites']} sites ({r['family']}), window {r['window']}, token grids {r['grids']}; built in "
        f"{r['build_s']:.0f} s, RSS {r['rss_model_bytes'] / 2**30:.1f} GiB after the build, peak "
        f"{r['peak_rss_bytes'] / 2**30:.1f} GiB; {r['rounds']} timed rounds ({r['timed_s']:.0f} s) after "
        f"{r['warmup_rounds']} warm-up round(s); load average {common.fmt_load(env['loadavg_start'])} at start, "
        f"{common.fmt_load(env['loadavg_end'])} at end; malloc: {env.get('allocator', 'system')}, "
        f"{r.get('minor_page_faults', 0):,} minor page faults in the process.",
        "",
        *STEP_TABLE,
        *common.stat_rows(r["stats"]["full"], 1),
        *(
            [
                "",
                "The same steps in process CPU time (the work, without waiting to be scheduled):",
                "",
                *STEP_TABLE,
                *common.stat_rows(r["stats"]["full_cpu"], 1),
            ]
            if "full_cpu" in r["stats"]
            else []
        ),
        "",
        f"Hooks alone ({r['hooks_only_repeats']} per variant and round):",
        "",
        "| variant | median ms | IQR ms (% of median) | overhead ms | overhead as % of a plain step |",
        "|---|---:|---:|---:|---:|",
    ]
    for variant, s in r["stats"]["hooks_only"].items():
        extra = (
            " | | |" if variant == "plain" else f" | {s['overhead_ms']:.2f} | {s['overhead_pct_of_full_step']:.3f}% |"
        )
        lines.append(f"| {variant} | {s['median'] * 1e3:.2f} | {s['iqr'] * 1e3:.2f} ({s['iqr_pct']:.1f}%)" + extra)
    variants = list(r["timings_s"]["full"])
    cpu = "full_cpu" in r["timings_s"]
    lines += [
        "",
        f"Step times (ms) per round{', wall / CPU' if cpu else ''}:",
        "",
        "| round | " + " | ".join(variants) + " |",
    ]
    lines.append("|---:|" + "---:|" * len(variants))
    for i in range(r["rounds"]):
        cells = [
            f"{r['timings_s']['full'][v][i] * 1e3:.0f}"
            + (f" / {r['timings_s']['full_cpu'][v][i] * 1e3:.0f}" if cpu else "")
            for v in variants
        ]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return lines


def markdown(architectures: list[dict], results: list[dict], command: str) -> str:
    lines = ["# UNet benchmark results", "", f"Command: `{command}`", ""]
    done = [r for r in results if "error" not in r]
    if done:
        env, first = done[0]["env"], done[0]
        where = (
            "All configurations ran in one process."
            if first["same_process"]
            else "Each configuration ran in its own process."
        )
        lines += [
            f"Date {env['date']}; torch {env['torch']}, diffusers {env['diffusers']}, medsteer {env['medsteer']}, "
            f"Python {env['python']}; CPU: {env['cpu']} ({env['cpu_count']} logical cores), torch threads "
            f"{env['torch_threads']}, malloc {env.get('allocator', 'system')}. Random-weight UNet2DConditionModel, "
            f"{env.get('dtype', 'float32')}, {env.get('gpu', env.get('device', 'cpu'))}; CFG batch [uncond, cond] "
            f"with {TEXT_TOKENS} text tokens; strength {first['strength']}; timesteps cycling through a "
            f"{first['schedule_steps']}-step DPM-Solver schedule. {where}",
            "",
        ]
    lines += ["| model | parameters | sites | family | widths | window (default) | first / last site |"]
    lines.append("|---|---:|---:|---|---|---|---|")
    for a in architectures:
        widths = "/".join(str(w) for w in sorted(set(a["widths"])))
        lines.append(
            f"| {a['model']} | {a['parameters']:,} | {a['sites']} | {a['family']} | {widths} | {a['window']} | "
            f"{a['names'][0]} / {a['names'][1]} |"
        )
    flops = {(a["model"], size): f for a in architectures for size, f in a["flops_per_step"].items()}
    lines += [
        "",
        "## Summary: seconds per denoising step (one UNet call on the CFG batch)",
        "",
        "| model | latent | rounds | plain s (IQR) | plain GFLOP/s | steered s | steered / plain [95% CI] | "
        "the same in process CPU time | recorded / plain | authors' style / plain | hooks alone, ms per step: steered / recorded / authors' "
        "(% of a plain step) | peak RSS |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
        *[summary_row(r, flops) for r in results],
    ]
    for r in done:
        lines += configuration_section(r)
    return "\n".join(lines) + "\n"
