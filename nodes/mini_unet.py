"""MedSteer-mini-UNet inside ComfyUI: the mini's UNet as ComfyUI's own SD UNet class (issue 10).

MedSteer-mini-UNet (``medsteer_core.mini.mini_unet``) is a diffusers ``UNet2DConditionModel`` in pixel
space trained under MedSteer-mini's frozen T5. ``LoadMedSteerMini`` offers it beside the PixArt
mini; this module builds its MODEL:

- ComfyUI's openaimodel ``UNetModel`` (the class of every SD1.x checkpoint) with a config read from
  the file's diffusers config, and the weights renamed by ComfyUI's own diffusers->ldm key map
  (``comfy.utils.unet_to_diffusers``), so every SD-UNet patch, wrapper and MedSteer's UNet backbone
  see the structure they know. One thing differs from SD: the mini's GroupNorms have 16 groups
  where ComfyUI's blocks hard-code SD's 32, so the model gets operations whose ``GroupNorm`` takes
  the file's group count (``model_config.custom_operations``, ComfyUI's own extension point).
- a ``BaseModel`` with v-prediction, the training noise schedule, the mini's 3-channel identity
  latent and the post-CFG clip of the predicted image (DDIM ``clip_sample``), as the PixArt mini.
- the family ``medsteer-mini-unet`` in ComfyUI as in diffusers, so the vectors calibrated on the
  library's model apply: ``MiniUNetComfyUI``, a ``UNetComfyUI`` backbone registered first that
  recognises the tagged ``UNetModel`` (pixel scale 1).

The CLIP and VAE are the PixArt mini's (the same T5, unpadded embeddings = the masked ones the UNet
was trained with, since its cross-attention masked the padding).
"""

from __future__ import annotations

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.supported_models_base
import comfy.utils
import torch
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from ..medsteer_core import MedSteerError, weights
from ..medsteer_core import mini as core_mini
from ..medsteer_core.backbones import register_backbone
from ..medsteer_core.backbones.sd_unet import UNetComfyUI
from ..medsteer_core.mini.backbone import TAG, UNET_FAMILY, tag_transformer

#: ComfyUI's ``image_model`` name of the mini-UNet (``nodes.common.model_sites`` tags the model with it: ``tag_family``).
IMAGE_MODEL = "medsteer_mini_unet"


class MiniUNetComfyUI(UNetComfyUI):
    """MedSteer-mini-UNet in ComfyUI: a tagged ``UNetModel``; sites, names and grids as every SD
    UNet's, the family and pixel scale of the mini-UNet (the same as its diffusers backbone's)."""

    name = "MedSteer-mini-UNet (ComfyUI UNetModel built by LoadMedSteerMini)"
    family = UNET_FAMILY

    def transformer(self, model: torch.nn.Module) -> torch.nn.Module | None:
        if getattr(model, TAG, False) is not True:
            return None
        return super().transformer(model)

    def family_of(self, transformer: torch.nn.Module) -> str:
        return UNET_FAMILY

    def pixel_scale(self, transformer: torch.nn.Module) -> int:
        return 1

    def check_latent(self, transformer, height, width):
        if height < 1 or width < 1:
            raise MedSteerError(
                f"image of {width}x{height} px is empty: use 32x32 (what MedSteer-mini-UNet was trained on)"
            )


BACKBONE = register_backbone(MiniUNetComfyUI(), first=True)


class MiniUNetModel(UNetModel):
    """ComfyUI's ``UNetModel``, tagged as the mini's (``image_model`` is the config's name, not a
    constructor argument of the SD class)."""

    def __init__(self, image_model: str = IMAGE_MODEL, **kwargs):
        super().__init__(**kwargs)
        tag_transformer(self)


def group_norm_operations(groups: int, base: type) -> type:
    """``base`` operations whose ``GroupNorm`` always has ``groups`` groups (ComfyUI's UNet blocks
    ask for SD's 32; the mini-UNet was trained with its config's ``norm_num_groups``)."""

    class GroupNorm(base.GroupNorm):
        def __init__(self, num_groups, num_channels, *args, **kwargs):
            super().__init__(groups, num_channels, *args, **kwargs)

    return type(f"MiniUNetOperations{groups}", (base,), {"GroupNorm": GroupNorm})


class MiniUNetBaseModel(comfy.model_base.BaseModel):
    """``BaseModel`` around ``MiniUNetModel``, v-prediction (SD1.x's conditioning: the caption only)."""

    def __init__(self, model_config, model_type=comfy.model_base.ModelType.V_PREDICTION, device=None):
        super().__init__(model_config, model_type, device=device, unet_model=MiniUNetModel)


