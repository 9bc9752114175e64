"""Stable Diffusion UNets (SD1.x, SD2.x, SDXL) in both hosts (issue 10).

| host      | transformer                                       | blocks                                   |
|-----------|---------------------------------------------------|------------------------------------------|
| diffusers | ``UNet2DConditionModel`` (also under peft, .unet)  | ``down_blocks``, ``mid_block``, ``up_blocks`` |
| ComfyUI   | ``comfy.ldm...openaimodel.UNetModel``              | ``input_blocks``, ``middle_block``, ``output_blocks`` |

A site is the cross-attention (``attn2``) of one transformer block, in execution order: 16 for
SD1.x/2.x, 70 for SDXL. Sites at one resolution level share a width (320/640/1280) and a token
grid: the latent after that level's downsamplers (``ceil(n / 2)`` per SD downsampler, so any aspect
ratio and odd sizes; the up path upsamples to the skip connection's size, so an output block has
its input level's grid). In ComfyUI the site module is ``attn2.to_out`` (the same output), which
runs also under an attn2 replace patch such as IP-Adapter's.

Both hosts name the sites as ComfyUI's attention patches do (``transformer_options["block"]``):
``"input 4"``, ``"middle 0"``, ``"output 3"``, and ``"input 7.3"`` (transformer block 3 of block 7)
when a block holds several transformer blocks. A diffusers down block's resnet/attention pair ``j``
is ComfyUI's input block ``1 + (pairs and downsamplers before it)``; its up blocks' pairs are
output blocks counted from 0 (the upsampler sits inside the last pair's output block).

The family (``family_of``) is the same string in both hosts, so vectors move between them.
ComfyUI's class is recognised by its structure, so this module never imports comfy.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from torch import nn

from ..errors import MedSteerError
from .base import Backbone, last_linear_width

__all__ = ["UNetComfyUI", "UNetDiffusers", "UNetSite", "unet_family"]

#: ``(context width, has an added embedding, base channels) -> family`` of the released SD UNets.
_FAMILIES = {
    (768, False, 320): "sd1",
    (1024, False, 320): "sd2",
    (1024, True, 320): "sd2",  # SD 2.1 unCLIP: the SD2 UNet plus an image embedding
    (2048, True, 320): "sdxl",
    (1280, True, 384): "sdxl-refiner",
}
#: The family of a UNet that is none of the released ones (tiny test models, custom trainings).
GENERIC_FAMILY = "sd-unet"


def unet_family(context_dim: int, added_embedding: bool, base_channels: int) -> str:
    """The family of a Stable Diffusion UNet from its geometry.

    Args:
        context_dim: width of the text embedding its cross-attention reads (768 for SD1.x).
        added_embedding: whether it adds a second embedding to the timestep's (SDXL's text-time
            embedding, unCLIP's image embedding; ComfyUI's ``label_emb``).
        base_channels: channels of the first level (320, or 384 for the SDXL refiner).

    Returns:
        ``"sd1"``, ``"sd2"``, ``"sdxl"``, ``"sdxl-refiner"`` or ``"sd-unet"`` (any other UNet).
    """
    return _FAMILIES.get((int(context_dim), bool(added_embedding), int(base_channels)), GENERIC_FAMILY)


@dataclass(frozen=True)
class UNetSite:
    """One site of a UNet.

    Attributes:
        module: the ``attn2`` module.
        block: ``"input"``, ``"middle"`` or ``"output"`` (ComfyUI's block kinds).
        block_index: the block's index among ComfyUI's ``input_blocks`` / ``output_blocks`` (0 in the middle).
        transformer_index: the transformer block's index within its block.
        level: how many downsamplers precede it (0 = the latent's own resolution).
    """

    module: nn.Module
    block: str
    block_index: int
    transformer_index: int
    level: int


@dataclass(frozen=True)
class _Layout:
    sites: tuple[UNetSite, ...]
    downsamplers: tuple[nn.Module, ...]  # in order: the grid of level l passes through the first l
    names: tuple[str, ...]


def _cross_attentions(layer: nn.Module) -> list[nn.Module]:
    """The cross-attention modules of one spatial transformer (empty for any other layer)."""
    blocks = getattr(layer, "transformer_blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        return []
    found = []
    for block in blocks:
        attn2 = getattr(block, "attn2", None)
        # diffusers marks a self-attention in the attn2 slot (only_cross_attention=False configs
        # without a context) with is_cross_attention=False; ComfyUI sets attn2 to None.
        if isinstance(attn2, nn.Module) and getattr(attn2, "is_cross_attention", True):
            found.append(attn2)
    return found


def _is_resampler(layer: nn.Module, kind: str) -> bool:
    """``kind`` = "Downsample" / "Upsample": the layer, or a resblock resampling inside (``resblock_updown``)."""
    if type(layer).__name__.startswith(kind):
        return True
    return bool(getattr(layer, "updown", False)) and type(getattr(layer, "h_upd", None)).__name__.startswith(kind)


def _sampler(layer: nn.Module) -> nn.Module:
    """The module that resamples: the layer, or the resampler inside a ``resblock_updown`` resblock."""
    return layer.h_upd if getattr(layer, "updown", False) else layer


def _names(sites: list[UNetSite]) -> tuple[str, ...]:
    per_block: dict[tuple[str, int], int] = {}
    for site in sites:
        key = (site.block, site.block_index)
        per_block[key] = per_block.get(key, 0) + 1
    return tuple(
        f"{s.block} {s.block_index}" + (f".{s.transformer_index}" if per_block[(s.block, s.block_index)] > 1 else "")
        for s in sites
    )


def _layout(entries: list[tuple[str, int, list[nn.Module], int]], downsamplers: list[nn.Module]) -> _Layout:
    """``entries``: ``(block, block_index, transformer layers, level)`` in execution order."""
    sites: list[UNetSite] = []
    counters: dict[tuple[str, int], int] = {}
    for block, index, layers, level in entries:
        for layer in layers:
            for module in _cross_attentions(layer):
                t = counters.get((block, index), 0)
                counters[(block, index)] = t + 1
                sites.append(UNetSite(module, block, index, t, level))
    return _Layout(tuple(sites), tuple(downsamplers), _names(sites))


def _downsampled(size: int, module: nn.Module, axis: int) -> int:
    """The size after one downsampler: its strided conv's (or pool's) output size along ``axis``."""
    op = next((m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.AvgPool2d, nn.MaxPool2d))), None)
    if op is None:
        return -(-size // 2)

    def pick(value):
        return int(value[axis] if isinstance(value, (tuple, list)) else value)

    kernel, stride, padding = pick(op.kernel_size), pick(op.stride), pick(op.padding)
    # diffusers' Downsample2D with padding=0 pads one pixel at the bottom/right before its conv.
    extra = 1 if isinstance(op, nn.Conv2d) and getattr(module, "padding", None) == 0 else 0
    return (size + 2 * padding + extra - kernel) // stride + 1


class _UNetBackbone(Backbone):
    """What both hosts share: the layout (cached per model), widths, grids, names, checks."""

    @property
    def _layouts(self) -> weakref.WeakKeyDictionary:
        # Created on first use, so a subclass with its own __init__ needs no super().__init__().
        return self.__dict__.setdefault("_layout_cache", weakref.WeakKeyDictionary())

    def _build_layout(self, transformer: nn.Module) -> _Layout:
        raise NotImplementedError

    def layout(self, transformer: nn.Module) -> _Layout:
        layout = self._layouts.get(transformer)
        if layout is None:
            layout = self._layouts[transformer] = self._build_layout(transformer)
        return layout

    def sites_of(self, transformer: nn.Module) -> tuple[UNetSite, ...]:
        """Every site with its block, transformer index and resolution level."""
        return self.layout(transformer).sites

    def site_modules(self, transformer):
        # find_sites calls this first: rebuild, so a model changed in place is read afresh.
        self._layouts[transformer] = layout = self._build_layout(transformer)
        return [site.module for site in layout.sites]

    def site_width(self, transformer, index, module):
        return last_linear_width(module)

    def site_name(self, transformer, index):
        return self.layout(transformer).names[index]

    def token_grid(self, transformer, index, latent_size):
        layout = self.layout(transformer)
        rows, columns = int(latent_size[0]), int(latent_size[1])
        for module in layout.downsamplers[: layout.sites[index].level]:
            rows, columns = _downsampled(rows, module, 0), _downsampled(columns, module, 1)
        return rows, columns

    def default_window(self, transformer: nn.Module, depth: int) -> tuple[int, int]:
        """The UNet preset: every site at the coarsest resolution level that the down path
        cross-attends at, and below it: that level's input blocks, the middle block and the output
        blocks back up to that level (SD1.x/2.x: ``"input 7 - output 5"``, 6 of 16 sites; SDXL:
        ``"input 7.0 - output 2.9"``, 60 of 70).

        Why these sites: CASteer, the method MedSteer ports, steers the cross-attention of SD
        1.4/2.1/XL and finds concept directions carry the concept at every layer; MedSteer's own
        constraint is the counterfactual's background, which the paper keeps by steering the middle
        of PixArt only. In a UNet the low-resolution levels hold the layout and semantics (object
        presence, category: where Prompt-to-Prompt reads its 16x16 maps on SD) while the full- and
        half-resolution levels (SD1's ``input 1-5``, ``output 6-11``) mostly render texture and detail,
        so steering only the semantic levels removes a concept while the fine levels keep redrawing
        the same background. Layer scans (``medsteer demo`` / ``mini.scan``) measure the alternatives.
        """
        sites = self.sites_of(transformer)
        inputs = [s.level for s in sites if s.block == "input"]
        deepest = max(inputs) if inputs else 0
        chosen = [i for i, s in enumerate(sites) if s.level >= deepest]
        return chosen[0], chosen[-1] + 1  # contiguous: levels rise on the way down and fall on the way up

    def check_latent(self, transformer, height, width):
        if height < 1 or width < 1:
            raise MedSteerError(f"latent of {height}x{width} is empty; use at least 1x1 latent pixels (8x8 px)")

    def pixel_scale(self, transformer):
        return 8

    def family_of(self, transformer: nn.Module) -> str:
        """This model's family: ``"sd1"``, ``"sd2"``, ``"sdxl"``, ``"sdxl-refiner"`` or ``"sd-unet"``."""
        sites = self.sites_of(transformer)
        to_k = getattr(sites[0].module, "to_k", None) if sites else None
        context = int(getattr(to_k, "in_features", 0) or 0)
        return unet_family(context, self._added_embedding(transformer), self._base_channels(transformer))

    def _added_embedding(self, transformer) -> bool:
        raise NotImplementedError

    def _base_channels(self, transformer) -> int:
        raise NotImplementedError


class UNetDiffusers(_UNetBackbone):
    """diffusers' ``UNet2DConditionModel`` (StableDiffusionPipeline / StableDiffusionXLPipeline's ``.unet``)."""

    name = "Stable Diffusion 1.x/2.x/XL UNet (diffusers UNet2DConditionModel, optionally under peft)"
    family = GENERIC_FAMILY
    host = "diffusers"

    def transformer(self, model: nn.Module) -> nn.Module | None:
        if not all(hasattr(model, a) for a in ("down_blocks", "mid_block", "up_blocks", "conv_in")):
            return None
        return model if self._build_layout(model).sites else None

    def _build_layout(self, unet):
        entries, downsamplers = [], []
        index = 1  # ComfyUI's input block 0 is conv_in
        for block in unet.down_blocks:
            attentions = list(getattr(block, "attentions", None) or [])
            for j in range(len(getattr(block, "resnets", None) or attentions)):
                entries.append(("input", index, attentions[j : j + 1], len(downsamplers)))
                index += 1
            for sampler in getattr(block, "downsamplers", None) or []:
                downsamplers.append(sampler)
                index += 1
        level = len(downsamplers)
        if unet.mid_block is not None:
            entries.append(("middle", 0, list(getattr(unet.mid_block, "attentions", None) or []), level))
        index = 0
        for block in unet.up_blocks:
            attentions = list(getattr(block, "attentions", None) or [])
            for j in range(len(getattr(block, "resnets", None) or attentions)):
                entries.append(("output", index, attentions[j : j + 1], level))
                index += 1
            level -= len(getattr(block, "upsamplers", None) or [])
        return _layout(entries, downsamplers)

    def read_call(self, transformer, args, kwargs):
        latents = kwargs.get("sample", args[0] if args else None)
        timesteps = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if latents is None or timesteps is None:
            raise MedSteerError("cannot read the latents and timesteps of this UNet call; pass call_info=")
        return latents, timesteps, {}

    def latent_channels(self, transformer):
        # out_channels: an inpainting UNet reads 9 channels but denoises a 4-channel latent.
        config = transformer.config
        return int(getattr(config, "out_channels", None) or getattr(config, "in_channels", 4))

    def _added_embedding(self, unet) -> bool:
        config = unet.config
        return getattr(config, "addition_embed_type", None) is not None or (
            getattr(config, "class_embed_type", None) is not None
        )

    def _base_channels(self, unet) -> int:
        return int(unet.config.block_out_channels[0])


class UNetComfyUI(_UNetBackbone):
    """ComfyUI's openaimodel ``UNetModel``: ``model.model.diffusion_model`` of an SD1.x/2.x/XL checkpoint."""

    name = "Stable Diffusion 1.x/2.x/XL UNet (ComfyUI UNetModel, model.model.diffusion_model of an SD checkpoint)"
    family = GENERIC_FAMILY
    host = "comfyui"

    def transformer(self, model: nn.Module) -> nn.Module | None:
        if not all(hasattr(model, a) for a in ("input_blocks", "middle_block", "output_blocks")):
            return None
        return model if self._build_layout(model).sites else None

    def _build_layout(self, unet):
        entries, downsamplers = [], []
        for index, block in enumerate(unet.input_blocks):
            layers = list(block)
            entries.append(("input", index, layers, len(downsamplers)))
            downsamplers.extend(_sampler(layer) for layer in layers if _is_resampler(layer, "Downsample"))
        level = len(downsamplers)
        if unet.middle_block is not None:
            entries.append(("middle", 0, list(unet.middle_block), level))
        for index, block in enumerate(unet.output_blocks):
            layers = list(block)
            entries.append(("output", index, layers, level))  # the upsampler comes after the transformer
            level -= sum(_is_resampler(layer, "Upsample") for layer in layers)
        return _layout(entries, downsamplers)

    def site_modules(self, transformer):
        # The hook sits on attn2.to_out, whose output is attn2's: an attn2 replace patch (IP-Adapter
        # installs one) calls attn2's to_q/to_k/to_v and to_out itself and never attn2's forward,
        # so a hook on attn2 would silently not steer under it. Both paths end in to_out.
        return [getattr(module, "to_out", module) for module in super().site_modules(transformer)]

    def read_call(self, transformer, args, kwargs):
        latents = kwargs.get("x", args[0] if args else None)
        timesteps = kwargs.get("timesteps", args[1] if len(args) > 1 else None)
        if latents is None or timesteps is None:
            raise MedSteerError("cannot read the latents and timesteps of this UNet call; pass call_info=")
        options = kwargs.get("transformer_options", args[5] if len(args) > 5 else None)
        return latents, timesteps, options or {}

    def latent_channels(self, transformer):
        return int(getattr(transformer, "out_channels", None) or getattr(transformer, "in_channels", 4))

    def _added_embedding(self, unet) -> bool:
        return getattr(unet, "num_classes", None) is not None or hasattr(unet, "label_emb")

    def _base_channels(self, unet) -> int:
        return int(getattr(unet, "model_channels", 0) or 0)
