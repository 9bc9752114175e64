"""Training MedSteer-mini on the synthetic endoscopy classes (``python -m medsteer_core.mini train``).

The model, its file format and loading live in ``model.py``; this module only trains. Train the
shipped model again with::

    python -m medsteer_core.mini train --out mini.safetensors --minutes 60
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import synthetic
from .model import DEFAULT_CFG, MAX_TOKENS, PREDICTION, SCHEDULE, MiniModel, load_mini, new_mini, save_mini

__all__ = ["main", "train"]

#: Linear learning-rate warm-up, in steps (from the start, or from an EMA reset).
WARMUP_STEPS = 300


@dataclass
class _Run:
    """The state of one training run: both networks, their EMA copy, the optimiser and the clock."""

    model: MiniModel
    ema: MiniModel
    nets: nn.ModuleList
    ema_nets: nn.ModuleList
    optimiser: torch.optim.Optimizer
    out: Path
    state_path: Path
    settings: dict
    step: int = 0
    elapsed_before: float = 0.0
    ema_start: int = 0
    start: float = 0.0

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.start

    def checkpoint(self, log) -> None:
        """Write the EMA weights to ``out`` and the resume state to ``out.state.pt`` (atomically)."""
        elapsed = self.elapsed()
        meta = {
            "training": json.dumps(self.settings | {"steps": self.step, "minutes": round(elapsed / 60, 1)}),
            "trained_steps": str(self.step),
        }
        save_mini(self.ema, self.out, meta)
        state = {
            "nets": self.nets.state_dict(),
            "ema": self.ema_nets.state_dict(),
            "optimiser": self.optimiser.state_dict(),
            "step": self.step,
            "elapsed": elapsed,
        }
        tmp = Path(str(self.state_path) + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.state_path)
        log(f"checkpoint at step {self.step} ({elapsed / 60:.1f} min) -> {self.out}")


def _new_models(seed: int, denoiser: str) -> tuple[MiniModel, MiniModel, list[nn.Module], list[nn.Module]]:
    """The model and its EMA copy, and the networks of each that learn. MedSteer-mini trains its
    transformer and T5 jointly; the mini-UNet trains its UNet only, under the shipped mini's T5."""
    if denoiser == "pixart":
        model, ema = new_mini(seed), new_mini(seed)
        return model, ema, [model.transformer, model.text_encoder], [ema.transformer, ema.text_encoder]
    if denoiser != "unet":
        raise ValueError(f"denoiser must be 'pixart' or 'unet', got {denoiser!r}")
    from .mini_unet import build_unet

    torch.manual_seed(seed)
    text = load_mini()
    text.text_encoder.requires_grad_(False)
    meta = {"prediction_type": PREDICTION, "default_cfg": DEFAULT_CFG, "text_encoder": "medsteer-mini (frozen)"}
    model = MiniModel(build_unet().eval(), text.text_encoder, text.tokenizer, dict(meta))
    ema = MiniModel(build_unet().eval(), text.text_encoder, text.tokenizer, dict(meta))
    return model, ema, [model.transformer], [ema.transformer]


def _new_run(out: Path, seed: int, lr: float, resume: bool, reset_ema: bool, log, denoiser: str = "pixart") -> _Run:
    """Fresh networks with an identical EMA copy, or the state saved next to ``out`` when resuming."""
    model, ema, learning, ema_learning = _new_models(seed, denoiser)
    nets = nn.ModuleList(learning).train()
    ema_nets = nn.ModuleList(ema_learning)
    ema_nets.load_state_dict(nets.state_dict())
    ema_nets.requires_grad_(False)
    optimiser = torch.optim.AdamW(nets.parameters(), lr=lr, weight_decay=0.0)
    run = _Run(model, ema, nets, ema_nets, optimiser, out, Path(str(out) + ".state.pt"), {})
    if resume and run.state_path.is_file():
        state = torch.load(run.state_path, weights_only=True)
        nets.load_state_dict(state["nets"])
        ema_nets.load_state_dict(state["ema"])
        optimiser.load_state_dict(state["optimiser"])
        run.step, run.elapsed_before = int(state["step"]), float(state["elapsed"])
        log(f"resumed at step {run.step} ({run.elapsed_before / 60:.1f} min trained)")
        if reset_ema:
            ema_nets.load_state_dict(nets.state_dict())
            run.ema_start = run.step
    return run


