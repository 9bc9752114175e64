"""The ``medsteer`` argument parser: every command's flags, with examples in its help (a declarative
table; ``cli`` runs the commands).
"""

from __future__ import annotations

import argparse
import logging
import textwrap

from ..gate_drawing import COLORMAPS

log = logging.getLogger("medsteer")

PAPER_MODEL = "PixArt-alpha/PixArt-XL-2-512x512"

DESCRIPTION = """\
MedSteer: counterfactual image pairs from a frozen text-to-image model by steering its cross-attention.

Build a pathology vector from prompts with and without a concept, then generate pairs: the same
seed sampled unsteered and steered, which differ only in the concept. Without --model the shipped
MedSteer-mini model is used (when installed); pass a diffusers PixArt-alpha / PixArt-Sigma folder or
hub id (and the authors' LoRA folder with --lora), a Stable Diffusion 1.x / 2.x / XL folder (a bare
UNet over it with --unet), or a single-file SD checkpoint with --config, for real images."""

EXAMPLES = f"""\
examples (the paper's dye-removal setting: 50 seeds, 20 steps, layers 8-16, strength 2.5):
  medsteer build-vector --model {PAPER_MODEL} --lora medsteer_lora \\
      --with "An endoscopic image of dyed lifted polyps" --without "An endoscopic image of polyps" \\
      --num-seeds 50 --out vectors/dye.safetensors
  medsteer generate --model {PAPER_MODEL} --lora medsteer_lora --vector vectors/dye.safetensors \\
      --prompt "An endoscopic image of dyed lifted polyps" --seed 1000 --num-seeds 500 --out pairs/dye
  medsteer heatmap --model {PAPER_MODEL} --lora medsteer_lora --vector vectors/dye.safetensors \\
      --seed 1000 --out fig3.png
  medsteer inspect vectors/dye.safetensors
  torchrun --nproc_per_node 4 -m medsteer_core.headless.cli generate ...   (same files as one process)

run `medsteer COMMAND --help` for every option of a command."""


# ------------------------------------------------------------------------------------- options
def _model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=None,
        help=f"diffusers PixArt-alpha/Sigma or Stable Diffusion 1.x/2.x/XL pipeline folder or hub id (e.g. "
        f"{PAPER_MODEL}; local folders and cached hub ids load offline), a single-file SD checkpoint "
        "(.safetensors/.ckpt, with --config), or a MedSteer-mini .safetensors file. Default: the shipped MedSteer-mini",
    )
    group.add_argument(
        "--unet",
        default=None,
        help="a bare diffusers UNet folder (config.json + diffusion_pytorch_model.safetensors) replacing the UNet "
        "of the SD pipeline given with --model, e.g. MINIM's unets/<id>/unet over Stable Diffusion 1.4",
    )
    group.add_argument(
        "--config",
        default=None,
        help="for a single-file SD checkpoint: a local diffusers pipeline folder of the same architecture (SD 1.x, "
        "2.x or XL) whose component configs and tokenizer files are read; nothing is downloaded",
    )
    group.add_argument(
        "--lora",
        default=None,
        help="the authors' LoRA folder: transformer_lora/ and/or text_encoder_lora/ (PEFT adapters, applied "
        "with scale lora_alpha/r and merged)",
    )
    group.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "fp16", "bf16"],
        help="weights dtype (auto: fp16 on CUDA, else fp32)",
    )
    group.add_argument(
        "--device", default="auto", help="cuda, cuda:1, cpu, ... (auto: CUDA if available; torchrun: cuda:LOCAL_RANK)"
    )
    group.add_argument(
        "--offload",
        action="store_true",
        help="keep components on the CPU and move each to the GPU only while it runs (needs accelerate); for "
        "GPUs that cannot hold T5-XXL next to the transformer",
    )
    group.add_argument(
        "--offline", action="store_true", help="never contact the Hugging Face hub (also: HF_HUB_OFFLINE=1)"
    )


def _index_list(what: str, words: tuple[str, ...] = ("all",)):
    """An argparse type that checks a step or layer list before anything loads (exit 2 if bad). A
    layer list with site names (``"middle 0,output 3"``) is checked once the model is loaded."""

    def check(text: str) -> str:
        from ..gates import check_index_list

        if what == "layer" and any(c.isalpha() for c in text) and text.strip().lower() not in words:
            return text
        try:
            check_index_list(text, what, words)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    return check


