"""The authors' MedSteer LoRA on a diffusers PixArt pipeline: checked, attached with PEFT, merged."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

from torch import nn

from ..inspection import sha256_file
from .outputs import log
from .sources import _LORA_PARTS, ModelLoadError


# ================================================================================ LoRA
def apply_lora(pipe, folder: str | os.PathLike) -> tuple[str, str]:
    """Apply the authors' LoRA layout to a PixArt pipeline's transformer and T5 encoder, in place.

    Each half (``transformer_lora/``, ``text_encoder_lora/``; at least one must exist) is read and
    checked by ``weights.load_peft_adapter``, checked against the model's module shapes,
    attached with PEFT, verified to carry the scale ``weights`` computes from the config
    (``lora_alpha / r``, or per-module patterns), and merged into the weights.

    Returns:
        ``(folder, sha256)``: the folder and a digest of every adapter file, for provenance.

    Raises:
        ModelLoadError: a missing or malformed folder, or an adapter that does not fit the model.
    """
    from ..weights import CheckpointError, load_medsteer_lora

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"no LoRA folder at {str(folder)!r}: check the path")
    if (folder / "adapter_config.json").is_file():
        raise ModelLoadError(
            f"{str(folder)!r} is a single PEFT adapter; medsteer expects the authors' layout, a folder with "
            f"{_LORA_PARTS['transformer']}/ and/or {_LORA_PARTS['text_encoder']}/: move it to "
            f"{str(folder / _LORA_PARTS['transformer'])!r} (or text_encoder_lora/ for a T5 adapter)"
        )
    present = {part: (folder / sub).is_dir() for part, sub in _LORA_PARTS.items()}
    if not any(present.values()):
        raise ModelLoadError(
            f"{str(folder)!r} has neither {_LORA_PARTS['transformer']}/ nor {_LORA_PARTS['text_encoder']}/; the "
            "MedSteer LoRA layout is those two folders, each with adapter_config.json and adapter_model.safetensors"
        )
    try:
        adapters = load_medsteer_lora(folder, transformer=present["transformer"], text_encoder=present["text_encoder"])
    except CheckpointError as exc:
        raise ModelLoadError(str(exc)) from None
    digest = hashlib.sha256()
    for part, adapter in (("transformer", adapters.transformer), ("text_encoder", adapters.text_encoder)):
        if adapter is None:
            continue
        merged = _attach_and_merge(getattr(pipe, part), adapter, part)
        setattr(pipe, part, merged)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            digest.update(f"{part}/{name}:{sha256_file(Path(adapter.path) / name)}\n".encode())
        log.info("applied %s LoRA %s (%d modules)", part, adapter.path, len(adapter.modules))
    return str(folder), digest.hexdigest()


def _attach_and_merge(module: nn.Module, adapter, part: str) -> nn.Module:
    from peft import LoraConfig, PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    for lora_module in adapter.modules:  # shapes first: PEFT's own errors do not name both sides
        try:
            target = module.get_submodule(lora_module.name)
        except AttributeError:
            raise ModelLoadError(
                f"the {part} adapter {adapter.path!r} adapts {lora_module.name!r}, which this {part} "
                f"({type(module).__name__}) does not have: is it the adapter of this model "
                f"(made for {adapter.config.base_model!r})?"
            ) from None
        weight = getattr(target, "weight", None)
        if weight is None or tuple(weight.shape) != lora_module.delta_shape:
            shape = None if weight is None else list(weight.shape)
            raise ModelLoadError(
                f"the {part} adapter {adapter.path!r} does not fit {lora_module.name!r}: its update has shape "
                f"{list(lora_module.delta_shape)}, the model's weight has {shape}. The adapter was trained on "
                f"another model ({adapter.config.base_model!r}); use it with that one"
            )
    config = LoraConfig.from_pretrained(adapter.path)
    config.inference_mode = True
    wrapped = PeftModel(module, config)
    state = load_file(str(Path(adapter.path) / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(wrapped, state)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing or result.unexpected_keys:
        raise ModelLoadError(
            f"the {part} adapter {adapter.path!r} does not match its own adapter_config.json: missing "
            f"{missing[:5]}, unexpected {list(result.unexpected_keys)[:5]}"
        )
    # PEFT computes each module's scale from the config; it must be what the file format says.
    scales = {m.name: m.scale for m in adapter.modules}
    for name, layer in wrapped.base_model.model.named_modules():
        if isinstance(layer, LoraLayer) and name in scales:
            got = float(layer.scaling["default"])
            if not math.isclose(got, scales[name], rel_tol=1e-6):
                raise ModelLoadError(f"PEFT scales {name!r} by {got}, but its config gives {scales[name]}")
    return wrapped.merge_and_unload()
