"""The oracle: a small classifier and lesion/dye segmenter trained on the synthetic endoscopy data.

The paper judges counterfactuals with a classifier (AUC 0.98) and masks lesions with a UNet++
(method.md); here one small CNN does both for the synthetic world of ``synthetic.py``: a class head
(``CLASSES``) and a per-pixel head with two channels, lesion and dye. It is trained on rendered
frames with noise, blur and colour jitter so that it also reads the mini model's renders, and it
ships beside the model (``medsteer_core/mini/assets/oracle.safetensors``). Train it again with::

    python -m medsteer_core.mini.oracle train --out oracle.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MedSteerError
from . import synthetic
from ._assets import read_tagged

__all__ = ["DEFAULT_PATH", "Oracle", "OracleOutput", "load_oracle", "save_oracle", "train_oracle"]

DEFAULT_PATH = Path(__file__).parent / "assets" / "oracle.safetensors"
FORMAT_NAME = "medsteer.oracle"
#: A frame "shows dye" when at least this many pixels (of 32x32) are segmented as dye; a dyed
#: cushion covers 150-400 px, so this tolerates stray pixels but not a visible remnant.
DYE_PIXELS = 12


class OracleOutput:
    """What the oracle sees in a batch of images.

    Attributes:
        probabilities: ``[B, C]`` class probabilities (order of ``synthetic.CLASSES``).
        lesion: ``[B, H, W]`` lesion probability.
        dye: ``[B, H, W]`` dye probability.
    """

    def __init__(self, logits: torch.Tensor, masks: torch.Tensor) -> None:
        self.probabilities = logits.softmax(-1)
        self.lesion = masks[:, 0].sigmoid()
        self.dye = masks[:, 1].sigmoid()

    @property
    def labels(self) -> torch.Tensor:
        """``[B]`` most likely class index."""
        return self.probabilities.argmax(-1)

    @property
    def dye_detected(self) -> torch.Tensor:
        """``[B]`` bool: the image shows dye (``DYE_PIXELS`` or more dye pixels)."""
        return (self.dye > 0.5).flatten(1).sum(-1) >= DYE_PIXELS


class Oracle(nn.Module):
    """A 4-level CNN: a class head on pooled features, a mask head on upsampled ones.

    Input ``[B, 3, 32, 32]`` images in 0-1.
    """

    def __init__(self, classes: int = len(synthetic.CLASSES), width: int = 16) -> None:
        super().__init__()
        w = width

        def block(i: int, o: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, stride, 1), nn.GroupNorm(4, o), nn.SiLU())

        self.d1 = nn.Sequential(block(3, w, 1), block(w, w, 1))  # 32
        self.d2 = nn.Sequential(block(w, 2 * w, 2), block(2 * w, 2 * w, 1))  # 16
        self.d3 = nn.Sequential(block(2 * w, 4 * w, 2), block(4 * w, 4 * w, 1))  # 8
        self.classify = nn.Linear(4 * w, classes)
        self.u2 = block(4 * w + 2 * w, 2 * w, 1)
        self.u1 = block(2 * w + w, w, 1)
        self.masks = nn.Conv2d(w, 2, 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images * 2 - 1
        f1 = self.d1(x)
        f2 = self.d2(f1)
        f3 = self.d3(f2)
        logits = self.classify(f3.mean(dim=(2, 3)))
        u = F.interpolate(f3, scale_factor=2, mode="nearest")
        u = self.u2(torch.cat([u, f2], 1))
        u = F.interpolate(u, scale_factor=2, mode="nearest")
        u = self.u1(torch.cat([u, f1], 1))
        return logits, self.masks(u)

    @torch.no_grad()
    def read(self, images: torch.Tensor, batch: int = 256) -> OracleOutput:
        """Classify and segment ``[B, 3, H, W]`` images in 0-1 (resized to 32x32 if needed)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise MedSteerError(f"the oracle reads [B, 3, H, W] RGB images in 0-1; got shape {tuple(images.shape)}")
        self.eval()
        images = images.float()
        if images.shape[-2:] != (32, 32):
            images = F.interpolate(images, size=(32, 32), mode="area")
        logits, masks = zip(*(self(images[i : i + batch]) for i in range(0, len(images), batch)), strict=True)
        return OracleOutput(torch.cat(logits), torch.cat(masks))


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Noise, blur and colour jitter: the ways a small diffusion model's renders differ."""
    b = images.shape[0]
    gain = 1 + 0.12 * torch.randn(b, 3, 1, 1, generator=generator)
    offset = 0.04 * torch.randn(b, 3, 1, 1, generator=generator)
    x = images * gain + offset
    blur = torch.rand(b, generator=generator) < 0.5
    if blur.any():
        kernel = torch.tensor([0.25, 0.5, 0.25])
        kernel = (kernel[:, None] * kernel[None, :]).expand(3, 1, 3, 3)
        x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    sigma = 0.06 * torch.rand(b, 1, 1, 1, generator=generator)
    return (x + sigma * torch.randn(x.shape, generator=generator)).clamp(0, 1)


