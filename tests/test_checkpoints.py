"""medsteer_core.weights without ComfyUI: key layouts, geometry, files, PEFT LoRA scales and mapping.

References are independent of the code under test: diffusers' own model (for layouts and
geometry) and PEFT's own ``merge_and_unload`` (for LoRA updates).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from medsteer_core import MedSteerError, weights
from tests.checkpoint_factories import (
    PIXART_XL_2_512_CONFIG,
    T5_TARGETS,
    make_medsteer_lora,
    merged_state_dict,
    save_adapter,
)
from tests.tiny_models import tiny_pixart, tiny_t5


@pytest.fixture(scope="module")
def pixart():
    return tiny_pixart()


@pytest.fixture(scope="module")
def t5():
    return tiny_t5()


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


# ------------------------------------------------------------------------------------------------
# layouts and geometry
# ------------------------------------------------------------------------------------------------
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


def test_prefixed_full_checkpoint_is_unwrapped():
    sd = random_original_state_dict(TINY_512)
    wrapped = {f"model.diffusion_model.{k}": v for k, v in sd.items()}
    wrapped["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1)
    out, geometry = weights.to_pixart_layout(wrapped)
    assert geometry == TINY_512
    assert torch.equal(out["blocks.1.mlp.fc2.weight"], sd["blocks.1.mlp.fc2.weight"])


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


def test_diffusers_conversion_names_foreign_keys_and_missing_parts(pixart):
    sd = dict(pixart.state_dict())
    sd["text_encoder.shared.weight"] = torch.zeros(1)
    with pytest.raises(weights.CheckpointError, match="text_encoder.shared.weight"):
        weights.diffusers_to_pixart(sd)
    sd = dict(pixart.state_dict())
    del sd["transformer_blocks.0.attn1.to_k.weight"]
    with pytest.raises(weights.CheckpointError, match=r"blocks.0.attn.qkv.weight.*\[1\]"):
        weights.diffusers_to_pixart(sd)


def test_heads_cannot_be_guessed_for_non_pixart_widths():
    geometry = weights.PixArtGeometry(**{**TINY_512.__dict__, "hidden_size": 96, "num_heads": 2})
    sd = random_original_state_dict(geometry)
    with pytest.raises(weights.CheckpointError, match="cannot tell the number of attention heads of hidden size 96"):
        weights.pixart_geometry(sd)
    assert weights.pixart_geometry(sd, num_heads=2).num_heads == 2


# ------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------
# PEFT LoRA
# ------------------------------------------------------------------------------------------------
def apply_patches(state_dict, patches, strength=1.0):
    out = {k: v.clone() for k, v in state_dict.items()}
    for patch in patches:
        weight = out[patch.target]
        if patch.offset is not None:
            dim, start, length = patch.offset
            weight = weight.narrow(dim, start, length)
        weight += strength * patch.delta()
    return out


@pytest.fixture(scope="module")
def lora(tmp_path_factory, pixart, t5):
    folder = tmp_path_factory.mktemp("loras") / "medsteer"
    peft_transformer, peft_t5 = make_medsteer_lora(folder, pixart, t5)
    return folder, peft_transformer, peft_t5


def test_config_scale_is_alpha_over_r(lora):
    folder, _, _ = lora
    adapter = weights.load_peft_adapter(folder / "transformer_lora")
    assert adapter.config.r == 4 and adapter.config.lora_alpha == 8
    assert {m.scale for m in adapter.modules} == {2.0}
    t5_adapter = weights.load_peft_adapter(folder / "text_encoder_lora")
    assert {m.scale for m in t5_adapter.modules} == {3.0}


@pytest.mark.parametrize("strength", [1.0, 0.6, -1.5])
def test_transformer_patches_equal_peft_merge(lora, pixart, strength):
    folder, peft_transformer, _ = lora
    base, _ = weights.to_pixart_layout(pixart.state_dict(), dict(pixart.config))
    merged, _ = weights.to_pixart_layout(merged_state_dict(peft_transformer), dict(pixart.config))
    adapter = weights.load_peft_adapter(folder / "transformer_lora")
    patches = weights.transformer_lora_patches(adapter, base, prefix="")
    # 2 blocks x (q, k, v, out of both attentions + 2 MLP) + proj_out + pos_embed.proj
    assert len(patches) == 2 * 10 + 2
    assert {p.offset for p in patches if p.target == "blocks.0.attn.qkv.weight"} == {
        (0, 0, 144),
        (0, 144, 144),
        (0, 288, 144),
    }
    patched = apply_patches(base, patches, strength)
    changed = 0
    for key in base:
        expected = base[key] + strength * (merged[key] - base[key])
        torch.testing.assert_close(patched[key], expected, rtol=0, atol=1e-5)
        changed += not torch.equal(merged[key], base[key])
    assert changed == 2 * 7 + 2  # per block: qkv, attn.proj, q_linear, kv_linear, cross_attn.proj, fc1, fc2


def test_t5_patches_equal_peft_merge(lora, t5):
    folder, _, peft_t5 = lora
    base = dict(t5.state_dict())
    merged = merged_state_dict(peft_t5)
    adapter = weights.load_peft_adapter(folder / "text_encoder_lora")
    prefixed = {f"t5xxl.transformer.{k}": v for k, v in base.items()}
    assert weights.find_t5_prefix(prefixed) == "t5xxl.transformer."
    patches = weights.t5_lora_patches(adapter, prefixed)
    assert len(patches) == 2 * len(T5_TARGETS)
    patched = apply_patches(prefixed, patches, 0.5)
    for key in base:
        torch.testing.assert_close(
            patched[f"t5xxl.transformer.{key}"], base[key] + 0.5 * (merged[key] - base[key]), rtol=0, atol=1e-6
        )


def test_rank_and_alpha_patterns_and_rslora_match_peft(tmp_path, pixart):
    from peft.tuners.lora import LoraLayer

    for kwargs in ({"rank_pattern": {"to_q": 2}, "alpha_pattern": {"ff.net.2": 3.0}}, {"use_rslora": True}):
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        peft_model = save_adapter(pixart, folder, 4, 8.0, ["to_q", "to_v", "ff.net.2"], **kwargs)
        adapter = weights.load_peft_adapter(folder)
        ours = {m.name: m.scale for m in adapter.modules}
        theirs = {
            name.removeprefix("base_model.model."): module.scaling["default"]
            for name, module in peft_model.named_modules()
            if isinstance(module, LoraLayer)
        }
        assert ours == pytest.approx(theirs)
        assert len(set(ours.values())) > 1 or kwargs.get("use_rslora")


def test_adapter_for_another_model_size_names_key_and_both_shapes(tmp_path, t5):
    small = tiny_pixart(heads=1)
    save_adapter(small, tmp_path / "a", 4, 8.0, ["to_q"])
    base, _ = weights.to_pixart_layout(tiny_pixart().state_dict())
    adapter = weights.load_peft_adapter(tmp_path / "a")
    with pytest.raises(weights.CheckpointError) as info:
        weights.transformer_lora_patches(adapter, {f"diffusion_model.{k}": v for k, v in base.items()})
    message = str(info.value)
    assert "transformer_blocks.0.attn1.to_q" in message and "diffusion_model.blocks.0.attn.qkv.weight" in message
    assert "[72, 72]" in message and "[144, 144]" in message and "rows 0:144 of [432, 144]" in message


def test_t5_adapter_on_the_transformer_and_vice_versa(tmp_path, lora, pixart, t5):
    folder, _, _ = lora
    base, _ = weights.to_pixart_layout(pixart.state_dict())
    with pytest.raises(
        weights.CheckpointError, match="'encoder.block.0.layer.0.SelfAttention.k' .* not a module of a diffusers PixArt"
    ):
        weights.transformer_lora_patches(weights.load_peft_adapter(folder / "text_encoder_lora"), base, prefix="")
    with pytest.raises(weights.CheckpointError, match="no T5 encoder"):
        weights.t5_lora_patches(weights.load_peft_adapter(folder / "transformer_lora"), base)
    with pytest.raises(weights.CheckpointError, match="which the T5 text encoder does not have"):
        weights.t5_lora_patches(weights.load_peft_adapter(folder / "transformer_lora"), t5.state_dict())
    with pytest.raises(weights.CheckpointError, match="not a PixArt transformer"):
        weights.transformer_lora_patches(weights.load_peft_adapter(folder / "transformer_lora"), t5.state_dict())


def test_missing_halves_and_files(tmp_path, lora):
    folder, _, _ = lora
    only_transformer = tmp_path / "only"
    only_transformer.mkdir()
    (only_transformer / "transformer_lora").symlink_to(folder / "transformer_lora")
    with pytest.raises(weights.CheckpointError, match="no text_encoder_lora/ folder.*set strength_clip to 0"):
        weights.load_medsteer_lora(only_transformer)
    loaded = weights.load_medsteer_lora(only_transformer, text_encoder=False)
    assert loaded.text_encoder is None and loaded.transformer is not None
    assert weights.list_lora_folders([tmp_path, folder.parent]) == ["medsteer/", "only/"]

    broken = tmp_path / "broken" / "transformer_lora"
    broken.mkdir(parents=True)
    (broken / "adapter_config.json").write_text((folder / "transformer_lora" / "adapter_config.json").read_text())
    with pytest.raises(weights.CheckpointError, match="adapter_model.safetensors' is missing"):
        weights.load_medsteer_lora(broken.parent, text_encoder=False)
    (broken / "adapter_config.json").unlink()
    with pytest.raises(weights.CheckpointError, match="adapter_config.json' is missing"):
        weights.load_medsteer_lora(broken.parent, text_encoder=False)
    with pytest.raises(weights.CheckpointError, match="does not exist"):
        weights.load_medsteer_lora(tmp_path / "nothing")
    with pytest.raises(weights.CheckpointError, match="is a single PEFT adapter, not the MedSteer layout"):
        weights.load_medsteer_lora(folder / "transformer_lora")


def _write_adapter(folder, tensors, **config):
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, **config}))


def test_unsupported_adapter_variants_are_refused(tmp_path):
    a, b = torch.zeros(2, 8), torch.zeros(8, 2)
    _write_adapter(tmp_path / "dora", {"m.lora_A.weight": a, "m.lora_B.weight": b}, use_dora=True)
    with pytest.raises(weights.CheckpointError, match="use_dora=true"):
        weights.load_peft_adapter(tmp_path / "dora")
    _write_adapter(tmp_path / "emb", {"base_model.model.shared.lora_embedding_A": a})
    with pytest.raises(weights.CheckpointError, match="embedding layers"):
        weights.load_peft_adapter(tmp_path / "emb")
    _write_adapter(tmp_path / "half", {"m.lora_A.weight": a})
    with pytest.raises(weights.CheckpointError, match="'m' has \\['lora_A'\\] but needs both"):
        weights.load_peft_adapter(tmp_path / "half")
    _write_adapter(tmp_path / "rank", {"m.lora_A.weight": torch.zeros(3, 8), "m.lora_B.weight": torch.zeros(8, 3)})
    with pytest.raises(weights.CheckpointError, match="rank 3 but adapter_config.json says r=2"):
        weights.load_peft_adapter(tmp_path / "rank")
    _write_adapter(tmp_path / "ia3", {"m.lora_A.weight": a, "m.lora_B.weight": b}, peft_type="IA3")
    with pytest.raises(weights.CheckpointError, match="IA3 adapter"):
        weights.load_peft_adapter(tmp_path / "ia3")
    _write_adapter(tmp_path / "full", {"m.weight": a})
    with pytest.raises(weights.CheckpointError, match="'m.weight'.*only lora_A / lora_B"):
        weights.load_peft_adapter(tmp_path / "full")
    _write_adapter(tmp_path / "adapter_named", {"m.lora_A.default.weight": a, "m.lora_B.default.weight": b})
    assert weights.load_peft_adapter(tmp_path / "adapter_named").modules[0].name == "m"


# ------------------------------------------------------------------------------------------------
# crafted files (issue 12): bounded work, clear errors, nothing outside the folder
# ------------------------------------------------------------------------------------------------
def test_lora_layout_error_never_lists_the_folder(tmp_path):
    """F1: the message reaches ComfyUI clients; it used to list the folder ("it has ['.java', ...]")."""
    (tmp_path / "secret_payroll.csv").write_text("x")
    (tmp_path / "private_keys").mkdir()
    with pytest.raises(weights.CheckpointError, match="has no transformer_lora/ folder") as error:
        weights.load_medsteer_lora(tmp_path)
    assert "secret_payroll" not in str(error.value) and "private_keys" not in str(error.value)


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


@pytest.mark.parametrize(
    "content",
    [b"\xff\xfe not utf-8", b"[" * 100_000, b'{"num_layers": ' + b"9" * 5000 + b"}", b"[1, 2]", b"{", b""],
)
def test_broken_config_json_is_a_checkpoint_error(tmp_path, pixart, content):
    pixart.save_pretrained(tmp_path / "t")
    (tmp_path / "t" / "config.json").write_bytes(content)
    with pytest.raises(weights.CheckpointError, match="config.json"):
        weights.load_pixart_checkpoint(tmp_path / "t")


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


# PEFT adapter configs ---------------------------------------------------------------------------
def _adapter(tmp_path, **config) -> Path:
    a, b = torch.randn(2, 8), torch.randn(8, 2)
    folder = tmp_path / "adapter"
    _write_adapter(
        folder,
        {"transformer_blocks.0.attn2.to_k.lora_A.weight": a, "transformer_blocks.0.attn2.to_k.lora_B.weight": b},
        **config,
    )
    return folder


def test_backtracking_pattern_is_refused_at_once(tmp_path):
    """F5: PEFT's regex with rank_pattern key '(a+)+$' took 183 s on a 20-character name."""
    import time

    folder = tmp_path / "a"
    name = "a" * 30 + "!"
    _write_adapter(folder, {f"{name}.lora_A.weight": torch.zeros(2, 8), f"{name}.lora_B.weight": torch.zeros(8, 2)})
    config = json.loads((folder / "adapter_config.json").read_text())
    for pattern in ("(a+)+$", "(a|aa)*$", "(a*)*", "(?:a+)+", r"(\w+\.?)+"):
        config["rank_pattern"] = {pattern: 2}
        (folder / "adapter_config.json").write_text(json.dumps(config))
        start = time.perf_counter()
        with pytest.raises(weights.CheckpointError, match=re.escape(f"rank_pattern key {pattern!r}")):
            weights.load_peft_adapter(folder)
        assert time.perf_counter() - start < 1


