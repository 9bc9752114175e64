"""Spatially Selective Pathology Steering: the paper's update as a pure function.

The update (method.md, "SSPS"): for every image token ``h`` and unit direction ``v``

    sigma = max(<h, v>, 0)          # a dot product: stronger expression, stronger push
    h'    = h - strength * sigma * v

Tokens with zero or negative alignment pass unchanged and every component orthogonal to ``v`` is
untouched. ``preserve_norm`` rescales each token back to its original norm afterwards (the authors'
code does this; the paper does not).
"""

from __future__ import annotations

import torch

__all__ = ["ssps"]

#: Added to the denominator of the ``preserve_norm`` rescale, as the authors' code does.
NORM_EPS = 1e-8


def ssps(
    h: torch.Tensor,
    v: torch.Tensor,
    strength: float | torch.Tensor,
    preserve_norm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the SSPS update to a batch of token activations.

    Args:
        h: Activations ``[..., N, D]`` (any leading batch shape; ``N`` tokens of width ``D``).
        v: Unit direction(s) broadcastable to ``h``: ``[D]`` for one direction, or ``[B, 1, D]`` for
            one direction per batch row.
        strength: The paper's alpha. A number, or a tensor broadcastable to ``[..., N, 1]`` (one
            strength per row, e.g. ``[B, 1, 1]``; rows with strength 0 come back unchanged).
            Negative values amplify the concept instead of removing it.
        preserve_norm: Rescale each updated token to its original L2 norm.

    Returns:
        ``(h_new, gate)``: the steered activations (a new tensor, same shape and dtype as ``h``) and
        the gate ``sigma = max(<h, v>, 0)`` of shape ``[..., N]``. The input is never modified.

    Example:
        >>> h = torch.tensor([[[3.0, 1.0], [-2.0, 5.0]]])
        >>> v = torch.tensor([1.0, 0.0])
        >>> ssps(h, v, 1.0)[0]
        tensor([[[ 0.,  1.],
                 [-2.,  5.]]])
    """
    if isinstance(strength, (int, float)) and strength == 0:
        # Bit-exact identity, also with preserve_norm (whose rescale is not exact in floats).
        gate = _gate(h, v)
        return h, gate
    v = v.to(device=h.device, dtype=h.dtype)
    gate = _gate(h, v)
    coefficient = gate.unsqueeze(-1) * strength  # [..., N, 1]
    h_new = h - coefficient * v
    if preserve_norm:
        h_new = h_new * (h.norm(dim=-1, keepdim=True) / (h_new.norm(dim=-1, keepdim=True) + NORM_EPS))
    # Untouched tokens (gate 0, or a row whose strength is 0) stay bit-identical: selected, not
    # computed, so neither the rescale's rounding nor 0 x inf (an overflowing strength) reaches them.
    untouched = (coefficient == 0) | (gate.unsqueeze(-1) == 0)
    return torch.where(untouched, h, h_new), gate


def _gate(h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``max(<h, v>, 0)`` over the last axis, shape ``h.shape[:-1]``."""
    v = v.to(device=h.device, dtype=h.dtype)
    return (h * v).sum(dim=-1).clamp_min(0)
