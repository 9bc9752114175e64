"""BuildPathologyVector: estimate a concept's direction by sampling both prompts in ComfyUI.

For each seed the node samples the prompt with the concept and the prompt without it (the same
uncond, sampler and steps), with capture hooks on every cross-attention site, and averages the
conditional rows' token means per (timestep, layer) (method.md, "Pathology vector"). Sampling is
ComfyUI's own (``comfy.sample``); the hooks live on a clone and only inside each model call.
"""

from __future__ import annotations

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.utils
import torch
from comfy_api.latest import io

from ..medsteer_core import VectorEstimator, capture
from ..medsteer_core.comfy_widgets import prompt_text, seed_batches
from ..medsteer_core.provenance import Provenance, build_provenance
from .common import (
    CATEGORY,
    PathologyVectorSocket,
    call_info,
    model_sites,
    split_call,
)

CAPTURE_KEY = "medsteer.capture"


class CaptureWrapper:
    """``APPLY_MODEL`` wrapper feeding one class's cross-attention outputs to an estimator."""

    def __init__(self, estimator: VectorEstimator, label: str):
        self.estimator = estimator
        self.label = label

    def __call__(self, executor, x, t, *args, **kwargs):
        base_model = executor.class_obj
        info = call_info(base_model, x, t, split_call(args, kwargs))
        with capture(base_model.diffusion_model, self.estimator, self.label, call_info=info):
            return executor(x, t, *args, **kwargs)


def _same_conditioning(a, b) -> bool:
    if len(a) != len(b):
        return False
    return all(x[0].shape == y[0].shape and torch.equal(x[0], y[0]) for x, y in zip(a, b, strict=True))


class BuildPathologyVector(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BuildPathologyVector",
            display_name="MedSteer Build Pathology Vector",
            category=CATEGORY,
            description=(
                "Builds a pathology vector: samples num_seeds images of the prompt with the concept and "
                "of the prompt without it (same seeds, same uncond), records the cross-attention "
                "outputs, and keeps the normalised difference of their means per layer and timestep. "
                "Done once per concept pair; save it with SavePathologyVector."
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="The model the vector is for (the one you will steer): PixArt, SD1.x, SD2.x or "
                    "SDXL. A vector fits only models of its family and size.",
                ),
                io.Conditioning.Input(
                    "with_concept",
                    tooltip="Prompt WITH the concept, e.g. 'An endoscopic image of dyed lifted polyps'.",
                ),
                io.Conditioning.Input(
                    "without_concept",
                    tooltip="The same prompt WITHOUT the concept, e.g. 'An endoscopic image of polyps'.",
                ),
                io.Conditioning.Input(
                    "uncond",
                    tooltip="The negative / unconditional prompt used for classifier-free guidance "
                    "(usually an empty prompt).",
                ),
                io.Latent.Input(
                    "latent_image",
                    tooltip="Only its size and batch size are used: images of this size, this many seeds "
                    "per sampling pass (a bigger batch is faster if memory allows). Use the size you "
                    "will steer at (PixArt: at least 34x34 latent pixels, 272 px).",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="First seed; the node uses seed, seed+1, ... Each image gets the noise a "
                    "KSampler with that seed and batch size 1 would use.",
                ),
                io.Int.Input(
                    "num_seeds",
                    default=50,
                    min=1,
                    max=100000,
                    tooltip="Images per prompt. The paper uses 50 (30 is slightly worse, 80-100 no better).",
                ),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Sampling steps (the paper: 20)."),
                io.Float.Input(
                    "cfg",
                    default=4.5,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    round=0.01,
                    tooltip="Classifier-free guidance scale (PixArt's default 4.5; SD1.x/2.x use about 7). Only the "
                    "conditional rows are recorded.",
                ),
                io.Combo.Input(
                    "sampler_name",
                    options=comfy.samplers.SAMPLER_NAMES,
                    default="euler",
                    tooltip="Sampler. The vector is keyed by model timestep, so it works with any "
                    "sampler later; building with the steered KSampler's sampler, scheduler and steps "
                    "gives exact timestep matches.",
                ),
                io.Combo.Input(
                    "scheduler",
                    options=comfy.samplers.SCHEDULER_NAMES,
                    default="normal",
                    tooltip="Scheduler (see sampler_name).",
                ),
            ],
            outputs=[
                PathologyVectorSocket.Output(
                    display_name="pathology_vector",
                    tooltip="Unit direction per (timestep, layer), with its settings and prompts as metadata.",
                ),
                io.Latent.Output(
                    display_name="latents_with",
                    tooltip="The generated latents of the prompt with the concept (decode to check them).",
                ),
                io.Latent.Output(
                    display_name="latents_without",
                    tooltip="The generated latents of the prompt without the concept.",
                ),
            ],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    @classmethod
    def execute(
        cls,
        model,
        with_concept,
        without_concept,
        uncond,
        latent_image,
        seed: int,
        num_seeds: int,
        steps: int,
        cfg: float,
        sampler_name: str,
        scheduler: str,
    ) -> io.NodeOutput:
        # Everything is checked before the first sampling step.
        sites = model_sites(model)
        shape = latent_image["samples"].shape
        batch, height, width = int(shape[0]), int(shape[-2]), int(shape[-1])
        sites.check_latent(height, width)
        scale = sites.pixel_scale
        batches = seed_batches(seed, num_seeds, batch)
        if _same_conditioning(with_concept, without_concept):
            raise ValueError(
                "with_concept and without_concept are the same conditioning, so the vector would be zero: "
                "connect two prompts that differ only in the concept"
            )
        provenance = _provenance(
            getattr(cls.hidden, "prompt", None),
            getattr(cls.hidden, "unique_id", None),
            sites,
            [s for group in batches for s in group],
            (height * scale, width * scale),
            (steps, cfg, sampler_name, scheduler),
        )

        # float64 running sums where the device has them (MPS and some others do not).
        device = comfy.model_management.get_torch_device()
        accumulate = torch.float64 if device.type in ("cpu", "cuda") else torch.float32
        estimator = VectorEstimator.for_model(sites.transformer, accumulate_dtype=accumulate)
        progress = comfy.utils.ProgressBar(2 * len(batches) * steps)
        done = 0

        def on_step(step, denoised, x, total_steps):
            comfy.model_management.throw_exception_if_processing_interrupted()
            progress.update_absolute(done + min(step + 1, steps))

        outputs = {"with": [], "without": []}
        patched = {}
        for label in outputs:
            patched[label] = model.clone()
            patched[label].add_wrapper_with_key(
                comfy.patcher_extension.WrappersMP.APPLY_MODEL, CAPTURE_KEY, CaptureWrapper(estimator, label)
            )
        positives = {"with": with_concept, "without": without_concept}
        for seeds in batches:
            for label, patched_model in patched.items():
                comfy.model_management.throw_exception_if_processing_interrupted()
                samples = _sample(
                    patched_model,
                    seeds,
                    shape,
                    (steps, cfg, sampler_name, scheduler),
                    positives[label],
                    uncond,
                    on_step,
                )
                outputs[label].append(samples.to(comfy.model_management.intermediate_device()))
                done += steps
                progress.update_absolute(done)

        vector = estimator.result(provenance)
        return io.NodeOutput(
            vector,
            {"samples": torch.cat(outputs["with"])},
            {"samples": torch.cat(outputs["without"])},
        )