def _encode_train(text_encoder, tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    frozen = not any(p.requires_grad for p in text_encoder.parameters())
    with torch.set_grad_enabled(not frozen):
        return text_encoder(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        ).last_hidden_state, tokens["attention_mask"]


def _train_step(run: _Run, batch: dict, alphas: torch.Tensor, lr: float, ema_decay: float) -> float:
    """One optimiser step on ``batch`` (images ``x0``, ``prompts``, ``noise``, timesteps ``t``) and
    the EMA update after it. Returns the loss."""
    x0, noise, t = batch["x0"], batch["noise"], batch["t"]
    a = alphas[t].sqrt()[:, None, None, None]
    s = (1 - alphas[t]).sqrt()[:, None, None, None]
    noisy = a * x0 + s * noise
    for group in run.optimiser.param_groups:
        group["lr"] = lr * min(1.0, (run.step + 1 - run.ema_start) / WARMUP_STEPS)
    embeds, mask = _encode_train(run.model.text_encoder, run.model.tokenizer, batch["prompts"])
    pred = run.model.transformer(
        noisy,
        encoder_hidden_states=embeds,
        encoder_attention_mask=mask,
        timestep=t,
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )[0]
    target = a * noise - s * x0 if PREDICTION == "v_prediction" else noise
    loss = torch.nn.functional.mse_loss(pred, target)
    run.optimiser.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.nets.parameters(), 1.0)
    run.optimiser.step()
    run.step += 1
    decay = min(ema_decay, (1 + run.step - run.ema_start) / (10 + run.step - run.ema_start))
    with torch.no_grad():
        for p_ema, p in zip(run.ema_nets.parameters(), run.nets.parameters(), strict=True):
            p_ema.lerp_(p, 1 - decay)
    return float(loss.detach())


class _Batches:
    """Random training batches: frames rendered once, captions re-drawn from the templates each time,
    ``caption_dropout`` of them replaced by the unconditional prompt ``""``."""

    def __init__(self, per_class: int, size: int, caption_dropout: float, generator: torch.Generator, log) -> None:
        t0 = time.time()
        data = synthetic.dataset(per_class, seed=1_000_000)
        self.images = data["images"] * 2 - 1
        self.labels = data["labels"]
        log(f"rendered {len(self.images)} training frames in {time.time() - t0:.1f}s")
        self.prompts = [
            [synthetic.caption(c, k) for k in range(len(synthetic.TEMPLATES))] for c in range(len(synthetic.CLASSES))
        ]
        self.size, self.caption_dropout, self.generator = size, caption_dropout, generator

    def next(self) -> dict:
        size, generator = self.size, self.generator
        index = torch.randint(0, len(self.images), (size,), generator=generator)
        x0 = self.images[index]
        templates = torch.randint(0, len(synthetic.TEMPLATES), (size,), generator=generator).tolist()
        drop = (torch.rand(size, generator=generator) < self.caption_dropout).tolist()
        labels = self.labels[index].tolist()
        prompts = ["" if d else self.prompts[int(c)][k] for c, k, d in zip(labels, templates, drop, strict=True)]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, SCHEDULE["num_train_timesteps"], (size,), generator=generator)
        return {"x0": x0, "prompts": prompts, "noise": noise, "t": t}


