"""ComfyUI nodes of MedSteer (V3 schema). Imported only inside ComfyUI, through relative imports.

``NODES`` lists every node class of the pack; ``comfy_entrypoint`` hands them to ComfyUI.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .apply_steer import ApplySSPSSteer
from .build_vector import BuildPathologyVector
from .gate_heatmap import GateHeatmap
from .inspect_vector import InspectPathologyVector
from .mini import LoadMedSteerMini, register_shipped_vectors
from .vector_io import LoadPathologyVector, SavePathologyVector

NODES: list[type[io.ComfyNode]] = [
    BuildPathologyVector,
    ApplySSPSSteer,
    GateHeatmap,
    SavePathologyVector,
    LoadPathologyVector,
    InspectPathologyVector,
    LoadMedSteerMini,
]

# After vector_io registered models/medsteer (first, where vectors are saved).
register_shipped_vectors()

try:  # the checkpoint loader and LoRA nodes (nodes/loaders.py) are optional in a partial checkout
    from . import loaders
except ModuleNotFoundError as error:
    if error.name != f"{__name__}.loaders":
        raise
else:
    NODES.extend(cls for cls in getattr(loaders, "NODES", ()) if cls not in NODES)


class MedSteerExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> MedSteerExtension:
    """ComfyUI's V3 entry point (the root ``__init__`` re-exports it)."""
    return MedSteerExtension()
