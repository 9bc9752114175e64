"""What MedSteer needs to know about a model family, and how it finds it (issue 9).

A ``Backbone`` is one model family in one host (PixArt in diffusers, PixArt in ComfyUI, ...). It
answers every model-shaped question the engine has: which modules are the cross-attention sites
(in execution order), how wide each site's output is, the token grid of each site for a latent
size, how to read a transformer call's latents and timesteps, which latent sizes the model can
sample, its latent channels and how many image pixels one latent pixel is. Everything else
(hooks, estimator, vector files, nodes, CLI) asks ``Sites``, never the model.

``find_sites(model)`` tries the registered backbones in order. For a model none of them knows,
pass ``matcher=`` (a ``Backbone``, or a function returning the site modules) or set the
attribute ``medsteer_backbone`` on the model; ``register_backbone`` adds one for every later call.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from ..errors import MedSteerError, UnsupportedModelError

__all__ = [
    "PAPER_WINDOW",
    "Backbone",
    "ModuleListBackbone",
    "Sites",
    "find_sites",
    "register_backbone",
    "last_linear_width",
    "paper_window",
    "registered_backbones",
    "resolve_layers",
    "tag_family",
    "unregister_backbone",
]

#: The attribute a model can carry to say which ``Backbone`` steers it (the override of ``find_sites``).
OVERRIDE_ATTRIBUTE = "medsteer_backbone"
#: The attribute a loader sets on a transformer to name its family's variant (``tag_family``).
FAMILY_ATTRIBUTE = "medsteer_family"
#: The paper's steering window on the 28-block PixArt-XL-2: blocks 8-16 (end exclusive).
PAPER_WINDOW = (8, 16)


class Backbone:
    """One model family in one host. Subclass it and ``register_backbone`` an instance.

    The protocol a new backbone implements (ARCHITECTURE.md, "To add a backbone"):

    - must: ``transformer`` (recognise the model), ``site_modules`` (the sites in execution
      order), ``token_grid`` (each site's grid for a latent size), ``read_call`` (a call's
      latents, timesteps and options);
    - may override: ``site_width``, ``site_name``, ``family_of`` (the family string written into
      vectors, the same in every host), ``default_window`` (the preset window),
      ``check_latent`` (the latent-size rule), ``latent_channels``, ``pixel_scale``,
      ``resolution_condition`` (extra conditioning a sampling loop passes).

    Attributes:
        name: shown in errors and ``medsteer inspect`` ("PixArt (diffusers)").
        family: written into vectors' provenance ("pixart", "medsteer-mini", ...).
        host: ``"diffusers"``, ``"comfyui"`` or anything else for custom models.
    """

    name = "backbone"
    family = "unknown"
    host = "custom"

    def transformer(self, model: nn.Module) -> nn.Module | None:
        """The module whose forward receives latents and timesteps, if this backbone knows ``model``
        (``model`` is already unwrapped from pipelines, peft and ``torch.compile``)."""
        raise NotImplementedError

    def site_modules(self, transformer: nn.Module) -> Sequence[nn.Module]:
        """The cross-attention modules, in execution order."""
        raise NotImplementedError

    def site_width(self, transformer: nn.Module, index: int, module: nn.Module) -> int:
        """The width of site ``index``'s output (default: the last linear layer's ``out_features``)."""
        return last_linear_width(module)

    def token_grid(self, transformer: nn.Module, index: int, latent_size: tuple[int, int]) -> tuple[int, int]:
        """``(rows, columns)`` of site ``index``'s image tokens for a latent of ``latent_size``."""
        raise NotImplementedError

    def site_name(self, transformer: nn.Module, index: int) -> str:
        """The name users know site ``index`` by (``"block 3"``; UNets: ``"input 7.3"``, ``"middle 0"``)."""
        return f"block {index}"

    def read_call(self, transformer: nn.Module, args: tuple, kwargs: dict):
        """``(latents, timesteps, transformer_options)`` of one call of ``transformer``'s forward.

        Raises:
            MedSteerError: the call does not carry them (the caller must pass ``call_info=``).
        """
        raise MedSteerError(
            f"{self.name} cannot read the latents and timesteps of a model call; pass call_info= to "
            "steering()/capture() for every call"
        )

    def check_latent(self, transformer: nn.Module, height: int, width: int) -> None:
        """Raise ``MedSteerError`` when the model cannot sample a latent of this size (default: any)."""

    def latent_channels(self, transformer: nn.Module) -> int:
        """Channels of the latent the model denoises."""
        return int(getattr(transformer, "in_channels", 4))

    def pixel_scale(self, transformer: nn.Module) -> int:
        """Image pixels per latent pixel (8 for the SD autoencoders, 1 in pixel space)."""
        return 8

    def family_of(self, transformer: nn.Module) -> str:
        """The family string of this model, written into every vector built on it and the same in
        every host (default: the variant a loader tagged with ``tag_family``, such as
        ``"pixart-alpha"``, else ``family``; the UNets tell SD1 from SDXL by their geometry)."""
        return getattr(transformer, FAMILY_ATTRIBUTE, None) or self.family

    def default_window(self, transformer: nn.Module, depth: int) -> tuple[int, int]:
        """The preset steering window ``(start, end)``, end exclusive, of a model with ``depth``
        sites (default: ``paper_window``: the paper's blocks 8-16 where the model has them, else every site)."""
        return paper_window(depth)

    def resolution_condition(self, transformer: nn.Module, height: int, width: int) -> dict:
        """Extra keyword arguments a diffusers sampling loop passes with each call for an image of
        ``height`` x ``width`` pixels (PixArt-alpha's ``added_cond_kwargs``), or ``{}``."""
        return {}


