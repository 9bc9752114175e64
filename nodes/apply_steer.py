"""ApplySSPSSteer: a steered clone of a MODEL (the paper's SSPS on cross-attention).

Patching without side effects (STYLE.md): validate, clone, then register one keyed
``APPLY_MODEL`` wrapper on the clone. The wrapper holds every chained steering plan and opens the
core's ``steering`` context around a single model call, so the hooks exist only inside that call
and an unsteered sampler sharing the same weights never sees them. A chained ApplySSPSSteer
replaces the wrapper on its own clone with one holding the upstream plans plus its own; the
upstream model keeps its wrapper and options untouched.

The patch point, for PixArt and the SD1.x/2.x/XL UNets alike, is that keyed ``APPLY_MODEL``
wrapper, not ComfyUI's ``attn2_output_patch`` (issue 10 weighed both). The output patch does see
the block (``extra_options["block"]``, ``"block_index"``), ``cond_or_uncond`` and the rows'
``sigmas``, but:

- turning sigmas into model timesteps needs the ``model_sampling`` in use when sampling runs. The
  wrapper reads it from the ``BaseModel`` it wraps at every call, so a ModelSamplingDiscrete
  (v-prediction, zsnr) placed after this node is honoured; a patch function would have to keep
  the one this node saw;
- PixArt ignores attention patches, so the output patch would be a second route for UNets only,
  with its own gate recording and capture, while the hooks serve every backbone, are
  torch.compile-safe (``site_forward``) and are what BuildPathologyVector captures with.

What the wrapper route gives, each checked in ``tests/comfyui/test_unet_nodes.py`` and
``test_unet_compose.py``: the rows' timesteps, ``cond_or_uncond`` and the latent size per call;
site identity by module (the UNet backbone's sites carry ComfyUI's block names); other packs'
``attn2_output_patch`` functions run after the hook and see the steered output, in either node
order; an ``attn2`` replace patch (IP-Adapter's) skips attn2's forward but still ends in
``attn2.to_out``, where the UNet backbone hooks; LoRA weight patches and PAG compose (PAG's extra
perturbed call is a call of the steered model, so it is steered too). A ControlNet is never
steered: it runs in ``calc_cond_batch`` before ``apply_model``, outside the wrapper, and its
transformer blocks are its own modules, which carry no hooks.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import comfy.patcher_extension
import torch
from comfy_api.latest import io

from ..medsteer_core.backbones import Sites, find_sites
from ..medsteer_core.gates import GateRecord
from ..medsteer_core.hooks import steering
from ..medsteer_core.plan import ROW_OPTIONS, chain_plans, make_plan, timestep_window
from ..medsteer_core.settings import resolve_setting
from ..medsteer_core.vector import INTERPOLATIONS, PathologyVector
from .common import CATEGORY, UNET_SITES_HELP, PathologyVectorSocket, call_info, model_sites, split_call

WrappersMP = comfy.patcher_extension.WrappersMP
#: The key of MedSteer's wrappers on a ModelPatcher (one per wrapper type).
WRAPPER_KEY = "medsteer.ssps"


def latent_fingerprint(samples) -> str:
    """Identifies a sampler's output LATENT exactly (shape and float32 bytes, on the CPU)."""
    data = samples.detach().to(device="cpu", dtype=torch.float32).contiguous()
    return f"{tuple(data.shape)}:{hashlib.sha1(data.numpy().tobytes()).hexdigest()}"


