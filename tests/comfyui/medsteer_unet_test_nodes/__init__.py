"""Test-only ComfyUI nodes: tiny random-weight SD1.x / SD2.x / SDXL UNets, their prompts, a ControlNet.

Loaded by ``tests/comfyui/test_unet_nodes.py`` as a custom node folder. The models are ComfyUI's own
classes (``supported_models.SD15`` / ``SD20`` / ``SDXL`` around ``openaimodel.UNetModel``) with the
real context widths (768 / 1024 / 2048 + the SDXL text-time embedding), so each is recognised as its
family, but 32 base channels and one or two resolution levels: every model samples in a few
milliseconds per step. Everything is deterministic across processes.
"""

from __future__ import annotations

import math
import zlib

import torch
from comfy_api.latest import ComfyExtension, io

#: ``unet_config`` per test family. SD1/SD2: sites at both levels (widths 32 and 64, ragged), one
#: transformer block each. SDXL: no attention at the first level, two transformer blocks per
#: block at the second and third (names like ``input 5.1``), as in the real SDXL.
TINY = {
    "sd1": {
        "model_channels": 32,
        "channel_mult": [1, 2],
        "num_res_blocks": [1, 1],
        "transformer_depth": [1, 1],
        "transformer_depth_middle": 1,
        "transformer_depth_output": [1, 1, 1, 1],
        "context_dim": 768,
        "use_linear_in_transformer": False,
        "adm_in_channels": None,
    },
    "sd2": {
        "model_channels": 32,
        "channel_mult": [1, 2],
        "num_res_blocks": [1, 1],
        "transformer_depth": [1, 1],
        "transformer_depth_middle": 1,
        "transformer_depth_output": [1, 1, 1, 1],
        "context_dim": 1024,
        "use_linear_in_transformer": True,
        "adm_in_channels": None,
    },
    "sdxl": {
        "model_channels": 32,
        "channel_mult": [1, 2, 4],
        "num_res_blocks": [1, 1, 1],
        "transformer_depth": [0, 1, 2],
        "transformer_depth_middle": 2,
        "transformer_depth_output": [0, 0, 1, 1, 2, 2],
        "context_dim": 2048,
        "use_linear_in_transformer": True,
        "adm_in_channels": 2816,
        "num_classes": "sequential",
    },
}
#: The released models' first level alone (320 channels, one resnet and transformer per block): the
#: families' real base width and context, so ComfyUI's checkpoint loader detects them and the UNet
#: backbone names their family (``sd1``, ``sd2``, ``sdxl``); about 30M parameters.
WIDE = {
    family: {
        **TINY[family],
        "model_channels": 320,
        "channel_mult": [1],
        "num_res_blocks": [1],
        "transformer_depth": [1],
        "transformer_depth_middle": 1,
        "transformer_depth_output": [1, 1],
    }
    for family in TINY
}
FAMILIES = ("sd1", "sd2", "sd2-v", "sdxl")
SIZES = ("tiny", "wide")
#: Text context width and pooled width of each family's prompts.
CONTEXT = {"sd1": (768, 0), "sd2": (1024, 0), "sdxl": (2048, 1280)}


def unet_config(family: str, size: str = "tiny") -> dict:
    """The full ``unet_config`` ComfyUI's ``UNetModel`` takes for a ``size`` model of ``family``."""
    config = {
        "use_checkpoint": False,
        "image_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "use_spatial_transformer": True,
        "legacy": False,
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
        **(TINY if size == "tiny" else WIDE)[family.removesuffix("-v")],
    }
    return config


