"""A minimal diffusers sampling loop for a PixArt transformer or a Stable Diffusion UNet, with optional hooks.

This is what the tests, benchmarks and the headless pipeline call: it samples a
``PixArtTransformer2DModel`` or a ``UNet2DConditionModel`` (SD1.x, SD2.x epsilon or v-prediction,
SDXL) with a diffusers scheduler and classifier-free guidance from given caption embeddings and
seeds, opening a steering or capture context per model call with the exact row layout
(``[uncond, cond]`` with CFG), so no step counting or guessing is involved. Conditions besides the
caption (SDXL's pooled text embedding and size ids) are passed per row like the caption.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .backbones import Sites, find_sites
from .gates import GateRecord
from .hooks import attach_capture, attach_steering
from .plan import SteeringPlan

__all__ = ["SamplingSpec", "initial_latents", "sample"]


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample.

    Attributes:
        steps: number of denoising steps.
        cfg: classifier-free guidance scale (1 = no unconditional pass).
        height / width: latent size in latent pixels.
        channels: latent channels; ``None``: the model's own (``Sites.latent_channels``: 4 for the
            SD / PixArt autoencoders, 3 for pixel-space MedSteer-mini).
    """

    steps: int = 20
    cfg: float = 4.5
    height: int = 64
    width: int = 64
    channels: int | None = None


def initial_latents(
    seeds: Sequence[int], spec: SamplingSpec, dtype=torch.float32, device="cpu", channels: int | None = None
) -> torch.Tensor:
    """``[len(seeds), C, H, W]`` starting noise, one CPU generator per seed.

    Each image depends only on its own seed, so batching seeds differently gives the same noise.
    ``C`` is ``spec.channels``, else ``channels`` (``sample`` passes ``Sites.latent_channels``), else 4.
    """
    channels = spec.channels or channels or 4
    noise = [
        torch.randn(
            (channels, spec.height, spec.width),
            generator=torch.Generator("cpu").manual_seed(int(s)),
            dtype=torch.float32,
        )
        for s in seeds
    ]
    return torch.stack(noise).to(device=device, dtype=dtype)


