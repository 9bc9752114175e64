"""PixArt-alpha checkpoints and the MedSteer PEFT LoRA, without ComfyUI.

Two jobs, both pure data handling (the ComfyUI loader nodes and the CLI call them):

1. **Checkpoints.** PixArt weights come in two key layouts: the original one of the PixArt-alpha
   code (``blocks.3.attn.qkv.weight``; ComfyUI's ``PixArtMS`` uses it too) and diffusers'
   (``transformer_blocks.3.attn1.to_q.weight``; q, k and v separate). ``diffusers_to_pixart`` and
   ``pixart_to_diffusers`` convert between them; ``pixart_geometry`` reads the model's shape from
   the weights, and ``expected_pixart_shapes`` says which tensors a model of that shape has.
   PixArt-XL-2-512x512 has no size / aspect-ratio embedders; ComfyUI's own detection therefore
   types it as PixArt-Sigma, whose latent format is SDXL's. ``PixArtGeometry.comfy_unet_config``
   always says ``pixart_alpha`` (SD1.5 latent scale), with or without micro-conditioning.

2. **LoRA.** The MedSteer LoRA is two PEFT adapters saved with ``save_pretrained``
   (``transformer_lora/`` and ``text_encoder_lora/``, each ``adapter_config.json`` +
   ``adapter_model.safetensors``). PEFT files carry no alpha: the scale ``lora_alpha / r`` (or
   ``lora_alpha / sqrt(r)`` with rsLoRA, with per-module ``rank_pattern`` / ``alpha_pattern``) lives
   in the config. ``load_peft_adapter`` reads one adapter; ``transformer_lora_patches`` and
   ``t5_lora_patches`` map its modules onto a model's weight keys (diffusers PixArt modules onto
   the original layout, including the slices of the fused ``qkv`` / ``kv_linear`` weights;
   transformers T5 modules onto a T5 encoder under any prefix) and check every shape.

Example:
    >>> sd, geometry = load_pixart_checkpoint("PixArt-XL-2-512x512.pth")       # doctest: +SKIP
    >>> geometry.comfy_unet_config()["image_model"]                            # doctest: +SKIP
    'pixart_alpha'
    >>> lora = load_medsteer_lora("medsteer_lora/")                            # doctest: +SKIP
    >>> patches = transformer_lora_patches(lora.transformer, model_shapes)     # doctest: +SKIP
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import MedSteerError

__all__ = [
    "CheckpointError",
    "LoraModule",
    "LoraPatch",
    "MedSteerLora",
    "PeftAdapter",
    "PeftLoraConfig",
    "PixArtGeometry",
    "diffusers_to_pixart",
    "expected_pixart_shapes",
    "find_t5_prefix",
    "is_diffusers_layout",
    "list_diffusers_folders",
    "list_lora_folders",
    "load_diffusers_transformer",
    "load_medsteer_lora",
    "load_peft_adapter",
    "load_pixart_checkpoint",
    "load_state_dict_file",
    "looks_like_local_path",
    "pixart_geometry",
    "pixart_to_diffusers",
    "check_config_matches_geometry",
    "check_diffusers_transformer",
    "check_state_dict_fits",
    "read_peft_config",
    "t5_lora_patches",
    "to_pixart_layout",
    "transformer_lora_patches",
]


class CheckpointError(MedSteerError):
    """A checkpoint or LoRA file is missing, has an unknown layout, or does not fit the model."""


# Bounds on what a file may declare, checked before anything is allocated (issue 12). They are far
# above every released PixArt / T5 / LoRA and far below what would take minutes or gigabytes.
MAX_DEPTH = 1000  # transformer blocks (PixArt-XL-2: 28)
MAX_SAMPLE_SIZE = 1024  # latent pixels per side (PixArt-Sigma 4K: 512)
MAX_INTERPOLATION_SCALE = 64.0  # PixArt: 0.5 ... 4
MAX_LORA_RANK = 16384  # T5-XXL's widest layer is 10240
MAX_LORA_SCALE = 1000.0  # |lora_alpha / r|; released adapters use 0.5 ... 4
MAX_JSON_BYTES = 16 << 20  # config.json / adapter_config.json / *.index.json
MAX_MODULE_NAME = 500  # characters of one module path in an adapter (PixArt's longest: 47)


def _show(value) -> str:
    """A short repr for messages (a 5000-digit integer's repr would itself raise)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**18:
        return f"an integer of {value.bit_length()} bits"
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - any object a crafted file can produce
        text = f"a {type(value).__name__}"
    return text if len(text) <= 80 else text[:77] + "..."


def _whole_number(value, where: str, low: int, high: int, fix: str) -> int:
    """``value`` as an int in ``[low, high]`` (a JSON int, or a float with no fraction), else an error."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        ok, value = True, int(value)
    if not ok or not low <= value <= high:
        raise CheckpointError(f"{where} is {_show(value)}; it must be a whole number from {low} to {high}: {fix}")
    return int(value)


def _finite_number(value, where: str, low: float, high: float, fix: str) -> float:
    """``value`` as a finite float in ``[low, high]``, else an error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(f"{where} is {_show(value)}; it must be a number: {fix}")
    number = float(value) if not isinstance(value, int) or abs(value) <= 10**308 else math.inf
    if not math.isfinite(number) or not low <= number <= high:
        raise CheckpointError(f"{where} is {_show(value)}; it must be a finite number from {low:g} to {high:g}: {fix}")
    return number


def _read_json_object(path: Path, remedy: str) -> dict:
    """The JSON object in the regular file ``path``; every way it can be broken is a ``CheckpointError``."""
    try:
        if not path.is_file():
            raise CheckpointError(f"{str(path)!r} is missing or not a regular file: {remedy}")
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise CheckpointError(f"{str(path)!r} is {size} bytes, more than a config file can be: {remedy}")
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except CheckpointError:
        raise
    except OSError as exc:
        raise CheckpointError(f"cannot read {str(path)!r} ({exc.strerror or exc}): {remedy}") from None
    except (ValueError, RecursionError) as exc:  # JSON / UTF-8 errors, >4300-digit numbers, deep nesting
        raise CheckpointError(
            f"{str(path)!r} is not valid JSON ({type(exc).__name__}: {str(exc)[:120]}): {remedy}"
        ) from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{str(path)!r} must hold a JSON object, not a {type(raw).__name__}: {remedy}")
    return raw


# ------------------------------------------------------------------------------------------------
# Key layouts. diffusers module -> original (PixArt-alpha / ComfyUI PixArtMS) module; each entry
# covers the module's ``.weight`` and ``.bias``.
# ------------------------------------------------------------------------------------------------
_TOP_MODULES = {
    "pos_embed.proj": "x_embedder.proj",
    "caption_projection.linear_1": "y_embedder.y_proj.fc1",
    "caption_projection.linear_2": "y_embedder.y_proj.fc2",
    "adaln_single.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "adaln_single.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "adaln_single.emb.resolution_embedder.linear_1": "csize_embedder.mlp.0",
    "adaln_single.emb.resolution_embedder.linear_2": "csize_embedder.mlp.2",
    "adaln_single.emb.aspect_ratio_embedder.linear_1": "ar_embedder.mlp.0",
    "adaln_single.emb.aspect_ratio_embedder.linear_2": "ar_embedder.mlp.2",
    "adaln_single.linear": "t_block.1",
    "proj_out": "final_layer.linear",
}
# bare parameters / buffers (no .weight / .bias suffix)
_TOP_PARAMS = {
    "scale_shift_table": "final_layer.scale_shift_table",
    "caption_projection.y_embedding": "y_embedder.y_embedding",
}
_BLOCK_MODULES = {
    "attn1.to_out.0": "attn.proj",
    "attn2.to_q": "cross_attn.q_linear",
    "attn2.to_out.0": "cross_attn.proj",
    "ff.net.0.proj": "mlp.fc1",
    "ff.net.2": "mlp.fc2",
}
_BLOCK_PARAMS = {"scale_shift_table": "scale_shift_table"}
# original fused module -> the diffusers modules stacked along dim 0, in order
_BLOCK_FUSED = {
    "attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v"),
}
_BLOCK_RE = re.compile(r"^(transformer_blocks|blocks)\.(\d+)\.(.+)$")
# PixArt's attention heads are 72 wide (1152 = 16 x 72); original checkpoints do not record heads.
PIXART_HEAD_DIM = 72
# Prefixes that wrap a transformer's keys in full checkpoints or training scripts.
_CHECKPOINT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "module.")


@dataclass(frozen=True)
class _Target:
    """Where one diffusers module lives in the original layout: ``module`` and, for the fused
    ``qkv`` / ``kv_linear`` weights, which of ``parts`` equal row blocks."""

    module: str
    part: int | None = None
    parts: int = 1


