"""Helpers of the tests/test_weights_*.py modules: a released PixArt's original state dict at a tiny
geometry, and PEFT adapter folders written by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from medsteer_core import weights


def random_original_state_dict(geometry: weights.PixArtGeometry, seed: int = 0, pos_embed: bool = True):
    """What a released PixArt .pth holds: the original key layout (plus the pos_embed buffer)."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(shape, generator=g) for k, shape in weights.expected_pixart_shapes(geometry).items()}
    if pos_embed:
        side = geometry.sample_size // geometry.patch_size
        sd["pos_embed"] = torch.randn(1, side * side, geometry.hidden_size, generator=g)
    return sd


TINY_512 = weights.PixArtGeometry(
    hidden_size=144,
    depth=2,
    num_heads=2,
    patch_size=2,
    in_channels=4,
    out_channels=8,
    caption_channels=32,
    model_max_length=120,
    mlp_ratio=4.0,
    micro_condition=False,
    sample_size=64,
    pe_interpolation=1,
)


def write_adapter(folder, tensors, **config):
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, **config}))


def adapter_folder(tmp_path, **config) -> Path:
    a, b = torch.randn(2, 8), torch.randn(8, 2)
    folder = tmp_path / "adapter"
    write_adapter(
        folder,
        {"transformer_blocks.0.attn2.to_k.lora_A.weight": a, "transformer_blocks.0.attn2.to_k.lora_B.weight": b},
        **config,
    )
    return folder