def model_config(family: str, size: str = "tiny"):
    """ComfyUI's ``supported_models`` config of ``family`` around the ``size`` ``unet_config``."""
    import comfy.supported_models

    cls = {"sd1": comfy.supported_models.SD15, "sd2": comfy.supported_models.SD20, "sdxl": comfy.supported_models.SDXL}
    config = cls[family.removesuffix("-v")](unet_config(family, size))
    if size == "tiny" and config.unet_config.get("num_head_channels", -1) > 0:
        config.unet_config["num_head_channels"] = 16  # SD2/SDXL's 64 exceeds the tiny widths
    config.set_inference_dtype(torch.float32, None)
    return config


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Weights ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.02), biases ~ N(0, 0.02) (ComfyUI's ops
    leave parameters uninitialised)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in sorted(module.state_dict(keep_vars=True).items()):
            noise = torch.randn(tensor.shape, generator=generator)
            if tensor.dim() >= 2:
                tensor.copy_(noise / math.sqrt(max(1, math.prod(tensor.shape[1:]))))
            elif name.endswith("weight"):
                tensor.copy_(1.0 + 0.02 * noise)
            else:
                tensor.copy_(0.02 * noise)


def tiny_unet(family: str, seed: int = 0, size: str = "tiny", device=None):
    """A ComfyUI MODEL (``ModelPatcher``) of a random ``family`` UNet; ``sd2-v`` predicts v.

    ``device="meta"`` builds the model without weights (for checks that never run it).
    """
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher

    config = model_config(family, size)
    device = device or comfy.model_management.unet_offload_device()
    if family == "sd2-v":
        base = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.V_PREDICTION, device=device)
    else:
        base = config.get_model({}, "", device=device)
    if str(device) != "meta":
        randomize(base.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(
        base, load_device=comfy.model_management.get_torch_device(), offload_device=device
    )


def tiny_controlnet(family: str, seed: int = 1):
    """A ComfyUI CONTROL_NET: ``cldm.ControlNet`` with the tiny UNet's geometry, random weights."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management
    import comfy.ops

    config = model_config(family)
    settings = {k: v for k, v in config.unet_config.items() if k not in ("out_channels", "transformer_depth_output")}
    control_model = comfy.cldm.cldm.ControlNet(
        hint_channels=3, device="cpu", operations=comfy.ops.disable_weight_init, **settings
    )
    randomize(control_model, seed)
    probe_cross_attention(control_model)
    load_device = comfy.model_management.get_torch_device()
    return comfy.controlnet.ControlNet(control_model, load_device=load_device, manual_cast_dtype=None)


def probe_cross_attention(module: torch.nn.Module) -> None:
    """Record every call of ``module``'s cross-attentions in ``module.medsteer_probe``: the site's
    name, its output, and whether anything replaced its ``forward`` (as MedSteer's hooks do)."""
    module.medsteer_probe = probe = []
    for name, child in module.named_modules():
        if name.endswith("attn2"):

            def record(mod, args, output, name=name):
                patched = "forward" in mod.__dict__ or "forward" in mod.to_out.__dict__
                probe.append((name, output.detach().clone(), patched))

            child.register_forward_hook(record)


def attn2_patch(kind: str, scale: float):
    """Another pack's cross-attention patch: an ``attn2_output_patch`` scaling the output, or an
    ``attn2`` replace (as IP-Adapter installs) attending to ``scale`` times the values."""
    if kind == "attn2 output":
        return lambda n, extra_options: n * scale + 0.01

    def replace(q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        return optimized_attention(q, k, v * scale, extra_options["n_heads"])

    return replace


def site_blocks(model) -> list[tuple[str, int, int]]:
    """``(block kind, block index, transformer index)`` of every cross-attention of a ComfyUI UNet."""
    found = []
    for name, _ in model.model.diffusion_model.named_modules():
        parts = name.split(".")
        if parts[-1] == "attn2":
            kind = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}[parts[0]]
            index = 0 if kind == "middle" else int(parts[1])
            found.append((kind, index, int(parts[-2])))
    return found


def weight_patch(model, strength: float, seed: int = 7):
    """A LoRA-like weight patch (``ModelPatcher.add_patches``, a low-rank difference) on every
    cross-attention's value projection and on the input convolution, on a clone."""
    clone = model.clone()
    generator = torch.Generator().manual_seed(seed)
    patches = {}
    for key, weight in model.model.state_dict().items():
        if key.endswith("attn2.to_v.weight") or key == "diffusion_model.input_blocks.0.0.weight":
            rows, rest = weight.shape[0], weight[0].numel()
            down = torch.randn(2, rest, generator=generator) / rest**0.5
            up = torch.randn(rows, 2, generator=generator)
            patches[key] = ((up @ down).reshape(weight.shape),)
    clone.add_patches(patches, strength)
    return clone


def random_conditioning(text: str, tokens: int, family: str):
    """CONDITIONING with ``family``'s context width (and SDXL's pooled output), seeded by the text."""
    width, pooled = CONTEXT[family.removesuffix("-v")]
    generator = torch.Generator().manual_seed(zlib.crc32(f"{family}:{text}".encode()))
    extra = {"pooled_output": torch.randn((1, pooled), generator=generator)} if pooled else {}
    return [[torch.randn((1, tokens, width), generator=generator), extra]]


class MedSteerTestUNet(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MedSteerTestUNet",
            display_name="MedSteer test: tiny random SD UNet",
            category="medsteer/testing",
            inputs=[
                io.Combo.Input("family", options=list(FAMILIES), default="sd1"),
                io.Int.Input("seed", default=0, min=0, max=2**31),
                io.Combo.Input("size", options=list(SIZES), default="tiny"),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, family, seed, size):
        return io.NodeOutput(tiny_unet(family, seed, size))


class MedSteerTestUNetConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MedSteerTestUNetConditioning",
            display_name="MedSteer test: random SD conditioning",
            category="medsteer/testing",
            inputs=[
                io.String.Input("text", default=""),
                io.Combo.Input("family", options=list(FAMILIES), default="sd1"),
                io.Int.Input("tokens", default=77, min=1, max=300),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, text, family, tokens):
        return io.NodeOutput(random_conditioning(text, tokens, family))


class MedSteerTestControlNet(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MedSteerTestControlNet",
            display_name="MedSteer test: tiny random ControlNet",
            category="medsteer/testing",
            inputs=[
                io.Combo.Input("family", options=list(FAMILIES), default="sd1"),
                io.Int.Input("seed", default=1, min=0, max=2**31),
            ],
            outputs=[io.ControlNet.Output()],
        )

    @classmethod
    def execute(cls, family, seed):
        return io.NodeOutput(tiny_controlnet(family, seed))


class MedSteerTestAttnPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MedSteerTestAttnPatch",
            display_name="MedSteer test: another pack's attn2 patch",
            category="medsteer/testing",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("kind", options=["attn2 output", "attn2 replace"], default="attn2 output"),
                io.Float.Input("scale", default=1.5, min=-10.0, max=10.0),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, kind, scale):
        clone = model.clone()
        patch = attn2_patch(kind, scale)
        if kind == "attn2 output":
            clone.set_model_attn2_output_patch(patch)
        else:
            for block, index, transformer in site_blocks(model):
                clone.set_model_attn2_replace(patch, block, index, transformer)
        return io.NodeOutput(clone)


class MedSteerTestWeightPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MedSteerTestWeightPatch",
            display_name="MedSteer test: LoRA-like weight patch",
            category="medsteer/testing",
            inputs=[io.Model.Input("model"), io.Float.Input("strength", default=1.0, min=-10.0, max=10.0)],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, strength):
        return io.NodeOutput(weight_patch(model, strength))


class _Extension(ComfyExtension):
    async def get_node_list(self):
        return [
            MedSteerTestUNet,
            MedSteerTestUNetConditioning,
            MedSteerTestControlNet,
            MedSteerTestAttnPatch,
            MedSteerTestWeightPatch,
        ]


async def comfy_entrypoint():
    return _Extension()
