"""MedSteer-mini-UNet inside real ComfyUI (issue 10): the loader's UNet choice, its parity with the
library's diffusers UNet, its sites and family, and steering through ComfyUI's executor.

The UNet is ComfyUI's own openaimodel ``UNetModel`` (the SD1.x class) holding the mini-UNet's
weights; parity is checked on a file with perturbed random weights written here (every weight
away from its initial value, so a wrong key map, group count or head split shows) and on the
shipped model.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from comfy_boot import Graph

DYE_PROMPT = "an endoscopic image of dyed lifted polyps"
UNET = "MedSteer-mini-UNet"
#: The mini-UNet's sites in ComfyUI's names, their widths and 32x32 token grids (execution order).
NAMES = ("input 3", "input 5", "middle 0", "output 0", "output 1", "output 2", "output 3")
WIDTHS = (64, 96, 96, 96, 96, 64, 64)
GRIDS = ((16, 16), (8, 8), (8, 8), (8, 8), (8, 8), (16, 16), (16, 16))


@pytest.fixture(scope="module")
def classes(comfy_env):
    import nodes

    if "EmptyChromaRadianceLatentImage" not in nodes.NODE_CLASS_MAPPINGS:  # built-in extras
        asyncio.run(nodes.init_builtin_extra_nodes())
    return nodes.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def random_unet_file(comfy_env, tmp_path_factory):
    """A mini-UNet file: the shipped mini's text encoder, a UNet with every weight perturbed."""
    mini = comfy_env.core.mini
    from medsteer_core.mini.model import MiniModel, save_mini
    from medsteer_core.mini.unet import build_unet

    text = mini.load_mini()
    torch.manual_seed(0)
    unet = build_unet()
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    path = tmp_path_factory.mktemp("mini_unet") / "random_unet.safetensors"
    save_mini(MiniModel(unet.eval(), text.text_encoder, text.tokenizer, dict(text.metadata)), path)
    return path


def comfy_and_library(comfy_env, path):
    """``((MODEL, CLIP, VAE), library MiniModel)`` of one mini-UNet file."""
    loaded = comfy_env.pack.nodes.mini.load_denoiser(UNET, path)
    return loaded, comfy_env.core.mini.load_mini(path)


def max_difference(loaded, library) -> float:
    """Max |ComfyUI UNet - diffusers UNet| on three noisy inputs and timesteps, captions of the dye
    prompt: unpadded from ComfyUI's CLIP, padded + masked in the library (as in training)."""
    model, clip, _ = loaded
    embeds, mask = library.encode(DYE_PROMPT)
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(DYE_PROMPT))[0][0]
    assert cond.shape == (1, int(mask.sum()), 64)
    torch.testing.assert_close(cond[0], embeds[0, : cond.shape[1]], atol=1e-5, rtol=1e-5)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999.0, 480.0, 19.0])
    with torch.no_grad():
        reference = library.transformer(
            x,
            t,
            encoder_hidden_states=embeds.repeat(3, 1, 1),
            encoder_attention_mask=mask.repeat(3, 1),
            return_dict=False,
        )[0]
        ours = model.model.diffusion_model(x, t, context=cond.repeat(3, 1, 1))
    assert ours.shape == reference.shape == (3, 3, 32, 32)
    assert float(reference.abs().mean()) > 0.1  # a real output, not zeros on both sides
    return float((ours - reference).abs().max())


def test_comfyui_unet_matches_the_library_unet_on_random_weights(comfy_env, random_unet_file):
    loaded, library = comfy_and_library(comfy_env, random_unet_file)
    assert type(loaded[0].model.diffusion_model).__mro__[1].__name__ == "UNetModel"  # ComfyUI's SD class
    difference = max_difference(loaded, library)
    print(f"\nrandom weights: max |ComfyUI - diffusers| = {difference:.2e}")
    assert difference < 1e-5


def test_sites_family_and_pixel_space_match_the_library_model(comfy_env, random_unet_file):
    """Same names, widths, grids and family in both hosts, so vectors move between them."""
    from medsteer_core.backbones import find_sites

    (model, _, vae), library = comfy_and_library(comfy_env, random_unet_file)
    common = comfy_env.pack.nodes.common
    sites = common.model_sites(model)
    assert (sites.host, sites.names, sites.widths) == ("comfyui", NAMES, WIDTHS)
    assert tuple(sites.token_grid(i, (32, 32)) for i in range(len(NAMES))) == GRIDS
    assert sites.token_grid(0, (32, 48)) == (16, 24) and sites.token_grid(4, (31, 33)) == (8, 9)
    assert (sites.pixel_scale, sites.latent_channels) == (1, 3)
    assert sites.family == common.model_family(model) == "medsteer-mini-unet"
    assert model.model.model_type.name == "V_PREDICTION"
    theirs = find_sites(library.transformer)
    assert (theirs.host, theirs.family, theirs.names, theirs.widths) == ("diffusers", sites.family, NAMES, WIDTHS)
    assert all(theirs.token_grid(i, (31, 33)) == sites.token_grid(i, (31, 33)) for i in range(len(NAMES)))
    image = torch.rand(1, 32, 32, 3)
    torch.testing.assert_close(vae.decode(vae.encode(image)), image, atol=1e-6, rtol=0)


def test_the_pixart_mini_keeps_its_own_family(comfy_env):
    model, _, _ = comfy_env.pack.nodes.mini.load_denoiser("MedSteer-mini (PixArt)")
    sites = comfy_env.pack.nodes.common.model_sites(model)
    assert sites.family == comfy_env.pack.nodes.common.model_family(model) == "medsteer-mini"
    assert sites.names[0] == "block 0"


def test_a_file_of_the_other_denoiser_or_an_unknown_choice_is_refused(comfy_env, random_unet_file):
    mini = comfy_env.pack.nodes.mini
    with pytest.raises(comfy_env.core.MedSteerError, match="denoiser 'unet'.*MedSteer-mini \\(PixArt\\)"):
        mini.load_denoiser("MedSteer-mini (PixArt)", random_unet_file)
    with pytest.raises(comfy_env.core.MedSteerError, match="'pixart'.*MedSteer-mini-UNet"):
        mini.load_denoiser(UNET, comfy_env.core.mini.DEFAULT_PATH)
    with pytest.raises(comfy_env.core.MedSteerError, match="'unet-xl' is not one of"):
        mini.load_denoiser("unet-xl")
