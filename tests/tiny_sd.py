"""Tiny but complete diffusers Stable Diffusion pipelines, built offline for tests (issue 10).

``save_tiny_sd(folder, "sd")`` writes a ``StableDiffusionPipeline`` folder: the SD1-shaped tiny UNet
of ``tests.tiny_unet`` (11 sites, widths 8/16), a 2-layer ``CLIPTextModel``, a character-level
``CLIPTokenizer`` (its ``vocab.json`` and an empty ``merges.txt`` written here, so every word is
spelled out letter by letter, 77 tokens as SD's), a 2-block ``AutoencoderKL`` (16 x 16 images from
8 x 8 latents) and a DDIM scheduler. ``"sd-v"`` is the same with a v-prediction scheduler (SD 2.x's
768-v models). ``"sdxl"`` is a ``StableDiffusionXLPipeline``: the SDXL-shaped tiny UNet (17 sites,
the added text-time embedding), two text encoders (the second with a projection: the pooled
embedding) and an Euler scheduler. ``save_bare_unet`` writes a UNet folder as MINIM ships them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.tiny_unet import TEXT_EMBEDS, make_unet

TEXT_WIDTH = 16
CHARACTERS = list("abcdefghijklmnopqrstuvwxyz0123456789-,.'")


def make_tokenizer(folder: Path):
    """A character-level ``CLIPTokenizer`` whose vocabulary files are written to ``folder``."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for token in ["<|startoftext|>", "<|endoftext|>", *CHARACTERS, *(c + "</w>" for c in CHARACTERS)]:
        vocab.setdefault(token, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def make_text_encoder(projection: bool = False, width: int = TEXT_WIDTH, layers: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=2 + 2 * len(CHARACTERS),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=TEXT_EMBEDS,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ).eval()


def make_sd_pipeline(kind: str = "sd", seed: int = 0, scratch: Path | None = None):
    """The tiny pipeline of ``kind`` (``"sd"``, ``"sd-v"`` or ``"sdxl"``); ``scratch`` holds the
    tokenizer's vocabulary files while it is built."""
    from diffusers import (
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    scratch = Path(scratch) if scratch is not None else Path(__import__("tempfile").mkdtemp())
    torch.manual_seed(seed)
    if kind == "sdxl":
        return StableDiffusionXLPipeline(
            vae=make_vae(),
            text_encoder=make_text_encoder(),
            text_encoder_2=make_text_encoder(projection=True),
            tokenizer=make_tokenizer(scratch / "tokenizer"),
            tokenizer_2=make_tokenizer(scratch / "tokenizer_2"),
            unet=make_unet("sdxl", seed=seed, context=2 * TEXT_WIDTH),
            scheduler=EulerDiscreteScheduler(),
        )
    if kind not in ("sd", "sd-v"):
        raise ValueError(f"kind must be 'sd', 'sd-v' or 'sdxl', got {kind!r}")
    prediction = "v_prediction" if kind == "sd-v" else "epsilon"
    return StableDiffusionPipeline(
        vae=make_vae(),
        text_encoder=make_text_encoder(),
        tokenizer=make_tokenizer(scratch / "tokenizer"),
        unet=make_unet("sd1", seed=seed, context=TEXT_WIDTH),
        scheduler=DDIMScheduler(prediction_type=prediction, steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_sd(folder: Path, kind: str = "sd", seed: int = 0) -> Path:
    """Build the tiny pipeline and ``save_pretrained`` it to ``folder``."""
    folder = Path(folder)
    make_sd_pipeline(kind, seed, scratch=folder.with_name(folder.name + "-vocab")).save_pretrained(str(folder))
    return folder


def save_bare_unet(folder: Path, seed: int = 1, kind: str = "sd1") -> Path:
    """A bare diffusers UNet folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) that
    fits the tiny SD pipeline, with other weights: MINIM's ``unets/<id>/unet``."""
    context = TEXT_WIDTH if kind == "sd1" else 2 * TEXT_WIDTH
    make_unet(kind, seed=seed, context=context).save_pretrained(str(folder))
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


def make_family_pipeline(family: str, seed: int = 0, scratch: Path | None = None):
    """A pipeline with a released family's cross-attention geometry and nothing else of its size:
    ``"sd1"`` (context 768, 320 channels, no added embedding) or ``"sdxl"`` (context 768 + 1280,
    the text-time embedding): one UNet level, one transformer block, 1-layer text encoders."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    scratch = Path(scratch) if scratch is not None else Path(__import__("tempfile").mkdtemp())
    torch.manual_seed(seed)
    geometry = dict(
        block_out_channels=(320,),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",),
        attention_head_dim=8,
        norm_num_groups=32,
        sample_size=4,
    )

    def encoder(width: int, projection: bool = False):
        return make_text_encoder(projection, width, layers=1)

    common = dict(vae=make_vae(), scheduler=DDIMScheduler(steps_offset=1, clip_sample=False))
    if family == "sd1":
        return StableDiffusionPipeline(
            text_encoder=encoder(768),
            tokenizer=make_tokenizer(scratch / "tokenizer"),
            unet=UNet2DConditionModel(cross_attention_dim=768, **geometry).eval(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            **common,
        )
    if family == "sdxl":
        unet = UNet2DConditionModel(
            cross_attention_dim=768 + 1280,
            addition_embed_type="text_time",
            addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=TEXT_EMBEDS + 6 * 4,
            **geometry,
        ).eval()
        return StableDiffusionXLPipeline(
            text_encoder=encoder(768),
            text_encoder_2=encoder(1280, projection=True),
            tokenizer=make_tokenizer(scratch / "tokenizer"),
            tokenizer_2=make_tokenizer(scratch / "tokenizer_2"),
            unet=unet,
            **common,
        )
    raise ValueError(f"family must be 'sd1' or 'sdxl', got {family!r}")
