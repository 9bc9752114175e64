"""MedSteer-mini-UNet: MedSteer-mini's world and text encoder with a Stable-Diffusion-style UNet.

Why it exists (issue 10): most medical text-to-image models are SD UNets, whose cross-attention
sites differ from PixArt's in every way the engine cares about - three widths, three token grids,
input/middle/output blocks. The mini-UNet shows the method on that architecture with zero downloads,
judged by the same oracle on the same seed sets as MedSteer-mini.

- denoiser: a diffusers ``UNet2DConditionModel`` in **pixel space** (32x32 RGB, as MedSteer-mini):
  levels 32x32 (resnets only, 32 channels), 16x16 and 8x8 (resnet + cross-attention, 64 and 96
  channels), a middle block at 8x8; one layer per block, as SD's layout at toy scale. Its 7
  cross-attention sites are ``input 3``, ``input 5`` (diffusers ``down_blocks.1/2``), ``middle 0``,
  ``output 0``, ``output 1`` (8x8, 96 wide) and ``output 2``, ``output 3`` (16x16, 64 wide) in
  ComfyUI's names, so vectors are ragged (widths 64/96) and gate maps come on two grids.
- text encoder and tokenizer: MedSteer-mini's own, **frozen** (the "same text encoder"): the UNet
  learns to read the embeddings the shipped T5 already makes, and both models share prompts.
- training: MedSteer-mini's recipe (v-prediction, linear DDPM schedule, caption dropout, EMA) on the
  same synthetic frames; only the UNet learns. ``python -m medsteer_core.mini train --denoiser unet``.

The file format is MedSteer-mini's (one safetensors file, configs in its metadata) with
``denoiser = "unet"`` and a ``unet_config`` entry instead of ``transformer_config``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import MedSteerError
from .backbone import tag_transformer

__all__ = ["DEFAULT_UNET_PATH", "DENOISER_KEY", "UNET_CONFIG", "build_unet", "is_unet", "unet_config_of"]

#: Where the shipped MedSteer-mini-UNet lives inside the package.
DEFAULT_UNET_PATH = Path(__file__).parent / "assets" / "medsteer_mini_unet.safetensors"
#: The metadata entry naming the denoiser class of a mini file (absent: PixArt).
DENOISER_KEY = "denoiser"

UNET_CONFIG = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64, 96],
    "layers_per_block": 1,
    "cross_attention_dim": 64,
    "attention_head_dim": 4,
    "norm_num_groups": 16,
}
#: Entries a mini-UNet file's ``unet_config`` must state, each with the type it must have.
_KINDS = {
    "sample_size": int,
    "in_channels": int,
    "out_channels": int,
    "down_block_types": list,
    "up_block_types": list,
    "block_out_channels": list,
    "layers_per_block": int,
    "cross_attention_dim": int,
    "attention_head_dim": int,
    "norm_num_groups": int,
}
_BLOCKS = {"DownBlock2D", "CrossAttnDownBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"}


def is_unet(module: nn.Module) -> bool:
    """Whether a mini denoiser is the UNet (else MedSteer-mini's PixArt)."""
    return hasattr(module, "down_blocks") and hasattr(module, "up_blocks")


def unet_config_of(unet: nn.Module) -> dict:
    """The ``UNET_CONFIG`` entries of a built UNet (lists, as JSON writes them)."""
    out = {}
    for key in UNET_CONFIG:
        value = unet.config[key]
        out[key] = list(value) if isinstance(value, (tuple, list)) else value
    return out


def check_unet_config(config: dict, path: Path, remedy: str) -> None:
    """Every entry present, of its type, in a sane range, before a network is built (issue 12, F10)."""
    missing = [k for k in _KINDS if k not in config]
    unknown = sorted(set(config) - set(_KINDS))
    if missing or unknown:
        raise MedSteerError(f"{path}: unet_config lacks {missing} / has unknown entries {unknown[:5]}: {remedy}")
    for key, kind in _KINDS.items():
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise MedSteerError(f"{path}: unet_config {key} must be a {kind.__name__}: {remedy}")
        numbers = value if kind is list else [value]
        if key.endswith("_types"):
            if not 1 <= len(value) <= 8 or not set(value) <= _BLOCKS:
                raise MedSteerError(f"{path}: unet_config {key} must list 1-8 of {sorted(_BLOCKS)}: {remedy}")
            continue
        if not numbers or not all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 4096 for n in numbers):
            raise MedSteerError(f"{path}: unet_config {key} must be whole numbers from 1 to 4096: {remedy}")
    levels = len(config["block_out_channels"])
    if not (len(config["down_block_types"]) == len(config["up_block_types"]) == levels):
        raise MedSteerError(f"{path}: unet_config has {levels} levels but other block lists: {remedy}")
    if any(c % config["norm_num_groups"] for c in config["block_out_channels"]):
        raise MedSteerError(f"{path}: unet_config norm_num_groups must divide every block width: {remedy}")


def build_unet(config: dict | None = None, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The tagged ``UNet2DConditionModel`` of a config (default ``UNET_CONFIG``), with ``state`` loaded
    after checking it against the config's shapes on the meta device."""
    from diffusers import UNet2DConditionModel

    from ..weights import check_state_dict_fits

    config = dict(UNET_CONFIG if config is None else config)
    if state is not None:
        with torch.device("meta"):
            expected = UNet2DConditionModel(**config).state_dict()
        check_state_dict_fits(state, expected, what="MedSteer-mini-UNet")
    unet = UNet2DConditionModel(**config)
    if state is not None:
        unet.load_state_dict(state)
    return tag_transformer(unet)


def config_json(unet: nn.Module) -> dict[str, str]:
    """The metadata entries a mini file of this UNet carries."""
    return {DENOISER_KEY: "unet", "unet_config": json.dumps(unet_config_of(unet))}
