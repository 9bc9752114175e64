"""Files made from the tiny models of ``tests/tiny_models.py``, for the checkpoint, LoRA and pipeline tests.

PEFT LoRA adapters with real key names (``save_adapter``, ``make_medsteer_lora``: the authors'
``transformer_lora/`` + ``text_encoder_lora/`` layout; ``save_tiny_lora``: the same for the tiny
PixArt pipeline), PEFT's own merge as the reference (``merged_state_dict``), PixArt-XL-2's published
config, and the tiny SD pipeline as one original-layout (LDM) single-file checkpoint
(``save_single_file``). Used by tests/test_weights_*.py, tests/test_pipeline.py, tests/test_cli.py,
tests/test_headless_unet.py (CI) and tests/comfyui/test_loaders.py (real ComfyUI).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

# PixArt-alpha/PixArt-XL-2-512x512, transformer/config.json (published as a Transformer2DModel).
PIXART_XL_2_512_CONFIG = {
    "_class_name": "Transformer2DModel",
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "attention_head_dim": 72,
    "caption_channels": 4096,
    "cross_attention_dim": 1152,
    "in_channels": 4,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "norm_type": "ada_norm_single",
    "num_attention_heads": 16,
    "num_embeds_ada_norm": 1000,
    "num_layers": 28,
    "out_channels": 8,
    "patch_size": 2,
    "sample_size": 64,
}


def save_adapter(model, folder: Path, r: int, alpha: float, targets: list[str], seed: int = 1, **config):
    """Wrap a copy of ``model`` in a random (non-zero) PEFT LoRA and ``save_pretrained`` it.

    Returns:
        The PEFT model (``merge_and_unload()`` gives the reference merged weights).
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lora_config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **config)
    peft_model = get_peft_model(copy.deepcopy(model), lora_config)
    peft_model.save_pretrained(str(folder))
    return peft_model


PIXART_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_out", "pos_embed.proj"]
T5_TARGETS = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]


def make_medsteer_lora(
    folder: Path, transformer, text_encoder, *, r: int = 4, alpha: float = 8.0, t5_r: int = 2, t5_alpha: float = 6.0
):
    """Write ``folder/transformer_lora`` and ``folder/text_encoder_lora`` (the authors' layout).

    Returns:
        ``(peft_transformer, peft_text_encoder)`` for reference merges.
    """
    folder.mkdir(parents=True, exist_ok=True)
    pt = save_adapter(transformer, folder / "transformer_lora", r, alpha, PIXART_TARGETS)
    pe = save_adapter(text_encoder, folder / "text_encoder_lora", t5_r, t5_alpha, T5_TARGETS, seed=2)
    return pt, pe


def merged_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """PEFT's own merge of the adapter into the base weights (W + lora_alpha / r * B @ A)."""
    return {k: v.detach().clone() for k, v in copy.deepcopy(peft_model).merge_and_unload().state_dict().items()}


def save_tiny_lora(folder: Path, model_folder: Path, r: int = 4, alpha: float = 8.0, seed: int = 1) -> Path:
    """The authors' LoRA layout for the tiny pipeline: ``transformer_lora/`` (attention q, k, v, out)
    and ``text_encoder_lora/`` (T5 q, k, v, o), PEFT adapters with random non-zero weights."""
    from diffusers import PixArtTransformer2DModel
    from peft import LoraConfig, get_peft_model
    from transformers import T5EncoderModel

    torch.manual_seed(seed)
    parts = {
        "transformer_lora": (
            PixArtTransformer2DModel.from_pretrained(str(model_folder / "transformer")),
            ["to_q", "to_k", "to_v", "to_out.0"],
        ),
        "text_encoder_lora": (T5EncoderModel.from_pretrained(str(model_folder / "text_encoder")), ["q", "k", "v", "o"]),
    }
    for sub, (base, targets) in parts.items():
        peft_model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets))
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn_like(param) * 0.3)
        peft_model.save_pretrained(str(folder / sub))
    return Path(folder)


