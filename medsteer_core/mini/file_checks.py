"""Checks of a MedSteer-mini file's declarations against its tensors, before any network is built.

Every configuration entry a file states (transformer / text-encoder configs, vocabulary, sampling
defaults) could be crafted; each is checked here on shapes and ranges, so a bad file is one
``MedSteerError`` naming the entry, not an allocation of whatever it declares (issue 12, F10).
"""

from __future__ import annotations

__all__ = ["REMEDY", "build_text_encoder", "check_metadata", "check_transformer", "meta_json"]

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import MedSteerError
from .model import TEXT_CONFIG, TRANSFORMER_CONFIG

REMEDY = (
    "pass the path of a file written by `python -m medsteer_core.mini train`, or reinstall the "
    "package to restore the shipped one"
)
#: Transformer config entries a mini file must state (every one decides a shape).
_SHAPE_KEYS = (
    "sample_size",
    "patch_size",
    "in_channels",
    "out_channels",
    "num_layers",
    "num_attention_heads",
    "attention_head_dim",
    "cross_attention_dim",
    "caption_channels",
)
_TEXT_INT_KEYS = (*(k for k in TEXT_CONFIG if k != "dropout_rate"), "vocab_size", "pad_token_id", "eos_token_id")
_PREDICTIONS = ("epsilon", "v_prediction", "sample")


def meta_json(meta: dict[str, str], key: str, kind: type, path: Path):
    """The JSON value of metadata entry ``key``, of type ``kind``, or a ``MedSteerError`` naming it."""
    if key not in meta:
        raise MedSteerError(
            f"{path} has no {key!r} metadata entry, so it is not a complete MedSteer-mini file: {REMEDY}"
        )
    try:
        value = json.loads(meta[key])
    except (ValueError, RecursionError) as exc:  # JSON errors, >4300-digit numbers, deep nesting
        raise MedSteerError(f"{path}: metadata {key!r} is not valid JSON ({type(exc).__name__}): {REMEDY}") from None
    if not isinstance(value, kind):
        raise MedSteerError(f"{path}: metadata {key!r} is a {type(value).__name__}, not a {kind.__name__}: {REMEDY}")
    return value


def check_metadata(meta: dict[str, str], path: Path) -> None:
    """Sampling settings the file declares (issue 12, F10): a number and a known prediction type."""
    import math

    cfg = meta.get("default_cfg", "4")
    try:
        value = float(cfg)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or not 0 <= value <= 100:
        raise MedSteerError(
            f"{path}: metadata default_cfg {cfg[:40]!r} is not a guidance scale from 0 to 100: {REMEDY}"
        )
    if meta.get("prediction_type", "epsilon") not in _PREDICTIONS:
        raise MedSteerError(
            f"{path}: metadata prediction_type {meta['prediction_type'][:40]!r} is not one of {list(_PREDICTIONS)}: {REMEDY}"
        )


def check_transformer(config: dict, state: dict[str, torch.Tensor], path: Path) -> None:
    """The declared transformer config against the weights, on shapes only, before any model exists."""
    from ..weights import to_pixart_layout

    missing = [k for k in _SHAPE_KEYS if config.get(k) is None]
    unknown = sorted(set(config) - set(TRANSFORMER_CONFIG))
    if missing or unknown:
        raise MedSteerError(f"{path}: transformer_config lacks {missing} / has unknown entries {unknown[:5]}: {REMEDY}")
    for key in ("norm_type", "norm_elementwise_affine"):
        if key in config and config[key] != TRANSFORMER_CONFIG[key]:
            raise MedSteerError(f"{path}: transformer_config {key} must be {TRANSFORMER_CONFIG[key]!r}: {REMEDY}")
    if config.get("use_additional_conditions", False) is not False:
        raise MedSteerError(f"{path}: transformer_config use_additional_conditions must be false: {REMEDY}")
    eps = config.get("norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps <= 0.1:
        raise MedSteerError(f"{path}: transformer_config norm_eps must be a number in (0, 0.1]: {REMEDY}")
    meta_state = {k: torch.empty(v.shape, device="meta") for k, v in state.items()}
    try:  # geometry from the weights; every config entry must agree with it (F9 / F12 checks)
        geometry = to_pixart_layout(meta_state, config)[1]
    except MedSteerError as exc:
        raise MedSteerError(f"{path}: the transformer does not match its config: {exc}") from None
    if geometry.sample_size % geometry.patch_size:
        raise MedSteerError(
            f"{path}: sample_size {geometry.sample_size} is not a multiple of patch_size {geometry.patch_size}: {REMEDY}"
        )


def build_text_encoder(config: dict, state: dict[str, torch.Tensor], vocabulary: list[str], path: Path) -> nn.Module:
    """The T5 encoder, after its declared config has been checked against the weights on the meta
    device (a crafted ``num_layers`` or ``vocab_size`` would otherwise allocate what it declares)."""
    from transformers import T5Config, T5EncoderModel

    from ..weights import check_state_dict_fits

    unknown = sorted(set(config) - set(TEXT_CONFIG) - set(_TEXT_INT_KEYS))
    if unknown:
        raise MedSteerError(f"{path}: text_encoder_config has unknown entries {unknown[:5]}: {REMEDY}")
    for key in _TEXT_INT_KEYS:
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1 << 20:
            raise MedSteerError(
                f"{path}: text_encoder_config {key} is {str(value)[:40]}, not a whole number from 0 to {1 << 20}: {REMEDY}"
            )
    if config["vocab_size"] != len(vocabulary):
        raise MedSteerError(
            f"{path}: text_encoder_config vocab_size {config['vocab_size']} differs from the "
            f"{len(vocabulary)}-word vocabulary: {REMEDY}"
        )
    blocks = {k.split(".")[2] for k in state if k.startswith("encoder.block.")}
    if blocks != {str(i) for i in range(config["num_layers"])}:
        raise MedSteerError(
            f"{path}: text_encoder_config num_layers is {config['num_layers']}, the weights hold "
            f"{len(blocks)} numbered blocks: {REMEDY}"
        )
    if "shared.weight" not in state:
        raise MedSteerError(f"{path} has no text_encoder.shared.weight tensor: {REMEDY}")
    state = dict(state, **{"encoder.embed_tokens.weight": state["shared.weight"]})
    try:
        t5_config = T5Config(**config)
        with torch.device("meta"):
            expected = T5EncoderModel(t5_config).state_dict()
        check_state_dict_fits(state, expected, what="MedSteer-mini text encoder")
    except MedSteerError as exc:
        raise MedSteerError(f"{path}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - transformers' own errors on a crafted config
        raise MedSteerError(
            f"{path}: text_encoder_config is not a T5 config ({type(exc).__name__}): {REMEDY}"
        ) from None
    text_encoder = T5EncoderModel(t5_config)
    text_encoder.load_state_dict(state)
    return text_encoder
