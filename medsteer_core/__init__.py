"""medsteer_core: training-free counterfactual synthesis by steering PixArt's cross-attention.

The framework-free engine under the MedSteer ComfyUI nodes and the ``medsteer`` CLI. It never
imports ComfyUI.

Example:
    >>> import medsteer_core as ms                                          # doctest: +SKIP
    >>> est = ms.VectorEstimator.for_model(transformer)                     # doctest: +SKIP
    >>> ms.sample(transformer, scheduler, with_embeds, seeds, spec, negative_embeds=neg,
    ...           estimator=est, label="with")                              # doctest: +SKIP
    >>> ms.sample(..., without_embeds, ..., estimator=est, label="without")  # doctest: +SKIP
    >>> plan = ms.SteeringPlan(est.result(), strength=2.5, layer_start=8, layer_end=16)  # doctest: +SKIP
    >>> with ms.steering(transformer, plan, layout="uncond_cond"):          # doctest: +SKIP
    ...     ...
"""

__version__ = "0.1.0"

from .backbones import Sites, find_sites
from .driver import SamplingSpec, initial_latents, sample
from .errors import MedSteerError, UnsupportedModelError, VectorFileError, VectorMismatchError
from .estimate import VectorEstimator
from .gates import GateMaps, GateRecord
from .hooks import CallInfo, HookHandle, attach_capture, attach_steering, capture, steering
from .plan import SteeringPlan
from .ssps import ssps
from .vector import PathologyVector, load_vector, save_vector

__all__ = [
    "CallInfo",
    "GateMaps",
    "GateRecord",
    "HookHandle",
    "MedSteerError",
    "PathologyVector",
    "SamplingSpec",
    "Sites",
    "SteeringPlan",
    "UnsupportedModelError",
    "VectorEstimator",
    "VectorFileError",
    "VectorMismatchError",
    "__version__",
    "attach_capture",
    "attach_steering",
    "capture",
    "find_sites",
    "initial_latents",
    "load_vector",
    "sample",
    "save_vector",
    "ssps",
    "steering",
]
