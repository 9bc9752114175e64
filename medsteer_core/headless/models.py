"""Loading a model for the headless route: ``load_model`` and ``PixArtModel`` (diffusers PixArt-alpha /
PixArt-Sigma, or MedSteer-mini, which is imported only when asked for).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from ..backbones import find_sites
from ..driver import SamplingSpec, sample
from ..estimate import VectorEstimator
from ..gates import GateRecord
from ..plan import SteeringPlan
from .distributed import Shard, _resolve_device
from .lora import apply_lora
from .sources import ModelLoadError, _load_pipeline, _offline, _quiet_libraries

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
    from .. import mini

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


def _check_offload(device: torch.device) -> None:
    """Refuse ``offload`` where it cannot work, before anything loads."""
    if device.type == "cpu":
        raise ModelLoadError(
            "offload moves components between the CPU and an accelerator, but the device is the CPU: "
            "drop --offload, or pass --device cuda"
        )
    if importlib.util.find_spec("accelerate") is None:
        raise ModelLoadError("offload needs the accelerate package: pip install accelerate (or drop --offload)")


def _load_mini(path: Path, name: str, dtype: torch.dtype, device: torch.device) -> PixArtModel:
    """MedSteer-mini from ``path`` (imported only here: the headless route does not need it)."""
    from .. import mini

    if not path.is_file():
        raise ModelLoadError(
            "the shipped MedSteer-mini model is not installed (asked for by --model mini or by giving no "
            "--model): pass --model with a diffusers PixArt folder or a hub id such as "
            "PixArt-alpha/PixArt-XL-2-512x512"
        )
    loaded = mini.load_mini(path)
    loaded.transformer.to(device, dtype)
    loaded.text_encoder.to(device, dtype)
    return _MiniPixArt(loaded, name, dtype, device)


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
        _check_offload(torch_device)
    _quiet_libraries(quiet)
    mini_path = _mini_path(None if source is None else str(source))
    if mini_path is not None:
        if lora is not None:
            raise ModelLoadError("--lora applies to PixArt diffusers pipelines, not to MedSteer-mini")
        return _load_mini(mini_path, "mini" if source in (None, "mini") else str(source), torch_dtype, torch_device)

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
