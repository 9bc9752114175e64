"""Speed of the MedSteer hooks on the full SD1.5 and SDXL UNets (random weights; float32 on the CPU
by default, ``--device cuda --dtype float16`` on a GPU).

For each model (``--models``) and latent side (``--sizes``) it times one denoising step, a
``UNet2DConditionModel`` call on the CFG batch ``[uncond, cond]``, with its hooks attached and
removed around the call as ``medsteer_core.driver.sample`` attaches them around a run, for:

- ``plain``     no hooks
- ``steered``   ``attach_steering`` on the UNet's default window (every site: 16 on SD1.5, 70 on
  SDXL), strength 2.5, a random vector with the model's ragged widths (320/640/1280)
- ``recorded``  the same plus a ``GateRecord`` (one sampling run per step)
- ``authors``   ``bench_common.AuthorsStyleSteering`` on the same window: the vector copied to the
  device and every activation pulled to the host at every site and call

interleaved round by round in one process (a rotated order, after an untimed warm-up round that
also checks the hooks: steering changes the output, recording does not, every site's gate is
recorded, no hook is left behind), until ``--budget`` seconds have passed; then each variant's
hooks alone (attached, run at every site on an activation of that site's shape with the attention
replaced by a pass-through, removed). Each configuration runs in a fresh subprocess, so its peak
resident set is its own. Method and statistics are ``bench_engine.py``'s (shared through ``bench_common.py``).

On a GPU every timed call is bracketed by ``torch.cuda.synchronize``; the process CPU time recorded
beside the wall time then measures the host's launch work only.

Run from the repository root: ``python benchmarks/bench_unet.py --help``; ``--tiny`` checks the
script in seconds on small UNets with the same site layout (16 / 70 sites).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path

import bench_common as common
import bench_unet_report as report
import torch

import medsteer_core as ms
from medsteer_core.hooks import CallInfo, attach_steering
from medsteer_core.provenance import Provenance, site_widths

VARIANTS = ("plain", "steered", "recorded", "authors")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: ``--allocator jemalloc``: preloaded into every configuration's process, never returning memory to
#: the system. glibc's malloc hands the UNet's large activations back to the kernel and faults them in
#: again (0.3-0.9 million page faults per SD1.5 64x64 step here, a quarter of its CPU time, varying from
#: step to step); that noise swamps a 1 % difference. jemalloc without decay keeps them, as a GPU's
#: caching allocator does: 0 page faults per step once warm.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2")
#: The issue's bar for ``steered / plain`` (paired median over rounds).
TARGET = 1.03
TEXT_TOKENS, CFG_SCALE = report.TEXT_TOKENS, 7.5  # CLIP's context length (77); the guidance scale

# The published UNet configs (config.json of runwayml/stable-diffusion-v1-5 and
# stabilityai/stable-diffusion-xl-base-1.0), every architectural key written out.
SD15 = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
    norm_num_groups=32,
    norm_eps=1e-5,
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    act_fn="silu",
    mid_block_scale_factor=1,
    center_input_sample=False,
)
SDXL = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # pooled text 1280 + 6 size ids x 256
    norm_num_groups=32,
    norm_eps=1e-5,
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    act_fn="silu",
    mid_block_scale_factor=1,
    center_input_sample=False,
)
#: ``--tiny``: the same block layout (so the same 16 / 70 sites and ragged widths), tiny channels.
TINY = {
    "sd15": SD15 | dict(block_out_channels=(16, 32, 48, 48), norm_num_groups=8, cross_attention_dim=24),
    "sdxl": SDXL
    | dict(
        block_out_channels=(16, 32, 48),
        attention_head_dim=(2, 4, 4),
        norm_num_groups=8,
        cross_attention_dim=24,
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8,
    ),
}


@dataclass(frozen=True)
class Architecture:
    """One benchmarked model: its config and what the meta-device check expects of it."""

    config: dict
    sites: int
    family: str
    parameters: int | None = None  # the released model's count (None: not checked)
    text_embeds: int | None = None  # width of the pooled text embedding (SDXL's added condition)


def architecture(model: str, tiny: bool) -> Architecture:
    if model not in ("sd15", "sdxl"):
        raise ValueError(f"unknown model {model!r}: use sd15 or sdxl")
    if tiny:
        return Architecture(
            TINY[model], 16 if model == "sd15" else 70, "sd-unet", None, 16 if model == "sdxl" else None
        )
    if model == "sd15":
        return Architecture(SD15, 16, "sd1", 859_520_964)
    return Architecture(SDXL, 70, "sdxl", 2_567_463_684, 1280)


def build_unet(model: str, tiny: bool, device: str = "cpu", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-weight ``UNet2DConditionModel`` (eval); ``device="meta"`` allocates nothing.

    The weights are drawn on the CPU in float32 (the same weights on every device), then moved."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device("meta" if device == "meta" else "cpu"):
        unet = UNet2DConditionModel(**architecture(model, tiny).config)
    if device != "meta":
        unet = unet.to(device=device, dtype=dtype)
    return unet.eval()


def check_architecture(model: str, tiny: bool, sizes: list[int]) -> dict:
    """Build on the meta device (nothing allocated): parameter count, sites, family and widths,
    checked, and the floating-point operations of one CFG step at each latent size."""
    arch = architecture(model, tiny)
    unet = build_unet(model, tiny, device="meta")
    sites = ms.find_sites(unet)
    info = {
        "model": model,
        "parameters": sum(p.numel() for p in unet.parameters()),
        "sites": sites.depth,
        "family": sites.family,
        "widths": list(site_widths(sites)),
        "names": [sites.names[0], sites.names[-1]],
        "window": list(sites.default_window),
    }
    problems = []
    if info["sites"] != arch.sites:
        problems.append(f"{info['sites']} sites, expected {arch.sites}")
    if info["family"] != arch.family:
        problems.append(f"family {info['family']!r}, expected {arch.family!r}")
    if arch.parameters is not None and info["parameters"] != arch.parameters:
        problems.append(f"{info['parameters']:,} parameters, the released model has {arch.parameters:,}")
    if problems:
        raise SystemExit(f"{model}: the architecture written in this script is wrong: " + "; ".join(problems))
    info["flops_per_step"] = {str(size): step_flops(unet, arch, size) for size in sizes}
    return info


def ragged_vector(timesteps: torch.Tensor, sites, seed: int = 1) -> ms.PathologyVector:
    """A vector of random directions keyed at ``timesteps``, zero beyond each site's width, built
    with the engine's ``PathologyVector.from_sums`` (what ``VectorEstimator`` produces)."""
    widths = site_widths(sites)
    inside = (torch.arange(max(widths))[None, :] < torch.tensor(widths)[:, None]).double()  # [L, D]
    g = torch.Generator().manual_seed(seed)
    k = timesteps.numel()
    sums = [torch.randn(k, *inside.shape, generator=g, dtype=torch.float64) * inside for _ in range(2)]
    ones = torch.ones(k, dtype=torch.int64)
    provenance = Provenance(concept_with="benchmark", concept_without="random", model_family=sites.family)
    return ms.PathologyVector.from_sums(timesteps.double(), *sums, ones, ones, provenance, widths=widths)


