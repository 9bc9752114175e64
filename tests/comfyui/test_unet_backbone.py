"""ComfyUI's ``UNetModel`` as a MedSteer backbone (issue 10), in real ComfyUI.

The released SD1.x/2.x/XL geometries are built from ComfyUI's own detection configs on the meta
device and must give the same sites, names, widths and family as diffusers' (so vectors move
between the hosts); token grids are checked against real forward passes of small random UNets.
"""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import full_unet


def comfy_unet(config: dict, device=None, seed: int = 0):
    """ComfyUI's ``UNetModel`` from a config (random normal weights unless on ``meta``)."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(seed)
    model = UNetModel(**config, device=device)
    if device is None:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.05)
    return model.eval()


def released_pair(family: str):
    """``(ComfyUI UNetModel, diffusers UNet2DConditionModel)`` of a released family, both on ``meta``.

    ComfyUI picks the config itself: ``unet_config_from_diffusers_unet`` matches the diffusers
    state dict's shapes against its list of known models (SD15, SD21, SDXL, SDXL_refiner, ...).
    """
    import comfy.model_detection as detection

    diffusers_unet = full_unet(family)
    config = dict(detection.unet_config_from_diffusers_unet(diffusers_unet.state_dict()), dtype=torch.float32)
    return comfy_unet(config, device=torch.device("meta")), diffusers_unet


def small_config(kind: str = "sd1") -> dict:
    """A small SD1- or SDXL-shaped config (ComfyUI's GroupNorm needs multiples of 32 channels)."""
    config = dict(
        image_size=8, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=[2, 2, 2],
        channel_mult=[1, 2, 2], use_spatial_transformer=True, legacy=False, context_dim=12,
        num_head_channels=16, dtype=torch.float32,
    )  # fmt: skip
    if kind == "sd1":
        return dict(
            config, transformer_depth=[1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
            transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1],
        )  # fmt: skip
    return dict(
        config, transformer_depth=[0, 0, 1, 1, 2, 2], transformer_depth_middle=2,
        transformer_depth_output=[2, 2, 2, 1, 1, 1, 0, 0, 0], num_classes="sequential", adm_in_channels=10,
        use_linear_in_transformer=True,
    )  # fmt: skip


@pytest.mark.parametrize(("family", "depth"), [("sd1", 16), ("sd2", 16), ("sdxl", 70), ("sdxl-refiner", 44)])
def test_released_unets_match_the_diffusers_sites(comfy_env, family, depth):
    find_sites = comfy_env.core.find_sites
    comfy, diffusers_unet = released_pair(family)
    sites, reference = find_sites(comfy), find_sites(diffusers_unet)
    assert (sites.host, sites.family, sites.depth) == ("comfyui", family, depth)
    assert sites.names == reference.names and sites.widths == reference.widths
    for size in ((64, 64), (64, 96), (37, 51)):
        assert [sites.token_grid(i, size) for i in range(depth)] == [
            reference.token_grid(i, size) for i in range(depth)
        ]
    assert (sites.latent_channels, sites.pixel_scale) == (4, 8)


def test_sites_are_the_spatial_transformers_attn2_in_order(comfy_env):
    comfy, _ = released_pair("sd1")
    sites = comfy_env.core.find_sites(comfy)
    assert sites.modules[0] is comfy.input_blocks[1][1].transformer_blocks[0].attn2.to_out
    assert sites.modules[6] is comfy.middle_block[1].transformer_blocks[0].attn2.to_out
    assert sites.modules[15] is comfy.output_blocks[11][1].transformer_blocks[0].attn2.to_out
    holder = torch.nn.Module()  # ComfyUI's BaseModel keeps the UNet in .diffusion_model
    holder.diffusion_model = comfy
    assert comfy_env.core.find_sites(holder).transformer is comfy


def _run(model, latent_size, batch=2, options=None):
    x = torch.randn(batch, 4, *latent_size)
    kwargs = {"y": torch.randn(batch, 10)} if model.num_classes is not None else {}
    with torch.no_grad():
        return model(
            x, torch.tensor([500.0] * batch), torch.randn(batch, 5, 12), transformer_options=options or {}, **kwargs
        )


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
@pytest.mark.parametrize("latent_size", [(8, 8), (6, 10), (5, 7), (3, 9)])
def test_token_grids_match_real_forward_passes(comfy_env, kind, latent_size):
    model = comfy_unet(small_config(kind))
    sites = comfy_env.core.find_sites(model)
    owner = {id(b.attn2.to_out): m for m in model.modules() for b in getattr(m, "transformer_blocks", [])}
    seen, handles = {}, []

    def note(key, value) -> None:  # a hook returning a value would replace the input/output
        seen.setdefault(key, value)

    for i, site in enumerate(sites.modules):
        handles.append(owner[id(site)].register_forward_pre_hook(lambda m, a, i=i: note(i, a[0].shape[-2:])))
        handles.append(site.register_forward_hook(lambda m, a, out, i=i: note(-1 - i, out.shape[1])))
    try:
        _run(model, latent_size)
    finally:
        for handle in handles:
            handle.remove()
    grids = [tuple(seen[i]) for i in range(sites.depth)]
    assert [seen[-1 - i] for i in range(sites.depth)] == [r * c for r, c in grids]
    assert [sites.token_grid(i, latent_size) for i in range(sites.depth)] == grids
    assert len(set(sites.widths)) == 2 and len(set(grids)) >= 2


def test_names_follow_comfyui_block_ids_and_read_call(comfy_env):
    model = comfy_unet(small_config("sdxl"))
    sites = comfy_env.core.find_sites(model)
    assert sites.family == "sd-unet"
    seen = []
    for module in sites.modules:  # ComfyUI's own (block, transformer index) during the call
        module.register_forward_pre_hook(lambda m, a: seen.append(None))
    blocks = []

    def attn2_patch(n, context, value, extra):
        blocks.append((*extra["block"], extra["block_index"]))
        return n, context, value

    _run(model, (6, 6), options={"patches": {"attn2_patch": [attn2_patch]}})
    names = tuple(
        f"{kind} {index}" + (f".{t}" if "." in name else "")
        for (kind, index, t), name in zip(blocks, sites.names, strict=True)
    )
    assert names == sites.names and len(seen) == sites.depth
    x, t = torch.zeros(2, 4, 6, 6), torch.tensor([1.0, 2.0])
    options = {"cond_or_uncond": [1, 0]}
    assert sites.read_call((x, t), {"context": None, "transformer_options": options}) == (x, t, options)
    assert sites.read_call((x, t, None, None, None, options), {})[2] is options
