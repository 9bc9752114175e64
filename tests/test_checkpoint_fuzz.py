"""Fuzz the model-file readers (issue 12, F10): crafted diffusers configs, checkpoint shapes, PEFT
adapter configs and MedSteer-mini metadata either load or raise a ``MedSteerError`` (a
``ValueError`` naming the file or field), never another exception, and every example finishes
within its deadline (no backtracking regex, no allocation of a declared size).

The pattern matcher is also checked against PEFT's own regex on every pattern it accepts.
"""

from __future__ import annotations

import json
import math
import re
from datetime import timedelta

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from medsteer_core import MedSteerError, weights
from tests.tiny_models import tiny_pixart

FUZZ = settings(
    max_examples=150,
    deadline=timedelta(seconds=2),
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# JSON values as a crafted file can hold them: huge and non-finite numbers, strings, nesting.
NUMBERS = (
    st.integers(min_value=-(10**30), max_value=10**30)
    | st.sampled_from([0, 1, 2, -1, 10**400, 2**63])
    | st.floats(allow_nan=True, allow_infinity=True)
)
JSON = st.recursive(
    st.none() | st.booleans() | NUMBERS | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
PATTERN_TEXT = st.text(alphabet="ab_0.()|*+?[]{},-\\dw^$:", max_size=14)


def _describable(shape) -> bool:
    """Whether a meta tensor can have this shape (torch refuses storage sizes beyond int64)."""
    return math.prod(max(d, 1) for d in shape) < 2**40


def _only_our_error(call, *args):
    try:
        return call(*args)
    except MedSteerError:
        return None


# ------------------------------------------------------------------------------------------------
# diffusers configs and checkpoint shapes
# ------------------------------------------------------------------------------------------------
PIXART = tiny_pixart()
META_STATE = {k: torch.empty(v.shape, device="meta") for k, v in PIXART.state_dict().items()}
CONFIG = dict(PIXART.config)
CONFIG_KEYS = [
    "num_layers",
    "num_attention_heads",
    "attention_head_dim",
    "in_channels",
    "out_channels",
    "patch_size",
    "caption_channels",
    "cross_attention_dim",
    "sample_size",
    "interpolation_scale",
    "use_additional_conditions",
]


def test_the_unmutated_config_loads():
    assert weights.to_pixart_layout(META_STATE, CONFIG)[1].depth == 2


@FUZZ
@given(st.dictionaries(st.sampled_from(CONFIG_KEYS), JSON, min_size=1, max_size=4))
def test_crafted_diffusers_config(changes):
    _only_our_error(weights.to_pixart_layout, META_STATE, {**CONFIG, **changes})


ORIGINAL = weights.diffusers_to_pixart(META_STATE)
SHAPE = st.lists(st.integers(min_value=0, max_value=3000) | st.just(10**12), max_size=5).map(tuple)
BLOCK_KEY = st.builds(
    lambda index, rest: f"blocks.{index}.{rest}",
    st.text(alphabet="0123456789\u0663", min_size=1, max_size=12) | st.integers(0, 10**9).map(str),
    st.sampled_from(["mlp.fc1.weight", "attn.qkv.weight", "scale_shift_table", "x"]),
)


@FUZZ
@given(
    st.dictionaries(st.sampled_from(sorted(ORIGINAL)) | BLOCK_KEY | st.just("pos_embed"), SHAPE, max_size=5),
    st.sets(st.sampled_from(sorted(ORIGINAL)), max_size=3),
)
def test_crafted_checkpoint_shapes(changes, removed):
    shapes = {k: tuple(v.shape) for k, v in ORIGINAL.items() if k not in removed}
    shapes.update(changes)
    _only_our_error(weights.pixart_geometry, shapes)  # shapes alone: any size
    if all(_describable(shape) for shape in changes.values()):
        state = {k: v for k, v in ORIGINAL.items() if k not in removed}
        state.update({k: torch.empty(shape, device="meta") for k, shape in changes.items()})
        _only_our_error(weights.to_pixart_layout, state)


@FUZZ
@given(
    st.dictionaries(st.sampled_from(sorted(META_STATE)), SHAPE, max_size=4),
    st.sets(st.sampled_from(sorted(META_STATE)), max_size=2),
)
def test_crafted_diffusers_checkpoint_shapes(changes, removed):
    state = {k: v for k, v in META_STATE.items() if k not in removed}
    state.update({k: torch.empty(shape, device="meta") for k, shape in changes.items() if _describable(shape)})
    _only_our_error(weights.to_pixart_layout, state, CONFIG)
    _only_our_error(
        weights.pixart_to_diffusers, {k: torch.empty(s, device="meta") for k, s in _original(changes).items()}
    )


def _original(changes) -> dict:
    shapes = {k: tuple(v.shape) for k, v in ORIGINAL.items()}
    for key, shape in changes.items():
        if "attn1.to_q" in key and _describable(shape):  # the fused qkv is what pixart_to_diffusers splits
            shapes[key.replace("transformer_", "").replace("attn1.to_q", "attn.qkv")] = shape
    return shapes


# ------------------------------------------------------------------------------------------------
# PEFT adapter configs
# ------------------------------------------------------------------------------------------------
ADAPTER_KEYS = ["r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules", "peft_type"]
MODULE = "transformer_blocks.0.attn2.to_k"


@pytest.fixture(scope="module")
def adapter_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter")
    save_file(
        {f"{MODULE}.lora_A.weight": torch.randn(2, 8), f"{MODULE}.lora_B.weight": torch.randn(8, 2)},
        str(folder / "adapter_model.safetensors"),
    )
    return folder


def _write_config(folder, config) -> None:
    # allow_nan: Python's json writes NaN / Infinity, as a crafted file may
    (folder / "adapter_config.json").write_text(json.dumps(config, allow_nan=True))


@FUZZ
@given(
    st.dictionaries(st.sampled_from(ADAPTER_KEYS), JSON, max_size=4),
    st.dictionaries(PATTERN_TEXT, NUMBERS, max_size=2),
    st.sampled_from(["rank_pattern", "alpha_pattern"]),
)
def test_crafted_adapter_config(adapter_folder, changes, patterns, where):
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, **changes}
    if patterns:
        config[where] = patterns
    _write_config(adapter_folder, config)
    adapter = _only_our_error(weights.load_peft_adapter, adapter_folder)
    if adapter is not None:
        (module,) = adapter.modules
        assert abs(module.scale) <= weights.MAX_LORA_SCALE and module.rank == 2


@FUZZ
@given(PATTERN_TEXT, st.text(alphabet="ab_0.", max_size=16))
def test_accepted_patterns_match_exactly_as_peft_s_regex(pattern, module):
    assume(weights.pattern_problem(pattern) is None)
    assert weights.module_matches(pattern, module) is bool(re.match(rf"(.*\.)?({pattern})$", module))


# ------------------------------------------------------------------------------------------------
# MedSteer-mini metadata
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mini_file():
    from safetensors import safe_open

    from medsteer_core.mini import DEFAULT_PATH

    with safe_open(str(DEFAULT_PATH), framework="pt") as handle:
        return dict(handle.metadata()), {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118


MINI_ENTRIES = st.sampled_from(
    [
        ("transformer_config", key)
        for key in ("sample_size", "patch_size", "num_layers", "num_attention_heads", "caption_channels", "norm_eps")
    ]
    + [("text_encoder_config", key) for key in ("num_layers", "d_model", "vocab_size", "num_heads", "d_kv")]
    + [("vocabulary", None), ("default_cfg", None), ("prediction_type", None)]
)


@settings(FUZZ, max_examples=40, deadline=timedelta(seconds=10))
@given(st.lists(st.tuples(MINI_ENTRIES, JSON), min_size=1, max_size=3))
def test_crafted_mini_metadata(tmp_path_factory, mini_file, edits):
    from medsteer_core.mini import load_mini_parts

    meta, tensors = dict(mini_file[0]), mini_file[1]
    for (entry, key), value in edits:
        if key is None:
            meta[entry] = value if isinstance(value, str) else json.dumps(value, allow_nan=True)
        else:
            decoded = json.loads(meta[entry])
            decoded[key] = value
            meta[entry] = json.dumps(decoded, allow_nan=True)
    path = tmp_path_factory.mktemp("mini") / "crafted.safetensors"
    save_file(tensors, str(path), metadata=meta)
    _only_our_error(load_mini_parts, path)
