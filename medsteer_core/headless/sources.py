"""Where a headless model comes from: a local diffusers pipeline folder (PixArt-alpha / -Sigma, Stable
Diffusion 1.x / 2.x, SDXL; checked before diffusers reads it) or a hub id. Bare UNet folders and
single-file SD checkpoints are ``sd_sources``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from ..errors import MedSteerError
from ..weights import looks_like_local_path


class ModelLoadError(MedSteerError):
    """A model folder, hub id or LoRA adapter cannot be loaded as asked."""


log = logging.getLogger("medsteer")
#: The authors' LoRA layout: model part -> its adapter's subfolder.
_LORA_PARTS = {"transformer": "transformer_lora", "text_encoder": "text_encoder_lora"}


#: Pipeline class -> the model family written into vectors (``None``: the UNet backbone's own).
_PIPELINE_FAMILIES = {
    "PixArtAlphaPipeline": "pixart-alpha",
    "PixArtSigmaPipeline": "pixart-sigma",
    "StableDiffusionPipeline": None,
    "StableDiffusionXLPipeline": None,
}
#: Pipeline class -> the component folders it needs (its model_index.json may mark some null).
_COMPONENTS = {
    "PixArtAlphaPipeline": ("transformer", "text_encoder", "tokenizer", "vae", "scheduler"),
    "PixArtSigmaPipeline": ("transformer", "text_encoder", "tokenizer", "vae", "scheduler"),
    "StableDiffusionPipeline": ("unet", "text_encoder", "tokenizer", "vae", "scheduler"),
    "StableDiffusionXLPipeline": (
        "unet",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "vae",
        "scheduler",
    ),
}
#: Components MedSteer never uses, left unloaded (the safety checker's CLIP vision model, ...).
_UNUSED = {
    "StableDiffusionPipeline": {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False},
    "StableDiffusionXLPipeline": {"feature_extractor": None, "image_encoder": None},
}
SUPPORTED = "PixArt-alpha / PixArt-Sigma, Stable Diffusion 1.x / 2.x and SDXL pipelines"


def _offline(offline: bool | None) -> bool:
    if offline is not None:
        return offline
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _quiet_libraries(quiet: bool) -> None:
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        if quiet:
            library.utils.logging.disable_progress_bar()
        library.utils.logging.set_verbosity_error()


def _pipeline_class(name: str):
    import diffusers

    return getattr(diffusers, name)


def _load_pipeline(source: str, dtype: torch.dtype, offline: bool, **components):
    """``(pipeline, class name)`` of a local folder or hub id; ``components`` replace the pipeline's
    own (``unet=`` for a bare UNet folder)."""
    from diffusers import DiffusionPipeline

    path = Path(source).expanduser()
    if path.exists():
        index = _check_pipeline_folder(path)
        name = index["_class_name"]
        if "transformer" in _COMPONENTS[name]:
            _check_transformer_weights(path / "transformer")
        try:
            pipe = _pipeline_class(name).from_pretrained(
                str(path), dtype=dtype, local_files_only=True, **_UNUSED.get(name, {}), **components
            )
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load the pipeline in {str(path)!r}: {exc}") from None
        return pipe, name
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
    if name not in _PIPELINE_FAMILIES:
        raise ModelLoadError(
            f"{source!r} is a {name} pipeline; medsteer steers {SUPPORTED} ({', '.join(_PIPELINE_FAMILIES)}), "
            "e.g. PixArt-alpha/PixArt-XL-2-512x512"
        )
    extra = {**_UNUSED.get(name, {}), **components}
    try:
        pipe = _pipeline_class(name).from_pretrained(source, dtype=dtype, local_files_only=cached, **extra)
    except OSError:
        if not cached or offline:
            raise
        pipe = _pipeline_class(name).from_pretrained(source, dtype=dtype, **extra)  # cache incomplete: fetch the rest
    return pipe, name


def _check_transformer_weights(folder: Path) -> None:
    """The transformer's config.json against its weights' shapes (safetensors headers only) and its
    shard index, before diffusers builds the model: diffusers silently drops weights a shorter
    config has no place for, and fails with "Cannot copy out of meta tensor" on a longer one
    (issue 12, F12/F13)."""
    from ..weights import CheckpointError, check_diffusers_transformer

    if not folder.is_dir():
        return
    try:
        check_diffusers_transformer(folder)
    except CheckpointError as exc:
        raise ModelLoadError(f"the transformer in {str(folder)!r} cannot be loaded: {exc}") from None


def _check_pipeline_folder(path: Path) -> dict:
    """The ``model_index.json`` of a supported pipeline folder, or a ``ModelLoadError`` that says what
    the folder is instead and what to pass."""
    if path.is_file():
        kind = "a pickle checkpoint" if path.suffix in (".pth", ".pt", ".bin", ".ckpt") else "a single file"
        raise ModelLoadError(
            f"{str(path)!r} is {kind}; the CLI loads diffusers pipeline folders (model_index.json + transformer/ "
            "or unet/, text_encoder/, tokenizer/, vae/, scheduler/), hub ids such as "
            "PixArt-alpha/PixArt-XL-2-512x512, and single-file Stable Diffusion checkpoints with --config (a "
            "local diffusers folder of the same architecture). Single-file PixArt checkpoints load in the "
            "ComfyUI nodes; convert one with diffusers' scripts/convert_pixart_alpha_to_diffusers.py"
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
        if _config_class(path / "config.json") == "UNet2DConditionModel" or (path / "unet" / "config.json").is_file():
            raise ModelLoadError(
                f"{str(path)!r} is a bare diffusers UNet, not a pipeline: pass the base pipeline it was trained "
                "from with --model (e.g. a Stable Diffusion 1.4 folder for MINIM) and the UNet folder with --unet"
            )
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
            f"{str(path)!r} holds a {name} pipeline; medsteer steers {SUPPORTED} ({', '.join(_PIPELINE_FAMILIES)})"
        )
    parts = _COMPONENTS[name]
    missing = [
        part
        for part in parts
        if isinstance(index.get(part), list) and index[part][0] is not None and not (path / part).is_dir()
    ]
    if missing:
        raise ModelLoadError(
            f"{str(path)!r} lacks the component folder(s) {missing} that its model_index.json lists; "
            f"copy the complete pipeline (all of {', '.join(p + '/' for p in parts)})"
        )
    return index


def _config_class(file: Path) -> str | None:
    """The ``_class_name`` of a diffusers ``config.json`` (``None`` when absent or unreadable)."""
    try:
        return json.loads(file.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
