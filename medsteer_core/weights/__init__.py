"""Model weights without ComfyUI: PixArt-alpha checkpoints and the MedSteer PEFT LoRA.

Two jobs, both pure data handling (the ComfyUI loader nodes and the headless route call them):

1. **PixArt checkpoints** (``pixart_layout``, ``pixart``, ``pixart_files``). PixArt weights come in
   two key layouts: the original one of the PixArt-alpha code (``blocks.3.attn.qkv.weight``;
   ComfyUI's ``PixArtMS`` uses it too) and diffusers' (``transformer_blocks.3.attn1.to_q.weight``;
   q, k and v separate). ``diffusers_to_pixart`` and ``pixart_to_diffusers`` convert between them;
   ``pixart_geometry`` reads the model's shape from the weights, and ``expected_pixart_shapes`` says
   which tensors a model of that shape has. PixArt-XL-2-512x512 has no size / aspect-ratio
   embedders; ComfyUI's own detection therefore types it as PixArt-Sigma, whose latent format is
   SDXL's. ``PixArtGeometry.comfy_unet_config`` always says ``pixart_alpha`` (SD1.5 latent scale),
   with or without micro-conditioning.

2. **PEFT LoRA** (``peft_patterns``, ``peft_lora``). The MedSteer LoRA is two PEFT adapters saved
   with ``save_pretrained`` (``transformer_lora/`` and ``text_encoder_lora/``, each
   ``adapter_config.json`` + ``adapter_model.safetensors``). PEFT files carry no alpha: the scale
   ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with rsLoRA, with per-module ``rank_pattern`` /
   ``alpha_pattern``) lives in the config. ``load_peft_adapter`` reads one adapter;
   ``transformer_lora_patches`` and ``t5_lora_patches`` map its modules onto a model's weight keys
   (diffusers PixArt modules onto the original layout, including the slices of the fused ``qkv`` /
   ``kv_linear`` weights; transformers T5 modules onto a T5 encoder under any prefix) and check
   every shape.

``checks`` holds the error type and the bounds both jobs check a file's numbers against.

Example:
    >>> sd, geometry = load_pixart_checkpoint("PixArt-XL-2-512x512.pth")       # doctest: +SKIP
    >>> geometry.comfy_unet_config()["image_model"]                            # doctest: +SKIP
    'pixart_alpha'
    >>> lora = load_medsteer_lora("medsteer_lora/")                            # doctest: +SKIP
    >>> patches = transformer_lora_patches(lora.transformer, model_shapes)     # doctest: +SKIP
"""

from .bounds import MAX_DEPTH, MAX_LORA_SCALE, CheckpointError
from .peft_lora import (
    LoraModule,
    LoraPatch,
    MedSteerLora,
    PeftAdapter,
    PeftLoraConfig,
    find_t5_prefix,
    list_lora_folders,
    load_medsteer_lora,
    load_peft_adapter,
    read_peft_config,
    t5_lora_patches,
    transformer_lora_patches,
)
from .peft_patterns import module_matches, pattern_problem
from .pixart import PixArtGeometry, check_state_dict_fits, expected_pixart_shapes, pixart_geometry
from .pixart_files import (
    check_config_matches_geometry,
    check_diffusers_transformer,
    list_diffusers_folders,
    load_diffusers_transformer,
    load_pixart_checkpoint,
    load_state_dict_file,
    looks_like_local_path,
    to_pixart_layout,
)
from .pixart_layout import diffusers_to_pixart, is_diffusers_layout, pixart_to_diffusers

__all__ = [
    "MAX_DEPTH",
    "MAX_LORA_SCALE",
    "CheckpointError",
    "LoraModule",
    "LoraPatch",
    "MedSteerLora",
    "PeftAdapter",
    "PeftLoraConfig",
    "PixArtGeometry",
    "check_config_matches_geometry",
    "check_diffusers_transformer",
    "check_state_dict_fits",
    "diffusers_to_pixart",
    "expected_pixart_shapes",
    "find_t5_prefix",
    "is_diffusers_layout",
    "list_diffusers_folders",
    "list_lora_folders",
    "load_diffusers_transformer",
    "load_medsteer_lora",
    "load_peft_adapter",
    "load_pixart_checkpoint",
    "load_state_dict_file",
    "looks_like_local_path",
    "module_matches",
    "pattern_problem",
    "pixart_geometry",
    "pixart_to_diffusers",
    "read_peft_config",
    "t5_lora_patches",
    "to_pixart_layout",
    "transformer_lora_patches",
]
