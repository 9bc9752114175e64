"""PixArt key layouts: the original one (``blocks.3.attn.qkv``; ComfyUI's ``PixArtMS``) and diffusers'
(``transformer_blocks.3.attn1.to_q``), and conversion between them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from .bounds import CheckpointError

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