class ModuleListBackbone(Backbone):
    """The override for a model no registered backbone knows: you name the sites, MedSteer infers
    the widths; token grids are square (``sqrt`` of the token count) and every call needs
    ``call_info=``.

    Args:
        sites: a function ``model -> [cross-attention modules in execution order]``.
        name: shown in errors.
    """

    def __init__(self, sites: Callable[[nn.Module], Sequence[nn.Module]], name: str = "custom model") -> None:
        self._sites = sites
        self.name = name

    def transformer(self, model: nn.Module) -> nn.Module:
        return model

    def site_modules(self, transformer: nn.Module) -> Sequence[nn.Module]:
        return list(self._sites(transformer))

    def token_grid(self, transformer, index, latent_size):
        raise MedSteerError(f"{self.name}: token grids are unknown; gate maps assume square grids")


@dataclass(frozen=True, eq=False)
class Sites:
    """The hook points of one model, and its backbone's answers about them.

    Attributes:
        transformer: the unwrapped module whose forward receives latents and timesteps.
        modules: the cross-attention modules, index 0 = first in execution order.
        widths: the output width of each site.
        backbone: the ``Backbone`` that found them.
    """

    transformer: nn.Module
    modules: tuple[nn.Module, ...]
    widths: tuple[int, ...]
    backbone: Backbone

    @property
    def depth(self) -> int:
        """Number of sites."""
        return len(self.modules)

    @property
    def hidden_size(self) -> int:
        """The widest site's width (every site's, for PixArt)."""
        return max(self.widths)

    @property
    def host(self) -> str:
        return self.backbone.host

    @property
    def family(self) -> str:
        """The model's family (``Backbone.family_of``: ``"pixart"``, ``"sd1"``, ``"sdxl"``, ...): the one
        place that chooses the family string written into vectors, for both hosts."""
        return str(self.backbone.family_of(self.transformer))

    @property
    def default_window(self) -> tuple[int, int]:
        """The backbone's preset window ``(start, end)``, end exclusive, checked against the model.

        PixArt (and any backbone without its own preset): the paper's blocks 8-16 where the model
        has them, else every site (MedSteer-mini has 6). Stable Diffusion UNets: the coarsest
        cross-attention level of the down path, the middle block and the output blocks back up to
        that level (``backbones/sd_unet.py`` says why).
        """
        start, end = (int(v) for v in self.backbone.default_window(self.transformer, self.depth))
        self.check_window(start, end)
        return start, end

    def resolution_condition(self, height: int, width: int) -> dict:
        """What a diffusers sampling loop passes with each call for ``height`` x ``width`` images
        (name -> the values of one row)."""
        return dict(self.backbone.resolution_condition(self.transformer, int(height), int(width)))

    @property
    def names(self) -> tuple[str, ...]:
        """Each site's name, in execution order (PixArt: ``"block 0"``...; UNets: ``"input 1"``...)."""
        return tuple(str(self.backbone.site_name(self.transformer, i)) for i in range(self.depth))

    def resolve_layers(self, text: str) -> tuple[int, int]:
        """The ``[start, end)`` window (execution order) that ``text`` names.

        Accepts ``"8-16"`` (indices, end exclusive), ``"8"`` (one site), a name (``"middle"``,
        ``"input 7"`` = every site of input block 7, ``"input 7.3"``, ``"output"`` = every output
        site) or a range of names ``"input 7 - output 2"`` (both ends inclusive). Case and spaces
        between a word and its number do not matter.

        Raises:
            ValueError: the text names no site, or an empty or reversed window; the message lists
                the valid names.
        """
        return resolve_layers(self.names, text)

    @property
    def pixel_scale(self) -> int:
        """Image pixels per latent pixel (8 for the SD autoencoders, 1 in pixel space)."""
        return int(self.backbone.pixel_scale(self.transformer))

    @property
    def latent_channels(self) -> int:
        """Channels of the latent the model denoises."""
        return int(self.backbone.latent_channels(self.transformer))

    def token_grid(self, index: int, latent_size: tuple[int, int]) -> tuple[int, int]:
        """``(rows, columns)`` of site ``index`` for a latent of ``latent_size = (height, width)``."""
        return tuple(int(n) for n in self.backbone.token_grid(self.transformer, index, tuple(latent_size)))

    def check_latent(self, height: int, width: int) -> None:
        """Raise ``MedSteerError`` (with the smallest usable size) if the model cannot sample it."""
        self.backbone.check_latent(self.transformer, int(height), int(width))

    def read_call(self, args: tuple, kwargs: dict):
        """``(latents, timesteps, transformer_options)`` of one call of the transformer."""
        return self.backbone.read_call(self.transformer, args, kwargs)

    def check_window(self, layer_start: int, layer_end: int) -> None:
        """Raise ``ValueError`` unless ``[layer_start, layer_end)`` is a non-empty window of this model."""
        if not (0 <= layer_start < layer_end <= self.depth):
            raise ValueError(
                f"layer window [{layer_start}, {layer_end}) is empty or outside this model's "
                f"{self.depth} layers: use 0 <= layer_start < layer_end <= {self.depth} "
                "(layer_end is exclusive; the paper's window is 8-16 on the 28-layer PixArt-XL-2)"
            )