def train_oracle(
    steps: int = 800,
    batch: int = 64,
    per_class: int = 1000,
    lr: float = 2e-3,
    seed: int = 0,
    extra: dict[str, torch.Tensor] | None = None,
    log=print,
) -> Oracle:
    """Train the oracle on synthetic frames (seeds from 2,000,000 on: disjoint from the model's).

    Args:
        extra: optional extra labelled frames (same keys as ``synthetic.dataset``) mixed in.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    data = synthetic.dataset(per_class, seed=2_000_000)
    if extra is not None:
        data = {k: torch.cat([data[k], extra[k]]) for k in ("images", "labels", "lesion", "dye")}
    oracle = Oracle()
    optimiser = torch.optim.AdamW(oracle.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, lr, total_steps=steps, pct_start=0.1)
    oracle.train()
    start = time.time()
    for step in range(steps):
        index = torch.randint(0, len(data["images"]), (batch,), generator=generator)
        images = _augment(data["images"][index], generator)
        if torch.rand(1, generator=generator).item() < 0.5:
            images, lesion, dye = images.flip(-1), data["lesion"][index].flip(-1), data["dye"][index].flip(-1)
        else:
            lesion, dye = data["lesion"][index], data["dye"][index]
        logits, masks = oracle(images)
        target = torch.stack([lesion, dye], 1).float()
        loss = F.cross_entropy(logits, data["labels"][index]) + F.binary_cross_entropy_with_logits(masks, target)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if (step + 1) % 100 == 0:
            log(f"oracle step {step + 1}/{steps} loss {float(loss.detach()):.4f} ({time.time() - start:.0f}s)")
    return oracle.eval()


def evaluate_oracle(oracle: Oracle, per_class: int = 200, seed: int = 3_000_000) -> dict[str, float]:
    """Accuracy and mask IoU on fresh synthetic frames (with the training augmentation)."""
    data = synthetic.dataset(per_class, seed=seed)
    out = oracle.read(_augment(data["images"], torch.Generator().manual_seed(seed)))
    accuracy = float((out.labels == data["labels"]).float().mean())

    def iou(pred: torch.Tensor, true: torch.Tensor) -> float:
        pred = pred > 0.5
        return float((pred & true).sum() / (pred | true).sum().clamp_min(1))

    dyed = data["labels"] == synthetic.CLASSES.index("dyed")
    return {
        "accuracy": accuracy,
        "lesion_iou": iou(out.lesion, data["lesion"]),
        "dye_iou": iou(out.dye, data["dye"]),
        "dye_detected_dyed": float(out.dye_detected[dyed].float().mean()),
        "dye_detected_other": float(out.dye_detected[~dyed].float().mean()),
    }


def save_oracle(oracle: Oracle, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT_NAME, "classes": json.dumps(list(synthetic.CLASSES))}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    save_file({k: v.contiguous() for k, v in oracle.state_dict().items()}, str(path), metadata=meta)
    return path


def load_oracle(path: str | os.PathLike | None = None) -> Oracle:
    """Load the oracle (default: the one shipped in the package)."""
    path = Path(path) if path is not None else DEFAULT_PATH
    _, state = read_tagged(
        path,
        FORMAT_NAME,
        "MedSteer oracle",
        "pass a file written by `python -m medsteer_core.mini.oracle train`, or reinstall the package to "
        "restore the shipped one",
    )
    oracle = Oracle()
    oracle.load_state_dict(state)
    return oracle.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medsteer_core.mini.oracle", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train the oracle on synthetic frames")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.time()
    oracle = train_oracle(args.steps, seed=args.seed, log=lambda m: print(m, flush=True))
    scores = evaluate_oracle(oracle)
    print(json.dumps(scores), flush=True)
    save_oracle(
        oracle,
        args.out,
        {"steps": str(args.steps), "scores": json.dumps(scores), "seconds": f"{time.time() - start:.0f}"},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
