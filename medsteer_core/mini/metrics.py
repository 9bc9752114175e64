"""Counterfactual metrics: did the concept go, and did everything else stay?

The paper's measures (method.md, "Reported results"), written for any images the oracle can read
(the synthetic world here; on a real model, pass your own classifier outputs and masks):

- **flip rate**: the fraction of steered images the oracle assigns to the target class;
- **delta-p**: the mean drop of the source class probability from unsteered to steered;
- **source removed**: the fraction no longer assigned to the source class (any other class);
- **dye detection rate**: the fraction of images in which dye is still segmented;
- **background PSNR / SSIM**: between the unsteered image and its counterfactual, over a
  background mask: the field of view minus the (dilated) concept masks of both images, so only
  what should not change is scored;
- **effective background PSNR / SSIM**: the same, over only the pairs whose edit succeeded (the
  target class for a lesion edit, no dye left for a dye edit). A pair whose concept survived
  naturally keeps its background, so the plain means flatter a weak edit; these do not;
- the **re-prompting baseline**: the same seed sampled with the without-concept prompt, scored the
  same way. Because both counterfactuals come from the same seed, the two are directly comparable.

All images are ``[B, 3, H, W]`` float in 0-1; masks are ``[B, H, W]`` bool.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "PairScores",
    "background_mask",
    "masked_psnr",
    "masked_ssim",
    "score_pairs",
]


def background_mask(*concept_masks: torch.Tensor, fov: torch.Tensor | None = None, dilate: int = 1) -> torch.Tensor:
    """``[B, H, W]`` pixels that should not change: not in any (dilated) concept mask, inside ``fov``.

    Args:
        concept_masks: ``[B, H, W]`` bool masks (lesion, dye; of the original and the edit).
        fov: ``[B, H, W]`` or ``[H, W]`` field of view (default: everything).
        dilate: grow every concept mask by this many pixels first (edges blend into the mucosa).
    """
    union = torch.zeros_like(concept_masks[0], dtype=torch.bool)
    for mask in concept_masks:
        union |= mask.bool()
    if dilate > 0:
        k = 2 * dilate + 1
        union = F.max_pool2d(union[:, None].float(), k, stride=1, padding=dilate)[:, 0] > 0
    keep = ~union
    if fov is not None:
        keep &= fov.bool().expand_as(keep)
    return keep


def masked_psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` PSNR in dB (peak 1) over the masked pixels; ``inf`` where they are identical, ``nan``
    where the mask is empty."""
    se = ((a.float() - b.float()) ** 2).mean(1)  # [B, H, W]
    m = mask.float()
    count = m.flatten(1).sum(-1)
    mse = (se * m).flatten(1).sum(-1) / count.clamp_min(1)
    psnr = torch.where(mse > 0, 10 * torch.log10(1 / mse.clamp_min(1e-20)), torch.full_like(mse, math.inf))
    return torch.where(count > 0, psnr, torch.full_like(psnr, math.nan))


def masked_ssim(
    a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, window: int = 7, sigma: float = 1.5
) -> torch.Tensor:
    """``[B]`` mean SSIM (Wang et al. 2004, Gaussian window, per channel) over the masked pixels
    (``nan`` where the mask is empty)."""
    c1, c2 = 0.01**2, 0.03**2
    coords = torch.arange(window, dtype=torch.float32) - (window - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(3, 1, window, window).contiguous()
    pad = window // 2

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (pad,) * 4, mode="reflect"), kernel, groups=3)

    a, b = a.float(), b.float()
    # Outside the mask, b takes a's pixels, so concept edits do not leak into the window statistics
    # of nearby background pixels: identical backgrounds score exactly 1.
    b = torch.where(mask[:, None].bool(), b, a)
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    m = mask.float()
    count = m.flatten(1).sum(-1)
    mean = (ssim.mean(1) * m).flatten(1).sum(-1) / count.clamp_min(1)
    return torch.where(count > 0, mean, torch.full_like(mean, math.nan))


@dataclass(frozen=True)
class PairScores:
    """Scores of a set of counterfactual pairs (means over images; rates in 0-1).

    Attributes:
        images: number of pairs.
        flip_rate: edited images the oracle assigns to the target class.
        delta_p: mean drop of the source-class probability (original minus edit).
        source_removed: edited images not assigned to the source class.
        dye_detection: edited images in which the oracle still segments dye.
        bg_psnr: mean background PSNR in dB (identical backgrounds count as 60 dB; images without
            background pixels are left out).
        bg_ssim: mean background SSIM (same).
        succeeded: pairs whose edit succeeded (target class; for a dye edit, no dye left).
        effective_bg_psnr / effective_bg_ssim: the background means over those pairs only
            (``nan`` when none succeeded).
    """

    images: int
    flip_rate: float
    delta_p: float
    source_removed: float
    dye_detection: float
    bg_psnr: float
    bg_ssim: float
    succeeded: int = 0
    effective_bg_psnr: float = math.nan
    effective_bg_ssim: float = math.nan

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


#: Identical backgrounds have infinite PSNR; averages cap each pair here.
PSNR_CAP = 60.0


def score_pairs(
    oracle,
    originals: torch.Tensor,
    edits: torch.Tensor,
    source: int,
    target: int,
    fov: torch.Tensor | None = None,
    dilate: int = 1,
    dye_edit: bool = False,
) -> PairScores:
    """Score counterfactual pairs with the oracle.

    Args:
        oracle: an object with ``read(images) -> OracleOutput`` (``oracle.Oracle``).
        originals / edits: ``[B, 3, H, W]`` unsteered images and their counterfactuals (same seeds).
        source / target: class indices of the edit (e.g. ``dyed`` -> ``polyp``).
        fov: field-of-view mask (default: pixels that are not black in the original).
        dilate: background mask dilation in pixels.
        dye_edit: success means "no dye left" instead of "assigned to the target class".
    """
    if originals.shape != edits.shape:
        raise ValueError(f"originals {tuple(originals.shape)} and edits {tuple(edits.shape)} must have one shape")
    a, b = oracle.read(originals), oracle.read(edits)
    if fov is None:
        fov = originals.amax(1) > 0.02
    keep = background_mask(a.lesion > 0.5, a.dye > 0.5, b.lesion > 0.5, b.dye > 0.5, fov=fov, dilate=dilate)
    psnr = masked_psnr(originals, edits, keep).clamp(max=PSNR_CAP)
    ssim = masked_ssim(originals, edits, keep)
    p_source_a = a.probabilities[:, source]
    p_source_b = b.probabilities[:, source]
    success = ~b.dye_detected.bool() if dye_edit else b.labels == target
    return PairScores(
        images=len(originals),
        flip_rate=float((b.labels == target).float().mean()),
        delta_p=float((p_source_a - p_source_b).mean()),
        source_removed=float((b.labels != source).float().mean()),
        dye_detection=float(b.dye_detected.float().mean()),
        bg_psnr=float(psnr.nanmean()),
        bg_ssim=float(ssim.nanmean()),
        succeeded=int(success.sum()),
        effective_bg_psnr=float(psnr[success].nanmean()) if success.any() else math.nan,
        effective_bg_ssim=float(ssim[success].nanmean()) if success.any() else math.nan,
    )


def rendering_rates(oracle, images_by_class: dict[int, torch.Tensor]) -> dict[int, float]:
    """Per class: the fraction of images generated for that class's prompt that the oracle assigns to it."""
    return {c: float((oracle.read(x).labels == c).float().mean()) for c, x in images_by_class.items()}
