"""The Python API page's example (docs/python-api.md) and the core example entry point run as documented."""

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


PYTHON_API = ROOT / "docs" / "python-api.md"


def _python_blocks(page: Path) -> list[str]:
    """The python blocks of a page's first part (before its first ``## `` heading)."""
    body = page.read_text().split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_python_api_core_example_runs(tmp_path, monkeypatch, capsys):
    (block,) = _python_blocks(PYTHON_API)[:1]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "docs/python-api.md", "exec"), namespace)
    assert (tmp_path / "dye.safetensors").exists()
    assert namespace["grid"].shape[-1] == 3
    assert not (namespace["steered"] == namespace["unsteered"]).all()
    assert "pair differs by" in capsys.readouterr().out


@pytest.mark.slow
def test_core_example_writes_its_files(tmp_path):
    from medsteer_core.example import main

    assert main([os.fspath(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "gates.png",
        "steered.png",
        "unsteered.png",
        "vector.safetensors",
    ]