class SteeringWrapper:
    """The ``APPLY_MODEL`` (and ``OUTER_SAMPLE``) wrapper of one steered clone.

    Attributes:
        plans: the chained steering plans, applied in order at every site they share.
        record: the gates of the sampling run in progress (``None`` outside sampling, where
            model calls are steered but not recorded).
        runs: the records of the last ``KEEP_RUNS`` finished runs, by the fingerprint of the LATENT
            each produced, so GateHeatmap finds the run behind the LATENT it is given even when
            several samplers share one steered model. Finished records live on the CPU.
    """

    KEEP_RUNS = 4

    def __init__(self, plans):
        self.plans = tuple(plans)
        self.record: GateRecord | None = None
        self.runs: OrderedDict[str, GateRecord] = OrderedDict()
        self._run_sites: tuple[object, Sites] | None = None  # (diffusion model, its sites) of the run

    def sites_for(self, diffusion_model) -> Sites:
        """The sites of the model a call runs: found at the first call of a sampling run and reused
        by the run's other calls (finding them walks every module: about 1.6 ms a call on SDXL).
        Outside a run they are found per call, as object patches may swap modules between runs."""
        if self.record is None:
            return find_sites(diffusion_model)
        cached = self._run_sites
        if cached is None or cached[0] is not diffusion_model:
            cached = self._run_sites = (diffusion_model, find_sites(diffusion_model))
        return cached[1]

    def record_for(self, samples) -> GateRecord | None:
        """The gates of the finished run that produced ``samples``, if it is still kept."""
        return self.runs.get(latent_fingerprint(samples))

    def __call__(self, executor, x, t, *args, **kwargs):
        base_model = executor.class_obj
        info = call_info(base_model, x, t, split_call(args, kwargs))
        with steering(self.sites_for(base_model.diffusion_model), self.plans, call_info=info, record=self.record):
            return executor(x, t, *args, **kwargs)

    def outer_sample(self, executor, noise, latent_image, *args, **kwargs):
        # Before any model call: a clear error instead of PixArt's division by zero. Each run gets
        # its own record, kept by the fingerprint of the LATENT it returns (memory stays bounded).
        model_sites(executor.class_obj.model_patcher).check_latent(noise.shape[-2], noise.shape[-1])
        record = self.record = GateRecord()
        record.begin_run()  # every model call of this sample is one run, whatever its timesteps
        try:
            output = executor(noise, latent_image, *args, **kwargs)
        finally:
            record.end_run()
            self.record = self._run_sites = None
        record.offload()  # one device-to-host copy per run, after sampling
        key = latent_fingerprint(output)
        self.runs.pop(key, None)
        self.runs[key] = record
        while len(self.runs) > self.KEEP_RUNS:
            self.runs.popitem(last=False)
        return output


def steering_of(model) -> SteeringWrapper | None:
    """The MedSteer wrapper of a MODEL, or ``None`` if it is not steered."""
    for wrapper in model.get_wrappers(WrappersMP.APPLY_MODEL, WRAPPER_KEY):
        if isinstance(wrapper, SteeringWrapper):
            return wrapper
    return None


def steered_clone(model, plan):
    """A clone of ``model`` whose MedSteer wrapper holds the upstream plans plus ``plan``."""
    upstream = steering_of(model)
    wrapper = SteeringWrapper(chain_plans(upstream.plans if upstream else (), plan))
    clone = model.clone()
    # clone() copied the wrapper dicts, so removing the key here leaves `model` as it was.
    clone.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    clone.remove_wrappers_with_key(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY)
    clone.add_wrapper_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY, wrapper)
    clone.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, wrapper.outer_sample)
    return clone


def percent_to_timestep(model):
    """ComfyUI's percent (0 = start of sampling) -> model timestep (0-999)."""
    sampling = model.get_model_object("model_sampling")

    def convert(percent: float) -> float:
        sigma = torch.tensor([sampling.percent_to_sigma(percent)], dtype=torch.float32)
        return float(sampling.timestep(sigma).float()[0])

    return convert


