"""PixArt geometry: the model's shape read from its weights, the tensors a model of that shape has,
and whether a state dict fits it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .bounds import MAX_DEPTH, MAX_INTERPOLATION_SCALE, MAX_SAMPLE_SIZE, CheckpointError, _finite_number, _whole_number
from .pixart_layout import _BLOCK_RE, PIXART_HEAD_DIM


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


def _check_geometry_tensors(shapes: Mapping[str, tuple[int, ...]]) -> None:
    """The tensors the geometry is read from are there, with the number of dimensions PixArt uses."""
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


def _heads(hidden: int, num_heads) -> int:
    """The attention heads: the config's, else ``hidden / PIXART_HEAD_DIM``; they must split ``hidden``."""
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
    return num_heads


def _sample_size(shapes, patch: int, sample_size, interpolation_scale) -> tuple[int | None, float | None]:
    """The training latent size (the config's, else read from ``pos_embed``) and the position
    embedding's interpolation scale (the config's, else ``max(sample_size // 64, 1)``)."""
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
    return sample_size, interpolation_scale


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
    _check_geometry_tensors(shapes)
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
    num_heads = _heads(hidden, num_heads)
    sample_size, interpolation_scale = _sample_size(shapes, patch, sample_size, interpolation_scale)
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
