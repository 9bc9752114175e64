"""Headless MedSteer on diffusers: load a PixArt model, build vectors, generate pair datasets.

The ``medsteer`` CLI is a thin shell over this module; each public function is what one command
does. Sampling, capture and gate recording all go through ``medsteer_core.driver.sample`` and the
hooks the ComfyUI nodes use, and vectors are keyed by model timestep (0-999), so a vector built
here steers the same way in ComfyUI and vice versa.

Scale-out (``torchrun --nproc_per_node N -m medsteer_core.cli ...``): work is cut into units (one
prompt x one batch of seeds) that do not depend on the number of processes, and ``Shard`` deals
them out round-robin. Every image depends only on its unit, and ``build_vector`` adds the per-unit
sums in unit order on every rank, so N processes write the same bytes as one.

Example:
    >>> from medsteer_core import pipeline as mp                                           # doctest: +SKIP
    >>> model = mp.load_model("PixArt-alpha/PixArt-XL-2-512x512", lora="medsteer_lora", dtype="fp16")
    >>> built = mp.build_vector(model, ["An endoscopic image of dyed lifted polyps"],
    ...                         ["An endoscopic image of polyps"], seeds=range(50))
    >>> mp.save_built(built, "dye.safetensors")
    >>> mp.generate(model, [mp.Steer("dye.safetensors")], ["An endoscopic image of dyed lifted polyps"],
    ...             seeds=range(100), out_dir="pairs/dye")
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .backbones import find_sites
from .checkpoints import looks_like_local_path
from .driver import SamplingSpec, sample
from .errors import MedSteerError, VectorMismatchError
from .estimate import VectorEstimator
from .gates import PAPER_FIGURE_3, GateMaps, GateRecord, parse_steps, select_maps
from .heatmap import gate_grid, selection_mask
from .plan import SteeringPlan
from .provenance import Provenance, build_metadata
from .vector import FORMAT_NAME, PathologyVector, load_vector, save_vector

__all__ = [
    "DTYPES",
    "MANIFEST",
    "SCHEDULERS",
    "BuiltVector",
    "GenerateReport",
    "Heatmap",
    "ModelLoadError",
    "OutputFolderError",
    "PixArtModel",
    "Shard",
    "Steer",
    "build_vector",
    "check_device",
    "check_new_seeds",
    "check_output_file",
    "default_window",
    "gate_heatmap",
    "generate",
    "halves_paths",
    "inspect_vector",
    "load_built",
    "load_model",
    "lock_output_folder",
    "merge_built",
    "paper_heatmap_steps",
    "save_built",
]

log = logging.getLogger("medsteer")

#: ``--dtype`` names.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: ``--scheduler`` names -> diffusers class (``default``: the one saved with the model). Only
#: deterministic schedulers: ancestral / SDE ones draw fresh noise every step, which the seed of the
#: starting noise does not fix.
SCHEDULERS = {
    "default": None,
    "dpm-solver": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}
#: The manifest of a ``generate`` output folder (one JSON record per pair, sorted).
MANIFEST = "manifest.jsonl"
_PARTS = "manifest.parts"  # per-rank records of a run in progress; folded into MANIFEST at the end
_LORA_PARTS = {"transformer": "transformer_lora", "text_encoder": "text_encoder_lora"}
_PIPELINE_FAMILIES = {"PixArtAlphaPipeline": "pixart-alpha", "PixArtSigmaPipeline": "pixart-sigma"}


class ModelLoadError(MedSteerError):
    """A model folder, hub id or LoRA adapter cannot be loaded as asked."""


class OutputFolderError(MedSteerError):
    """An output folder holds results made with other settings."""


# ================================================================================ scale-out
@dataclass(frozen=True)
class Shard:
    """This process's place in a ``torchrun`` / ``accelerate launch`` job (rank 0 of 1 otherwise).

    Units of work are dealt out round-robin: unit ``i`` belongs to rank ``i % world``. Only small
    CPU objects cross processes, so the process group always uses gloo (also next to GPUs).
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> Shard:
        """Join the process group described by ``WORLD_SIZE`` / ``RANK`` / ``MASTER_ADDR`` (if any)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def owns(self, unit: int) -> bool:
        return unit % self.world == self.rank

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


# ================================================================================ loading
def check_device(device: str | torch.device | None) -> torch.device | None:
    """The ``torch.device`` that ``device`` names, checked to exist here (``None`` for ``"auto"``).

    Raises:
        MedSteerError: an unknown device name, or a device this machine or torch build lacks
            (``cuda`` without CUDA, ``cuda:3`` on a 2-GPU machine, ``mps`` off Apple silicon).
    """
    if device is None or str(device) == "auto":
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise MedSteerError(
            f"unknown device {str(device)!r}: pass auto, cpu, cuda, cuda:N (a GPU index) or mps"
        ) from None
    if parsed.type == "cpu":
        return parsed
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise MedSteerError(
                f"device {str(device)!r} asked for, but CUDA is not available here (torch {torch.__version__}, "
                f"CUDA build: {torch.version.cuda or 'no'}): pass --device cpu, or --device auto"
            )
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise MedSteerError(f"device {str(device)!r} does not exist: this machine has {count} CUDA device(s)")
        return parsed
    backend = getattr(torch.backends, parsed.type, None) or getattr(torch, parsed.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise MedSteerError(
            f"device {str(device)!r} is not available here: pass --device cpu, cuda (with a GPU) or auto"
        )
    return parsed


def _resolve_device(device: str | torch.device | None, shard: Shard) -> torch.device:
    device = check_device(device)
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", shard.local_rank)
    return device


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or 'auto', got {dtype!r}")
    return DTYPES[dtype]


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def _offline(offline: bool | None) -> bool:
    if offline is not None:
        return offline
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class PixArtModel:
    """A loaded PixArt-class text-to-image model: what the commands sample, steer and decode.

    Attributes:
        transformer: the ``PixArtTransformer2DModel`` (LoRA merged in, if one was given).
        family: ``"pixart-alpha"``, ``"pixart-sigma"`` or ``"medsteer-mini"``.
        source: the folder, hub id or file it was loaded from.
        lora: the LoRA folder applied, or ``None``.
        dtype: weight dtype of the networks.
        device: where sampling runs (the accelerator when components are CPU-offloaded).
        default_cfg: the model's usual guidance scale.

    Use ``load_model`` to make one.
    """

    default_cfg = 4.5

    def __init__(self, transformer: nn.Module, family: str, source: str, dtype: torch.dtype, device: torch.device):
        self.transformer = transformer
        self.family = family
        self.source = source
        self.dtype = dtype
        self.device = device
        self.lora: str | None = None
        self.lora_sha256: str | None = None
        self._prompts: dict[tuple[str, str, bool], tuple] = {}
        self.sites = find_sites(transformer)

    # ---------------------------------------------------------------- what subclasses provide
    latent_channels = 4
    latent_scale = 8  # image pixels per latent pixel

    @property
    def default_size(self) -> tuple[int, int]:
        """``(height, width)`` in image pixels the transformer was trained at."""
        side = int(self.transformer.config.sample_size) * self.latent_scale
        return side, side

    def _encode(self, prompt: str, negative_prompt: str, guided: bool) -> tuple:
        raise NotImplementedError

    def _base_scheduler(self):
        raise NotImplementedError

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` images in -1..1 from final latents."""
        raise NotImplementedError

    # ---------------------------------------------------------------- shared
    def encode(self, prompt: str, negative_prompt: str = "", guided: bool = True) -> tuple:
        """``(embeds, mask, negative_embeds, negative_mask)`` of a prompt (cached per prompt)."""
        key = (prompt, negative_prompt, guided)
        if key not in self._prompts:
            with torch.no_grad():
                self._prompts[key] = self._encode(prompt, negative_prompt, guided)
        return self._prompts[key]

    def scheduler(self, name: str = "default"):
        """A fresh scheduler: the model's own (``default``) or one of ``SCHEDULERS`` built from its config."""
        if name not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
        base = self._base_scheduler()
        if SCHEDULERS[name] is None:
            return base
        import diffusers

        return getattr(diffusers, SCHEDULERS[name]).from_config(base.config)

    def spec(self, steps: int, cfg: float, height: int | None = None, width: int | None = None) -> SamplingSpec:
        """The sampling spec of images ``height x width`` (default: the model's size)."""
        default_h, default_w = self.default_size
        height, width = height or default_h, width or default_w
        # Latent pixels per token side, from the backbone's grid of a probe latent.
        per_token = 64 // max(self.sites.token_grid(0, (64, 64))[0], 1)
        step = self.latent_scale * per_token  # image pixels per token side
        if height % step or width % step or height <= 0 or width <= 0:
            raise ValueError(
                f"image size {width}x{height} must be positive multiples of {step} for this model "
                f"({self.latent_scale} pixels per latent pixel, {step // self.latent_scale} latent pixels per token)"
            )
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if not math.isfinite(cfg):
            raise ValueError(f"cfg must be a finite number, got {cfg}")
        return SamplingSpec(
            steps=int(steps),
            cfg=float(cfg),
            height=height // self.latent_scale,
            width=width // self.latent_scale,
            channels=self.latent_channels,
        )

    def sample(
        self,
        prompt: str,
        seeds: Sequence[int],
        spec: SamplingSpec,
        *,
        negative_prompt: str = "",
        scheduler: str = "default",
        plans: Sequence[SteeringPlan] = (),
        record: GateRecord | None = None,
        estimator: VectorEstimator | None = None,
        label: str = "with",
        progress: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Final latents ``[B, C, h, w]`` of one prompt for a batch of seeds (see ``driver.sample``)."""
        guided = spec.cfg != 1
        embeds, mask, negative, negative_mask = self.encode(prompt, negative_prompt, guided)
        return sample(
            self.transformer,
            self.scheduler(scheduler),
            embeds,
            list(seeds),
            spec,
            negative_embeds=negative,
            prompt_mask=mask,
            negative_mask=negative_mask,
            plans=plans,
            record=record,
            estimator=estimator,
            label=label,
            progress=progress,
            device=self.device,
        )

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list:
        """PIL RGB images of final latents (rounded the way diffusers' image processor rounds)."""
        from PIL import Image

        images = self._decode(latents).float().cpu()
        pixels = ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(p) for p in pixels]

    def provenance(self) -> dict:
        """What identifies the model in a manifest or a vector's metadata."""
        return {
            "model": self.source,
            "model_family": self.family,
            "lora": self.lora,
            "lora_sha256": self.lora_sha256,
            "dtype": _dtype_name(self.dtype),
            "device_type": self.device.type,
        }


class _DiffusersPixArt(PixArtModel):
    """A diffusers ``PixArtAlphaPipeline`` / ``PixArtSigmaPipeline``."""

    def __init__(self, pipe, family: str, source: str, dtype: torch.dtype, device: torch.device):
        super().__init__(pipe.transformer, family, source, dtype, device)
        self.pipe = pipe
        self.latent_scale = int(getattr(pipe, "vae_scale_factor", 8))
        self.latent_channels = int(pipe.transformer.config.in_channels)

    def _encode(self, prompt: str, negative_prompt: str, guided: bool) -> tuple:
        return tuple(
            self.pipe.encode_prompt(
                prompt,
                do_classifier_free_guidance=guided,
                negative_prompt=negative_prompt,
                device=self.device,
                clean_caption=False,
            )
        )

    def _base_scheduler(self):
        return self.pipe.scheduler.__class__.from_config(self.pipe.scheduler.config)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        latents = latents.to(self.device, vae.dtype) / vae.config.scaling_factor
        return vae.decode(latents, return_dict=False)[0]


class _MiniPixArt(PixArtModel):
    """MedSteer-mini (``medsteer_core.mini``): pixel space, its own DDIM schedule."""

    latent_channels = 3
    latent_scale = 1
    default_cfg = 4.0

    def __init__(self, mini, source: str, dtype: torch.dtype, device: torch.device):
        super().__init__(mini.transformer, "medsteer-mini", source, dtype, device)
        self.mini = mini

    def _encode(self, prompt: str, negative_prompt: str, guided: bool) -> tuple:
        embeds, mask = self.mini.encode(prompt)
        negative, negative_mask = self.mini.encode(negative_prompt) if guided else (None, None)
        return embeds, mask, negative, negative_mask

    def _base_scheduler(self):
        return self.mini.scheduler()

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


def _mini_path(source: str | None) -> Path | None:
    """The MedSteer-mini file ``source`` names (``None``/``"mini"``: the shipped one), else ``None``."""
    from . import mini

    if source is None or source == "mini":
        return mini.DEFAULT_PATH
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                if (handle.metadata() or {}).get("format") == mini.FORMAT_NAME:
                    return path
        except Exception:  # not a safetensors file: the caller reports what it is
            return None
    return None


def load_model(
    source: str | os.PathLike | None = None,
    *,
    lora: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = "auto",
    offload: bool = False,
    offline: bool | None = None,
    shard: Shard | None = None,
    quiet: bool = False,
) -> PixArtModel:
    """Load a PixArt-alpha / PixArt-Sigma pipeline (or MedSteer-mini) ready to sample and steer.

    Args:
        source: a local diffusers folder (``model_index.json`` + ``transformer/``, ``text_encoder/``,
            ``tokenizer/``, ``vae/``, ``scheduler/``), a Hugging Face hub id such as
            ``PixArt-alpha/PixArt-XL-2-512x512``, ``"mini"`` or ``None`` for the shipped
            MedSteer-mini, or a MedSteer-mini ``.safetensors`` file.
        lora: a folder in the authors' layout: ``transformer_lora/`` and/or ``text_encoder_lora/``,
            each a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``). Applied
            with PEFT (scale ``lora_alpha / r`` per module) and merged into the weights.
        dtype: ``"fp32"``, ``"fp16"``, ``"bf16"`` or ``"auto"`` (fp16 on CUDA, else fp32).
        device: ``"cuda"``, ``"cuda:1"``, ``"cpu"``, ... or ``"auto"``. Under torchrun each rank
            takes ``cuda:LOCAL_RANK``.
        offload: keep every component on the CPU and move it to the device only while it runs
            (diffusers' ``enable_model_cpu_offload``; needs ``accelerate`` and an accelerator).
            For GPUs that cannot hold T5-XXL next to the transformer.
        offline: never contact the hub (default: the ``HF_HUB_OFFLINE`` variable). Local folders
            are always read offline; a hub id is looked up in the local cache first.
        shard: this process's rank (device choice under torchrun).
        quiet: hide the loaders' progress bars.

    Raises:
        ModelLoadError: a missing folder or file, a folder that is not a PixArt pipeline, a
            checkpoint in a format the CLI does not read, or a LoRA that does not fit.
    """
    shard = shard or Shard()
    torch_device = _resolve_device(device, shard)
    torch_dtype = _resolve_dtype(dtype, torch_device)
    if offload:
        if torch_device.type == "cpu":
            raise ModelLoadError(
                "offload moves components between the CPU and an accelerator, but the device is the CPU: "
                "drop --offload, or pass --device cuda"
            )
        if importlib.util.find_spec("accelerate") is None:
            raise ModelLoadError("offload needs the accelerate package: pip install accelerate (or drop --offload)")
    _quiet_libraries(quiet)
    mini_path = _mini_path(None if source is None else str(source))
    if mini_path is not None:
        if lora is not None:
            raise ModelLoadError("--lora applies to PixArt diffusers pipelines, not to MedSteer-mini")
        from . import mini

        if not mini_path.is_file():
            raise ModelLoadError(
                "the shipped MedSteer-mini model is not installed (asked for by --model mini or by giving no "
                "--model): pass --model with a diffusers PixArt folder or a hub id such as "
                "PixArt-alpha/PixArt-XL-2-512x512"
            )
        loaded = mini.load_mini(mini_path)
        loaded.transformer.to(torch_device, torch_dtype)
        loaded.text_encoder.to(torch_device, torch_dtype)
        return _MiniPixArt(loaded, "mini" if source in (None, "mini") else str(source), torch_dtype, torch_device)

    if lora is not None and not Path(lora).expanduser().is_dir():  # before minutes of loading the model
        raise ModelLoadError(f"no LoRA folder at {str(lora)!r}: check the path")
    pipe, family = _load_pipeline(str(source), torch_dtype, _offline(offline))
    model_lora, lora_sha = None, None
    if lora is not None:
        model_lora, lora_sha = apply_lora(pipe, lora)
    if offload:
        pipe.enable_model_cpu_offload(device=torch_device)
        execution = pipe._execution_device
    else:
        pipe.to(torch_device)
        execution = torch_device
    pipe.set_progress_bar_config(disable=True)
    model = _DiffusersPixArt(pipe, family, str(source), torch_dtype, torch.device(execution))
    model.lora, model.lora_sha256 = model_lora, lora_sha
    return model


def _quiet_libraries(quiet: bool) -> None:
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        if quiet:
            library.utils.logging.disable_progress_bar()
        library.utils.logging.set_verbosity_error()


def _load_pipeline(source: str, dtype: torch.dtype, offline: bool):
    from diffusers import DiffusionPipeline, PixArtAlphaPipeline, PixArtSigmaPipeline

    path = Path(source).expanduser()
    classes = {"PixArtAlphaPipeline": PixArtAlphaPipeline, "PixArtSigmaPipeline": PixArtSigmaPipeline}
    if path.exists():
        index = _check_pipeline_folder(path)
        cls = classes[index["_class_name"]]
        _check_transformer_weights(path / "transformer")
        try:
            pipe = cls.from_pretrained(str(path), dtype=dtype, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load the pipeline in {str(path)!r}: {exc}") from None
        return pipe, _PIPELINE_FAMILIES[index["_class_name"]]
    # A path that looks local never reaches the hub (issue 11: `models/x` meant ~30 s of retries).
    if looks_like_local_path(source) or source.count("/") != 1:
        raise ModelLoadError(
            f"no model folder or file at {source!r} ({str(path.absolute())!r} does not exist): check the path, "
            "or pass a hub id like 'PixArt-alpha/PixArt-XL-2-512x512' (or no --model for MedSteer-mini)"
        )
    try:  # the local cache first: offline whenever the files are already here
        index = DiffusionPipeline.load_config(source, local_files_only=True)
        cached = True
    except (OSError, ValueError):
        if offline:
            raise ModelLoadError(
                f"{source!r} is not in the local Hugging Face cache and offline mode is on (HF_HUB_OFFLINE / "
                "--offline): download it once with network access, or pass a local diffusers folder"
            ) from None
        try:
            index = DiffusionPipeline.load_config(source)
        except (OSError, ValueError) as exc:
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelLoadError(
                f"{source!r} is neither a local folder nor a model the Hugging Face hub returned ({first_line}): "
                "check the path or the hub id (e.g. PixArt-alpha/PixArt-XL-2-512x512), or download the "
                "model and pass its folder"
            ) from None
        cached = False
    name = index.get("_class_name")
    if name not in classes:
        raise ModelLoadError(
            f"{source!r} is a {name} pipeline; medsteer steers PixArt transformers only "
            f"({', '.join(classes)}), e.g. PixArt-alpha/PixArt-XL-2-512x512"
        )
    try:
        pipe = classes[name].from_pretrained(source, dtype=dtype, local_files_only=cached)
    except OSError:
        if not cached or offline:
            raise
        pipe = classes[name].from_pretrained(source, dtype=dtype)  # cache incomplete: fetch the rest
    return pipe, _PIPELINE_FAMILIES[name]


def _check_transformer_weights(folder: Path) -> None:
    """The transformer's config.json against its weights' shapes (safetensors headers only) and its
    shard index, before diffusers builds the model: diffusers silently drops weights a shorter
    config has no place for, and fails with "Cannot copy out of meta tensor" on a longer one
    (issue 12, F12/F13)."""
    from .checkpoints import CheckpointError, check_diffusers_transformer

    if not folder.is_dir():
        return
    try:
        check_diffusers_transformer(folder)
    except CheckpointError as exc:
        raise ModelLoadError(f"the transformer in {str(folder)!r} cannot be loaded: {exc}") from None


def _check_pipeline_folder(path: Path) -> dict:
    """The ``model_index.json`` of a PixArt pipeline folder, or a ``ModelLoadError`` that says what
    the folder is instead and what to pass."""
    if path.is_file():
        kind = "a pickle checkpoint" if path.suffix in (".pth", ".pt", ".bin", ".ckpt") else "a single file"
        raise ModelLoadError(
            f"{str(path)!r} is {kind}; the CLI loads diffusers pipeline folders (model_index.json + transformer/, "
            "text_encoder/, tokenizer/, vae/, scheduler/) or hub ids such as PixArt-alpha/PixArt-XL-2-512x512. "
            "Single-file PixArt checkpoints load in the ComfyUI nodes; convert one with diffusers' "
            "scripts/convert_pixart_alpha_to_diffusers.py"
        )
    index_file = path / "model_index.json"
    if not index_file.is_file():
        if any((path / sub).is_dir() for sub in _LORA_PARTS.values()):
            raise ModelLoadError(
                f"{str(path)!r} is a LoRA folder (transformer_lora/, text_encoder_lora/), not a model: pass it "
                "with --lora and the base model with --model (e.g. PixArt-alpha/PixArt-XL-2-512x512)"
            )
        if (path / "config.json").is_file() and (path.parent / "model_index.json").is_file():
            raise ModelLoadError(f"{str(path)!r} is one component of a pipeline: pass its parent {str(path.parent)!r}")
        raise ModelLoadError(
            f"{str(path)!r} has no model_index.json, so it is not a diffusers pipeline folder; save one with "
            "pipe.save_pretrained(folder), or pass a hub id such as PixArt-alpha/PixArt-XL-2-512x512"
        )
    try:
        index = json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{str(index_file)!r} is not valid JSON ({exc})") from None
    name = index.get("_class_name")
    if name not in _PIPELINE_FAMILIES:
        raise ModelLoadError(
            f"{str(path)!r} holds a {name} pipeline; medsteer steers PixArt transformers only "
            f"({', '.join(_PIPELINE_FAMILIES)})"
        )
    missing = [
        part
        for part in ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")
        if isinstance(index.get(part), list) and index[part][0] is not None and not (path / part).is_dir()
    ]
    if missing:
        raise ModelLoadError(
            f"{str(path)!r} lacks the component folder(s) {missing} that its model_index.json lists; "
            "copy the complete pipeline (all of transformer/, text_encoder/, tokenizer/, vae/, scheduler/)"
        )
    return index


# ================================================================================ LoRA
def apply_lora(pipe, folder: str | os.PathLike) -> tuple[str, str]:
    """Apply the authors' LoRA layout to a PixArt pipeline's transformer and T5 encoder, in place.

    Each half (``transformer_lora/``, ``text_encoder_lora/``; at least one must exist) is read and
    checked by ``checkpoints.load_peft_adapter``, checked against the model's module shapes,
    attached with PEFT, verified to carry the scale ``checkpoints`` computes from the config
    (``lora_alpha / r``, or per-module patterns), and merged into the weights.

    Returns:
        ``(folder, sha256)``: the folder and a digest of every adapter file, for provenance.

    Raises:
        ModelLoadError: a missing or malformed folder, or an adapter that does not fit the model.
    """
    from .checkpoints import CheckpointError, load_medsteer_lora

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"no LoRA folder at {str(folder)!r}: check the path")
    if (folder / "adapter_config.json").is_file():
        raise ModelLoadError(
            f"{str(folder)!r} is a single PEFT adapter; medsteer expects the authors' layout, a folder with "
            f"{_LORA_PARTS['transformer']}/ and/or {_LORA_PARTS['text_encoder']}/: move it to "
            f"{str(folder / _LORA_PARTS['transformer'])!r} (or text_encoder_lora/ for a T5 adapter)"
        )
    present = {part: (folder / sub).is_dir() for part, sub in _LORA_PARTS.items()}
    if not any(present.values()):
        raise ModelLoadError(
            f"{str(folder)!r} has neither {_LORA_PARTS['transformer']}/ nor {_LORA_PARTS['text_encoder']}/; the "
            "MedSteer LoRA layout is those two folders, each with adapter_config.json and adapter_model.safetensors"
        )
    try:
        adapters = load_medsteer_lora(folder, transformer=present["transformer"], text_encoder=present["text_encoder"])
    except CheckpointError as exc:
        raise ModelLoadError(str(exc)) from None
    digest = hashlib.sha256()
    for part, adapter in (("transformer", adapters.transformer), ("text_encoder", adapters.text_encoder)):
        if adapter is None:
            continue
        merged = _attach_and_merge(getattr(pipe, part), adapter, part)
        setattr(pipe, part, merged)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            digest.update(f"{part}/{name}:{_sha256_file(Path(adapter.path) / name)}\n".encode())
        log.info("applied %s LoRA %s (%d modules)", part, adapter.path, len(adapter.modules))
    return str(folder), digest.hexdigest()


def _attach_and_merge(module: nn.Module, adapter, part: str) -> nn.Module:
    from peft import LoraConfig, PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    for lora_module in adapter.modules:  # shapes first: PEFT's own errors do not name both sides
        try:
            target = module.get_submodule(lora_module.name)
        except AttributeError:
            raise ModelLoadError(
                f"the {part} adapter {adapter.path!r} adapts {lora_module.name!r}, which this {part} "
                f"({type(module).__name__}) does not have: is it the adapter of this model "
                f"(made for {adapter.config.base_model!r})?"
            ) from None
        weight = getattr(target, "weight", None)
        if weight is None or tuple(weight.shape) != lora_module.delta_shape:
            shape = None if weight is None else list(weight.shape)
            raise ModelLoadError(
                f"the {part} adapter {adapter.path!r} does not fit {lora_module.name!r}: its update has shape "
                f"{list(lora_module.delta_shape)}, the model's weight has {shape}. The adapter was trained on "
                f"another model ({adapter.config.base_model!r}); use it with that one"
            )
    config = LoraConfig.from_pretrained(adapter.path)
    config.inference_mode = True
    wrapped = PeftModel(module, config)
    state = load_file(str(Path(adapter.path) / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(wrapped, state)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing or result.unexpected_keys:
        raise ModelLoadError(
            f"the {part} adapter {adapter.path!r} does not match its own adapter_config.json: missing "
            f"{missing[:5]}, unexpected {list(result.unexpected_keys)[:5]}"
        )
    # PEFT computes each module's scale from the config; it must be what the file format says.
    scales = {m.name: m.scale for m in adapter.modules}
    for name, layer in wrapped.base_model.model.named_modules():
        if isinstance(layer, LoraLayer) and name in scales:
            got = float(layer.scaling["default"])
            if not math.isclose(got, scales[name], rel_tol=1e-6):
                raise ModelLoadError(f"PEFT scales {name!r} by {got}, but its config gives {scales[name]}")
    return wrapped.merge_and_unload()


# ================================================================================ build-vector
@dataclass
class BuiltVector:
    """A built vector and, when there were at least two seed batches, the vectors of each half
    of the seeds (for ``inspect``'s stability check)."""

    vector: PathologyVector
    halves: tuple[PathologyVector, PathologyVector] | None = None


def _batches(seeds: Sequence[int], batch_size: int) -> list[list[int]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("no seeds given: pass at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds repeat: {sorted(s for s in set(seeds) if seeds.count(s) > 1)[:10]}")
    if any(s < 0 for s in seeds):
        raise ValueError(f"seeds must be >= 0, got {min(seeds)}")
    return [seeds[i : i + batch_size] for i in range(0, len(seeds), batch_size)]


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True)


def build_vector(
    model: PixArtModel,
    prompts_with: Sequence[str],
    prompts_without: Sequence[str],
    seeds: Iterable[int],
    *,
    concept_with: str | None = None,
    concept_without: str | None = None,
    negative_prompt: str = "",
    steps: int = 20,
    cfg: float | None = None,
    scheduler: str = "default",
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 1,
    halves: bool = True,
    shard: Shard | None = None,
    progress: bool = True,
) -> BuiltVector:
    """Estimate a pathology vector: every prompt of each side x every seed, conditional rows captured.

    The paper (method.md, "Pathology vector"): Z images per prompt (Z = 50, 20 steps), the mean
    cross-attention output over seeds and tokens per class, normalised difference per layer and
    timestep. Several phrasings per side vary the context, as the paper does.

    Args:
        model: from ``load_model``.
        prompts_with / prompts_without: prompts with and without the concept.
        seeds: one image per prompt per seed.
        concept_with / concept_without: names stored in the file (default: the first prompts).
        negative_prompt: the unconditional prompt of classifier-free guidance.
        steps / cfg / scheduler / height / width: sampling settings (cfg default: the model's).
        batch_size: seeds per model call. Part of the result's bits (floating-point sums depend on
            the batch), so keep it fixed when results must match exactly.
        halves: also build one vector per half of the seed batches (``BuiltVector.halves``).
        shard: this process's rank; every rank returns the same result.
        progress: show a tqdm bar.

    Returns:
        The ``BuiltVector``.
    """
    shard = shard or Shard()
    prompts = {"with": [str(p) for p in prompts_with], "without": [str(p) for p in prompts_without]}
    for label, texts in prompts.items():
        if not texts or not all(t.strip() for t in texts):
            raise ValueError(f"build_vector needs at least one non-empty prompt {label} the concept")
    cfg = model.default_cfg if cfg is None else cfg
    spec = model.spec(steps, cfg, height, width)
    batches = _batches(list(seeds), batch_size)
    split = (len(batches) + 1) // 2 if halves and len(batches) >= 2 else None
    units = [
        (label, text, b, batch)
        for label in ("with", "without")
        for text in prompts[label]
        for b, batch in enumerate(batches)
    ]
    depth, width_d = model.sites.depth, model.sites.hidden_size
    total = VectorEstimator(depth, width_d)
    parts = (VectorEstimator(depth, width_d), VectorEstimator(depth, width_d)) if split else None
    mine = sum(1 for i in range(len(units)) if shard.owns(i))
    bar = _progress_bar(mine * spec.steps, "build-vector", progress and shard.main)
    try:
        for start in range(0, len(units), shard.world):
            index = start + shard.rank
            contribution = None
            if index < len(units):
                label, text, _, batch = units[index]
                # Apple's MPS has no float64; the per-unit sums there are float32 (the totals stay float64).
                precision = torch.float32 if model.device.type == "mps" else torch.float64
                contribution = VectorEstimator(depth, width_d, accumulate_dtype=precision)
                model.sample(
                    text,
                    batch,
                    spec,
                    negative_prompt=negative_prompt,
                    scheduler=scheduler,
                    estimator=contribution,
                    label=label,
                    progress=lambda i, n: bar.update(1),
                )
                contribution = contribution.to("cpu")
            # Add every unit's sums in unit order, on every rank: the same bits for any world size.
            for offset, gathered in enumerate(shard.gather(contribution)):
                if gathered is None:
                    continue
                total.add(gathered)
                if parts is not None:
                    parts[0 if units[start + offset][2] < split else 1].add(gathered)
    finally:
        bar.close()
    flat = [s for batch in batches for s in batch]
    base = model.provenance()
    scheduler_class = type(model.scheduler(scheduler)).__name__

    provenance = Provenance.from_metadata(
        build_metadata(
            prompts_with=prompts["with"],
            prompts_without=prompts["without"],
            negative_prompt=negative_prompt,
            seeds=flat,
            steps=spec.steps,
            cfg=spec.cfg,
            sampler_name=scheduler,
            scheduler=scheduler_class,
            height=spec.height * model.latent_scale,
            width=spec.width * model.latent_scale,
            model_family=model.family,
            host="diffusers",
            sites=model.sites,  # site widths and weights fingerprint, hashed once for all halves
        )
    ).replace(
        concept_with=concept_with or prompts["with"][0],
        concept_without=concept_without or prompts["without"][0],
        library_version=__version__,
        extra={
            "model": base["model"],
            "lora": base["lora"] or "",
            "dtype": base["dtype"],
            "batch_size": str(batch_size),
        },
    )

    def metadata(seed_list: list[int]) -> dict[str, str]:
        return provenance.replace(seeds=seed_list).to_metadata()

    vector = total.result(metadata(flat))
    halves_out = None
    if parts is not None:
        first = [s for batch in batches[:split] for s in batch]
        second = [s for batch in batches[split:] for s in batch]
        halves_out = (parts[0].result(metadata(first)), parts[1].result(metadata(second)))
    return BuiltVector(vector, halves_out)


def halves_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """Where ``save_built`` keeps the half-seed vectors of ``path``: ``<stem>.halves/a|b.safetensors``."""
    path = Path(path)
    folder = path.with_name(path.name.removesuffix(".safetensors") + ".halves")
    return folder / "a.safetensors", folder / "b.safetensors"


def save_built(built: BuiltVector, path: str | os.PathLike) -> Path:
    """Write the vector (and its halves, next to it; stale halves are removed)."""
    written = save_vector(built.vector, path)
    a, b = halves_paths(written)
    if built.halves is not None:
        save_vector(built.halves[0], a)
        save_vector(built.halves[1], b)
    else:
        for stale in (a, b):
            stale.unlink(missing_ok=True)
    return written


def load_built(path: str | os.PathLike) -> BuiltVector:
    """Read a vector and, if present, its halves."""
    vector = load_vector(path)
    a, b = halves_paths(path)
    halves = (load_vector(a), load_vector(b)) if a.is_file() and b.is_file() else None
    return BuiltVector(vector, halves)


def check_new_seeds(existing: PathologyVector, seeds: Iterable[int]) -> None:
    """Refuse, before any sampling, seeds that ``existing`` already holds (they would count twice).

    Raises:
        VectorMismatchError: some seeds overlap; the message lists them and the free range.
    """
    held = set(existing.provenance.seeds)
    overlap = sorted(held & {int(s) for s in seeds})
    if overlap:
        raise VectorMismatchError(
            f"cannot merge: the vector already holds seeds {overlap[:10]} (it has {len(held)} seeds, up to "
            f"{max(held)}), and their images would count twice; start the new seeds at --seed {max(held) + 1}"
        )


def merge_built(existing: BuiltVector, new: BuiltVector) -> BuiltVector:
    """Pool the seeds of two builds (``PathologyVector.merge``); halves merge pairwise when both
    builds have them, else the result has none."""
    for key in ("steps", "cfg", "scheduler", "height", "width"):
        a, b = existing.vector.metadata.get(key), new.vector.metadata.get(key)
        if a is not None and b is not None and a != b:
            log.warning("merging vectors built with different %s (%s and %s)", key, a, b)
    vector = existing.vector.merge(new.vector)
    halves = None
    if existing.halves is not None and new.halves is not None:
        halves = (existing.halves[0].merge(new.halves[0]), existing.halves[1].merge(new.halves[1]))
    return BuiltVector(vector, halves)


# ================================================================================ generate
#: The paper's steering window: blocks 8-15 (end exclusive) of the 28-layer PixArt-XL-2.
PAPER_WINDOW = (8, 16)


def default_window(depth: int | None) -> tuple[int, int]:
    """The layer window ``(start, end)`` used when neither the caller nor the vector's calibration gives one.

    The paper's 8-16 where the model has those layers (PixArt-XL-2 has 28), else every layer of the
    model: MedSteer-mini has 6, so its default is 0-6 (issue 11: 8-16 made ``build-vector`` then
    ``generate`` on the defaults fail). ``None``: the depth is unknown, the paper's window.

    Example:
        >>> default_window(28), default_window(6)
        ((8, 16), (0, 6))
    """
    if depth is None or depth >= PAPER_WINDOW[1]:
        return PAPER_WINDOW
    return 0, int(depth)


@dataclass(frozen=True)
class Steer:
    """One vector and how to apply it (the CLI's ``--vector`` with its steering flags).

    Attributes:
        vector: a vector file or a ``PathologyVector``.
        strength / layer_start / layer_end / timestep_min / timestep_max / rows / preserve_norm /
        interpolation: as in ``SteeringPlan``. ``None`` for strength or the layer window means the
            vector's ``calibrated_*`` metadata (the shipped MedSteer-mini vectors carry it), else the
            paper's strength 2.5 and ``default_window`` (8-16, or the whole model when it has fewer
            than 16 layers, as MedSteer-mini's 6).
    """

    vector: str | os.PathLike | PathologyVector
    strength: float | None = None
    layer_start: int | None = None
    layer_end: int | None = None
    timestep_min: float = 0.0
    timestep_max: float = 1000.0
    rows: str = "all"
    preserve_norm: bool = False
    interpolation: str = "nearest"

    def resolve(self, depth: int | None = None) -> tuple[SteeringPlan, dict]:
        """The ``SteeringPlan`` and its manifest entry (file, sha256 and every setting).

        Args:
            depth: the model's number of layers, for ``default_window`` (``None``: the paper's 8-16).
        """
        if isinstance(self.vector, PathologyVector):
            vector, file = self.vector, None
            hasher = hashlib.sha256()  # of what steers: directions, keys and provenance
            for tensor in (vector.directions, vector.timesteps):
                hasher.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
            hasher.update(json.dumps(vector.metadata, sort_keys=True).encode())
            digest = hasher.hexdigest()
        else:
            file = str(self.vector)
            vector = load_vector(file)
            digest = _sha256_file(Path(file))

        def pick(value, key: str, default, cast):
            if value is not None:
                return cast(value)
            stored = vector.metadata.get(f"calibrated_{key}")
            return cast(stored) if stored not in (None, "") else default

        window = default_window(depth)
        plan = SteeringPlan(
            vector,
            strength=pick(self.strength, "strength", 2.5, float),
            layer_start=pick(self.layer_start, "layer_start", window[0], int),
            layer_end=pick(self.layer_end, "layer_end", window[1], int),
            timestep_min=float(self.timestep_min),
            timestep_max=float(self.timestep_max),
            rows=self.rows,
            preserve_norm=bool(self.preserve_norm),
            interpolation=self.interpolation,
        )
        entry = {
            "file": file,
            "sha256": digest,
            "concept_with": vector.concept_with,
            "concept_without": vector.concept_without,
            "gain": vector.gain,
            "strength": plan.strength,
            "layer_start": plan.layer_start,
            "layer_end": plan.layer_end,
            "timestep_min": plan.timestep_min,
            "timestep_max": plan.timestep_max,
            "rows": plan.rows,
            "preserve_norm": plan.preserve_norm,
            "interpolation": plan.interpolation,
        }
        return plan, entry


def paper_heatmap_steps(steps: int) -> str:
    """The paper's Fig. 3 steps (8, 12, 14, 19 of 20) scaled to a run of ``steps`` steps."""
    paper = [int(s) for s in PAPER_FIGURE_3.steps.split(",")]
    if steps == 20:
        return PAPER_FIGURE_3.steps
    scaled = dict.fromkeys(round(s * (steps - 1) / 19) for s in paper)
    return ",".join(str(s) for s in scaled)


def _default_heatmap_layers(plan: SteeringPlan) -> str:
    paper = int(PAPER_FIGURE_3.layers)
    return str(paper if plan.covers(paper) else plan.layer_start)


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


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written file behind
        raise


def _os_reason(exc: OSError) -> str:
    reason = exc.strerror or type(exc).__name__
    return f"{reason} ({Path(exc.filename).name})" if exc.filename else reason


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _check_writable_folder(folder: Path, what: str) -> None:
    """Create and delete a file where ``folder`` is (or its nearest existing ancestor), creating nothing."""
    import tempfile

    place = _nearest_existing(folder)
    if not place.is_dir():
        raise OutputFolderError(
            f"cannot write {what} {str(folder)!r}: {str(place)!r} is a file, not a folder: choose another path"
        )
    try:
        handle, probe = tempfile.mkstemp(prefix=".medsteer-write-check-", dir=place)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise OutputFolderError(
            f"cannot write {what} {str(folder)!r}: {exc.strerror or exc} in {str(place)!r}: choose a writable "
            "folder (or fix its permissions, or free space)"
        ) from None


def check_output_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Check, before any model loads or sampling, that the file ``path`` can be written.

    Creates nothing: a file is created and deleted in the nearest existing folder above ``path``.

    Raises:
        OutputFolderError: ``path`` is a folder, or its folder cannot be written.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputFolderError(f"{flag} {str(path)!r} is a folder: give a file name, e.g. {str(path / 'out')!r}")
    _check_writable_folder(path.parent, f"{flag} file {str(path)!r} into the folder")
    return path


# -------------------------------------------------------------------------------- folder lock
try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

_LOCK = ".medsteer.lock"  # held by the one run writing a folder; removed when that run ends
_HELD: dict[str, list] = {}  # realpath -> [fd, depth, created]: this process's locks (reentrant)


def _try_lock(fd: int) -> bool:
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    import msvcrt

    try:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True


def _lock_holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


def _acquire(out_dir: Path) -> None:
    key = os.path.realpath(out_dir)
    if key in _HELD:
        _HELD[key][1] += 1
        return
    place = _nearest_existing(out_dir)
    if not place.is_dir():
        raise OutputFolderError(
            f"cannot write the output folder {str(out_dir)!r}: {str(place)!r} is a file, not a folder: choose "
            "another --out"
        )
    created = not out_dir.exists()
    path = out_dir / _LOCK
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(fd):
                os.close(fd)
                raise OutputFolderError(
                    f"{str(out_dir)!r} is being written by another medsteer run{_lock_holder(path)}: wait for it "
                    "to finish (then rerun to add missing pairs), or pass another --out folder"
                )
            try:  # the file we locked is still the folder's lock (its previous holder removes it)
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            raise OutputFolderError(f"cannot lock {str(out_dir)!r}: its lock file keeps changing; retry")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError as exc:
        raise OutputFolderError(
            f"cannot write to the output folder {str(out_dir)!r}: {_os_reason(exc)}: choose a writable --out "
            "folder (or fix its permissions, or free space)"
        ) from None
    _HELD[key] = [fd, 1, created]


def _release(out_dir: Path) -> None:
    key = os.path.realpath(out_dir)
    held = _HELD[key]
    held[1] -= 1
    if held[1]:
        return
    del _HELD[key]
    fd, _, created = held
    try:
        (out_dir / _LOCK).unlink()  # while still locked: a waiting run then sees a new file
        if created:
            out_dir.rmdir()  # only succeeds when this run wrote nothing (it failed before writing)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def lock_output_folder(out_dir: str | os.PathLike, shard: Shard | None = None):
    """Hold ``out_dir`` (created if missing) for this run: a second writer is refused at once.

    An exclusive, non-blocking lock on ``out_dir/.medsteer.lock`` (``flock``; released by the OS
    when the process ends, even if it is killed). Under torchrun rank 0 holds it for all ranks.
    Reentrant within one process. On exit the lock file is removed, and a folder this call
    created is removed again if the run left it empty.

    Raises:
        OutputFolderError: another run holds the folder, or it cannot be written.
    """
    shard = shard or Shard()
    out_dir = Path(out_dir)
    error: str | None = None
    if shard.main:
        try:
            _acquire(out_dir)
        except OutputFolderError as exc:
            error = str(exc)
    first = shard.gather(error)[0]
    if first is not None:
        raise OutputFolderError(first)
    try:
        yield out_dir
    finally:
        if shard.main:
            _release(out_dir)


# -------------------------------------------------------------------------------- records
_KINDS = ("unsteered", "steered", "gate", "mask")


def _record_problem(record) -> str | None:
    """What makes ``record`` something other than a manifest record medsteer wrote, else ``None``."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    ids = {}
    for key in ("prompt_index", "seed"):
        value = record.get(key)
        if type(value) is not int or value < 0:
            return f"{key} is {value!r}, not an integer >= 0"
        ids[key] = value
    if not isinstance(record.get("prompt"), str):
        return f"prompt is {record.get('prompt')!r}, not a string"
    settings = record.get("settings")
    if not isinstance(settings, dict):
        return f"settings is {type(settings).__name__}, not an object"
    vectors = settings.get("vectors", [])
    if not isinstance(vectors, list) or not all(isinstance(v, dict) for v in vectors):
        return "settings.vectors is not a list of objects"
    files = record.get("files")
    if not isinstance(files, dict) or not files:
        return "files is not an object of image entries"
    for kind, entry in files.items():
        expected = f"images/p{ids['prompt_index']:03d}-s{ids['seed']}-{kind}.png"
        if kind not in _KINDS:
            return f"files has an unknown kind {kind!r} (known: {', '.join(_KINDS)})"
        if not isinstance(entry, dict) or entry.get("path") != expected:
            return f"files.{kind} does not name {expected!r}"
        digest = entry.get("sha256")
        if not isinstance(digest, str) or len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            return f"files.{kind}.sha256 is not a sha256 hex digest"
    return None


def _read_records(path: Path, in_progress: bool) -> list[dict]:
    """The records of a manifest (``in_progress=False``) or of a run's part file.

    A part file's last line without its newline is a record cut short by a crash or a full disk:
    it is skipped and its pair redone. Any other line that is not a record medsteer wrote is an
    error naming the file and line.
    """
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    if tail and in_progress:
        log.warning("%s ends in an unfinished record (%d bytes): its pair is redone", path, len(tail))
    elif tail:
        lines.append(tail)
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            problem = _record_problem(record)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            problem = f"not JSON ({type(exc).__name__})"
        if problem is not None:
            raise OutputFolderError(
                f"{str(path)}:{number}: {problem}; this is not a pair record medsteer wrote: delete that line "
                "(its pair is then generated again), or use another --out folder"
            )
        records.append(record)
    return records


def _trim_unfinished_line(path: Path) -> None:
    """Cut a part file back to its last complete line, so the next record starts on a line of its own."""
    if not path.is_file():
        return
    with open(path, "rb+") as handle:
        end = handle.seek(0, os.SEEK_END)
        keep = end
        while keep > 0:
            start = max(0, keep - (1 << 16))
            handle.seek(start)
            chunk = handle.read(keep - start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            keep = start
        if keep < end:
            handle.truncate(keep)


def _append_record(fd: int, line: bytes) -> None:
    """Append one record line; on a write error (full disk) cut the file back to where it was."""
    start = os.fstat(fd).st_size
    try:
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, start)
        raise


def _existing_records(out_dir: Path) -> dict[tuple[int, int], dict]:
    found: dict[tuple[int, int], dict] = {}
    for record in _read_records(out_dir / MANIFEST, in_progress=False):
        found[(record["prompt_index"], record["seed"])] = record
    for part in sorted((out_dir / _PARTS).glob("rank-*.jsonl")):
        for record in _read_records(part, in_progress=True):
            found[(record["prompt_index"], record["seed"])] = record
    return found


def _files_intact(out_dir: Path, record: dict) -> bool:
    for entry in record["files"].values():
        path = out_dir / entry["path"]  # images/p...png: checked by _record_problem
        if not path.is_file() or _sha256_file(path) != entry["sha256"]:
            return False
    return True


def _settings_difference(old: dict, new: dict) -> list[str]:
    def comparable(settings: dict) -> dict:
        out = dict(settings)
        out["vectors"] = [{k: v for k, v in entry.items() if k != "file"} for entry in settings.get("vectors", [])]
        return out

    a, b = comparable(old), comparable(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def generate(
    model: PixArtModel,
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
    if not steers:
        raise ValueError("generate needs at least one vector to steer with")
    prompts = [str(p) for p in prompts]
    if not prompts or not all(p.strip() for p in prompts):
        raise ValueError("generate needs at least one non-empty prompt (the prompt WITH the concept)")
    cfg = model.default_cfg if cfg is None else cfg
    spec = model.spec(steps, cfg, height, width)
    resolved = [steer.resolve(model.sites.depth) for steer in steers]
    plans = [plan for plan, _ in resolved]
    for plan in plans:
        plan.validate(model.sites)
    if not 0 <= heatmap_plan < len(plans):
        raise ValueError(f"heatmap_plan {heatmap_plan} is out of range: {len(plans)} vector(s) given")
    if heatmaps:
        heatmap_steps = heatmap_steps or paper_heatmap_steps(spec.steps)
        parse_steps(heatmap_steps, spec.steps)  # before sampling, not after the first pair
        heatmap_layers = heatmap_layers or _default_heatmap_layers(plans[heatmap_plan])
    settings = {
        **model.provenance(),
        "negative_prompt": negative_prompt,
        "steps": spec.steps,
        "cfg": spec.cfg,
        "scheduler": scheduler,
        "height": spec.height * model.latent_scale,
        "width": spec.width * model.latent_scale,
        "batch_size": batch_size,
        "vectors": [entry for _, entry in resolved],
        "heatmaps": {"steps": heatmap_steps, "layers": heatmap_layers, "plan": heatmap_plan, "colormap": colormap}
        if heatmaps
        else None,
        "medsteer_version": __version__,
    }
    out_dir = Path(out_dir)
    batches = _batches(list(seeds), batch_size)
    units = [(p, batch) for p in range(len(prompts)) for batch in batches]
    with lock_output_folder(out_dir, shard):
        try:
            return _generate_units(
                model,
                plans,
                prompts,
                units,
                out_dir,
                settings,
                spec,
                negative_prompt,
                scheduler,
                heatmaps,
                heatmap_steps,
                heatmap_layers,
                heatmap_plan,
                colormap,
                shard,
                progress,
            )
        except OSError as exc:  # a full disk, a folder made read-only mid-run, ...
            raise OutputFolderError(
                f"cannot write to the output folder {str(out_dir)!r}: {_os_reason(exc)}: free space (or fix "
                "permissions) and rerun the same command; finished pairs are kept"
            ) from exc


def _generate_units(
    model,
    plans,
    prompts,
    units,
    out_dir,
    settings,
    spec,
    negative_prompt,
    scheduler,
    heatmaps,
    heatmap_steps,
    heatmap_layers,
    heatmap_plan,
    colormap,
    shard,
    progress,
) -> GenerateReport:
    """``generate``'s work, with ``out_dir`` locked."""
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
            common = {"negative_prompt": negative_prompt, "scheduler": scheduler}
            step = lambda k, n: bar.update(1)  # noqa: E731
            plain = model.sample(prompts[p], batch, spec, progress=step, **common)
            record = GateRecord() if heatmaps else None
            steered = model.sample(prompts[p], batch, spec, plans=plans, record=record, progress=step, **common)
            gates = record.maps(heatmap_plan) if record is not None else None
            images = {"unsteered": model.decode(plain), "steered": model.decode(steered)}
            for b, seed in enumerate(batch):
                stem = f"images/p{p:03d}-s{seed}"
                files = {}
                blobs = {kind: _png(images[kind][b]) for kind in ("unsteered", "steered")}
                if gates is not None:
                    grid, mask = _pair_heatmap(gates, b, heatmap_steps, heatmap_layers, colormap, images["steered"][b])
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
        records = _existing_records(out_dir)
        lines = [json.dumps(records[key], sort_keys=True) + "\n" for key in sorted(records)]
        _write_atomic(manifest, "".join(lines).encode())
        for leftover in (out_dir / _PARTS).glob("rank-*.jsonl"):
            leftover.unlink()
        (out_dir / _PARTS).rmdir()
        for stale in (out_dir / "images").glob(".*.tmp"):  # half-written files of a crashed run
            stale.unlink()
    shard.barrier()
    written_total = sum(shard.gather(len(written)))
    skipped = sum(len(batch) for p, batch in units) - written_total
    return GenerateReport(out_dir, manifest, written_total, skipped, written)


def _gate_picture(gates: GateMaps, image: int, steps: str, layers: str, **style):
    """The gate grid of one image of a batch as a PIL image (rows: steps, columns: layers, as
    GateHeatmap draws it), and the selected ``[steps, layers, h, w]`` maps."""
    from PIL import Image

    maps, step_labels, layer_labels = select_maps(gates, steps, layers, image)
    grid = gate_grid(maps, step_labels, layer_labels, **style)
    return Image.fromarray((grid.numpy() * 255).round().astype("uint8")), maps


def _pair_heatmap(gates: GateMaps, image: int, steps: str, layers: str, colormap: str, picture):
    """The gate grid and the 0-255 mask (``heatmap.selection_mask``: the selected gates averaged
    over steps and layers, at image size) of one image."""
    from PIL import Image

    grid, maps = _gate_picture(gates, image, steps, layers, colormap=colormap)
    mask = selection_mask(maps, (picture.height, picture.width))
    return grid, Image.fromarray((mask.numpy() * 255).round().astype("uint8"), mode="L")


# ================================================================================ heatmap
@dataclass
class Heatmap:
    """The gate grid of one seed (the paper's Fig. 3) with the images it belongs to."""

    grid: object  # PIL image
    steered: object
    unsteered: object
    gates: GateMaps
    steps: str
    layers: str


def gate_heatmap(
    model: PixArtModel,
    steers: Sequence[Steer],
    prompt: str,
    seed: int,
    *,
    negative_prompt: str = "",
    steps: int = 20,
    cfg: float | None = None,
    scheduler: str = "default",
    height: int | None = None,
    width: int | None = None,
    at_steps: str | None = None,
    layers: str | None = None,
    plan: int = 0,
    colormap: str = "viridis",
    cell: int = 128,
    per_map: bool = True,
) -> Heatmap:
    """Sample one seed steered and unsteered and draw the gate grid (rows: steps, columns: layers).

    Defaults draw the paper's Fig. 3: layer 8 at steps 8, 12, 14 and 19 of 20 (scaled to other
    step counts; the window's first layer if layer 8 is not steered).

    Args:
        per_map: normalise each map by its own maximum (shape) or all by one (size).
        cell: pixels per map side.
        (the rest as in ``generate``)
    """
    resolved = [steer.resolve(model.sites.depth) for steer in steers]
    plans = [p for p, _ in resolved]
    if not 0 <= plan < len(plans):
        raise ValueError(f"plan {plan} is out of range: {len(plans)} vector(s) given")
    if type(cell) is not int or cell < 1:
        raise MedSteerError(f"cell must be a whole number of pixels >= 1, got {cell!r} (the default is 128)")
    cfg = model.default_cfg if cfg is None else cfg
    spec = model.spec(steps, cfg, height, width)
    at_steps = at_steps or paper_heatmap_steps(spec.steps)
    parse_steps(at_steps, spec.steps)  # a step the run does not have: refused before sampling
    layers = layers or _default_heatmap_layers(plans[plan])
    record = GateRecord()
    common = {"negative_prompt": negative_prompt, "scheduler": scheduler}
    steered = model.sample(prompt, [seed], spec, plans=plans, record=record, **common)
    unsteered = model.sample(prompt, [seed], spec, **common)
    gates = record.maps(plan)
    grid, _ = _gate_picture(gates, 0, at_steps, layers, cell=cell, colormap=colormap, per_map=per_map)
    return Heatmap(grid, model.decode(steered)[0], model.decode(unsteered)[0], gates, at_steps, layers)


# ================================================================================ inspect
def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine along the last axis; NaN where either row is zero (undefined)."""
    a, b = a.double(), b.double()
    norms = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(norms > 0, (a * b).sum(-1) / norms.clamp_min(1e-300), torch.full_like(norms, float("nan")))


def _finite_or_none(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def inspect_vector(
    vector: PathologyVector | str | os.PathLike,
    halves: tuple[PathologyVector, PathologyVector] | None = None,
) -> dict:
    """A vector's metadata, shapes and quality numbers, as plain JSON-able data.

    Args:
        vector: a vector or a file (whose halves, if ``save_built`` wrote them, are read too).
        halves: two vectors built from disjoint halves of the seeds (overrides the files).

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
        built = load_built(file)
        vector, halves = built.vector, halves or built.halves
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
    seed_stability: dict = {"available": False, "reason": ""}
    if halves is None:
        seed_stability["reason"] = (
            "no halves: build with `medsteer build-vector` from at least two seed batches (it writes "
            "<name>.halves/), or build two vectors on disjoint seed ranges and pass them with --halves"
        )
    else:
        a, b = halves
        if a.directions.shape != directions.shape or b.directions.shape != directions.shape:
            seed_stability["reason"] = "the halves do not have the vector's shape (different steps or model)"
        else:
            cosines = _cosine(a.directions, b.directions)  # [K, L]
            finite = cosines[torch.isfinite(cosines)]
            seed_stability = {
                "available": True,
                "per_layer": [_finite_or_none(cosines[:, layer].nanmean()) for layer in range(depth)],
                "per_step": [_finite_or_none(cosines[i].nanmean()) for i in range(k)],
                "mean": _finite_or_none(cosines.nanmean()),
                "min": _finite_or_none(finite.min()) if finite.numel() else None,
                "images": [int(a.count_with.max()), int(b.count_with.max())],
            }
    for layer, entry in enumerate(per_layer):
        entry["halves_cosine"] = seed_stability["per_layer"][layer] if seed_stability["available"] else None
    return {
        "file": str(file) if file is not None else None,
        "sha256": _sha256_file(file) if file is not None else None,
        "metadata": dict(vector.metadata),
        "format_version": vector.metadata.get("format_version", ""),
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
    }


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


def format_inspection(report: dict) -> str:
    """The text ``medsteer inspect`` and the InspectPathologyVector node show for an ``inspect_vector`` report."""
    meta = report["metadata"]
    shapes = report["shapes"]
    lines = [f"vector: {report['file']}" + (f"  (sha256 {report['sha256'][:16]}...)" if report["sha256"] else "")]
    lines.append(
        f"concept: {meta.get('concept_with', '')!r} vs {meta.get('concept_without', '')!r}   gain {report['gain']:g}"
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
    lines.append("per layer (means over timesteps; |diff| = norm of mean-with minus mean-without):")
    lines.append("  layer      |diff|   relative  adjacent-t cos  first-last cos  seed-halves cos")
    for e in report["per_layer"]:
        lines.append(
            f"  {e['layer']:>5}  {_fmt_value(e['difference_norm'], '10.4g')}  {_fmt_value(e['relative_norm'], '9.4f')}"
            f"  {_fmt_value(e['adjacent_cosine'], '14.4f')}  {_fmt_value(e['first_last_cosine'], '14.4f')}"
            f"  {_fmt_value(e['halves_cosine'], '15.4f')}"
        )
    lines.append("")
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

    from .heatmap import apply_colormap

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
