"""MedSteer-mini: a tiny PixArt-class text-to-image model of synthetic endoscopy, built offline.

Why it exists (issue 5): few users have a GPU, the 20 GB of PixArt-alpha + T5-XXL weights or the
authors' Kvasir LoRA, yet the method should be visible and measurable in minutes. MedSteer-mini is
the same kind of model at toy scale, so every hook, capture and steering path is the code that
serves the real PixArt:

- transformer: a diffusers ``PixArtTransformer2DModel`` (6 blocks x 128 wide, patch 4) working in
  **pixel space** on 32x32 RGB. A VAE would itself need training and would add a second learnt
  component between the steered activations and the pixels the oracle judges; at 32x32 pixels the
  transformer sees 8x8 = 64 tokens, the same token count as a 256 px PixArt latent with patch 2 on
  a 16x16 latent, so pixel space is both simpler and cheaper.
- text encoder: a 2-layer ``T5EncoderModel`` built from a ``T5Config`` and trained jointly.
- tokenizer: a word-level ``tokenizers`` model over the caption vocabulary, with T5's ``</s>``
  appended, wrapped in ``PreTrainedTokenizerFast``.
- sampling: DDIM, ``clip_sample=True`` (without it the feasibility run showed seed-locked colour
  artefacts), 20 steps, the model's ``default_cfg`` (stored in the file), through
  ``medsteer_core.driver.sample``.

Everything ships as ONE safetensors file (weights of both networks; configs and vocabulary in its
string metadata), so nothing is unpickled. Train it again with::

    python -m medsteer_core.mini train --out mini.safetensors --minutes 60

(see ``medsteer_core.mini.train`` for the settings and docs/results.md for the measured time).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..driver import SamplingSpec, sample
from ..errors import MedSteerError
from . import synthetic
from ._assets import read_tagged
from .backbone import tag_transformer

__all__ = [
    "DEFAULT_PATH",
    "VECTOR_DIR",
    "MiniModel",
    "MiniParts",
    "encode_unpadded",
    "load_mini_parts",
    "build_tokenizer",
    "load_mini",
    "new_mini",
    "save_mini",
]

#: Where the shipped model lives inside the package.
DEFAULT_PATH = Path(__file__).parent / "assets" / "medsteer_mini.safetensors"
FORMAT_NAME = "medsteer.mini"
FORMAT_VERSION = "1"
MAX_TOKENS = 16
SPECIALS = ("<pad>", "</s>", "<unk>")

TRANSFORMER_CONFIG = {
    "sample_size": 32,
    "patch_size": 4,
    "in_channels": 3,
    "out_channels": 3,
    "num_layers": 6,
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "cross_attention_dim": 128,
    "caption_channels": 64,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "use_additional_conditions": False,
}
TEXT_CONFIG = {
    "d_model": 64,
    "d_kv": 16,
    "d_ff": 128,
    "num_layers": 2,
    "num_heads": 4,
    "dropout_rate": 0.0,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 16,
}
SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
#: What the transformer predicts. v (Salimans & Ho 2022) rather than epsilon: with epsilon the
#: low-noise steps of a briefly trained pixel-space model leave visible noise; v keeps both ends
#: well conditioned.
PREDICTION = "v_prediction"
#: Guidance scale of the shipped model. CFG 4 renders every class but multiplies whatever part of a
#: concept one steering direction misses (measured on the step-4800 weights: steering all six
#: layers at strength 2 shrank the dye 354 -> 84 px yet left it in every image at CFG 4, and removed
#: it in 7 of 8 images at CFG 1); CFG 2 keeps every class's rendering rate >= 0.8.
DEFAULT_CFG = "2"


def vocabulary() -> list[str]:
    """Every word of every caption the generator writes, after the special tokens."""
    words: dict[str, None] = {}
    for template in synthetic.TEMPLATES:
        for name in synthetic.CLASSES:
            for word in synthetic.caption(name, synthetic.TEMPLATES.index(template)).lower().split():
                words[word] = None
    return list(SPECIALS) + sorted(words)


def build_tokenizer(vocab: list[str] | None = None):
    """A T5-style word-level tokenizer (lower-cased words, ``</s>`` appended), built offline."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = vocab or vocabulary()
    core = Tokenizer(WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=MAX_TOKENS
    )