class MiniUNetConfig(comfy.supported_models_base.BASE):
    """The mini's noise schedule (diffusers' linear betas 1e-4..0.02 over 1000 steps, ComfyUI's
    ``sqrt_linear``) and latent format; the UNet's geometry comes from the file (``unet_config``)."""

    unet_config = {"image_model": IMAGE_MODEL}
    unet_extra_config = {}
    sampling_settings = {"beta_schedule": "sqrt_linear", "linear_start": 0.0001, "linear_end": 0.02, "timesteps": 1000}
    memory_usage_factor = 1.0

    def __init__(self, unet_config: dict, latent_format: type):
        self.latent_format = latent_format
        super().__init__(unet_config)

    def get_model(self, state_dict, prefix="", device=None):
        return MiniUNetBaseModel(self, device=device).eval()


def unet_config(parts: core_mini.MiniParts) -> dict:
    """ComfyUI's ``UNetModel`` config of the mini-UNet (from the file's diffusers config).

    Raises:
        MedSteerError: a geometry ComfyUI's SD UNet cannot express (block widths that are not
            multiples of the first, per-level head counts).
    """
    config = parts.transformer_config
    channels = [int(c) for c in config["block_out_channels"]]
    heads = config["attention_head_dim"]  # diffusers' UNet2DConditionModel reads it as the head count
    if any(c % channels[0] for c in channels) or not isinstance(heads, int):
        raise MedSteerError(
            f"MedSteer-mini-UNet file with block_out_channels {channels} and attention_head_dim {heads!r}: ComfyUI's "
            "UNet needs widths that are multiples of the first and one head count; use the shipped model"
        )
    layers = int(config["layers_per_block"])
    # ComfyUI lists transformer depths per resnet, level 0 first (the up path has one more per level).
    down = [int(kind.startswith("CrossAttn")) for kind in config["down_block_types"] for _ in range(layers)]
    up = [int(kind.startswith("CrossAttn")) for kind in reversed(config["up_block_types"]) for _ in range(layers + 1)]
    return {
        "image_model": IMAGE_MODEL,
        "image_size": int(config["sample_size"]),
        "in_channels": int(config["in_channels"]),
        "out_channels": int(config["out_channels"]),
        "model_channels": channels[0],
        "num_res_blocks": [layers] * len(channels),
        "channel_mult": [c // channels[0] for c in channels],
        "transformer_depth": down,
        "transformer_depth_middle": 1,
        "transformer_depth_output": up,
        "context_dim": int(config["cross_attention_dim"]),
        "num_heads": heads,
        "num_head_channels": -1,
        "use_spatial_transformer": True,
        "use_linear_in_transformer": False,
        "legacy": False,
        "adm_in_channels": None,
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
    }


def comfy_state_dict(diffusers_state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """The UNet's weights under ComfyUI's (ldm) names, by ComfyUI's own diffusers->ldm key map.

    Raises:
        MedSteerError: a weight the map does not know (the file is not a mini-UNet of this config).
    """
    names = comfy.utils.unet_to_diffusers(config)
    unknown = sorted(k for k in diffusers_state if k not in names)
    if unknown:
        raise MedSteerError(
            f"MedSteer-mini-UNet weights {unknown[:5]} have no ComfyUI name for this config: the file does not match "
            "its own unet_config; use the shipped model or train it again (python -m medsteer_core.mini train "
            "--denoiser unet)"
        )
    return {names[k]: v for k, v in diffusers_state.items()}


def build_model(parts: core_mini.MiniParts, latent_format: type, post_cfg) -> comfy.model_patcher.ModelPatcher:
    """The MODEL: ComfyUI's ``UNetModel`` with the mini-UNet's weights, float32 (the model is 11 MB).

    ``latent_format`` and ``post_cfg`` (the clip of the predicted image) are the PixArt mini's.
    """
    config = unet_config(parts)
    model_config = MiniUNetConfig(config, latent_format)
    model_config.set_inference_dtype(torch.float32, None)
    groups = int(parts.transformer_config["norm_num_groups"])
    model_config.custom_operations = group_norm_operations(groups, comfy.ops.pick_operations(torch.float32, None))
    offload = comfy.model_management.unet_offload_device()
    base = model_config.get_model({}, "", device=offload)
    state = comfy_state_dict(parts.transformer_state, config)
    weights.check_state_dict_fits(state, base.diffusion_model.state_dict(), what="MedSteer-mini-UNet")
    base.diffusion_model.load_state_dict(state, strict=True)
    patcher = comfy.model_patcher.ModelPatcher(
        base, load_device=comfy.model_management.get_torch_device(), offload_device=offload
    )
    patcher.set_model_sampler_post_cfg_function(post_cfg)
    return patcher