def paper_window(depth: int) -> tuple[int, int]:
    """The paper's window where a model of ``depth`` sites has it (blocks 8-16), else every site."""
    return PAPER_WINDOW if depth >= PAPER_WINDOW[1] else (0, int(depth))


def tag_family(transformer: nn.Module, family: str) -> nn.Module:
    """Record which variant of its family ``transformer`` is, as its loader knows it (the diffusers
    pipeline class, ComfyUI's ``image_model``): ``"pixart_alpha"`` -> ``"pixart-alpha"``.

    ``Backbone.family_of`` reads it, so both hosts write the same family string into vectors.
    """
    name = str(family).strip().lower().replace("_", "-")
    if name:
        setattr(transformer, FAMILY_ATTRIBUTE, name)
    return transformer


def _normal_name(text: str) -> str:
    """``"Input7.3"`` / ``" input   7.3 "`` -> ``"input 7.3"``."""
    return re.sub(r"\s+", " ", re.sub(r"([a-z])\s*(\d)", r"\1 \2", str(text).strip().lower()))


def _block_names(names: Sequence[str]) -> list[str]:
    """The names without transformer indices, once each (``"input 7"`` for ``"input 7.0"``...)."""
    return list(dict.fromkeys(name.split(".")[0] for name in names))


def _matching(names: Sequence[str], query: str) -> range | None:
    """The contiguous sites that ``query`` names: the site itself, or every site of the block/kind."""
    hits = [i for i, n in enumerate(names) if n == query or n.startswith(query + ".") or n.startswith(query + " ")]
    if not hits or hits != list(range(hits[0], hits[-1] + 1)):
        return None
    return range(hits[0], hits[-1] + 1)


def resolve_layers(names: Sequence[str], text: str) -> tuple[int, int]:
    """``Sites.resolve_layers`` over a list of site names (see there)."""
    spec = str(text).strip()
    depth = len(names)
    valid = ", ".join(_block_names(names))
    usage = (
        f"use 'start-end' indices (0 <= start < end <= {depth}, end exclusive), a name, or 'name - name' "
        f"(both ends inclusive); this model's blocks are: {valid}"
    )
    parts = [p.strip() for p in spec.split("-")]
    if all(re.fullmatch(r"\d+", p) for p in parts) and len(parts) in (1, 2):
        start = int(parts[0])
        end = int(parts[1]) if len(parts) == 2 else start + 1
    elif len(parts) in (1, 2) and not any(re.fullmatch(r"\d+", p) for p in parts):
        ranges = [_matching(names, _normal_name(p)) for p in parts]
        unknown = [p for p, r in zip(parts, ranges, strict=True) if r is None]
        if unknown:
            raise ValueError(f"layers {text!r}: no site is named {unknown[0]!r}; {usage}")
        start, end = ranges[0].start, ranges[-1].stop
    else:
        raise ValueError(f"layers {text!r} is not a layer window: {usage}")
    if not 0 <= start < end <= depth:
        raise ValueError(
            f"layers {text!r} is the window [{start}, {end}), which is empty or outside the model; {usage}"
        )
    return start, end


_REGISTRY: list[Backbone] = []


