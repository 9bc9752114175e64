"""Steering a ``torch.compile``d PixArt: correctness, graph counts and speed (issue 12).

One process, one random-weight diffusers ``PixArtTransformer2DModel`` (float32, CPU), four
variants of one denoising call on the CFG batch ``[uncond, cond]``, interleaved round by round
(the starting variant rotates):

- ``eager_plain`` / ``eager_steered``: the model as built, with ``steering(...)`` around the
  steered call (attached and removed per call, as ComfyUI's wrapper does).
- ``compiled_plain`` / ``compiled_steered``: the same through ``torch.compile(model)``; the
  compiled model runs unsteered first (the order in which hooks used to be ignored).

Before timing it reports the graphs the backend was handed (plain, then the first steered call),
and the largest difference between compiled and eager outputs; after timing, how many graphs were
compiled during the timed rounds (0 means no recompilation per step). The ratios are medians over
rounds of the per-round ratio (both calls ran seconds apart). Exits 1 if the compiled steered
output is not within ``--tolerance`` of eager steering or anything recompiled while timing.

Run from the repository root, e.g. ``python benchmarks/bench_compile.py --rounds 30``;
``--tiny`` checks the script in seconds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._dynamo
from bench_common import Geometry, build_transformer, random_vector

import medsteer_core as ms

VARIANTS = ("eager_plain", "eager_steered", "compiled_plain", "compiled_steered")


class CountingBackend:
    """Hands each graph to a dynamo backend (by name) and counts them."""

    def __init__(self, name: str) -> None:
        self.backend = torch._dynamo.lookup_backend(name)
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return self.backend(graph_module, example_inputs)


def make_inputs(geometry: Geometry, size: int, tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(2, 4, size, size, generator=g),
        "encoder_hidden_states": torch.randn(2, tokens, geometry.caption_channels, generator=g),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        "return_dict": False,
    }


def one_call(model, hooked, plan, inputs, t: float) -> torch.Tensor:
    timestep = torch.tensor([t, t])
    with torch.no_grad():
        if plan is None:
            return model(timestep=timestep, **inputs)[0]
        with ms.steering(hooked, plan, layout="uncond_cond"):
            return model(timestep=timestep, **inputs)[0]


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q[0], statistics.median(values), q[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--caption-channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=16, help="latent side (default 16)")
    parser.add_argument("--tokens", type=int, default=20, help="caption tokens (default 20)")
    parser.add_argument("--backend", default="inductor", help="dynamo backend (default inductor)")
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds (default 30)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--strength", type=float, default=2.5)
    parser.add_argument("--tolerance", type=float, default=1e-3, help="max |compiled - eager| allowed")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer toy model, 3 rounds, dynamo's eager backend")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--markdown", type=Path, help="write a Markdown report here")
    args = parser.parse_args(argv)
    if args.tiny:
        args.layers, args.heads, args.head_dim, args.caption_channels = 2, 2, 8, 32
        args.size, args.tokens, args.rounds, args.backend = 8, 6, 3, "eager"
    torch.set_num_threads(args.threads)
    geometry = Geometry(
        num_layers=args.layers,
        num_attention_heads=args.heads,
        attention_head_dim=args.head_dim,
        caption_channels=args.caption_channels,
        sample_size=args.size,
    )
    model = build_transformer(geometry)
    vector = random_vector(torch.linspace(0, 999, 20).round(), args.layers, geometry.hidden_size)
    start = args.layers // 4
    inputs = make_inputs(geometry, args.size, args.tokens)
    # A random direction can be anti-aligned with every token of a random model (all gates 0: the
    # plan would measure overhead only). Take the sign that steers, and refuse to report otherwise.
    for candidate in (vector, -vector):
        plan = ms.SteeringPlan(candidate, args.strength, start, max(start + 1, args.layers - start))
        if (one_call(model, model, plan, inputs, 500.0) - one_call(model, model, None, inputs, 500.0)).abs().max() > 0:
            break
    else:
        raise SystemExit("neither the random vector nor its negative changes this model's output: try --seed")

    torch._dynamo.reset()
    backend = CountingBackend(args.backend)
    compiled = torch.compile(model, backend=backend)
    began = time.perf_counter()
    compiled_plain = one_call(compiled, model, None, inputs, 500.0)
    plain_graphs, plain_seconds = backend.graphs, time.perf_counter() - began
    began = time.perf_counter()
    compiled_steered = one_call(compiled, model, plan, inputs, 500.0)
    steered_graphs, steered_seconds = backend.graphs - plain_graphs, time.perf_counter() - began
    eager_plain = one_call(model, model, None, inputs, 500.0)
    eager_steered = one_call(model, model, plan, inputs, 500.0)
    checks = {
        "plain_graphs": plain_graphs,
        "steered_extra_graphs": steered_graphs,
        "first_plain_call_seconds": plain_seconds,
        "first_steered_call_seconds": steered_seconds,
        "steering_effect_eager": float((eager_steered - eager_plain).abs().max()),
        "steering_effect_compiled": float((compiled_steered - compiled_plain).abs().max()),
        "max_abs_diff_steered_compiled_vs_eager": float((compiled_steered - eager_steered).abs().max()),
        "max_abs_diff_plain_compiled_vs_eager": float((compiled_plain - eager_plain).abs().max()),
    }

    runs = {
        "eager_plain": lambda t: one_call(model, model, None, inputs, t),
        "eager_steered": lambda t: one_call(model, model, plan, inputs, t),
        "compiled_plain": lambda t: one_call(compiled, model, None, inputs, t),
        "compiled_steered": lambda t: one_call(compiled, model, plan, inputs, t),
    }
    for name in VARIANTS:  # warm-up: one untimed call each
        runs[name](450.0)
    graphs_before = backend.graphs
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(args.rounds):
        t = 999.0 - r * (998.0 / max(args.rounds - 1, 1))  # a new timestep every round, as in sampling
        for name in VARIANTS[r % 4 :] + VARIANTS[: r % 4]:
            began = time.perf_counter()
            runs[name](t)
            times[name].append(time.perf_counter() - began)
    checks["graphs_compiled_while_timing"] = backend.graphs - graphs_before

    ratios = {
        "eager steered/plain": [s / p for s, p in zip(times["eager_steered"], times["eager_plain"], strict=True)],
        "compiled steered/plain": [
            s / p for s, p in zip(times["compiled_steered"], times["compiled_plain"], strict=True)
        ],
        "plain compiled/eager": [c / e for c, e in zip(times["compiled_plain"], times["eager_plain"], strict=True)],
        "steered compiled/eager": [
            c / e for c, e in zip(times["compiled_steered"], times["eager_steered"], strict=True)
        ],
    }
    lines = [
        f"# torch.compile and steering ({datetime.date.today()}, torch {torch.__version__}, "
        f"{platform.machine()}, {args.threads} threads, backend {args.backend})",
        "",
        f"Model: {args.layers} layers, hidden {geometry.hidden_size}, {args.size}x{args.size} latent, "
        f"{args.tokens} caption tokens, CFG batch 2; plan layers {plan.layer_start}-{plan.layer_end}, "
        f"strength {args.strength}; {args.rounds} rounds.",
        "",
        "| check | value |",
        "|---|---|",
        *(f"| {k} | {v:.3g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in checks.items()),
        "",
        "| variant | median ms | IQR ms |",
        "|---|---|---|",
    ]
    for name in VARIANTS:
        q1, med, q3 = quartiles(times[name])
        lines.append(f"| {name} | {med * 1e3:.2f} | {q1 * 1e3:.2f}-{q3 * 1e3:.2f} |")
    lines += ["", "| paired ratio | median | IQR |", "|---|---|---|"]
    for name, values in ratios.items():
        q1, med, q3 = quartiles(values)
        lines.append(f"| {name} | {med:.3f} | {q1:.3f}-{q3:.3f} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.markdown:
        args.markdown.write_text(report)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": vars(args) | {"json": None, "markdown": None},
                    "checks": checks,
                    "times": times,
                    "ratios": ratios,
                },
                indent=1,
                default=str,
            )
        )
    ok = (
        checks["steering_effect_eager"] > 0
        and checks["steering_effect_compiled"] > 0
        and checks["max_abs_diff_steered_compiled_vs_eager"] <= args.tolerance
        and checks["graphs_compiled_while_timing"] == 0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
