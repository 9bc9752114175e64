"""The loader nodes in real ComfyUI: PixArt-alpha checkpoints and the PEFT LoRA (transformer + T5).

Graphs run through ComfyUI's executor with real text encoding (a small T5 in ComfyUI's own T5
code, ``medsteer_loader_test_nodes``). References come from outside our code: diffusers' forward
pass for the checkpoint layout, PEFT's ``merge_and_unload`` and the adapter files themselves for
the LoRA.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from comfy_boot import Graph, keep, ksampler, load_pack
from safetensors.torch import load_file, save_file

from tests.checkpoint_factories import PIXART_XL_2_512_CONFIG, make_medsteer_lora, merged_state_dict, save_adapter
from tests.tiny_models import CAPTION_CHANNELS, tiny_pixart, tiny_t5

HERE = Path(__file__).resolve().parent
LOADER = "MedSteerLoadPixArtAlpha"
LORA = "MedSteerLoadPeftLora"
SAMPLE = {"seed": 11, "steps": 3, "cfg": 4.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}
SIZE = 320  # 40x40 latent pixels: above PixArt's 32x32 limit, small enough for one CPU thread


@dataclass
class Files:
    root: Path
    pixart: torch.nn.Module
    t5: torch.nn.Module
    peft_transformer: object
    peft_t5: object

    @property
    def t5_folder(self) -> str:
        return str(self.root / "t5")

    def merged(self, strength_model: float, strength_clip: float) -> tuple[str, str]:
        """Reference folders: base + strength * (PEFT merge - base), for the transformer and T5."""
        name = f"merged_{strength_model}_{strength_clip}"
        pixart_dir = self.root / "diffusion_models" / name
        t5_dir = self.root / f"t5_{name}"
        if not pixart_dir.exists():
            for model, peft_model, strength, folder in (
                (self.pixart, self.peft_transformer, strength_model, pixart_dir),
                (self.t5, self.peft_t5, strength_clip, t5_dir),
            ):
                base = model.state_dict()
                merged = merged_state_dict(peft_model)
                reference = copy.deepcopy(model)
                reference.load_state_dict({k: base[k] + strength * (merged[k] - base[k]) for k in base})
                reference.save_pretrained(str(folder))
        return f"{name}/", str(t5_dir)


@pytest.fixture(scope="module")
def files(comfy_env, tmp_path_factory) -> Files:
    import folder_paths

    import nodes

    if "MedSteerTestT5Clip" not in nodes.NODE_CLASS_MAPPINGS:
        load_pack(HERE / "medsteer_loader_test_nodes")
    root = tmp_path_factory.mktemp("loader_models")
    for kind in ("diffusion_models", "checkpoints", "loras"):
        (root / kind).mkdir()
        folder_paths.add_model_folder_path(kind, str(root / kind))
    pixart, t5 = tiny_pixart(), tiny_t5()
    pixart.save_pretrained(str(root / "diffusion_models" / "tiny_pixart"))
    t5.save_pretrained(str(root / "t5"))
    peft_transformer, peft_t5 = make_medsteer_lora(root / "loras" / "medsteer", pixart, t5)
    return Files(root, pixart, t5, peft_transformer, peft_t5)


def text_graph(ckpt: str, t5_folder: str, lora: tuple[str, float, float] | None = None):
    """Loader (+ LoRA) -> CLIPTextEncode x2 -> KSampler, all real nodes."""
    g = Graph()
    model = g.add(LOADER, ckpt_name=ckpt, weight_dtype="fp32")
    clip = g.add("MedSteerTestT5Clip", folder=t5_folder)
    nodes = {"loader": model, "clip": clip}
    if lora is not None:
        adapted = g.add(
            LORA,
            model=model,
            clip=clip,
            lora_name=lora[0],
            strength_model=lora[1],
            strength_clip=lora[2],
        )
        nodes["lora"] = adapted
        model, clip = adapted[0], adapted[1]
    positive = g.add("CLIPTextEncode", clip=clip, text="an endoscopic image of dyed lifted polyps")
    negative = g.add("CLIPTextEncode", clip=clip, text="blurry")
    latent = g.add("EmptyLatentImage", width=SIZE, height=SIZE, batch_size=1)
    nodes["positive"] = positive
    nodes["sampler"] = ksampler(g, model, positive, negative, latent, **SAMPLE)
    keep(g, nodes["sampler"])
    return g, {k: v.id for k, v in nodes.items()}


def samples(comfy_env, graph, ids, fresh=True):
    result = comfy_env.run(graph, fresh=fresh)
    assert result.success, result.error
    return result, result.output(ids["sampler"])["samples"]


# ------------------------------------------------------------------------------------------------
# PixArt-alpha loader
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("additional_conditions", [False, True], ids=["512x512", "1024-MS"])
def test_full_size_pixart_xl_2_geometry_builds_as_alpha_without_allocating(comfy_env, additional_conditions):
    from comfy import latent_formats, model_detection, ops, supported_models
    from comfy.ldm.pixart.pixartms import PixArtMS
    from diffusers import PixArtTransformer2DModel

    config = {**PIXART_XL_2_512_CONFIG}
    if additional_conditions:
        config.update(sample_size=128, use_additional_conditions=True)
    with torch.device("meta"):
        diffusers_model = PixArtTransformer2DModel.from_config(config)
    original, geometry = comfy_env.core.weights.to_pixart_layout(diffusers_model.state_dict(), config)
    unet_config = geometry.comfy_unet_config()
    pixart = PixArtMS(
        **{k: v for k, v in unet_config.items() if k != "image_model"},
        device="meta",
        dtype=torch.float32,
        operations=ops.disable_weight_init,
    )
    comfy_shapes = {k: tuple(v.shape) for k, v in pixart.state_dict().items()}
    assert comfy_shapes == {k: tuple(v.shape) for k, v in original.items()}
    assert comfy_shapes == comfy_env.core.weights.expected_pixart_shapes(geometry)
    assert pixart.micro_conditioning is additional_conditions
    assert (pixart.hidden_size, pixart.depth, pixart.num_heads) == (1152, 28, 16)

    ours = supported_models.PixArtAlpha(unet_config)
    assert type(ours.latent_format) is latent_formats.SD15
    assert ours.latent_format.scale_factor == pytest.approx(0.18215)
    # ComfyUI's own detection of the same weights: the 512x512 model (no size / aspect embedders)
    # comes out as PixArt-Sigma with SDXL's latent scale; the 1024-MS one as alpha.
    detected = model_detection.model_config_from_unet(original, "")
    if additional_conditions:
        assert type(detected) is supported_models.PixArtAlpha
    else:
        assert type(detected) is supported_models.PixArtSigma
        assert detected.latent_format.scale_factor == pytest.approx(0.13025)


def test_original_pth_with_real_keys_loads_as_alpha_with_sd15_latents(comfy_env, files):
    from comfy import latent_formats, model_detection, supported_models

    ck = comfy_env.core.weights
    geometry = ck.PixArtGeometry(144, 2, 2, 2, 4, 8, CAPTION_CHANNELS, 120, 4.0, False, 64, 1)
    g = torch.Generator().manual_seed(3)
    sd = {k: torch.randn(s, generator=g) / math.sqrt(s[-1]) for k, s in ck.expected_pixart_shapes(geometry).items()}
    sd["pos_embed"] = torch.randn(1, 32 * 32, 144, generator=g)
    torch.save({"state_dict": sd}, files.root / "checkpoints" / "PixArt-tiny-512.pth")
    assert type(model_detection.model_config_from_unet(sd, "")) is supported_models.PixArtSigma

    graph = Graph()
    loader = graph.add(LOADER, ckpt_name="PixArt-tiny-512.pth", weight_dtype="default")
    positive = graph.add("MedSteerTestConditioning", text="a", tokens=7, channels=CAPTION_CHANNELS)
    negative = graph.add("MedSteerTestConditioning", text="", tokens=4, channels=CAPTION_CHANNELS)
    latent = graph.add("EmptyLatentImage", width=SIZE, height=SIZE, batch_size=2)
    sampler = ksampler(graph, loader, positive, negative, latent, **SAMPLE)
    keep(graph, sampler)
    result = comfy_env.run(graph, fresh=True)
    assert result.success, result.error
    model = result.output(loader.id)
    assert type(model.model.model_config) is supported_models.PixArtAlpha
    assert type(model.model.latent_format) is latent_formats.SD15
    x = torch.ones(1, 4, 8, 8)
    assert torch.equal(model.model.process_latent_in(x), x * 0.18215)
    transformer = model.model.diffusion_model
    assert transformer.micro_conditioning is False and transformer.pe_interpolation == 1
    weights = transformer.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in sd.items() if k != "pos_embed")
    out = result.output(sampler.id)["samples"]
    assert out.shape == (2, 4, SIZE // 8, SIZE // 8) and torch.isfinite(out).all()


def test_diffusers_folder_matches_diffusers_forward(comfy_env, files):
    graph = Graph()
    loader = graph.add(LOADER, ckpt_name="tiny_pixart/", weight_dtype="fp32")
    keep(graph, loader)
    result = comfy_env.run(graph, fresh=True)
    assert result.success, result.error
    transformer = result.output(loader.id).model.diffusion_model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 64, 64, generator=g)
    t = torch.tensor([999.0, 420.0])
    context = torch.randn(2, 9, CAPTION_CHANNELS, generator=g)
    with torch.no_grad():
        reference = files.pixart(
            hidden_states=x,
            encoder_hidden_states=context,
            timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample[:, :4]
        ours = transformer(x, t, context)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def test_loader_lists_files_and_folders_and_refuses_other_models(comfy_env, files):
    import nodes

    names = nodes.NODE_CLASS_MAPPINGS[LOADER].INPUT_TYPES()["required"]["ckpt_name"][1]["options"]
    assert "tiny_pixart/" in names and "tiny_pixart/diffusion_pytorch_model.safetensors" in names
    t5_weights = {k: v.clone() for k, v in files.t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(t5_weights, str(files.root / "checkpoints" / "t5.safetensors"))
    graph = Graph()
    keep(graph, graph.add(LOADER, ckpt_name="t5.safetensors", weight_dtype="default"))
    result = comfy_env.run(graph, fresh=True)
    assert not result.success
    assert "not a PixArt transformer checkpoint" in result.error


# ------------------------------------------------------------------------------------------------
# PEFT LoRA
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("strength_model", "strength_clip"), [(1.0, 1.0), (0.5, -1.25)])
def test_lora_graph_equals_peft_merged_reference(comfy_env, files, strength_model, strength_clip):
    graph, ids = text_graph("tiny_pixart/", files.t5_folder, ("medsteer/", strength_model, strength_clip))
    _, adapted = samples(comfy_env, graph, ids)
    merged_ckpt, merged_t5 = files.merged(strength_model, strength_clip)
    graph, ids = text_graph(merged_ckpt, merged_t5)
    _, reference = samples(comfy_env, graph, ids)
    graph, ids = text_graph("tiny_pixart/", files.t5_folder)
    _, plain = samples(comfy_env, graph, ids)
    # a random-weight model's latents are large (~1e3); float32 rounding of W + dW differs between
    # PEFT's merge and ComfyUI's patch, so compare relative to the latents' scale
    scale = adapted.abs().max()
    assert (adapted - reference).abs().max() < 1e-5 * scale
    assert (adapted - plain).abs().max() > 1e-2 * scale


def test_lora_patches_are_w_plus_alpha_over_r_times_ba(comfy_env, files):
    """Read the adapter files directly (no medsteer code) and recompute every patched weight."""
    from comfy import lora as comfy_lora

    strength_model, strength_clip = 0.75, 1.5
    graph, ids = text_graph("tiny_pixart/", files.t5_folder, ("medsteer/", strength_model, strength_clip))
    result, _ = samples(comfy_env, graph, ids)
    base_model = result.output(ids["loader"])
    base_clip = result.output(ids["clip"])
    model, clip = result.output(ids["lora"], 0), result.output(ids["lora"], 1)
    assert base_model.patches == {} and base_clip.patcher.patches == {}  # the inputs are untouched

    def adapter(sub):
        folder = files.root / "loras" / "medsteer" / sub
        config = json.loads((folder / "adapter_config.json").read_text())
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        scale = config["lora_alpha"] / config["r"]
        return lambda module: (
            scale
            * (
                tensors[f"base_model.model.{module}.lora_B.weight"].flatten(1)
                @ tensors[f"base_model.model.{module}.lora_A.weight"].flatten(1)
            )
        )

    transformer_delta, t5_delta = adapter("transformer_lora"), adapter("text_encoder_lora")
    h = 144
    weights = base_model.model.state_dict()
    qkv_key = "diffusion_model.blocks.1.attn.qkv.weight"
    patched = comfy_lora.calculate_weight(model.patches[qkv_key], weights[qkv_key].clone(), qkv_key)
    for i, part in enumerate(("to_q", "to_k", "to_v")):
        expected = weights[qkv_key][i * h : (i + 1) * h] + strength_model * transformer_delta(
            f"transformer_blocks.1.attn1.{part}"
        )
        torch.testing.assert_close(patched[i * h : (i + 1) * h], expected, rtol=0, atol=1e-6)
    conv_key = "diffusion_model.x_embedder.proj.weight"
    patched = comfy_lora.calculate_weight(model.patches[conv_key], weights[conv_key].clone(), conv_key)
    expected = weights[conv_key] + strength_model * transformer_delta("pos_embed.proj").reshape(weights[conv_key].shape)
    torch.testing.assert_close(patched, expected, rtol=0, atol=1e-6)
    assert len(model.patches) == 2 * 7 + 2  # per block: qkv, attn.proj, q_linear, kv_linear, cross proj, fc1, fc2

    encoder = base_clip.cond_stage_model.state_dict()
    t5_key = "t5xxl.transformer.encoder.block.1.layer.1.DenseReluDense.wi_0.weight"
    patched = comfy_lora.calculate_weight(clip.patcher.patches[t5_key], encoder[t5_key].clone(), t5_key)
    expected = encoder[t5_key] + strength_clip * t5_delta("encoder.block.1.layer.1.DenseReluDense.wi_0")
    torch.testing.assert_close(patched, expected, rtol=0, atol=1e-6)
    assert len(clip.patcher.patches) == 2 * 7


def test_lora_strength_zero_changes_nothing(comfy_env, files):
    graph, ids = text_graph("tiny_pixart/", files.t5_folder, ("medsteer/", 0.0, 0.0))
    result, adapted = samples(comfy_env, graph, ids)
    assert result.output(ids["lora"], 0) is result.output(ids["loader"])
    graph, ids = text_graph("tiny_pixart/", files.t5_folder)
    _, plain = samples(comfy_env, graph, ids)
    assert torch.equal(adapted, plain)


def test_lora_errors_name_the_problem(comfy_env, files):
    loras = files.root / "loras"
    # an adapter trained on a narrower PixArt: the key and both shapes
    save_adapter(tiny_pixart(heads=1), loras / "narrow" / "transformer_lora", 4, 8.0, ["to_q"])
    graph, ids = text_graph("tiny_pixart/", files.t5_folder, ("narrow/", 1.0, 0.0))
    result = comfy_env.run(graph, fresh=True)
    assert not result.success
    assert (
        "transformer_blocks.0.attn1.to_q" in result.error
        and "[72, 72]" in result.error
        and "[144, 144]" in result.error
    )

    # only one half present: needs strength_clip 0
    (loras / "half").mkdir()
    (loras / "half" / "transformer_lora").symlink_to(loras / "medsteer" / "transformer_lora")
    graph, ids = text_graph("tiny_pixart/", files.t5_folder, ("half/", 1.0, 1.0))
    result = comfy_env.run(graph, fresh=True)
    assert not result.success and "no text_encoder_lora/" in result.error and "strength_clip to 0" in result.error
    graph, ids = text_graph("tiny_pixart/", files.t5_folder, ("half/", 1.0, 0.0))
    assert comfy_env.run(graph, fresh=True).success

    # a non-PixArt MODEL
    graph, ids = text_graph("tiny_pixart/", files.t5_folder, ("medsteer/", 1.0, 0.0))
    graph.prompt["90"] = {
        "class_type": "MedSteerTestPixArt",
        "inputs": {
            "seed": 0,
            "hidden_size": 48,
            "depth": 4,
            "num_heads": 2,
            "caption_channels": 16,
            "kind": "not pixart",
        },
    }
    graph.prompt[ids["lora"]]["inputs"]["model"] = ["90", 0]
    result = comfy_env.run(graph, fresh=True)
    assert not result.success and "not a PixArt transformer" in result.error


# ------------------------------------------------------------------------------------------------
# Queue-time checks (ComfyUI 0.3.64 does not check V3 combo values against their options)
# ------------------------------------------------------------------------------------------------
def _errors_by_node(comfy_env, graph) -> dict[str, list[str]]:
    valid, _, _, node_errors = comfy_env.validate(graph)
    assert not valid
    return {node: [e["details"] for e in v["errors"]] for node, v in node_errors.items()}


def test_missing_checkpoint_lora_and_vector_are_all_reported_at_queue_time(comfy_env, files):
    from comfy_boot import STEER

    graph, ids = text_graph("PixArt-XL-2-512x512.pth", files.t5_folder, ("MedSteer_LoRA/", 1.0, 1.0))
    vector = graph.add("LoadPathologyVector", vector_name="no_such_vector.safetensors")
    steered = graph.add("ApplySSPSSteer", model=[ids["lora"], 0], pathology_vector=vector, **STEER)
    graph.prompt[ids["sampler"]]["inputs"]["model"] = steered[0]
    errors = _errors_by_node(comfy_env, graph)
    assert set(errors) == {ids["loader"], ids["lora"], vector.id}  # every missing file, in one validation
    (checkpoint,) = errors[ids["loader"]]
    assert "'PixArt-XL-2-512x512.pth' is not in models/diffusion_models or models/checkpoints" in checkpoint
    assert "put the PixArt-alpha .pth/.safetensors file there" in checkpoint
    (lora,) = errors[ids["lora"]]
    assert "'MedSteer_LoRA/' is not in models/loras" in lora and "transformer_lora/ and text_encoder_lora/" in lora
    (missing_vector,) = errors[vector.id]
    assert "'no_such_vector.safetensors'" in missing_vector and "models/medsteer/" in missing_vector
    # never a listing of what is there
    for message in (checkpoint, lora):
        assert "tiny_pixart" not in message and "medsteer/'" not in message
    # nothing ran: a queue-time refusal
    result = comfy_env.run(graph, fresh=True)
    assert result.error_type == "validation" and not result.outputs


def test_present_checkpoint_and_lora_pass_queue_time_validation(comfy_env, files):
    torch.save({"state_dict": {}}, files.root / "checkpoints" / "present.pth")  # only existence is checked here
    for ckpt in ("tiny_pixart/", "present.pth"):
        graph, _ = text_graph(ckpt, files.t5_folder, ("medsteer/", 1.0, 1.0))
        valid, error, _, node_errors = comfy_env.validate(graph)
        assert valid and node_errors == {}, (error, node_errors)


def test_model_names_resolve_only_inside_the_registered_folders(comfy_env, files):
    # each of these names reaches a real checkpoint / LoRA, but from outside the folder it names
    escaping_checkpoints = [
        "../diffusion_models/tiny_pixart/",
        str(files.root / "diffusion_models" / "tiny_pixart") + "/",
    ]
    escaping_loras = ["../loras/medsteer/", str(files.root / "loras" / "medsteer") + "/"]
    for ckpt, lora in zip(escaping_checkpoints, escaping_loras, strict=True):
        graph, ids = text_graph(ckpt, files.t5_folder, (lora, 1.0, 1.0))
        errors = _errors_by_node(comfy_env, graph)
        assert set(errors) == {ids["loader"], ids["lora"]}
        for node, name in ((ids["loader"], ckpt), (ids["lora"], lora)):
            (message,) = errors[node]
            assert repr(name) in message and "use a path relative to that folder, without '..'" in message


# ------------------------------------------------------------------------------------------------
# Crafted files (issue 12): errors that reach clients, bounded work, files only inside the folder
# ------------------------------------------------------------------------------------------------
def test_errors_reaching_clients_list_no_folder_and_show_no_server_path(comfy_env, files):
    """F1: "'/etc' has no transformer_lora/ folder (it has ['.java', '.pwd.lock', ...])"."""
    probe = files.root / "loras" / "probe"
    probe.mkdir()
    (probe / "secret_notes.txt").write_text("x")
    (probe / "text_encoder_lora").symlink_to(files.root / "loras" / "medsteer" / "text_encoder_lora")
    graph, _ = text_graph("tiny_pixart/", files.t5_folder, ("probe/", 1.0, 1.0))
    result = comfy_env.run(graph, fresh=True)
    assert not result.success and "has no transformer_lora/ folder" in result.error
    assert "'models/loras/probe'" in result.error  # the server's own path is not shown
    assert "secret_notes" not in result.error and str(files.root) not in result.error


def _crafted_folder(files, name: str, edit) -> str:
    import shutil

    folder = files.root / "diffusion_models" / name
    shutil.copytree(files.root / "diffusion_models" / "tiny_pixart", folder)
    edit(folder)
    return f"{name}/"


def _edit_config(**entries):
    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        config.update(entries)
        (folder / "config.json").write_text(json.dumps(config))

    return edit


def _shard_outside(folder):
    weights = folder / "diffusion_pytorch_model.safetensors"
    outside = folder.parent.parent / "outside.safetensors"
    weights.rename(outside)
    index = {"weight_map": dict.fromkeys(load_file(str(outside)), "../../outside.safetensors")}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))


def _huge_block_index(folder):
    sd = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    sd["transformer_blocks.100000000.ff.net.0.proj.weight"] = torch.zeros(576, 1536)
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize(
    "name, edit, message",
    [
        (
            "nan_interpolation",
            _edit_config(interpolation_scale=float("nan")),
            "interpolation_scale (config.json) is nan",
        ),
        ("negative_heads", _edit_config(num_attention_heads=-1), "num_attention_heads (config.json) is -1"),
        ("fewer_layers", _edit_config(num_layers=1), "num_layers = 1, but the weights have 2 blocks"),
        ("shard_outside", _shard_outside, "shards must be plain file names in the same folder"),
        ("huge_index", _huge_block_index, "block index '100000000' is not a block number from 0 to 999"),
    ],
)
def test_crafted_checkpoint_folders_fail_at_once_naming_the_field(comfy_env, files, name, edit, message):
    """F4 / F9 / F12 / F13: a NaN interpolation_scale sampled NaN, heads -1 failed only at sampling,
    a ../ shard was loaded, one huge block index took minutes and gigabytes."""
    import time

    graph, ids = text_graph(_crafted_folder(files, name, edit), files.t5_folder)
    start = time.perf_counter()
    result = comfy_env.run(graph, fresh=True)
    assert not result.success and message in result.error
    assert str(files.root) not in result.error
    assert time.perf_counter() - start < 60


def test_crafted_lora_config_is_refused_before_any_patch(comfy_env, files):
    """F5 / F8: a NaN alpha was applied; PEFT's pattern regex hung on (a+)+$."""
    import shutil

    for name, entries, message in (
        ("nan_alpha", {"lora_alpha": float("nan")}, "lora_alpha in 'models/loras/nan_alpha/transformer_lora"),
        ("regex_bomb", {"rank_pattern": {"(a+)+$": 2}}, "rank_pattern key '(a+)+$'"),
    ):
        lora = files.root / "loras" / name
        shutil.copytree(files.root / "loras" / "medsteer", lora)
        config_path = lora / "transformer_lora" / "adapter_config.json"
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **entries}))
        graph, _ = text_graph("tiny_pixart/", files.t5_folder, (f"{name}/", 1.0, 1.0))
        result = comfy_env.run(graph, fresh=True)
        assert not result.success and message in result.error, result.error
