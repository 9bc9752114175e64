"""The error type and bounds shared by the weight readers: every number a file declares is checked
before anything is allocated.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import MedSteerError


class CheckpointError(MedSteerError):
    """A checkpoint or LoRA file is missing, has an unknown layout, or does not fit the model."""


# Bounds on what a file may declare, checked before anything is allocated (issue 12). They are far
# above every released PixArt / T5 / LoRA and far below what would take minutes or gigabytes.
MAX_DEPTH = 1000  # transformer blocks (PixArt-XL-2: 28)
MAX_SAMPLE_SIZE = 1024  # latent pixels per side (PixArt-Sigma 4K: 512)
MAX_INTERPOLATION_SCALE = 64.0  # PixArt: 0.5 ... 4
MAX_LORA_RANK = 16384  # T5-XXL's widest layer is 10240
MAX_LORA_SCALE = 1000.0  # |lora_alpha / r|; released adapters use 0.5 ... 4
MAX_JSON_BYTES = 16 << 20  # config.json / adapter_config.json / *.index.json
MAX_MODULE_NAME = 500  # characters of one module path in an adapter (PixArt's longest: 47)


def _show(value) -> str:
    """A short repr for messages (a 5000-digit integer's repr would itself raise)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**18:
        return f"an integer of {value.bit_length()} bits"
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - any object a crafted file can produce
        text = f"a {type(value).__name__}"
    return text if len(text) <= 80 else text[:77] + "..."


def _whole_number(value, where: str, low: int, high: int, fix: str) -> int:
    """``value`` as an int in ``[low, high]`` (a JSON int, or a float with no fraction), else an error."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        ok, value = True, int(value)
    if not ok or not low <= value <= high:
        raise CheckpointError(f"{where} is {_show(value)}; it must be a whole number from {low} to {high}: {fix}")
    return int(value)


def _finite_number(value, where: str, low: float, high: float, fix: str) -> float:
    """``value`` as a finite float in ``[low, high]``, else an error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(f"{where} is {_show(value)}; it must be a number: {fix}")
    number = float(value) if not isinstance(value, int) or abs(value) <= 10**308 else math.inf
    if not math.isfinite(number) or not low <= number <= high:
        raise CheckpointError(f"{where} is {_show(value)}; it must be a finite number from {low:g} to {high:g}: {fix}")
    return number


def _read_json_object(path: Path, remedy: str) -> dict:
    """The JSON object in the regular file ``path``; every way it can be broken is a ``CheckpointError``."""
    try:
        if not path.is_file():
            raise CheckpointError(f"{str(path)!r} is missing or not a regular file: {remedy}")
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise CheckpointError(f"{str(path)!r} is {size} bytes, more than a config file can be: {remedy}")
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except CheckpointError:
        raise
    except OSError as exc:
        raise CheckpointError(f"cannot read {str(path)!r} ({exc.strerror or exc}): {remedy}") from None
    except (ValueError, RecursionError) as exc:  # JSON / UTF-8 errors, >4300-digit numbers, deep nesting
        raise CheckpointError(
            f"{str(path)!r} is not valid JSON ({type(exc).__name__}: {str(exc)[:120]}): {remedy}"
        ) from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{str(path)!r} must hold a JSON object, not a {type(raw).__name__}: {remedy}")
    return raw