@dataclass
class MiniModel:
    """The transformer, text encoder and tokenizer of MedSteer-mini, plus how to sample it.

    Attributes:
        transformer: the ``PixArtTransformer2DModel`` (pixel space, 3 channels).
        text_encoder: the ``T5EncoderModel``.
        tokenizer: the ``PreTrainedTokenizerFast``.
        metadata: provenance strings (training settings, time, calibrated defaults).
    """

    transformer: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.transformer.config.sample_size)

    @property
    def default_cfg(self) -> float:
        """The guidance scale the model was calibrated with (metadata ``default_cfg``; 4 if unset)."""
        return float(self.metadata.get("default_cfg", 4.0))

    def spec(self, steps: int = 20, cfg: float | None = None) -> SamplingSpec:
        """The sampling settings the model was made for (DDIM 20 steps, its default CFG, 32x32x3)."""
        cfg = self.default_cfg if cfg is None else cfg
        return SamplingSpec(steps=steps, cfg=cfg, height=self.size, width=self.size, channels=3)

    def scheduler(self):
        """A fresh DDIM scheduler with the training noise schedule and ``clip_sample=True``."""
        from diffusers import DDIMScheduler

        prediction = self.metadata.get("prediction_type", "epsilon")
        return DDIMScheduler(**SCHEDULE, clip_sample=True, timestep_spacing="trailing", prediction_type=prediction)

    @torch.no_grad()
    def encode(self, prompts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Caption embeddings ``[B, 16, 64]`` and attention mask ``[B, 16]`` of the prompts."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return _encode(self.text_encoder, self.tokenizer, prompts)

    def generate(
        self,
        prompt: str | list[str],
        seeds: list[int],
        *,
        plans=(),
        record=None,
        estimator=None,
        label: str = "with",
        steps: int = 20,
        cfg: float | None = None,
        progress=None,
    ) -> torch.Tensor:
        """Images ``[B, 3, 32, 32]`` in 0-1 for the seeds (one prompt, or one per seed).

        ``cfg`` defaults to the model's ``default_cfg``.

        Steering plans, a gate record and a capture estimator go straight to
        ``medsteer_core.driver.sample``: the same hooks as on the real PixArt.
        """
        embeds, mask = self.encode(prompt)
        uncond, uncond_mask = self.encode("")
        latents = sample(
            self.transformer,
            self.scheduler(),
            embeds,
            seeds,
            self.spec(steps, cfg),
            negative_embeds=uncond,
            prompt_mask=mask,
            negative_mask=uncond_mask,
            plans=plans,
            record=record,
            estimator=estimator,
            label=label,
            progress=progress,
        )
        return ((latents + 1) / 2).clamp(0, 1)


def _encode(text_encoder, tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    device = next(text_encoder.parameters()).device
    ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
    return text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state, mask


def new_mini(seed: int = 0) -> MiniModel:
    """A freshly initialised (untrained) MedSteer-mini."""
    from diffusers import PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    transformer = tag_transformer(PixArtTransformer2DModel(**TRANSFORMER_CONFIG))
    text_config = T5Config(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1, **TEXT_CONFIG)
    text_encoder = T5EncoderModel(text_config)
    return MiniModel(
        transformer.eval(), text_encoder.eval(), tokenizer, {"prediction_type": PREDICTION, "default_cfg": DEFAULT_CFG}
    )


def save_mini(model: MiniModel, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write both networks, their configs and the vocabulary to one safetensors file (atomically)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"transformer.{k}": v.detach().cpu().contiguous() for k, v in model.transformer.state_dict().items()}
    tensors.update(
        {f"text_encoder.{k}": v.detach().cpu().contiguous() for k, v in model.text_encoder.state_dict().items()}
    )
    # T5 ties shared embeddings to the encoder's embed_tokens: store one copy.
    tensors.pop("text_encoder.encoder.embed_tokens.weight", None)
    meta = dict(model.metadata)
    meta.update(metadata or {})
    for stale in ("denoiser", "transformer_config", "unet_config"):  # written again below, for this denoiser
        meta.pop(stale, None)
    meta.update(
        {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            **_denoiser_meta(model.transformer),
            "text_encoder_config": json.dumps(_text_config_of(model.text_encoder)),
            "vocabulary": json.dumps(_vocab_list(model.tokenizer)),
            "schedule": json.dumps(SCHEDULE),
        }
    )
    model.metadata = {k: str(v) for k, v in meta.items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=model.metadata)
    os.replace(tmp, path)
    return path


def _denoiser_meta(denoiser: nn.Module) -> dict[str, str]:
    from .mini_unet import config_json, is_unet

    if is_unet(denoiser):
        return config_json(denoiser)
    return {"transformer_config": json.dumps(TRANSFORMER_CONFIG | _config_of(denoiser))}


def _vocab_list(tokenizer) -> list[str]:
    vocab = tokenizer.get_vocab()
    return [w for w, _ in sorted(vocab.items(), key=lambda item: item[1])]


def _config_of(transformer) -> dict:
    return {k: transformer.config[k] for k in TRANSFORMER_CONFIG if k in transformer.config}


def _text_config_of(text_encoder) -> dict:
    config = text_encoder.config
    keys = list(TEXT_CONFIG) + ["vocab_size", "pad_token_id", "eos_token_id"]
    return {k: getattr(config, k) for k in keys}


#: Where the calibrated vectors of the shipped model live inside the package.
VECTOR_DIR = DEFAULT_PATH.parent / "vectors"


@dataclass
class MiniParts:
    """The pieces of a MedSteer-mini file, without diffusers: what a host that builds its own
    transformer class (ComfyUI) needs.

    Attributes:
        metadata: the file's string metadata (configs, calibrated defaults, provenance).
        transformer_config: the diffusers ``PixArtTransformer2DModel`` config.
        transformer_state: the transformer's weights, diffusers keys.
        text_encoder: the ``T5EncoderModel`` (eval mode, weights loaded).
        tokenizer: the ``PreTrainedTokenizerFast``.
    """

    metadata: dict[str, str]
    transformer_config: dict
    transformer_state: dict[str, torch.Tensor]
    text_encoder: nn.Module
    tokenizer: object


def load_mini_parts(path: str | os.PathLike | None = None) -> MiniParts:
    """Read a MedSteer-mini file (default: the shipped one) into its parts; needs transformers only.

    Everything the file declares (configs, vocabulary, sampling defaults) is checked against its
    tensors before a network is built (issue 12, F10).

    Raises:
        MedSteerError: the file is missing, unreadable, not a MedSteer-mini file, or inconsistent.
    """
    from .file_checks import REMEDY as _REMEDY
    from .file_checks import build_text_encoder, check_metadata, check_transformer, meta_json

    path = Path(path) if path is not None else DEFAULT_PATH
    meta, tensors = read_tagged(path, FORMAT_NAME, "MedSteer-mini", _REMEDY)
    check_metadata(meta, path)
    vocabulary = meta_json(meta, "vocabulary", list, path)
    if (
        list(vocabulary[: len(SPECIALS)]) != list(SPECIALS)
        or not all(isinstance(w, str) and 0 < len(w) <= 64 for w in vocabulary)
        or len(set(vocabulary)) != len(vocabulary)
    ):
        raise MedSteerError(
            f"{path}: metadata 'vocabulary' must be distinct words of 1-64 characters starting with {list(SPECIALS)}: "
            f"{_REMEDY}"
        )
    transformer_state = {k[12:]: v for k, v in tensors.items() if k.startswith("transformer.")}
    if meta.get("denoiser", "pixart") == "unet":  # MedSteer-mini-UNet (mini/mini_unet.py)
        from .mini_unet import check_unet_config

        transformer_config = meta_json(meta, "unet_config", dict, path)
        check_unet_config(transformer_config, path, _REMEDY)
    else:
        transformer_config = meta_json(meta, "transformer_config", dict, path)
        check_transformer(transformer_config, transformer_state, path)
    text_config = meta_json(meta, "text_encoder_config", dict, path)
    text_state = {k[13:]: v for k, v in tensors.items() if k.startswith("text_encoder.")}
    text_encoder = build_text_encoder(text_config, text_state, vocabulary, path)
    return MiniParts(
        metadata=dict(meta),
        transformer_config=transformer_config,
        transformer_state=transformer_state,
        text_encoder=text_encoder.eval(),
        tokenizer=build_tokenizer(vocabulary),
    )


def load_mini(path: str | os.PathLike | None = None) -> MiniModel:
    """Load MedSteer-mini (default: the model shipped in the package).

    Raises:
        MedSteerError: the file is missing, unreadable or not a MedSteer-mini file.
    """
    from diffusers import PixArtTransformer2DModel

    parts = load_mini_parts(path)
    if parts.metadata.get("denoiser") == "unet":
        from .mini_unet import build_unet

        transformer = build_unet(parts.transformer_config, parts.transformer_state)
        return MiniModel(transformer.eval(), parts.text_encoder, parts.tokenizer, parts.metadata)
    transformer = tag_transformer(PixArtTransformer2DModel(**parts.transformer_config))
    transformer.load_state_dict(parts.transformer_state)
    return MiniModel(transformer.eval(), parts.text_encoder, parts.tokenizer, parts.metadata)


@torch.no_grad()
def encode_unpadded(text_encoder: nn.Module, tokenizer, prompt: str) -> torch.Tensor:
    """Caption embedding ``[1, n, 64]`` of one prompt, its ``n`` real tokens only (``</s>`` included).

    Equal to the real rows of ``MiniModel.encode`` (T5 masks the padding, and the transformer's
    cross-attention mask drops it), so a host whose cross-attention takes no mask (ComfyUI's
    PixArt) sees what the model was trained with.
    """
    ids = tokenizer([prompt], truncation=True, max_length=MAX_TOKENS, return_tensors="pt")["input_ids"]
    device = next(text_encoder.parameters()).device
    return text_encoder(input_ids=ids.to(device)).last_hidden_state
