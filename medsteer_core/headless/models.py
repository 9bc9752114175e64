"""Loading a model for the headless route: ``load_model`` and ``HeadlessModel`` (diffusers PixArt-alpha /
PixArt-Sigma, Stable Diffusion 1.x / 2.x / XL from ``sd_models``, or MedSteer-mini, which is imported
only when asked for).
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

from ..backbones import find_sites, tag_family
from ..driver import SamplingSpec, sample
from ..errors import MedSteerError
from ..estimate import VectorEstimator
from ..gates import GateRecord
from ..plan import SteeringPlan
from .distributed import Shard, _resolve_device
from .lora import apply_lora
from .sources import _PIPELINE_FAMILIES, ModelLoadError, _offline, _quiet_libraries

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


class HeadlessModel:
    """A loaded text-to-image model: what the commands sample, steer and decode.

    Attributes:
        transformer: the denoiser whose cross-attention is steered: a ``PixArtTransformer2DModel``
            (LoRA merged in, if one was given) or a ``UNet2DConditionModel``.
        sites: its ``Sites`` (widths, token grids, names).
        family: ``"pixart-alpha"``, ``"pixart-sigma"``, ``"medsteer-mini"``, or the UNet's family
            from its backbone (``"sd1"``, ``"sd2"``, ``"sdxl"``, ...).
        source: the folder, hub id or file it was loaded from.
        lora: the LoRA folder applied, or ``None``.
        dtype: weight dtype of the networks.
        device: where sampling runs (the accelerator when components are CPU-offloaded).
        default_cfg: the model's usual guidance scale.

    Use ``load_model`` to make one.
    """

    default_cfg = 4.5

    def __init__(
        self, transformer: nn.Module, family: str | None, source: str, dtype: torch.dtype, device: torch.device
    ):
        self.transformer = transformer
        if family:  # the loader knows the variant (pixart-alpha / -sigma); None: the backbone's own
            tag_family(transformer, family)
        self.sites = find_sites(transformer)
        self.family = self.sites.family
        self.source = source
        self.dtype = dtype
        self.device = device
        self.lora: str | None = None
        self.lora_sha256: str | None = None
        self.unet: str | None = None  # a bare UNet folder that replaced the pipeline's own
        self._prompts: dict[tuple[str, str, bool], tuple] = {}

    # ---------------------------------------------------------------- what subclasses provide
    @property
    def latent_channels(self) -> int:
        """Channels of the latent the model denoises (``Sites.latent_channels``)."""
        return self.sites.latent_channels

    @property
    def latent_scale(self) -> int:
        """Image pixels per latent pixel (``Sites.pixel_scale``)."""
        return self.sites.pixel_scale

    @property
    def default_size(self) -> tuple[int, int]:
        """``(height, width)`` in image pixels the transformer was trained at."""
        side = int(self.transformer.config.sample_size) * self.latent_scale
        return side, side

    def _encode(self, prompt: str, negative_prompt: str, guided: bool) -> tuple:
        """``(embeds, mask, negative_embeds, negative_mask, ...)``: what ``encode`` caches (a
        subclass may append what its ``_inputs`` needs, such as SDXL's pooled embeddings)."""
        raise NotImplementedError

    def _inputs(self, encoded: tuple, spec: SamplingSpec) -> dict:
        """The conditioning keyword arguments of ``driver.sample`` for one encoded prompt."""
        embeds, mask, negative, negative_mask = encoded[:4]
        return {
            "prompt_embeds": embeds,
            "negative_embeds": negative,
            "prompt_mask": mask,
            "negative_mask": negative_mask,
        }

    def _base_scheduler(self):
        raise NotImplementedError

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` images in -1..1 from final latents."""
        raise NotImplementedError

    # ---------------------------------------------------------------- shared
    def encode(self, prompt: str, negative_prompt: str = "", guided: bool = True) -> tuple:
        """``(embeds, mask, negative_embeds, negative_mask)`` of a prompt (cached per prompt)."""
        return self._encoded(prompt, negative_prompt, guided)[:4]

    def _encoded(self, prompt: str, negative_prompt: str, guided: bool) -> tuple:
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
        scale = self.latent_scale
        if height % scale or width % scale or height <= 0 or width <= 0:
            raise ValueError(
                f"image size {width}x{height} must be positive multiples of {scale} for this model "
                f"({scale} image pixels per latent pixel)"
            )
        try:  # the backbone's own rule for latent sizes (PixArt: whole patches; UNets: any size)
            self.sites.check_latent(height // scale, width // scale)
        except MedSteerError as exc:
            raise ValueError(f"image size {width}x{height} does not fit this model: {exc}") from None
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
        inputs = self._inputs(self._encoded(prompt, negative_prompt, guided), spec)
        return sample(
            self.transformer,
            self.scheduler(scheduler),
            seeds=list(seeds),
            spec=spec,
            **inputs,
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
        unet = {"unet": self.unet} if self.unet is not None else {}
        return {
            "model": self.source,
            **unet,
            "model_family": self.family,
            "lora": self.lora,
            "lora_sha256": self.lora_sha256,
            "dtype": _dtype_name(self.dtype),
            "device_type": self.device.type,
        }


class DiffusersModel(HeadlessModel):
    """A model inside a diffusers pipeline: its scheduler, its VAE, its scale factor."""

    def __init__(self, pipe, denoiser: nn.Module, family: str | None, source: str, dtype, device: torch.device):
        super().__init__(denoiser, family, source, dtype, device)
        self.pipe = pipe

    @property
    def latent_scale(self) -> int:
        """Image pixels per latent pixel: the pipeline's VAE factor (a VAE with fewer blocks than SD's
        has a smaller one), else ``Sites.pixel_scale``."""
        return int(getattr(self.pipe, "vae_scale_factor", self.sites.pixel_scale))

    def _base_scheduler(self):
        return self.pipe.scheduler.__class__.from_config(self.pipe.scheduler.config)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        latents = latents.to(self.device, vae.dtype) / vae.config.scaling_factor
        return vae.decode(latents, return_dict=False)[0]


class _DiffusersPixArt(DiffusersModel):
    """A diffusers ``PixArtAlphaPipeline`` / ``PixArtSigmaPipeline``."""

    def __init__(self, pipe, family: str, source: str, dtype: torch.dtype, device: torch.device):
        super().__init__(pipe, pipe.transformer, family, source, dtype, device)

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


class _MiniPixArt(HeadlessModel):
    """MedSteer-mini (``medsteer_core.mini``): pixel space, its own DDIM schedule; its PixArt or its
    UNet (MedSteer-mini-UNet), whose family the mini's backbone tells (``medsteer-mini`` /
    ``medsteer-mini-unet``)."""

    default_cfg = 4.0

    def __init__(self, mini, source: str, dtype: torch.dtype, device: torch.device):
        super().__init__(mini.transformer, None, source, dtype, device)
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


def _load_mini(path: Path, name: str, dtype: torch.dtype, device: torch.device) -> HeadlessModel:
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
    unet: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
    lora: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = "auto",
    offload: bool = False,
    offline: bool | None = None,
    shard: Shard | None = None,
    quiet: bool = False,
) -> HeadlessModel:
    """Load a PixArt-alpha / PixArt-Sigma, Stable Diffusion 1.x / 2.x / XL pipeline (or MedSteer-mini)
    ready to sample and steer. Everything local is read offline.

    Args:
        source: a local diffusers pipeline folder (``model_index.json`` + ``transformer/`` or
            ``unet/``, ``text_encoder/``, ``tokenizer/``, ``vae/``, ``scheduler/``; SDXL also
            ``text_encoder_2/``, ``tokenizer_2/``), a Hugging Face hub id such as
            ``PixArt-alpha/PixArt-XL-2-512x512``, a single-file SD checkpoint (with ``config``),
            ``"mini"`` or ``None`` for the shipped MedSteer-mini, or a MedSteer-mini ``.safetensors`` file.
        unet: a bare diffusers UNet folder (``config.json`` + ``diffusion_pytorch_model.safetensors``)
            that replaces the UNet of the SD pipeline ``source`` (MINIM's ``unets/<id>/unet`` over
            Stable Diffusion 1.4). Its cross-attention width must match the pipeline's text encoders.
        config: for a single-file ``source``: a local diffusers folder of the same architecture whose
            component configs and tokenizer files are read (diffusers would download them).
        lora: a folder in the authors' layout (PixArt only): ``transformer_lora/`` and/or
            ``text_encoder_lora/``, each a PEFT adapter (``adapter_config.json`` +
            ``adapter_model.safetensors``). Applied with PEFT (scale ``lora_alpha / r`` per module)
            and merged into the weights.
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
        ModelLoadError: a missing folder or file, a folder that is not a supported pipeline, a
            checkpoint in a format the CLI does not read, a UNet or LoRA that does not fit.
    """
    shard = shard or Shard()
    torch_device = _resolve_device(device, shard)
    torch_dtype = _resolve_dtype(dtype, torch_device)
    if offload:
        _check_offload(torch_device)
    _quiet_libraries(quiet)
    mini_path = _mini_path(None if source is None else str(source))
    if mini_path is not None:
        if lora is not None or unet is not None or config is not None:
            flag = "--lora" if lora is not None else "--unet" if unet is not None else "--config"
            raise ModelLoadError(f"{flag} applies to diffusers pipelines, not to MedSteer-mini: drop it")
        return _load_mini(mini_path, "mini" if source in (None, "mini") else str(source), torch_dtype, torch_device)
    if lora is not None and not Path(lora).expanduser().is_dir():  # before minutes of loading the model
        raise ModelLoadError(f"no LoRA folder at {str(lora)!r}: check the path")
    if lora is not None and (unet is not None or config is not None):
        raise ModelLoadError(_SD_LORA)
    return _load_diffusers(
        str(source),
        str(unet) if unet is not None else None,
        str(config) if config is not None else None,
        lora,
        torch_dtype,
        torch_device,
        offload,
        _offline(offline),
    )


_SD_LORA = (
    "--lora reads the MedSteer LoRA layout of PixArt pipelines; for a Stable Diffusion LoRA, fuse it into the "
    "pipeline first (pipe.load_lora_weights(...); pipe.fuse_lora(); pipe.save_pretrained(folder)) and pass that "
    "folder with --model"
)


def _load_diffusers(source, unet, config, lora, dtype, device, offload, offline) -> HeadlessModel:
    """A diffusers pipeline (with its UNet replaced, its LoRA merged), on its device, wrapped."""
    from .sd_sources import UNET_PIPELINES, open_pipeline

    pipe, name = open_pipeline(source, dtype, offline, unet=unet, config=config)
    if lora is not None and name in UNET_PIPELINES:
        raise ModelLoadError(_SD_LORA)
    model_lora, lora_sha = None, None
    if lora is not None:
        model_lora, lora_sha = apply_lora(pipe, lora)
    if offload:
        pipe.enable_model_cpu_offload(device=device)
        execution = torch.device(pipe._execution_device)
    else:
        pipe.to(device)
        execution = device
    pipe.set_progress_bar_config(disable=True)
    if name in UNET_PIPELINES:
        from .sd_models import stable_diffusion_model

        model = stable_diffusion_model(pipe, name, source, dtype, execution)
    else:
        model = _DiffusersPixArt(pipe, _PIPELINE_FAMILIES[name], source, dtype, execution)
    model.lora, model.lora_sha256, model.unet = model_lora, lora_sha, unet
    return model
