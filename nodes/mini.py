"""MedSteer-mini inside ComfyUI: MODEL, CLIP and VAE of the shipped toy model, zero downloads.

Issue 11: a new user should see a real counterfactual pair in ComfyUI right after installing, but
PixArt-alpha + T5-XXL are ~20 GB. MedSteer-mini (``medsteer_core.mini``) ships inside the package:
a 6-layer PixArt transformer in pixel space (32x32 RGB, patch 4), a 2-layer T5 encoder and a
word-level tokenizer, plus calibrated pathology vectors. This module turns it into ComfyUI objects:

- MODEL: ComfyUI's own ``PixArtMS`` blocks with the mini's weights (so the steering hooks find
  ``blocks[i].cross_attn`` as on the real PixArt), inside a ``BaseModel`` with v-prediction, the
  training noise schedule and a 3-channel identity latent format. Two things differ from ComfyUI's
  PixArt, both to match how the mini was trained (diffusers):
  * the position embedding uses a fixed base grid (``sample_size / patch`` = 8 tokens) instead of
    ComfyUI's resolution rule, which divides by zero at 32x32 and differs from diffusers elsewhere;
  * the predicted clean image is clipped to [-1, 1] after CFG (the DDIM ``clip_sample`` the model
    was trained and calibrated with) by a post-CFG function on the patcher.
- CLIP: the mini's T5 as a ``comfy.sd.CLIP``, so ``CLIPTextEncode`` works. It encodes the real
  tokens only (no padding), which equals the masked encoding of training because ComfyUI's PixArt
  cross-attention takes no mask.
- VAE: ComfyUI's pixel-space VAE (IMAGE 0..1 <-> LATENT -1..1), the mini's own pixel convention.

Sample it as it was made: ``EmptyChromaRadianceLatentImage`` 32x32, KSampler ``ddim`` (``euler``
is the same), scheduler ``simple`` (the training run's trailing spacing), 20 steps, CFG 2.

The loader's ``denoiser`` picks MedSteer-mini (the PixArt) or MedSteer-mini-UNet (issue 10: an SD
style UNet under the same T5, built as ComfyUI's own SD UNet class by ``nodes/mini_unet.py``); the
CLIP and VAE are the same for both.
"""

from __future__ import annotations

import os

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.supported_models
import folder_paths
import torch
from comfy.ldm.pixart.pixartms import PixArtMS, get_2d_sincos_pos_embed_torch
from comfy_api.latest import io

from ..medsteer_core import MedSteerError, weights
from ..medsteer_core import mini as core_mini
from ..medsteer_core.backbones import PixArtComfyUI, register_backbone
from ..medsteer_core.mini.backbone import TAG, tag_transformer
from ..medsteer_core.mini.mini_unet import DEFAULT_UNET_PATH
from . import mini_unet
from .common import CATEGORY
from .vector_io import FOLDER as VECTOR_FOLDER

#: The ``denoiser`` choices of LoadMedSteerMini: the shipped file of each.
PIXART = "MedSteer-mini (PixArt)"
UNET = "MedSteer-mini-UNet"
DENOISERS = {PIXART: core_mini.DEFAULT_PATH, UNET: DEFAULT_UNET_PATH}
#: Where the mini-UNet's calibrated vectors ship (listed in LoadPathologyVector after the mini's).
UNET_VECTOR_DIR = core_mini.VECTOR_DIR.parent / "vectors_unet"

#: The sampler settings the mini was trained and calibrated with, for tooltips and the template.
SAMPLING_HINT = (
    "Sample it as it was made: EmptyChromaRadianceLatentImage 32x32, KSampler ddim (or euler) with the "
    "simple scheduler, 20 steps, CFG 2."
)


class MiniLatentFormat(comfy.latent_formats.LatentFormat):
    """Pixel space: 3 channels, the latent is the image in -1..1 (no scaling)."""

    latent_channels = 3
    scale_factor = 1.0

    def __init__(self):
        self.latent_rgb_factors = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
        self.latent_rgb_factors_bias = [0.0, 0.0, 0.0]


