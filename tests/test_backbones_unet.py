"""UNet backbones (issue 10): sites, names, widths, token grids, families and layer windows.

Site layouts are checked on the released SD1.x/2.x/XL architectures built on the meta device
(instant) and token grids against real forward passes of tiny random UNets, at odd and non-square
sizes. ComfyUI's ``UNetModel`` is tested in ``tests/comfyui/test_unet_backbone.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medsteer_core import find_sites
from medsteer_core.backbones import UNetDiffusers, resolve_layers, unet_family
from tests.tiny_models import CONTEXT, full_unet, make_transformer, make_unet, unet_kwargs

SD1_NAMES = (
    "input 1", "input 2", "input 4", "input 5", "input 7", "input 8", "middle 0",
    *(f"output {i}" for i in range(3, 12)),
)  # fmt: skip


@pytest.fixture(scope="module")
def sd1():
    return find_sites(full_unet("sd1"))


@pytest.fixture(scope="module")
def sdxl():
    return find_sites(full_unet("sdxl"))


def test_sd15_sites_are_comfyui_blocks_in_execution_order(sd1):
    unet = sd1.transformer
    assert sd1.host == "diffusers" and sd1.family == "sd1" and sd1.depth == 16
    assert sd1.names == SD1_NAMES
    assert sd1.widths == (320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320)
    assert sd1.modules[0] is unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    assert sd1.modules[6] is unet.mid_block.attentions[0].transformer_blocks[0].attn2
    assert sd1.modules[15] is unet.up_blocks[3].attentions[2].transformer_blocks[0].attn2
    assert (sd1.latent_channels, sd1.pixel_scale, sd1.hidden_size) == (4, 8, 1280)


def test_sdxl_has_70_sites_named_with_transformer_indices(sdxl):
    assert sdxl.family == "sdxl" and sdxl.depth == 70
    names = sdxl.names
    assert names[:5] == ("input 4.0", "input 4.1", "input 5.0", "input 5.1", "input 7.0")
    assert names[24:26] == ("middle 0.0", "middle 0.1") and names[33] == "middle 0.9"
    assert names[34] == "output 0.0" and names[-1] == "output 5.1"
    assert sdxl.widths.count(640) == 10 and sdxl.widths.count(1280) == 60
    assert len(set(names)) == 70


@pytest.mark.parametrize(
    ("family", "depth", "widths"),
    [("sd2", 16, {320, 640, 1280}), ("sdxl-refiner", 44, {768, 1536})],
)
def test_other_released_families(family, depth, widths):
    sites = find_sites(full_unet(family))
    assert (sites.family, sites.depth, set(sites.widths)) == (family, depth, widths)


def test_family_rule_and_tiny_models_fall_back_to_sd_unet():
    assert unet_family(768, False, 320) == "sd1"
    assert unet_family(1024, False, 320) == "sd2"
    assert unet_family(2048, True, 320) == "sdxl"
    assert unet_family(1280, True, 384) == "sdxl-refiner"
    assert unet_family(768, True, 320) == "sd-unet"  # SD1 context with an added embedding: not SD1
    assert unet_family(768, False, 8) == "sd-unet"
    assert find_sites(make_unet("sd1", context=768)).family == "sd-unet"  # SD1's context, not its UNet
    assert find_sites(make_unet("sdxl")).family == "sd-unet"


def _measured_grids(unet, latent_size, batch=2):
    """Each site's real token grid: the (rows, columns) of the 4-D input of its spatial transformer."""
    sites = find_sites(unet)
    owner = {}
    for module in unet.modules():
        for block in getattr(module, "transformer_blocks", []):
            owner[id(block.attn2)] = module
    seen, handles = {}, []
    for index, site in enumerate(sites.modules):

        def grab(module, args, kwargs, index=index):
            x = kwargs.get("hidden_states", args[0] if args else None)
            seen.setdefault(index, tuple(x.shape[-2:]))

        handles.append(owner[id(site)].register_forward_pre_hook(grab, with_kwargs=True))

        def tokens(module, args, output, index=index):  # returns None: the output stays the site's
            seen.setdefault(("tokens", index), output.shape[1])

        handles.append(site.register_forward_hook(tokens))
    try:
        with torch.no_grad():
            h, w = latent_size
            unet(torch.randn(batch, 4, h, w), torch.tensor([500.0] * batch), torch.randn(batch, 5, CONTEXT),
                 **unet_kwargs(unet, batch))  # fmt: skip
    finally:
        for handle in handles:
            handle.remove()
    for i in range(sites.depth):
        assert seen[("tokens", i)] == seen[i][0] * seen[i][1]  # the site attends over that grid
    return [seen[i] for i in range(sites.depth)]


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
@pytest.mark.parametrize("latent_size", [(8, 8), (6, 10), (5, 7), (9, 4), (3, 3)])
def test_token_grids_match_real_forward_passes(kind, latent_size):
    unet = make_unet(kind)
    sites = find_sites(unet)
    expected = _measured_grids(unet, latent_size)
    assert [sites.token_grid(i, latent_size) for i in range(sites.depth)] == expected
    assert len(set(expected)) >= 2  # several resolution levels


