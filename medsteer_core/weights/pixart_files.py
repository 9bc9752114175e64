"""PixArt weight files: single files, diffusers transformer folders (config + shards), listing them."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from .bounds import CheckpointError, _read_json_object, _show, _whole_number
from .pixart import PixArtGeometry, check_state_dict_fits, expected_pixart_shapes, pixart_geometry
from .pixart_layout import _is_pixart_layout, _strip_prefix, diffusers_to_pixart, is_diffusers_layout

# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------
_WEIGHT_SUFFIXES = (".safetensors", ".sft", ".pth", ".pt", ".bin", ".ckpt")


def looks_like_local_path(source: str | os.PathLike) -> bool:
    """Whether ``source`` names a local file or folder rather than a Hugging Face hub id.

    True when it starts with ``./``, ``../``, ``/`` or ``~`` (or is ``.``/``..``), contains a
    backslash, has more than one ``/`` (hub ids are ``owner/name``), ends with a weight-file
    extension (``.safetensors``, ``.pth``, ``.ckpt``, ...), or its first component exists here
    (``models/x`` when ``./models`` is a folder). Used so that a local path that does not exist
    fails at once with its name, instead of ~30 s of hub retries (issue 11).

    Example:
        >>> looks_like_local_path("./nope"), looks_like_local_path("PixArt-alpha/PixArt-XL-2-512x512")
        (True, False)
    """
    text = os.fspath(source)
    if isinstance(source, os.PathLike) and not isinstance(source, str):
        return True  # a Path object is a path by construction
    if text in (".", "..") or text.startswith(("./", "../", "/", "~", ".\\", "..\\")):
        return True
    if "\\" in text or os.sep != "/" and os.sep in text or text.count("/") > 1:
        return True
    if text.lower().endswith(_WEIGHT_SUFFIXES + (".gguf",)):
        return True
    first = text.split("/", 1)[0]
    return "/" in text and Path(first).expanduser().is_dir()


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load tensors from a ``.safetensors`` file, or safely (``weights_only``) from a torch file.

    A torch file holding ``{"state_dict": ...}`` (PixArt's released ``.pth``) is unwrapped.

    Raises:
        CheckpointError: missing, unreadable or not a dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in (".safetensors", ".sft"):
            from safetensors.torch import load_file

            return load_file(str(path))
        if suffix not in _WEIGHT_SUFFIXES:
            raise CheckpointError(
                f"{path.name!r}: unknown checkpoint extension {suffix!r}; use one of {list(_WEIGHT_SUFFIXES)}"
            )
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) torch files cannot be memory-mapped
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors / pickle errors: say which file and what to do
        raise CheckpointError(
            f"cannot read {str(path)!r} ({type(exc).__name__}: {exc}); the file is corrupt, incomplete "
            "or not a checkpoint (torch files are loaded weights-only, so pickled code is refused)"
        ) from exc
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        raise CheckpointError(f"{str(path)!r} does not hold a state dict of tensors (names to tensors)")
    return data


_WEIGHTS = "diffusion_pytorch_model"


def _shard_path(folder: Path, name, index: Path) -> Path:
    """A shard named in a ``*.index.json`` weight map: a bare file name in ``folder``, a regular file.

    diffusers writes bare names; a name such as ``../x.safetensors`` or an absolute path would load
    weights from outside the model folder (issue 12, F13). Symbolic links are followed (the Hugging
    Face cache links every file into its blobs/ folder) but must end at a regular file.
    """
    where = f"{str(index)!r} names the shard {_show(name)}"
    if not isinstance(name, str) or not name.endswith(".safetensors"):
        raise CheckpointError(
            f"{where}, which is not a .safetensors file name: the index is damaged; download it again"
        )
    if name in (".", "..") or "/" in name or "\\" in name or "\0" in name or os.path.isabs(name):
        raise CheckpointError(
            f"{where}: shards must be plain file names in the same folder (no folders, '..' or absolute paths); "
            "the index is damaged or crafted, download the model again"
        )
    path = folder / name
    if not path.is_file():
        raise CheckpointError(f"{where}, which is missing or not a regular file in {str(folder)!r}; download it")
    return path


def _diffusers_weight_files(folder: Path) -> list[Path]:
    """The safetensors files diffusers would load from a transformer folder (no variant first)."""
    indexes = sorted(folder.glob(f"{_WEIGHTS}*.safetensors.index.json"))
    files = sorted(folder.glob(f"{_WEIGHTS}*.safetensors"))
    plain_index = [p for p in indexes if p.name == f"{_WEIGHTS}.safetensors.index.json"]
    plain = [p for p in files if p.name == f"{_WEIGHTS}.safetensors"]
    if plain_index or (indexes and not plain):
        if not plain_index and len(indexes) > 1:
            raise CheckpointError(
                f"{str(folder)!r} has several weight index files {[p.name for p in indexes]}; keep one"
            )
        index = (plain_index or indexes)[0]
        weight_map = _read_json_object(index, "download the model again").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{str(index)!r} has no weight_map object: the index is damaged; download it again")
        return sorted({_shard_path(folder, name, index) for name in weight_map.values()})
    if plain or len(files) == 1:  # the plain file, or a single variant such as ...fp16.safetensors
        chosen = (plain or files)[0]
        if not chosen.is_file():
            raise CheckpointError(f"{str(chosen)!r} is not a regular file; put the weights file there")
        return [chosen]
    if not files:
        raise CheckpointError(
            f"{str(folder)!r} has no diffusion_pytorch_model*.safetensors; a diffusers transformer folder "
            "holds config.json and diffusion_pytorch_model.safetensors (.bin weights are not supported: "
            "convert them to safetensors)"
        )
    raise CheckpointError(f"{str(folder)!r} has several weight variants {[p.name for p in files]}; keep one")


def _read_transformer_config(folder: Path) -> dict:
    config = _read_json_object(folder / "config.json", "use the config.json saved with the model")
    cls = config.get("_class_name", "PixArtTransformer2DModel")
    if cls not in ("PixArtTransformer2DModel", "Transformer2DModel"):
        raise CheckpointError(f"{str(folder)!r} holds a {_show(cls)}, not a PixArtTransformer2DModel")
    return config


def check_diffusers_transformer(folder: str | os.PathLike) -> PixArtGeometry | None:
    """Check a diffusers PixArt transformer folder's ``config.json`` against its weights, reading
    only the safetensors headers (no tensor data), before diffusers builds anything from it.

    Returns:
        The geometry, or ``None`` when the folder has no safetensors weights (nothing to compare).

    Raises:
        CheckpointError: a config entry that is not a sane number or contradicts the weights (block
            count, widths, channels), a shard outside the folder, or weights that are not PixArt's.
    """
    from safetensors import safe_open

    folder = Path(folder)
    config = _read_transformer_config(folder)
    if not any(folder.glob(f"{_WEIGHTS}*.safetensors*")):
        return None
    shapes: dict[str, torch.Tensor] = {}
    for file in _diffusers_weight_files(folder):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                    shapes[key] = torch.empty(handle.get_slice(key).get_shape(), device="meta")
        except Exception as exc:  # safetensors' own error types on a corrupt header
            raise CheckpointError(
                f"cannot read the header of {str(file)!r} ({type(exc).__name__}: {str(exc)[:120]}); the file is "
                "corrupt or incomplete, download it again"
            ) from None
    return to_pixart_layout(shapes, config)[1]


def _transformer_folder(folder: Path) -> Path:
    if (folder / "config.json").is_file() and any(folder.glob("diffusion_pytorch_model*.safetensors*")):
        return folder
    if (folder / "transformer" / "config.json").is_file():  # a whole pipeline folder
        return folder / "transformer"
    raise CheckpointError(
        f"{str(folder)!r} is not a diffusers transformer folder: it needs config.json and "
        "diffusion_pytorch_model*.safetensors (or a transformer/ subfolder with them)"
    )


def load_diffusers_transformer(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a diffusers ``PixArtTransformer2DModel`` folder (or a pipeline folder's ``transformer/``).

    Returns:
        ``(state_dict, config)``: diffusers keys, and the parsed ``config.json``.

    Raises:
        CheckpointError: missing files, or a config of another model class.
    """
    folder = _transformer_folder(Path(folder))
    config = _read_transformer_config(folder)
    state_dict: dict[str, torch.Tensor] = {}
    for file in _diffusers_weight_files(folder):
        state_dict.update(load_state_dict_file(file))
    return state_dict, config


