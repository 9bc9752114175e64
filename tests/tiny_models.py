"""Every tiny random-weight model the tests build, in one place (diffusers and transformers classes).

Each builder keeps its configuration and seed, so every test's numbers depend on this module alone:

- PixArt: ``make_transformer`` (the core tests' 4-block PixArt, hidden ``heads * head_dim``,
  ``CAPTION_CHANNELS`` caption channels) and ``tiny_pixart`` (the checkpoint tests' PixArt with
  72-wide heads, so head counts are inferred as for PixArt-XL-2, every tensor non-zero).
- Text: ``tiny_t5`` (T5-XXL's vocabulary, as ComfyUI's PixArt tokenizer emits its ids; or the
  pipeline's word-level vocabulary), ``make_t5_tokenizer`` (word level), ``make_clip_text_encoder``
  and ``make_clip_tokenizer`` (character level, 77 tokens as SD's).
- ``make_vae``: the one 2-block ``AutoencoderKL`` (16 x 16 images from 8 x 8 latents).
- SD UNets: ``make_unet("sd1")`` is SD1.x-shaped (cross-attention in the first two of three levels,
  one transformer block per attention, 2 resnets per down block, like SD's 3-per-up-block output
  side); ``make_unet("sdxl")`` is SDXL-shaped (no attention at level 0, 1 then 2 transformer blocks
  per attention, the added text-time embedding). ``unet_kwargs`` gives a call's extra keywords
  (SDXL's ``added_cond_kwargs``). ``full_unet(family)`` builds the released geometry on the meta
  device (instant, no memory) for site counts, names and widths.
- Pipelines: ``make_pixart_pipeline`` / ``save_tiny_pixart`` (a real ``PixArtAlphaPipeline`` or
  ``PixArtSigmaPipeline`` folder), ``make_sd_pipeline`` / ``save_tiny_sd`` (``"sd"``: a
  ``StableDiffusionPipeline`` with the SD1-shaped UNet (11 sites, widths 8/16) and a DDIM scheduler;
  ``"sd-v"``: the same with v-prediction, as SD 2.x's 768-v models; ``"sdxl"``: a
  ``StableDiffusionXLPipeline``, the SDXL-shaped UNet (17 sites), two text encoders, the second with
  a projection, and an Euler scheduler), ``save_bare_unet`` (a UNet folder as MINIM ships them) and
  ``make_family_pipeline`` (a released family's cross-attention geometry and nothing else of its size).

Files made from these models (PEFT adapters, single-file checkpoints) are in
``tests/checkpoint_factories.py``; the ComfyUI-side models (ComfyUI's own classes) are built by the
test node packs in ``tests/comfyui/``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

# ---------------------------------------------------------------------------------------- PixArt
CAPTION_CHANNELS = 32  # the tiny PixArts' caption width (= the pipeline's T5 width)
HEAD_DIM = 72  # PixArt-XL-2: 1152 = 16 heads x 72


def make_transformer(
    num_layers: int = 4,
    heads: int = 2,
    head_dim: int = 8,
    seed: int | None = 0,
    *,
    sample_size: int = 8,
    use_additional_conditions: bool | None = None,
):
    """A random-weight diffusers ``PixArtTransformer2DModel`` (hidden ``heads * head_dim``,
    ``CAPTION_CHANNELS`` caption channels), the one tiny PixArt every test builds.

    Args:
        seed: seeds torch's generator first; ``None`` draws from its current state (a pipeline
            seeds once for all its parts).
    """
    from diffusers import PixArtTransformer2DModel

    if seed is not None:
        torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        sample_size=sample_size,
        num_layers=num_layers,
        patch_size=2,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        caption_channels=CAPTION_CHANNELS,
        in_channels=4,
        out_channels=8,
        cross_attention_dim=heads * head_dim,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        use_additional_conditions=use_additional_conditions,
    )
    return model.eval()


def make_embeds(tokens: int, seed: int) -> torch.Tensor:
    """Random caption embeddings ``[1, tokens, CAPTION_CHANNELS]``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, tokens, CAPTION_CHANNELS, generator=g)


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


# ------------------------------------------------------------------------------------------ text
#: The tiny T5's size; its vocabulary is T5-XXL's unless a pipeline's tokenizer says otherwise.
T5_TINY = {"d_model": CAPTION_CHANNELS, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4, "vocab_size": 32128}
#: The PixArt pipeline's word-level vocabulary (after ``T5_SPECIALS``).
WORDS = [
    "an",
    "endoscopic",
    "image",
    "of",
    "dyed",
    "lifted",
    "polyps",
    "polyp",
    "normal",
    "cecum",
    "ulcerative",
    "colitis",
    "esophagitis",
    "z-line",
    "a",
    "colonoscopy",
    "showing",
    "with",
    "the",
]
T5_SPECIALS = ["<pad>", "</s>", "<unk>"]


