"""Stable Diffusion pipelines on the headless route: SD 1.x / 2.x (epsilon or v-prediction, as the
scheduler config says) and SDXL, whose UNet also takes the pooled text embedding and six size ids.

The model family is the UNet backbone's (``"sd1"``, ``"sd2"``, ``"sdxl"``, ...), so a vector built
here names the same family as one built in ComfyUI. Sampling goes through ``driver.sample`` like
PixArt's: the caption rows and SDXL's added conditions are laid out ``[uncond, cond]`` by the driver.
"""

from __future__ import annotations

import torch

from ..driver import SamplingSpec
from .models import DiffusersModel

__all__ = ["StableDiffusionModel", "StableDiffusionXLModel", "stable_diffusion_model"]


class StableDiffusionModel(DiffusersModel):
    """A diffusers ``StableDiffusionPipeline`` (SD 1.x, SD 2.x, their fine-tunes such as RoentGen-v2
    or MINIM's UNets). The caption is CLIP's last hidden state, 77 tokens, no mask."""

    default_cfg = 7.5

    def __init__(self, pipe, source: str, dtype: torch.dtype, device: torch.device):
        super().__init__(pipe, pipe.unet, None, source, dtype, device)

    def _encode(self, prompt: str, negative_prompt: str, guided: bool) -> tuple:
        embeds, negative = self.pipe.encode_prompt(
            prompt, self.device, 1, guided, negative_prompt=negative_prompt if guided else None
        )
        return embeds, None, negative, None


class StableDiffusionXLModel(DiffusersModel):
    """A diffusers ``StableDiffusionXLPipeline``: two text encoders (their hidden states side by
    side), the second one's pooled embedding and the size ids ``(height, width, 0, 0, height,
    width)`` as the UNet's added conditions, as diffusers' own pipeline passes them."""

    default_cfg = 5.0

    def __init__(self, pipe, source: str, dtype: torch.dtype, device: torch.device):
        super().__init__(pipe, pipe.unet, None, source, dtype, device)
        vae = pipe.vae
        if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            vae.to(torch.float32)  # the SDXL VAE overflows in fp16 (diffusers upcasts it the same way)

    def _encode(self, prompt: str, negative_prompt: str, guided: bool) -> tuple:
        # An empty negative prompt is None for diffusers, so force_zeros_for_empty_prompt (SDXL base:
        # zero unconditional embeddings) applies exactly as in StableDiffusionXLPipeline.__call__.
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=guided,
            negative_prompt=negative_prompt or None,
        )
        return embeds, None, negative, None, pooled, negative_pooled

    def _inputs(self, encoded: tuple, spec: SamplingSpec) -> dict:
        inputs = super()._inputs(encoded, spec)
        height, width = spec.height * self.latent_scale, spec.width * self.latent_scale
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=encoded[4].dtype, device=self.device)
        inputs["added"] = {"text_embeds": encoded[4], "time_ids": time_ids}
        if encoded[5] is not None:
            inputs["negative_added"] = {"text_embeds": encoded[5], "time_ids": time_ids}
        return inputs


def stable_diffusion_model(pipe, name: str, source: str, dtype: torch.dtype, device: torch.device) -> DiffusersModel:
    """The headless model of a loaded SD (``StableDiffusionPipeline``) or SDXL pipeline."""
    cls = StableDiffusionXLModel if name == "StableDiffusionXLPipeline" else StableDiffusionModel
    return cls(pipe, source, dtype, device)