def train(
    out: str | os.PathLike,
    *,
    minutes: float = 60.0,
    max_steps: int = 1_000_000,
    batch: int = 16,
    lr: float = 6e-4,
    per_class: int = 3000,
    caption_dropout: float = 0.1,
    ema_decay: float = 0.999,
    seed: int = 0,
    checkpoint_every: int = 500,
    resume: bool = False,
    reset_ema: bool = False,
    threads: int | None = None,
    denoiser: str = "pixart",
    log=print,
) -> MiniModel:
    """Train MedSteer-mini on the synthetic classes (v-prediction, linear DDPM schedule).

    Settings: v-prediction, batch 16, AdamW (lr 6e-4, 300 warm-up steps, no weight decay), uniform timesteps,
    10 % caption dropout (the unconditional prompt is ``""``, as CFG samples it), EMA 0.999 of both
    networks (the EMA weights are what is saved), gradient clipping at 1. Data: ``per_class``
    frames per class rendered once (seeds 1,000,000 on, disjoint from every evaluation seed),
    captions re-drawn from the templates at every step. Stops after ``minutes`` or ``max_steps``;
    writes ``out`` (EMA weights) every ``checkpoint_every`` steps and ``out + ".state.pt"`` (local
    resume state: raw weights and optimiser; not for shipping).
    """
    from diffusers import DDPMScheduler

    if threads:
        torch.set_num_threads(threads)
    run = _new_run(Path(out), seed, lr, resume, reset_ema, log, denoiser)
    alphas = DDPMScheduler(**SCHEDULE).alphas_cumprod
    batches = _Batches(per_class, batch, caption_dropout, torch.Generator().manual_seed(seed + run.step), log)
    params = sum(p.numel() for p in run.model.transformer.parameters())
    text_params = sum(p.numel() for p in run.model.text_encoder.parameters() if p.requires_grad)
    run.settings = {
        "batch": batch,
        "lr": lr,
        "per_class": per_class,
        "caption_dropout": caption_dropout,
        "ema_decay": ema_decay,
        "seed": seed,
        "transformer_parameters": params,
        "text_encoder_parameters": text_params,
        "threads": torch.get_num_threads(),
        "prediction": PREDICTION,
        "denoiser": denoiser,
    }
    log(f"training: {params / 1e6:.2f}M transformer + {text_params / 1e6:.2f}M text parameters; {run.settings}")
    run.start = time.time()
    first_step, running = run.step, 0.0
    while run.step < max_steps and run.elapsed() < minutes * 60:
        value = _train_step(run, batches.next(), alphas, lr, ema_decay)
        running = 0.98 * running + 0.02 * value if run.step > 1 else value
        if run.step % 50 == 0:
            rate = (time.time() - run.start) / max(1, run.step - first_step)
            log(f"step {run.step} loss {running:.4f} ({rate:.2f}s/step)")
        if run.step % checkpoint_every == 0:
            run.checkpoint(log)
    run.checkpoint(log)
    run.ema.transformer.eval()
    run.ema.text_encoder.eval()
    return run.ema


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medsteer_core.mini", description="Train MedSteer-mini again.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train MedSteer-mini on the synthetic endoscopy classes")
    p.add_argument("--out", required=True, help="output .safetensors (EMA weights, rewritten at every checkpoint)")
    p.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget (default 60)")
    p.add_argument("--steps", type=int, default=1_000_000, help="maximum steps")
    p.add_argument("--batch", type=int, default=16, help="images per step (default 16)")
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--per-class", type=int, default=3000, help="training frames per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--resume", action="store_true", help="continue from OUT.state.pt")
    p.add_argument("--reset-ema", action="store_true", help="on resume, restart the EMA from the current weights")
    p.add_argument(
        "--denoiser",
        choices=("pixart", "unet"),
        default="pixart",
        help="pixart: MedSteer-mini (default); unet: MedSteer-mini-UNet under the shipped mini's frozen text encoder",
    )
    args = parser.parse_args(argv)
    train(
        args.out,
        minutes=args.minutes,
        max_steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        per_class=args.per_class,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        reset_ema=args.reset_ema,
        threads=args.threads,
        denoiser=args.denoiser,
        log=lambda msg: print(msg, flush=True),
    )
    return 0