def to_pixart_layout(
    state_dict: Mapping[str, torch.Tensor], diffusers_config: Mapping | None = None
) -> tuple[dict[str, torch.Tensor], PixArtGeometry]:
    """Bring a PixArt state dict of either layout into the original layout and read its geometry.

    Original checkpoints lose their ``pos_embed`` buffer (ComfyUI computes it) after it has told
    the sample size; diffusers ones gain a zero ``y_embedder.y_embedding`` (unused at inference).

    Args:
        state_dict: original or diffusers keys (a ``model.diffusion_model.`` style prefix is removed).
        diffusers_config: ``config.json`` of a diffusers folder (heads, sample size, interpolation).

    Returns:
        ``(state_dict, geometry)``; the state dict has exactly ``expected_pixart_shapes(geometry)``.

    Raises:
        CheckpointError: not a PixArt transformer, or shapes that do not fit its geometry.
    """
    sd = _strip_prefix(state_dict)
    if diffusers_config is not None and not isinstance(diffusers_config, Mapping):
        raise CheckpointError(f"the diffusers config must be a JSON object, not a {type(diffusers_config).__name__}")
    config = dict(diffusers_config or {})
    if is_diffusers_layout(sd):
        sd = diffusers_to_pixart(sd)
    elif not _is_pixart_layout(sd):
        raise CheckpointError(
            f"not a PixArt transformer checkpoint (keys such as {sorted(sd)[:3]}): MedSteer's loader takes a "
            "PixArt-alpha checkpoint, original (.pth/.safetensors with blocks.N.attn.qkv) or diffusers "
            "(transformer folder with transformer_blocks.N.attn1.to_q)"
        )
    geometry = pixart_geometry(
        sd,
        num_heads=config.get("num_attention_heads"),
        sample_size=config.get("sample_size"),
        interpolation_scale=config.get("interpolation_scale"),
    )
    sd.pop("pos_embed", None)
    if "y_embedder.y_embedding" not in sd:
        ref = sd["y_embedder.y_proj.fc1.weight"]
        sd["y_embedder.y_embedding"] = torch.zeros(
            (geometry.model_max_length, geometry.caption_channels), dtype=ref.dtype, device=ref.device
        )
    check_config_matches_geometry(config, geometry)
    check_state_dict_fits(sd, expected_pixart_shapes(geometry))
    return sd, geometry


