"""InspectPathologyVector: where in the model does a vector's concept live?

The node form of ``medsteer inspect`` and of the layer scan's first half: per layer and timestep,
how large the concept difference is relative to the cross-attention output, shown as a labelled
heatmap (rows = timesteps, noisiest first; columns = layers) plus the full text report (metadata,
per-layer and per-timestep numbers, stability across timesteps). The paper's window (layers 8-16)
belongs to its model; on another model, the bright columns are where to start looking.

The report is the node's ``text`` UI output (``ui.PreviewText``, kept in the history) and is also
sent to the node as progress text, which is what frontend 1.27 draws on a node that is not
PreviewAny (core's GetImageSize shows its numbers the same way).
"""

from __future__ import annotations

import html
import logging
import sys

from comfy_api.latest import io, ui

from ..medsteer_core.gate_drawing import COLORMAPS
from ..medsteer_core.inspection import format_inspection, inspect_vector, profile_image, site_table
from .common import CATEGORY, PathologyVectorSocket, model_sites


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
                "the steering window on a new model; connect the model to see each layer's site name (SD UNets: "
                "'input 4', 'middle 0', 'output 3') and token grid."
            ),
            inputs=[
                PathologyVectorSocket.Input("pathology_vector", tooltip="The vector to inspect."),
                io.Model.Input(
                    "model",
                    optional=True,
                    tooltip="Optional: the model the vector is for. Connected, each layer of the report gets "
                    "its site name (SD UNets: 'input 4', 'middle 0', 'output 3.1'; PixArt: 'block 8') and "
                    "token grid, and the report says whether the vector fits the model.",
                ),
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
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, pathology_vector, colormap: str, model=None) -> io.NodeOutput:
        report = inspect_vector(
            pathology_vector, sites=None if model is None else model_site_info(model, pathology_vector)
        )
        report["file"] = vector_label(pathology_vector, cls.hidden.prompt, cls.hidden.unique_id)
        text = format_inspection(report)
        image = profile_image(report, colormap)[None]  # [1, H, W, 3]
        show_on_node(text, cls.hidden.unique_id)
        return io.NodeOutput(image, text, ui=ui.PreviewText(text))


def vector_label(vector, prompt: dict | None, node_id: str | None) -> str:
    """What the report calls the vector: the file a LoadPathologyVector feeding this node read, else
    its concepts (a vector built in the graph has no file)."""
    node = (prompt or {}).get(str(node_id)) if node_id is not None else None
    link = (node or {}).get("inputs", {}).get("pathology_vector")
    if isinstance(link, list) and len(link) == 2:
        source = (prompt or {}).get(str(link[0])) or {}
        name = source.get("inputs", {}).get("vector_name")
        if source.get("class_type") == "LoadPathologyVector" and isinstance(name, str):
            return f"{name} (models/medsteer)"
    return f"{vector.concept_with!r} vs {vector.concept_without!r} (built in the graph, not read from a file)"


def show_on_node(text: str, node_id: str | None) -> None:
    """Draw ``text`` on the node in the web UI (nothing to do when no server is running)."""
    server = sys.modules.get("server")  # ComfyUI's server module, imported by main.py when it serves
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None or node_id is None:
        return
    try:  # the frontend renders this text as HTML
        instance.send_progress_text(html.escape(text), str(node_id))
    except Exception as error:  # showing the report must never fail the graph
        logging.warning("MedSteer: could not send the inspect report to the UI: %s", error)


def model_site_info(model, vector) -> dict:
    """A MODEL's sites for ``inspect_vector``: family, names, widths and token grids at the image size
    the vector was built at (512x512 px when its metadata does not say)."""
    sites = model_sites(model)
    provenance = vector.provenance
    height, width = (n if n and n > 0 else 512 for n in (provenance.height, provenance.width))
    scale = sites.pixel_scale
    latent = (max(1, height // scale), max(1, width // scale))
    return {"family": sites.family, "image_size": (height, width), "sites": site_table(sites, latent)}