@pytest.mark.parametrize(
    "pattern, why",
    [
        ("[", "not closed"),
        ("(to_q", "not closed"),
        ("to_q)", "unmatched"),
        ("a{2,1}", "reversed"),
        (".*.*.*", "more than 2 variable repeats"),
        (".?" * 60, "more than 2 variable repeats"),  # exponential in re without the count
        ("(a|.)" * 40, "more than 16 alternatives"),  # 2^40 paths in re
        ("(a|b|c|d|e)(f|g|h|i)", "more than 16 alternatives"),
        ("x" * 201, "201 characters"),
        (r"(a)\1", "not supported"),
        ("(?=a)", "not supported"),
        ("a**", "quantifier follows"),
        ("", "0 characters"),
    ],
)
def test_unsupported_patterns_name_the_key_and_the_rule(tmp_path, pattern, why):
    folder = _adapter(tmp_path, alpha_pattern={pattern: 2.0})
    with pytest.raises(weights.CheckpointError, match="alpha_pattern key " + re.escape(repr(pattern)[:40])) as error:
        weights.load_peft_adapter(folder)
    assert why in str(error.value) and "transformer_blocks.0.attn1.to_q" in str(error.value)


def test_target_modules_string_is_a_pattern_too(tmp_path):
    with pytest.raises(weights.CheckpointError, match=r"target_modules '\(a\+\)\+'"):
        weights.load_peft_adapter(_adapter(tmp_path, target_modules="(a+)+"))


