"""MedSteer-mini-UNet's file and training: the mini's format with a UNet denoiser, checked before
anything is built, trained under the shipped mini's frozen text encoder."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from medsteer_core.errors import MedSteerError
from medsteer_core.mini import load_mini, save_mini
from medsteer_core.mini.mini_unet import UNET_CONFIG, build_unet
from medsteer_core.mini.model import MiniModel


def _unet_model(seed: int = 0) -> MiniModel:
    shipped = load_mini()
    torch.manual_seed(seed)
    return MiniModel(build_unet().eval(), shipped.text_encoder, shipped.tokenizer, dict(shipped.metadata))


def _rewrite(path, out, change):
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    change(meta, tensors)
    save_file(tensors, str(out), metadata=meta)
    return out


def test_unet_mini_round_trips_with_its_config_and_identical_weights(tmp_path):
    model = _unet_model(seed=5)
    path = save_mini(model, tmp_path / "u.safetensors", {"note": "unet"})
    loaded = load_mini(path)
    assert loaded.metadata["denoiser"] == "unet"
    assert "transformer_config" not in loaded.metadata
    assert json.loads(loaded.metadata["unet_config"]) == UNET_CONFIG
    assert type(loaded.transformer).__name__ == "UNet2DConditionModel"
    for key, value in model.transformer.state_dict().items():
        assert torch.equal(value, loaded.transformer.state_dict()[key]), key
    x = torch.randn(1, 3, 32, 32)
    embeds, mask = loaded.encode("polyps")
    a = model.transformer(x, timestep=torch.tensor([500]), encoder_hidden_states=embeds, encoder_attention_mask=mask)
    b = loaded.transformer(x, timestep=torch.tensor([500]), encoder_hidden_states=embeds, encoder_attention_mask=mask)
    assert torch.equal(a.sample, b.sample)


def test_shipped_pixart_file_still_loads_as_pixart():
    assert type(load_mini().transformer).__name__ == "PixArtTransformer2DModel"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m, t: m.pop("unet_config"), "no 'unet_config'"),
        (lambda m, t: m.update(unet_config=json.dumps(UNET_CONFIG | {"layers_per_block": True})), "layers_per_block"),
        (lambda m, t: m.update(unet_config=json.dumps(UNET_CONFIG | {"block_out_channels": [32, 64, 10**9]})), "4096"),
        (lambda m, t: m.update(unet_config=json.dumps(UNET_CONFIG | {"norm_num_groups": 7})), "norm_num_groups"),
        (lambda m, t: m.update(unet_config=json.dumps(UNET_CONFIG | {"down_block_types": ["Evil"] * 3})), "down_block"),
        (lambda m, t: m.update(unet_config=json.dumps(UNET_CONFIG | {"extra": 1})), "unknown entries"),
        (lambda m, t: m.update(unet_config=json.dumps(UNET_CONFIG | {"block_out_channels": [32, 64, 128]})), "shape"),
        (lambda m, t: t.pop("transformer.conv_in.weight"), "conv_in"),
    ],
)
def test_crafted_unet_file_is_one_clear_error(tmp_path, change, message):
    path = save_mini(_unet_model(), tmp_path / "u.safetensors")
    bad = _rewrite(path, tmp_path / "bad.safetensors", change)
    with pytest.raises(MedSteerError, match=message):
        load_mini(bad)


def test_training_the_unet_keeps_the_shipped_text_encoder_frozen(tmp_path):
    from medsteer_core.mini import train

    out = tmp_path / "u.safetensors"
    before = {k: v.clone() for k, v in load_mini().text_encoder.state_dict().items()}
    model = train(out, max_steps=2, per_class=1, batch=2, checkpoint_every=1, denoiser="unet", log=lambda _: None)
    loaded = load_mini(out)
    assert loaded.metadata["trained_steps"] == "2"
    assert json.loads(loaded.metadata["training"])["denoiser"] == "unet"
    for key, value in loaded.text_encoder.state_dict().items():
        assert torch.equal(value, before[key]), key
    torch.manual_seed(0)  # what training starts from: seed 0, the shipped text encoder, then the UNet
    load_mini()
    fresh = build_unet()
    changed = [k for k, v in model.transformer.state_dict().items() if not torch.equal(v, fresh.state_dict()[k])]
    assert changed, "two training steps left every UNet weight at its initial value"


def test_the_mini_unet_is_its_own_family_with_ragged_sites_and_an_untagged_unet_is_not():
    from diffusers import UNet2DConditionModel

    from medsteer_core.backbones import find_sites

    sites = find_sites(build_unet())
    assert sites.family == "medsteer-mini-unet"
    assert sites.pixel_scale == 1 and sites.latent_channels == 3
    assert sites.widths == (64, 96, 96, 96, 96, 64, 64)
    assert sites.names == ("input 3", "input 5", "middle 0", "output 0", "output 1", "output 2", "output 3")
    assert [sites.token_grid(i, (32, 32)) for i in (0, 2, 6)] == [(16, 16), (8, 8), (16, 16)]
    plain = find_sites(UNet2DConditionModel(**UNET_CONFIG))
    assert plain.family != "medsteer-mini-unet" and plain.pixel_scale == 8