def _sampling_options(parser: argparse.ArgumentParser, num_seeds: int) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    group.add_argument(
        "--num-seeds", type=int, default=num_seeds, help=f"number of consecutive seeds (default {num_seeds})"
    )
    group.add_argument(
        "--seeds", default=None, help="explicit comma-separated seeds, e.g. 3,17,42 (overrides --seed/--num-seeds)"
    )
    group.add_argument("--steps", type=int, default=20, help="denoising steps (default 20, the paper's)")
    group.add_argument(
        "--cfg", type=float, default=None, help="classifier-free guidance scale (default: the model's, 4.5 for PixArt)"
    )
    group.add_argument(
        "--scheduler",
        default="default",
        choices=["default", "dpm-solver", "ddim", "euler", "unipc"],
        help="sampler (default: the one saved with the model; PixArt's is dpm-solver)",
    )
    group.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's size)")
    group.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's size)")
    group.add_argument(
        "--negative-prompt", default="", help="unconditional prompt of guidance (default empty, as PixArt)"
    )
    group.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="seeds per model call (default 1). Outputs depend on it in the last bits: keep it fixed for a dataset",
    )


def _steer_options(parser: argparse.ArgumentParser, required: bool = True) -> None:
    group = parser.add_argument_group(
        "steering", "give --vector several times to chain edits; a per-vector flag given once applies to all"
    )
    group.add_argument(
        "--vector", action="append", required=required, help="pathology vector .safetensors (repeat to chain)"
    )
    group.add_argument(
        "--strength",
        type=float,
        action="append",
        help="the paper's alpha (default: the vector's calibrated value, else 2.5; 0 = unsteered; negative amplifies)",
    )
    group.add_argument(
        "--layer-start",
        type=int,
        action="append",
        help="first steered block (default: the vector's calibrated window; else the model's preset: the "
        "paper's 8-16 on a PixArt with at least 16 layers, all layers of a smaller one (0-6 on MedSteer-mini), "
        "'input 7 - output 5' on SD 1.x/2.x UNets, 'input 7.0 - output 2.9' on SDXL)",
    )
    group.add_argument(
        "--layer-end",
        type=int,
        action="append",
        help="one past the last steered block, exclusive (default: as --layer-start: calibrated, else the "
        "model's preset)",
    )
    group.add_argument(
        "--window",
        action="append",
        help="the steered sites by name or index, instead of --layer-start/--layer-end: 'input 7 - output 2' "
        "(names, both ends inclusive), 'middle', 'output' (every output site), 'input 7.3', or '8-16' (indices, "
        "end exclusive); `medsteer inspect --model M` lists a model's site names",
    )
    group.add_argument(
        "--timestep-min", type=float, default=0.0, help="steer only model timesteps >= this (0-1000; default 0)"
    )
    group.add_argument(
        "--timestep-max", type=float, default=1000.0, help="steer only model timesteps <= this (default 1000)"
    )
    group.add_argument(
        "--rows", default="all", choices=["all", "cond"], help="steer both halves of the CFG batch (all) or cond only"
    )
    group.add_argument(
        "--preserve-norm",
        action="store_true",
        help="rescale steered tokens to their norm (the authors' code; not the paper)",
    )
    group.add_argument(
        "--interpolation", default="nearest", choices=["nearest", "linear"], help="timestep lookup in the vector"
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {value}")
    return value


# ------------------------------------------------------------------------------------- parser
def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def build_parser() -> argparse.ArgumentParser:
    """The ``medsteer`` argument parser (every command, with examples in its help)."""
    parser = argparse.ArgumentParser(
        prog="medsteer", description=DESCRIPTION, epilog=EXAMPLES, formatter_class=_formatter
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"medsteer {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", "-q", action="store_true", help="no progress bars; warnings and errors only")

    build = commands.add_parser(
        "build-vector",
        parents=[common],
        formatter_class=_formatter,
        help="estimate a pathology vector from prompts with and without a concept",
        description=textwrap.dedent(
            """\
            Estimate a pathology vector: every prompt of each side is sampled for every seed, the
            conditional cross-attention outputs are averaged over seeds and tokens per layer and
            timestep, and the normalised difference is saved (.safetensors, timestep keys 0-999,
            loadable by the ComfyUI nodes). Give several phrasings per side to vary the context, as
            the paper does. A second file pair <name>.halves/{a,b}.safetensors holds the vectors of
            each half of the seeds, for `medsteer inspect`."""
        ),
        epilog=textwrap.dedent(
            f"""\
            examples:
              medsteer build-vector --model {PAPER_MODEL} --lora medsteer_lora \\
                  --with "An endoscopic image of polyps" --with "A colonoscopy image showing polyps" \\
                  --without "An endoscopic image of normal cecum" \\
                  --without "A colonoscopy image showing normal cecum" \\
                  --concept-with polyps --concept-without "normal cecum" --num-seeds 50 --out vectors/polyp.safetensors
              medsteer build-vector ... --seed 50 --num-seeds 30 --merge vectors/polyp.safetensors   (30 more seeds)
              torchrun --nproc_per_node 4 -m medsteer_core.headless.cli build-vector ...   (same vector as one process)"""
        ),
    )
    prompts = build.add_argument_group("prompts")
    prompts.add_argument(
        "--with", dest="prompts_with", action="append", help="a prompt WITH the concept (repeat for several phrasings)"
    )
    prompts.add_argument("--with-file", help="file of prompts with the concept, one per line (# comments)")
    prompts.add_argument(
        "--without", dest="prompts_without", action="append", help="a prompt WITHOUT the concept (repeat)"
    )
    prompts.add_argument("--without-file", help="file of prompts without the concept, one per line")
    prompts.add_argument(
        "--concept-with", help="name of the concept stored in the file (default: the first --with prompt)"
    )
    prompts.add_argument("--concept-without", help="name of its absence (default: the first --without prompt)")
    _sampling_options(build, num_seeds=50)
    output = build.add_argument_group("output")
    output.add_argument("--out", help="vector file to write (default with --merge: the merged file itself)")
    output.add_argument(
        "--merge", help="existing vector to add these seeds to (seeds must not overlap; PathologyVector.merge)"
    )
    output.add_argument("--no-halves", action="store_true", help="do not write the per-half vectors used by inspect")
    _model_options(build)

    gen = commands.add_parser(
        "generate",
        parents=[common],
        formatter_class=_formatter,
        help="generate counterfactual pairs (unsteered + steered) for prompts x seeds",
        description=textwrap.dedent(
            """\
            Generate counterfactual pairs: for every prompt and seed, the unsteered image and the
            steered one (same prompt, same seed, the vectors applied in order). Writes
            OUT/images/p<prompt>-s<seed>-{unsteered,steered}.png (+ -gate.png and -mask.png with
            --heatmaps) and OUT/manifest.jsonl: one line per pair with the seed, the prompt, the
            vector files and their sha256, every steering and sampling setting, and each image's
            path and sha256. Rerunning the same command skips finished pairs and redoes the rest
            with identical bytes; a folder made with other settings is refused."""
        ),
        epilog=textwrap.dedent(
            f"""\
            examples:
              medsteer generate --model {PAPER_MODEL} --lora medsteer_lora --vector vectors/polyp.safetensors \\
                  --prompt "An endoscopic image of polyps" --seed 1000 --num-seeds 1000 --out pairs/polyp
              medsteer generate ... --vector dye.safetensors --vector polyp.safetensors \\
                  --prompt "An endoscopic image of dyed lifted polyps" --out pairs/dye_polyp   (chained edit)
              medsteer generate ... --strength 0 --out pairs/check   (strength 0: identical pairs)
              torchrun --nproc_per_node 8 -m medsteer_core.headless.cli generate ...   (seeds sharded over 8 GPUs)"""
        ),
    )
    _steer_options(gen)
    gp = gen.add_argument_group("prompts")
    gp.add_argument("--prompt", action="append", help="prompt WITH the concept (repeat; default: the vector's prompts)")
    gp.add_argument("--prompts-file", help="file of prompts, one per line")
    _sampling_options(gen, num_seeds=10)
    go = gen.add_argument_group("output")
    go.add_argument("--out", required=True, help="output folder (created; resumable)")
    go.add_argument("--heatmaps", action="store_true", help="also write each pair's gate grid and mask")
    go.add_argument(
        "--heatmap-steps",
        type=_index_list("step"),
        help="steps of the gate grid, e.g. 8,12,14,19 (default: the paper's Fig. 3, scaled)",
    )
    go.add_argument(
        "--heatmap-layers",
        type=_index_list("layer", ("mean", "all")),
        help="layers of the gate grid, e.g. 8 or 8,12 or 'output 3' or mean (default: 8 when steered, else the "
        "window's first)",
    )
    go.add_argument("--heatmap-plan", type=int, default=0, help="which --vector's gates to draw (default 0, the first)")
    go.add_argument("--colormap", default="viridis", choices=COLORMAPS, help="heatmap colours")
    _model_options(gen)

    heat = commands.add_parser(
        "heatmap",
        parents=[common],
        formatter_class=_formatter,
        help="draw the gate grid of one seed (the paper's Fig. 3)",
        description=textwrap.dedent(
            """\
            Sample one seed steered and draw the gate sigma = max(<h, v>, 0) per token: rows are
            steps, columns are layers (as GateHeatmap draws it). The defaults draw the paper's
            Fig. 3 (layer 8 at steps 8, 12, 14 and 19 of 20; other step counts are scaled): broad
            at early steps, sparse patches at the end."""
        ),
        epilog=textwrap.dedent(
            f"""\
            examples:
              medsteer heatmap --model {PAPER_MODEL} --lora medsteer_lora --vector dye.safetensors --seed 7 --out fig3.png
              medsteer heatmap ... --layers 8,10,12,14 --at-steps all --save-images --out grid.png"""
        ),
    )
    _steer_options(heat)
    hp = heat.add_argument_group("heatmap")
    hp.add_argument("--prompt", help="prompt WITH the concept (default: the vector's first)")
    hp.add_argument("--seed", type=int, default=0, help="the seed (default 0)")
    hp.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    hp.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's)")
    hp.add_argument(
        "--scheduler", default="default", choices=["default", "dpm-solver", "ddim", "euler", "unipc"], help="sampler"
    )
    hp.add_argument("--width", type=int, default=None, help="image width (default: the model's)")
    hp.add_argument("--height", type=int, default=None, help="image height (default: the model's)")
    hp.add_argument("--negative-prompt", default="", help="unconditional prompt (default empty)")
    hp.add_argument(
        "--at-steps",
        type=_index_list("step"),
        help="steps to draw: 8,12,14,19 / all / last (default: the paper's, scaled)",
    )
    hp.add_argument(
        "--layers",
        type=_index_list("layer", ("mean", "all")),
        help="layers to draw: 8 / 8,12 / 8-16 (end exclusive) / site names such as 'middle 0,output 3' / mean "
        "(default: 8, the paper's, when steered, else the window's first)",
    )
    hp.add_argument("--plan", type=int, default=0, help="which --vector's gates (default 0)")
    hp.add_argument("--colormap", default="viridis", choices=COLORMAPS, help="colours")
    hp.add_argument("--cell", type=_positive_int, default=128, help="pixels per map (default 128)")
    hp.add_argument("--global-scale", action="store_true", help="one colour scale for all maps (default: each its own)")
    hp.add_argument("--save-images", action="store_true", help="also write OUT-unsteered.png and OUT-steered.png")
    hp.add_argument("--out", required=True, help="PNG file to write")
    _model_options(heat)

    insp = commands.add_parser(
        "inspect",
        parents=[common],
        formatter_class=_formatter,
        help="show a vector's metadata, shapes, difference norms and stability; or a model's sites",
        description=textwrap.dedent(
            """\
            Print a vector's metadata and shapes, the norm of the mean difference (with minus
            without) per layer and per timestep (absolute and relative to the activations), how
            stable the direction is across timesteps (cosine of adjacent rows, first vs last) and
            across halves of its seeds (cosine between the vectors of the two halves, read from
            <name>.halves/ that build-vector writes, or from --halves). With --model, every site
            is listed with its name (UNets: ComfyUI's 'input 4', 'middle 0', 'output 3'), width
            and token grid at the vector's image size (or the model's, without a vector); the
            names are what --window and the heatmap's --layers accept."""
        ),
        epilog=textwrap.dedent(
            """\
            examples:
              medsteer inspect vectors/dye.safetensors
              medsteer inspect vectors/dye.safetensors --json > dye.json
              medsteer inspect merged.safetensors --halves seeds_0-24.safetensors seeds_25-49.safetensors
              medsteer inspect --model models/roentgen-v2            (the model's sites: names, widths, grids)
              medsteer inspect vectors/effusion.safetensors --model models/roentgen-v2"""
        ),
    )
    insp.add_argument("vector", nargs="?", help="the .safetensors vector (optional with --model)")
    insp.add_argument("--halves", nargs=2, metavar=("A", "B"), help="two vectors built from disjoint seed halves")
    insp.add_argument("--json", action="store_true", help="print the full report (per-timestep x layer norms) as JSON")
    insp.add_argument(
        "--width", type=int, default=None, help="image width for the sites' grids (default: the vector's)"
    )
    insp.add_argument("--height", type=int, default=None, help="image height for the grids (default: the vector's)")
    _model_options(insp)

    demo = commands.add_parser(
        "demo",
        add_help=False,
        help="offline demo on the shipped MedSteer-mini model (its options: medsteer demo --help)",
        description="Run the offline demo (medsteer_core.mini.demo); every argument after 'demo' goes to it.",
    )
    demo.add_argument("demo_args", nargs=argparse.REMAINDER)
    demo.set_defaults(quiet=False)
    return parser
