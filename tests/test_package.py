"""Packaging: the pack imports without ComfyUI, pip installs medsteer_core only, the API is small."""

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import medsteer_core

ROOT = Path(__file__).resolve().parents[1]


def test_root_init_imports_without_comfyui():
    if importlib.util.find_spec("comfy_api") is not None:
        import pytest

        pytest.skip("ComfyUI is importable in this interpreter; this checks the import without it")
    spec = importlib.util.spec_from_file_location(
        "medsteer_pack_under_test", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)  # comfy is not importable here: must not raise
    finally:
        sys.modules.pop(spec.name, None)


def test_public_api_is_exported():
    for name in medsteer_core.__all__:
        assert hasattr(medsteer_core, name), name
    assert medsteer_core.__version__


def test_wheel_contains_medsteer_core_only(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("medsteer-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    packages = {t for t in tops if not t.endswith(".dist-info")}
    assert packages == {"medsteer_core"}
    names = set(zipfile.ZipFile(wheel).namelist())
    # The demo's default model, oracle and vectors ship inside the package (issue 5).
    for asset in ("mini/medsteer_mini.safetensors", "mini/oracle.safetensors", "mini/vectors/dye_removal.safetensors"):
        assert f"medsteer_core/assets/{asset}" in names, asset
    entry_points = (
        zipfile.ZipFile(wheel)
        .read(next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith("entry_points.txt")))
        .decode()
    )
    assert "medsteer = medsteer_core.cli:main" in entry_points
