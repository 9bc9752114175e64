"""The ``medsteer`` command line: pathology vectors and counterfactual pair datasets, headless.

Every command is a thin shell over the ``medsteer_core.headless`` wing (read it for the Python
API); ``cli_parser`` holds the flags. ``build-vector`` and ``generate`` scale out with ``torchrun
--nproc_per_node N -m medsteer_core.headless.cli ...`` (or ``accelerate launch``): seeds are sharded
over the processes and the result is byte-identical to one process.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from pathlib import Path

from ..errors import MedSteerError
from .cli_parser import build_parser

log = logging.getLogger("medsteer")


def _prompt_list(texts: list[str] | None, file: str | None) -> list[str]:
    prompts = list(texts or [])
    if file:
        try:
            lines = Path(file).read_text().splitlines()
        except OSError as exc:
            raise ValueError(f"cannot read prompt file {file!r}: {exc.strerror or exc}") from None
        prompts += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return prompts


def _seeds(args) -> list[int]:
    if args.seeds:
        try:
            return [int(s) for s in args.seeds.replace(" ", "").split(",") if s]
        except ValueError:
            raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    if args.num_seeds < 1:
        raise ValueError(f"--num-seeds must be at least 1, got {args.num_seeds}")
    return list(range(args.seed, args.seed + args.num_seeds))


def _per_vector(values: list | None, count: int, flag: str) -> list:
    if not values:
        return [None] * count
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise ValueError(
            f"{flag} was given {len(values)} times for {count} vectors: give it once, or once per --vector"
        )
    return values


def _steers(args):
    from .steer_options import Steer

    n = len(args.vector)
    strengths = _per_vector(args.strength, n, "--strength")
    starts = _per_vector(args.layer_start, n, "--layer-start")
    ends = _per_vector(args.layer_end, n, "--layer-end")
    windows = _per_vector(args.window, n, "--window")
    return [
        Steer(
            path,
            strength=strengths[i],
            layer_start=starts[i],
            layer_end=ends[i],
            window=windows[i],
            timestep_min=args.timestep_min,
            timestep_max=args.timestep_max,
            rows=args.rows,
            preserve_norm=args.preserve_norm,
            interpolation=args.interpolation,
        )
        for i, path in enumerate(args.vector)
    ]


def _load(args, shard=None):
    from .models import load_model

    return load_model(
        args.model,
        unet=args.unet,
        config=args.config,
        lora=args.lora,
        dtype=args.dtype,
        device=args.device,
        offload=args.offload,
        offline=True if args.offline else None,
        shard=shard,
        quiet=args.quiet,
    )


# ------------------------------------------------------------------------------------- commands
def _cmd_build_vector(args) -> int:
    from ..inspection import halves_paths
    from .distributed import Shard, check_device
    from .outputs import check_output_file
    from .vector_build import build_vector, check_new_seeds, load_built, merge_built, save_built

    prompts_with = _prompt_list(args.prompts_with, args.with_file)
    prompts_without = _prompt_list(args.prompts_without, args.without_file)
    if not prompts_with or not prompts_without:
        raise ValueError("build-vector needs prompts on both sides: --with/--with-file and --without/--without-file")
    out = args.out or args.merge
    if out is None:
        raise ValueError("build-vector needs --out (or --merge to add seeds to an existing vector)")
    seeds = _seeds(args)
    existing = None
    if args.merge:  # fail before sampling, not after
        existing = load_built(args.merge)
        check_new_seeds(existing.vector, seeds)
    check_device(args.device)
    check_output_file(out, "--out" if args.out else "--merge")
    if not args.no_halves:
        check_output_file(halves_paths(out)[0], "--out (its halves)")
    shard = Shard.from_environment()
    model = _load(args, shard)
    built = build_vector(
        model,
        prompts_with,
        prompts_without,
        seeds,
        concept_with=args.concept_with,
        concept_without=args.concept_without,
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        cfg=args.cfg,
        scheduler=args.scheduler,
        height=args.height,
        width=args.width,
        batch_size=args.batch_size,
        halves=not args.no_halves,
        shard=shard,
        progress=not args.quiet,
    )
    if existing is not None:
        built = merge_built(existing, built)
    if shard.main:
        path = save_built(built, out)
        v = built.vector
        log.info(
            "wrote %s: %r vs %r, %d timesteps x %d layers x %d, %d+%d images per timestep%s",
            path,
            v.concept_with,
            v.concept_without,
            v.num_timesteps,
            v.depth,
            v.hidden_size,
            int(v.count_with.max()),
            int(v.count_without.max()),
            "" if built.halves is None else " (+ halves for `medsteer inspect`)",
        )
    shard.barrier()
    return 0


def _cmd_generate(args) -> int:
    from .distributed import Shard, check_device
    from .outputs import lock_output_folder

    steers = _steers(args)
    prompts = _prompt_list(args.prompt, args.prompts_file)
    if not prompts:
        prompts = _vector_prompts(args.vector[0])
    seeds = _seeds(args)
    check_device(args.device)
    shard = Shard.from_environment()
    # Held from before the model loads to the manifest: a second run on this folder is refused at once.
    with lock_output_folder(args.out, shard):
        return _generate_locked(args, steers, prompts, seeds, shard)


def _generate_locked(args, steers, prompts, seeds, shard) -> int:
    from .dataset import generate

    model = _load(args, shard)
    report = generate(
        model,
        steers,
        prompts,
        seeds,
        args.out,
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        cfg=args.cfg,
        scheduler=args.scheduler,
        height=args.height,
        width=args.width,
        batch_size=args.batch_size,
        heatmaps=args.heatmaps,
        heatmap_steps=args.heatmap_steps,
        heatmap_layers=args.heatmap_layers,
        heatmap_plan=args.heatmap_plan,
        colormap=args.colormap,
        shard=shard,
        progress=not args.quiet,
    )
    if shard.main:
        log.info("%d pair(s) written, %d already done; manifest: %s", report.written, report.skipped, report.manifest)
    return 0


def _vector_prompts(path: str) -> list[str]:
    from ..vector_file import load_vector

    prompts = [p for p in load_vector(path).provenance.prompts_with if p.strip()]
    if not prompts:
        raise ValueError(f"no --prompt given and {path!r} records no prompts_with: pass --prompt")
    log.info("no --prompt given: using the vector's prompts with the concept: %s", prompts)
    return prompts


def _cmd_heatmap(args) -> int:
    from .distributed import check_device
    from .figures import gate_heatmap
    from .outputs import check_output_file

    steers = _steers(args)
    prompt = args.prompt or _vector_prompts(args.vector[0])[0]
    out = check_output_file(args.out)
    if args.save_images:
        for kind in ("unsteered", "steered"):
            check_output_file(out.with_name(f"{out.stem}-{kind}.png"), "--save-images")
    check_device(args.device)
    model = _load(args)
    result = gate_heatmap(
        model,
        steers,
        prompt,
        args.seed,
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        cfg=args.cfg,
        scheduler=args.scheduler,
        height=args.height,
        width=args.width,
        at_steps=args.at_steps,
        layers=args.layers,
        plan=args.plan,
        colormap=args.colormap,
        cell=args.cell,
        per_map=not args.global_scale,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    result.grid.save(out)
    log.info("wrote %s (layers %s at steps %s, seed %d)", out, result.layers, result.steps, args.seed)
    if args.save_images:
        for kind in ("unsteered", "steered"):
            path = out.with_name(f"{out.stem}-{kind}.png")
            getattr(result, kind).save(path)
            log.info("wrote %s", path)
    return 0


def _cmd_inspect(args) -> int:
    from ..inspection import format_sites, inspect_vector, site_table
    from ..vector_file import load_vector

    if args.vector is None and args.model is None:
        raise ValueError("inspect needs a vector file, or --model to list a model's sites (or both)")
    vector = load_vector(args.vector) if args.vector is not None else None
    sites = None
    if args.model is not None:
        model = _load(args)
        height, width = _inspect_size(args, vector, model)
        sites = site_table(model.sites, (height // model.latent_scale, width // model.latent_scale))
        sites = {"family": model.family, "image_size": [height, width], "sites": sites}
    if vector is None:
        print(json.dumps(sites, indent=1) if args.json else format_sites(sites))
        return 0
    halves = tuple(load_vector(p) for p in args.halves) if args.halves else None
    report = inspect_vector(args.vector, halves=halves, sites=sites)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_report(report))
    return 0


def _inspect_size(args, vector, model) -> tuple[int, int]:
    """The image size the sites' grids are given for: --height/--width, else the vector's, else the model's."""
    default_h, default_w = model.default_size
    if vector is not None:
        default_h = vector.provenance.height or default_h
        default_w = vector.provenance.width or default_w
    height, width = args.height or default_h, args.width or default_w
    model.spec(1, 1.0, height, width)  # the model's own size rule, with its message
    return int(height), int(width)


