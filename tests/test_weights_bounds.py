"""medsteer_core.weights.bounds on crafted files (issue 12): block indices, adapter numbers, JSON
configs and module names out of bounds are refused before anything is built, with clear errors.

References are independent of the code under test: diffusers' own model (for layouts and
geometry) and PEFT's own ``merge_and_unload`` (for LoRA updates). The ``pixart`` and ``t5``
fixtures are tests/conftest.py's.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from medsteer_core import weights
from tests.weights_helpers import TINY_512, adapter_folder, random_original_state_dict, write_adapter


def test_one_huge_block_index_is_refused_before_anything_is_built(tmp_path):
    """F4: blocks.100000000.* in a 7.7 MB file made the depth 10^8 (minutes, gigabytes)."""
    import time

    sd = random_original_state_dict(TINY_512)
    sd["blocks.100000000.mlp.fc1.weight"] = torch.zeros(576, 1536)
    save_file(sd, str(tmp_path / "huge_index.safetensors"))
    start = time.perf_counter()
    with pytest.raises(weights.CheckpointError, match=r"block index '100000000'.*0 to 999"):
        weights.load_pixart_checkpoint(tmp_path / "huge_index.safetensors")
    assert time.perf_counter() - start < 5  # measured 0.01 s; ~minutes before the fix


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"blocks.3.mlp.fc1.weight": (576, 144)}, r"blocks 0-1, 3: .*block 2 is absent"),
        ({"blocks.01.mlp.fc1.weight": (576, 144)}, r"block index '01'"),
        ({"blocks.999.mlp.fc1.weight": (576, 144)}, r"blocks 0-1, 999: .*block 2 is absent"),
        (
            {"blocks." + "9" * 5000 + ".mlp.fc1.weight": (576, 144)},
            r"block index '99999999\.\.\. \(5000 characters\)' is not a block number from 0 to 999",
        ),
        ({"blocks.\u0663.mlp.fc1.weight": (576, 144)}, r"block index '\u0663'"),
    ],
)
def test_block_indices_must_be_0_to_n_minus_1(extra, message):
    shapes = {k: tuple(v.shape) for k, v in random_original_state_dict(TINY_512).items()}
    with pytest.raises(weights.CheckpointError, match=message):
        weights.pixart_geometry({**shapes, **extra})
    assert weights.MAX_DEPTH == 1000


@pytest.mark.parametrize(
    "content",
    [b"\xff\xfe not utf-8", b"[" * 100_000, b'{"num_layers": ' + b"9" * 5000 + b"}", b"[1, 2]", b"{", b""],
)
def test_broken_config_json_is_a_checkpoint_error(tmp_path, pixart, content):
    pixart.save_pretrained(tmp_path / "t")
    (tmp_path / "t" / "config.json").write_bytes(content)
    with pytest.raises(weights.CheckpointError, match="config.json"):
        weights.load_pixart_checkpoint(tmp_path / "t")


@pytest.mark.parametrize(
    "config, message",
    [
        ({"lora_alpha": float("nan")}, r"lora_alpha in .* is nan"),
        ({"lora_alpha": float("inf")}, r"lora_alpha in .* is inf"),
        ({"lora_alpha": 1e30}, r"lora_alpha in .* is 1e\+30"),
        ({"lora_alpha": "8"}, r"lora_alpha in .* is '8'; it must be a number"),
        ({"r": float("inf")}, r"r in .* is inf"),  # "r": 1e400 in JSON reads as inf (OverflowError before)
        ({"r": 0}, r"r in .* is 0; it must be a whole number from 1 to 16384"),
        ({"r": -2}, r"r in .* is -2"),
        ({"r": 2.5}, r"r in .* is 2.5"),
        ({"r": True}, r"r in .* is True"),
        ({"r": 10**6}, r"r in .* is 1000000"),
        ({"rank_pattern": ["to_k"]}, r"rank_pattern in .* is a list"),  # TypeError before
        ({"rank_pattern": {"to_k": 0}}, r"rank_pattern\['to_k'\] in .* is 0"),
        ({"alpha_pattern": {"to_k": float("nan")}}, r"alpha_pattern\['to_k'\] in .* is nan"),
        ({"alpha_pattern": {"to_k": 1e9}}, r"alpha_pattern\['to_k'\] in .* is 1000000000.0"),
        ({"alpha_pattern": {"to_k": 3000}}, r"module 'transformer_blocks.0.attn2.to_k' gets lora_alpha 3000 / r"),
        ({"use_rslora": "false"}, r"use_rslora in .* is 'false'"),
        ({"lora_alpha": 3000.0}, r"gives a LoRA scale of 1500"),
    ],
)
def test_adapter_numbers_out_of_bounds_are_refused(tmp_path, config, message):
    """F8 / F10: NaN, inf and 1e30 alphas were applied (black images, exit 0); r 1e400 was an OverflowError."""
    folder = adapter_folder(tmp_path, **config)
    with pytest.raises(weights.CheckpointError, match=message):
        weights.load_peft_adapter(folder)


@pytest.mark.parametrize(
    "content", [b"\xff not utf-8", b"[" * 100_000, b'{"r": ' + b"1" * 5000 + b', "lora_alpha": 1}', b"[]"]
)
def test_broken_adapter_config_is_a_checkpoint_error(tmp_path, content):
    folder = adapter_folder(tmp_path)
    (folder / "adapter_config.json").write_bytes(content)
    with pytest.raises(weights.CheckpointError, match="adapter_config.json"):
        weights.load_peft_adapter(folder)


def test_overlong_module_name_in_adapter_is_refused(tmp_path):
    name = "m" * 1000
    folder = tmp_path / "long"
    write_adapter(folder, {f"{name}.lora_A.weight": torch.zeros(2, 8), f"{name}.lora_B.weight": torch.zeros(8, 2)})
    with pytest.raises(weights.CheckpointError, match="has a key of 1014 characters"):
        weights.load_peft_adapter(folder)