def step_inputs(unet, arch: Architecture, size: int, generator: torch.Generator | None = None):
    """``(latents, context, added_cond_kwargs)`` of one CFG step: rows ``[uncond, cond]`` (one latent
    twice), 77 text tokens, and SDXL's pooled text embedding and six size / crop ids."""
    g = {"generator": generator} if generator is not None else {}
    latents = torch.randn(1, 4, size, size, **g).expand(2, -1, -1, -1).contiguous()
    context = torch.randn(2, TEXT_TOKENS, unet.config.cross_attention_dim, **g)
    added = {}
    if arch.text_embeds is not None:
        ids = torch.tensor([8.0 * size, 8.0 * size, 0.0, 0.0, 8.0 * size, 8.0 * size])
        added = {"text_embeds": torch.randn(2, arch.text_embeds, **g), "time_ids": ids.expand(2, 6)}
    return latents, context, added


def step_flops(unet, arch: Architecture, size: int) -> int:
    """Floating-point operations of one CFG step, counted on the meta device (no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"), torch.no_grad(), FlopCounterMode(display=False) as counter:
        latents, context, added = step_inputs(unet, arch, size)
        unet(latents, torch.full((2,), 500), encoder_hidden_states=context, added_cond_kwargs=added)
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------------ one configuration
class StepBench:
    """One model at one latent size: the inputs, the plan, the baseline, and the timed calls."""

    def __init__(self, unet, model: str, size: int, args) -> None:
        from diffusers import DPMSolverMultistepScheduler

        self.unet, self.size, self.args = unet, size, args
        self.sites = sites = ms.find_sites(unet)
        widths = site_widths(sites)
        scheduler = DPMSolverMultistepScheduler()
        scheduler.set_timesteps(args.steps)
        self.schedule = scheduler.timesteps
        self.window = sites.default_window
        vector = ragged_vector(self.schedule.double(), sites)
        self.plan = ms.SteeringPlan(
            vector, strength=args.strength, layer_start=self.window[0], layer_end=self.window[1]
        )
        self.authors = common.AuthorsStyleSteering(unet, [], args.strength, range(*self.window))
        # The baseline keys one [L, D] host vector per step; a UNet's sites are narrower than D,
        # so each step holds one row per site at that site's width (the copy per call unchanged).
        self.authors.step_vectors = [
            [row[:w].clone() for row, w in zip(vector.at(float(t)), widths, strict=True)] for t in self.schedule
        ]
        self.record = ms.GateRecord()
        g = torch.Generator().manual_seed(0)
        inputs = step_inputs(unet, architecture(model, args.tiny), size, g)
        self.latents, self.context = (x.to(args.device, DTYPES[args.dtype]) for x in inputs[:2])
        self.added = {k: v.to(args.device, DTYPES[args.dtype]) for k, v in inputs[2].items()}
        shapes = {}  # one CA-output-shaped activation [2, tokens, width] per level, shared by its sites
        for (rows, columns), width in zip(self.grids(), widths, strict=True):
            h = torch.randn(2, rows * columns, width, generator=g)
            shapes.setdefault((rows * columns, width), h.to(args.device, DTYPES[args.dtype]))
        self.site_inputs = [shapes[(r * c, w)] for (r, c), w in zip(self.grids(), widths, strict=True)]

    def sync(self) -> None:
        """Wait for the device's queued work (CUDA runs asynchronously; the CPU needs nothing)."""
        if self.latents.device.type == "cuda":
            torch.cuda.synchronize(self.latents.device)

    def grids(self) -> list[tuple[int, int]]:
        return [self.sites.token_grid(i, (self.size, self.size)) for i in range(self.sites.depth)]

    def driver_hooks(self, variant: str, step: int) -> ExitStack:
        """The variant's hooks as ``driver.sample`` attaches them (read from the call's own
        arguments, rows ``[uncond, cond]``), here around one call: one sampling run per step."""
        stack = ExitStack()
        if variant in ("steered", "recorded"):
            record = None
            if variant == "recorded":
                record = self.record = ms.GateRecord()
            stack.callback(attach_steering(self.unet, [self.plan], layout="uncond_cond", record=record).remove)
            if record is not None:
                record.begin_run()
                stack.callback(record.end_run)
        elif variant == "authors":
            self.authors.calls = step  # its pre-hook counts this call
            stack.enter_context(self.authors.attached([1]))
        return stack

    @torch.no_grad()
    def full_step(self, variant: str, step: int) -> tuple[float, float, torch.Tensor]:
        """``(wall seconds, process CPU seconds, guided output)`` of one step. With one thread the
        CPU time is the work itself, without the time the process waited to be scheduled."""
        t = self.schedule[step].to(self.args.device)
        self.sync()
        start, cpu = time.perf_counter(), time.process_time()
        with self.driver_hooks(variant, step):
            out = self.unet(
                self.latents,
                t.reshape(1).expand(2),
                encoder_hidden_states=self.context,
                added_cond_kwargs=self.added,
                return_dict=False,
            )[0].float()
        uncond, cond = out.chunk(2)
        guided = uncond + CFG_SCALE * (cond - uncond)
        self.sync()
        return time.perf_counter() - start, time.process_time() - cpu, guided.cpu()

    @torch.no_grad()
    def hooks_only(self, variant: str, step: int) -> float:
        """Attach, run at every site (attention replaced by a pass-through), detach."""
        t = self.schedule[step].to(self.args.device)
        self.sync()
        start = time.perf_counter()
        call = CallInfo(t.reshape(1).expand(2), (False, True), latent_size=(self.size, self.size))
        if variant in ("steered", "recorded"):
            record = ms.GateRecord() if variant == "recorded" else None
            context = ms.steering(self.unet, self.plan, call_info=call, record=record)
        elif variant == "authors":
            self.authors.calls = step + 1  # no UNet call here to count
            context = self.authors.attached([1])
        else:
            context = nullcontext()
        with context:
            for module, h in zip(self.sites.modules, self.site_inputs, strict=True):
                module(h)
        self.sync()
        return time.perf_counter() - start

    def check(self, outputs: dict[str, torch.Tensor]) -> None:
        """The warm-up round's outputs prove the hooks act (and leave nothing behind)."""
        problems = []
        if "steered" in outputs and torch.equal(outputs["steered"], outputs["plain"]):
            problems.append("steering did not change the output")
        if "authors" in outputs and torch.equal(outputs["authors"], outputs["plain"]):
            problems.append("the authors'-style baseline did not change the output")
        if "recorded" in outputs:
            if not torch.equal(outputs["recorded"], outputs["steered"]):
                problems.append("recording gates changed the steered output")
            recorded = sorted({e.site for e in self.record.entries})
            if recorded != list(range(*self.window)):
                problems.append(f"gates recorded at {len(recorded)} sites, the window has {self.window}")
        left = [i for i, m in enumerate(self.sites.modules) if "forward" in m.__dict__ or m._forward_hooks]
        if left or self.unet._forward_pre_hooks:
            problems.append(f"hooks left on sites {left[:5]} / the UNet after removal")
        if problems:
            raise SystemExit("benchmark invalid: " + "; ".join(problems))