def format_report(report: dict) -> str:
    """The text ``medsteer inspect`` prints for an ``inspect_vector`` report."""
    from ..inspection import format_inspection

    return format_inspection(report)


def _cmd_demo(args) -> int:
    return _run_demo(list(args.demo_args))


def _run_demo(argv: list[str]) -> int:
    try:
        demo = importlib.import_module("medsteer_core.mini.demo")
    except ModuleNotFoundError as exc:
        if exc.name != "medsteer_core.mini.demo":
            raise
        print(
            "medsteer: the demo is not part of this installation (medsteer_core.mini.demo is missing); "
            "reinstall medsteer, or use build-vector / generate with --model",
            file=sys.stderr,
        )
        return 2
    return int(demo.main(argv) or 0)


def _setup_logging(quiet: bool, rank: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("medsteer: %(message)s"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.WARNING if quiet or rank != 0 else logging.INFO)


#: ``medsteer COMMAND`` -> what runs it (the flags are in ``cli_parser``).
_COMMANDS = {
    "build-vector": _cmd_build_vector,
    "generate": _cmd_generate,
    "heatmap": _cmd_heatmap,
    "inspect": _cmd_inspect,
    "demo": _cmd_demo,
}


def main(argv: list[str] | None = None) -> int:
    """Run the ``medsteer`` command line; returns the exit status (2 for a usage or input error)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"]:  # everything after `demo` belongs to the demo, options included
        return _run_demo(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.quiet, int(os.environ.get("RANK", "0")))
    try:
        return _COMMANDS[args.command](args)
    except (MedSteerError, ValueError) as exc:
        if os.environ.get("MEDSTEER_DEBUG"):
            raise
        print(f"medsteer {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file-system error the checks could not foresee: one line, not a traceback
        if os.environ.get("MEDSTEER_DEBUG"):
            raise
        where = f": {exc.filename}" if exc.filename else ""
        print(
            f"medsteer {args.command}: error: {exc.strerror or exc}{where} (rerun with MEDSTEER_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
    finally:
        if args.command in ("build-vector", "generate"):
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
