"""PixArt-alpha / -sigma in both hosts (and MedSteer-mini, a PixArt in pixel space).

| host      | transformer                                    | site i                          |
|-----------|------------------------------------------------|---------------------------------|
| diffusers | ``PixArtTransformer2DModel`` (also under peft)  | ``transformer_blocks[i].attn2`` |
| ComfyUI   | ``comfy.ldm.pixart.pixartms.PixArtMS``          | ``blocks[i].cross_attn``        |

Every site has the model's width and the same token grid: the latent divided by the patch size.
ComfyUI's class is recognised by its structure, so this module never imports comfy.
"""

from __future__ import annotations

from torch import nn

from ..errors import MedSteerError
from .base import Backbone, last_linear_width

__all__ = ["PixArtComfyUI", "PixArtDiffusers", "check_latent_size"]


def _patch(value) -> int:
    return int(value[0] if isinstance(value, (tuple, list)) else value)


class PixArtDiffusers(Backbone):
    name = "PixArt-alpha/-sigma (diffusers PixArtTransformer2DModel, optionally under peft)"
    family = "pixart"
    host = "diffusers"

    def transformer(self, model: nn.Module) -> nn.Module | None:
        blocks = getattr(model, "transformer_blocks", None)
        if not (isinstance(blocks, nn.ModuleList) and len(blocks) > 0 and hasattr(model, "adaln_single")):
            return None
        if all(getattr(b, "attn2", None) is not None for b in blocks):
            return model
        return None

    def site_modules(self, transformer):
        return [b.attn2 for b in transformer.transformer_blocks]

    def site_width(self, transformer, index, module):
        return int(getattr(transformer, "inner_dim", 0) or last_linear_width(module))

    def _patch_size(self, transformer) -> int:
        return _patch(getattr(getattr(transformer, "config", None), "patch_size", 2) or 2)

    def token_grid(self, transformer, index, latent_size):
        p = self._patch_size(transformer)
        return latent_size[0] // p, latent_size[1] // p

    def read_call(self, transformer, args, kwargs):
        latents = kwargs.get("hidden_states", args[0] if args else None)
        timesteps = kwargs.get("timestep", args[2] if len(args) > 2 else None)
        if latents is None or timesteps is None:
            raise MedSteerError("cannot read the latents and timesteps of this transformer call; pass call_info=")
        return latents, timesteps, {}

    def check_latent(self, transformer, height, width):
        p = self._patch_size(transformer)
        if height % p or width % p:
            raise MedSteerError(f"latent of {height}x{width} is not a whole number of {p}x{p} patches")

    def latent_channels(self, transformer):
        return int(getattr(transformer.config, "in_channels", 4))

    def pixel_scale(self, transformer):
        # A 3-channel PixArt works on pixels (MedSteer-mini); 4 channels are the SD autoencoder's.
        return 1 if self.latent_channels(transformer) == 3 else 8

    def resolution_condition(self, transformer, height, width):
        # PixArt-alpha (sample_size 128) conditions every call on the image size and aspect ratio.
        if not getattr(transformer, "use_additional_conditions", False):
            return {}
        return {"resolution": (height, width), "aspect_ratio": (height / width,)}


def check_latent_size(height: int, width: int, patch_size: int = 2) -> None:
    """Refuse latents that ComfyUI's PixArt cannot sample.

    ComfyUI's PixArt builds its position embedding with ``base_size = round((H + W) // 2 / 64) * 64
    // patch_size``, which is 0 (a division by zero) when ``(H + W) // 2 <= 32`` latent pixels.

    Args:
        height / width: latent size in latent pixels (image size / 8).
        patch_size: the transformer's patch size.

    Raises:
        MedSteerError: the latent is too small; the message gives the smallest usable size.
    """
    resolution = (int(height) + int(width)) // 2
    if (round(resolution / 64) * 64) // max(int(patch_size), 1) == 0:
        raise MedSteerError(
            f"latent of {height}x{width} (an image of {width * 8}x{height * 8} pixels) is too small for "
            "PixArt: ComfyUI's PixArt position embedding divides by zero when (height + width) / 2 is 32 "
            "latent pixels or less. Use at least 34x34 latent pixels (272x272 px); PixArt-XL-2-512x512 "
            "is trained at 512x512 px (64x64)."
        )


class PixArtComfyUI(Backbone):
    """ComfyUI's ``PixArtMS``. A subclass may define ``check_latent_size(height, width)`` and
    ``pixel_scale`` (MedSteer-mini's ComfyUI model does: pixel space, its own position embedding)."""

    name = "PixArt-alpha/-sigma (ComfyUI PixArtMS, model.model.diffusion_model of a PixArt checkpoint)"
    family = "pixart"
    host = "comfyui"

    def transformer(self, model: nn.Module) -> nn.Module | None:
        blocks = getattr(model, "blocks", None)
        if not (isinstance(blocks, nn.ModuleList) and len(blocks) > 0):
            return None
        if hasattr(model, "x_embedder") and hasattr(model, "t_block") and all(hasattr(b, "cross_attn") for b in blocks):
            return model
        return None

    def site_modules(self, transformer):
        return [b.cross_attn for b in transformer.blocks]

    def site_width(self, transformer, index, module):
        return int(getattr(transformer, "hidden_size", 0) or last_linear_width(module))

    def token_grid(self, transformer, index, latent_size):
        p = _patch(getattr(transformer, "patch_size", 2))
        return latent_size[0] // p, latent_size[1] // p

    def read_call(self, transformer, args, kwargs):
        latents = kwargs.get("x", args[0] if args else None)
        timesteps = kwargs.get("timesteps", args[1] if len(args) > 1 else None)
        if latents is None or timesteps is None:
            raise MedSteerError("cannot read the latents and timesteps of this transformer call; pass call_info=")
        return latents, timesteps, kwargs.get("transformer_options") or {}

    def check_latent(self, transformer, height, width):
        own = getattr(transformer, "check_latent_size", None)
        if callable(own):
            own(height, width)
        else:
            check_latent_size(height, width, _patch(getattr(transformer, "patch_size", 2)))

    def latent_channels(self, transformer):
        return int(getattr(transformer, "in_channels", 4))

    def pixel_scale(self, transformer):
        return int(getattr(transformer, "pixel_scale", 8))