def check_config_matches_geometry(config: Mapping, geometry: PixArtGeometry) -> None:
    """Raise unless every shape entry of a diffusers ``config.json`` agrees with the weights.

    diffusers builds the model from the config and then copies the weights in: a config with fewer
    layers than the weights silently dropped blocks, one with more failed with "Cannot copy out of
    meta tensor" (issue 12, F12). Entries that are absent are not checked.

    Raises:
        CheckpointError: an entry that is not a positive whole number, or that contradicts the weights.
    """
    fix = "the config.json and the weights come from different models; use the config.json saved with these weights"
    said = {}
    for key in (
        "num_layers",
        "num_attention_heads",
        "attention_head_dim",
        "in_channels",
        "out_channels",
        "patch_size",
        "caption_channels",
        "cross_attention_dim",
    ):
        if config.get(key) is not None:
            said[key] = _whole_number(config[key], f"{key} (config.json)", 1, 1 << 20, fix)
    pairs = [
        ("num_layers", said.get("num_layers"), geometry.depth, "blocks"),
        ("in_channels", said.get("in_channels"), geometry.in_channels, "input channels"),
        ("out_channels", said.get("out_channels", said.get("in_channels")), geometry.out_channels, "output channels"),
        ("patch_size", said.get("patch_size"), geometry.patch_size, "as patch size"),
        ("caption_channels", said.get("caption_channels"), geometry.caption_channels, "caption channels"),
        ("cross_attention_dim", said.get("cross_attention_dim"), geometry.hidden_size, "as width"),
    ]
    if "num_attention_heads" in said and "attention_head_dim" in said:
        width = said["num_attention_heads"] * said["attention_head_dim"]
        pairs.append(("num_attention_heads x attention_head_dim", width, geometry.hidden_size, "as width"))
    for name, value, actual, what in pairs:
        if value is not None and value != actual:
            raise CheckpointError(f"config.json says {name} = {value}, but the weights have {actual} {what}: {fix}")
    extra = config.get("use_additional_conditions")
    if extra is not None and not isinstance(extra, bool):
        raise CheckpointError(f"use_additional_conditions (config.json) is {_show(extra)}; it must be true or false")
    if extra is None and config.get("sample_size") is not None:
        extra = config["sample_size"] == 128  # diffusers' default for the switch
    if isinstance(extra, bool) and extra != geometry.micro_condition:
        raise CheckpointError(
            f"config.json asks for use_additional_conditions = {extra}, but the weights "
            f"{'have' if geometry.micro_condition else 'lack'} the size / aspect-ratio embedders: {fix}"
        )


def load_pixart_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], PixArtGeometry]:
    """Load a PixArt-alpha transformer from an original file or a diffusers folder.

    A diffusers-layout weight file next to a ``config.json`` uses that config too.

    Returns:
        ``(state_dict, geometry)`` in the original layout (see ``to_pixart_layout``).
    """
    path = Path(path)
    if path.is_dir():
        sd, config = load_diffusers_transformer(path)
        return to_pixart_layout(sd, config)
    sd = load_state_dict_file(path)
    config = None
    sibling = path.parent / "config.json"
    if is_diffusers_layout(_strip_prefix(sd)) and sibling.is_file():
        config = _read_json_object(sibling, "use the config.json saved with the weights, or remove it")
    return to_pixart_layout(sd, config)


def list_diffusers_folders(roots: Iterable[str | os.PathLike], max_depth: int = 3) -> list[str]:
    """Diffusers transformer folders under ``roots``, as ``relative/path/`` (with a trailing slash).

    A folder counts when it has ``config.json`` and ``diffusion_pytorch_model*.safetensors``; a
    pipeline folder is listed as its ``transformer/`` subfolder.
    """
    found = set()
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            rel = Path(dirpath).relative_to(root)
            if len(rel.parts) >= max_depth:
                dirnames.clear()
            if "config.json" in filenames and any(
                f.startswith("diffusion_pytorch_model") and ".safetensors" in f for f in filenames
            ):
                found.add(rel.as_posix() + "/")
    return sorted(found)