def run_round(bench: StepBench, r: int, timings: dict | None) -> None:
    variants = bench.args.variants
    order = variants[r % len(variants) :] + variants[: r % len(variants)]
    step = r % len(bench.schedule)
    outputs = {}
    for variant in order:
        seconds, cpu_seconds, outputs[variant] = bench.full_step(variant, step)
        if timings is not None:
            timings["full"][variant].append(seconds)
            timings["full_cpu"][variant].append(cpu_seconds)
    if timings is None:
        bench.check(outputs)
    with common.pass_through(bench.sites.modules):
        for _ in range(bench.args.hook_repeats):
            for variant in order:
                seconds = bench.hooks_only(variant, step)
                if timings is not None:
                    timings["hooks_only"][variant].append(seconds)


def bench_configuration(model: str, size: int, args) -> dict:
    """Build, warm up (and check), time rounds until the budget is spent; one configuration."""
    torch.set_num_threads(args.threads)
    env = common.environment(torch.get_num_threads())
    env["allocator"] = "jemalloc" if "jemalloc" in os.environ.get("LD_PRELOAD", "") else "system"
    from diffusers import UNet2DConditionModel  # noqa: F401  (the import is not part of the build time)

    start = time.perf_counter()
    unet = build_unet(model, args.tiny, args.device, dtype=DTYPES[args.dtype])
    if args.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    env["device"], env["dtype"] = args.device, args.dtype
    build_s = time.perf_counter() - start
    rss_model = common.rss_bytes()
    bench = StepBench(unet, model, size, args)
    label = f"{model} {size}x{size}"
    common.log(f"{label}: built in {build_s:.1f} s, {bench.sites.depth} sites, window {bench.window}")
    for r in range(args.warmup):
        run_round(bench, r, None)
    timings = {part: {v: [] for v in args.variants} for part in ("full", "full_cpu", "hooks_only")}
    start, rounds = time.perf_counter(), 0
    while rounds < args.max_rounds:
        run_round(bench, args.warmup + rounds, timings)
        rounds += 1
        elapsed = time.perf_counter() - start
        plain = statistics.median(timings["full"]["plain"])
        common.log(f"{label}: round {rounds}, {elapsed:.0f} s elapsed, plain step median {plain:.2f} s")
        if elapsed >= args.budget and rounds >= args.min_rounds:
            break
    env["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result = {
        "model": model,
        "size": size,
        "tiny": args.tiny,
        "same_process": args.same_process and not args.run_one,
        "env": env,
        "build_s": build_s,
        "sites": bench.sites.depth,
        "family": bench.sites.family,
        "window": list(bench.window),
        "grids": [list(g) for g in dict.fromkeys(bench.grids())],
        "strength": args.strength,
        "schedule_steps": args.steps,
        "warmup_rounds": args.warmup,
        "hooks_only_repeats": args.hook_repeats,
        "rounds": rounds,
        "timed_s": time.perf_counter() - start,
        "rss_model_bytes": rss_model,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "minor_page_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt,
        "timings_s": timings,
    }
    result["stats"] = report.statistics_of(timings)
    return result