def tiny_t5(seed: int | None = 0, *, vocab_size: int = T5_TINY["vocab_size"], gated: bool = True, buckets: int = 32):
    """A random transformers ``T5EncoderModel`` of ``T5_TINY``'s size: by default T5-XXL's
    vocabulary and gated-GELU MLP (the checkpoint tests); the pipeline's is ReLU with its own words.

    Args:
        seed: seeds torch's generator first; ``None`` draws from its current state.
    """
    from transformers import T5Config, T5EncoderModel

    if seed is not None:
        torch.manual_seed(seed)
    config = T5Config(
        feed_forward_proj="gated-gelu" if gated else "relu",
        relative_attention_num_buckets=buckets,
        **{**T5_TINY, "vocab_size": vocab_size},
    )
    return T5EncoderModel(config).eval()


def make_t5_tokenizer():
    """A word-level tokenizer over ``WORDS`` (``</s>`` appended), wrapped in ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(T5_SPECIALS + WORDS)}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


CLIP_WIDTH = 16  # the tiny SD pipelines' text width
CHARACTERS = list("abcdefghijklmnopqrstuvwxyz0123456789-,.'")


def make_clip_tokenizer(folder: Path):
    """A character-level ``CLIPTokenizer`` (its ``vocab.json`` and an empty ``merges.txt`` written to
    ``folder``, so every word is spelled out letter by letter)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for token in ["<|startoftext|>", "<|endoftext|>", *CHARACTERS, *(c + "</w>" for c in CHARACTERS)]:
        vocab.setdefault(token, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def make_clip_text_encoder(projection: bool = False, width: int = CLIP_WIDTH, layers: int = 2):
    """A random ``CLIPTextModel`` (``projection``: ``CLIPTextModelWithProjection``, SDXL's second)."""
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


# ------------------------------------------------------------------------------------------- VAE
def make_vae():
    """The tiny 2-block ``AutoencoderKL``: 16 x 16 images from 8 x 8 x 4 latents."""
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


# ---------------------------------------------------------------------------------------- UNets
CONTEXT = 12  # the tiny UNets' text-embedding width
TIME_IDS = 6  # SDXL's six size/crop numbers
TEXT_EMBEDS = 8  # the tiny SDXL's pooled text embedding width


def make_unet(kind: str = "sd1", seed: int = 0, context: int = CONTEXT):
    """A random-weight ``UNet2DConditionModel``: ``kind`` ``"sd1"`` (11 sites, widths 8/16) or
    ``"sdxl"`` (17 sites, widths 16/24, two transformer blocks per attention at its lowest level)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    common = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        norm_num_groups=4,
        cross_attention_dim=context,
        attention_head_dim=4,
    )
    if kind == "sd1":
        model = UNet2DConditionModel(
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(8, 16, 16),
            **common,
        )
    elif kind == "sdxl":
        model = UNet2DConditionModel(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(8, 16, 24),
            transformer_layers_per_block=(1, 1, 2),
            addition_embed_type="text_time",
            addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=TEXT_EMBEDS + TIME_IDS * 4,
            use_linear_projection=True,
            **common,
        )
    else:
        raise ValueError(f"kind must be 'sd1' or 'sdxl', got {kind!r}")
    return model.eval()


def unet_kwargs(unet, batch: int) -> dict:
    """The keywords a call needs besides latents, timesteps and context (SDXL: ``added_cond_kwargs``)."""
    if getattr(unet.config, "addition_embed_type", None) != "text_time":
        return {}
    g = torch.Generator().manual_seed(1)
    return {
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, TEXT_EMBEDS, generator=g),
            "time_ids": torch.randn(batch, TIME_IDS, generator=g),
        }
    }


def full_unet(family: str):
    """The released architecture of ``family`` (``sd1``, ``sd2``, ``sdxl``, ``sdxl-refiner``) on ``meta``."""
    from diffusers import UNet2DConditionModel

    xl = dict(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        use_linear_projection=True,
    )
    configs = {
        "sd1": dict(cross_attention_dim=768),
        "sd2": dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
        "sdxl": dict(
            xl,
            block_out_channels=(320, 640, 1280),
            transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=2048,
            projection_class_embeddings_input_dim=2816,
            attention_head_dim=(5, 10, 20),
        ),
        "sdxl-refiner": dict(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            use_linear_projection=True,
            block_out_channels=(384, 768, 1536, 1536),
            transformer_layers_per_block=4,
            cross_attention_dim=1280,
            projection_class_embeddings_input_dim=2560,
            attention_head_dim=(6, 12, 24, 24),
        ),
    }
    with torch.device("meta"):
        return UNet2DConditionModel(**configs[family])


# ------------------------------------------------------------------------------------ pipelines
PIPELINE_LAYERS = 4  # blocks of the tiny PixArt pipeline's transformer


def make_pixart_pipeline(family: str = "alpha", seed: int = 0):
    """The tiny ``PixArtAlphaPipeline`` (``family="alpha"``) or ``PixArtSigmaPipeline``: a 4-block
    transformer, a 2-layer T5 over ``WORDS``, the tiny VAE and a DPM-Solver scheduler."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline

    torch.manual_seed(seed)  # one seed for all parts, drawn in this order
    tokenizer = make_t5_tokenizer()
    text_encoder = tiny_t5(None, vocab_size=len(T5_SPECIALS) + len(WORDS), gated=False, buckets=8)
    transformer = make_transformer(PIPELINE_LAYERS, 2, 8, None)
    cls = PixArtAlphaPipeline if family == "alpha" else PixArtSigmaPipeline
    return cls(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=make_vae(),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )


def save_tiny_pixart(folder: Path, family: str = "alpha", seed: int = 0) -> Path:
    """Build the tiny PixArt pipeline and ``save_pretrained`` it to ``folder``."""
    make_pixart_pipeline(family, seed).save_pretrained(str(folder))
    return Path(folder)


def make_sd_pipeline(kind: str = "sd", seed: int = 0, scratch: Path | None = None):
    """The tiny SD pipeline of ``kind`` (``"sd"``, ``"sd-v"`` or ``"sdxl"``); ``scratch`` holds the
    tokenizer's vocabulary files while it is built."""
    from diffusers import (
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    scratch = Path(scratch) if scratch is not None else Path(tempfile.mkdtemp())
    torch.manual_seed(seed)
    if kind == "sdxl":
        return StableDiffusionXLPipeline(
            vae=make_vae(),
            text_encoder=make_clip_text_encoder(),
            text_encoder_2=make_clip_text_encoder(projection=True),
            tokenizer=make_clip_tokenizer(scratch / "tokenizer"),
            tokenizer_2=make_clip_tokenizer(scratch / "tokenizer_2"),
            unet=make_unet("sdxl", seed=seed, context=2 * CLIP_WIDTH),
            scheduler=EulerDiscreteScheduler(),
        )
    if kind not in ("sd", "sd-v"):
        raise ValueError(f"kind must be 'sd', 'sd-v' or 'sdxl', got {kind!r}")
    prediction = "v_prediction" if kind == "sd-v" else "epsilon"
    return StableDiffusionPipeline(
        vae=make_vae(),
        text_encoder=make_clip_text_encoder(),
        tokenizer=make_clip_tokenizer(scratch / "tokenizer"),
        unet=make_unet("sd1", seed=seed, context=CLIP_WIDTH),
        scheduler=DDIMScheduler(prediction_type=prediction, steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_sd(folder: Path, kind: str = "sd", seed: int = 0) -> Path:
    """Build the tiny SD pipeline and ``save_pretrained`` it to ``folder``."""
    folder = Path(folder)
    make_sd_pipeline(kind, seed, scratch=folder.with_name(folder.name + "-vocab")).save_pretrained(str(folder))
    return folder


def save_bare_unet(folder: Path, seed: int = 1, kind: str = "sd1") -> Path:
    """A bare diffusers UNet folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) that
    fits the tiny SD pipeline, with other weights: MINIM's ``unets/<id>/unet``."""
    context = CLIP_WIDTH if kind == "sd1" else 2 * CLIP_WIDTH
    make_unet(kind, seed=seed, context=context).save_pretrained(str(folder))
    return Path(folder)


def make_family_pipeline(family: str, seed: int = 0, scratch: Path | None = None):
    """A pipeline with a released family's cross-attention geometry and nothing else of its size:
    ``"sd1"`` (context 768, 320 channels, no added embedding) or ``"sdxl"`` (context 768 + 1280,
    the text-time embedding): one UNet level, one transformer block, 1-layer text encoders."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    scratch = Path(scratch) if scratch is not None else Path(tempfile.mkdtemp())
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
        return make_clip_text_encoder(projection, width, layers=1)

    common = dict(vae=make_vae(), scheduler=DDIMScheduler(steps_offset=1, clip_sample=False))
    if family == "sd1":
        return StableDiffusionPipeline(
            text_encoder=encoder(768),
            tokenizer=make_clip_tokenizer(scratch / "tokenizer"),
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
            projection_class_embeddings_input_dim=TEXT_EMBEDS + TIME_IDS * 4,
            **geometry,
        ).eval()
        return StableDiffusionXLPipeline(
            text_encoder=encoder(768),
            text_encoder_2=encoder(1280, projection=True),
            tokenizer=make_clip_tokenizer(scratch / "tokenizer"),
            tokenizer_2=make_clip_tokenizer(scratch / "tokenizer_2"),
            unet=unet,
            **common,
        )
    raise ValueError(f"family must be 'sd1' or 'sdxl', got {family!r}")
