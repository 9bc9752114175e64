"""Stable Diffusion weights that are not one whole pipeline folder, read offline: a bare diffusers UNet
folder over a base pipeline (MINIM's ``unets/<id>/unet`` over Stable Diffusion 1.4), and a single-file
SD checkpoint (``.safetensors`` / ``.ckpt``) read with the component configs of a local diffusers
folder. ``open_pipeline`` is the one entry: it sends a source to the right reader and checks that the
pieces fit together (the UNet's cross-attention width against the text encoders').
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .sources import _UNUSED, SUPPORTED, ModelLoadError, _check_pipeline_folder, _config_class, _load_pipeline

log = logging.getLogger("medsteer")

#: Pipeline classes that have a UNet (the ones ``--unet`` and ``--config`` apply to).
UNET_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
#: Suffixes read as single-file checkpoints.
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_CONFIG_HINT = (
    "a local diffusers pipeline folder of the same architecture (e.g. a saved stable-diffusion-v1-5, "
    "stable-diffusion-2-1-base or stable-diffusion-xl-base-1.0 folder: model_index.json, unet/, vae/, "
    "text_encoder/, tokenizer/, scheduler/; only its configs and tokenizer files are read)"
)


def open_pipeline(source: str, dtype: torch.dtype, offline: bool, unet: str | None = None, config: str | None = None):
    """``(pipeline, class name)`` for ``--model source [--unet folder] [--config folder]``.

    Raises:
        ModelLoadError: a missing path, a folder of the wrong layout, a flag that does not apply to
            this source, or a UNet whose cross-attention does not fit the pipeline's text encoders.
    """
    path = Path(source).expanduser()
    single_file = path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES
    if config is not None and not single_file:
        raise ModelLoadError(
            f"--config gives the component configs of a single-file checkpoint, but {source!r} is not a file "
            f"({', '.join(SINGLE_FILE_SUFFIXES)}): drop --config (a pipeline folder carries its own configs)"
        )
    if unet is not None and path.is_dir():
        name = _check_pipeline_folder(path)["_class_name"]
        if name not in UNET_PIPELINES:
            raise ModelLoadError(
                f"--unet replaces the UNet of a Stable Diffusion pipeline, but {source!r} is a {name}: pass a "
                "Stable Diffusion 1.x / 2.x / XL pipeline folder with --model (for MINIM: Stable Diffusion 1.4)"
            )
    components = {"unet": load_unet_folder(unet, dtype)} if unet is not None else {}
    if single_file:
        pipe, name = load_single_file(path, config, dtype, components)
    else:
        pipe, name = _load_pipeline(source, dtype, offline, **components)
    if unet is not None and name not in UNET_PIPELINES:  # a hub id, known only once loaded
        raise ModelLoadError(f"--unet replaces the UNet of a Stable Diffusion pipeline, but {source!r} is a {name}")
    if name in UNET_PIPELINES:
        check_text_width(pipe, source, unet)
    return pipe, name


def load_unet_folder(folder: str, dtype: torch.dtype):
    """A ``UNet2DConditionModel`` from a bare diffusers folder (``config.json`` + weights), offline.

    Raises:
        ModelLoadError: no such folder, a file, a whole pipeline, a parent of ``unet/``, another
            model class, or no weights; each message says what to pass instead.
    """
    from diffusers import UNet2DConditionModel

    path = Path(folder).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"no UNet folder at {folder!r} ({str(path.absolute())!r} does not exist): check the path (MINIM keeps "
            "one UNet per modality under unets/<id>/unet)"
        )
    if path.is_file():
        raise ModelLoadError(
            f"--unet takes a diffusers UNet folder (config.json + diffusion_pytorch_model.safetensors), and "
            f"{folder!r} is a file; for a single-file checkpoint pass --model FILE --config FOLDER"
        )
    if (path / "model_index.json").is_file():
        raise ModelLoadError(
            f"{folder!r} is a whole pipeline: pass it with --model, or its UNet {str(path / 'unet')!r} with --unet"
        )
    if not (path / "config.json").is_file():
        if (path / "unet" / "config.json").is_file():
            raise ModelLoadError(f"{folder!r} holds a unet/ folder: pass {str(path / 'unet')!r} with --unet")
        raise ModelLoadError(
            f"{folder!r} has no config.json, so it is not a diffusers UNet folder (UNet2DConditionModel."
            "save_pretrained writes config.json and diffusion_pytorch_model.safetensors)"
        )
    kind = _config_class(path / "config.json")
    if kind != "UNet2DConditionModel":
        raise ModelLoadError(f"{folder!r} holds a {kind}, not a UNet2DConditionModel: pass a Stable Diffusion UNet")
    if not any(path.glob("diffusion_pytorch_model*")):
        raise ModelLoadError(
            f"{folder!r} has a config.json but no weights (diffusion_pytorch_model.safetensors): copy the whole folder"
        )
    try:
        return UNet2DConditionModel.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the UNet in {folder!r}: {_first_line(exc)}") from None


def load_single_file(path: Path, config: str | None, dtype: torch.dtype, components: dict):
    """``(pipeline, class name)`` of a single-file SD checkpoint, with the configs of ``config``.

    diffusers would download the configs from the hub when none are given, so the CLI asks for a
    local folder instead and never goes online.
    """
    if config is None:
        kind = "a pickle checkpoint" if path.suffix.lower() != ".safetensors" else "a single-file checkpoint"
        raise ModelLoadError(
            f"{str(path)!r} is {kind}. A single-file Stable Diffusion checkpoint is read offline with the component "
            f"configs of {_CONFIG_HINT}: pass that folder with --config. Single-file PixArt checkpoints load in "
            "the ComfyUI nodes; convert one with diffusers' scripts/convert_pixart_alpha_to_diffusers.py"
        )
    folder = Path(config).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"no --config folder at {config!r}: pass {_CONFIG_HINT}")
    name = _check_pipeline_folder(folder)["_class_name"]
    if name not in UNET_PIPELINES:
        raise ModelLoadError(
            f"--config {config!r} is a {name}; single-file checkpoints are read as Stable Diffusion 1.x / 2.x / "
            f"XL ({', '.join(UNET_PIPELINES)}); other {SUPPORTED} load from their diffusers folders"
        )
    from .sources import _pipeline_class

    try:
        pipe = _pipeline_class(name).from_single_file(
            str(path), config=str(folder), local_files_only=True, dtype=dtype, **_UNUSED.get(name, {}), **components
        )
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise ModelLoadError(
            f"cannot read {str(path)!r} as a {name} checkpoint with the configs of {config!r} "
            f"({_first_line(exc)}): is --config a folder of the same architecture (SD 1.x, 2.x or XL) as the file?"
        ) from None
    return pipe, name


def check_text_width(pipe, source: str, unet: str | None) -> None:
    """Refuse a UNet whose cross-attention width is not the text encoders' (an SDXL UNet over an SD 1.x
    pipeline, an SD 2.x one over SD 1.x, ...), before the first sample fails deep in a matmul."""
    encoders = [getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2")]
    text = sum(int(e.config.hidden_size) for e in encoders if e is not None)
    width = pipe.unet.config.cross_attention_dim
    width = int(width[0] if isinstance(width, (list, tuple)) else width)
    if text and width != text:
        what = f"the UNet {unet!r}" if unet is not None else f"the UNet of {source!r}"
        raise ModelLoadError(
            f"{what} reads text of width {width}, but the text encoder(s) of {source!r} give {text}: the UNet was "
            "trained on another base model (SD 1.x: 768, SD 2.x: 1024, SDXL: 2048); pass the base pipeline it was "
            "fine-tuned from with --model"
        )


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