# ---------------------------------------------------------------------------- single-file checkpoints
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3"}
_RESNET.update({"time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"})
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(rest: str, table: dict[str, str]) -> str:
    for new, old in table.items():
        if rest.startswith(new + "."):
            return old + rest[len(new) :]
    return rest


def _ldm_unet_key(key: str, per_level: int, attention_up: set[int]) -> str:
    """The original (LDM) name of a diffusers SD UNet weight: the layout single-file checkpoints use."""
    flat = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2"}
    flat.update({"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"})
    parts = key.split(".")
    if parts[0] in ("down_blocks", "up_blocks"):
        block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if parts[0] == "down_blocks":
            if kind == "downsamplers":
                return f"input_blocks.{(block + 1) * per_level}.0.op.{rest.removeprefix('conv.')}"
            slot = block * per_level + index + 1
            return f"input_blocks.{slot}.{0 if kind == 'resnets' else 1}.{_rename(rest, _RESNET) if kind == 'resnets' else rest}"
        if kind == "upsamplers":
            return f"output_blocks.{block * per_level + per_level - 1}.{2 if block in attention_up else 1}.{rest}"
        slot = block * per_level + index
        return f"output_blocks.{slot}.{0 if kind == 'resnets' else 1}.{_rename(rest, _RESNET) if kind == 'resnets' else rest}"
    if parts[0] == "mid_block":
        kind, index, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        if kind == "resnets":
            return f"middle_block.{2 * index}.{_rename(rest, _RESNET)}"
        return f"middle_block.1.{rest}"
    return _rename(key, flat)


def _ldm_vae_key(key: str, levels: int) -> str:
    """The original name of a diffusers ``AutoencoderKL`` weight."""
    flat = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
    parts = key.split(".")
    side = parts[0]
    if len(parts) > 2 and parts[1] in ("down_blocks", "up_blocks"):
        level = int(parts[2]) if side == "encoder" else levels - 1 - int(parts[2])
        name = "down" if side == "encoder" else "up"
        kind, rest = parts[3], ".".join(parts[4:])
        if kind in ("downsamplers", "upsamplers"):
            return (
                f"{side}.{name}.{level}.{'downsample' if side == 'encoder' else 'upsample'}.{rest.removeprefix('0.')}"
            )
        rest = rest.replace("conv_shortcut", "nin_shortcut")
        return f"{side}.{name}.{level}.block.{rest}"
    if len(parts) > 2 and parts[1] == "mid_block":
        kind, index, rest = parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "resnets":
            return f"{side}.mid.block_{index + 1}.{rest}"
        return f"{side}.mid.attn_1.{_rename(rest, _VAE_ATTENTION)}"
    return _rename(key, flat)


def save_single_file(pipeline: Path, file: Path) -> Path:
    """The tiny SD pipeline folder as one original-layout checkpoint (``model.diffusion_model.``,
    ``first_stage_model.``, ``cond_stage_model.transformer.text_model.``), as single-file SD 1.x
    checkpoints are shipped; attention projections of the VAE as 1x1 convolutions, as there."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(str(pipeline / "unet"))
    vae = AutoencoderKL.from_pretrained(str(pipeline / "vae"))
    text = CLIPTextModel.from_pretrained(str(pipeline / "text_encoder"))
    per_level = unet.config.layers_per_block + 1
    attention_up = {i for i, kind in enumerate(unet.config.up_block_types) if kind.startswith("CrossAttn")}
    state = {}
    for key, value in unet.state_dict().items():
        state["model.diffusion_model." + _ldm_unet_key(key, per_level, attention_up)] = value
    levels = len(vae.config.block_out_channels)
    for key, value in vae.state_dict().items():
        name = _ldm_vae_key(key, levels)
        if ".mid.attn_1." in name and value.ndim == 2:
            value = value[:, :, None, None]
        state["first_stage_model." + name] = value
    for key, value in text.state_dict().items():
        state["cond_stage_model.transformer.text_model." + key] = value
    save_file({k: v.contiguous() for k, v in state.items()}, str(file))
    return Path(file)