REAL_PATTERNS = [
    "transformer_blocks.0.attn2.to_k",
    "attn2.to_k",
    "to_k",
    r"transformer_blocks\.\d+\.attn2\.to_k",
    "transformer_blocks.0.attn[12].to_(q|k)",
    "^transformer_blocks.0.attn2.to_k$",
    ".*attn2.*",
    "(?:attn1|attn2).to_k",
    "to_q|to_k",
    r"transformer_blocks\.[0-9]{1,2}\.attn2\.to_k",
]


@pytest.mark.parametrize("pattern", REAL_PATTERNS)
def test_real_peft_patterns_match_as_peft_matches_them(tmp_path, pattern):
    module = "transformer_blocks.0.attn2.to_k"
    assert weights.module_matches(pattern, module) is bool(re.match(rf"(.*\.)?({pattern})$", module))
    assert weights.module_matches(pattern, module)  # every one of these targets the module
    adapter = weights.load_peft_adapter(_adapter(tmp_path, rank_pattern={pattern: 2}, alpha_pattern={pattern: 6.0}))
    assert adapter.modules[0].scale == 3.0


def test_patterns_of_other_modules_do_not_match():
    for pattern in ("transformer_blocks.0.attn1.to_q", "attn1.to_k", "to_q", "blocks.0.attn2.to_k", "to_k$|to_v"):
        assert not weights.module_matches(pattern, "transformer_blocks.0.attn2.to_kv")
        assert weights.module_matches(pattern, "transformer_blocks.0.attn2.to_k") is bool(
            re.match(rf"(.*\.)?({pattern})$", "transformer_blocks.0.attn2.to_k")
        )


