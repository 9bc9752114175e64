"""Tiny random-weight diffusers UNets for tests (issue 10), and the full SD architectures on ``meta``.

``make_unet("sd1")`` is SD1.x-shaped (cross-attention in the first two of three levels, one
transformer block per attention, 2 resnets per down block, like SD's 3-per-up-block output side);
``make_unet("sdxl")`` is SDXL-shaped (no attention at level 0, 1 then 2 transformer blocks per
attention, the added text-time embedding). ``unet_kwargs`` gives a call's extra keywords
(SDXL's ``added_cond_kwargs``). ``full_unet(family)`` builds the released geometry on the meta
device (instant, no memory) for site counts, names and widths.
"""

from __future__ import annotations

import torch

CONTEXT = 12  # the tiny UNets' text-embedding width
TIME_IDS = 6  # SDXL's six size/crop numbers
TEXT_EMBEDS = 8  # the tiny SDXL's pooled text embedding width


def make_unet(kind: str = "sd1", seed: int = 0, context: int = CONTEXT):
    """A random-weight ``UNet2DConditionModel``: ``kind`` ``"sd1"`` (11 sites, widths 8/16) or
    ``"sdxl"`` (17 sites, widths 16/24, two transformer blocks per attention at its lowest level)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    common = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        norm_num_groups=4,
        cross_attention_dim=context,
        attention_head_dim=4,
    )
    if kind == "sd1":
        model = UNet2DConditionModel(
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(8, 16, 16),
            **common,
        )
    elif kind == "sdxl":
        model = UNet2DConditionModel(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(8, 16, 24),
            transformer_layers_per_block=(1, 1, 2),
            addition_embed_type="text_time",
            addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=TEXT_EMBEDS + TIME_IDS * 4,
            use_linear_projection=True,
            **common,
        )
    else:
        raise ValueError(f"kind must be 'sd1' or 'sdxl', got {kind!r}")
    return model.eval()


def unet_kwargs(unet, batch: int) -> dict:
    """The keywords a call needs besides latents, timesteps and context (SDXL: ``added_cond_kwargs``)."""
    if getattr(unet.config, "addition_embed_type", None) != "text_time":
        return {}
    g = torch.Generator().manual_seed(1)
    return {
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, TEXT_EMBEDS, generator=g),
            "time_ids": torch.randn(batch, TIME_IDS, generator=g),
        }
    }


def full_unet(family: str):
    """The released architecture of ``family`` (``sd1``, ``sd2``, ``sdxl``, ``sdxl-refiner``) on ``meta``."""
    from diffusers import UNet2DConditionModel

    xl = dict(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        use_linear_projection=True,
    )
    configs = {
        "sd1": dict(cross_attention_dim=768),
        "sd2": dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
        "sdxl": dict(
            xl,
            block_out_channels=(320, 640, 1280),
            transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=2048,
            projection_class_embeddings_input_dim=2816,
            attention_head_dim=(5, 10, 20),
        ),
        "sdxl-refiner": dict(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            use_linear_projection=True,
            block_out_channels=(384, 768, 1536, 1536),
            transformer_layers_per_block=4,
            cross_attention_dim=1280,
            projection_class_embeddings_input_dim=2560,
            attention_head_dim=(6, 12, 24, 24),
        ),
    }
    with torch.device("meta"):
        return UNet2DConditionModel(**configs[family])
