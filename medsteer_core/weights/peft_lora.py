"""The MedSteer PEFT LoRA: adapter configs and their scales, adapter weights, and the patches that map
them onto a PixArt transformer's and a T5 encoder's weight keys.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .bounds import (
    MAX_LORA_RANK,
    MAX_LORA_SCALE,
    MAX_MODULE_NAME,
    CheckpointError,
    _finite_number,
    _read_json_object,
    _show,
    _whole_number,
)
from .peft_patterns import PATTERN_RULE, module_matches, pattern_problem
from .pixart import _shape
from .pixart_files import load_state_dict_file
from .pixart_layout import _diffusers_module_target


# ------------------------------------------------------------------------------------------------
# PEFT LoRA
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PeftLoraConfig:
    """The parts of a PEFT ``adapter_config.json`` that decide how a LoRA is applied.

    Attributes:
        r: default rank.
        lora_alpha: default alpha.
        use_rslora: scale ``alpha / sqrt(r)`` instead of ``alpha / r``.
        rank_pattern / alpha_pattern: per-module overrides (PEFT's suffix matching, see ``module_matches``).
        base_model: ``base_model_name_or_path`` (informational).
    """

    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    base_model: str | None = None

    @staticmethod
    def _pattern(patterns: Mapping, module: str):
        # PEFT's rule (peft.utils.other.get_pattern_key): the first pattern matching a name suffix.
        for pattern, value in patterns.items():
            if module_matches(pattern, module):
                return value
        return None

    def rank(self, module: str) -> int:
        """The rank PEFT gives ``module`` (``rank_pattern`` first, then ``r``)."""
        value = self._pattern(self.rank_pattern, module)
        return int(self.r if value is None else value)

    def scale(self, module: str) -> float:
        """``alpha / r`` for ``module`` (``alpha / sqrt(r)`` with rsLoRA), as PEFT computes it.

        Raises:
            CheckpointError: the scale is not finite or its size exceeds ``MAX_LORA_SCALE``.
        """
        alpha = self._pattern(self.alpha_pattern, module)
        alpha = float(self.lora_alpha if alpha is None else alpha)
        rank = self.rank(module)
        scale = alpha / math.sqrt(rank) if self.use_rslora else alpha / rank
        if not math.isfinite(scale) or abs(scale) > MAX_LORA_SCALE:
            raise CheckpointError(
                f"module {module!r} gets lora_alpha {alpha:g} / {'sqrt(r)' if self.use_rslora else 'r'} with r={rank}, "
                f"a scale of {scale:g}; a LoRA scale beyond +-{MAX_LORA_SCALE:g} only produces noise or NaN: "
                "fix lora_alpha / alpha_pattern in adapter_config.json (PEFT's default is lora_alpha = r)"
            )
        return scale


def _refuse_variants(raw: dict, name: str) -> None:
    """Refuse adapters that are not LoRA, or LoRA variants that change the math."""
    if raw.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(
            f"{name!r} is a {_show(raw.get('peft_type')).strip(chr(39))} adapter; only LoRA adapters are supported"
        )
    for flag, meaning in (
        ("use_dora", "DoRA"),
        ("lora_bias", "LoRA bias terms"),
        ("fan_in_fan_out", "fan_in_fan_out (transposed Conv1D weights)"),
    ):
        if raw.get(flag):
            raise CheckpointError(
                f"{name!r} sets {flag}={json.dumps(raw[flag]) if isinstance(raw[flag], bool) else _show(raw[flag])}: {meaning} is not supported; use a plain LoRA adapter"
            )
    if raw.get("modules_to_save"):
        raise CheckpointError(
            f"{name!r} saves full modules {_show(raw['modules_to_save'])} besides the LoRA; that is not supported"
        )


def _patterns(raw: dict, name: str, bound: float, fix: str) -> dict[str, dict]:
    """``rank_pattern`` / ``alpha_pattern`` checked (keys PEFT can match without backtracking,
    values in bounds), and string ``target_modules`` / ``exclude_modules`` patterns checked."""
    patterns = {}
    for key, number in (("rank_pattern", _whole_number), ("alpha_pattern", _finite_number)):
        value = raw.get(key) or {}
        if not isinstance(value, dict):
            raise CheckpointError(
                f"{key} in {name!r} is a {type(value).__name__}; it must be an object of module pattern -> value"
            )
        for pattern, setting in value.items():
            problem = pattern_problem(pattern)
            if problem is not None:
                raise CheckpointError(
                    f"{key} key {_show(pattern)} in {name!r} is not supported ({problem}): {PATTERN_RULE}"
                )
            where = f"{key}[{pattern!r}] in {name!r}"
            if number is _whole_number:
                number(setting, where, 1, MAX_LORA_RANK, fix)
            else:
                number(setting, where, -bound, bound, fix)
        patterns[key] = dict(value)
    for key in ("target_modules", "exclude_modules"):  # PEFT runs re.fullmatch on a string value
        value = raw.get(key)
        if isinstance(value, str) and (problem := pattern_problem(value)) is not None:
            raise CheckpointError(f"{key} {_show(value)} in {name!r} is not supported ({problem}): {PATTERN_RULE}")
    return patterns


def read_peft_config(path: str | os.PathLike) -> PeftLoraConfig:
    """Parse and check an ``adapter_config.json``.

    Every value that decides the update is checked (issue 12, F8/F10): ``r`` and each
    ``rank_pattern`` rank a whole number from 1 to ``MAX_LORA_RANK``, ``lora_alpha`` and each
    ``alpha_pattern`` value finite with ``|alpha / r| <= MAX_LORA_SCALE``, every pattern key (and a
    string ``target_modules`` / ``exclude_modules``) inside the subset PEFT can match without
    backtracking (``PATTERN_RULE``).

    Raises:
        CheckpointError: missing or broken file, not a LoRA, a LoRA variant that changes the math
            (DoRA, LoRA bias, ``fan_in_fan_out``, full modules to save), or a value out of bounds.
    """
    path = Path(path)
    name = str(path)
    if not path.is_file():
        raise CheckpointError(
            f"{name!r} is missing; a PEFT adapter folder holds adapter_config.json and adapter_model.safetensors"
        )
    raw = _read_json_object(path, "save the adapter again with save_pretrained")
    _refuse_variants(raw, name)
    for key in ("r", "lora_alpha"):
        if key not in raw:
            raise CheckpointError(
                f"{name!r} has no {key!r} entry; PEFT writes it: save the adapter again with save_pretrained"
            )
    fix = f"fix it in {name!r} (PEFT adapters use r = 4 ... 256, lora_alpha about r)"
    r = _whole_number(raw["r"], f"r in {name!r}", 1, MAX_LORA_RANK, fix)
    bound = MAX_LORA_SCALE * MAX_LORA_RANK  # the scale itself is checked below, per module in scale()
    alpha = _finite_number(raw["lora_alpha"], f"lora_alpha in {name!r}", -bound, bound, fix)
    use_rslora = raw.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise CheckpointError(f"use_rslora in {name!r} is {_show(use_rslora)}; it must be true or false")
    patterns = _patterns(raw, name, bound, fix)
    base = raw.get("base_model_name_or_path")
    config = PeftLoraConfig(
        r=r,
        lora_alpha=alpha,
        use_rslora=use_rslora,
        rank_pattern=patterns["rank_pattern"],
        alpha_pattern=patterns["alpha_pattern"],
        base_model=base if isinstance(base, str) else None,
    )
    scale = alpha / math.sqrt(r) if use_rslora else alpha / r
    if abs(scale) > MAX_LORA_SCALE:
        raise CheckpointError(
            f"lora_alpha {alpha:g} with r={r} in {name!r} gives a LoRA scale of {scale:g}; beyond "
            f"+-{MAX_LORA_SCALE:g} an adapter only produces noise or NaN: {fix}"
        )
    return config


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: ``delta W = scale * up @ down`` (PEFT's ``lora_B @ lora_A``).

    Attributes:
        name: module path in the base model (``transformer_blocks.0.attn1.to_q``).
        down: ``lora_A.weight`` ``[r, in]`` (``[r, in, k, k]`` for a convolution).
        up: ``lora_B.weight`` ``[out, r]`` (``[out, r, 1, 1]``).
        scale: ``lora_alpha / r`` for this module.
    """

    name: str
    down: torch.Tensor
    up: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def delta_shape(self) -> tuple[int, ...]:
        return (int(self.up.shape[0]), *(int(s) for s in self.down.shape[1:]))


@dataclass(frozen=True)
class PeftAdapter:
    """A PEFT LoRA adapter read from ``adapter_config.json`` + ``adapter_model.safetensors``."""

    path: str
    config: PeftLoraConfig
    modules: tuple[LoraModule, ...]


_PEFT_KEY_RE = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(\.[^.]+)?\.weight$")
_PEFT_PREFIXES = ("base_model.model.",)


def load_peft_adapter(folder: str | os.PathLike) -> PeftAdapter:
    """Read one PEFT LoRA adapter folder and compute each module's scale.

    Raises:
        CheckpointError: missing files, unsupported keys (embedding LoRA, DoRA magnitudes,
            saved full modules), unpaired A/B matrices, or ranks that contradict the config.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"adapter folder {str(folder)!r} does not exist")
    config = read_peft_config(folder / "adapter_config.json")
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        extra = (
            " (adapter_model.bin is not supported: re-save with safe_serialization=True)"
            if (folder / "adapter_model.bin").is_file()
            else ""
        )
        raise CheckpointError(
            f"{str(weights)!r} is missing{extra}; a PEFT adapter folder holds adapter_config.json and adapter_model.safetensors"
        )
    tensors = load_state_dict_file(weights)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name = key
        for prefix in _PEFT_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        if len(name) > MAX_MODULE_NAME or not name.isprintable():
            raise CheckpointError(
                f"{str(weights)!r} has a key of {len(name)} characters ({_show(name[:40])}...), not a module path: "
                "the file is damaged or not a PEFT adapter; save the adapter again with save_pretrained"
            )
        match = _PEFT_KEY_RE.match(name)
        if match is None:
            if "lora_embedding_" in name:
                why = "LoRA on embedding layers is not supported"
            elif "lora_magnitude_vector" in name:
                why = "DoRA magnitudes are not supported"
            elif ".lora_B" in name and name.endswith(".bias"):
                why = "LoRA bias terms are not supported"
            else:
                why = "only lora_A / lora_B weight matrices are supported (saved full modules are not)"
            raise CheckpointError(f"{str(weights)!r} has key {key!r}: {why}")
        pairs.setdefault(match.group("module"), {})[match.group("kind")] = tensor
    if not pairs:
        raise CheckpointError(f"{str(weights)!r} holds no LoRA matrices")
    modules = []
    for name in sorted(pairs):
        pair = pairs[name]
        if set(pair) != {"lora_A", "lora_B"}:
            raise CheckpointError(
                f"{str(weights)!r}: module {name!r} has {sorted(pair)} but needs both lora_A and lora_B"
            )
        down, up = pair["lora_A"], pair["lora_B"]
        if up.ndim < 2 or down.ndim < 2 or up.shape[1] != down.shape[0] or any(s != 1 for s in up.shape[2:]):
            raise CheckpointError(
                f"{str(weights)!r}: module {name!r} has lora_A {list(down.shape)} and lora_B {list(up.shape)}, "
                "which do not multiply (lora_B is [out, r], lora_A is [r, in])"
            )
        rank = config.rank(name)
        if down.shape[0] != rank:
            raise CheckpointError(
                f"{str(weights)!r}: module {name!r} has rank {down.shape[0]} but adapter_config.json says "
                f"r={rank}; the config does not belong to these weights"
            )
        modules.append(LoraModule(name, down, up, config.scale(name)))
    return PeftAdapter(str(folder), config, tuple(modules))


@dataclass(frozen=True)
class LoraPatch:
    """One LoRA update on one model weight.

    Attributes:
        target: the model's weight key (``diffusion_model.blocks.0.attn.qkv.weight``).
        offset: ``(dim, start, length)`` when the update covers a slice of a fused weight, else ``None``.
        module: the adapter module it came from.
    """

    target: str
    offset: tuple[int, int, int] | None
    module: LoraModule

    @property
    def scale(self) -> float:
        return self.module.scale

    def delta(self) -> torch.Tensor:
        """``scale * up @ down`` in float32, shaped like the (slice of the) target weight."""
        up = self.module.up.float().flatten(1)
        down = self.module.down.float().flatten(1)
        return (self.scale * (up @ down)).reshape(self.module.delta_shape)


def _check_fit(module: LoraModule, target: str, target_shape: tuple[int, ...], offset, adapter_path: str) -> None:
    want = target_shape if offset is None else (offset[2], *target_shape[1:])
    if module.delta_shape != want:
        part = "" if offset is None else f" (rows {offset[1]}:{offset[1] + offset[2]} of {list(target_shape)})"
        raise CheckpointError(
            f"LoRA module {module.name!r} of {adapter_path!r} does not fit {target!r}: the adapter's update has "
            f"shape {list(module.delta_shape)}, the model's weight{part} has shape {list(want)}. The adapter was "
            "trained for a model of another size; use it with the model it was trained on"
        )


def _lookup(target: str, shapes: Mapping, module: LoraModule, adapter_path: str, kind: str) -> tuple[int, ...]:
    if target not in shapes:
        raise CheckpointError(
            f"LoRA module {module.name!r} of {adapter_path!r} maps to {target!r}, which the {kind} does not have; "
            f"is this adapter for this {kind}?"
        )
    return _shape(shapes[target])


def transformer_lora_patches(
    adapter: PeftAdapter, model_shapes: Mapping[str, torch.Tensor | Sequence[int]], prefix: str = "diffusion_model."
) -> list[LoraPatch]:
    """Map a diffusers-PixArt LoRA onto an original-layout PixArt model's weights.

    Args:
        adapter: a PEFT adapter trained on ``PixArtTransformer2DModel``.
        model_shapes: the model's state dict (or key -> shape), e.g. a ComfyUI ``BaseModel``'s.
        prefix: the transformer's key prefix in ``model_shapes``.

    Returns:
        One ``LoraPatch`` per module; q/k/v updates cover their rows of the fused weights.

    Raises:
        CheckpointError: a module that is not a PixArt transformer module, or one whose shape does
            not fit (the message names the module, the weight and both shapes).
    """
    if f"{prefix}t_block.1.weight" not in model_shapes:
        raise CheckpointError(
            f"the model is not a PixArt transformer (no {prefix}t_block.1.weight); apply {adapter.path!r} to a "
            "PixArt-alpha model, e.g. from MedSteer Load PixArt-alpha Checkpoint"
        )
    patches = []
    for module in adapter.modules:
        target = _diffusers_module_target(module.name)
        if target is None:
            raise CheckpointError(
                f"LoRA module {module.name!r} of {adapter.path!r} is not a module of a diffusers PixArt transformer; "
                "is this the transformer_lora adapter?"
            )
        key = f"{prefix}{target.module}.weight"
        shape = _lookup(key, model_shapes, module, adapter.path, "PixArt model")
        offset = None
        if target.part is not None:
            if shape[0] % target.parts:
                raise CheckpointError(f"{key!r} has {shape[0]} rows, not divisible into {target.parts} fused parts")
            rows = shape[0] // target.parts
            offset = (0, target.part * rows, rows)
        _check_fit(module, key, shape, offset, adapter.path)
        patches.append(LoraPatch(key, offset, module))
    return patches


def find_t5_prefix(shapes: Iterable[str]) -> str:
    """The prefix under which a text encoder's state dict holds a T5 encoder
    (``t5xxl.transformer.`` in ComfyUI's PixArt CLIP, ``""`` for transformers' ``T5EncoderModel``).

    Raises:
        CheckpointError: no T5 encoder blocks among the keys.
    """
    anchor = "encoder.block.0.layer.0.SelfAttention.q.weight"
    found = sorted(k[: -len(anchor)] for k in shapes if k.endswith(anchor))
    if not found:
        raise CheckpointError(
            "the text encoder has no T5 encoder (no '...encoder.block.0.layer.0.SelfAttention.q.weight'); "
            "load T5-XXL with CLIPLoader (type pixart) and connect that CLIP"
        )
    return found[0]


def t5_lora_patches(
    adapter: PeftAdapter, encoder_shapes: Mapping[str, torch.Tensor | Sequence[int]], prefix: str | None = None
) -> list[LoraPatch]:
    """Map a transformers-T5 LoRA (``encoder.block.N.layer.0.SelfAttention.q`` ...) onto a T5
    encoder's weights.

    Args:
        adapter: a PEFT adapter trained on ``T5EncoderModel``.
        encoder_shapes: the text encoder's state dict (or key -> shape).
        prefix: key prefix of the T5 module; default ``find_t5_prefix(encoder_shapes)``.

    Raises:
        CheckpointError: a module the encoder lacks, or a shape that does not fit.
    """
    if prefix is None:
        prefix = find_t5_prefix(encoder_shapes)
    patches = []
    for module in adapter.modules:
        key = f"{prefix}{module.name}.weight"
        shape = _lookup(key, encoder_shapes, module, adapter.path, "T5 text encoder")
        _check_fit(module, key, shape, None, adapter.path)
        patches.append(LoraPatch(key, None, module))
    return patches


@dataclass(frozen=True)
class MedSteerLora:
    """The authors' LoRA layout: a transformer adapter and a T5 text-encoder adapter."""

    path: str
    transformer: PeftAdapter | None
    text_encoder: PeftAdapter | None


TRANSFORMER_LORA_DIR = "transformer_lora"
TEXT_ENCODER_LORA_DIR = "text_encoder_lora"


def load_medsteer_lora(
    folder: str | os.PathLike, *, transformer: bool = True, text_encoder: bool = True
) -> MedSteerLora:
    """Read ``folder/transformer_lora`` and ``folder/text_encoder_lora``.

    Args:
        folder: the LoRA folder.
        transformer / text_encoder: which halves are needed (a half that is not needed is not read,
            and may be absent).

    Raises:
        CheckpointError: the folder or a needed half is missing or malformed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"LoRA folder {str(folder)!r} does not exist")
    halves = {}
    for needed, sub, strength in (
        (transformer, TRANSFORMER_LORA_DIR, "strength_model"),
        (text_encoder, TEXT_ENCODER_LORA_DIR, "strength_clip"),
    ):
        if not needed:
            halves[sub] = None
            continue
        if not (folder / sub).is_dir():
            if (folder / "adapter_config.json").is_file():
                raise CheckpointError(
                    f"{str(folder)!r} is a single PEFT adapter, not the MedSteer layout: put the transformer "
                    f"adapter in {TRANSFORMER_LORA_DIR}/ and the T5 adapter in {TEXT_ENCODER_LORA_DIR}/ "
                    "of one folder (each with adapter_config.json and adapter_model.safetensors)"
                )
            # Never list the folder: this message reaches a shared server's clients (issue 12, F1).
            raise CheckpointError(
                f"{str(folder)!r} has no {sub}/ folder. The MedSteer LoRA layout is "
                f"{TRANSFORMER_LORA_DIR}/ and {TEXT_ENCODER_LORA_DIR}/, each with adapter_config.json and "
                f"adapter_model.safetensors; set {strength} to 0 to skip this half"
            )
        halves[sub] = load_peft_adapter(folder / sub)
    return MedSteerLora(str(folder), halves[TRANSFORMER_LORA_DIR], halves[TEXT_ENCODER_LORA_DIR])


def list_lora_folders(roots: Iterable[str | os.PathLike], max_depth: int = 3) -> list[str]:
    """Folders under ``roots`` in the MedSteer LoRA layout, as ``relative/path/``."""
    found = set()
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for dirpath, dirnames, _ in os.walk(root, followlinks=True):
            rel = Path(dirpath).relative_to(root)
            if len(rel.parts) >= max_depth:
                dirnames.clear()
            if TRANSFORMER_LORA_DIR in dirnames or TEXT_ENCODER_LORA_DIR in dirnames:
                found.add(rel.as_posix() + "/")
    return sorted(found)
