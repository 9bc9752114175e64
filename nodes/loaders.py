"""Loaders for the authors' setup: PixArt-XL-2-512x512 as PixArt-alpha, and the MedSteer PEFT LoRA.

The key mapping, shape checks and LoRA scales live in ``medsteer_core.weights`` (tested without
ComfyUI); this module only finds files, builds ComfyUI objects and registers patches.
"""

from __future__ import annotations

import os

import comfy.lora
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models
import folder_paths
import torch
from comfy_api.latest import io

from ..medsteer_core import weights
from .common import inside, model_name_problem

CATEGORY = "medsteer/loaders"
_CHECKPOINT_FOLDERS = ("diffusion_models", "checkpoints")
_DTYPES = {"default": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _roots(folder_name: str) -> list[str]:
    try:
        return folder_paths.get_folder_paths(folder_name)
    except KeyError:  # a folder type this ComfyUI does not know
        return []


def checkpoint_choices() -> list[str]:
    """Weight files in ``diffusion_models`` / ``checkpoints`` and diffusers folders (``name/``)."""
    names: set[str] = set()
    for folder in _CHECKPOINT_FOLDERS:
        names.update(folder_paths.get_filename_list(folder))
        names.update(weights.list_diffusers_folders(_roots(folder)))
    return sorted(names)


CHECKPOINT_PLACE = "models/diffusion_models or models/checkpoints"
LORA_PLACE = "models/loras"


def resolve_checkpoint(name: str) -> str:
    """The full path of a ``checkpoint_choices()`` entry, looked up only inside the registered folders.

    Raises:
        CheckpointError: the name leaves the folders, or nothing of that name is there; the message
            names the value and where the weights belong (it never lists a folder's contents).
    """
    problem = model_name_problem(name, CHECKPOINT_PLACE)
    if problem is not None:
        raise weights.CheckpointError(f"PixArt checkpoint: {problem}")
    for folder in _CHECKPOINT_FOLDERS:
        if name.endswith("/"):
            for root in _roots(folder):
                path = inside(root, name)
                if path is not None and os.path.isdir(path):
                    return path
        else:
            path = folder_paths.get_full_path(folder, name)
            if path is not None:
                return path
    raise weights.CheckpointError(
        f"PixArt checkpoint {name!r} is not in {CHECKPOINT_PLACE} (nor in their extra_model_paths.yaml "
        "folders): put the PixArt-alpha .pth/.safetensors file there (e.g. PixArt-XL-2-512x512.pth), or a "
        "diffusers transformer folder (listed with a trailing '/'), then refresh the page (press R) and pick it"
    )


def lora_choices() -> list[str]:
    """Folders under ``models/loras`` that contain ``transformer_lora/`` or ``text_encoder_lora/``."""
    return weights.list_lora_folders(_roots("loras"))


def resolve_lora(name: str) -> str:
    """The full path of a ``lora_choices()`` folder, looked up only inside the registered ``loras`` folders."""
    problem = model_name_problem(name, LORA_PLACE)
    if problem is not None:
        raise weights.CheckpointError(f"MedSteer LoRA: {problem}")
    for root in _roots("loras"):
        path = inside(root, name)
        if path is not None and os.path.isdir(path):
            return path
    raise weights.CheckpointError(
        f"MedSteer LoRA folder {name!r} is not in {LORA_PLACE} (nor in its extra_model_paths.yaml folders): "
        "put the folder that holds transformer_lora/ and text_encoder_lora/ there (e.g. models/loras/medsteer/), "
        "then refresh the page (press R) and pick it"
    )


def _for_clients(error: weights.CheckpointError, folder_names: tuple[str, ...]) -> weights.CheckpointError:
    """``error`` with each registered model folder's path replaced by ``models/<kind>``: messages reach
    every client of a shared server, which need not learn where the server keeps its files (issue 12, F1)."""
    message = str(error)
    roots = {os.path.abspath(root): f"models/{kind}" for kind in folder_names for root in _roots(kind)}
    for root in sorted(roots, key=len, reverse=True):
        message = message.replace(root, roots[root])
    return weights.CheckpointError(message)


def _queue_time_check(resolve, name) -> bool | str:
    """What a V3 ``validate_inputs`` returns: True, or the message ComfyUI shows at queue time.

    ComfyUI 0.3.64 does not check V3 combo values against their options, so without this a missing
    file is only found when the graph runs, one node at a time. A linked (not widget) value arrives
    as None at validation and is checked when the node runs.
    """
    if name is None:
        return True
    try:
        resolve(name)
    except weights.CheckpointError as error:
        return str(error)
    return True


def build_pixart_alpha(state_dict: dict, geometry: weights.PixArtGeometry, dtype: torch.dtype | None = None):
    """A ComfyUI MODEL of PixArt-alpha (SD1.5 latent format) from an original-layout state dict.

    ``state_dict`` is consumed (its tensors move into the model).
    """
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    model_config = comfy.supported_models.PixArtAlpha(geometry.comfy_unet_config())
    if dtype is None:
        params = sum(t.numel() for t in state_dict.values())
        weight_dtype = next(iter(state_dict.values())).dtype
        dtype = comfy.model_management.unet_dtype(
            model_params=params, supported_dtypes=model_config.supported_inference_dtypes, weight_dtype=weight_dtype
        )
    manual_cast = comfy.model_management.unet_manual_cast(dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(dtype, manual_cast)
    model = model_config.get_model(state_dict, "", device=offload_device)
    weights.check_state_dict_fits(state_dict, model.diffusion_model.state_dict())
    model.load_model_weights(state_dict, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


class LoadPixArtAlphaCheckpoint(io.ComfyNode):
    """Load PixArt-XL-2 (original or diffusers) as PixArt-alpha, whatever ComfyUI's detection says."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MedSteerLoadPixArtAlpha",
            display_name="MedSteer Load PixArt-alpha Checkpoint",
            category=CATEGORY,
            description=(
                "Loads a PixArt-alpha transformer (the paper's PixArt-XL-2-512x512, or -1024-MS) from an "
                "original .pth/.safetensors or a diffusers transformer folder, as PixArt-alpha with the "
                "SD1.5-scale latent format. ComfyUI's own loaders type the 512x512 model (it has no size / "
                "aspect embedders) as PixArt-Sigma, whose latent format is SDXL's: decoded images then come "
                "out wrong. Load T5-XXL with CLIPLoader (type pixart) and the SD1.5/PixArt VAE separately."
            ),
            inputs=[
                io.Combo.Input(
                    "ckpt_name",
                    options=checkpoint_choices(),
                    tooltip=(
                        "A file in models/diffusion_models or models/checkpoints (original keys "
                        "blocks.N.attn.qkv, or diffusers keys), or a diffusers folder (shown with a trailing "
                        "'/': config.json + diffusion_pytorch_model*.safetensors, or a pipeline folder's "
                        "transformer/)."
                    ),
                ),
                io.Combo.Input(
                    "weight_dtype",
                    options=list(_DTYPES),
                    default="default",
                    tooltip="Precision of the weights: 'default' lets ComfyUI pick for your device (fp32 on CPU).",
                ),
            ],
            outputs=[
                io.Model.Output(
                    display_name="model",
                    tooltip="The PixArt-alpha diffusion model (SD1.5 latent scale), ready for KSampler and MedSteer.",
                )
            ],
        )

    @classmethod
    def validate_inputs(cls, ckpt_name: str | None = None) -> bool | str:
        return _queue_time_check(resolve_checkpoint, ckpt_name)

    @classmethod
    def execute(cls, ckpt_name: str, weight_dtype: str) -> io.NodeOutput:
        if weight_dtype not in _DTYPES:
            raise ValueError(f"weight_dtype {weight_dtype!r} is not one of {list(_DTYPES)}")
        try:
            state_dict, geometry = weights.load_pixart_checkpoint(resolve_checkpoint(ckpt_name))
        except weights.CheckpointError as error:
            raise _for_clients(error, _CHECKPOINT_FOLDERS) from None
        if geometry.model_max_length == 300:
            raise weights.CheckpointError(
                f"{ckpt_name!r} has a 300-token caption embedding: it is PixArt-Sigma, not PixArt-alpha. "
                "Load it with ComfyUI's Load Diffusion Model node (which gives it the SDXL latent format it needs)"
            )
        return io.NodeOutput(build_pixart_alpha(state_dict, geometry, _DTYPES[weight_dtype]))


def _add_lora_patches(owner, patches: list[weights.LoraPatch], strength: float):
    """Clone ``owner`` (a ModelPatcher or CLIP) and register ``patches`` as ComfyUI LoRA weights.

    ComfyUI applies ``W += strength * (alpha / rank) * up @ down``; alpha is set to
    ``scale * rank`` so that its factor is exactly the adapter's ``lora_alpha / r``.
    """
    lora_sd: dict[str, torch.Tensor] = {}
    to_load: dict[str, object] = {}
    for i, patch in enumerate(patches):
        name = f"medsteer_peft.{i}"
        lora_sd[f"{name}.lora_up.weight"] = patch.module.up
        lora_sd[f"{name}.lora_down.weight"] = patch.module.down
        lora_sd[f"{name}.alpha"] = torch.tensor(patch.scale * patch.module.rank, dtype=torch.float64)
        to_load[name] = patch.target if patch.offset is None else (patch.target, patch.offset)
    loaded = comfy.lora.load_lora(lora_sd, to_load, log_missing=False)
    clone = owner.clone()
    applied = set(clone.add_patches(loaded, strength))
    skipped = [k for k in loaded if k not in applied]
    if len(loaded) != len(patches) or skipped:
        raise weights.CheckpointError(f"ComfyUI did not accept the LoRA patches for {skipped[:5] or 'some modules'}")
    return clone


class LoadPeftLora(io.ComfyNode):
    """Apply the authors' PEFT LoRA (transformer + T5) with PEFT's own scale."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MedSteerLoadPeftLora",
            display_name="MedSteer Load PEFT LoRA",
            category=CATEGORY,
            description=(
                "Applies a LoRA saved with PEFT's save_pretrained in the MedSteer layout: a folder with "
                "transformer_lora/ (for the PixArt transformer) and text_encoder_lora/ (for the T5 text "
                "encoder), each holding adapter_config.json and adapter_model.safetensors. The scale is "
                "lora_alpha / r from adapter_config.json (PEFT's files carry no alpha, so ComfyUI's own LoRA "
                "loader would use 1, and it does not map PEFT T5 keys at all). Every module is checked "
                "against the model before anything is patched."
            ),
            inputs=[
                io.Model.Input(
                    "model", tooltip="The PixArt model to adapt (e.g. from MedSteer Load PixArt-alpha Checkpoint)."
                ),
                io.Clip.Input("clip", tooltip="The T5-XXL text encoder to adapt (CLIPLoader, type pixart)."),
                io.Combo.Input(
                    "lora_name",
                    options=lora_choices(),
                    tooltip="A folder under models/loras that holds transformer_lora/ and text_encoder_lora/.",
                ),
                io.Float.Input(
                    "strength_model",
                    default=1.0,
                    min=-10.0,
                    max=10.0,
                    step=0.01,
                    tooltip="Multiplier on the transformer adapter (1 = as trained; 0 = leave the model unchanged and skip transformer_lora/).",
                ),
                io.Float.Input(
                    "strength_clip",
                    default=1.0,
                    min=-10.0,
                    max=10.0,
                    step=0.01,
                    tooltip="Multiplier on the T5 adapter (1 = as trained; 0 = leave the text encoder unchanged and skip text_encoder_lora/).",
                ),
            ],
            outputs=[
                io.Model.Output(
                    display_name="model", tooltip="A clone of the model with the transformer LoRA applied."
                ),
                io.Clip.Output(display_name="clip", tooltip="A clone of the text encoder with the T5 LoRA applied."),
            ],
        )

    @classmethod
    def validate_inputs(cls, lora_name: str | None = None) -> bool | str:
        return _queue_time_check(resolve_lora, lora_name)

    @classmethod
    def execute(cls, model, clip, lora_name: str, strength_model: float, strength_clip: float) -> io.NodeOutput:
        try:
            lora = weights.load_medsteer_lora(
                resolve_lora(lora_name), transformer=strength_model != 0, text_encoder=strength_clip != 0
            )
            new_model, new_clip = model, clip
            if lora.transformer is not None:
                shapes = model.model.state_dict()
                patches = weights.transformer_lora_patches(lora.transformer, shapes, prefix="diffusion_model.")
                new_model = _add_lora_patches(model, patches, strength_model)
            if lora.text_encoder is not None:
                patches = weights.t5_lora_patches(lora.text_encoder, clip.cond_stage_model.state_dict())
                new_clip = _add_lora_patches(clip, patches, strength_clip)
        except weights.CheckpointError as error:
            raise _for_clients(error, ("loras",)) from None
        return io.NodeOutput(new_model, new_clip)


NODES: list[type[io.ComfyNode]] = [LoadPixArtAlphaCheckpoint, LoadPeftLora]
