"""Render what the counterfactual-pair graph outputs in a real, headless ComfyUI.

    COMFYUI_PATH=/path/to/ComfyUI python scripts/render_comfyui_outputs.py docs/comfyui/pair_outputs.png

Runs BuildPathologyVector -> ApplySSPSSteer -> two KSamplers sharing one seed -> GateHeatmap through
ComfyUI's own executor, on the random-weight PixArt of the test pack (no weights can be downloaded
here), and writes one picture: the unsteered and steered latents (first three channels, false
colour), their difference, and the GateHeatmap node's IMAGE output. A random model draws noise, so
the picture shows the mechanics (a pair that differs only where the gate fires), not a medical edit.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "comfyui"))


def main(out: str) -> int:
    import comfy_boot as cb
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    cb.boot(base_directory=tempfile.mkdtemp(prefix="medsteer-render-"))
    cb.load_pack(REPO)
    cb.load_pack(cb.TEST_PACK)
    g = cb.Graph()
    model = cb.pixart(g)
    with_concept = cb.prompt(g, "An endoscopic image of dyed lifted polyps")
    without_concept = cb.prompt(g, "An endoscopic image of polyps")
    uncond = cb.prompt(g, "", tokens=5)
    build = g.add(
        "BuildPathologyVector",
        model=model,
        with_concept=with_concept,
        without_concept=without_concept,
        uncond=uncond,
        latent_image=cb.empty_latent(g, size=384, batch=4),
        seed=100,
        num_seeds=8,
        steps=20,
        cfg=4.5,
        sampler_name="euler",
        scheduler="normal",
    )
    steered_model = cb.steer(g, model, build, layer_start=1, layer_end=3, strength=2.5)
    latent = cb.empty_latent(g, size=384)
    sample = {"seed": 7, "steps": 20}
    plain = cb.ksampler(g, model, with_concept, uncond, latent, **sample)
    steered = cb.ksampler(g, steered_model, with_concept, uncond, latent, **sample)
    heat = g.add(
        "GateHeatmap",
        model=steered_model,
        latent=steered,
        preset="custom (steps and layers below)",
        steps="0,8,12,14,19",
        layers="1,2",
        colormap="viridis",
        opacity=0.5,
        edit=-1,
    )
    for node in (plain, steered, heat):
        cb.keep(g, node)
    result = cb.run(g.prompt)
    if not result.success:
        print(result.error, file=sys.stderr)
        return 1

    def false_colour(samples: torch.Tensor) -> np.ndarray:
        rgb = samples[0, :3].permute(1, 2, 0)
        rgb = (rgb - rgb.amin()) / (rgb.amax() - rgb.amin()).clamp_min(1e-8)
        return (rgb.numpy() * 255).astype("uint8")

    a, b = result.output(plain.id)["samples"], result.output(steered.id)["samples"]
    diff = (b - a).abs()[0].mean(0)
    diff = (diff / diff.max().clamp_min(1e-8)).numpy()
    tiles = [false_colour(a), false_colour(b), (np.stack([diff] * 3, -1) * 255).astype("uint8")]
    tiles = [Image.fromarray(t).resize((240, 240), Image.NEAREST) for t in tiles]
    grid = result.output(heat.id)[0].numpy()
    grid = Image.fromarray((grid * 255).round().astype("uint8"))
    width = max(3 * 250 + 10, grid.width + 20)
    canvas = Image.new("RGB", (width, 40 + 250 + 30 + grid.height + 10), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (tile, label) in enumerate(
        zip(tiles, ("unsteered latent", "steered latent", "|steered - unsteered|"), strict=True)
    ):
        canvas.paste(tile, (10 + 250 * i, 30))
        draw.text((10 + 250 * i, 10), label, fill="black")
    draw.text((10, 40 + 250), "GateHeatmap output (steps x layers)", fill="black")
    canvas.paste(grid, (10, 40 + 250 + 20))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "docs/comfyui/pair_outputs.png"))
