"""InspectPathologyVector in real ComfyUI: the core's layer profile and report, and a vector built
in the same graph named and drawn on the node.

Every graph runs through ComfyUI's PromptExecutor on a random-weight PixArt (4 blocks of width 48,
34x34 latents). Equality claims are bit-exact (``torch.equal``). Reference runs use a fresh
executor, so no result comes from ComfyUI's cache.
"""

from __future__ import annotations

import html

import torch
from comfy_boot import Graph, empty_latent, pixart, prompt
from pixart_graphs import load, vector_of


def test_inspect_node_shows_the_cores_layer_profile_and_report(comfy_env):
    name = comfy_env.write_vector("inspect_me", seed=23, depth=4, keys=8)
    g = Graph()
    inspected = g.add("InspectPathologyVector", pathology_vector=load(g, name), colormap="magma")
    result = comfy_env.run(g)
    assert result.success, result.error
    image, text = result.output(inspected.id, 0), result.output(inspected.id, 1)
    core = comfy_env.core
    report = core.inspection.inspect_vector(vector_of(comfy_env, name))
    assert torch.equal(image, core.inspection.profile_image(report, "magma")[None])
    assert image.shape[0] == 1 and image.shape[-1] == 3 and 0 <= float(image.min()) <= float(image.max()) <= 1
    report["file"] = f"{name} (models/medsteer)"
    assert text == core.inspection.format_inspection(report)
    assert text.splitlines()[0] == f"vector: {name} (models/medsteer)"
    assert "concept: 'concept 23'" in text and "per layer" in text
    assert list(result.ui[inspected.id]["text"]) == [text]  # the report on the node (history / "executed")


def test_inspect_names_a_vector_built_in_the_graph_and_draws_the_report_on_the_node(comfy_env):
    import server

    g = Graph()
    build = g.add(
        "BuildPathologyVector",
        model=pixart(g),
        with_concept=prompt(g, "dyed polyps"),
        without_concept=prompt(g, "polyps"),
        uncond=prompt(g, "", tokens=5),
        latent_image=empty_latent(g),
        seed=0,
        num_seeds=1,
        steps=2,
        cfg=4.5,
        sampler_name="euler",
        scheduler="normal",
    )
    inspected = g.add("InspectPathologyVector", pathology_vector=build, colormap="viridis")

    class Recorder:  # stands in for the running server's PromptServer.instance (no sockets here)
        def __init__(self):
            self.sent = []

        def send_progress_text(self, text, node_id, sid=None):
            self.sent.append((node_id, text))

    recorder = Recorder()
    had, before = hasattr(server.PromptServer, "instance"), getattr(server.PromptServer, "instance", None)
    server.PromptServer.instance = recorder
    try:
        result = comfy_env.run(g, fresh=True)
    finally:
        if had:
            server.PromptServer.instance = before
        else:
            del server.PromptServer.instance
    assert result.success, result.error
    text = result.output(inspected.id, 1)
    first = text.splitlines()[0]
    assert first == "vector: 'dyed polyps' vs 'polyps' (built in the graph, not read from a file)"
    assert list(result.ui[inspected.id]["text"]) == [text]
    # frontend 1.27 draws only PreviewAny's text output, so the report also goes to the node as
    # progress text (rendered as HTML there: escaped)
    assert recorder.sent == [(inspected.id, html.escape(text))]
    assert "&#x27;dyed polyps&#x27;" in recorder.sent[0][1]
