"""Real-ComfyUI tests: boot ComfyUI headlessly from ``$COMFYUI_PATH`` and load this pack.

Every test in this folder gets the ``comfyui`` marker and is skipped, with the reason, when
``COMFYUI_PATH`` is not set, so the rest of the suite runs anywhere. With it set, the session boots
ComfyUI once on the CPU (no server, a temporary base directory), loads the repository root as a
custom node folder exactly like ComfyUI's startup does, plus ``medsteer_test_nodes`` (a random
weight PixArt MODEL and random CONDITIONING, so no downloads), and runs API-format prompts through
ComfyUI's own ``PromptExecutor``. Graphs are built with ``comfy_boot.Graph`` and its helpers.

    COMFYUI_PATH=/path/to/ComfyUI python -m pytest tests/comfyui -m comfyui
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # comfy_boot is a sibling helper module, not a package
    sys.path.insert(0, str(HERE))

import comfy_boot  # noqa: E402

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
SKIP_REASON = (
    "COMFYUI_PATH is not set: these tests boot a real ComfyUI checkout; "
    "run `COMFYUI_PATH=/path/to/ComfyUI python -m pytest tests/comfyui -m comfyui`"
)


def pytest_collection_modifyitems(config, items):
    ours = [item for item in items if HERE in Path(str(item.fspath)).resolve().parents]
    if ours and not COMFYUI_PATH and os.environ.get("CI", "").lower() == "true":
        # CI must run these; a silent skip would hide that it no longer tests ComfyUI.
        raise pytest.UsageError(f"CI=true but {SKIP_REASON} (.ci/run sets it up from ../shared/comfyui/setup.sh)")
    for item in ours:
        item.add_marker(pytest.mark.comfyui)
        if not COMFYUI_PATH:
            item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@dataclass
class Comfy:
    """The booted ComfyUI session and what tests need from it."""

    booted: comfy_boot.Booted
    pack: object  # this repository, loaded as a custom node package
    core: object  # the pack's own medsteer_core (the classes the nodes use)

    def run(self, graph, fresh: bool = False) -> comfy_boot.Result:
        """Execute a ``Graph`` (or prompt dict); ``fresh`` = a new executor with empty caches."""
        prompt = graph.prompt if isinstance(graph, comfy_boot.Graph) else graph
        return comfy_boot.run(prompt, fresh=fresh)

    def validate(self, graph):
        return comfy_boot.validate(graph.prompt if isinstance(graph, comfy_boot.Graph) else graph)

    @property
    def vector_dir(self) -> Path:
        import folder_paths

        return Path(folder_paths.get_folder_paths("medsteer")[0])

    def write_vector(self, name: str, depth: int = 4, hidden_size: int = 48, seed: int = 0, keys: int = 8) -> str:
        """A random pathology vector file in ``models/medsteer``; returns its combo name."""
        import torch

        g = torch.Generator().manual_seed(seed)
        timesteps = torch.linspace(0, 999, keys).round()
        count = torch.full((keys,), 3, dtype=torch.int64)
        vector = self.core.PathologyVector.from_sums(
            timesteps,
            torch.randn(keys, depth, hidden_size, generator=g, dtype=torch.float64),
            torch.randn(keys, depth, hidden_size, generator=g, dtype=torch.float64),
            count,
            count.clone(),
            self.core.provenance.Provenance(
                concept_with=f"concept {seed}", concept_without="", model_family="pixart-alpha"
            ),
        )
        self.core.save_vector(vector, self.vector_dir / name)
        return name if name.endswith(".safetensors") else f"{name}.safetensors"

    def live_hooks(self, model) -> int:
        """Forward hooks left on the cross-attention modules of a MODEL (0 between model calls)."""
        blocks = model.model.diffusion_model.blocks
        return sum(len(b.cross_attn._forward_hooks) + len(b.cross_attn._forward_pre_hooks) for b in blocks)


@pytest.fixture(scope="session")
def comfy_env(tmp_path_factory) -> Comfy:
    if not COMFYUI_PATH:
        pytest.skip(SKIP_REASON)
    booted = comfy_boot.boot(COMFYUI_PATH, str(tmp_path_factory.mktemp("comfy_base")))
    pack = booted.packs[str(comfy_boot.REPO)]
    return Comfy(booted, pack, pack.medsteer_core)
