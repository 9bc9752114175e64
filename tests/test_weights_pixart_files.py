"""medsteer_core.weights.pixart_files: original .pth / .safetensors checkpoints, diffusers folders
(pipeline, transformer, sharded), their configs, and crafted files refused.

References are independent of the code under test: diffusers' own model (for layouts and
geometry) and PEFT's own ``merge_and_unload`` (for LoRA updates). The ``pixart`` and ``t5``
fixtures are tests/conftest.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from medsteer_core import MedSteerError, weights
from tests.weights_helpers import TINY_512, random_original_state_dict


def test_to_pixart_layout_refuses_other_models_and_broken_checkpoints():
    with pytest.raises(weights.CheckpointError, match="not a PixArt transformer checkpoint"):
        weights.to_pixart_layout({"input_blocks.0.0.weight": torch.zeros(1)})
    sd = random_original_state_dict(TINY_512)
    del sd["blocks.1.cross_attn.proj.bias"]
    with pytest.raises(weights.CheckpointError, match=r"missing 1 key\(s\) \['blocks.1.cross_attn.proj.bias'\]"):
        weights.to_pixart_layout(sd)
    sd = random_original_state_dict(TINY_512)
    sd["blocks.0.attn.proj.weight"] = torch.zeros(144, 100)
    with pytest.raises(weights.CheckpointError, match=r"'blocks.0.attn.proj.weight'.*\[144, 100\].*\[144, 144\]"):
        weights.to_pixart_layout(sd)
    sd = random_original_state_dict(TINY_512)
    del sd["x_embedder.proj.weight"]
    with pytest.raises(weights.CheckpointError, match="x_embedder.proj.weight"):
        weights.pixart_geometry(sd)


def test_load_original_pth_and_safetensors(tmp_path):
    sd = random_original_state_dict(TINY_512)
    torch.save({"state_dict": sd}, tmp_path / "PixArt-XL-2-512x512.pth")
    save_file(sd, str(tmp_path / "pixart.safetensors"))
    for name in ("PixArt-XL-2-512x512.pth", "pixart.safetensors"):
        out, geometry = weights.load_pixart_checkpoint(tmp_path / name)
        assert geometry == TINY_512
        assert "pos_embed" not in out
        assert torch.equal(out["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"])


class Payload:
    """Stands for any pickled object: loading it would run its class's code."""


def test_pickled_code_is_refused(tmp_path):
    torch.save({"state_dict": {"x": Payload()}}, tmp_path / "evil.pth")
    with pytest.raises(weights.CheckpointError, match="weights-only"):
        weights.load_state_dict_file(tmp_path / "evil.pth")


