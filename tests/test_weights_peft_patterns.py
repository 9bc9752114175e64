"""medsteer_core.weights.peft_patterns: PEFT's rank / alpha patterns matched as PEFT matches them,
in linear time, and patterns outside the supported rule refused.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from medsteer_core import weights
from tests.weights_helpers import adapter_folder, write_adapter


def test_backtracking_pattern_is_refused_at_once(tmp_path):
    """F5: PEFT's regex with rank_pattern key '(a+)+$' took 183 s on a 20-character name."""
    import time

    folder = tmp_path / "a"
    name = "a" * 30 + "!"
    write_adapter(folder, {f"{name}.lora_A.weight": torch.zeros(2, 8), f"{name}.lora_B.weight": torch.zeros(8, 2)})
    config = json.loads((folder / "adapter_config.json").read_text())
    for pattern in ("(a+)+$", "(a|aa)*$", "(a*)*", "(?:a+)+", r"(\w+\.?)+"):
        config["rank_pattern"] = {pattern: 2}
        (folder / "adapter_config.json").write_text(json.dumps(config))
        start = time.perf_counter()
        with pytest.raises(weights.CheckpointError, match=re.escape(f"rank_pattern key {pattern!r}")):
            weights.load_peft_adapter(folder)
        assert time.perf_counter() - start < 1


@pytest.mark.parametrize(
    "pattern, why",
    [
        ("[", "not closed"),
        ("(to_q", "not closed"),
        ("to_q)", "unmatched"),
        ("a{2,1}", "reversed"),
        (".*.*.*", "more than 2 variable repeats"),
        (".?" * 60, "more than 2 variable repeats"),  # exponential in re without the count
        ("(a|.)" * 40, "more than 16 alternatives"),  # 2^40 paths in re
        ("(a|b|c|d|e)(f|g|h|i)", "more than 16 alternatives"),
        ("x" * 201, "201 characters"),
        (r"(a)\1", "not supported"),
        ("(?=a)", "not supported"),
        ("a**", "quantifier follows"),
        ("", "0 characters"),
    ],
)
def test_unsupported_patterns_name_the_key_and_the_rule(tmp_path, pattern, why):
    folder = adapter_folder(tmp_path, alpha_pattern={pattern: 2.0})
    with pytest.raises(weights.CheckpointError, match="alpha_pattern key " + re.escape(repr(pattern)[:40])) as error:
        weights.load_peft_adapter(folder)
    assert why in str(error.value) and "transformer_blocks.0.attn1.to_q" in str(error.value)


def test_target_modules_string_is_a_pattern_too(tmp_path):
    with pytest.raises(weights.CheckpointError, match=r"target_modules '\(a\+\)\+'"):
        weights.load_peft_adapter(adapter_folder(tmp_path, target_modules="(a+)+"))


REAL_PATTERNS = [
    "transformer_blocks.0.attn2.to_k",
    "attn2.to_k",
    "to_k",
    r"transformer_blocks\.\d+\.attn2\.to_k",
    "transformer_blocks.0.attn[12].to_(q|k)",
    "^transformer_blocks.0.attn2.to_k$",
    ".*attn2.*",
    "(?:attn1|attn2).to_k",
    "to_q|to_k",
    r"transformer_blocks\.[0-9]{1,2}\.attn2\.to_k",
]


@pytest.mark.parametrize("pattern", REAL_PATTERNS)
def test_real_peft_patterns_match_as_peft_matches_them(tmp_path, pattern):
    module = "transformer_blocks.0.attn2.to_k"
    assert weights.module_matches(pattern, module) is bool(re.match(rf"(.*\.)?({pattern})$", module))
    assert weights.module_matches(pattern, module)  # every one of these targets the module
    adapter = weights.load_peft_adapter(
        adapter_folder(tmp_path, rank_pattern={pattern: 2}, alpha_pattern={pattern: 6.0})
    )
    assert adapter.modules[0].scale == 3.0


def test_patterns_of_other_modules_do_not_match():
    for pattern in ("transformer_blocks.0.attn1.to_q", "attn1.to_k", "to_q", "blocks.0.attn2.to_k", "to_k$|to_v"):
        assert not weights.module_matches(pattern, "transformer_blocks.0.attn2.to_kv")
        assert weights.module_matches(pattern, "transformer_blocks.0.attn2.to_k") is bool(
            re.match(rf"(.*\.)?({pattern})$", "transformer_blocks.0.attn2.to_k")
        )


def test_pattern_matching_is_linear_in_the_module_name():
    import time

    name = "a." * 20_000 + "!"  # a crafted adapter's module names are checked at 500 characters; this is 40001
    start = time.perf_counter()
    assert not weights.module_matches("(a|.)(a|.)(a|.)(a|.)(.*)(.*)x", name)
    assert time.perf_counter() - start < 1
