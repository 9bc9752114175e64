"""The core example: ``python -m medsteer_core.example [out_dir]``.

Builds a tiny random-weight PixArt on the spot (no downloads), estimates a pathology vector from
two random "prompts", samples one seed unsteered and steered, and writes the pair's latents (as
false-colour PNGs), the gate heatmap grid and the vector to ``out_dir`` (default
``medsteer_example/``). It shows the mechanics end to end in seconds on a CPU; a random model draws
noise, so the pictures show *that* and *where* steering acts, not a medical edit.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from . import GateRecord, SteeringPlan, VectorEstimator, save_vector
from .driver import SamplingSpec, sample
from .gate_drawing import gate_grid
from .gates import select_maps
from .provenance import Provenance


def _tiny_pixart():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    return PixArtTransformer2DModel(
        sample_size=16,
        num_layers=6,
        attention_head_dim=16,
        num_attention_heads=4,
        caption_channels=32,
        in_channels=4,
        out_channels=8,
        cross_attention_dim=64,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    ).eval()


def _latent_png(latent: torch.Tensor, path: Path) -> None:
    from PIL import Image

    rgb = latent[:3].permute(1, 2, 0)
    rgb = (rgb - rgb.amin()) / (rgb.amax() - rgb.amin()).clamp_min(1e-8)
    image = Image.fromarray((rgb.numpy() * 255).round().astype("uint8")).resize((256, 256), Image.NEAREST)
    image.save(path)


def main(argv: list[str] | None = None) -> int:
    from diffusers import DPMSolverMultistepScheduler
    from PIL import Image

    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0] if argv else "medsteer_example")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    transformer = _tiny_pixart()
    g = torch.Generator().manual_seed(1)
    with_concept, without_concept, uncond = (torch.randn(1, 8, 32, generator=g) for _ in range(3))
    spec = SamplingSpec(steps=20, cfg=4.5, height=16, width=16)

    estimator = VectorEstimator.for_model(transformer)
    for label, prompt in (("with", with_concept), ("without", without_concept)):
        sample(
            transformer,
            DPMSolverMultistepScheduler(),
            prompt,
            range(8),
            spec,
            negative_embeds=uncond,
            estimator=estimator,
            label=label,
        )
    vector = estimator.result(Provenance(concept_with="concept A", concept_without="concept B", seeds=range(8)))
    save_vector(vector, out / "vector.safetensors")

    plan = SteeringPlan(vector, strength=2.5, layer_start=2, layer_end=4)
    record = GateRecord()
    unsteered = sample(transformer, DPMSolverMultistepScheduler(), with_concept, [42], spec, negative_embeds=uncond)
    steered = sample(
        transformer,
        DPMSolverMultistepScheduler(),
        with_concept,
        [42],
        spec,
        negative_embeds=uncond,
        plans=[plan],
        record=record,
    )
    _latent_png(unsteered[0], out / "unsteered.png")
    _latent_png(steered[0], out / "steered.png")
    maps, rows, cols = select_maps(record.maps(), steps="0,8,12,14,19", layers="2,3")
    grid = gate_grid(maps, rows, cols, cell=96)
    Image.fromarray((grid.numpy() * 255).round().astype("uint8")).save(out / "gates.png")
    change = float((steered - unsteered).abs().mean())
    print(f"vector: {vector}")
    print(f"mean |steered - unsteered| latent difference: {change:.4f}")
    print(
        f"wrote {out}/vector.safetensors, unsteered.png, steered.png, gates.png in {time.perf_counter() - start:.1f}s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