def register_backbone(backbone: Backbone, first: bool = False) -> Backbone:
    """Make ``find_sites`` try ``backbone`` (after the built-in ones, or ``first``). Returns it."""
    if not isinstance(backbone, Backbone):
        raise TypeError(f"register_backbone needs a Backbone instance, got {type(backbone).__name__}")
    if backbone not in _REGISTRY:
        _REGISTRY.insert(0, backbone) if first else _REGISTRY.append(backbone)
    return backbone


def unregister_backbone(backbone: Backbone) -> None:
    """Undo ``register_backbone`` (tests register throw-away backbones)."""
    if backbone in _REGISTRY:
        _REGISTRY.remove(backbone)


def registered_backbones() -> tuple[Backbone, ...]:
    return tuple(_REGISTRY)


def find_sites(model: nn.Module, matcher: Backbone | Callable | None = None) -> Sites:
    """Locate the cross-attention sites of a model.

    Args:
        model: a transformer, or something holding one: a diffusers pipeline (``.transformer``),
            a peft model, ComfyUI's ``BaseModel`` (``.diffusion_model``) or ``ModelPatcher``
            (``.model``), any of them wrapped by ``torch.compile``.
        matcher: the override for models no registered backbone knows: a ``Backbone``, or a
            function ``model -> [cross-attention modules in execution order]``. Default: the
            model's ``medsteer_backbone`` attribute if set, else every registered backbone.

    Returns:
        The ``Sites`` of the model.

    Raises:
        UnsupportedModelError: no backbone knows the model; the message names the supported
            families and the override.
    """
    module = unwrap(model)
    matcher = matcher if matcher is not None else getattr(model, OVERRIDE_ATTRIBUTE, None)
    if matcher is None:
        matcher = getattr(module, OVERRIDE_ATTRIBUTE, None)
    if matcher is not None:
        backbone = matcher if isinstance(matcher, Backbone) else ModuleListBackbone(matcher)
        transformer = backbone.transformer(module)
        if transformer is None:
            raise UnsupportedModelError(
                f"{backbone.name} (the given matcher) does not recognise {type(model).__name__}"
            )
        return _sites(backbone, transformer)
    for backbone in _REGISTRY:
        transformer = backbone.transformer(module)
        if transformer is not None:
            return _sites(backbone, transformer)
    supported = "; ".join(b.name for b in _REGISTRY)
    raise UnsupportedModelError(
        f"unsupported model {type(model).__name__}: MedSteer steers the cross-attention of these model "
        f"families: {supported}. Load one of them (e.g. PixArt-alpha/PixArt-XL-2-512x512), or, for another "
        "model, pass find_sites(model, matcher=lambda m: [its cross-attention modules]) or a Backbone "
        "(medsteer_core.backbones), or set model.medsteer_backbone"
    )


def _sites(backbone: Backbone, transformer: nn.Module) -> Sites:
    modules = tuple(backbone.site_modules(transformer))
    if not modules:
        raise UnsupportedModelError(
            f"{backbone.name}: found no cross-attention modules in {type(transformer).__name__}"
        )
    widths = tuple(int(backbone.site_width(transformer, i, m)) for i, m in enumerate(modules))
    return Sites(transformer, modules, widths, backbone)


def unwrap(model: nn.Module) -> nn.Module:
    """The innermost model: through ``torch.compile``, peft, pipelines and ComfyUI's wrappers, down to
    the first module a registered backbone recognises (or the last one reached)."""
    seen = set()
    current = model
    while id(current) not in seen:
        seen.add(id(current))
        # torch.compile's OptimizedModule forwards attribute reads to the module it compiled, so it
        # would pass the backbones' checks itself: hook the compiled module, not the wrapper.
        compiled = getattr(current, "__dict__", {}).get("_modules", {}).get("_orig_mod")
        if isinstance(compiled, nn.Module):
            current = compiled
            continue
        if getattr(current, OVERRIDE_ATTRIBUTE, None) is not None:
            return current
        if isinstance(current, nn.Module) and any(b.transformer(current) is current for b in _REGISTRY):
            return current
        # peft: PeftModel.get_base_model(); LoraModel.model; ComfyUI BaseModel.diffusion_model and
        # ModelPatcher.model; diffusers pipelines: .transformer / .unet.
        if hasattr(current, "get_base_model") and callable(current.get_base_model):
            current = current.get_base_model()
            continue
        for attr in ("diffusion_model", "transformer", "unet", "model"):
            inner = getattr(current, attr, None)
            if isinstance(inner, nn.Module):
                current = inner
                break
        else:
            break
    return current


def last_linear_width(module: nn.Module) -> int:
    """``out_features`` of the last linear layer inside ``module`` (an attention's output projection)."""
    linears = [m for m in module.modules() if hasattr(m, "out_features")]
    if not linears:
        raise UnsupportedModelError(f"cannot tell the width of cross-attention module {type(module).__name__}")
    return int(linears[-1].out_features)