def _provenance(prompt, node_id, sites, seeds, size, sampling) -> Provenance:
    """The vector's provenance: the prompts as the graph gives them, seeds, sampling, image ``size``."""
    steps, cfg, sampler_name, scheduler = sampling
    height, width = size
    return build_provenance(
        prompts_with=[prompt_text(prompt, node_id, "with_concept")],
        prompts_without=[prompt_text(prompt, node_id, "without_concept")],
        negative_prompt=prompt_text(prompt, node_id, "uncond"),
        seeds=seeds,
        steps=steps,
        cfg=cfg,
        sampler_name=sampler_name,
        scheduler=scheduler,
        height=height,
        width=width,
        model_family=sites.family,
        host="ComfyUI BuildPathologyVector",
        sites=sites,
        # ComfyUI patches LoRA weights into the module only while that model is loaded, so the
        # weights read before sampling may be another patcher's: record no fingerprint here.
        fingerprint=False,
    )


def _sample(patched_model, seeds, shape, sampling, positive, uncond, on_step) -> torch.Tensor:
    """Sample one batch of seeds with the capturing model (ComfyUI's noise for each seed)."""
    steps, cfg, sampler_name, scheduler = sampling
    empty = torch.zeros((len(seeds), *shape[1:]), dtype=torch.float32)
    empty = comfy.sample.fix_empty_latent_channels(patched_model, empty)
    noise = torch.cat([comfy.sample.prepare_noise(empty[:1], s) for s in seeds])
    return comfy.sample.sample(
        patched_model,
        noise,
        steps,
        cfg,
        sampler_name,
        scheduler,
        positive,
        uncond,
        empty,
        callback=on_step,
        disable_pbar=True,
        seed=seeds[0],
    )
