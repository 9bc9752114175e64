"""Test-only ComfyUI nodes: a small random-weight PixArt MODEL and T5-like CONDITIONING.

Loaded by the comfyui tests as a second custom node folder, so graphs get a model and prompts
without downloads or a text encoder. Everything is deterministic across processes.
"""

from __future__ import annotations

import math
import zlib

import torch
from comfy_api.latest import ComfyExtension, io


def random_pixart(seed: int, hidden_size: int, depth: int, num_heads: int, caption_channels: int):
    """A ComfyUI MODEL around ``model_base.PixArt`` (PixArt-alpha config) with random weights.

    Weights ~ N(0, 1/fan_in) keep activations of order 1 through the blocks; 1-D tensors ~ N(0, 0.02).
    """
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.PixArtAlpha(
        {
            "image_model": "pixart_alpha",
            "hidden_size": hidden_size,
            "depth": depth,
            "num_heads": num_heads,
            "caption_channels": caption_channels,
            "patch_size": 2,
            "in_channels": 4,
            "model_max_length": 120,
            "micro_condition": True,
        }
    )
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({}, "", device=comfy.model_management.unet_offload_device())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, tensor in sorted(base.diffusion_model.state_dict(keep_vars=True).items()):
            std = 1.0 / math.sqrt(max(1, math.prod(tensor.shape[1:]))) if tensor.dim() >= 2 else 0.02
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)
    return comfy.model_patcher.ModelPatcher(
        base,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )


class _NotPixArt(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.diffusion_model = torch.nn.Linear(4, 4)


class MedSteerTestPixArt(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MedSteerTestPixArt",
            display_name="MedSteer test: random PixArt",
            category="medsteer/testing",
            inputs=[
                io.Int.Input("seed", default=0, min=0, max=2**31),
                io.Int.Input("hidden_size", default=48, min=6, max=1152),
                io.Int.Input("depth", default=4, min=1, max=28),
                io.Int.Input("num_heads", default=2, min=1, max=16),
                io.Int.Input("caption_channels", default=16, min=1, max=4096),
                io.Combo.Input("kind", options=["pixart", "not pixart"], default="pixart"),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, seed, hidden_size, depth, num_heads, caption_channels, kind):
        if kind == "not pixart":
            import comfy.model_management
            import comfy.model_patcher

            device = comfy.model_management.get_torch_device()
            return io.NodeOutput(comfy.model_patcher.ModelPatcher(_NotPixArt(), device, device))
        return io.NodeOutput(random_pixart(seed, hidden_size, depth, num_heads, caption_channels))


def random_conditioning(text: str, tokens: int, channels: int):
    """CONDITIONING ``[[tensor[1, tokens, channels], {}]]`` seeded by the text (stable across runs)."""
    generator = torch.Generator().manual_seed(zlib.crc32(text.encode("utf-8")))
    return [[torch.randn((1, tokens, channels), generator=generator), {}]]


class MedSteerTestConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MedSteerTestConditioning",
            display_name="MedSteer test: random conditioning",
            category="medsteer/testing",
            inputs=[
                io.String.Input("text", default=""),
                io.Int.Input("tokens", default=8, min=1, max=300),
                io.Int.Input("channels", default=16, min=1, max=4096),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, text, tokens, channels):
        return io.NodeOutput(random_conditioning(text, tokens, channels))


class MedSteerTestKeep(io.ComfyNode):
    """An output node that makes the executor run (and cache) whatever feeds it."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MedSteerTestKeep",
            display_name="MedSteer test: keep",
            category="medsteer/testing",
            inputs=[io.AnyType.Input("value")],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, value):
        return io.NodeOutput()


class MedSteerTestAfter(io.ComfyNode):
    """Passes ``latent`` through once ``after`` exists: orders two samplers in one graph."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MedSteerTestAfter",
            display_name="MedSteer test: after",
            category="medsteer/testing",
            inputs=[io.Latent.Input("latent"), io.AnyType.Input("after")],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, latent, after):
        return io.NodeOutput(latent)


class _Extension(ComfyExtension):
    async def get_node_list(self):
        return [MedSteerTestPixArt, MedSteerTestConditioning, MedSteerTestKeep, MedSteerTestAfter]


async def comfy_entrypoint():
    return _Extension()