def _diffusers_module_target(name: str) -> _Target | None:
    if name in _TOP_MODULES:
        return _Target(_TOP_MODULES[name])
    match = _BLOCK_RE.match(name)
    if match is None or match.group(1) != "transformer_blocks":
        return None
    index, rest = match.group(2), match.group(3)
    if rest in _BLOCK_MODULES:
        return _Target(f"blocks.{index}.{_BLOCK_MODULES[rest]}")
    for fused, parts in _BLOCK_FUSED.items():
        if rest in parts:
            return _Target(f"blocks.{index}.{fused}", parts.index(rest), len(parts))
    return None


def is_diffusers_layout(keys: Iterable[str]) -> bool:
    """True when the keys are a diffusers ``PixArtTransformer2DModel`` state dict."""
    keys = set(keys)
    return "adaln_single.linear.weight" in keys and "pos_embed.proj.weight" in keys


def _is_pixart_layout(keys: Iterable[str]) -> bool:
    keys = set(keys)
    return "t_block.1.weight" in keys and "x_embedder.proj.weight" in keys


def _split_param(key: str) -> tuple[str, str]:
    module, _, leaf = key.rpartition(".")
    return module, leaf


def diffusers_to_pixart(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a diffusers ``PixArtTransformer2DModel`` state dict to the original PixArt layout.

    q/k/v of the self-attention are stacked into ``attn.qkv``; k/v of the cross-attention into
    ``cross_attn.kv_linear``. Works on meta tensors too (geometry checks without memory).

    Args:
        state_dict: diffusers keys (``transformer_blocks.0.attn1.to_q.weight`` ...).

    Returns:
        A new dict with original keys (``blocks.0.attn.qkv.weight`` ...). diffusers does not store
        the null caption embedding (``y_embedder.y_embedding``, used only for caption dropout in
        training); it is absent here too.

    Raises:
        CheckpointError: a key that is not part of a PixArt transformer, or a fused group with a
            missing member.
    """
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, torch.Tensor]] = {}
    fused_parts: dict[str, int] = {}
    unknown = []
    for key, tensor in state_dict.items():
        if key in _TOP_PARAMS:
            out[_TOP_PARAMS[key]] = tensor
            continue
        match = _BLOCK_RE.match(key)
        if match and match.group(1) == "transformer_blocks" and match.group(3) in _BLOCK_PARAMS:
            out[f"blocks.{match.group(2)}.{_BLOCK_PARAMS[match.group(3)]}"] = tensor
            continue
        module, leaf = _split_param(key)
        target = _diffusers_module_target(module)
        if target is None or leaf not in ("weight", "bias"):
            unknown.append(key)
            continue
        new_key = f"{target.module}.{leaf}"
        if target.part is None:
            out[new_key] = tensor
        else:
            fused.setdefault(new_key, {})[target.part] = tensor
            fused_parts[new_key] = target.parts
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} key(s) are not part of a diffusers PixArt transformer, e.g. "
            f"{sorted(unknown)[:5]}: load the transformer folder of a PixArt-alpha pipeline "
            "(config.json + diffusion_pytorch_model*.safetensors), not a whole pipeline or another model"
        )
    for new_key, pieces in fused.items():
        missing = sorted(set(range(fused_parts[new_key])) - set(pieces))
        if missing:
            raise CheckpointError(
                f"cannot build {new_key}: its q/k/v parts {missing} are missing from the diffusers "
                "state dict; the checkpoint is incomplete, download it again"
            )
        parts = [pieces[i] for i in range(fused_parts[new_key])]
        if any(t.ndim != parts[0].ndim or t.ndim == 0 or t.shape[1:] != parts[0].shape[1:] for t in parts):
            raise CheckpointError(
                f"cannot build {new_key}: its q/k/v parts have shapes {[list(t.shape) for t in parts]}, which do "
                "not stack; the checkpoint is damaged or not a PixArt transformer"
            )
        out[new_key] = torch.cat(parts, dim=0)
    return out


def pixart_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert an original-layout PixArt state dict to diffusers keys (the inverse of
    ``diffusers_to_pixart``). ``pos_embed`` and ``y_embedder.y_embedding`` are dropped: diffusers
    computes the former and has no place for the latter.

    Raises:
        CheckpointError: a key that is not part of a PixArt transformer.
    """
    reverse_top = {v: k for k, v in _TOP_MODULES.items()}
    reverse_params = {v: k for k, v in _TOP_PARAMS.items()}
    reverse_block = {v: k for k, v in _BLOCK_MODULES.items()}
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state_dict.items():
        if key in ("pos_embed", "y_embedder.y_embedding"):
            continue
        if key in reverse_params:
            out[reverse_params[key]] = tensor
            continue
        match = _BLOCK_RE.match(key)
        if match and match.group(1) == "blocks":
            index, rest = match.group(2), match.group(3)
            if rest in _BLOCK_PARAMS.values():
                out[f"transformer_blocks.{index}.{rest}"] = tensor
                continue
            module, leaf = _split_param(rest)
            if module in reverse_block:
                out[f"transformer_blocks.{index}.{reverse_block[module]}.{leaf}"] = tensor
                continue
            if module in _BLOCK_FUSED:
                parts = _BLOCK_FUSED[module]
                if tensor.ndim == 0 or tensor.shape[0] % len(parts):
                    raise CheckpointError(
                        f"{key!r} has shape {list(tensor.shape)}, which does not split into {len(parts)} equal parts"
                    )
                for part, chunk in zip(parts, tensor.chunk(len(parts), dim=0), strict=True):
                    out[f"transformer_blocks.{index}.{part}.{leaf}"] = chunk.clone()
                continue
        else:
            module, leaf = _split_param(key)
            if module in reverse_top:
                out[f"{reverse_top[module]}.{leaf}"] = tensor
                continue
        unknown.append(key)
    if unknown:
        raise CheckpointError(f"{len(unknown)} key(s) are not part of a PixArt transformer, e.g. {sorted(unknown)[:5]}")
    return out


def _strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _CHECKPOINT_PREFIXES:
        inner = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if inner and (_is_pixart_layout(inner) or is_diffusers_layout(inner)):
            return inner
    return dict(state_dict)


# ------------------------------------------------------------------------------------------------
# Geometry
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PixArtGeometry:
    """The shape of a PixArt transformer, read from its weights.

    Attributes:
        hidden_size: token width ``D`` (1152 for PixArt-XL-2).
        depth: number of transformer blocks (28).
        num_heads: attention heads (16; not stored in original checkpoints, see ``PIXART_HEAD_DIM``).
        patch_size: latent pixels per token side (2).
        in_channels: latent channels (4).
        out_channels: predicted channels (8 = eps + learned variance).
        caption_channels: text-embedding width (4096 = T5-XXL).
        model_max_length: caption tokens of the null embedding (120 for PixArt-alpha, 300 for Sigma).
        mlp_ratio: MLP hidden width / ``hidden_size`` (4).
        micro_condition: has size / aspect-ratio embedders (PixArt-XL-2-1024-MS) or not (-512x512).
        sample_size: training latent size if known (64 for the 512 model), else ``None``.
        pe_interpolation: fixed position-embedding interpolation, or ``None`` to compute it per
            latent size (what ComfyUI does when the checkpoint does not say).
    """

    hidden_size: int
    depth: int
    num_heads: int
    patch_size: int
    in_channels: int
    out_channels: int
    caption_channels: int
    model_max_length: int
    mlp_ratio: float
    micro_condition: bool
    sample_size: int | None = None
    pe_interpolation: float | None = None

    def comfy_unet_config(self) -> dict:
        """The ``unet_config`` for ComfyUI's ``supported_models.PixArtAlpha``.

        ``image_model`` is always ``pixart_alpha`` so that the model gets PixArt-alpha's SD1.5-scale
        latent format (ComfyUI's detection says ``pixart_sigma`` whenever micro-conditioning is
        absent, which gives PixArt-XL-2-512x512 SDXL's latent scale).
        """
        config = {
            "image_model": "pixart_alpha",
            "hidden_size": self.hidden_size,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "patch_size": self.patch_size,
            "in_channels": self.in_channels,
            "pred_sigma": self.out_channels == 2 * self.in_channels,
            "learn_sigma": self.out_channels == 2 * self.in_channels,
            "caption_channels": self.caption_channels,
            "model_max_length": self.model_max_length,
            "mlp_ratio": self.mlp_ratio,
            "micro_condition": self.micro_condition,
        }
        if self.sample_size is not None:
            config["input_size"] = self.sample_size
        if self.pe_interpolation is not None:
            config["pe_interpolation"] = self.pe_interpolation
        return config


def _shape(value) -> tuple[int, ...]:
    return tuple(int(s) for s in (value.shape if hasattr(value, "shape") else value))


# The tensors the geometry is read from, and how many dimensions each has.
_GEOMETRY_TENSORS = {
    "x_embedder.proj.weight": 4,
    "t_block.1.weight": 2,
    "y_embedder.y_proj.fc1.weight": 2,
    "y_embedder.y_embedding": 2,
    "blocks.0.mlp.fc1.weight": 2,
    "final_layer.linear.weight": 2,
    "pos_embed": 3,
}


def _block_depth(keys: Iterable[str]) -> int:
    """The number of blocks of an original-layout state dict, from the SET of ``blocks.N.`` indices.

    The indices must be exactly ``0 .. n-1`` with ``n <= MAX_DEPTH``: a single key
    ``blocks.100000000.mlp.fc1.weight`` once made the depth 10^8 and took minutes and gigabytes
    before failing (issue 12, F4). Checked before anything of that size is built.
    """
    texts = {m.group(2) for k in keys if (m := _BLOCK_RE.match(k)) and m.group(1) == "blocks"}
    fix = "the file is damaged or not a PixArt-alpha checkpoint; download it again"
    for text in sorted(texts, key=len, reverse=True):
        if not text.isascii() or len(text) > len(str(MAX_DEPTH)) or (len(text) > 1 and text[0] == "0"):
            shown = text if len(text) <= 12 else f"{text[:8]}... ({len(text)} characters)"
            raise CheckpointError(f"block index {shown!r} is not a block number from 0 to {MAX_DEPTH - 1}: {fix}")
    numbers = sorted(int(t) for t in texts)
    if numbers[-1] >= MAX_DEPTH:
        raise CheckpointError(f"block index {numbers[-1]} is above the limit of {MAX_DEPTH} blocks: {fix}")
    if numbers != list(range(len(numbers))):
        gap = next(i for i, n in enumerate(numbers) if i != n)
        raise CheckpointError(
            f"the checkpoint has blocks {_ranges(numbers)}: blocks must be numbered 0 to n-1 with none missing "
            f"(block {gap} is absent): {fix}"
        )
    return len(numbers)


def _ranges(numbers: Sequence[int]) -> str:
    """``0-3, 7, 100000`` for messages."""
    parts, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            parts.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ", ".join(parts[:6]) + (", ..." if len(parts) > 6 else "")


def pixart_geometry(
    state_dict: Mapping[str, torch.Tensor | Sequence[int]],
    *,
    num_heads: int | None = None,
    sample_size: int | None = None,
    interpolation_scale: float | None = None,
) -> PixArtGeometry:
    """Read a PixArt transformer's geometry from an original-layout state dict.

    Args:
        state_dict: original keys to tensors (or to shapes).
        num_heads: attention heads; default ``hidden_size / 72`` (PixArt's head width).
        sample_size: training latent size; default read from ``pos_embed`` if present.
        interpolation_scale: fixed position-embedding interpolation (diffusers' config); default
            ``max(sample_size // 64, 1)`` when ``sample_size`` is known, else ``None``.

    Raises:
        CheckpointError: a required tensor is missing or the shapes contradict each other.
    """
    shapes = {k: _shape(v) for k, v in state_dict.items()}
    for required in (
        "x_embedder.proj.weight",
        "t_block.1.weight",
        "y_embedder.y_proj.fc1.weight",
        "blocks.0.mlp.fc1.weight",
        "final_layer.linear.weight",
    ):
        if required not in shapes:
            raise CheckpointError(
                f"not a PixArt transformer checkpoint: {required!r} is missing. Use a PixArt-alpha "
                "checkpoint (original .pth/.safetensors or a diffusers transformer folder)"
            )
    for key, ndim in _GEOMETRY_TENSORS.items():
        shape = shapes.get(key)
        if shape is not None and (len(shape) != ndim or not all(shape)):
            raise CheckpointError(
                f"{key} has shape {list(shape)}, but a PixArt checkpoint stores it as a non-empty {ndim}-D "
                "tensor: the file is damaged or not a PixArt-alpha checkpoint"
            )
    hidden, in_channels, patch, patch_w = shapes["x_embedder.proj.weight"]
    if patch != patch_w:
        raise CheckpointError(
            f"x_embedder.proj.weight has non-square patches {patch}x{patch_w}; not a PixArt checkpoint"
        )
    depth = _block_depth(shapes)
    caption_channels = shapes["y_embedder.y_proj.fc1.weight"][1]
    model_max_length = shapes.get("y_embedder.y_embedding", (120,))[0]
    mlp_ratio = shapes["blocks.0.mlp.fc1.weight"][0] / hidden
    out_rows = shapes["final_layer.linear.weight"][0]
    if out_rows % (patch * patch):
        raise CheckpointError(
            f"final_layer.linear.weight has {out_rows} rows, not a multiple of patch_size^2={patch * patch}"
        )
    out_channels = out_rows // (patch * patch)
    has_size = "csize_embedder.mlp.0.weight" in shapes
    has_ar = "ar_embedder.mlp.0.weight" in shapes
    if has_size != has_ar:
        raise CheckpointError(
            "the checkpoint has only one of the size / aspect-ratio embedders "
            f"(csize_embedder: {has_size}, ar_embedder: {has_ar}); it is incomplete, download it again"
        )
    if has_size and hidden % 3:
        raise CheckpointError(f"hidden size {hidden} is not divisible by 3, which micro-conditioning needs")
    if num_heads is not None:
        num_heads = _whole_number(
            num_heads, "num_attention_heads (config.json)", 1, hidden, f"hidden size {hidden} is split into heads"
        )
    else:
        if hidden % PIXART_HEAD_DIM:
            raise CheckpointError(
                f"cannot tell the number of attention heads of hidden size {hidden} (PixArt uses "
                f"{PIXART_HEAD_DIM}-wide heads); load it as a diffusers folder whose config.json says "
                "num_attention_heads"
            )
        num_heads = hidden // PIXART_HEAD_DIM
    if hidden % num_heads:
        raise CheckpointError(
            f"hidden size {hidden} is not divisible by {num_heads} heads (num_attention_heads in config.json): "
            "fix config.json so that num_attention_heads x attention_head_dim equals the weights' width"
        )
    fix = "correct config.json (PixArt-XL-2-512x512 says sample_size 64, interpolation_scale 1) or delete the entry"
    if sample_size is not None:
        sample_size = _whole_number(sample_size, "sample_size (config.json)", 1, MAX_SAMPLE_SIZE, fix)
    elif "pos_embed" in shapes:
        tokens = shapes["pos_embed"][-2]
        side = math.isqrt(tokens)
        if side * side == tokens and 0 < side * patch <= MAX_SAMPLE_SIZE:
            sample_size = side * patch
    if interpolation_scale is not None:
        interpolation_scale = _finite_number(
            interpolation_scale,
            "interpolation_scale (config.json)",
            1 / MAX_INTERPOLATION_SCALE,
            MAX_INTERPOLATION_SCALE,
            fix,
        )
    elif sample_size is not None:
        interpolation_scale = max(sample_size // 64, 1)
    return PixArtGeometry(
        hidden_size=hidden,
        depth=depth,
        num_heads=num_heads,
        patch_size=patch,
        in_channels=in_channels,
        out_channels=out_channels,
        caption_channels=caption_channels,
        model_max_length=model_max_length,
        mlp_ratio=mlp_ratio,
        micro_condition=has_size,
        sample_size=sample_size,
        pe_interpolation=interpolation_scale,
    )


def expected_pixart_shapes(geometry: PixArtGeometry) -> dict[str, tuple[int, ...]]:
    """Every tensor of an original-layout PixArt transformer of this geometry, with its shape.

    This is the state dict of ComfyUI's ``PixArtMS`` built from ``geometry.comfy_unet_config()``
    (the ComfyUI tests check that), so it validates a checkpoint before any model is allocated.
    """
    h, p, c = geometry.hidden_size, geometry.patch_size, geometry.caption_channels
    mlp = int(h * geometry.mlp_ratio)
    shapes: dict[str, tuple[int, ...]] = {
        "x_embedder.proj.weight": (h, geometry.in_channels, p, p),
        "x_embedder.proj.bias": (h,),
        "t_embedder.mlp.0.weight": (h, 256),
        "t_embedder.mlp.0.bias": (h,),
        "t_embedder.mlp.2.weight": (h, h),
        "t_embedder.mlp.2.bias": (h,),
        "t_block.1.weight": (6 * h, h),
        "t_block.1.bias": (6 * h,),
        "y_embedder.y_proj.fc1.weight": (h, c),
        "y_embedder.y_proj.fc1.bias": (h,),
        "y_embedder.y_proj.fc2.weight": (h, h),
        "y_embedder.y_proj.fc2.bias": (h,),
        "y_embedder.y_embedding": (geometry.model_max_length, c),
        "final_layer.linear.weight": (p * p * geometry.out_channels, h),
        "final_layer.linear.bias": (p * p * geometry.out_channels,),
        "final_layer.scale_shift_table": (2, h),
    }
    if geometry.micro_condition:
        third = h // 3
        for name in ("csize_embedder", "ar_embedder"):
            shapes[f"{name}.mlp.0.weight"] = (third, 256)
            shapes[f"{name}.mlp.0.bias"] = (third,)
            shapes[f"{name}.mlp.2.weight"] = (third, third)
            shapes[f"{name}.mlp.2.bias"] = (third,)
    for i in range(geometry.depth):
        b = f"blocks.{i}."
        shapes[b + "scale_shift_table"] = (6, h)
        shapes[b + "attn.qkv.weight"] = (3 * h, h)
        shapes[b + "attn.qkv.bias"] = (3 * h,)
        shapes[b + "attn.proj.weight"] = (h, h)
        shapes[b + "attn.proj.bias"] = (h,)
        shapes[b + "cross_attn.q_linear.weight"] = (h, h)
        shapes[b + "cross_attn.q_linear.bias"] = (h,)
        shapes[b + "cross_attn.kv_linear.weight"] = (2 * h, h)
        shapes[b + "cross_attn.kv_linear.bias"] = (2 * h,)
        shapes[b + "cross_attn.proj.weight"] = (h, h)
        shapes[b + "cross_attn.proj.bias"] = (h,)
        shapes[b + "mlp.fc1.weight"] = (mlp, h)
        shapes[b + "mlp.fc1.bias"] = (mlp,)
        shapes[b + "mlp.fc2.weight"] = (h, mlp)
        shapes[b + "mlp.fc2.bias"] = (h,)
    return shapes


def check_state_dict_fits(
    state_dict: Mapping[str, torch.Tensor | Sequence[int]],
    expected: Mapping[str, torch.Tensor | Sequence[int]],
    *,
    what: str = "checkpoint",
) -> None:
    """Raise ``CheckpointError`` unless ``state_dict`` has exactly the keys and shapes of ``expected``.

    The message names the first mismatching key and both shapes, or the missing / extra keys.
    """
    got = {k: _shape(v) for k, v in state_dict.items()}
    want = {k: _shape(v) for k, v in expected.items()}
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    if missing or extra:
        raise CheckpointError(
            f"the {what} does not match the model: missing {len(missing)} key(s) {missing[:5]}, "
            f"unexpected {len(extra)} key(s) {extra[:5]}. Is it a PixArt-alpha transformer checkpoint?"
        )
    for key in want:
        if got[key] != want[key]:
            raise CheckpointError(
                f"the {what} does not match the model at {key!r}: the file has shape {list(got[key])}, "
                f"the model expects {list(want[key])}"
            )


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------
_WEIGHT_SUFFIXES = (".safetensors", ".sft", ".pth", ".pt", ".bin", ".ckpt")


def looks_like_local_path(source: str | os.PathLike) -> bool:
    """Whether ``source`` names a local file or folder rather than a Hugging Face hub id.

    True when it starts with ``./``, ``../``, ``/`` or ``~`` (or is ``.``/``..``), contains a
    backslash, has more than one ``/`` (hub ids are ``owner/name``), ends with a weight-file
    extension (``.safetensors``, ``.pth``, ``.ckpt``, ...), or its first component exists here
    (``models/x`` when ``./models`` is a folder). Used so that a local path that does not exist
    fails at once with its name, instead of ~30 s of hub retries (issue 11).

    Example:
        >>> looks_like_local_path("./nope"), looks_like_local_path("PixArt-alpha/PixArt-XL-2-512x512")
        (True, False)
    """
    text = os.fspath(source)
    if isinstance(source, os.PathLike) and not isinstance(source, str):
        return True  # a Path object is a path by construction
    if text in (".", "..") or text.startswith(("./", "../", "/", "~", ".\\", "..\\")):
        return True
    if "\\" in text or os.sep != "/" and os.sep in text or text.count("/") > 1:
        return True
    if text.lower().endswith(_WEIGHT_SUFFIXES + (".gguf",)):
        return True
    first = text.split("/", 1)[0]
    return "/" in text and Path(first).expanduser().is_dir()


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load tensors from a ``.safetensors`` file, or safely (``weights_only``) from a torch file.

    A torch file holding ``{"state_dict": ...}`` (PixArt's released ``.pth``) is unwrapped.

    Raises:
        CheckpointError: missing, unreadable or not a dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in (".safetensors", ".sft"):
            from safetensors.torch import load_file

            return load_file(str(path))
        if suffix not in _WEIGHT_SUFFIXES:
            raise CheckpointError(
                f"{path.name!r}: unknown checkpoint extension {suffix!r}; use one of {list(_WEIGHT_SUFFIXES)}"
            )
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) torch files cannot be memory-mapped
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors / pickle errors: say which file and what to do
        raise CheckpointError(
            f"cannot read {str(path)!r} ({type(exc).__name__}: {exc}); the file is corrupt, incomplete "
            "or not a checkpoint (torch files are loaded weights-only, so pickled code is refused)"
        ) from exc
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        raise CheckpointError(f"{str(path)!r} does not hold a state dict of tensors (names to tensors)")
    return data


_WEIGHTS = "diffusion_pytorch_model"


def _shard_path(folder: Path, name, index: Path) -> Path:
    """A shard named in a ``*.index.json`` weight map: a bare file name in ``folder``, a regular file.

    diffusers writes bare names; a name such as ``../x.safetensors`` or an absolute path would load
    weights from outside the model folder (issue 12, F13). Symbolic links are followed (the Hugging
    Face cache links every file into its blobs/ folder) but must end at a regular file.
    """
    where = f"{str(index)!r} names the shard {_show(name)}"
    if not isinstance(name, str) or not name.endswith(".safetensors"):
        raise CheckpointError(
            f"{where}, which is not a .safetensors file name: the index is damaged; download it again"
        )
    if name in (".", "..") or "/" in name or "\\" in name or "\0" in name or os.path.isabs(name):
        raise CheckpointError(
            f"{where}: shards must be plain file names in the same folder (no folders, '..' or absolute paths); "
            "the index is damaged or crafted, download the model again"
        )
    path = folder / name
    if not path.is_file():
        raise CheckpointError(f"{where}, which is missing or not a regular file in {str(folder)!r}; download it")
    return path


def _diffusers_weight_files(folder: Path) -> list[Path]:
    """The safetensors files diffusers would load from a transformer folder (no variant first)."""
    indexes = sorted(folder.glob(f"{_WEIGHTS}*.safetensors.index.json"))
    files = sorted(folder.glob(f"{_WEIGHTS}*.safetensors"))
    plain_index = [p for p in indexes if p.name == f"{_WEIGHTS}.safetensors.index.json"]
    plain = [p for p in files if p.name == f"{_WEIGHTS}.safetensors"]
    if plain_index or (indexes and not plain):
        if not plain_index and len(indexes) > 1:
            raise CheckpointError(
                f"{str(folder)!r} has several weight index files {[p.name for p in indexes]}; keep one"
            )
        index = (plain_index or indexes)[0]
        weight_map = _read_json_object(index, "download the model again").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{str(index)!r} has no weight_map object: the index is damaged; download it again")
        return sorted({_shard_path(folder, name, index) for name in weight_map.values()})
    if plain or len(files) == 1:  # the plain file, or a single variant such as ...fp16.safetensors
        chosen = (plain or files)[0]
        if not chosen.is_file():
            raise CheckpointError(f"{str(chosen)!r} is not a regular file; put the weights file there")
        return [chosen]
    if not files:
        raise CheckpointError(
            f"{str(folder)!r} has no diffusion_pytorch_model*.safetensors; a diffusers transformer folder "
            "holds config.json and diffusion_pytorch_model.safetensors (.bin weights are not supported: "
            "convert them to safetensors)"
        )
    raise CheckpointError(f"{str(folder)!r} has several weight variants {[p.name for p in files]}; keep one")


def _read_transformer_config(folder: Path) -> dict:
    config = _read_json_object(folder / "config.json", "use the config.json saved with the model")
    cls = config.get("_class_name", "PixArtTransformer2DModel")
    if cls not in ("PixArtTransformer2DModel", "Transformer2DModel"):
        raise CheckpointError(f"{str(folder)!r} holds a {_show(cls)}, not a PixArtTransformer2DModel")
    return config


def check_diffusers_transformer(folder: str | os.PathLike) -> PixArtGeometry | None:
    """Check a diffusers PixArt transformer folder's ``config.json`` against its weights, reading
    only the safetensors headers (no tensor data), before diffusers builds anything from it.

    Returns:
        The geometry, or ``None`` when the folder has no safetensors weights (nothing to compare).

    Raises:
        CheckpointError: a config entry that is not a sane number or contradicts the weights (block
            count, widths, channels), a shard outside the folder, or weights that are not PixArt's.
    """
    from safetensors import safe_open

    folder = Path(folder)
    config = _read_transformer_config(folder)
    if not any(folder.glob(f"{_WEIGHTS}*.safetensors*")):
        return None
    shapes: dict[str, torch.Tensor] = {}
    for file in _diffusers_weight_files(folder):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                    shapes[key] = torch.empty(handle.get_slice(key).get_shape(), device="meta")
        except Exception as exc:  # safetensors' own error types on a corrupt header
            raise CheckpointError(
                f"cannot read the header of {str(file)!r} ({type(exc).__name__}: {str(exc)[:120]}); the file is "
                "corrupt or incomplete, download it again"
            ) from None
    return to_pixart_layout(shapes, config)[1]


def _transformer_folder(folder: Path) -> Path:
    if (folder / "config.json").is_file() and any(folder.glob("diffusion_pytorch_model*.safetensors*")):
        return folder
    if (folder / "transformer" / "config.json").is_file():  # a whole pipeline folder
        return folder / "transformer"
    raise CheckpointError(
        f"{str(folder)!r} is not a diffusers transformer folder: it needs config.json and "
        "diffusion_pytorch_model*.safetensors (or a transformer/ subfolder with them)"
    )


def load_diffusers_transformer(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a diffusers ``PixArtTransformer2DModel`` folder (or a pipeline folder's ``transformer/``).

    Returns:
        ``(state_dict, config)``: diffusers keys, and the parsed ``config.json``.

    Raises:
        CheckpointError: missing files, or a config of another model class.
    """
    folder = _transformer_folder(Path(folder))
    config = _read_transformer_config(folder)
    state_dict: dict[str, torch.Tensor] = {}
    for file in _diffusers_weight_files(folder):
        state_dict.update(load_state_dict_file(file))
    return state_dict, config


def to_pixart_layout(
    state_dict: Mapping[str, torch.Tensor], diffusers_config: Mapping | None = None
) -> tuple[dict[str, torch.Tensor], PixArtGeometry]:
    """Bring a PixArt state dict of either layout into the original layout and read its geometry.

    Original checkpoints lose their ``pos_embed`` buffer (ComfyUI computes it) after it has told
    the sample size; diffusers ones gain a zero ``y_embedder.y_embedding`` (unused at inference).

    Args:
        state_dict: original or diffusers keys (a ``model.diffusion_model.`` style prefix is removed).
        diffusers_config: ``config.json`` of a diffusers folder (heads, sample size, interpolation).

    Returns:
        ``(state_dict, geometry)``; the state dict has exactly ``expected_pixart_shapes(geometry)``.

    Raises:
        CheckpointError: not a PixArt transformer, or shapes that do not fit its geometry.
    """
    sd = _strip_prefix(state_dict)
    if diffusers_config is not None and not isinstance(diffusers_config, Mapping):
        raise CheckpointError(f"the diffusers config must be a JSON object, not a {type(diffusers_config).__name__}")
    config = dict(diffusers_config or {})
    if is_diffusers_layout(sd):
        sd = diffusers_to_pixart(sd)
    elif not _is_pixart_layout(sd):
        raise CheckpointError(
            f"not a PixArt transformer checkpoint (keys such as {sorted(sd)[:3]}): MedSteer's loader takes a "
            "PixArt-alpha checkpoint, original (.pth/.safetensors with blocks.N.attn.qkv) or diffusers "
            "(transformer folder with transformer_blocks.N.attn1.to_q)"
        )
    geometry = pixart_geometry(
        sd,
        num_heads=config.get("num_attention_heads"),
        sample_size=config.get("sample_size"),
        interpolation_scale=config.get("interpolation_scale"),
    )
    sd.pop("pos_embed", None)
    if "y_embedder.y_embedding" not in sd:
        ref = sd["y_embedder.y_proj.fc1.weight"]
        sd["y_embedder.y_embedding"] = torch.zeros(
            (geometry.model_max_length, geometry.caption_channels), dtype=ref.dtype, device=ref.device
        )
    check_config_matches_geometry(config, geometry)
    check_state_dict_fits(sd, expected_pixart_shapes(geometry))
    return sd, geometry


def check_config_matches_geometry(config: Mapping, geometry: PixArtGeometry) -> None:
    """Raise unless every shape entry of a diffusers ``config.json`` agrees with the weights.

    diffusers builds the model from the config and then copies the weights in: a config with fewer
    layers than the weights silently dropped blocks, one with more failed with "Cannot copy out of
    meta tensor" (issue 12, F12). Entries that are absent are not checked.

    Raises:
        CheckpointError: an entry that is not a positive whole number, or that contradicts the weights.
    """
    fix = "the config.json and the weights come from different models; use the config.json saved with these weights"
    said = {}
    for key in (
        "num_layers",
        "num_attention_heads",
        "attention_head_dim",
        "in_channels",
        "out_channels",
        "patch_size",
        "caption_channels",
        "cross_attention_dim",
    ):
        if config.get(key) is not None:
            said[key] = _whole_number(config[key], f"{key} (config.json)", 1, 1 << 20, fix)
    pairs = [
        ("num_layers", said.get("num_layers"), geometry.depth, "blocks"),
        ("in_channels", said.get("in_channels"), geometry.in_channels, "input channels"),
        ("out_channels", said.get("out_channels", said.get("in_channels")), geometry.out_channels, "output channels"),
        ("patch_size", said.get("patch_size"), geometry.patch_size, "as patch size"),
        ("caption_channels", said.get("caption_channels"), geometry.caption_channels, "caption channels"),
        ("cross_attention_dim", said.get("cross_attention_dim"), geometry.hidden_size, "as width"),
    ]
    if "num_attention_heads" in said and "attention_head_dim" in said:
        width = said["num_attention_heads"] * said["attention_head_dim"]
        pairs.append(("num_attention_heads x attention_head_dim", width, geometry.hidden_size, "as width"))
    for name, value, actual, what in pairs:
        if value is not None and value != actual:
            raise CheckpointError(f"config.json says {name} = {value}, but the weights have {actual} {what}: {fix}")
    extra = config.get("use_additional_conditions")
    if extra is not None and not isinstance(extra, bool):
        raise CheckpointError(f"use_additional_conditions (config.json) is {_show(extra)}; it must be true or false")
    if extra is None and config.get("sample_size") is not None:
        extra = config["sample_size"] == 128  # diffusers' default for the switch
    if isinstance(extra, bool) and extra != geometry.micro_condition:
        raise CheckpointError(
            f"config.json asks for use_additional_conditions = {extra}, but the weights "
            f"{'have' if geometry.micro_condition else 'lack'} the size / aspect-ratio embedders: {fix}"
        )


def load_pixart_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], PixArtGeometry]:
    """Load a PixArt-alpha transformer from an original file or a diffusers folder.

    A diffusers-layout weight file next to a ``config.json`` uses that config too.

    Returns:
        ``(state_dict, geometry)`` in the original layout (see ``to_pixart_layout``).
    """
    path = Path(path)
    if path.is_dir():
        sd, config = load_diffusers_transformer(path)
        return to_pixart_layout(sd, config)
    sd = load_state_dict_file(path)
    config = None
    sibling = path.parent / "config.json"
    if is_diffusers_layout(_strip_prefix(sd)) and sibling.is_file():
        config = _read_json_object(sibling, "use the config.json saved with the weights, or remove it")
    return to_pixart_layout(sd, config)


def list_diffusers_folders(roots: Iterable[str | os.PathLike], max_depth: int = 3) -> list[str]:
    """Diffusers transformer folders under ``roots``, as ``relative/path/`` (with a trailing slash).

    A folder counts when it has ``config.json`` and ``diffusion_pytorch_model*.safetensors``; a
    pipeline folder is listed as its ``transformer/`` subfolder.
    """
    found = set()
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            rel = Path(dirpath).relative_to(root)
            if len(rel.parts) >= max_depth:
                dirnames.clear()
            if "config.json" in filenames and any(
                f.startswith("diffusion_pytorch_model") and ".safetensors" in f for f in filenames
            ):
                found.add(rel.as_posix() + "/")
    return sorted(found)


# ------------------------------------------------------------------------------------------------
# PEFT module patterns (rank_pattern / alpha_pattern keys)
# ------------------------------------------------------------------------------------------------
# PEFT matches a pattern key against a module name with ``re.match(rf"(.*\.)?({key})$", name)``.
# A backtracking pattern such as ``(a+)+$`` then hung the loader (183 s at 20 characters, issue 12
# F5), and PEFT itself runs the same regex when the CLI attaches the adapter. So a key must be a
# module path in a small regex subset: letters, digits, ``_``, ``-``, ``.``, ``\.``, ``\d``,
# ``\w``, simple ``[...]`` classes, ``(a|b)`` groups and ``^`` / ``$``; quantifiers (``? * + {m,n}``)
# only after a single character, no quantified group, at most MAX_PATTERN_REPEATS variable repeats
# and MAX_PATTERN_BRANCHES alternatives in all (``(a|.)`` x 40 or ``.?`` x 60 backtrack exponentially
# too). Such a pattern backtracks polynomially at worst in ``re`` (PEFT: < 10 ms on a 60-character
# module name), and is matched here without ``re``, in time linear in the module name.
MAX_PATTERN_LENGTH = 200
MAX_PATTERN_REPEATS = 2
MAX_PATTERN_BRANCHES = 16
_PATTERN_WORD = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_PATTERN_ESCAPES = {
    ".": lambda c: c == ".",
    "-": lambda c: c == "-",
    "_": lambda c: c == "_",
    "d": str.isdecimal,  # re's \d on str: Unicode category Nd
    "w": lambda c: c.isalnum() or c == "_",  # re's \w on str
}
PATTERN_RULE = (
    "use the module path (e.g. 'transformer_blocks.0.attn1.to_q' or 'attn2.to_k'), optionally with "
    "\\d+, .*, [0-9] or (to_q|to_k); quantifiers only after one character, at most "
    f"{MAX_PATTERN_REPEATS} of them, at most {MAX_PATTERN_BRANCHES} alternatives, {MAX_PATTERN_LENGTH} characters"
)


class _PatternRefused(Exception):
    """Internal: why a pattern is outside the supported subset."""


def _parse_pattern(pattern: str) -> list:
    """Parse a pattern of the supported subset into alternatives of items ``(kind, payload, lo, hi)``
    (``kind``: ``char`` with a predicate, ``group`` with alternatives, ``anchor`` ``^``/``$``;
    ``hi`` ``None`` means unbounded)."""
    if not isinstance(pattern, str):
        raise _PatternRefused(f"it is a {type(pattern).__name__}, not a string")
    if not pattern or len(pattern) > MAX_PATTERN_LENGTH:
        raise _PatternRefused(f"it has {len(pattern)} characters (1 to {MAX_PATTERN_LENGTH} allowed)")
    n, pos, repeats, branches = len(pattern), 0, 0, 1

    def char_class():
        nonlocal pos
        members = []
        pos += 1
        while pos < n and pattern[pos] != "]":
            c = pattern[pos]
            if c == "\\" and pos + 1 < n and pattern[pos + 1] in _PATTERN_ESCAPES:
                members.append(_PATTERN_ESCAPES[pattern[pos + 1]])
                pos += 2
            elif c in _PATTERN_WORD or c == ".":
                if pos + 2 < n and pattern[pos + 1] == "-" and pattern[pos + 2] != "]":
                    low, high = c, pattern[pos + 2]
                    if not (low.isalnum() and high.isalnum() and low.isascii() and high.isascii() and low <= high):
                        raise _PatternRefused(f"the class range {low}-{high} is not a range of letters or digits")
                    members.append(lambda ch, low=low, high=high: low <= ch <= high)
                    pos += 3
                else:
                    members.append(lambda ch, c=c: ch == c)
                    pos += 1
            else:
                raise _PatternRefused(f"{c!r} inside [...] is not supported (letters, digits, _ - . ranges only)")
        if pos >= n or not members:
            raise _PatternRefused("a [...] class is empty or not closed")
        pos += 1
        return lambda ch: any(test(ch) for test in members)

    def atom():
        nonlocal pos
        c = pattern[pos]
        if c in _PATTERN_WORD:
            pos += 1
            return lambda ch, c=c: ch == c
        if c == ".":
            pos += 1
            return lambda ch: ch != "\n"
        if c == "\\" and pos + 1 < n and pattern[pos + 1] in _PATTERN_ESCAPES:
            pos += 2
            return _PATTERN_ESCAPES[pattern[pos - 1]]
        if c == "[":
            return char_class()
        raise _PatternRefused(f"{pattern[pos : pos + 2]!r} at position {pos} is not supported")

    def quantifier() -> tuple[int, int | None]:
        nonlocal pos, repeats
        if pos >= n or pattern[pos] not in "?*+{":
            return 1, 1
        c = pattern[pos]
        pos += 1
        if c == "{":
            close = pattern.find("}", pos)
            body = pattern[pos:close] if close > 0 else ""
            low_text, comma, high_text = body.partition(",")
            if not (
                low_text.isdigit()
                and len(low_text) <= 2
                and (not high_text or high_text.isdigit() and len(high_text) <= 2)
            ):
                raise _PatternRefused(f"the repeat {{{body}}} is not {{m}}, {{m,}} or {{m,n}} with m, n below 100")
            pos = close + 1
            low = int(low_text)
            high = (int(high_text) if high_text else None) if comma else low
            if high is not None and high < low:
                raise _PatternRefused(f"the repeat {{{body}}} has its bounds reversed")
        else:
            low, high = {"?": (0, 1), "*": (0, None), "+": (1, None)}[c]
        if high is None or high > low:
            repeats += 1
            if repeats > MAX_PATTERN_REPEATS:
                raise _PatternRefused(f"it has more than {MAX_PATTERN_REPEATS} variable repeats (? * + {{m,n}})")
        if pos < n and pattern[pos] in "?*+{":
            raise _PatternRefused(f"a quantifier follows a quantifier at position {pos}")
        return low, high

    def sequence(depth: int) -> list:
        nonlocal pos
        items = []
        while pos < n and pattern[pos] not in "|)":
            c = pattern[pos]
            if c == "(":
                if depth >= 3:
                    raise _PatternRefused("groups are nested more than 3 deep")
                pos += 1
                if pattern.startswith("?:", pos):
                    pos += 2
                elif pattern.startswith("?", pos):
                    raise _PatternRefused("(?...) constructs are not supported")
                alternatives = alternation(depth + 1)
                if pos >= n or pattern[pos] != ")":
                    raise _PatternRefused("a '(' is not closed")
                pos += 1
                items.append(("group", alternatives, 1, 1))
            elif c in "^$":
                pos += 1
                items.append(("anchor", c, 1, 1))
            else:
                test = atom()
                items.append(("char", test, *quantifier()))
                continue
            if pos < n and pattern[pos] in "?*+{":
                raise _PatternRefused(f"a quantifier after a group or anchor (position {pos}) can backtrack")
        return items

    def alternation(depth: int) -> list:
        nonlocal pos, branches
        alternatives = [sequence(depth)]
        while pos < n and pattern[pos] == "|":
            pos += 1
            alternatives.append(sequence(depth))
        branches *= len(alternatives)
        if branches > MAX_PATTERN_BRANCHES:
            raise _PatternRefused(f"its (a|b) groups combine into more than {MAX_PATTERN_BRANCHES} alternatives")
        return alternatives

    parsed = alternation(0)
    if pos != n:
        raise _PatternRefused(f"an unmatched ')' at position {pos}")
    return parsed


def _advance(items: list, text: str, positions: set[int]) -> set[int]:
    """The end positions reachable by matching ``items`` from any of ``positions`` (an NFA
    simulation: O(len(items) x len(text)), never backtracking)."""
    n = len(text)
    for kind, payload, low, high in items:
        if not positions:
            break
        if kind == "anchor":
            positions = {p for p in positions if p == (0 if payload == "^" else n)}
        elif kind == "group":
            positions = set().union(*(_advance(alt, text, positions) for alt in payload))
        else:
            for _ in range(low):
                positions = {p + 1 for p in positions if p < n and payload(text[p])}
            if high is None:  # closure in one left-to-right pass
                reach, active = set(), False
                for i in range(min(positions, default=n + 1), n + 1):
                    active = i in positions or (active and payload(text[i - 1]))
                    if active:
                        reach.add(i)
                positions = reach
            else:
                frontier, reach = positions, set(positions)
                for _ in range(high - low):
                    frontier = {p + 1 for p in frontier if p < n and payload(text[p])}
                    reach |= frontier
                positions = reach
    return positions


@functools.lru_cache(maxsize=256)
def _compiled_pattern(pattern: str) -> list:
    return _parse_pattern(pattern)


def pattern_problem(pattern) -> str | None:
    """Why ``pattern`` cannot be a ``rank_pattern`` / ``alpha_pattern`` key here, or None if it can."""
    try:
        _compiled_pattern(pattern) if isinstance(pattern, str) else _parse_pattern(pattern)
    except _PatternRefused as why:
        return str(why)
    return None


def module_matches(pattern: str, module: str) -> bool:
    r"""Whether PEFT's ``re.match(rf"(.*\.)?({pattern})$", module)`` matches, computed without ``re``.

    Raises:
        CheckpointError: ``pattern`` is outside the supported subset (see ``PATTERN_RULE``).
    """
    try:
        parsed = _compiled_pattern(pattern)
    except (_PatternRefused, TypeError) as why:
        raise CheckpointError(f"module pattern {_show(pattern)} is not supported ({why}): {PATTERN_RULE}") from None
    starts = {0} | {i + 1 for i, c in enumerate(module) if c == "."}
    return len(module) in _advance([("group", parsed, 1, 1)], module, starts)


# ------------------------------------------------------------------------------------------------
# PEFT LoRA
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PeftLoraConfig:
    """The parts of a PEFT ``adapter_config.json`` that decide how a LoRA is applied.

    Attributes:
        r: default rank.
        lora_alpha: default alpha.
        use_rslora: scale ``alpha / sqrt(r)`` instead of ``alpha / r``.
        rank_pattern / alpha_pattern: per-module overrides (PEFT's suffix matching, see ``module_matches``).
        base_model: ``base_model_name_or_path`` (informational).
    """

    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    base_model: str | None = None

    @staticmethod
    def _pattern(patterns: Mapping, module: str):
        # PEFT's rule (peft.utils.other.get_pattern_key): the first pattern matching a name suffix.
        for pattern, value in patterns.items():
            if module_matches(pattern, module):
                return value
        return None

    def rank(self, module: str) -> int:
        """The rank PEFT gives ``module`` (``rank_pattern`` first, then ``r``)."""
        value = self._pattern(self.rank_pattern, module)
        return int(self.r if value is None else value)

    def scale(self, module: str) -> float:
        """``alpha / r`` for ``module`` (``alpha / sqrt(r)`` with rsLoRA), as PEFT computes it.

        Raises:
            CheckpointError: the scale is not finite or its size exceeds ``MAX_LORA_SCALE``.
        """
        alpha = self._pattern(self.alpha_pattern, module)
        alpha = float(self.lora_alpha if alpha is None else alpha)
        rank = self.rank(module)
        scale = alpha / math.sqrt(rank) if self.use_rslora else alpha / rank
        if not math.isfinite(scale) or abs(scale) > MAX_LORA_SCALE:
            raise CheckpointError(
                f"module {module!r} gets lora_alpha {alpha:g} / {'sqrt(r)' if self.use_rslora else 'r'} with r={rank}, "
                f"a scale of {scale:g}; a LoRA scale beyond +-{MAX_LORA_SCALE:g} only produces noise or NaN: "
                "fix lora_alpha / alpha_pattern in adapter_config.json (PEFT's default is lora_alpha = r)"
            )
        return scale


def read_peft_config(path: str | os.PathLike) -> PeftLoraConfig:
    """Parse and check an ``adapter_config.json``.

    Every value that decides the update is checked (issue 12, F8/F10): ``r`` and each
    ``rank_pattern`` rank a whole number from 1 to ``MAX_LORA_RANK``, ``lora_alpha`` and each
    ``alpha_pattern`` value finite with ``|alpha / r| <= MAX_LORA_SCALE``, every pattern key (and a
    string ``target_modules`` / ``exclude_modules``) inside the subset PEFT can match without
    backtracking (``PATTERN_RULE``).

    Raises:
        CheckpointError: missing or broken file, not a LoRA, a LoRA variant that changes the math
            (DoRA, LoRA bias, ``fan_in_fan_out``, full modules to save), or a value out of bounds.
    """
    path = Path(path)
    name = str(path)
    if not path.is_file():
        raise CheckpointError(
            f"{name!r} is missing; a PEFT adapter folder holds adapter_config.json and adapter_model.safetensors"
        )
    raw = _read_json_object(path, "save the adapter again with save_pretrained")
    if raw.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(
            f"{name!r} is a {_show(raw.get('peft_type')).strip(chr(39))} adapter; only LoRA adapters are supported"
        )
    for flag, meaning in (
        ("use_dora", "DoRA"),
        ("lora_bias", "LoRA bias terms"),
        ("fan_in_fan_out", "fan_in_fan_out (transposed Conv1D weights)"),
    ):
        if raw.get(flag):
            raise CheckpointError(
                f"{name!r} sets {flag}={json.dumps(raw[flag]) if isinstance(raw[flag], bool) else _show(raw[flag])}: {meaning} is not supported; use a plain LoRA adapter"
            )
    if raw.get("modules_to_save"):
        raise CheckpointError(
            f"{name!r} saves full modules {_show(raw['modules_to_save'])} besides the LoRA; that is not supported"
        )
    for key in ("r", "lora_alpha"):
        if key not in raw:
            raise CheckpointError(
                f"{name!r} has no {key!r} entry; PEFT writes it: save the adapter again with save_pretrained"
            )
    fix = f"fix it in {name!r} (PEFT adapters use r = 4 ... 256, lora_alpha about r)"
    r = _whole_number(raw["r"], f"r in {name!r}", 1, MAX_LORA_RANK, fix)
    bound = MAX_LORA_SCALE * MAX_LORA_RANK  # the scale itself is checked below, per module in scale()
    alpha = _finite_number(raw["lora_alpha"], f"lora_alpha in {name!r}", -bound, bound, fix)
    use_rslora = raw.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise CheckpointError(f"use_rslora in {name!r} is {_show(use_rslora)}; it must be true or false")
    patterns = {}
    for key, number in (("rank_pattern", _whole_number), ("alpha_pattern", _finite_number)):
        value = raw.get(key) or {}
        if not isinstance(value, dict):
            raise CheckpointError(
                f"{key} in {name!r} is a {type(value).__name__}; it must be an object of module pattern -> value"
            )
        for pattern, setting in value.items():
            problem = pattern_problem(pattern)
            if problem is not None:
                raise CheckpointError(
                    f"{key} key {_show(pattern)} in {name!r} is not supported ({problem}): {PATTERN_RULE}"
                )
            where = f"{key}[{pattern!r}] in {name!r}"
            if number is _whole_number:
                number(setting, where, 1, MAX_LORA_RANK, fix)
            else:
                number(setting, where, -bound, bound, fix)
        patterns[key] = dict(value)
    for key in ("target_modules", "exclude_modules"):  # PEFT runs re.fullmatch on a string value
        value = raw.get(key)
        if isinstance(value, str) and (problem := pattern_problem(value)) is not None:
            raise CheckpointError(f"{key} {_show(value)} in {name!r} is not supported ({problem}): {PATTERN_RULE}")
    base = raw.get("base_model_name_or_path")
    config = PeftLoraConfig(
        r=r,
        lora_alpha=alpha,
        use_rslora=use_rslora,
        rank_pattern=patterns["rank_pattern"],
        alpha_pattern=patterns["alpha_pattern"],
        base_model=base if isinstance(base, str) else None,
    )
    scale = alpha / math.sqrt(r) if use_rslora else alpha / r
    if abs(scale) > MAX_LORA_SCALE:
        raise CheckpointError(
            f"lora_alpha {alpha:g} with r={r} in {name!r} gives a LoRA scale of {scale:g}; beyond "
            f"+-{MAX_LORA_SCALE:g} an adapter only produces noise or NaN: {fix}"
        )
    return config


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: ``delta W = scale * up @ down`` (PEFT's ``lora_B @ lora_A``).

    Attributes:
        name: module path in the base model (``transformer_blocks.0.attn1.to_q``).
        down: ``lora_A.weight`` ``[r, in]`` (``[r, in, k, k]`` for a convolution).
        up: ``lora_B.weight`` ``[out, r]`` (``[out, r, 1, 1]``).
        scale: ``lora_alpha / r`` for this module.
    """

    name: str
    down: torch.Tensor
    up: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def delta_shape(self) -> tuple[int, ...]:
        return (int(self.up.shape[0]), *(int(s) for s in self.down.shape[1:]))


@dataclass(frozen=True)
class PeftAdapter:
    """A PEFT LoRA adapter read from ``adapter_config.json`` + ``adapter_model.safetensors``."""

    path: str
    config: PeftLoraConfig
    modules: tuple[LoraModule, ...]


_PEFT_KEY_RE = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(\.[^.]+)?\.weight$")
_PEFT_PREFIXES = ("base_model.model.",)


def load_peft_adapter(folder: str | os.PathLike) -> PeftAdapter:
    """Read one PEFT LoRA adapter folder and compute each module's scale.

    Raises:
        CheckpointError: missing files, unsupported keys (embedding LoRA, DoRA magnitudes,
            saved full modules), unpaired A/B matrices, or ranks that contradict the config.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"adapter folder {str(folder)!r} does not exist")
    config = read_peft_config(folder / "adapter_config.json")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        extra = (
            " (adapter_model.bin is not supported: re-save with safe_serialization=True)"
            if (folder / "adapter_model.bin").is_file()
            else ""
        )
        raise CheckpointError(
            f"{str(weights)!r} is missing{extra}; a PEFT adapter folder holds adapter_config.json and adapter_model.safetensors"
        )
    tensors = load_state_dict_file(weights)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name = key
        for prefix in _PEFT_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        if len(name) > MAX_MODULE_NAME or not name.isprintable():
            raise CheckpointError(
                f"{str(weights)!r} has a key of {len(name)} characters ({_show(name[:40])}...), not a module path: "
                "the file is damaged or not a PEFT adapter; save the adapter again with save_pretrained"
            )
        match = _PEFT_KEY_RE.match(name)
        if match is None:
            if "lora_embedding_" in name:
                why = "LoRA on embedding layers is not supported"
            elif "lora_magnitude_vector" in name:
                why = "DoRA magnitudes are not supported"
            elif ".lora_B" in name and name.endswith(".bias"):
                why = "LoRA bias terms are not supported"
            else:
                why = "only lora_A / lora_B weight matrices are supported (saved full modules are not)"
            raise CheckpointError(f"{str(weights)!r} has key {key!r}: {why}")
        pairs.setdefault(match.group("module"), {})[match.group("kind")] = tensor
    if not pairs:
        raise CheckpointError(f"{str(weights)!r} holds no LoRA matrices")
    modules = []
    for name in sorted(pairs):
        pair = pairs[name]
        if set(pair) != {"lora_A", "lora_B"}:
            raise CheckpointError(
                f"{str(weights)!r}: module {name!r} has {sorted(pair)} but needs both lora_A and lora_B"
            )
        down, up = pair["lora_A"], pair["lora_B"]
        if up.ndim < 2 or down.ndim < 2 or up.shape[1] != down.shape[0] or any(s != 1 for s in up.shape[2:]):
            raise CheckpointError(
                f"{str(weights)!r}: module {name!r} has lora_A {list(down.shape)} and lora_B {list(up.shape)}, "
                "which do not multiply (lora_B is [out, r], lora_A is [r, in])"
            )
        rank = config.rank(name)
        if down.shape[0] != rank:
            raise CheckpointError(
                f"{str(weights)!r}: module {name!r} has rank {down.shape[0]} but adapter_config.json says "
                f"r={rank}; the config does not belong to these weights"
            )
        modules.append(LoraModule(name, down, up, config.scale(name)))
    return PeftAdapter(str(folder), config, tuple(modules))


@dataclass(frozen=True)
class LoraPatch:
    """One LoRA update on one model weight.

    Attributes:
        target: the model's weight key (``diffusion_model.blocks.0.attn.qkv.weight``).
        offset: ``(dim, start, length)`` when the update covers a slice of a fused weight, else ``None``.
        module: the adapter module it came from.
    """

    target: str
    offset: tuple[int, int, int] | None
    module: LoraModule

    @property
    def scale(self) -> float:
        return self.module.scale

    def delta(self) -> torch.Tensor:
        """``scale * up @ down`` in float32, shaped like the (slice of the) target weight."""
        up = self.module.up.float().flatten(1)
        down = self.module.down.float().flatten(1)
        return (self.scale * (up @ down)).reshape(self.module.delta_shape)


def _check_fit(module: LoraModule, target: str, target_shape: tuple[int, ...], offset, adapter_path: str) -> None:
    want = target_shape if offset is None else (offset[2], *target_shape[1:])
    if module.delta_shape != want:
        part = "" if offset is None else f" (rows {offset[1]}:{offset[1] + offset[2]} of {list(target_shape)})"
        raise CheckpointError(
            f"LoRA module {module.name!r} of {adapter_path!r} does not fit {target!r}: the adapter's update has "
            f"shape {list(module.delta_shape)}, the model's weight{part} has shape {list(want)}. The adapter was "
            "trained for a model of another size; use it with the model it was trained on"
        )


def _lookup(target: str, shapes: Mapping, module: LoraModule, adapter_path: str, kind: str) -> tuple[int, ...]:
    if target not in shapes:
        raise CheckpointError(
            f"LoRA module {module.name!r} of {adapter_path!r} maps to {target!r}, which the {kind} does not have; "
            f"is this adapter for this {kind}?"
        )
    return _shape(shapes[target])


def transformer_lora_patches(
    adapter: PeftAdapter, model_shapes: Mapping[str, torch.Tensor | Sequence[int]], prefix: str = "diffusion_model."
) -> list[LoraPatch]:
    """Map a diffusers-PixArt LoRA onto an original-layout PixArt model's weights.

    Args:
        adapter: a PEFT adapter trained on ``PixArtTransformer2DModel``.
        model_shapes: the model's state dict (or key -> shape), e.g. a ComfyUI ``BaseModel``'s.
        prefix: the transformer's key prefix in ``model_shapes``.

    Returns:
        One ``LoraPatch`` per module; q/k/v updates cover their rows of the fused weights.

    Raises:
        CheckpointError: a module that is not a PixArt transformer module, or one whose shape does
            not fit (the message names the module, the weight and both shapes).
    """
    if f"{prefix}t_block.1.weight" not in model_shapes:
        raise CheckpointError(
            f"the model is not a PixArt transformer (no {prefix}t_block.1.weight); apply {adapter.path!r} to a "
            "PixArt-alpha model, e.g. from MedSteer Load PixArt-alpha Checkpoint"
        )
    patches = []
    for module in adapter.modules:
        target = _diffusers_module_target(module.name)
        if target is None:
            raise CheckpointError(
                f"LoRA module {module.name!r} of {adapter.path!r} is not a module of a diffusers PixArt transformer; "
                "is this the transformer_lora adapter?"
            )
        key = f"{prefix}{target.module}.weight"
        shape = _lookup(key, model_shapes, module, adapter.path, "PixArt model")
        offset = None
        if target.part is not None:
            if shape[0] % target.parts:
                raise CheckpointError(f"{key!r} has {shape[0]} rows, not divisible into {target.parts} fused parts")
            rows = shape[0] // target.parts
            offset = (0, target.part * rows, rows)
        _check_fit(module, key, shape, offset, adapter.path)
        patches.append(LoraPatch(key, offset, module))
    return patches


def find_t5_prefix(shapes: Iterable[str]) -> str:
    """The prefix under which a text encoder's state dict holds a T5 encoder
    (``t5xxl.transformer.`` in ComfyUI's PixArt CLIP, ``""`` for transformers' ``T5EncoderModel``).

    Raises:
        CheckpointError: no T5 encoder blocks among the keys.
    """
    anchor = "encoder.block.0.layer.0.SelfAttention.q.weight"
    found = sorted(k[: -len(anchor)] for k in shapes if k.endswith(anchor))
    if not found:
        raise CheckpointError(
            "the text encoder has no T5 encoder (no '...encoder.block.0.layer.0.SelfAttention.q.weight'); "
            "load T5-XXL with CLIPLoader (type pixart) and connect that CLIP"
        )
    return found[0]


def t5_lora_patches(
    adapter: PeftAdapter, encoder_shapes: Mapping[str, torch.Tensor | Sequence[int]], prefix: str | None = None
) -> list[LoraPatch]:
    """Map a transformers-T5 LoRA (``encoder.block.N.layer.0.SelfAttention.q`` ...) onto a T5
    encoder's weights.

    Args:
        adapter: a PEFT adapter trained on ``T5EncoderModel``.
        encoder_shapes: the text encoder's state dict (or key -> shape).
        prefix: key prefix of the T5 module; default ``find_t5_prefix(encoder_shapes)``.

    Raises:
        CheckpointError: a module the encoder lacks, or a shape that does not fit.
    """
    if prefix is None:
        prefix = find_t5_prefix(encoder_shapes)
    patches = []
    for module in adapter.modules:
        key = f"{prefix}{module.name}.weight"
        shape = _lookup(key, encoder_shapes, module, adapter.path, "T5 text encoder")
        _check_fit(module, key, shape, None, adapter.path)
        patches.append(LoraPatch(key, None, module))
    return patches


@dataclass(frozen=True)
class MedSteerLora:
    """The authors' LoRA layout: a transformer adapter and a T5 text-encoder adapter."""

    path: str
    transformer: PeftAdapter | None
    text_encoder: PeftAdapter | None


TRANSFORMER_LORA_DIR = "transformer_lora"
TEXT_ENCODER_LORA_DIR = "text_encoder_lora"


def load_medsteer_lora(
    folder: str | os.PathLike, *, transformer: bool = True, text_encoder: bool = True
) -> MedSteerLora:
    """Read ``folder/transformer_lora`` and ``folder/text_encoder_lora``.

    Args:
        folder: the LoRA folder.
        transformer / text_encoder: which halves are needed (a half that is not needed is not read,
            and may be absent).

    Raises:
        CheckpointError: the folder or a needed half is missing or malformed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"LoRA folder {str(folder)!r} does not exist")
    halves = {}
    for needed, sub, strength in (
        (transformer, TRANSFORMER_LORA_DIR, "strength_model"),
        (text_encoder, TEXT_ENCODER_LORA_DIR, "strength_clip"),
    ):
        if not needed:
            halves[sub] = None
            continue
        if not (folder / sub).is_dir():
            if (folder / "adapter_config.json").is_file():
                raise CheckpointError(
                    f"{str(folder)!r} is a single PEFT adapter, not the MedSteer layout: put the transformer "
                    f"adapter in {TRANSFORMER_LORA_DIR}/ and the T5 adapter in {TEXT_ENCODER_LORA_DIR}/ "
                    "of one folder (each with adapter_config.json and adapter_model.safetensors)"
                )
            # Never list the folder: this message reaches a shared server's clients (issue 12, F1).
            raise CheckpointError(
                f"{str(folder)!r} has no {sub}/ folder. The MedSteer LoRA layout is "
                f"{TRANSFORMER_LORA_DIR}/ and {TEXT_ENCODER_LORA_DIR}/, each with adapter_config.json and "
                f"adapter_model.safetensors; set {strength} to 0 to skip this half"
            )
        halves[sub] = load_peft_adapter(folder / sub)
    return MedSteerLora(str(folder), halves[TRANSFORMER_LORA_DIR], halves[TEXT_ENCODER_LORA_DIR])


def list_lora_folders(roots: Iterable[str | os.PathLike], max_depth: int = 3) -> list[str]:
    """Folders under ``roots`` in the MedSteer LoRA layout, as ``relative/path/``."""
    found = set()
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for dirpath, dirnames, _ in os.walk(root, followlinks=True):
            rel = Path(dirpath).relative_to(root)
            if len(rel.parts) >= max_depth:
                dirnames.clear()
            if TRANSFORMER_LORA_DIR in dirnames or TEXT_ENCODER_LORA_DIR in dirnames:
                found.add(rel.as_posix() + "/")
    return sorted(found)
