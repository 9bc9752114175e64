"""What the MedSteer nodes share: the PATHOLOGY_VECTOR socket, PixArt checks, per-call row info.

The hooks of ``medsteer_core`` need, for every model call, the model timestep of each batch row,
which rows are conditional and the token grid. Inside ComfyUI an ``APPLY_MODEL`` wrapper sees all
three: the sigmas (``model_sampling.timestep`` turns them into PixArt's 0-999 timesteps), the
``cond_or_uncond`` chunk list in ``transformer_options`` (cond and uncond arrive as one
``[uncond, cond]`` batch or as separate calls, depending on the prompts' token counts) and the
latent's shape. No step counting, so every sampler, scheduler and step count works.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..medsteer_core import CallInfo, UnsupportedModelError
from ..medsteer_core.sites import Sites, find_sites

#: The one custom socket type of the pack: a ``medsteer_core.PathologyVector``.
PathologyVectorSocket = io.Custom("PATHOLOGY_VECTOR")

CATEGORY = "medsteer"


def pixart_sites(model) -> Sites:
    """The cross-attention sites of a ComfyUI MODEL, or a clear error if it is not PixArt.

    Raises:
        UnsupportedModelError: the MODEL is not a PixArt (alpha or sigma) diffusion model.
    """
    base = getattr(model, "model", None)
    diffusion_model = getattr(base, "diffusion_model", None)
    if diffusion_model is None:
        raise UnsupportedModelError(
            f"MedSteer needs a PixArt MODEL, got {type(base).__name__}: load a PixArt-alpha or "
            "PixArt-sigma checkpoint (for example with the MedSteer PixArt loader)"
        )
    try:
        sites = find_sites(diffusion_model)
    except UnsupportedModelError:
        family = type(getattr(base, "model_config", None)).__name__
        raise UnsupportedModelError(
            f"MedSteer steers PixArt's cross-attention, but this MODEL is {family} "
            f"({type(diffusion_model).__name__}): load a PixArt-alpha or PixArt-sigma checkpoint "
            "(for example PixArt-XL-2-512x512 with the MedSteer PixArt loader)"
        ) from None
    if sites.host != "comfyui":
        raise UnsupportedModelError(f"expected ComfyUI's PixArtMS inside the MODEL, found {sites.host} modules")
    return sites


def model_family(model) -> str:
    """``pixart-alpha`` / ``pixart-sigma``, the names the CLI writes too (so vectors built in
    either host merge), from ComfyUI's image_model name; else the config's class name."""
    config = getattr(getattr(model, "model", None), "model_config", None)
    unet_config = getattr(config, "unet_config", None) or {}
    return str(unet_config.get("image_model") or type(config).__name__).replace("_", "-")


def call_info(base_model, x, sigma, transformer_options) -> CallInfo:
    """The ``CallInfo`` of one ``apply_model`` call (see the module docstring).

    Args:
        base_model: ``comfy.model_base.PixArt`` (``executor.class_obj`` in the wrapper).
        x: the noisy latent ``[B, C, H, W]``.
        sigma: ``[B]`` sigmas of the rows.
        transformer_options: the call's options (``cond_or_uncond``).
    """
    patch = base_model.diffusion_model.patch_size
    patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    timesteps = base_model.model_sampling.timestep(sigma).float()
    grid = (int(x.shape[-2]) // patch, int(x.shape[-1]) // patch)
    chunks = (transformer_options or {}).get("cond_or_uncond")
    return CallInfo.from_layout(timesteps, int(x.shape[0]), "comfyui", grid, chunks)


def split_call(args: tuple, kwargs: dict) -> dict:
    """``transformer_options`` of an ``apply_model`` call, wherever the caller put it.

    ``BaseModel.apply_model`` passes ``(x, t, c_concat, c_crossattn, control, transformer_options)``
    positionally; another pack's wrapper may pass keywords.
    """
    if "transformer_options" in kwargs:
        return kwargs["transformer_options"] or {}
    return (args[3] if len(args) > 3 else None) or {}
