"""Where the hooks spend their time: torch.profiler over the hooks-only loop of bench_engine.py.

For each variant (steered, recorded, capture, and the authors'-style baseline) the hooks are
attached, run at all 28 sites of the PixArt-XL-2 transformer on a ``[2, 256, 1152]`` activation
(the cross-attention output of a 32x32 latent with CFG) with the attention itself replaced by a
pass-through, and removed, ``--repeats`` times under the profiler; the top operators by self CPU
time are printed, with the wall time per step.

Run from the repository root: ``python benchmarks/profile_hooks.py --threads 2``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext

import bench_common as common
import torch
from torch.profiler import ProfilerActivity, profile

import medsteer_core as ms
from medsteer_core.hooks import CallInfo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rows", type=int, default=15, help="operators shown per variant")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    geometry = common.TINY if args.tiny else common.Geometry()
    model = common.build_transformer(geometry)
    sites = ms.find_sites(model)
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler()
    scheduler.set_timesteps(20)
    schedule = scheduler.timesteps
    vector = common.random_vector(schedule.double(), sites.depth, sites.hidden_size)
    window = (8, 16) if sites.depth >= 16 else (1, 2)
    plan = ms.SteeringPlan(vector, strength=2.5, layer_start=window[0], layer_end=window[1])
    estimator = ms.VectorEstimator.for_model(model)
    step_vectors = [vector.at(float(t)) for t in schedule]
    authors = common.AuthorsStyleSteering(model, step_vectors, 2.5, range(*window))
    h = torch.randn(2, 256, sites.hidden_size)
    t_rows = schedule[5].reshape(1).expand(2)
    call = CallInfo(t_rows, (False, True), (16, 16))

    def contexts(variant: str):
        if variant == "plain":
            return nullcontext()
        if variant == "steered":
            return ms.steering(model, plan, call_info=call)
        if variant == "recorded":
            return ms.steering(model, plan, call_info=call, record=ms.GateRecord())
        if variant == "capture":
            return ms.capture(model, estimator, "with", call_info=call)
        authors.calls = 6
        return authors.attached([1])

    @torch.no_grad()
    def once(variant: str) -> float:
        start = time.perf_counter()
        with contexts(variant):
            for module in sites.modules:
                module(h)
        return time.perf_counter() - start

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, activation {list(h.shape)}")
    with common.pass_through(sites.modules):
        for variant in ("plain", "steered", "recorded", "capture", "authors_window"):
            for _ in range(3):
                once(variant)
            wall = [once(variant) for _ in range(args.repeats)]
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.repeats):
                    once(variant)
            print(f"\n=== {variant}: median {statistics.median(wall) * 1e3:.2f} ms per step (unprofiled)")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
