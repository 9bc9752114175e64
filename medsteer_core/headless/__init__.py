"""The headless wing: MedSteer on diffusers, without ComfyUI. Load a PixArt or Stable Diffusion (1.x,
2.x, XL) model, build vectors,
generate pair datasets, draw gate heatmaps; the ``medsteer`` CLI (``headless.cli``) is a thin shell
over it, one function per command.

Sampling, capture and gate recording all go through ``medsteer_core.driver.sample`` and the hooks
the ComfyUI nodes use, and vectors are keyed by model timestep (0-999), so a vector built here
steers the same way in ComfyUI and vice versa. Nothing in the engine or the nodes imports this
wing; it imports the engine, ``medsteer_core.weights`` (checkpoint and LoRA checks) and, only when
``--model mini`` asks for it, MedSteer-mini.

Modules, by concern: ``models`` (``load_model``, ``HeadlessModel``), ``sd_models`` (SD 1.x / 2.x and
SDXL pipelines: their prompts and added conditions), ``sources`` (local pipeline folders and hub
ids), ``sd_sources`` (a bare UNet over a base pipeline, single-file SD checkpoints), ``lora`` (the authors' LoRA, merged), ``distributed`` (``Shard``, devices),
``vector_build`` (``build_vector``, halves, merging), ``steer_options`` (``Steer``),
``dataset`` (``generate``), ``manifest`` (its records, resuming), ``outputs`` (atomic writes,
folder lock), ``figures`` (``gate_heatmap``, the paper's Fig. 3), ``cli`` / ``cli_parser``.
Vector reports (``inspect_vector``, ``format_inspection``) are the engine's
``medsteer_core.inspection``, shared with the InspectPathologyVector node.

Scale-out (``torchrun --nproc_per_node N -m medsteer_core.headless.cli ...``): work is cut into
units (one prompt x one batch of seeds) that do not depend on the number of processes, and
``Shard`` deals them out round-robin. Every image depends only on its unit, and ``build_vector``
adds the per-unit sums in unit order on every rank, so N processes write the same bytes as one.

Example:
    >>> from medsteer_core import headless as mh                                          # doctest: +SKIP
    >>> model = mh.load_model("PixArt-alpha/PixArt-XL-2-512x512", lora="medsteer_lora", dtype="fp16")
    >>> built = mh.build_vector(model, ["An endoscopic image of dyed lifted polyps"],
    ...                         ["An endoscopic image of polyps"], seeds=range(50))
    >>> mh.save_built(built, "dye.safetensors")
    >>> mh.generate(model, [mh.Steer("dye.safetensors")], ["An endoscopic image of dyed lifted polyps"],
    ...             seeds=range(100), out_dir="pairs/dye")
"""

from .dataset import GenerateReport, generate
from .distributed import Shard, check_device
from .figures import Heatmap, gate_heatmap
from .manifest import MANIFEST
from .models import DTYPES, SCHEDULERS, HeadlessModel, ModelLoadError, load_model
from .outputs import OutputFolderError, check_output_file, lock_output_folder
from .steer_options import Steer
from .vector_build import (
    BuiltVector,
    build_vector,
    check_new_seeds,
    load_built,
    merge_built,
    save_built,
)

__all__ = [
    "DTYPES",
    "MANIFEST",
    "SCHEDULERS",
    "BuiltVector",
    "GenerateReport",
    "HeadlessModel",
    "Heatmap",
    "ModelLoadError",
    "OutputFolderError",
    "Shard",
    "Steer",
    "build_vector",
    "check_device",
    "check_new_seeds",
    "check_output_file",
    "gate_heatmap",
    "generate",
    "load_built",
    "load_model",
    "lock_output_folder",
    "merge_built",
    "save_built",
]
