import pytest
import torch
from torch import nn

from medsteer_core import UnsupportedModelError, find_sites
from tests.conftest import make_transformer


def test_diffusers_sites_in_depth_order(transformer):
    sites = find_sites(transformer)
    assert sites.host == "diffusers"
    assert sites.depth == 4 and sites.widths == (16,) * 4 and sites.token_grid(3, (8, 12)) == (4, 6)
    assert (sites.family, sites.latent_channels, sites.pixel_scale) == ("pixart", 4, 8)
    assert list(sites.modules) == [b.attn2 for b in transformer.transformer_blocks]


def test_peft_wrapped_transformer_is_found():
    from peft import LoraConfig, get_peft_model

    model = make_transformer(num_layers=2)
    wrapped = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v"]))
    sites = find_sites(wrapped)
    assert sites.depth == 2
    assert sites.modules[1] is model.transformer_blocks[1].attn2


class _ComfyLikeBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.cross_attn = nn.Sequential(nn.Linear(d, d), nn.Linear(d, d))


class _ComfyLikePixArtMS(nn.Module):
    """The structure of ComfyUI's PixArtMS (blocks[i].cross_attn, x_embedder, t_block), no comfy import."""

    def __init__(self, depth=3, d=12):
        super().__init__()
        self.blocks = nn.ModuleList(_ComfyLikeBlock(d) for _ in range(depth))
        self.x_embedder = nn.Identity()
        self.t_block = nn.Identity()
        self.patch_size = 2
        self.hidden_size = d


def test_comfyui_pixartms_is_recognised_structurally_also_through_base_model():
    inner = _ComfyLikePixArtMS()
    holder = nn.Module()
    holder.diffusion_model = inner  # ComfyUI's BaseModel keeps the transformer here
    for model in (inner, holder):
        sites = find_sites(model)
        assert sites.host == "comfyui" and sites.depth == 3 and sites.hidden_size == 12
        assert sites.modules[2] is inner.blocks[2].cross_attn


@pytest.mark.parametrize("model", [nn.Linear(3, 3), nn.Sequential(nn.Conv2d(3, 3, 1))])
def test_other_models_get_a_clear_error_naming_supported_classes(model):
    with pytest.raises(UnsupportedModelError, match="PixArtTransformer2DModel.*PixArtMS.*matcher="):
        find_sites(model)


def test_check_window_names_depth():
    sites = find_sites(make_transformer(num_layers=4))
    sites.check_window(0, 4)
    for start, end in ((3, 3), (2, 1), (-1, 2), (0, 5)):
        with pytest.raises(ValueError, match="4 layers"):
            sites.check_window(start, end)
    assert torch.is_tensor(next(sites.transformer.parameters()))