def test_corrupt_and_missing_files(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(weights.CheckpointError, match="corrupt"):
        weights.load_state_dict_file(tmp_path / "bad.safetensors")
    with pytest.raises(weights.CheckpointError, match="does not exist"):
        weights.load_pixart_checkpoint(tmp_path / "nope.pth")
    assert issubclass(weights.CheckpointError, MedSteerError) and issubclass(weights.CheckpointError, ValueError)


def test_diffusers_folder_pipeline_folder_and_listing(tmp_path, pixart):
    pixart.save_pretrained(tmp_path / "models" / "PixArt-tiny" / "transformer")
    (tmp_path / "models" / "PixArt-tiny" / "model_index.json").write_text("{}")
    for folder in (tmp_path / "models" / "PixArt-tiny", tmp_path / "models" / "PixArt-tiny" / "transformer"):
        out, geometry = weights.load_pixart_checkpoint(folder)
        assert geometry == TINY_512
    # the weight file alone, next to its config.json, uses that config
    _, geometry = weights.load_pixart_checkpoint(
        tmp_path / "models" / "PixArt-tiny" / "transformer" / "diffusion_pytorch_model.safetensors"
    )
    assert geometry == TINY_512
    assert weights.list_diffusers_folders([tmp_path / "models", tmp_path / "absent"]) == ["PixArt-tiny/transformer/"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(weights.CheckpointError, match="not a diffusers transformer folder"):
        weights.load_pixart_checkpoint(tmp_path / "empty")


def test_diffusers_folder_of_another_model_is_refused(tmp_path, pixart):
    pixart.save_pretrained(tmp_path / "t")
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    config["_class_name"] = "UNet2DConditionModel"
    (tmp_path / "t" / "config.json").write_text(json.dumps(config))
    with pytest.raises(weights.CheckpointError, match="UNet2DConditionModel"):
        weights.load_pixart_checkpoint(tmp_path / "t")


def test_sharded_diffusers_folder(tmp_path, pixart):
    sd = {k: v.contiguous() for k, v in pixart.state_dict().items()}
    keys = sorted(sd)
    half = len(keys) // 2
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(pixart.config)))
    shards = {
        "diffusion_pytorch_model-00001-of-00002.safetensors": keys[:half],
        "diffusion_pytorch_model-00002-of-00002.safetensors": keys[half:],
    }
    weight_map = {}
    for name, part in shards.items():
        save_file({k: sd[k] for k in part}, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _, geometry = weights.load_pixart_checkpoint(folder)
    assert geometry == TINY_512
    (folder / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(weights.CheckpointError, match="00002-of-00002.*missing"):
        weights.load_pixart_checkpoint(folder)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"interpolation_scale": float("nan")}, r"interpolation_scale \(config.json\) is nan"),
        ({"interpolation_scale": float("inf")}, r"interpolation_scale \(config.json\) is inf"),
        ({"interpolation_scale": 0}, r"interpolation_scale \(config.json\) is 0"),
        ({"num_attention_heads": -1}, r"num_attention_heads \(config.json\) is -1"),
        ({"num_attention_heads": 0}, r"num_attention_heads \(config.json\) is 0"),
        ({"num_attention_heads": 5}, r"not divisible by 5 heads"),
        ({"num_attention_heads": "2"}, r"num_attention_heads \(config.json\) is '2'"),
        ({"num_attention_heads": 2.5}, r"num_attention_heads \(config.json\) is 2.5"),
        ({"sample_size": -64}, r"sample_size \(config.json\) is -64"),
        ({"sample_size": 10**9}, r"sample_size \(config.json\) is 1000000000.*1 to 1024"),
        ({"num_layers": 1}, r"num_layers = 1, but the weights have 2 blocks"),
        ({"num_layers": 3}, r"num_layers = 3, but the weights have 2 blocks"),
        ({"attention_head_dim": 36}, r"num_attention_heads x attention_head_dim = 72, but the weights have 144"),
        ({"in_channels": 3}, r"in_channels = 3, but the weights have 4"),
        ({"caption_channels": 4096}, r"caption_channels = 4096, but the weights have 32"),
        ({"use_additional_conditions": True}, r"use_additional_conditions = True.*lack"),
        ({"use_additional_conditions": "yes"}, r"use_additional_conditions \(config.json\) is 'yes'"),
    ],
)
def test_every_config_field_used_is_checked(tmp_path, pixart, entry, message):
    """F9 / F12: config.json is checked against the weights before any model is built."""
    config = {**dict(pixart.config), **entry}
    with pytest.raises(weights.CheckpointError, match=message):
        weights.to_pixart_layout(pixart.state_dict(), config)
    folder = tmp_path / "t"
    pixart.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(weights.CheckpointError, match=message):
        weights.load_pixart_checkpoint(folder)
    with pytest.raises(weights.CheckpointError, match=message):
        weights.check_diffusers_transformer(folder)


def test_check_diffusers_transformer_reads_headers_only(tmp_path, pixart):
    pixart.save_pretrained(tmp_path / "t")
    assert weights.check_diffusers_transformer(tmp_path / "t") == TINY_512


def _shard_folder(tmp_path, pixart, names) -> Path:
    sd = {k: v.contiguous() for k, v in pixart.state_dict().items()}
    folder = tmp_path / "model" / "transformer"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(dict(pixart.config)))
    keys = sorted(sd)
    weight_map = {}
    for i, name in enumerate(names):
        part = keys[i :: len(names)]
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: sd[k] for k in part}, str(target))
        weight_map.update(dict.fromkeys(part, name))
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("escape", ["../outside.safetensors", "ABSOLUTE", "sub/inner.safetensors", "x.bin"])
def test_shard_index_names_only_files_in_the_folder(tmp_path, pixart, escape):
    """F13: a weight_map naming ../x.safetensors or an absolute path was loaded."""
    if escape == "ABSOLUTE":
        escape = str(tmp_path / "elsewhere.safetensors")
    folder = _shard_folder(tmp_path, pixart, ["diffusion_pytorch_model-00001-of-00002.safetensors", escape])
    assert (folder / escape).is_file()  # the file exists: only the name is wrong
    for load in (weights.load_pixart_checkpoint, weights.check_diffusers_transformer):
        with pytest.raises(weights.CheckpointError, match="shard"):
            load(folder)


def test_shard_that_is_not_a_regular_file_is_refused(tmp_path, pixart):
    import os

    folder = _shard_folder(tmp_path, pixart, ["a.safetensors", "b.safetensors"])
    (folder / "b.safetensors").unlink()
    os.mkfifo(folder / "b.safetensors")  # a FIFO would block the reader forever
    with pytest.raises(weights.CheckpointError, match="'b.safetensors', which is missing or not a regular file"):
        weights.check_diffusers_transformer(folder)