# ------------------------------------------------------------------------------------ all of them
def forwarded(args) -> list[str]:
    """The options a configuration's subprocess needs."""
    options = ["--threads", str(args.threads), "--budget", str(args.budget), "--warmup", str(args.warmup)]
    options += ["--min-rounds", str(args.min_rounds), "--max-rounds", str(args.max_rounds)]
    options += ["--hook-repeats", str(args.hook_repeats), "--steps", str(args.steps), "--strength", str(args.strength)]
    options += ["--variants", ",".join(args.variants)] + (["--tiny"] if args.tiny else [])
    options += ["--device", args.device, "--dtype", args.dtype]
    return options


def run_all(args) -> list[dict]:
    results = []
    for model in args.models:
        for size in args.sizes:
            if args.same_process:
                results.append(bench_configuration(model, size, args))
                continue
            command = [sys.executable, __file__, "--run-one", model, str(size), *forwarded(args)]
            done = subprocess.run(command, stdout=subprocess.PIPE, text=True)  # progress goes to stderr
            lines = done.stdout.strip().splitlines()
            if done.returncode != 0 or not lines:
                common.log(f"{model} {size}x{size}: FAILED (exit status {done.returncode})")
                results.append({"model": model, "size": size, "error": f"exit status {done.returncode}"})
                continue
            results.append(json.loads(lines[-1]))
    return results


