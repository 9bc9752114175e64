"""medsteer_core.weights.pixart_layout: the diffusers and original PixArt key layouts, both ways.

References are independent of the code under test: diffusers' own model (for layouts and
geometry) and PEFT's own ``merge_and_unload`` (for LoRA updates). The ``pixart`` and ``t5``
fixtures are tests/conftest.py's.
"""

from __future__ import annotations

import pytest
import torch

from medsteer_core import weights
from tests.tiny_models import tiny_pixart
from tests.weights_helpers import TINY_512, random_original_state_dict


@pytest.mark.parametrize("micro", [False, True])
def test_diffusers_layout_converts_to_the_original_and_back(micro):
    model = tiny_pixart(micro_condition=micro)
    sd = model.state_dict()
    original, geometry = weights.to_pixart_layout(sd, dict(model.config))
    assert geometry.micro_condition is micro
    assert {k: tuple(v.shape) for k, v in original.items()} == weights.expected_pixart_shapes(geometry)
    h = geometry.hidden_size
    qkv = original["blocks.1.attn.qkv.weight"]
    assert torch.equal(qkv[:h], sd["transformer_blocks.1.attn1.to_q.weight"])
    assert torch.equal(qkv[h : 2 * h], sd["transformer_blocks.1.attn1.to_k.weight"])
    assert torch.equal(qkv[2 * h :], sd["transformer_blocks.1.attn1.to_v.weight"])
    kv = original["blocks.0.cross_attn.kv_linear.bias"]
    assert torch.equal(kv[h:], sd["transformer_blocks.0.attn2.to_v.bias"])
    assert torch.equal(original["final_layer.scale_shift_table"], sd["scale_shift_table"])
    back = weights.pixart_to_diffusers(original)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    # and diffusers itself accepts the round trip
    model.load_state_dict(back, strict=True)


def test_prefixed_full_checkpoint_is_unwrapped():
    sd = random_original_state_dict(TINY_512)
    wrapped = {f"model.diffusion_model.{k}": v for k, v in sd.items()}
    wrapped["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1)
    out, geometry = weights.to_pixart_layout(wrapped)
    assert geometry == TINY_512
    assert torch.equal(out["blocks.1.mlp.fc2.weight"], sd["blocks.1.mlp.fc2.weight"])


def test_diffusers_conversion_names_foreign_keys_and_missing_parts(pixart):
    sd = dict(pixart.state_dict())
    sd["text_encoder.shared.weight"] = torch.zeros(1)
    with pytest.raises(weights.CheckpointError, match="text_encoder.shared.weight"):
        weights.diffusers_to_pixart(sd)
    sd = dict(pixart.state_dict())
    del sd["transformer_blocks.0.attn1.to_k.weight"]
    with pytest.raises(weights.CheckpointError, match=r"blocks.0.attn.qkv.weight.*\[1\]"):
        weights.diffusers_to_pixart(sd)


def test_fused_parts_that_do_not_stack_and_non_string_keys_are_checkpoint_errors(tmp_path, pixart):
    """F10: torch.cat's RuntimeError and an AttributeError on int keys escaped before."""
    sd = dict(pixart.state_dict())
    sd["transformer_blocks.0.attn1.to_k.weight"] = torch.zeros(144, 100)
    with pytest.raises(weights.CheckpointError, match=r"blocks.0.attn.qkv.weight: .*\[144, 100\].*do not stack"):
        weights.to_pixart_layout(sd)
    with pytest.raises(weights.CheckpointError, match="does not split into 3 equal parts"):
        weights.pixart_to_diffusers({"blocks.0.attn.qkv.weight": torch.zeros(100, 144)})
    torch.save({"state_dict": {0: torch.zeros(1)}}, tmp_path / "int_keys.pth")
    with pytest.raises(weights.CheckpointError, match="names to tensors"):
        weights.load_pixart_checkpoint(tmp_path / "int_keys.pth")