class ApplySSPSSteer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ApplySSPSSteer",
            display_name="MedSteer Apply SSPS Steering",
            category=CATEGORY,
            description=(
                "Returns a steered clone of a PixArt or Stable Diffusion (1.x, 2.x, XL) model: at every "
                "step, each image token's "
                "cross-attention output h in the chosen layers becomes h - strength * max(<h, v>, 0) * v, "
                "with v the pathology vector (the paper's Spatially Selective Pathology Steering). Sample "
                "it and the unsteered model with the same seed to get a counterfactual pair. Chain two "
                "of these nodes to compose edits."
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="The model to steer: PixArt-alpha/-sigma, SD1.x, SD2.x (eps or v) or SDXL, "
                    "e.g. from Load Checkpoint. It is cloned: the input model stays unsteered, so the "
                    "unsteered sampler of the pair can share it.",
                ),
                PathologyVectorSocket.Input(
                    "pathology_vector",
                    tooltip="The concept direction, from BuildPathologyVector or LoadPathologyVector. It must "
                    "come from a model of the same family and size (an SD1.5 vector does not fit SDXL).",
                ),
                io.Float.Input(
                    "strength",
                    default=2.5,
                    min=-20.0,
                    max=20.0,
                    step=0.05,
                    tooltip="The paper's alpha: how hard each aligned token is pushed off the concept. "
                    "2.5 is the paper's setting (its ablation flipped 51% of images at 2.0, 80% at 2.5, "
                    "70% at 3.0); 0 leaves the model exactly unchanged; negative values add the concept. "
                    "Tune this first.",
                ),
                io.Int.Input(
                    "layer_start",
                    default=8,
                    min=0,
                    max=255,
                    tooltip="First steered cross-attention site (0-based, in execution order). The paper "
                    "steers blocks 8-16 of PixArt-XL-2's 28. " + UNET_SITES_HELP + " Ignored when 'layers' "
                    "below is set.",
                ),
                io.Int.Input(
                    "layer_end",
                    default=16,
                    min=1,
                    max=256,
                    tooltip="One past the last steered site (exclusive): 8 to 16 steers 8 blocks, the "
                    "paper's best window on PixArt (in its ablation 0-8 and 12-20 flipped almost no images). "
                    "Ignored when 'layers' below is set.",
                ),
                io.Float.Input(
                    "start_percent",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.001,
                    tooltip="Start steering at this fraction of sampling (ComfyUI's convention: 0 = the "
                    "first, noisiest step). The paper steers every step: 0.",
                ),
                io.Float.Input(
                    "end_percent",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.001,
                    tooltip="Stop steering after this fraction of sampling (1 = the last step). The "
                    "paper steers every step: 1.",
                ),
                io.Combo.Input(
                    "rows",
                    options=list(ROW_OPTIONS),
                    default="cond and uncond",
                    tooltip="Which halves of the classifier-free-guidance batch to steer: both, as the "
                    "authors' code does (default), or only the conditional (prompted) prediction.",
                ),
                io.Boolean.Input(
                    "preserve_norm",
                    default=False,
                    tooltip="Rescale each steered token back to its original length, as the authors' "
                    "public code does. Off = the paper's update.",
                ),
                io.Combo.Input(
                    "interpolation",
                    options=list(INTERPOLATIONS),
                    default="nearest",
                    tooltip="How to pick the vector at a timestep it was not built at: the nearest built "
                    "timestep, or a linear blend of the two neighbours. Equal when sampling with the "
                    "vector's own sampler, scheduler and steps.",
                ),
                io.String.Input(
                    "layers",
                    default="",
                    optional=True,
                    tooltip="The window by the names users know, instead of layer_start/layer_end (empty = "
                    "use those): a block 'middle', 'input 7' (all its transformer blocks), 'input 7.3', a "
                    "range of names 'input 7 - output 2' (both ends included) or indices '8-16' (end "
                    "excluded). 'preset' is the model's preset window, where to start: on SD UNets the coarsest "
                    "cross-attention level and below, 'input 7 - output 5' (SD1.x/2.x) or 'input 7.0 - output "
                    "2.9' (SDXL); on PixArt the paper's 8-16. " + UNET_SITES_HELP + " PixArt's sites are "
                    "'block 0' to 'block 27'.",
                ),
            ],
            outputs=[
                io.Model.Output(
                    display_name="steered_model",
                    tooltip="A steered clone of the model. Feed it to a sampler, and to GateHeatmap after "
                    "sampling to see where it steered.",
                ),
            ],
        )

    @classmethod
    def validate_inputs(
        cls,
        layer_start: int | None = None,
        layer_end: int | None = None,
        start_percent: float | None = None,
        end_percent: float | None = None,
        layers: str | None = None,
    ):
        # What can be checked before the graph runs (depth and vector fit are checked in execute).
        # Inputs fed by a link are unknown here (None). Naming an input here turns off ComfyUI's own
        # min/max check for it, so the ranges are checked again in execute (make_plan).
        by_name = bool(str(layers or "").strip())
        if not by_name and layer_start is not None and layer_end is not None and layer_end <= layer_start:
            return (
                f"empty layer window: layer_end {layer_end} must be greater than layer_start {layer_start} "
                "(layer_end is exclusive; the paper uses 8 and 16)"
            )
        if start_percent is not None and end_percent is not None:
            try:
                timestep_window(start_percent, end_percent, lambda p: 1000.0 * (1.0 - p))
            except ValueError as error:
                return str(error)
        return True

    @classmethod
    def execute(
        cls,
        model,
        pathology_vector,
        strength: float,
        layer_start: int,
        layer_end: int,
        start_percent: float,
        end_percent: float,
        rows: str,
        preserve_norm: bool,
        interpolation: str,
        layers: str = "",
    ) -> io.NodeOutput:
        sites = model_sites(model)
        # The widgets always hold values: the resolver takes them as explicit, or the layers text.
        named = str(layers or "").strip()
        setting = resolve_setting(
            sites,
            pathology_vector if isinstance(pathology_vector, PathologyVector) else None,
            strength=strength,
            layer_start=None if named else layer_start,
            layer_end=None if named else layer_end,
            window=named or None,
        )
        plan = make_plan(
            sites,
            pathology_vector,
            strength=setting.strength,
            layer_start=setting.layer_start,
            layer_end=setting.layer_end,
            start_percent=start_percent,
            end_percent=end_percent,
            percent_to_timestep=percent_to_timestep(model),
            rows=rows,
            preserve_norm=preserve_norm,
            interpolation=interpolation,
        )
        return io.NodeOutput(steered_clone(model, plan))