def test_tiny_unet_widths_are_ragged_and_read_from_the_model():
    sites = find_sites(make_unet("sdxl"))
    assert sites.widths == tuple(m.to_out[0].out_features for m in sites.modules)
    assert set(sites.widths) == {16, 24} and sites.hidden_size == 24


def test_found_through_pipelines_and_peft():
    from peft import LoraConfig, get_peft_model

    unet = make_unet("sd1")
    pipeline_like = nn.Module()
    pipeline_like.unet = unet
    assert find_sites(pipeline_like).transformer is unet
    wrapped = get_peft_model(make_unet("sd1"), LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v"]))
    sites = find_sites(wrapped)
    assert sites.depth == 11 and isinstance(sites.backbone, UNetDiffusers)


def test_read_call_takes_keywords_and_positions():
    sites = find_sites(make_unet("sd1"))
    x, t, c = torch.zeros(2, 4, 6, 6), torch.tensor([3.0, 4.0]), torch.zeros(2, 5, CONTEXT)
    for args, kwargs in (((x, t, c), {}), ((), {"sample": x, "timestep": t, "encoder_hidden_states": c})):
        latents, timesteps, options = sites.read_call(args, kwargs)
        assert latents is x and timesteps is t and options == {}


def test_check_latent_accepts_any_size_and_refuses_empty():
    sites = find_sites(make_unet("sd1"))
    sites.check_latent(5, 7)
    with pytest.raises(Exception, match="empty"):
        sites.check_latent(0, 8)


# ------------------------------------------------------------------ layer windows by name
def test_resolve_layers_grammar(sd1, sdxl):
    assert sd1.resolve_layers("8-16") == (8, 16)
    assert sd1.resolve_layers(" 3 ") == (3, 4)
    assert sd1.resolve_layers("middle") == (6, 7)
    assert sd1.resolve_layers("Middle 0") == (6, 7)
    assert sd1.resolve_layers("input 7") == (4, 5)
    assert sd1.resolve_layers("input7 - output 5") == (4, 10)  # both ends inclusive
    assert sd1.resolve_layers("output") == (7, 16)
    assert sdxl.resolve_layers("input 7") == (4, 14)
    assert sdxl.resolve_layers("input 7.3") == (7, 8)
    assert sdxl.resolve_layers("middle - output 0") == (24, 44)
    assert sdxl.resolve_layers("input 7.3 - input 7.5") == (7, 10)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("output 2", "no site is named 'output 2'.*input 1, input 2, input 4"),
        ("output 5 - input 7", r"\[9, 5\).*empty"),
        ("8-17", r"outside the model.*end <= 16"),
        ("4 - output 3", "not a layer window"),
        ("1-2-3", "not a layer window"),
        ("", "no site is named ''"),
    ],
)
def test_resolve_layers_errors_list_the_valid_names(sd1, text, match):
    with pytest.raises(ValueError, match=match):
        sd1.resolve_layers(text)


def test_pixart_sites_are_named_blocks():
    sites = find_sites(make_transformer(num_layers=4))
    assert sites.names == ("block 0", "block 1", "block 2", "block 3")
    assert sites.resolve_layers("block 1 - block 2") == (1, 3)
    assert sites.resolve_layers("2-4") == (2, 4)
    assert sites.family == "pixart"
    assert resolve_layers(sites.names, "block") == (0, 4)


# ------------------------------------------------------------------ the default layer window
@pytest.mark.parametrize(
    ("family", "window", "first", "last"),
    [
        ("sd1", (4, 10), "input 7", "output 5"),
        ("sd2", (4, 10), "input 7", "output 5"),
        ("sdxl", (4, 64), "input 7.0", "output 2.9"),
        ("sdxl-refiner", (8, 32), "input 7.0", "output 5.3"),
    ],
)
def test_default_window_is_the_coarse_levels_of_a_unet(family, window, first, last):
    sites = find_sites(full_unet(family))
    start, end = sites.default_window
    assert (start, end) == window and (sites.names[start], sites.names[end - 1]) == (first, last)
    assert sites.resolve_layers(f"{first} - {last}") == window
    coarse = sites.token_grid(start, (64, 64))
    assert all(sites.token_grid(i, (64, 64))[0] <= coarse[0] for i in range(start, end))
    assert all(sites.token_grid(i, (64, 64))[0] > coarse[0] for i in (*range(start), *range(end, sites.depth)))


def test_default_window_of_pixart_is_the_papers_scaled_to_depth():
    assert find_sites(make_transformer(num_layers=28, heads=1, head_dim=8)).default_window == (8, 16)
    assert find_sites(make_transformer(num_layers=4)).default_window == (0, 4)  # the paper's 8-16 does not fit: all