class MiniPixArtComfyUI(PixArtComfyUI):
    """MedSteer-mini's PixArt in ComfyUI (a tagged ``MiniPixArtMS``): PixArt's sites and grids, the
    family ``medsteer-mini`` (as in diffusers), so its vectors pass the engine's family check."""

    name = "MedSteer-mini (ComfyUI PixArtMS built by LoadMedSteerMini)"
    family = core_mini.FAMILY

    def transformer(self, model: torch.nn.Module) -> torch.nn.Module | None:
        if getattr(model, TAG, False) is not True:
            return None
        return super().transformer(model)


BACKBONE = register_backbone(MiniPixArtComfyUI(), first=True)


class MiniPixArtMS(PixArtMS):
    """ComfyUI's PixArt blocks with the mini's (diffusers') position embedding.

    diffusers places token ``i`` of an ``n``-token side at ``i / (n / base) / interpolation`` with
    ``base = sample_size / patch`` and interpolation 1 below 512 px; ComfyUI derives both from the
    resolution. The blocks, embedders and final layer are ComfyUI's, unchanged.
    """

    #: Images are pixels: one latent pixel per image pixel (the nodes read this for mask sizes).
    pixel_scale = 1

    def __init__(self, base_grid: int = 8, **kwargs):
        super().__init__(**kwargs)
        self.base_grid = int(base_grid)
        tag_transformer(self)

    def check_latent_size(self, height: int, width: int) -> None:
        """Any size that is a whole number of patches works (the embedding has no division by zero)."""
        if height % self.patch_size or width % self.patch_size or height <= 0 or width <= 0:
            raise MedSteerError(
                f"MedSteer-mini needs image sides that are multiples of {self.patch_size} px, got "
                f"{width}x{height}: use 32x32 (what it was trained on)"
            )

    def forward_orig(self, x, timestep, y, mask=None, c_size=None, c_ar=None, **kwargs):
        _, _, height, width = x.shape
        self.check_latent_size(height, width)  # unsteered samplers too: a clear error, not a shape mismatch
        rows, cols = height // self.patch_size, width // self.patch_size
        position = get_2d_sincos_pos_embed_torch(
            self.hidden_size,
            w=cols,
            h=rows,
            pe_interpolation=1.0,
            base_size=self.base_grid,
            device=x.device,
            dtype=x.dtype,
        )
        tokens = self.x_embedder(x) + position.unsqueeze(0)
        embedded_time = self.t_embedder(timestep, x.dtype)
        modulation = self.t_block(embedded_time)
        # The blocks' cross-attention takes every row's captions as one sequence and splits it back
        # per row (rows share a token count: ComfyUI batches only conds of equal length).
        caption = self.y_embedder(y, False).squeeze(1).reshape(1, -1, self.hidden_size)
        for block in self.blocks:
            tokens = block(tokens, caption, modulation, None, (height, width))
        return self.unpatchify(self.final_layer(tokens, embedded_time), height, width)


class MiniBaseModel(comfy.model_base.PixArt):
    """``model_base.PixArt`` (its conditioning) around ``MiniPixArtMS``, v-prediction."""

    def __init__(self, model_config, model_type=comfy.model_base.ModelType.V_PREDICTION, device=None):
        comfy.model_base.BaseModel.__init__(self, model_config, model_type, device=device, unet_model=MiniPixArtMS)


class MiniConfig(comfy.supported_models.PixArtAlpha):
    """PixArt-alpha's noise schedule (linear betas 1e-4..0.02 over 1000 steps, as the mini's
    training) with the mini's latent format and model class."""

    latent_format = MiniLatentFormat
    unet_config = {"image_model": "medsteer_mini"}

    def get_model(self, state_dict, prefix="", device=None):
        return MiniBaseModel(self, device=device).eval()


def clip_denoised(args: dict) -> torch.Tensor:
    """Post-CFG: clip the predicted clean image to [-1, 1] (DDIM ``clip_sample``)."""
    return args["denoised"].clamp(-1.0, 1.0)


def unet_config(parts: core_mini.MiniParts) -> dict:
    """ComfyUI ``unet_config`` of the mini's transformer (from its diffusers config)."""
    config = parts.transformer_config
    hidden = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    patch = int(config["patch_size"])
    return {
        "image_model": "medsteer_mini",
        "hidden_size": hidden,
        "depth": int(config["num_layers"]),
        "num_heads": int(config["num_attention_heads"]),
        "patch_size": patch,
        "in_channels": int(config["in_channels"]),
        "pred_sigma": int(config.get("out_channels") or config["in_channels"]) != int(config["in_channels"]),
        "learn_sigma": False,
        "caption_channels": int(config["caption_channels"]),
        "model_max_length": core_mini.MAX_TOKENS,
        "micro_condition": False,
        "base_grid": int(config["sample_size"]) // patch,
    }