def test_pattern_matching_is_linear_in_the_module_name():
    import time

    name = "a." * 20_000 + "!"  # a crafted adapter's module names are checked at 500 characters; this is 40001
    start = time.perf_counter()
    assert not weights.module_matches("(a|.)(a|.)(a|.)(a|.)(.*)(.*)x", name)
    assert time.perf_counter() - start < 1


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
    folder = _adapter(tmp_path, **config)
    with pytest.raises(weights.CheckpointError, match=message):
        weights.load_peft_adapter(folder)


@pytest.mark.parametrize(
    "content", [b"\xff not utf-8", b"[" * 100_000, b'{"r": ' + b"1" * 5000 + b', "lora_alpha": 1}', b"[]"]
)
def test_broken_adapter_config_is_a_checkpoint_error(tmp_path, content):
    folder = _adapter(tmp_path)
    (folder / "adapter_config.json").write_bytes(content)
    with pytest.raises(weights.CheckpointError, match="adapter_config.json"):
        weights.load_peft_adapter(folder)


def test_overlong_module_name_in_adapter_is_refused(tmp_path):
    name = "m" * 1000
    folder = tmp_path / "long"
    _write_adapter(folder, {f"{name}.lora_A.weight": torch.zeros(2, 8), f"{name}.lora_B.weight": torch.zeros(8, 2)})
    with pytest.raises(weights.CheckpointError, match="has a key of 1014 characters"):
        weights.load_peft_adapter(folder)


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
