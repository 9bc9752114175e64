"""Find the cross-attention modules ("sites") of a PixArt transformer, in depth order.

| host      | transformer                                   | site i                         |
|-----------|-----------------------------------------------|--------------------------------|
| diffusers | ``PixArtTransformer2DModel`` (also under peft) | ``transformer_blocks[i].attn2`` |
| ComfyUI   | ``comfy.ldm.pixart.pixartms.PixArtMS``         | ``blocks[i].cross_attn``        |

ComfyUI's class is recognised by its structure, so this module never imports comfy.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import UnsupportedModelError

__all__ = ["Sites", "find_sites"]

SUPPORTED = (
    "diffusers PixArtTransformer2DModel (PixArt-alpha / PixArt-sigma, optionally wrapped by peft)",
    "ComfyUI PixArtMS (model.model.diffusion_model of a PixArt checkpoint)",
)


@dataclass(frozen=True)
class Sites:
    """The hook points of one transformer.

    Attributes:
        transformer: the unwrapped transformer module (its forward receives latents and timesteps).
        modules: the cross-attention modules, index 0 = first block.
        host: ``"diffusers"`` or ``"comfyui"``.
        hidden_size: width ``D`` of the cross-attention output.
        patch_size: latent pixels per token side (token grid = latent size / patch_size).
    """

    transformer: nn.Module
    modules: tuple[nn.Module, ...]
    host: str
    hidden_size: int
    patch_size: int

    @property
    def depth(self) -> int:
        return len(self.modules)

    def check_window(self, layer_start: int, layer_end: int) -> None:
        """Raise ``ValueError`` unless ``[layer_start, layer_end)`` is a non-empty window of this model."""
        if not (0 <= layer_start < layer_end <= self.depth):
            raise ValueError(
                f"layer window [{layer_start}, {layer_end}) is empty or outside this model's "
                f"{self.depth} layers: use 0 <= layer_start < layer_end <= {self.depth} "
                "(layer_end is exclusive; the paper's window is 8-16 on the 28-layer PixArt-XL-2)"
            )


def find_sites(model: nn.Module) -> Sites:
    """Locate the cross-attention sites of a PixArt transformer.

    Args:
        model: a diffusers ``PixArtTransformer2DModel`` (or a peft ``PeftModel`` around one, or a
            pipeline with a ``.transformer``), or ComfyUI's ``PixArtMS`` (or the ``BaseModel`` that
            holds it as ``.diffusion_model``); any of these may be wrapped by ``torch.compile``.

    Returns:
        The ``Sites`` of the model.

    Raises:
        UnsupportedModelError: any other model; the message names the supported classes.
    """
    module = _unwrap(model)
    blocks = getattr(module, "transformer_blocks", None)
    if isinstance(blocks, nn.ModuleList) and len(blocks) > 0 and all(hasattr(b, "attn2") for b in blocks):
        attn = [b.attn2 for b in blocks]
        if all(a is not None for a in attn) and hasattr(module, "adaln_single"):
            config = getattr(module, "config", None)
            patch = int(getattr(config, "patch_size", 2) or 2)
            hidden = int(getattr(module, "inner_dim", 0) or _out_features(attn[0]))
            return Sites(module, tuple(attn), "diffusers", hidden, patch)
    blocks = getattr(module, "blocks", None)
    if (
        isinstance(blocks, nn.ModuleList)
        and len(blocks) > 0
        and all(hasattr(b, "cross_attn") for b in blocks)
        and hasattr(module, "x_embedder")
        and hasattr(module, "t_block")
    ):
        attn = [b.cross_attn for b in blocks]
        patch = getattr(module, "patch_size", 2)
        patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        hidden = int(getattr(module, "hidden_size", 0) or _out_features(attn[0]))
        return Sites(module, tuple(attn), "comfyui", hidden, patch)
    raise UnsupportedModelError(
        f"unsupported model {type(model).__name__}: MedSteer steers the cross-attention of PixArt "
        f"transformers only. Supported: {'; '.join(SUPPORTED)}. Load a PixArt checkpoint "
        "(e.g. PixArt-alpha/PixArt-XL-2-512x512)."
    )


def _unwrap(model: nn.Module) -> nn.Module:
    seen = set()
    current = model
    while id(current) not in seen:
        seen.add(id(current))
        # torch.compile's OptimizedModule forwards attribute reads to the module it compiled, so
        # it would pass the checks below itself: hook the compiled module, not the wrapper.
        compiled = getattr(current, "__dict__", {}).get("_modules", {}).get("_orig_mod")
        if isinstance(compiled, nn.Module):
            current = compiled
            continue
        if hasattr(current, "transformer_blocks") or (hasattr(current, "blocks") and hasattr(current, "x_embedder")):
            return current
        # peft: PeftModel.get_base_model(); LoraModel.model; ComfyUI BaseModel.diffusion_model;
        # diffusers pipelines: .transformer.
        if hasattr(current, "get_base_model") and callable(current.get_base_model):
            current = current.get_base_model()
            continue
        for attr in ("diffusion_model", "transformer", "model"):
            inner = getattr(current, attr, None)
            if isinstance(inner, nn.Module):
                current = inner
                break
        else:
            break
    return current


def _out_features(module: nn.Module) -> int:
    linears = [m for m in module.modules() if hasattr(m, "out_features")]
    if not linears:
        raise UnsupportedModelError(f"cannot tell the width of cross-attention module {type(module).__name__}")
    return int(linears[-1].out_features)
