"""medsteer_core: training-free counterfactual synthesis by steering PixArt's cross-attention.

The framework-free engine under the MedSteer ComfyUI nodes and the ``medsteer`` CLI. It never
imports ComfyUI.

Example:
    >>> import medsteer_core as ms                                          # doctest: +SKIP
    >>> est = ms.VectorEstimator.for_model(transformer)                     # doctest: +SKIP
    >>> from medsteer_core.driver import sample                             # doctest: +SKIP
    >>> sample(transformer, scheduler, with_embeds, seeds, spec, negative_embeds=neg,
    ...        estimator=est, label="with")                                 # doctest: +SKIP
    >>> sample(..., without_embeds, ..., estimator=est, label="without")    # doctest: +SKIP
    >>> plan = ms.SteeringPlan(est.result(), strength=2.5, layer_start=8, layer_end=16)  # doctest: +SKIP
    >>> with ms.steering(transformer, plan, layout="uncond_cond"):          # doctest: +SKIP
    ...     ...
"""

__version__ = "0.1.0"

# The public surface, by what a library user does (grouped in ``__all__``). Everything else is
# imported from its module: ``medsteer_core.hooks`` (CallInfo, HookHandle, attach_*),
# ``medsteer_core.gates`` (GateMaps), ``medsteer_core.driver`` (SamplingSpec, initial_latents,
# sample), ``medsteer_core.backbones`` (Sites, the adapters), ``medsteer_core.headless`` (the CLI's calls).
from .backbones import Backbone, find_sites, register_backbone
from .errors import MedSteerError, UnsupportedModelError, VectorFileError, VectorMismatchError
from .estimate import VectorEstimator
from .gates import GateRecord
from .hooks import capture, steering
from .plan import SteeringPlan
from .ssps import ssps
from .vector import PathologyVector
from .vector_file import load_vector, save_vector

__all__ = [  # grouped by task, not sorted
    "__version__",
    # vector I/O
    "PathologyVector",
    "load_vector",
    "save_vector",
    # estimate a vector from captured activations
    "VectorEstimator",
    "capture",
    # steer
    "SteeringPlan",
    "steering",
    "ssps",
    # gates: what steering did, per step and layer
    "GateRecord",
    # find a model's sites, or teach the library a new model family
    "find_sites",
    "Backbone",
    "register_backbone",
    # errors
    "MedSteerError",
    "UnsupportedModelError",
    "VectorFileError",
    "VectorMismatchError",
]
