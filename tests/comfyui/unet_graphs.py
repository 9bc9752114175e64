"""Graph helpers for the UNet tests: tiny SD models, their prompts, vectors that fit them, references.

The models come from ``medsteer_unet_test_nodes`` (loaded once by ``ensure_unet_nodes``); the
latent is 8x12 (a 64x96 image), so every token grid is non-square and the second level is 4x6.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch
from comfy_boot import HERE, Graph, load_pack

#: A non-square latent (rows, columns): 64x96 px.
LATENT = (8, 12)
SAMPLE = {"seed": 3, "steps": 3, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}
STEER = {
    "strength": 2.5,
    "layer_start": 0,
    "layer_end": 1,
    "start_percent": 0.0,
    "end_percent": 1.0,
    "rows": "cond and uncond",
    "preserve_norm": False,
    "interpolation": "nearest",
    "layers": "",
}
#: Site names of the tiny test models (widths 32 at the first level, 64 at the second).
TINY_SD_NAMES = ("input 1", "input 3", "middle 0", "output 0", "output 1", "output 2", "output 3")
TINY_SD_WIDTHS = (32, 64, 64, 64, 64, 32, 32)


def ensure_unet_nodes():
    """Load the tiny-UNet test pack and ComfyUI's PAG and ModelSamplingDiscrete nodes once; return the
    test pack's module."""
    import sys

    import nodes

    path = HERE / "medsteer_unet_test_nodes"
    if "MedSteerTestUNet" not in nodes.NODE_CLASS_MAPPINGS:
        load_pack(path)
    for node_id, extra in (
        ("PerturbedAttentionGuidance", "nodes_pag"),
        ("ModelSamplingDiscrete", "nodes_model_advanced"),
    ):
        if node_id not in nodes.NODE_CLASS_MAPPINGS:
            module = Path(nodes.__file__).parent / "comfy_extras" / f"{extra}.py"
            assert asyncio.run(nodes.load_custom_node(str(module), module_parent="comfy_extras"))
    return sys.modules[str(path.resolve()).replace(".", "_x_")]


def unet(g: Graph, family: str = "sd1", seed: int = 0, size: str = "tiny"):
    return g.add("MedSteerTestUNet", family=family, seed=seed, size=size)


def sd_prompt(g: Graph, text: str, family: str = "sd1", tokens: int = 77):
    return g.add("MedSteerTestUNetConditioning", text=text, family=family, tokens=tokens)


def sd_latent(g: Graph, batch: int = 1, size: tuple[int, int] = LATENT):
    return g.add("EmptyLatentImage", width=size[1] * 8, height=size[0] * 8, batch_size=batch)


def steer(g: Graph, model, vector, **overrides):
    return g.add("ApplySSPSSteer", model=model, pathology_vector=vector, **{**STEER, **overrides})


def ksampler(g: Graph, model, positive, negative, latent, **overrides):
    return g.add(
        "KSampler", model=model, positive=positive, negative=negative, latent_image=latent, **{**SAMPLE, **overrides}
    )


def load(g: Graph, name: str):
    return g.add("LoadPathologyVector", vector_name=name)


def sites_of(core, model):
    """The ``Sites`` of a ComfyUI MODEL, found by the core the nodes use."""
    import sys

    return sys.modules[core.__name__ + ".backbones"].find_sites(model)


def random_vector(core, sites, seed: int = 0, keys: int = 8, family: str | None = None):
    """A random vector that fits ``sites``: one direction per site, zero beyond each site's width."""
    g = torch.Generator().manual_seed(seed)
    width = max(sites.widths)
    sums = [torch.randn(keys, sites.depth, width, generator=g, dtype=torch.float64) for _ in range(2)]
    for index, w in enumerate(sites.widths):
        for s in sums:
            s[:, index, w:] = 0
    count = torch.full((keys,), 3, dtype=torch.int64)
    provenance = core.provenance.Provenance(
        concept_with=f"concept {seed}", concept_without="", model_family=family or sites.family
    )
    timesteps = torch.linspace(0, 999, keys).round()
    return core.PathologyVector.from_sums(timesteps, *sums, count, count.clone(), provenance, widths=sites.widths)


def write_vector(comfy_env, pack, name: str, family: str = "sd1", seed: int = 0, size: str = "tiny") -> str:
    """A random vector for the ``size`` ``family`` test UNet in ``models/medsteer``; returns its combo name."""
    sites = sites_of(comfy_env.core, pack.tiny_unet(family, size=size, device="meta"))
    comfy_env.core.save_vector(random_vector(comfy_env.core, sites, seed), comfy_env.vector_dir / name)
    return f"{name}.safetensors"


def core_sample(comfy_env, model, positive, negative, plans, sample=None, batch: int = 1):
    """Sample the unpatched ``model`` inside the core's ``steering(..., layout="comfyui")`` context.

    The core reads each call's timesteps and rows from the UNet's own arguments, independently of
    the nodes' APPLY_MODEL wrapper, so agreeing with it checks the wrapper's per-call row info.
    """
    import comfy.sample

    settings = {**SAMPLE, **(sample or {})}
    latent = torch.zeros(batch, 4, *LATENT)
    noise = comfy.sample.prepare_noise(latent, settings["seed"])
    with torch.inference_mode(), comfy_env.core.steering(model.model.diffusion_model, plans, layout="comfyui"):
        return comfy.sample.sample(
            model,
            noise,
            settings["steps"],
            settings["cfg"],
            settings["sampler_name"],
            settings["scheduler"],
            positive,
            negative,
            latent,
            seed=settings["seed"],
        )
