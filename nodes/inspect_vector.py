"""InspectPathologyVector: where in the model does a vector's concept live?

The node form of ``medsteer inspect`` and of the layer scan's first half: per layer and timestep,
how large the concept difference is relative to the cross-attention output, shown as a labelled
heatmap (rows = timesteps, noisiest first; columns = layers) plus the full text report (metadata,
per-layer and per-timestep numbers, stability across timesteps). The paper's window (layers 8-16)
belongs to its model; on another model, the bright columns are where to start looking.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..medsteer_core.heatmap import COLORMAPS
from ..medsteer_core.pipeline import format_inspection, inspect_vector, profile_image
from .common import CATEGORY, PathologyVectorSocket


class InspectPathologyVector(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InspectPathologyVector",
            display_name="MedSteer Inspect Pathology Vector",
            category=CATEGORY,
            description=(
                "Per layer and timestep: how much of the cross-attention output the concept is "
                "(|mean with - mean without| / |mean|), as a heatmap and a text report. Use it to choose "
                "the steering window on a new model."
            ),
            inputs=[
                PathologyVectorSocket.Input("pathology_vector", tooltip="The vector to inspect."),
                io.Combo.Input(
                    "colormap",
                    options=list(COLORMAPS),
                    default="viridis",
                    tooltip="Colours of the heatmap (cells are scaled to the largest value).",
                ),
            ],
            outputs=[
                io.Image.Output(
                    display_name="layer_profile",
                    tooltip="Heatmap: rows = the vector's timesteps (noisiest first), columns = layers; "
                    "brighter = the concept is a larger part of that layer's output.",
                ),
                io.String.Output(
                    display_name="report",
                    tooltip="The text `medsteer inspect` prints: metadata, per-layer and per-timestep "
                    "numbers, stability across timesteps.",
                ),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, pathology_vector, colormap: str) -> io.NodeOutput:
        report = inspect_vector(pathology_vector)
        text = format_inspection(report)
        image = profile_image(report, colormap)[None]  # [1, H, W, 3]
        return io.NodeOutput(image, text, ui={"text": [text]})