@torch.no_grad()
def sample(
    transformer: nn.Module,
    scheduler,
    prompt_embeds: torch.Tensor,
    seeds: Sequence[int],
    spec: SamplingSpec,
    *,
    negative_embeds: torch.Tensor | None = None,
    prompt_mask: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
    added: dict[str, torch.Tensor] | None = None,
    negative_added: dict[str, torch.Tensor] | None = None,
    plans: Sequence[SteeringPlan] = (),
    record: GateRecord | None = None,
    estimator=None,
    label: str = "with",
    latents: torch.Tensor | None = None,
    progress: Callable[[int, int], None] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Sample latents from a PixArt transformer or an SD UNet, optionally steering or capturing.

    Args:
        transformer: a diffusers ``PixArtTransformer2DModel`` or ``UNet2DConditionModel`` (or peft-wrapped).
        scheduler: a diffusers scheduler; ``set_timesteps(spec.steps)`` is called on it.
        prompt_embeds: ``[1 or B, T, C]`` caption embeddings of the prompt.
        seeds: one seed per image.
        spec: steps, cfg and latent size.
        negative_embeds: ``[1 or B, T', C]`` unconditional embeddings; required when ``cfg != 1``.
        prompt_mask / negative_mask: ``[1 or B, T]`` attention masks of the embeddings.
        added: the model's added conditions of the conditional rows, ``{name: [1 or B, ...]}``,
            passed as ``added_cond_kwargs`` (SDXL: ``text_embeds``, the pooled text embedding,
            and ``time_ids``, the six size ids). ``None``: PixArt's resolution / aspect-ratio
            conditions when the transformer uses them, else none.
        negative_added: the same for the unconditional rows (default: ``added``).
        plans: steering plans (empty: unsteered).
        record: a ``GateRecord`` for the gates of the steered run (one run per call).
        estimator: a ``VectorEstimator`` to feed with the conditional rows (``label`` names the class).
        latents: starting noise ``[B, C, H, W]`` (default: ``initial_latents(seeds, spec)``).
        progress: called with ``(step, steps)`` after every step.
        device: where latents and embeddings live (default: the device of the transformer's
            parameters). Pass the execution device when the transformer is CPU-offloaded (its
            parameters then sit on the CPU until each call moves them).

    Returns:
        ``[B, C, H, W]`` final latents (float32, CPU).
    """
    sites = find_sites(transformer)  # a clear error for a model no backbone knows, steered or not
    device = torch.device(device) if device is not None else next(transformer.parameters()).device
    dtype = next(transformer.parameters()).dtype
    batch = len(seeds)
    if latents is None:
        latents = initial_latents(seeds, spec, torch.float32, device, channels=sites.latent_channels)
    latents = latents.to(device=device, dtype=torch.float32) * scheduler.init_noise_sigma
    guided = spec.cfg != 1
    if guided and negative_embeds is None:
        raise ValueError("cfg != 1 needs negative_embeds (the unconditional caption embeddings)")
    pairs = ((prompt_embeds, negative_embeds), (prompt_mask, negative_mask), (added, negative_added))
    conditioning = _conditioning(sites, spec, batch, guided, device, dtype, *pairs)

    scheduler.set_timesteps(spec.steps, device=device)
    # Hooks for this sampling run only: attached (and validated) once, removed in any case. Each
    # call's timesteps and grid are read from the transformer's own arguments; the row layout is
    # the one built above ([uncond, cond] with CFG).
    layout = "uncond_cond" if guided else "cond"
    with ExitStack() as hooks:
        if estimator is not None:
            hooks.callback(attach_capture(transformer, estimator, label, layout=layout).remove)
        if plans:
            hooks.callback(attach_steering(transformer, list(plans), layout=layout, record=record).remove)
            if record is not None:  # this call is one sampling run, whatever its timesteps
                record.begin_run()
                hooks.callback(record.end_run)
        for i, t in enumerate(scheduler.timesteps):
            latents = _denoise(transformer, scheduler, latents, t, conditioning, spec.cfg, dtype, device)
            if progress is not None:
                progress(i + 1, spec.steps)
    return latents.cpu()


class _Conditioning(NamedTuple):
    """What every model call of one sampling run gets besides the latents."""

    context: torch.Tensor
    mask: torch.Tensor | None
    added: dict
    rows: int
    guided: bool


def _conditioning(
    sites: Sites,
    spec: SamplingSpec,
    batch: int,
    guided: bool,
    device: torch.device,
    dtype: torch.dtype,
    embeds: tuple[torch.Tensor, torch.Tensor | None],
    masks: tuple[torch.Tensor | None, torch.Tensor | None],
    added: tuple[dict | None, dict | None],
) -> _Conditioning:
    """The caption context (``[uncond, cond]`` with CFG), its mask and the added conditions, each
    ``(cond, uncond)`` pair laid out in the same row order."""

    def expand(x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None:
            return None
        x = x.to(device)
        return x.expand(batch, *x.shape[1:]) if x.shape[0] == 1 else x

    cond, uncond = expand(embeds[0]).to(dtype), expand(embeds[1])
    cond_mask, uncond_mask = expand(masks[0]), expand(masks[1])
    if guided:
        context = _pad_cat(uncond.to(dtype), cond)
        mask = None
        if cond_mask is not None or uncond_mask is not None:
            cond_mask = cond_mask if cond_mask is not None else torch.ones(cond.shape[:2], device=device)
            uncond_mask = uncond_mask if uncond_mask is not None else torch.ones(uncond.shape[:2], device=device)
            mask = _pad_cat(uncond_mask[..., None], cond_mask[..., None])[..., 0]
    else:
        context, mask = cond, cond_mask
    rows = 2 * batch if guided else batch
    if added[0] is not None:
        cond_added, uncond_added = added[0], added[1] if added[1] is not None else added[0]
        if guided and set(uncond_added) != set(cond_added):
            raise ValueError(
                f"negative_added has the conditions {sorted(uncond_added)} but added has {sorted(cond_added)}: "
                "give both the same names"
            )
        extra = {
            name: torch.cat([expand(uncond_added[name]), expand(value)]) if guided else expand(value)
            for name, value in cond_added.items()
        }
    else:  # the backbone's own (PixArt-alpha's resolution and aspect-ratio conditions), in pixels
        scale = sites.pixel_scale
        values = sites.resolution_condition(spec.height * scale, spec.width * scale)
        extra = {
            name: torch.tensor([list(value)], device=device, dtype=dtype).repeat(rows, 1)
            for name, value in values.items()
        } or {"resolution": None, "aspect_ratio": None}
    return _Conditioning(context, mask, extra, rows, guided)


def _denoise(
    transformer: nn.Module,
    scheduler,
    latents: torch.Tensor,
    t: torch.Tensor,
    conditioning: _Conditioning,
    cfg: float,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """One sampling step: the model's noise prediction (guided with CFG), then the scheduler's step."""
    guided, rows = conditioning.guided, conditioning.rows
    model_in = torch.cat([latents, latents]) if guided else latents
    model_in = scheduler.scale_model_input(model_in, t)
    out = transformer(
        model_in.to(dtype),
        encoder_hidden_states=conditioning.context,
        encoder_attention_mask=conditioning.mask,
        timestep=t.to(device).reshape(1).expand(rows),
        added_cond_kwargs=conditioning.added,
        return_dict=False,
    )[0].float()
    if out.shape[1] == 2 * latents.shape[1]:  # learned sigma: keep the noise prediction
        out = out[:, : latents.shape[1]]
    if guided:
        out_uncond, out_cond = out.chunk(2)
        out = out_uncond + cfg * (out_cond - out_uncond)
    return scheduler.step(out, t, latents, return_dict=False)[0]


def _pad_cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Concatenate on the batch axis, zero-padding the token axis to the longer of the two."""
    n = max(a.shape[1], b.shape[1])
    pad = lambda x: torch.nn.functional.pad(x, (0, 0, 0, n - x.shape[1])) if x.shape[1] < n else x  # noqa: E731
    return torch.cat([pad(a), pad(b.to(a.dtype))])