def build_model(parts: core_mini.MiniParts) -> comfy.model_patcher.ModelPatcher:
    """The MODEL: ComfyUI PixArt blocks with the mini's weights, float32 (the model is 4 MB)."""
    config = MiniConfig(unet_config(parts))
    config.set_inference_dtype(torch.float32, None)
    offload = comfy.model_management.unet_offload_device()
    base = config.get_model({}, "", device=offload)
    state = weights.diffusers_to_pixart(parts.transformer_state)
    expected = base.diffusion_model.state_dict()
    # diffusers keeps no null caption embedding (used only for caption dropout in training).
    state.setdefault("y_embedder.y_embedding", expected["y_embedder.y_embedding"].clone())
    weights.check_state_dict_fits(state, expected)
    base.diffusion_model.load_state_dict(state, strict=True)
    patcher = comfy.model_patcher.ModelPatcher(
        base, load_device=comfy.model_management.get_torch_device(), offload_device=offload
    )
    patcher.set_model_sampler_post_cfg_function(clip_denoised)
    return patcher


class MiniTokenizer:
    """ComfyUI tokenizer interface around the mini's word-level tokenizer.

    Tokens are ``{"mini": [[(id, 1.0), ...]]}``: one batch of the real tokens, ``</s>`` last,
    truncated to the 16 tokens the model was trained with. Prompt weights ``(word:1.2)`` are not
    parsed: the mini's vocabulary is its captions' words.
    """

    def __init__(self, tokenizer, embedding_directory=None, tokenizer_data=None):
        self.tokenizer = tokenizer

    def tokenize_with_weights(self, text: str, return_word_ids: bool = False, **kwargs) -> dict:
        ids = self.tokenizer([text], truncation=True, max_length=core_mini.MAX_TOKENS)["input_ids"][0]
        if return_word_ids:
            return {"mini": [[(int(i), 1.0, 0) for i in ids]]}
        return {"mini": [[(int(i), 1.0) for i in ids]]}

    def untokenize(self, token_weight_pair):
        return [(pair, self.tokenizer.convert_ids_to_tokens(pair[0])) for pair in token_weight_pair]

    def state_dict(self) -> dict:
        return {}


class MiniTextEncoder(torch.nn.Module):
    """ComfyUI text-encoder interface around the mini's T5 (float32; 0.2 M parameters)."""

    def __init__(self, t5: torch.nn.Module, device=None, dtype=None, model_options=None):
        super().__init__()
        self.t5 = t5.float()
        self.dtypes = {torch.float32}

    def reset_clip_options(self) -> None:
        pass

    def set_clip_options(self, options: dict) -> None:
        pass

    def load_sd(self, state_dict: dict):
        return self.t5.load_state_dict(state_dict, strict=False)

    @torch.no_grad()
    def encode_token_weights(self, token_weight_pairs: dict):
        rows = token_weight_pairs["mini"]
        if len(rows) != 1:
            raise MedSteerError(f"MedSteer-mini encodes one prompt at a time, got {len(rows)} token batches")
        device = next(self.t5.parameters()).device
        ids = torch.tensor([[pair[0] for pair in rows[0]]], dtype=torch.long, device=device)
        cond = self.t5(input_ids=ids).last_hidden_state.float()
        return cond, None, {}


def build_clip(parts: core_mini.MiniParts) -> comfy.sd.CLIP:
    """The CLIP: a ``comfy.sd.CLIP`` whose model and tokenizer are the mini's."""

    class Target:
        params: dict = {}

        @staticmethod
        def clip(device=None, dtype=None, model_options=None):
            return MiniTextEncoder(parts.text_encoder, device=device, dtype=dtype, model_options=model_options)

        @staticmethod
        def tokenizer(embedding_directory=None, tokenizer_data=None):
            return MiniTokenizer(parts.tokenizer, embedding_directory, tokenizer_data)

    device = comfy.model_management.text_encoder_offload_device()
    return comfy.sd.CLIP(
        target=Target,
        model_options={"load_device": device, "offload_device": device, "initial_device": device},
    )