# -------------------------------------------------------------------------------------------- main
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--models", default="sd15,sdxl", help="comma-separated: sd15, sdxl (default both)")
    add("--sizes", help="comma-separated latent sides, multiples of 8 (default 64,128; with --tiny 8,16)")
    add("--budget", type=float, help="seconds of timed rounds per configuration (default 600; with --tiny 1)")
    add("--threads", type=int, help="torch.set_num_threads (default 2; with --tiny 1)")
    add("--variants", default=",".join(VARIANTS), help=f"comma-separated, plain first (default {','.join(VARIANTS)})")
    add("--min-rounds", type=int, help="timed rounds at least, even past the budget (default 3; with --tiny 2)")
    add("--max-rounds", type=int, default=1000)
    add("--warmup", type=int, default=1, help="untimed rounds first; they also check the hooks (default 1)")
    add("--hook-repeats", type=int, help="hooks-alone timings per variant and round (default 10; with --tiny 3)")
    add("--steps", type=int, default=20, help="schedule length the timesteps cycle through (default 20)")
    add("--strength", type=float, default=2.5)
    add(
        "--allocator",
        choices=("system", "jemalloc"),
        default="system",
        help="malloc of each configuration's process: system (glibc) or jemalloc, preloaded, keeping freed "
        "memory (apt-get install libjemalloc2); steadier step times, see JEMALLOC_CONF (default system)",
    )
    add("--device", default="cpu", help="where the UNet runs: cpu, cuda or cuda:N (timed with torch.cuda.synchronize)")
    add("--dtype", choices=tuple(DTYPES), default="float32", help="the UNet's and the inputs' dtype (default float32)")
    add("--tiny", action="store_true", help="small UNets with the same 16 / 70 sites: checks the script in seconds")
    add("--same-process", action="store_true", help="every configuration in this process (default with --tiny)")
    add("--dry-run", action="store_true", help="only the meta-device check: parameters, sites, FLOP per step")
    add("--gflops", type=float, help="with --dry-run: this machine's throughput, to estimate the run's duration")
    add("--json", type=Path, help="write all results here")
    add("--markdown", type=Path, help="write the Markdown report here")
    add("--run-one", nargs=2, metavar=("MODEL", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    for model in args.models:
        architecture(model, args.tiny)  # a clear error for an unknown name
    args.sizes = [int(s) for s in (args.sizes or ("8,16" if args.tiny else "64,128")).split(",")]
    if any(s < 8 or s % 8 for s in args.sizes):
        parser.error(f"--sizes {args.sizes}: every latent side must be a positive multiple of 8 (e.g. 64,128)")
    args.variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    if args.variants[:1] != ("plain",) or not set(args.variants) <= set(VARIANTS):
        parser.error(f"--variants {','.join(args.variants)}: start with plain, then any of {', '.join(VARIANTS[1:])}")
    if "recorded" in args.variants and "steered" not in args.variants:
        parser.error("--variants: recorded is checked against steered; include both")
    for name, full, tiny in (("budget", 600.0, 1.0), ("threads", 2, 1), ("min_rounds", 3, 2), ("hook_repeats", 10, 3)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    args.same_process = args.same_process or args.tiny
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device; use --device cpu")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        parser.error(f"--device {args.device}: use cpu, cuda or cuda:N")
    if args.allocator == "jemalloc":
        if args.same_process:
            parser.error("--allocator jemalloc preloads it into each configuration's own process: drop --same-process")
        if jemalloc_library() is None:
            parser.error(
                f"--allocator jemalloc: none of {', '.join(JEMALLOC_PATHS)} exists (apt-get install libjemalloc2)"
            )
    return args


def jemalloc_library() -> str | None:
    """The first of ``JEMALLOC_PATHS`` on this machine, if any."""
    return next((p for p in JEMALLOC_PATHS if Path(p).exists()), None)


def use_allocator(args) -> None:
    """Make the configurations' subprocesses (which inherit the environment) use ``--allocator``."""
    if args.allocator == "jemalloc":
        os.environ["LD_PRELOAD"] = jemalloc_library()
        os.environ["MALLOC_CONF"] = JEMALLOC_CONF


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.run_one:
        print(json.dumps(bench_configuration(args.run_one[0], int(args.run_one[1]), args)))
        return 0
    command = "python benchmarks/bench_unet.py " + " ".join(sys.argv[1:] if argv is None else argv)
    architectures = [check_architecture(model, args.tiny, args.sizes) for model in args.models]
    for a in architectures:
        common.log(
            f"{a['model']}: {a['parameters']:,} parameters, {a['sites']} sites ({a['family']}), window {a['window']}"
        )
    if args.dry_run:
        print(report.dry_run(architectures, args))
        return 0
    use_allocator(args)
    results = run_all(args)
    text = report.markdown(architectures, results, command)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"command": command, "architectures": architectures, "configurations": results}
        args.json.write_text(json.dumps(payload, indent=1))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    problems = [f"{r['model']} {r['size']}: {r['error']}" for r in results if "error" in r]
    for r in results:
        if "error" not in r and not args.tiny and "steered" in r["stats"]["full"]:
            ratio = r["stats"]["full"]["steered"]["paired_ratio"]["median"]
            if ratio > TARGET:
                problems.append(f"{r['model']} {r['size']}: steered/plain = {ratio:.3f} > {TARGET}")
    for problem in problems:
        common.log(f"PROBLEM: {problem}")
    if args.tiny and not problems:
        common.log(
            "self-check passed: sites, parameters, hooks acting and removed, report, on both layouts and every size"
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
