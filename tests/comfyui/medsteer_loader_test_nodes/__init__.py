"""Test-only ComfyUI node: a small T5 encoder as a PixArt CLIP, so loader tests encode real text.

``MedSteerTestT5Clip`` reads a transformers ``T5EncoderModel.save_pretrained`` folder (config.json +
model.safetensors) into ComfyUI's own T5 implementation, wrapped like ComfyUI's PixArt text encoder
(the ``t5xxl`` clip with ComfyUI's T5 tokenizer, so the model needs T5-XXL's 32128-token vocabulary).
Loaded by tests/comfyui/test_loaders.py as a custom node folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from comfy_api.latest import ComfyExtension, io


def t5_clip(folder: str):
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    import comfy.text_encoders.pixart_t5
    import comfy.text_encoders.t5
    from safetensors.torch import load_file

    folder = Path(folder)
    hf = json.loads((folder / "config.json").read_text())
    config = {
        "d_ff": hf["d_ff"],
        "d_kv": hf["d_kv"],
        "d_model": hf["d_model"],
        "dense_act_fn": "gelu_pytorch_tanh",
        "is_gated_act": hf.get("feed_forward_proj", "").startswith("gated"),
        "layer_norm_epsilon": hf.get("layer_norm_epsilon", 1e-6),
        "model_type": "t5",
        "num_heads": hf["num_heads"],
        "num_layers": hf["num_layers"],
        "relative_attention_num_buckets": hf.get("relative_attention_num_buckets", 32),
        "vocab_size": hf["vocab_size"],
    }

    class SmallT5(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):  # noqa: B006 (ComfyUI's signature)
            super().__init__(
                device=device,
                dtype=dtype,
                textmodel_json_config=config,
                special_tokens={"end": 1, "pad": 0},
                model_class=comfy.text_encoders.t5.T5,
                enable_attention_masks=False,
                return_attention_masks=False,
                model_options={**model_options, "model_name": "t5xxl"},
            )

    class SmallPixArtTextEncoder(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006
            super().__init__(device=device, dtype=dtype, name="t5xxl", clip_model=SmallT5, model_options=model_options)

    target = comfy.supported_models_base.ClipTarget(
        comfy.text_encoders.pixart_t5.PixArtTokenizer, SmallPixArtTextEncoder
    )
    clip = comfy.sd.CLIP(target, model_options={"dtype": torch.float32})
    weights = {
        k: v for k, v in load_file(str(folder / "model.safetensors")).items() if k != "encoder.embed_tokens.weight"
    }
    missing, unexpected = clip.load_sd(weights)
    missing = [k for k in missing if k != "logit_scale"]
    if missing or unexpected:
        raise ValueError(f"T5 weights do not fit: missing {missing}, unexpected {unexpected}")
    return clip


class MedSteerTestT5Clip(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MedSteerTestT5Clip",
            display_name="MedSteer test: small T5 CLIP",
            category="medsteer/testing",
            inputs=[io.String.Input("folder", tooltip="A transformers T5EncoderModel save_pretrained folder.")],
            outputs=[io.Clip.Output(tooltip="ComfyUI's T5 with these weights, as a PixArt text encoder.")],
        )

    @classmethod
    def execute(cls, folder: str) -> io.NodeOutput:
        return io.NodeOutput(t5_clip(folder))


class _Extension(ComfyExtension):
    async def get_node_list(self):
        return [MedSteerTestT5Clip]


async def comfy_entrypoint():
    return _Extension()
