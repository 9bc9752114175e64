"""A tiny but complete diffusers PixArt pipeline and MedSteer LoRA, built offline for tests.

``save_tiny_pixart`` writes a real ``PixArtAlphaPipeline`` (or ``PixArtSigmaPipeline``) folder:
a 4-block ``PixArtTransformer2DModel``, a 2-layer ``T5EncoderModel`` from a ``T5Config``, a
word-level tokenizer made with the ``tokenizers`` library (``</s>`` appended, wrapped in
``PreTrainedTokenizerFast``), a 2-block ``AutoencoderKL`` (16 x 16 images from 8 x 8 latents) and a
DPM-Solver scheduler. ``save_tiny_lora`` writes the authors' LoRA layout for it.
"""

from __future__ import annotations

from pathlib import Path

import torch

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
SPECIALS = ["<pad>", "</s>", "<unk>"]
TEXT_WIDTH = 32
LAYERS = 4


def make_tokenizer():
    from tokenizers import Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def make_pipeline(family: str = "alpha", seed: int = 0):
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        PixArtAlphaPipeline,
        PixArtSigmaPipeline,
        PixArtTransformer2DModel,
    )
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(SPECIALS) + len(WORDS),
            d_model=TEXT_WIDTH,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    transformer = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=LAYERS,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_channels=TEXT_WIDTH,
        in_channels=4,
        out_channels=8,
        cross_attention_dim=16,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    cls = PixArtAlphaPipeline if family == "alpha" else PixArtSigmaPipeline
    return cls(
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        vae=vae.eval(),
        transformer=transformer.eval(),
        scheduler=DPMSolverMultistepScheduler(),
    )


def save_tiny_pixart(folder: Path, family: str = "alpha", seed: int = 0) -> Path:
    """Build the tiny pipeline and ``save_pretrained`` it to ``folder``."""
    make_pipeline(family, seed).save_pretrained(str(folder))
    return Path(folder)


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
