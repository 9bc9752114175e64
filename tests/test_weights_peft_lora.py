"""medsteer_core.weights.peft_lora: PEFT LoRA adapters (transformer and T5) as patches equal to
PEFT's own merge, their scales and patterns, and adapters that do not fit refused.

References are independent of the code under test: diffusers' own model (for layouts and
geometry) and PEFT's own ``merge_and_unload`` (for LoRA updates). The ``pixart`` and ``t5``
fixtures are tests/conftest.py's.
"""

from __future__ import annotations

import pytest
import torch

from medsteer_core import weights
from tests.checkpoint_factories import (
    T5_TARGETS,
    make_medsteer_lora,
    merged_state_dict,
    save_adapter,
)
from tests.tiny_models import tiny_pixart
from tests.weights_helpers import write_adapter


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


def test_unsupported_adapter_variants_are_refused(tmp_path):
    a, b = torch.zeros(2, 8), torch.zeros(8, 2)
    write_adapter(tmp_path / "dora", {"m.lora_A.weight": a, "m.lora_B.weight": b}, use_dora=True)
    with pytest.raises(weights.CheckpointError, match="use_dora=true"):
        weights.load_peft_adapter(tmp_path / "dora")
    write_adapter(tmp_path / "emb", {"base_model.model.shared.lora_embedding_A": a})
    with pytest.raises(weights.CheckpointError, match="embedding layers"):
        weights.load_peft_adapter(tmp_path / "emb")
    write_adapter(tmp_path / "half", {"m.lora_A.weight": a})
    with pytest.raises(weights.CheckpointError, match="'m' has \\['lora_A'\\] but needs both"):
        weights.load_peft_adapter(tmp_path / "half")
    write_adapter(tmp_path / "rank", {"m.lora_A.weight": torch.zeros(3, 8), "m.lora_B.weight": torch.zeros(8, 3)})
    with pytest.raises(weights.CheckpointError, match="rank 3 but adapter_config.json says r=2"):
        weights.load_peft_adapter(tmp_path / "rank")
    write_adapter(tmp_path / "ia3", {"m.lora_A.weight": a, "m.lora_B.weight": b}, peft_type="IA3")
    with pytest.raises(weights.CheckpointError, match="IA3 adapter"):
        weights.load_peft_adapter(tmp_path / "ia3")
    write_adapter(tmp_path / "full", {"m.weight": a})
    with pytest.raises(weights.CheckpointError, match="'m.weight'.*only lora_A / lora_B"):
        weights.load_peft_adapter(tmp_path / "full")
    write_adapter(tmp_path / "adapter_named", {"m.lora_A.default.weight": a, "m.lora_B.default.weight": b})
    assert weights.load_peft_adapter(tmp_path / "adapter_named").modules[0].name == "m"


def test_lora_layout_error_never_lists_the_folder(tmp_path):
    """F1: the message reaches ComfyUI clients; it used to list the folder ("it has ['.java', ...]")."""
    (tmp_path / "secret_payroll.csv").write_text("x")
    (tmp_path / "private_keys").mkdir()
    with pytest.raises(weights.CheckpointError, match="has no transformer_lora/ folder") as error:
        weights.load_medsteer_lora(tmp_path)
    assert "secret_payroll" not in str(error.value) and "private_keys" not in str(error.value)
