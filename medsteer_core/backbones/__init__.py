"""Backbone adapters: one per model family and host, tried in order by ``find_sites``.

To add a model family: write a ``Backbone`` subclass (see ``base.Backbone`` for what it answers,
``pixart.py`` for a complete one) and ``register_backbone`` an instance; nothing else in the
engine, the nodes or the CLI needs to change. For a one-off model, ``find_sites(model,
matcher=lambda m: [its cross-attention modules])`` or ``model.medsteer_backbone = MyBackbone()``.
"""

from __future__ import annotations

from .base import (
    PAPER_WINDOW,
    Backbone,
    ModuleListBackbone,
    Sites,
    find_sites,
    paper_window,
    register_backbone,
    registered_backbones,
    resolve_layers,
    tag_family,
    unregister_backbone,
)
from .pixart import PixArtComfyUI, PixArtDiffusers, check_latent_size
from .sd_unet import UNetComfyUI, UNetDiffusers, UNetSite, unet_family

__all__ = [
    "PAPER_WINDOW",
    "Backbone",
    "ModuleListBackbone",
    "PixArtComfyUI",
    "PixArtDiffusers",
    "Sites",
    "UNetComfyUI",
    "UNetDiffusers",
    "UNetSite",
    "check_latent_size",
    "find_sites",
    "register_backbone",
    "registered_backbones",
    "paper_window",
    "resolve_layers",
    "tag_family",
    "unet_family",
    "unregister_backbone",
]

register_backbone(PixArtDiffusers())
register_backbone(PixArtComfyUI())
register_backbone(UNetDiffusers())
register_backbone(UNetComfyUI())
