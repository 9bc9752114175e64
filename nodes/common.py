"""What the MedSteer nodes share: the PATHOLOGY_VECTOR socket, model checks, per-call row info.

The hooks of ``medsteer_core`` need, for every model call, the model timestep of each batch row,
which rows are conditional and the token grid. Inside ComfyUI an ``APPLY_MODEL`` wrapper sees all
three: the sigmas (``model_sampling.timestep`` turns them into PixArt's 0-999 timesteps), the
``cond_or_uncond`` chunk list in ``transformer_options`` (cond and uncond arrive as one
``[uncond, cond]`` batch or as separate calls, depending on the prompts' token counts) and the
latent's shape. No step counting, so every sampler, scheduler and step count works.
"""

from __future__ import annotations

import os

from comfy_api.latest import io

from ..medsteer_core import UnsupportedModelError
from ..medsteer_core.backbones import Sites, find_sites, registered_backbones, tag_family
from ..medsteer_core.hooks import CallInfo

#: The one custom socket type of the pack: a ``medsteer_core.PathologyVector``.
PathologyVectorSocket = io.Custom("PATHOLOGY_VECTOR")

CATEGORY = "medsteer"

#: The site names of the released UNets, for tooltips (``Sites.names`` of each model; Inspect lists a
#: vector's own). Sites are numbered in execution order: input blocks, middle, output blocks.
UNET_SITES_HELP = (
    "SD1.x/2.x have 16 sites: 'input 1', 'input 2', 'input 4', 'input 5', 'input 7', 'input 8' "
    "(indices 0-5), 'middle 0' (6), 'output 3' to 'output 11' (7-15). SDXL has 70: 'input 4.0' to "
    "'input 8.9', 'middle 0.0' to 'middle 0.9', 'output 0.0' to 'output 5.1' (two transformer blocks "
    "in input 4, 5 and output 3, 4, 5; ten in input 7, 8, middle 0 and output 0, 1, 2)."
)


def model_name_problem(name: object, where: str) -> str | None:
    """Why ``name`` cannot be a file or folder name inside the model folder ``where``; None if it can.

    Model names are paths relative to a registered model folder. An absolute path or a ``..`` step
    could reach outside it, so both are refused instead of being silently normalised.
    """
    if not isinstance(name, str) or not name.strip("/\\ "):
        return f"no file chosen ({name!r}): put one in {where} and refresh the page (press R)"
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or os.path.isabs(name) or os.path.splitdrive(name)[0] or ".." in parts:
        return f"{name!r} is not a name inside {where}: use a path relative to that folder, without '..'"
    return None


def inside(root: str, name: str) -> str | None:
    """``root/name`` when ``name`` (checked by ``model_name_problem``) stays inside ``root``, else None."""
    root = os.path.abspath(root)
    path = os.path.abspath(os.path.join(root, name))
    return path if os.path.commonpath([root, path]) == root else None


def supported_families() -> str:
    """The model families MedSteer steers inside ComfyUI (every registered ComfyUI-host backbone)."""
    return "; ".join(b.name for b in registered_backbones() if b.host == "comfyui")


def model_sites(model) -> Sites:
    """The cross-attention sites of a ComfyUI MODEL, or a clear error naming the supported families.

    Every ComfyUI-host backbone is accepted: PixArt-alpha/-sigma (``PixArtMS``), the Stable
    Diffusion 1.x/2.x/XL UNets (``UNetModel``) and MedSteer-mini.

    Raises:
        UnsupportedModelError: the MODEL is none of them.
    """
    base = getattr(model, "model", None)
    diffusion_model = getattr(base, "diffusion_model", None)
    if diffusion_model is None:
        raise UnsupportedModelError(
            f"MedSteer cannot steer this MODEL ({type(base).__name__}: it has no diffusion model). "
            f"It steers the cross-attention of: {supported_families()}. Load one of them, for example an "
            "SD1.5 / SD2.1 / SDXL checkpoint with Load Checkpoint, or PixArt with the MedSteer PixArt loader"
        )
    try:
        sites = find_sites(diffusion_model)
    except UnsupportedModelError:
        kind = type(getattr(base, "model_config", None)).__name__
        raise UnsupportedModelError(
            f"MedSteer cannot steer this MODEL: it is {kind} ({type(diffusion_model).__name__}). It steers "
            f"the cross-attention of: {supported_families()}. Load one of them, for example an SD1.5 / "
            "SD2.1 / SDXL checkpoint with Load Checkpoint, or PixArt-XL-2-512x512 with the MedSteer PixArt loader"
        ) from None
    config = getattr(base, "model_config", None)
    image_model = (getattr(config, "unet_config", None) or {}).get("image_model")
    if image_model:  # ComfyUI's name of the variant (pixart_alpha); the backbone turns it into the family
        tag_family(sites.transformer, str(image_model))
    if sites.host != "comfyui":
        raise UnsupportedModelError(
            f"expected ComfyUI's own model classes inside the MODEL, found {sites.backbone.name}: load the "
            "model with a ComfyUI loader"
        )
    return sites


def call_info(base_model, x, sigma, transformer_options) -> CallInfo:
    """The ``CallInfo`` of one ``apply_model`` call (see the module docstring).

    Args:
        base_model: ComfyUI's ``BaseModel`` (``executor.class_obj`` in the wrapper).
        x: the noisy latent ``[B, C, H, W]`` (each site's token grid follows from its size).
        sigma: ``[B]`` sigmas of the rows.
        transformer_options: the call's options (``cond_or_uncond``).
    """
    timesteps = base_model.model_sampling.timestep(sigma).float()
    chunks = (transformer_options or {}).get("cond_or_uncond")
    return CallInfo.from_layout(
        timesteps, int(x.shape[0]), "comfyui", cond_or_uncond=chunks, latent_size=(int(x.shape[-2]), int(x.shape[-1]))
    )


def split_call(args: tuple, kwargs: dict) -> dict:
    """``transformer_options`` of an ``apply_model`` call, wherever the caller put it.

    ``BaseModel.apply_model`` passes ``(x, t, c_concat, c_crossattn, control, transformer_options)``
    positionally; another pack's wrapper may pass keywords.
    """
    if "transformer_options" in kwargs:
        return kwargs["transformer_options"] or {}
    return (args[3] if len(args) > 3 else None) or {}
