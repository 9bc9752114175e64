"""medsteer_core.weights.pixart: a PixArt's geometry read from its weights' shapes, and the shapes
a geometry expects.

References are independent of the code under test: diffusers' own model (for layouts and
geometry) and PEFT's own ``merge_and_unload`` (for LoRA updates). The ``pixart`` and ``t5``
fixtures are tests/conftest.py's.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from medsteer_core import weights
from tests.checkpoint_factories import (
    PIXART_XL_2_512_CONFIG,
)
from tests.weights_helpers import TINY_512, random_original_state_dict


def test_geometry_of_the_tiny_model(pixart):
    _, geometry = weights.to_pixart_layout(pixart.state_dict(), dict(pixart.config))
    assert geometry == TINY_512


def test_full_size_pixart_xl_2_512_geometry_without_allocating():
    from diffusers import PixArtTransformer2DModel

    with torch.device("meta"):
        model = PixArtTransformer2DModel.from_config(PIXART_XL_2_512_CONFIG)
    original, geometry = weights.to_pixart_layout(model.state_dict(), PIXART_XL_2_512_CONFIG)
    assert all(t.is_meta for t in original.values())
    assert (geometry.hidden_size, geometry.depth, geometry.num_heads) == (1152, 28, 16)
    assert (geometry.caption_channels, geometry.model_max_length, geometry.sample_size) == (4096, 120, 64)
    assert geometry.micro_condition is False  # no size / aspect embedders: what makes ComfyUI say "Sigma"
    config = geometry.comfy_unet_config()
    assert config["image_model"] == "pixart_alpha" and config["micro_condition"] is False
    assert config["pe_interpolation"] == 1
    params = sum(math.prod(s) for s in weights.expected_pixart_shapes(geometry).values())
    # 610.9M parameters as published, less the 120 x 4096 null caption embedding diffusers does not store
    assert params - 120 * 4096 == sum(p.numel() for p in model.parameters())
    assert 600e6 < params < 620e6


def test_original_checkpoint_without_heads_infers_pixart_head_width():
    sd = random_original_state_dict(TINY_512)
    geometry = weights.pixart_geometry(sd)
    assert geometry == TINY_512  # heads from 72-wide heads, sample size from pos_embed


def test_original_checkpoint_without_pos_embed_leaves_interpolation_dynamic():
    sd = random_original_state_dict(TINY_512, pos_embed=False)
    geometry = weights.pixart_geometry(sd)
    assert geometry.sample_size is None and geometry.pe_interpolation is None
    assert "pe_interpolation" not in geometry.comfy_unet_config()


def test_heads_cannot_be_guessed_for_non_pixart_widths():
    geometry = weights.PixArtGeometry(**{**TINY_512.__dict__, "hidden_size": 96, "num_heads": 2})
    sd = random_original_state_dict(geometry)
    with pytest.raises(weights.CheckpointError, match="cannot tell the number of attention heads of hidden size 96"):
        weights.pixart_geometry(sd)
    assert weights.pixart_geometry(sd, num_heads=2).num_heads == 2


@pytest.mark.parametrize(
    "key, shape",
    [
        ("x_embedder.proj.weight", (0, 4, 2, 2)),  # ZeroDivisionError before
        ("x_embedder.proj.weight", (144, 4, 2)),  # ValueError (unpacking) before
        ("x_embedder.proj.weight", (144, 4, 0, 0)),  # ZeroDivisionError before
        ("y_embedder.y_proj.fc1.weight", (144,)),  # IndexError before
        ("pos_embed", (1024,)),  # IndexError before
        ("y_embedder.y_embedding", ()),  # IndexError before
    ],
)
def test_malformed_geometry_tensors_are_checkpoint_errors(key, shape):
    shapes = {k: tuple(v.shape) for k, v in random_original_state_dict(TINY_512).items()}
    shapes[key] = shape
    with pytest.raises(weights.CheckpointError, match=re.escape(key)):
        weights.pixart_geometry(shapes)
