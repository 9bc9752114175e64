"""Write the example workflows (ComfyUI UI format) and their thumbnails into example_workflows/.

    python scripts/make_example_workflows.py            # JSON + JPEG thumbnails
    python scripts/make_example_workflows.py --check    # fail if the files on disk are stale

The graphs are described here once (nodes, links, widget values by name) and written in the format
the ComfyUI frontend saves, so the files open in ComfyUI as templates. Widget order per node type is
written out below; tests/comfyui/test_workflows.py converts every file to an API prompt against the
real node schemas and validates it with ComfyUI, so an order or name that drifts from a node's
schema fails there. Thumbnails are diagrams of the graph drawn with PIL: without the MedSteer LoRA
and PixArt weights (not downloadable in CI) a real render would be noise.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

OUT = Path(__file__).resolve().parents[1] / "example_workflows"

# ------------------------------------------------------------------------------------------------
# Node types used: (socket inputs, widgets in schema order, outputs). A widget flagged True carries
# the frontend's extra "control after generate" value (fixed / increment / randomize).
# ------------------------------------------------------------------------------------------------
SPECS: dict[str, tuple[list[tuple[str, str]], list[tuple[str, str, bool]], list[tuple[str, str]]]] = {
    "MedSteerLoadPixArtAlpha": (
        [],
        [("ckpt_name", "COMBO", False), ("weight_dtype", "COMBO", False)],
        [("model", "MODEL")],
    ),
    "MedSteerLoadPeftLora": (
        [("model", "MODEL"), ("clip", "CLIP")],
        [("lora_name", "COMBO", False), ("strength_model", "FLOAT", False), ("strength_clip", "FLOAT", False)],
        [("model", "MODEL"), ("clip", "CLIP")],
    ),
    "CheckpointLoaderSimple": (
        [],
        [("ckpt_name", "COMBO", False)],
        [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
    ),
    "CLIPLoader": (
        [],
        [("clip_name", "COMBO", False), ("type", "COMBO", False), ("device", "COMBO", False)],
        [("CLIP", "CLIP")],
    ),
    "VAELoader": ([], [("vae_name", "COMBO", False)], [("VAE", "VAE")]),
    "CLIPTextEncode": ([("clip", "CLIP")], [("text", "STRING", False)], [("CONDITIONING", "CONDITIONING")]),
    "EmptyLatentImage": (
        [],
        [("width", "INT", False), ("height", "INT", False), ("batch_size", "INT", False)],
        [("LATENT", "LATENT")],
    ),
    "KSampler": (
        [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent_image", "LATENT")],
        [
            ("seed", "INT", True),
            ("steps", "INT", False),
            ("cfg", "FLOAT", False),
            ("sampler_name", "COMBO", False),
            ("scheduler", "COMBO", False),
            ("denoise", "FLOAT", False),
        ],
        [("LATENT", "LATENT")],
    ),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [], [("IMAGE", "IMAGE")]),
    "PreviewImage": ([("images", "IMAGE")], [], []),
    "SaveImage": ([("images", "IMAGE")], [("filename_prefix", "STRING", False)], []),
    "ImageStitch": (
        [("image1", "IMAGE"), ("image2", "IMAGE")],
        [
            ("direction", "COMBO", False),
            ("match_image_size", "BOOLEAN", False),
            ("spacing_width", "INT", False),
            ("spacing_color", "COMBO", False),
        ],
        [("IMAGE", "IMAGE")],
    ),
    "BuildPathologyVector": (
        [
            ("model", "MODEL"),
            ("with_concept", "CONDITIONING"),
            ("without_concept", "CONDITIONING"),
            ("uncond", "CONDITIONING"),
            ("latent_image", "LATENT"),
        ],
        [
            ("seed", "INT", True),
            ("num_seeds", "INT", False),
            ("steps", "INT", False),
            ("cfg", "FLOAT", False),
            ("sampler_name", "COMBO", False),
            ("scheduler", "COMBO", False),
        ],
        [("pathology_vector", "PATHOLOGY_VECTOR"), ("latents_with", "LATENT"), ("latents_without", "LATENT")],
    ),
    "SavePathologyVector": ([("pathology_vector", "PATHOLOGY_VECTOR")], [("filename_prefix", "STRING", False)], []),
    "LoadPathologyVector": ([], [("vector_name", "COMBO", False)], [("pathology_vector", "PATHOLOGY_VECTOR")]),
    "InspectPathologyVector": (
        [("pathology_vector", "PATHOLOGY_VECTOR"), ("model", "MODEL")],
        [("colormap", "COMBO", False)],
        [("layer_profile", "IMAGE"), ("report", "STRING")],
    ),
    "ApplySSPSSteer": (
        [("model", "MODEL"), ("pathology_vector", "PATHOLOGY_VECTOR")],
        [
            ("strength", "FLOAT", False),
            ("layer_start", "INT", False),
            ("layer_end", "INT", False),
            ("start_percent", "FLOAT", False),
            ("end_percent", "FLOAT", False),
            ("rows", "COMBO", False),
            ("preserve_norm", "BOOLEAN", False),
            ("interpolation", "COMBO", False),
            ("layers", "STRING", False),
        ],
        [("steered_model", "MODEL")],
    ),
    "GateHeatmap": (
        [("model", "MODEL"), ("latent", "LATENT"), ("image", "IMAGE")],
        [
            ("preset", "COMBO", False),
            ("steps", "STRING", False),
            ("layers", "STRING", False),
            ("colormap", "COMBO", False),
            ("opacity", "FLOAT", False),
            ("edit", "INT", False),
        ],
        [("heatmap", "IMAGE"), ("mask", "MASK")],
    ),
    "LoadMedSteerMini": ([], [("denoiser", "COMBO", False)], [("model", "MODEL"), ("clip", "CLIP"), ("vae", "VAE")]),
    "EmptyChromaRadianceLatentImage": (
        [],
        [("width", "INT", False), ("height", "INT", False), ("batch_size", "INT", False)],
        [("LATENT", "LATENT")],
    ),
    "ImageScaleBy": (
        [("image", "IMAGE")],
        [("upscale_method", "COMBO", False), ("scale_by", "FLOAT", False)],
        [("IMAGE", "IMAGE")],
    ),
    "EmptyImage": (
        [],
        [("width", "INT", False), ("height", "INT", False), ("batch_size", "INT", False), ("color", "INT", False)],
        [("IMAGE", "IMAGE")],
    ),
    "ImageCompositeMasked": (
        [("destination", "IMAGE"), ("source", "IMAGE"), ("mask", "MASK")],
        [("x", "INT", False), ("y", "INT", False), ("resize_source", "BOOLEAN", False)],
        [("IMAGE", "IMAGE")],
    ),
    "MarkdownNote": ([], [("text", "STRING", False)], []),
    "PrimitiveNode": ([], [], []),  # outputs are set per use
}

# what a user downloads / builds (the README's install section says where each goes)
CHECKPOINT = "PixArt-XL-2-512x512.pth"
T5 = "t5xxl_fp16.safetensors"
VAE = "sd-vae-ft-ema.safetensors"
LORA = "MedSteer-Kvasir/"
POLYP_VECTOR = "polyp_to_normal_00001_.safetensors"
DYE_VECTOR = "dye_removal_00001_.safetensors"
SAMPLING = {"steps": 20, "cfg": 4.5, "sampler_name": "dpmpp_2m", "scheduler": "normal"}
PAPER_STEER = {
    "strength": 2.5,
    "layer_start": 8,
    "layer_end": 16,
    "start_percent": 0.0,
    "end_percent": 1.0,
    "rows": "cond and uncond",
    "preserve_norm": False,
    "interpolation": "nearest",
    "layers": "",
}
FIG3 = "paper Fig. 3 (layer 8; steps 8, 12, 14, 19)"
CUSTOM = "custom (steps and layers below)"


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[float, float]
    size: tuple[float, float]
    widgets: dict
    title: str | None = None
    inputs: dict = field(default_factory=dict)  # input name -> link id
    outputs: dict = field(default_factory=dict)  # slot -> [link ids]
    primitive_output: tuple[str, str] | None = None  # (type, widget name) for PrimitiveNode

    def __getitem__(self, slot: int) -> tuple[Node, int]:
        return (self, slot)


class Workflow:
    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.links: list[list] = []
        self.groups: list[dict] = []

    def add(self, type_: str, pos, size, title: str | None = None, **connections) -> Node:
        sockets, widgets, _ = SPECS[type_]
        socket_names = {name for name, _ in sockets}
        rows = max(len(sockets), len(SPECS[type_][2]))
        widget_rows = len(widgets) + sum(control for _, _, control in widgets)
        height = max(size[1], 16 + rows * SLOT_H + widget_rows * WIDGET_H)
        node = Node(len(self.nodes) + 1, type_, pos, (size[0], height), {}, title)
        self.nodes.append(node)
        for name, value in connections.items():
            if name in socket_names:
                self.link(value if isinstance(value, tuple) else value[0], node, name)  # a Node links output 0
            else:
                node.widgets[name] = value
        missing = [w for w, _, _ in widgets if w not in node.widgets]
        if missing:
            raise ValueError(f"{type_}: widgets {missing} have no value")
        return node

    def link(self, source: tuple[Node, int], target: Node, input_name: str) -> None:
        node, slot = source
        link_id = len(self.links) + 1
        if node.type == "PrimitiveNode":
            link_type = node.primitive_output[0]
        else:
            link_type = SPECS[node.type][2][slot][1]
        node.outputs.setdefault(slot, []).append(link_id)
        target.inputs[input_name] = link_id
        self.links.append([link_id, node.id, slot, target.id, None, link_type])  # target slot set on export

    def primitive(self, pos, title: str, type_: str, value, control: str, targets: list[tuple[Node, str]]) -> Node:
        node = Node(
            len(self.nodes) + 1, "PrimitiveNode", pos, (260, 82), {}, title, primitive_output=(type_, targets[0][1])
        )
        node.widgets = {"value": value, "control": control}
        self.nodes.append(node)
        for target, name in targets:
            self.link((node, 0), target, name)
        return node

    def note(self, pos, size, text: str) -> Node:
        node = Node(len(self.nodes) + 1, "MarkdownNote", pos, size, {"text": text}, "About this workflow")
        self.nodes.append(node)
        return node

    def group(self, title: str, bounding, color: str = "#3f789e") -> None:
        self.groups.append({"title": title, "bounding": list(bounding), "color": color, "font_size": 24, "flags": {}})

    # -------------------------------------------------------------------- export
    def _input_slots(self, node: Node) -> list[dict]:
        """Socket inputs, then widgets driven by a link (the frontend's widget inputs)."""
        if node.type == "PrimitiveNode":
            return []
        sockets, widgets, _ = SPECS[node.type]
        slots = [{"name": n, "type": t, "link": node.inputs.get(n)} for n, t in sockets]
        for name, type_, _ in widgets:
            if name in node.inputs:
                slots.append({"name": name, "type": type_, "widget": {"name": name}, "link": node.inputs[name]})
        return slots

    def _widget_values(self, node: Node) -> list:
        if node.type == "PrimitiveNode":
            return [node.widgets["value"], node.widgets["control"]]
        values = []
        for name, _, control in SPECS[node.type][1]:
            values.append(node.widgets[name])
            if control:
                values.append(node.widgets.get(f"{name}_control", "fixed"))
        return values

    def _order(self) -> dict[int, int]:
        deps = {n.id: set() for n in self.nodes}
        for _, origin, _, target, _, _ in self.links:
            deps[target].add(origin)
        order, done = {}, set()
        while len(done) < len(deps):
            ready = sorted(i for i, d in deps.items() if i not in done and d <= done)
            for i in ready:
                order[i] = len(order)
                done.add(i)
        return order

    def to_json(self) -> dict:
        order = self._order()
        by_id = {n.id: n for n in self.nodes}
        slots = {n.id: self._input_slots(n) for n in self.nodes}
        for link in self.links:
            target_slots = slots[link[3]]
            link[4] = next(i for i, s in enumerate(target_slots) if s["link"] == link[0])
        nodes = []
        for node in self.nodes:
            if node.type == "PrimitiveNode":
                type_, widget = node.primitive_output
                outputs = [
                    {
                        "name": type_,
                        "type": type_,
                        "links": node.outputs.get(0, []),
                        "slot_index": 0,
                        "widget": {"name": widget},
                    }
                ]
            else:
                outputs = [
                    {"name": name, "type": type_, "links": node.outputs.get(slot, []), "slot_index": slot}
                    for slot, (name, type_) in enumerate(SPECS[node.type][2])
                ]
            entry = {
                "id": node.id,
                "type": node.type,
                "pos": list(node.pos),
                "size": list(node.size),
                "flags": {},
                "order": order[node.id],
                "mode": 0,
                "inputs": slots[node.id],
                "outputs": outputs,
                "properties": {}
                if node.type in ("PrimitiveNode", "MarkdownNote")
                else {"Node name for S&R": node.type},
                "widgets_values": self._widget_values(node),
            }
            if node.title:
                entry["title"] = node.title
            nodes.append(entry)
        assert all(by_id[link[1]] and by_id[link[3]] for link in self.links)
        return {
            "id": "00000000-0000-4000-8000-000000000000",
            "revision": 0,
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": nodes,
            "links": [list(link) for link in self.links],
            "groups": self.groups,
            "config": {},
            "extra": {"ds": {"scale": VIEW_SCALE, "offset": [40, 80]}},
            "version": 0.4,
        }


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------
def model_stack(w: Workflow, note: str):
    """Checkpoint + T5 + MedSteer LoRA + VAE in the left column, the note under them.

    Returns:
        (model, clip, vae) links.
    """
    x = 40
    checkpoint = w.add(
        "MedSteerLoadPixArtAlpha",
        (x, 70),
        (380, 82),
        ckpt_name=CHECKPOINT,
        weight_dtype="default",
        title="PixArt-XL-2-512x512 (as PixArt-alpha)",
    )
    t5 = w.add("CLIPLoader", (x, 210), (380, 106), clip_name=T5, type="pixart", device="default", title="T5-XXL")
    lora = w.add(
        "MedSteerLoadPeftLora",
        (x, 370),
        (380, 130),
        model=checkpoint[0],
        clip=t5[0],
        lora_name=LORA,
        strength_model=1.0,
        strength_clip=1.0,
        title="MedSteer LoRA (transformer + T5)",
    )
    vae = w.add("VAELoader", (x, 600), (380, 58), vae_name=VAE, title="VAE (sd-vae-ft-ema)")
    w.group("1  Load", (20, 0, 420, 700))
    w.note((x, 760), (380, 600), NOTE_HEAD + note + "\n\n" + FILES_NOTE)
    return lora[0], lora[1], vae[0]


def sampler(
    w: Workflow, title, model, positive, negative, latent, pos, seed=42, control="fixed", sampling=None
) -> Node:
    node = w.add(
        "KSampler",
        pos,
        (320, 262),
        title=title,
        model=model,
        positive=positive[0],
        negative=negative[0],
        latent_image=latent[0],
        seed=seed,
        denoise=1.0,
        **(sampling or SAMPLING),
    )
    node.widgets["seed_control"] = control
    return node


def decode(w: Workflow, latent: tuple[Node, int], vae, pos, title) -> Node:
    return w.add("VAEDecode", pos, (210, 46), samples=latent, vae=vae, title=title)


def stitch(w: Workflow, left, right, pos, title) -> Node:
    return w.add(
        "ImageStitch",
        pos,
        (300, 150),
        image1=left,
        image2=right,
        direction="right",
        match_image_size=True,
        spacing_width=8,
        spacing_color="white",
        title=title,
    )


def heatmap(
    w: Workflow,
    model,
    latent,
    image,
    pos,
    preset: str,
    edit: int = -1,
    title="Where the model steered",
    steps: str = "all",
) -> Node:
    return w.add(
        "GateHeatmap",
        pos,
        (300, 230),
        model=model,
        latent=latent,
        image=image,
        preset=preset,
        steps=steps,
        layers="mean",
        colormap="viridis",
        opacity=0.5,
        edit=edit,
        title=title,
    )


# The zoom a template opens at. Frontend 1.27.10 draws node text only at zoom >= min_font_size_for_lod
# / (NODE_TEXT_SIZE * sqrt(devicePixelRatio)) = 8 / 14 = 0.571 on a plain screen (LGraphCanvas
# updateLowQualityThreshold); below it every node is a blank box. 0.6 keeps text and the whole graph
# (about 3000 x 1250 canvas units) on a 1920 x 1080 screen.
VIEW_SCALE = 0.6

NOTE_HEAD = "**MedSteer** steers PixArt's cross-attention off a *pathology vector* (Pham et al.).\n\n"
FILES_NOTE = (
    "**Model: real PixArt-alpha 512 px + the MedSteer LoRA** (none of these files ships with the pack):\n"
    "- `models/checkpoints/PixArt-XL-2-512x512.pth`: from the Hugging Face repo `PixArt-alpha/PixArt-alpha` "
    "(or the diffusers folder `PixArt-alpha/PixArt-XL-2-512x512`)\n"
    "- `models/text_encoders/t5xxl_fp16.safetensors`: T5-XXL, e.g. from `comfyanonymous/flux_text_encoders`\n"
    "- `models/vae/sd-vae-ft-ema.safetensors`: `stabilityai/sd-vae-ft-ema` "
    "(its `diffusion_pytorch_model.safetensors`, renamed)\n"
    "- `models/loras/MedSteer-Kvasir/` (`transformer_lora/` + `text_encoder_lora/`): the MedSteer authors' "
    "Kvasir LoRA, from their release of the paper (not redistributed here)\n"
    "- vectors in `models/medsteer/`, made by *medsteer_build_vector*.\n"
    "README, *Loading PixArt-XL-2-512x512 and the MedSteer LoRA*, has the details."
)
# columns: 1 load (x 40), 2 prompts (x 490) + steering (x 950), 3 samplers (x 1350), 4 outputs (x 1750+)
PROMPT_X, STEER_X, SAMPLER_X, OUT_X = 490, 950, 1350, 1750


def steering_inputs(
    w: Workflow, clip, positive_text: str, vectors: list[tuple[str, str]], batch: int = 1, latent_title=None, size=512
):
    positive = w.add(
        "CLIPTextEncode", (PROMPT_X, 70), (420, 120), clip=clip, text=positive_text, title="Prompt (with the concept)"
    )
    negative = w.add("CLIPTextEncode", (PROMPT_X, 250), (420, 90), clip=clip, text="", title="Negative (empty)")
    loaded = [
        w.add("LoadPathologyVector", (PROMPT_X, 400 + 100 * i), (420, 60), vector_name=name, title=title)
        for i, (name, title) in enumerate(vectors)
    ]
    latent = w.add(
        "EmptyLatentImage",
        (PROMPT_X, 400 + 100 * len(vectors)),
        (420, 106),
        width=size,
        height=size,
        batch_size=batch,
        title=latent_title,
    )
    return positive, negative, loaded, latent


# ------------------------------------------------------------------------------------------------
# The five workflows
# ------------------------------------------------------------------------------------------------
def build_vector() -> Workflow:
    w = Workflow()
    model, clip, vae = model_stack(
        w,
        "Builds the vector that turns *polyps* into *normal cecum*: every seed is sampled with both prompts and "
        "the cross-attention outputs are averaged per layer and timestep (paper: 50 seeds, 20 steps). It is "
        "saved as `polyp_to_normal_00001_.safetensors`, which the counterfactual workflows load. For dye "
        "removal use *An endoscopic image of dyed lifted polyps* / *An endoscopic image of polyps* and the "
        "prefix `dye_removal`.",
    )
    with_concept = w.add(
        "CLIPTextEncode",
        (PROMPT_X, 70),
        (420, 100),
        clip=clip,
        text="An endoscopic image of polyps",
        title="With the concept",
    )
    without = w.add(
        "CLIPTextEncode",
        (PROMPT_X, 230),
        (420, 100),
        clip=clip,
        text="An endoscopic image of normal cecum",
        title="Without the concept",
    )
    uncond = w.add("CLIPTextEncode", (PROMPT_X, 390), (420, 80), clip=clip, text="", title="Unconditional (empty)")
    latent = w.add(
        "EmptyLatentImage",
        (PROMPT_X, 530),
        (420, 106),
        width=512,
        height=512,
        batch_size=10,
        title="Size + seeds per pass",
    )
    w.group("2  Prompts differing in the concept", (470, 0, 460, 700), "#8A8")
    build = w.add(
        "BuildPathologyVector",
        (STEER_X + 40, 70),
        (360, 330),
        title="Build pathology vector (50 seeds, 20 steps)",
        model=model,
        with_concept=with_concept[0],
        without_concept=without[0],
        uncond=uncond[0],
        latent_image=latent[0],
        seed=0,
        num_seeds=50,
        **SAMPLING,
    )
    w.add(
        "SavePathologyVector",
        (STEER_X + 40, 520),
        (360, 70),
        pathology_vector=build[0],
        filename_prefix="polyp_to_normal",
        title="Save to models/medsteer/",
    )
    inspect = w.add(
        "InspectPathologyVector",
        (STEER_X + 40, 630),
        (360, 90),
        pathology_vector=build[0],
        colormap="viridis",
        title="Inspect: which layers carry the concept",
    )
    w.add(
        "PreviewImage",
        (STEER_X + 40, 760),
        (360, 300),
        images=inspect[0],
        title="Layer profile (rows = steps, columns = layers)",
    )
    w.group("3  Build + save + inspect", (STEER_X + 20, 0, 400, 1080), "#88A")
    with_img = decode(w, build[1], vae, (1450, 70), "Decode (with)")
    without_img = decode(w, build[2], vae, (1450, 400), "Decode (without)")
    w.add("PreviewImage", (1700, 70), (480, 300), images=with_img[0], title="Built from: with the concept")
    w.add("PreviewImage", (1700, 400), (480, 300), images=without_img[0], title="Built from: without it")
    w.group("4  Check what the vector was built from", (1430, 0, 770, 720), "#A88")
    return w


def pair(
    prompt_text: str, vector: str, heatmap_preset: str, note: str, vector_title: str, heatmap_steps: str = "all"
) -> Workflow:
    w = Workflow()
    model, clip, vae = model_stack(w, note)
    pair_graph(
        w,
        (model, clip, vae),
        prompt_text,
        (vector, vector_title),
        (PAPER_STEER, "Steer (paper: 2.5, layers 8-16)"),
        (heatmap_preset, heatmap_steps),
    )
    return w


def pair_graph(w: Workflow, loaded, prompt_text: str, vector, steering, heat, sampling=None, size=512) -> None:
    """Prompts, vector, one steering node, two samplers fed by one seed primitive, the pair and its heatmap.

    Args:
        loaded: ``(model, clip, vae)`` links.
        vector: ``(file name, title)`` of the LoadPathologyVector node.
        steering: ``(ApplySSPSSteer widgets, title)``.
        heat: ``(GateHeatmap preset, steps)``.
        sampling: the KSampler settings (default: the paper's).
        size: the image size (square, px).
    """
    model, clip, vae = loaded
    positive, negative, (vec,), latent = steering_inputs(w, clip, prompt_text, [vector], size=size)
    steer = w.add(
        "ApplySSPSSteer",
        (STEER_X, 330),
        (340, 262),
        model=model,
        pathology_vector=vec[0],
        title=steering[1],
        **steering[0],
    )
    w.group("2  Prompt, vector, steering", (470, 0, 850, 700), "#8A8")
    runs = []
    for title, chosen, y in (("Steered sampler", steer[0], 70), ("Unsteered sampler", model, 420)):
        runs.append(
            sampler(
                w, title, chosen, positive, negative, latent, (SAMPLER_X, y), control="randomize", sampling=sampling
            )
        )
    steered, unsteered = runs
    w.primitive(
        (STEER_X, 90),
        "seed (shared by both samplers)",
        "INT",
        42,
        "randomize",
        [(steered, "seed"), (unsteered, "seed")],
    )
    w.group("3  One seed, two samplers", (SAMPLER_X - 20, 0, 360, 760), "#88A")
    steered_img = decode(w, steered[0], vae, (OUT_X, 70), "Decode steered")
    unsteered_img = decode(w, unsteered[0], vae, (OUT_X, 420), "Decode unsteered")
    pair_image = stitch(w, unsteered_img[0], steered_img[0], (OUT_X + 250, 70), "unsteered | steered")
    heat_node = heatmap(w, steer[0], steered[0], steered_img[0], (OUT_X + 250, 380), heat[0], steps=heat[1])
    w.add(
        "PreviewImage",
        (OUT_X + 600, 70),
        (560, 300),
        images=pair_image[0],
        title="Counterfactual pair: unsteered | steered",
    )
    w.add("PreviewImage", (OUT_X + 600, 420), (560, 300), images=heat_node[0], title="Gate heatmap")
    w.group("4  See the pair and where the model steered", (OUT_X - 20, 0, 1200, 760), "#A88")


def counterfactual_pair() -> Workflow:
    return pair(
        "An endoscopic image of polyps",
        POLYP_VECTOR,
        FIG3,
        "A counterfactual pair: the same seed (one primitive feeds both samplers) sampled with and without "
        "steering. Only the polyp should turn into normal mucosa; anatomy and texture stay. The heatmap is the "
        "paper's Fig. 3: the gate at layer 8, steps 8/12/14/19 (broad early, sparse late). Build "
        "`polyp_to_normal_00001_.safetensors` with *medsteer_build_vector* first.",
        "Pathology vector: polyp -> normal",
    )


def dye_removal() -> Workflow:
    return pair(
        "An endoscopic image of dyed lifted polyps",
        DYE_VECTOR,
        CUSTOM,
        "Dye removal: the prompt keeps *dyed lifted polyps*; the steered sampler removes the blue dye with the "
        "`dye_removal` vector (built in *medsteer_build_vector* from *dyed lifted polyps* vs *polyps*). The "
        "heatmap overlays the gate of the last step, averaged over the steered layers, on the steered image "
        "(set `steps` to `all` for one overlay per step).",
        "Pathology vector: dye removal",
        heatmap_steps="last",
    )


def compositional_edit() -> Workflow:
    w = Workflow()
    model, clip, vae = model_stack(
        w,
        "A compositional edit: two ApplySSPSSteer nodes in a chain compose their edits (dye removal, then "
        "polyp -> normal cecum). Three samplers share one seed: unsteered, the first edit only, both edits. "
        "`edit` on GateHeatmap picks which edit's gate to show (0 = the first in the chain).",
    )
    positive, negative, (dye, polyp), latent = steering_inputs(
        w,
        clip,
        "An endoscopic image of dyed lifted polyps",
        [(DYE_VECTOR, "Vector 1: dye removal"), (POLYP_VECTOR, "Vector 2: polyp -> normal")],
    )
    first = w.add(
        "ApplySSPSSteer",
        (STEER_X, 230),
        (340, 262),
        model=model,
        pathology_vector=dye[0],
        title="Edit 0: remove the dye",
        **PAPER_STEER,
    )
    second = w.add(
        "ApplySSPSSteer",
        (STEER_X, 560),
        (340, 262),
        model=first[0],
        pathology_vector=polyp[0],
        title="Edit 1: polyp -> normal",
        **PAPER_STEER,
    )
    w.group("2  Two vectors, chained", (470, 0, 850, 880), "#8A8")
    both = sampler(w, "Both edits", second[0], positive, negative, latent, (SAMPLER_X, 70), control="randomize")
    dye_only = sampler(
        w, "Dye removal only", first[0], positive, negative, latent, (SAMPLER_X, 400), control="randomize"
    )
    plain = sampler(w, "Unsteered", model, positive, negative, latent, (SAMPLER_X, 730), control="randomize")
    w.primitive(
        (STEER_X, 90),
        "seed (shared by the three samplers)",
        "INT",
        42,
        "randomize",
        [(both, "seed"), (dye_only, "seed"), (plain, "seed")],
    )
    w.group("3  One seed, three samplers", (SAMPLER_X - 20, 0, 360, 1060), "#88A")
    images = [
        decode(w, s[0], vae, (OUT_X, 70 + 330 * i), f"Decode: {t}")
        for i, (s, t) in enumerate(((plain, "unsteered"), (dye_only, "dye removed"), (both, "both")))
    ]
    first_stitch = stitch(w, images[0][0], images[1][0], (OUT_X + 250, 70), "unsteered | dye removed")
    final = stitch(w, first_stitch[0], images[2][0], (OUT_X + 250, 280), "... | + polyp -> normal")
    w.add(
        "PreviewImage",
        (OUT_X + 600, 70),
        (620, 300),
        images=final[0],
        title="unsteered | dye removed | dye removed + polyp -> normal",
    )
    for i in (0, 1):
        heat = heatmap(
            w, second[0], both[0], images[2][0], (OUT_X + 250, 490 + 280 * i), CUSTOM, edit=i, title=f"Gate of edit {i}"
        )
        w.add("PreviewImage", (OUT_X + 600 + 320 * i, 420), (300, 300), images=heat[0], title=f"Edit {i} gate")
    w.group("4  Compare, and see each edit's gate", (OUT_X - 20, 0, 1260, 1060), "#A88")
    return w


def batch_pairs() -> Workflow:
    w = Workflow()
    model, clip, vae = model_stack(
        w,
        "A batch of counterfactual pairs for a dataset: each run samples a batch of 8 noises twice, steered and "
        "unsteered, and saves them with matching numbers as `output/medsteer/steered_*`, `unsteered_*` and side "
        "by side as `pair_*`. The seed primitive increments after every run: queue the workflow N times for "
        "8N pairs. For thousands of pairs the headless `medsteer generate` command is faster.",
    )
    positive, negative, (vec,), latent = steering_inputs(
        w,
        clip,
        "An endoscopic image of polyps",
        [(POLYP_VECTOR, "Pathology vector: polyp -> normal")],
        batch=8,
        latent_title="8 pairs per run",
    )
    steer = w.add(
        "ApplySSPSSteer",
        (STEER_X, 330),
        (340, 262),
        model=model,
        pathology_vector=vec[0],
        title="Steer (paper settings)",
        **PAPER_STEER,
    )
    w.group("2  Prompt, vector, steering", (470, 0, 850, 700), "#8A8")
    steered = sampler(
        w, "Steered sampler", steer[0], positive, negative, latent, (SAMPLER_X, 70), seed=0, control="increment"
    )
    unsteered = sampler(
        w, "Unsteered sampler", model, positive, negative, latent, (SAMPLER_X, 420), seed=0, control="increment"
    )
    w.primitive((STEER_X, 90), "seed (+1 per run)", "INT", 0, "increment", [(steered, "seed"), (unsteered, "seed")])
    w.group("3  8 pairs per run", (SAMPLER_X - 20, 0, 360, 760), "#88A")
    steered_img = decode(w, steered[0], vae, (OUT_X, 70), "Decode steered")
    unsteered_img = decode(w, unsteered[0], vae, (OUT_X, 420), "Decode unsteered")
    w.add(
        "SaveImage",
        (OUT_X + 250, 70),
        (320, 270),
        images=steered_img[0],
        filename_prefix="medsteer/steered",
        title="Save steered",
    )
    w.add(
        "SaveImage",
        (OUT_X + 250, 420),
        (320, 270),
        images=unsteered_img[0],
        filename_prefix="medsteer/unsteered",
        title="Save unsteered",
    )
    side = stitch(w, unsteered_img[0], steered_img[0], (OUT_X + 610, 70), "unsteered | steered")
    w.add(
        "SaveImage",
        (OUT_X + 610, 280),
        (420, 410),
        images=side[0],
        filename_prefix="medsteer/pair",
        title="Save pairs side by side",
    )
    w.group("4  Save aligned pairs", (OUT_X - 20, 0, 1090, 760), "#A88")
    return w


SD_CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"
SD_VECTOR = "sd15_polyp_to_normal_00001_.safetensors"
SD_SAMPLING = {"steps": 20, "cfg": 7.0, "sampler_name": "dpmpp_2m", "scheduler": "karras"}
#: The UNet preset window (``plan.default_window``), by name: SD1.x/2.x's coarsest cross-attention
#: level and below, sites 4-10 of 16 (SDXL: "input 7.0 - output 2.9").
SD_STEER = {**PAPER_STEER, "layer_start": 4, "layer_end": 10, "layers": "input 7 - output 5"}
SD_NOTE = (
    "**MedSteer on Stable Diffusion** (SD1.x, SD2.x eps or v, SDXL): steers the UNet's cross-attention "
    "(attn2) off a *pathology vector*. A counterfactual pair: one seed primitive feeds an unsteered and a "
    "steered sampler; the gate heatmap shows where the model steered at the last step.\n\n"
    "**Model:** any single-file SD checkpoint in `models/checkpoints/` (here `v1-5-pruned-emaonly-fp16`; "
    "a medical fine-tune such as MINIM or RoentGen-v2 is what you want). A diffusers UNet "
    "(`unet/diffusion_pytorch_model.safetensors`) goes to `models/diffusion_models/` and loads with "
    "*Load Diffusion Model*, with its CLIP and VAE loaded separately; README, *Backbones*.\n\n"
    "**Vector:** build `sd15_polyp_to_normal` on this same checkpoint with BuildPathologyVector (open "
    "*medsteer_build_vector* and swap its loaders for this Load Checkpoint) or `medsteer build-vector`; a vector "
    "only fits the family it was built on (an SD1.5 vector is refused on SDXL).\n\n"
    "**Layers** by name: `input 7 - output 5` is the UNet preset for SD1.x/2.x (the coarsest "
    "cross-attention level and below; SDXL: `input 7.0 - output 2.9`; `preset` picks it for any model), "
    "`input 1 - output 11` every site. InspectPathologyVector with the model connected lists each site's "
    "name. Strength 0 gives the unsteered image exactly. SD2.x-v checkpoints that load as eps need "
    "ModelSamplingDiscrete (v_prediction)."
)


def counterfactual_pair_sd() -> Workflow:
    w = Workflow()
    checkpoint = w.add(
        "CheckpointLoaderSimple",
        (40, 70),
        (380, 98),
        ckpt_name=SD_CHECKPOINT,
        title="SD checkpoint (SD1.x / SD2.x / SDXL)",
    )
    w.group("1  Load", (20, 0, 420, 240))
    w.note((40, 290), (380, 760), SD_NOTE)
    pair_graph(
        w,
        (checkpoint[0], checkpoint[1], checkpoint[2]),
        "An endoscopic image of polyps",
        (SD_VECTOR, "Pathology vector (built on this SD model)"),
        (SD_STEER, "Steer (UNet preset: input 7 - output 5, strength 2.5)"),
        (CUSTOM, "last"),
        sampling=SD_SAMPLING,
    )
    return w


MINI_SAMPLING = {"steps": 20, "cfg": 2.0, "sampler_name": "ddim", "scheduler": "simple"}
#: dye_removal.safetensors' calibrated setting (its metadata; `medsteer inspect` shows it).
MINI_STEER = {**PAPER_STEER, "strength": 5.25, "layer_start": 1, "layer_end": 4}
MINI_NOTE = (
    "**Model: MedSteer-mini, shipped with the pack** (no downloads): a 6-layer PixArt transformer trained on a "
    "synthetic endoscopy world, 32x32 px in pixel space, with its own T5 text encoder. It stands in for "
    "PixArt-alpha + the MedSteer LoRA so you can see the method work in seconds on a CPU.\n\n"
    "**Queue it.** One seed feeds two samplers: unsteered and steered with the shipped `dye_removal` vector "
    "(built from *dyed lifted polyps* vs *polyps*; its calibrated setting: layers 1-4, strength 5.25). The "
    "blue dye should disappear while the polyp and the background stay. The gate heatmap shows where the "
    "model steered, and the last preview paints the gate MASK in red onto the unsteered image. The seed "
    "increments after every run: queue again for the next pair.\n\n"
    "**Try** `polyp_to_normal.safetensors` with the prompt *an endoscopic image of polyps* (layers 2-4, "
    "strength 2) or `colitis_to_normal.safetensors` with *an endoscopic image of ulcerative colitis* "
    "(layers 3-5, strength 1.25). Strength 0 gives the unsteered image exactly.\n\n"
    "**Sampling** as the mini was trained: 32x32 latent (EmptyChromaRadianceLatentImage), ddim + simple "
    "(trailing) schedule, 20 steps, CFG 2, empty negative prompt. The previews are upscaled 8x (nearest) "
    "so the 32 px images are visible.\n\n"
    "For real PixArt-alpha open *medsteer_counterfactual_pair* (README: where to get the weights)."
)


@dataclass(frozen=True)
class MiniTemplate:
    """What differs between the quickstart templates of the two shipped minis."""

    denoiser: str  # LoadMedSteerMini's choice
    title: str  # the loader's title
    note: str
    vector: str  # the shipped dye-removal vector's file name
    steer: dict  # its calibrated setting (ApplySSPSSteer widgets)
    steer_title: str
    window: str  # the steered sites, in words, for the heatmap's title


MINI = MiniTemplate(
    "MedSteer-mini (PixArt)",
    "MedSteer-mini (shipped, no downloads)",
    NOTE_HEAD + MINI_NOTE,
    "dye_removal.safetensors",
    MINI_STEER,
    "Steer (calibrated: layers 1-4, strength 5.25)",
    "layers 1-3",
)


#: The mini-UNet's shipped dye-removal vector and its sites (ComfyUI's names, execution order).
MINI_UNET_VECTOR = "unet_dye_removal.safetensors"
MINI_UNET_SITES = ("input 3", "input 5", "middle 0", "output 0", "output 1", "output 2", "output 3")
MINI_UNET_VECTOR_DIR = OUT.parent / "medsteer_core" / "mini" / "assets" / "vectors_unet"


def calibrated_setting(path: Path) -> tuple[int, int, float] | None:
    """``(layer_start, layer_end, strength)`` a shipped vector records as calibrated (its safetensors
    header's metadata), or None while it is not shipped."""
    if not path.is_file():
        return None
    with path.open("rb") as file:
        header = json.loads(file.read(int.from_bytes(file.read(8), "little")))
    meta = header.get("__metadata__", {})
    return (
        int(meta["calibrated_layer_start"]),
        int(meta["calibrated_layer_end"]),
        float(meta["calibrated_strength"]),
    )


def mini_unet_note(window: str, strength: str) -> str:
    return (
        "**Model: MedSteer-mini-UNet, shipped with the pack** (no downloads): a small Stable Diffusion-style UNet "
        "(32/64/96 channels, 7 cross-attention sites) trained on the same synthetic endoscopy world as "
        "MedSteer-mini, 32x32 px in pixel space, under MedSteer-mini's T5. ComfyUI loads it as its own SD UNet "
        "class, so it stands in for SD1.x/2.x models; its sites have ComfyUI's names (`input 3`, `input 5`, "
        "`middle 0`, `output 0` to `output 3`).\n\n"
        f"**Queue it.** One seed feeds two samplers: unsteered and steered with the shipped `{MINI_UNET_VECTOR}` "
        f"vector (built from *dyed lifted polyps* vs *polyps* on this UNet; its calibrated setting: {window}, "
        f"strength {strength}). The blue dye should disappear while the polyp and the background stay. The gate "
        "heatmap shows where the model steered (each site's gate on its own 16x16 or 8x8 grid, upsampled), and "
        "the last preview paints the gate MASK in red onto the unsteered image. The seed increments after every "
        "run: queue again for the next pair.\n\n"
        "**Try** the other shipped UNet vectors (`unet_polyp_to_normal`, `unet_colitis_to_normal`; MedSteer "
        "Inspect Pathology Vector shows each one's calibrated setting). A vector steers only the model family "
        "it was built on: the PixArt mini's vectors are refused here. Strength 0 gives the unsteered image "
        "exactly.\n\n"
        "**Sampling** as the mini-UNet was trained: 32x32 latent (EmptyChromaRadianceLatentImage), ddim + "
        "simple (trailing) schedule, 20 steps, CFG 2, empty negative prompt. The previews are upscaled 8x "
        "(nearest).\n\n"
        "For the PixArt mini open *medsteer_quickstart_mini*; for SD checkpoints *medsteer_counterfactual_pair_sd*."
    )


def quickstart_mini_unet() -> Workflow:
    """The quickstart on MedSteer-mini-UNet, steering with what its shipped vector records as
    calibrated (every site at strength 2.5, titled so, until the vector ships)."""
    setting = calibrated_setting(MINI_UNET_VECTOR_DIR / MINI_UNET_VECTOR)
    start, end, strength = setting or (0, len(MINI_UNET_SITES), 2.5)
    names = MINI_UNET_SITES[start] if end - start == 1 else f"{MINI_UNET_SITES[start]} - {MINI_UNET_SITES[end - 1]}"
    window = f"sites {names}" if setting else f"sites {names}, not calibrated yet"
    template = MiniTemplate(
        "MedSteer-mini-UNet",
        "MedSteer-mini-UNet (shipped, no downloads)",
        "**MedSteer** steers a UNet's cross-attention off a *pathology vector* (Pham et al.).\n\n"
        + mini_unet_note(window, f"{strength:g}"),
        MINI_UNET_VECTOR,
        {**PAPER_STEER, "strength": strength, "layer_start": start, "layer_end": end},
        f"Steer ({'calibrated: ' if setting else ''}{window}, strength {strength:g})",
        f"sites {names}",
    )
    return quickstart_mini(template)


def quickstart_mini(mini_template: MiniTemplate = MINI) -> Workflow:
    t = mini_template
    w = Workflow()
    mini = w.add("LoadMedSteerMini", (40, 70), (380, 100), title=t.title, denoiser=t.denoiser)
    w.group("1  Load", (20, 0, 420, 240))
    w.note((40, 290), (380, 760), t.note)
    positive = w.add(
        "CLIPTextEncode",
        (PROMPT_X, 70),
        (420, 100),
        clip=mini[1],
        text="an endoscopic image of dyed lifted polyps",
        title="Prompt (with the concept)",
    )
    negative = w.add("CLIPTextEncode", (PROMPT_X, 230), (420, 90), clip=mini[1], text="", title="Negative (empty)")
    vector = w.add(
        "LoadPathologyVector",
        (PROMPT_X, 380),
        (420, 60),
        vector_name=t.vector,
        title="Pathology vector: dye removal (shipped)",
    )
    latent = w.add(
        "EmptyChromaRadianceLatentImage",
        (PROMPT_X, 500),
        (420, 106),
        width=32,
        height=32,
        batch_size=1,
        title="32x32 px (pixel space)",
    )
    steer = w.add(
        "ApplySSPSSteer",
        (STEER_X, 330),
        (340, 262),
        model=mini[0],
        pathology_vector=vector[0],
        title=t.steer_title,
        **t.steer,
    )
    w.group("2  Prompt, vector, steering", (470, 0, 850, 700), "#8A8")
    steered = w.add(
        "KSampler",
        (SAMPLER_X, 70),
        (320, 262),
        title="Steered sampler",
        model=steer[0],
        positive=positive[0],
        negative=negative[0],
        latent_image=latent[0],
        seed=950000,
        denoise=1.0,
        **MINI_SAMPLING,
    )
    unsteered = w.add(
        "KSampler",
        (SAMPLER_X, 420),
        (320, 262),
        title="Unsteered sampler",
        model=mini[0],
        positive=positive[0],
        negative=negative[0],
        latent_image=latent[0],
        seed=950000,
        denoise=1.0,
        **MINI_SAMPLING,
    )
    for node in (steered, unsteered):
        node.widgets["seed_control"] = "increment"
    w.primitive(
        (STEER_X, 90),
        "seed (shared by both samplers)",
        "INT",
        950000,
        "increment",
        [(steered, "seed"), (unsteered, "seed")],
    )
    w.group("3  One seed, two samplers", (SAMPLER_X - 20, 0, 360, 760), "#88A")
    steered_img = decode(w, steered[0], mini[2], (OUT_X, 70), "Decode steered")
    unsteered_img = decode(w, unsteered[0], mini[2], (OUT_X, 420), "Decode unsteered")
    pair_image = w.add(
        "ImageStitch",
        (OUT_X + 250, 70),
        (300, 150),
        image1=unsteered_img[0],
        image2=steered_img[0],
        direction="right",
        match_image_size=True,
        spacing_width=2,
        spacing_color="white",
        title="unsteered | steered",
    )
    heat = heatmap(w, steer[0], steered[0], steered_img[0], (OUT_X + 250, 270), CUSTOM, steps="last")
    red = w.add("EmptyImage", (OUT_X, 560), (210, 130), width=32, height=32, batch_size=1, color=0xFF0000, title="Red")
    painted = w.add(
        "ImageCompositeMasked",
        (OUT_X + 250, 560),
        (300, 140),
        destination=unsteered_img[0],
        source=red[0],
        mask=heat[1],
        x=0,
        y=0,
        resize_source=False,
        title="Gate MASK in red on the unsteered image",
    )
    # (image, preview title, scale node position, preview position and size). The scale nodes sit
    # under the images they enlarge so that the graph fits a 1920 px wide screen at the stored zoom.
    previews = (
        (pair_image, "Counterfactual pair: unsteered | steered", (OUT_X + 250, 760), (OUT_X + 600, 70, 560, 300)),
        (heat, f"Gate heatmap (last step, {t.window})", (OUT_X + 250, 870), (OUT_X + 600, 420, 270, 300)),
        (painted, "Gate MASK on the unsteered image", (OUT_X + 250, 980), (OUT_X + 890, 420, 270, 300)),
    )
    for image, title, scale_pos, (px, py, pw, ph) in previews:
        big = w.add(
            "ImageScaleBy",
            scale_pos,
            (260, 82),
            image=image[0],
            upscale_method="nearest-exact",
            scale_by=8.0,
            title="8x (nearest)",
        )
        w.add("PreviewImage", (px, py), (pw, ph), images=big[0], title=title)
    w.group("4  See the pair and where the model steered", (OUT_X - 20, 0, 1200, 1090), "#A88")
    return w


WORKFLOWS = {
    "medsteer_quickstart_mini": quickstart_mini,
    "medsteer_quickstart_mini_unet": quickstart_mini_unet,
    "medsteer_build_vector": build_vector,
    "medsteer_counterfactual_pair": counterfactual_pair,
    "medsteer_counterfactual_pair_sd": counterfactual_pair_sd,
    "medsteer_dye_removal": dye_removal,
    "medsteer_compositional_edit": compositional_edit,
    "medsteer_batch_pairs": batch_pairs,
}

# ------------------------------------------------------------------------------------------------
# Thumbnails: the graph as a diagram
# ------------------------------------------------------------------------------------------------
TYPE_COLORS = {
    "MODEL": "#B39DDB",
    "CLIP": "#FFD500",
    "VAE": "#FF6E6E",
    "CONDITIONING": "#FFA931",
    "LATENT": "#FF9CF9",
    "IMAGE": "#64B5F6",
    "MASK": "#81C784",
    "INT": "#A1E88B",
    "PATHOLOGY_VECTOR": "#4DD0E1",
}
MEDSTEER = {
    "BuildPathologyVector",
    "ApplySSPSSteer",
    "GateHeatmap",
    "SavePathologyVector",
    "LoadPathologyVector",
    "InspectPathologyVector",
}
TITLE_H, SLOT_H, WIDGET_H = 30, 22, 22


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    return text if len(text) <= 34 else text[:31] + "..."


def render(workflow: dict, width: int = 1600) -> Image.Image:
    """Draw the workflow like the ComfyUI canvas: groups, nodes with sockets and widget values, links."""
    nodes = workflow["nodes"]
    x0 = min(n["pos"][0] for n in nodes + [{"pos": g["bounding"]} for g in workflow["groups"]]) - 30
    y0 = min(min(n["pos"][1] - TITLE_H for n in nodes), min(g["bounding"][1] for g in workflow["groups"])) - 30
    x1 = (
        max(
            max(n["pos"][0] + n["size"][0] for n in nodes),
            max(g["bounding"][0] + g["bounding"][2] for g in workflow["groups"]),
        )
        + 30
    )
    y1 = (
        max(
            max(n["pos"][1] + _height(n) for n in nodes),
            max(g["bounding"][1] + g["bounding"][3] for g in workflow["groups"]),
        )
        + 30
    )
    image = Image.new("RGB", (int(x1 - x0), int(y1 - y0)), "#1e1e1e")
    draw = ImageDraw.Draw(image, "RGBA")
    title_font, font, big = ImageFont.load_default(16), ImageFont.load_default(14), ImageFont.load_default(26)

    def at(x, y):
        return (x - x0, y - y0)

    for gx in range(0, image.width, 40):
        draw.line([(gx, 0), (gx, image.height)], fill="#242424")
    for gy in range(0, image.height, 40):
        draw.line([(0, gy), (image.width, gy)], fill="#242424")
    for group in workflow["groups"]:
        x, y, w, h = group["bounding"]
        color = group["color"]
        rgb = (
            tuple(int(color[i : i + 1] * 2, 16) for i in (1, 2, 3))
            if len(color) == 4
            else tuple(int(color[i : i + 2], 16) for i in (1, 3, 5))
        )
        draw.rounded_rectangle([at(x, y), at(x + w, y + h)], 8, fill=(*rgb, 40), outline=(*rgb, 160), width=2)
        draw.text(at(x + 12, y + 8), group["title"], font=big, fill=(*rgb, 255))

    slots = {}  # (node id, "in"/"out", index) -> canvas point
    for node in nodes:
        x, y = node["pos"]
        w = node["size"][0]
        for i in range(len(node["inputs"])):
            slots[(node["id"], "in", i)] = (x, y + 14 + i * SLOT_H)
        for i, _ in enumerate(node["outputs"]):
            slots[(node["id"], "out", i)] = (x + w, y + 14 + i * SLOT_H)
    for _, origin, oslot, target, tslot, type_ in workflow["links"]:
        (ax, ay), (bx, by) = slots[(origin, "out", oslot)], slots[(target, "in", tslot)]
        dx = max(60, abs(bx - ax) * 0.5)
        points = []
        for k in range(41):
            t = k / 40
            cx = (1 - t) ** 3 * ax + 3 * (1 - t) ** 2 * t * (ax + dx) + 3 * (1 - t) * t**2 * (bx - dx) + t**3 * bx
            cy = (1 - t) ** 3 * ay + 3 * (1 - t) ** 2 * t * ay + 3 * (1 - t) * t**2 * by + t**3 * by
            points.append(at(cx, cy))
        draw.line(points, fill=TYPE_COLORS.get(type_, "#bbbbbb"), width=3)

    for node in nodes:
        x, y = node["pos"]
        w, h = node["size"][0], _height(node)
        note = node["type"] == "MarkdownNote"
        header = "#2f6f5f" if node["type"] in MEDSTEER or node["type"].startswith("MedSteer") else "#353535"
        if node["type"] == "PrimitiveNode":
            header = "#4a5a2a"
        if note:
            header = "#4b4b2a"
        draw.rounded_rectangle(
            [at(x, y - TITLE_H), at(x + w, y + h)],
            8,
            fill="#2b2b2b" if not note else "#33331f",
            outline="#111111",
            width=2,
        )
        draw.rounded_rectangle([at(x, y - TITLE_H), at(x + w, y)], 8, fill=header)
        draw.text(at(x + 10, y - TITLE_H + 7), node.get("title", node["type"]), font=title_font, fill="#eeeeee")
        if note:
            _wrap(draw, at(x + 12, y + 10), node["widgets_values"][0], font, w - 24)
            continue
        for i, inp in enumerate(node["inputs"]):
            px, py = at(*slots[(node["id"], "in", i)])
            color = TYPE_COLORS.get(inp["type"], "#bbbbbb")
            draw.ellipse(
                [px - 5, py - 5, px + 5, py + 5],
                fill=color if inp["link"] is not None else None,
                outline=color,
                width=2,
            )
            draw.text((px + 10, py - 8), inp["name"], font=font, fill="#cccccc")
        for i, out in enumerate(node["outputs"]):
            px, py = at(*slots[(node["id"], "out", i)])
            color = TYPE_COLORS.get(out["type"], "#bbbbbb")
            draw.ellipse([px - 5, py - 5, px + 5, py + 5], fill=color)
            label = out["name"]
            draw.text((px - 10 - draw.textlength(label, font=font), py - 8), label, font=font, fill="#cccccc")
        rows = max(len(node["inputs"]), len(node["outputs"]))
        wy = y + 8 + rows * SLOT_H
        for name, value in _named_widgets(node):
            if wy + WIDGET_H > y + h:
                break
            draw.rounded_rectangle(
                [at(x + 10, wy), at(x + w - 10, wy + WIDGET_H - 3)], 6, fill="#222222", outline="#444444"
            )
            px, py = at(x + 18, wy + 2)
            draw.text((px, py), name, font=font, fill="#999999")
            text = _fmt(value)
            draw.text((px + w - 36 - draw.textlength(text, font=font), py), text, font=font, fill="#dddddd")
            wy += WIDGET_H
    if image.width > width:
        image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    return image


def _height(node: dict) -> float:
    return node["size"][1]


def _named_widgets(node: dict) -> list[tuple[str, object]]:
    if node["type"] == "PrimitiveNode":
        return [("value", node["widgets_values"][0]), ("control after generate", node["widgets_values"][1])]
    names = []
    for name, _, control in SPECS[node["type"]][1]:
        names.append(name)
        if control:
            names.append("control after generate")
    return list(zip(names, node["widgets_values"], strict=True))


def _wrap(draw: ImageDraw.ImageDraw, origin, text: str, font, width: float) -> None:
    x, y = origin
    for paragraph in text.replace("**", "").replace("*", "").replace("`", "").split("\n"):
        line = ""
        for word in paragraph.split(" "):
            trial = f"{line} {word}".strip()
            if draw.textlength(trial, font=font) > width and line:
                draw.text((x, y), line, font=font, fill="#dddddd")
                y += 19
                line = word
            else:
                line = trial
        draw.text((x, y), line, font=font, fill="#dddddd")
        y += 19


def build_files() -> dict[str, bytes]:
    files = {}
    for name, make in WORKFLOWS.items():
        workflow = make().to_json()
        files[f"{name}.json"] = (json.dumps(workflow, indent=2) + "\n").encode()
        buffer = io.BytesIO()
        # JPEG: the template browser asks for `<name>.jpg` for custom-node templates (frontend 1.27.10).
        render(workflow).convert("RGB").save(buffer, "JPEG", quality=90, optimize=True)
        files[f"{name}.jpg"] = buffer.getvalue()
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the JSON files are up to date")
    args = parser.parse_args(argv)
    files = build_files()
    if args.check:
        stale = [
            n
            for n, data in files.items()
            if n.endswith(".json") and (not (OUT / n).exists() or (OUT / n).read_bytes() != data)
        ]
        if stale:
            print(f"stale: {stale}; run python scripts/make_example_workflows.py", file=sys.stderr)
            return 1
        return 0
    OUT.mkdir(exist_ok=True)
    for name, data in files.items():
        (OUT / name).write_bytes(data)
        print(f"wrote {OUT / name} ({len(data) // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
