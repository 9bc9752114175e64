"""The shipped oracle classifies and segments synthetic frames it never saw."""

from __future__ import annotations

import pytest

from medsteer_core.mini import oracle as oracle_module
from medsteer_core.mini import synthetic
from tests._mini import shipped_oracle


@pytest.fixture()
def oracle():
    return shipped_oracle()


def test_shipped_oracle_reads_fresh_frames(oracle):
    scores = oracle_module.evaluate_oracle(oracle, per_class=25, seed=4_000_000)
    assert scores["accuracy"] >= 0.95
    assert scores["dye_detected_dyed"] >= 0.95 and scores["dye_detected_other"] <= 0.05
    assert scores["lesion_iou"] >= 0.6 and scores["dye_iou"] >= 0.6


def test_oracle_rejects_wrong_shapes(oracle):
    import torch

    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        oracle.read(torch.zeros(3, 32, 32))


def test_missing_oracle_file_says_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="python -m medsteer_core.mini.oracle train"):
        oracle_module.load_oracle(tmp_path / "nope.safetensors")


def test_corrupt_or_foreign_oracle_file_is_refused_clearly(tmp_path):
    import torch
    from safetensors.torch import save_file

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a readable MedSteer oracle file.*oracle train"):
        oracle_module.load_oracle(corrupt)
    foreign = tmp_path / "mini.safetensors"
    save_file({"x": torch.zeros(1)}, str(foreign), metadata={"format": "medsteer.mini"})
    with pytest.raises(ValueError, match="not a MedSteer oracle file \\(format 'medsteer.mini'\\)"):
        oracle_module.load_oracle(foreign)


def test_classes_are_the_generators():
    assert len(synthetic.CLASSES) == oracle_module.Oracle().classify.out_features
