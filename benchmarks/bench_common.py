"""What more than one benchmark uses: the PixArt geometry and its random-weight transformer, a random
vector, the authors'-style baseline hook, the pass-through that times hooks alone, the statistics,
the environment record and the report helpers.

Imported by ``bench_engine.py``, ``bench_compile.py``, ``bench_unet.py``, ``bench_unet_report.py`` and
``profile_hooks.py`` (run as ``python benchmarks/<name>.py``, this folder is on ``sys.path``). The
repository root goes first on ``sys.path`` here, so every benchmark measures this checkout's
``medsteer_core`` even where another copy is installed.
"""

from __future__ import annotations

import datetime
import os
import platform
import random
import statistics
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import medsteer_core as ms  # noqa: E402
from medsteer_core.provenance import Provenance  # noqa: E402

# ------------------------------------------------------------------------------------------ model


@dataclass(frozen=True)
class Geometry:
    """Transformer shape. The default is PixArt-XL-2-512x512 (diffusers config)."""

    num_layers: int = 28
    num_attention_heads: int = 16
    attention_head_dim: int = 72
    caption_channels: int = 4096
    sample_size: int = 64

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


TINY = Geometry(num_layers=4, num_attention_heads=2, attention_head_dim=8, caption_channels=32, sample_size=8)


def build_transformer(geometry: Geometry, seed: int = 0):
    """A random-weight ``PixArtTransformer2DModel`` in eval mode, float32, CPU."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        sample_size=geometry.sample_size,
        num_layers=geometry.num_layers,
        patch_size=2,
        attention_head_dim=geometry.attention_head_dim,
        num_attention_heads=geometry.num_attention_heads,
        caption_channels=geometry.caption_channels,
        in_channels=4,
        out_channels=8,
        cross_attention_dim=geometry.hidden_size,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    return model.eval()


def random_vector(timesteps: torch.Tensor, depth: int, hidden: int, seed: int = 1) -> ms.PathologyVector:
    """A pathology vector with random unit directions keyed at ``timesteps`` (speed does not
    depend on the directions' values: every operation in the hooks is dense)."""
    g = torch.Generator().manual_seed(seed)
    k = timesteps.numel()
    return ms.PathologyVector.from_sums(
        timesteps.double(),
        torch.randn(k, depth, hidden, generator=g, dtype=torch.float64),
        torch.randn(k, depth, hidden, generator=g, dtype=torch.float64),
        torch.ones(k, dtype=torch.int64),
        torch.ones(k, dtype=torch.int64),
        Provenance(concept_with="benchmark", concept_without="random"),
    )


# ------------------------------------------------------------------------------ the baseline hook


class AuthorsStyleSteering:
    """Baseline for comparison, written from the behaviour described in method.md ("Facts about the
    authors' public code"), not from their code.

    The behaviour reproduced: forward hooks on the cross-attention of every block (all 28), the
    step found by counting transformer calls (clamped to the last stored step), one host-side
    vector per step and layer copied to the activations' device inside the hook on every call,
    every activation pulled to the host on every call (its conditional half kept, as their
    recording does), and the gated update applied to both halves of the CFG batch on the steered
    blocks. ``preserve_norm`` is left off so the update is the same arithmetic as ours and the
    comparison isolates the hooking pattern.

    On a CPU-only machine host and device are the same, where ``.cpu()`` and ``.to(device)`` return
    their input without copying, so the copies are forced (``copy=True``) to stand in for the
    transfers; the device synchronisation they cause on a GPU is not measured here.
    """

    def __init__(self, transformer, step_vectors: list[torch.Tensor], strength: float, steered: range) -> None:
        self.sites = ms.find_sites(transformer)
        self.step_vectors = [v.detach().cpu() for v in step_vectors]  # host-side, [L, D] per step
        self.strength = strength
        self.steered = set(steered)
        self.calls = 0
        self.conditional_rows: list[int] = []
        self.pulled: dict[int, torch.Tensor] = {}
        self._handles: list = []

    @contextmanager
    def attached(self, conditional_rows: list[int]):
        self.conditional_rows = conditional_rows
        self._handles = [self.sites.transformer.register_forward_pre_hook(self._count)]
        self._handles += [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.sites.modules)]
        try:
            yield self
        finally:
            while self._handles:
                self._handles.pop().remove()

    def _count(self, module, args) -> None:
        self.calls += 1

    def _hook(self, index: int):
        def hook(module, args, output):
            h = output
            step = min(max(self.calls - 1, 0), len(self.step_vectors) - 1)
            v = self.step_vectors[step][index].to(device=h.device, dtype=h.dtype, copy=True)
            host = h.detach().to("cpu", copy=True)
            self.pulled[index] = host[self.conditional_rows]
            if index not in self.steered:
                return None
            gate = (h * v).sum(dim=-1, keepdim=True).clamp_min(0)
            return h - self.strength * gate * v

        return hook


@contextmanager
def pass_through(modules):
    """Make each module's call return its first argument, hooks included (an instance attribute
    shadows the class's ``forward``), so timing a call times only its hooks."""
    for module in modules:
        module.forward = _first_argument
    try:
        yield
    finally:
        for module in modules:
            del module.forward


def _first_argument(hidden_states, *args, **kwargs):
    return hidden_states


# ------------------------------------------------------------------------------------- statistics


def summary(values: list[float]) -> dict:
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    median = statistics.median(values)
    return {
        "n": len(values),
        "median": median,
        "q1": q[0],
        "q3": q[2],
        "iqr": q[2] - q[0],
        "iqr_pct": 100.0 * (q[2] - q[0]) / median if median else float("nan"),
        "min": min(values),
        "max": max(values),
    }


def paired_ratio(numerator: list[float], denominator: list[float], resamples: int = 2000) -> dict:
    """Median over rounds of ``numerator[r] / denominator[r]`` with a bootstrap 95% interval."""
    ratios = [a / b for a, b in zip(numerator, denominator, strict=True)]
    rng = random.Random(0)
    boots = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return {
        "median": statistics.median(ratios),
        "ci95": [boots[int(0.025 * resamples)], boots[int(0.975 * resamples) - 1]],
    }


def environment(threads: int) -> dict:
    import diffusers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "medsteer": ms.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "torch_interop_threads": torch.get_num_interop_threads(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


# ----------------------------------------------------------------------------------------- report


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def stat_rows(stats: dict, scale: float) -> list[str]:
    rows = []
    for variant, s in stats.items():
        ratio = "1" if variant == "plain" else f"{s['ratio_of_medians']:.3f}"
        paired = (
            ""
            if variant == "plain"
            else f"{s['paired_ratio']['median']:.3f} [{s['paired_ratio']['ci95'][0]:.3f}, {s['paired_ratio']['ci95'][1]:.3f}]"
        )
        rows.append(
            f"| {variant} | {s['median'] * 1e3:.0f} | {s['iqr'] * 1e3:.0f} ({s['iqr_pct']:.1f}%) | {ratio} | {paired} |"
        )
    return rows


def fmt_load(load) -> str:
    return "n/a" if load is None else " / ".join(f"{x:.2f}" for x in load)
