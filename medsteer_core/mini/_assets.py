"""Reading the package's own tagged safetensors files (MedSteer-mini, the oracle).

Both are safetensors whose metadata carries a ``format`` tag; this reads one with the same clear
errors for a missing, corrupt or foreign file, so ``load_mini`` and ``load_oracle`` stay short.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import MedSteerError


def read_tagged(
    path: str | os.PathLike, fmt: str, what: str, remedy: str
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of a safetensors file whose metadata ``format`` is ``fmt``.

    Args:
        path: the file.
        fmt: the expected ``format`` tag.
        what: the kind of file, for messages ("MedSteer-mini", "MedSteer oracle").
        remedy: what to do instead, appended to every message.

    Raises:
        MedSteerError: the file is missing, is not readable safetensors, or has another format tag.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MedSteerError(f"no {what} file at {path}: {remedy}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if meta.get("format") != fmt:
                raise MedSteerError(f"{path} is not a {what} file (format {meta.get('format')!r}): {remedy}")
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    except MedSteerError:
        raise
    except Exception as exc:  # safetensors raises its own error types on a corrupt header or body
        raise MedSteerError(f"{path} is not a readable {what} file ({type(exc).__name__}: {exc}): {remedy}") from exc
    return meta, tensors
