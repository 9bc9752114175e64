"""Tiny PixArt / T5 models and PEFT adapters written to disk, for the checkpoint and LoRA tests.

Real key names, tiny sizes: PixArt with 72-wide heads (PixArt's own head width, so head counts
are inferred as for PixArt-XL-2) and 32 caption channels; T5 with T5-XXL's vocabulary (ComfyUI's
PixArt tokenizer emits its ids) and a 32-wide model. Used by tests/test_checkpoints.py (CI) and
tests/comfyui/test_loaders.py (real ComfyUI).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from tests.conftest import CAPTION_CHANNELS, make_transformer  # noqa: F401 (CAPTION_CHANNELS: re-exported for the loader tests)

HEAD_DIM = 72  # PixArt-XL-2: 1152 = 16 heads x 72

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

# the tiny T5 in both libraries' words
T5_TINY = {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4, "vocab_size": 32128}
COMFY_T5_TINY_CONFIG = {
    "d_ff": T5_TINY["d_ff"],
    "d_kv": T5_TINY["d_kv"],
    "d_model": T5_TINY["d_model"],
    "dense_act_fn": "gelu_pytorch_tanh",
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-06,
    "model_type": "t5",
    "num_heads": T5_TINY["num_heads"],
    "num_layers": T5_TINY["num_layers"],
    "relative_attention_num_buckets": 32,
    "vocab_size": T5_TINY["vocab_size"],
}


def tiny_pixart(heads: int = 2, layers: int = 2, micro_condition: bool = False, seed: int = 0):
    """A random diffusers ``PixArtTransformer2DModel`` (hidden ``72 * heads``), every tensor non-zero."""
    model = make_transformer(
        layers,
        heads,
        HEAD_DIM,
        seed,
        sample_size=128 if micro_condition else 64,
        use_additional_conditions=micro_condition,
    )
    with torch.no_grad():  # diffusers zero-initialises some layers; a zero tensor would hide a mapping error
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def tiny_t5(seed: int = 0):
    """A random transformers ``T5EncoderModel`` with T5-XXL's vocabulary and gated-GELU MLP."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, **T5_TINY)
    return T5EncoderModel(config).eval()


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
