"""MedSteer-mini as a model family: the backbones ``find_sites`` uses for the mini's denoisers.

The mini is a diffusers ``PixArtTransformer2DModel`` in pixel space, so everything but its family
name is PixArt's. ``new_mini`` and ``load_mini`` tag the transformer they build (``TAG``), which is
how this backbone tells it from a PixArt; registered first when ``medsteer_core.mini`` is imported,
so vectors built on the mini record ``model_family`` ``"medsteer-mini"``.
"""

from __future__ import annotations

from torch import nn

from ..backbones import PixArtDiffusers, register_backbone
from ..backbones.sd_unet import UNetDiffusers

__all__ = ["FAMILY", "TAG", "UNET_FAMILY", "MiniDiffusers", "MiniUNetDiffusers", "tag_transformer"]

#: The ``model_family`` of every vector built on MedSteer-mini.
FAMILY = "medsteer-mini"
#: The ``model_family`` of every vector built on MedSteer-mini-UNet (``mini/mini_unet.py``).
UNET_FAMILY = "medsteer-mini-unet"
#: The attribute ``new_mini`` / ``load_mini`` set to ``True`` on the transformer they build.
TAG = "medsteer_mini"


def tag_transformer(transformer: nn.Module) -> nn.Module:
    """Mark ``transformer`` as MedSteer-mini's (kept through ``.to()``, ``eval()`` and wrappers)."""
    setattr(transformer, TAG, True)
    return transformer


class MiniDiffusers(PixArtDiffusers):
    """MedSteer-mini's transformer in diffusers: a tagged PixArt, sites and grids as PixArt's."""

    name = "MedSteer-mini (diffusers PixArtTransformer2DModel built by medsteer_core.mini)"
    family = FAMILY

    def transformer(self, model: nn.Module) -> nn.Module | None:
        if getattr(model, TAG, False) is not True:
            return None
        return super().transformer(model)


class MiniUNetDiffusers(UNetDiffusers):
    """MedSteer-mini-UNet in diffusers: a tagged ``UNet2DConditionModel`` in pixel space; sites,
    names and grids as every SD UNet's, its own family."""

    name = "MedSteer-mini-UNet (diffusers UNet2DConditionModel built by medsteer_core.mini)"
    family = UNET_FAMILY

    def transformer(self, model: nn.Module) -> nn.Module | None:
        if getattr(model, TAG, False) is not True:
            return None
        return super().transformer(model)

    def family_of(self, transformer: nn.Module) -> str:
        return UNET_FAMILY

    def pixel_scale(self, transformer: nn.Module) -> int:
        return 1


BACKBONE = register_backbone(MiniDiffusers(), first=True)
UNET_BACKBONE = register_backbone(MiniUNetDiffusers(), first=True)