def build_vae() -> comfy.sd.VAE:
    """ComfyUI's pixel-space VAE (what ``VAELoader`` gives for ``pixel_space``)."""
    return comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})


def register_shipped_vectors() -> None:
    """List the calibrated vectors of both minis in LoadPathologyVector (after ``models/medsteer``)."""
    for folder in (core_mini.VECTOR_DIR, UNET_VECTOR_DIR):
        folder_paths.add_model_folder_path(VECTOR_FOLDER, os.fspath(folder), is_default=False)


def load_denoiser(denoiser: str, path: str | os.PathLike | None = None) -> tuple:
    """``(MODEL, CLIP, VAE)`` of one of the minis: ``denoiser`` is a ``DENOISERS`` name, ``path`` a
    mini file of that denoiser (default: the shipped one).

    Raises:
        MedSteerError: an unknown denoiser, or a file of the other denoiser (or none).
    """
    if denoiser not in DENOISERS:
        raise MedSteerError(f"denoiser {denoiser!r} is not one of {list(DENOISERS)}: pick one of them")
    path = DENOISERS[denoiser] if path is None else path
    parts = core_mini.load_mini_parts(path)
    kind = parts.metadata.get("denoiser", "pixart")
    if (kind == "unet") != (denoiser == UNET):
        raise MedSteerError(
            f"{path}: a MedSteer-mini file with denoiser {kind!r}, but {denoiser!r} was asked for: pick the "
            "matching denoiser"
        )
    if denoiser == UNET:
        model = mini_unet.build_model(parts, MiniLatentFormat, clip_denoised)
    else:
        model = build_model(parts)
    return model, build_clip(parts), build_vae()


class LoadMedSteerMini(io.ComfyNode):
    """MODEL, CLIP and VAE of the shipped MedSteer-mini: the method in ComfyUI with no downloads."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoadMedSteerMini",
            display_name="MedSteer Load MedSteer-mini",
            category=CATEGORY,
            description=(
                "Loads MedSteer-mini, the toy text-to-image model of synthetic endoscopy that ships with the "
                "pack (no downloads): a 6-layer PixArt transformer (4 MB) or MedSteer-mini-UNet, a small Stable "
                "Diffusion-style UNet (11 MB), both in pixel space (32x32 RGB), their T5 text encoder and a "
                "pixel-space VAE. The calibrated vectors of both are listed in MedSteer Load Pathology Vector "
                "(each records its model family: a vector fits only its own model). " + SAMPLING_HINT
            ),
            inputs=[
                io.Combo.Input(
                    "denoiser",
                    options=list(DENOISERS),
                    default=PIXART,
                    optional=True,  # API prompts written before the choice existed load the PixArt
                    tooltip="Which MedSteer-mini to load. 'MedSteer-mini (PixArt)': the 6-layer PixArt "
                    "transformer (sites 'block 0'..'block 5'), the stand-in for PixArt-alpha. "
                    "'MedSteer-mini-UNet': an SD-style UNet as ComfyUI's own SD UNet class (7 cross-attention "
                    "sites: 'input 3', 'input 5', 'middle 0', 'output 0'..'output 3'), the stand-in for SD1.x/2.x. "
                    "Same prompts, same sampling; each has its own vectors.",
                ),
            ],
            outputs=[
                io.Model.Output(
                    display_name="model",
                    tooltip="The denoiser (v-prediction): the PixArt transformer (6 layers, width 128) or the "
                    "UNet (widths 64/96 at its cross-attention sites). Steer it with MedSteer Apply SSPS "
                    "Steering; each shipped vector records its calibrated layer window and strength (see "
                    "MedSteer Inspect Pathology Vector).",
                ),
                io.Clip.Output(
                    display_name="clip",
                    tooltip="The mini's T5 text encoder for CLIPTextEncode. It knows the words of its training "
                    "captions, e.g. 'an endoscopic image of dyed lifted polyps', '... of polyps', "
                    "'... of normal cecum', '... of ulcerative colitis'; leave the negative prompt empty.",
                ),
                io.Vae.Output(
                    display_name="vae",
                    tooltip="Pixel space: VAE Decode turns the 32x32 3-channel latent into the image as is.",
                ),
            ],
        )

    @classmethod
    def execute(cls, denoiser: str = PIXART) -> io.NodeOutput:
        return io.NodeOutput(*load_denoiser(denoiser))


NODES = [LoadMedSteerMini]
