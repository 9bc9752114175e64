"""Packaging: the pack imports without ComfyUI, pip installs medsteer_core only, the API is small."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import medsteer_core

ROOT = Path(__file__).resolve().parents[1]


def test_root_init_imports_without_comfyui():
    """A fresh interpreter without ComfyUI (the CLI's, pytest's) imports the pack root and registers
    nothing. A subprocess, so it also holds where this test session has booted ComfyUI already."""
    code = (
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('comfy_api') is None, 'ComfyUI is importable here'\n"
        f"spec = importlib.util.spec_from_file_location('medsteer_pack_under_test', {str(ROOT / '__init__.py')!r}, "
        f"submodule_search_locations=[{str(ROOT)!r}])\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules[spec.name] = module\n"
        "spec.loader.exec_module(module)\n"
        "assert not hasattr(module, 'comfy_entrypoint'), 'registered nodes without ComfyUI'\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COMFYUI_PATH")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT.parent)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_public_api_is_small_and_exported():
    """Issue 9, item 7: about a dozen top-level names, by task; the rest come from their modules."""
    assert sorted(medsteer_core.__all__) == sorted(
        [
            "__version__",
            *("PathologyVector", "load_vector", "save_vector"),  # vector I/O
            *("VectorEstimator", "capture"),  # estimation
            *("SteeringPlan", "steering", "ssps"),  # steering
            "GateRecord",  # gates
            *("find_sites", "Backbone", "register_backbone"),  # models
            *("MedSteerError", "UnsupportedModelError", "VectorFileError", "VectorMismatchError"),  # errors
        ]
    )
    for name in medsteer_core.__all__:
        assert hasattr(medsteer_core, name), name
    assert medsteer_core.__version__
    for name in ("CallInfo", "HookHandle", "attach_capture", "GateMaps", "Sites", "SamplingSpec", "sample"):
        assert not hasattr(medsteer_core, name), f"{name} is back at the top level"
    from medsteer_core.backbones import Sites
    from medsteer_core.driver import SamplingSpec, initial_latents, sample
    from medsteer_core.gates import GateMaps
    from medsteer_core.hooks import CallInfo, HookHandle, attach_capture, attach_steering

    assert all((Sites, SamplingSpec, initial_latents, sample, GateMaps, CallInfo, HookHandle))
    assert all((attach_capture, attach_steering))


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
    # Every module ships, the subpackages' (backbones, the wings) included.
    for module in sorted((ROOT / "medsteer_core").rglob("*.py")):
        assert module.relative_to(ROOT).as_posix() in names, module
    # The demo's default model, oracle and vectors ship inside the package (issue 5), in the mini's wing.
    for asset in ("medsteer_mini.safetensors", "oracle.safetensors", "vectors/dye_removal.safetensors"):
        assert f"medsteer_core/mini/assets/{asset}" in names, asset
    entry_points = (
        zipfile.ZipFile(wheel)
        .read(next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith("entry_points.txt")))
        .decode()
    )
    assert "medsteer = medsteer_core.headless.cli:main" in entry_points


def test_the_engine_and_headless_route_do_not_import_medsteer_mini():
    """MedSteer-mini is a wing: importing the package, the CLI and the headless pipeline (a fresh
    interpreter, so nothing this session imported counts) loads none of it; ``medsteer demo`` and
    ``--model mini`` import it when they run."""
    code = (
        "import sys\n"
        "import medsteer_core, medsteer_core.headless, medsteer_core.headless.cli\n"
        "print(sorted(m for m in sys.modules if m.startswith('medsteer_core.mini')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


def test_headless_wing_layout_nodes_import_none_of_it_and_old_paths_are_gone():
    """Issue 9, item 5: the headless wing replaces ``pipeline`` / ``cli``, ``weights`` replaces
    ``checkpoints`` (no forwarding modules left), and no node imports the headless wing (the
    InspectPathologyVector report is the engine's ``medsteer_core.inspection``)."""
    import ast
    import importlib

    for old in ("medsteer_core.pipeline", "medsteer_core.cli", "medsteer_core.checkpoints"):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(old)
    for node_file in sorted((ROOT / "nodes").glob("*.py")):
        tree = ast.parse(node_file.read_text())
        modules = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in modules if "headless" in m], node_file.name
    engine = ROOT / "medsteer_core" / "inspection.py"
    assert "headless" not in "".join(
        n.module or "" for n in ast.walk(ast.parse(engine.read_text())) if isinstance(n, ast.ImportFrom)
    )


def test_engine_wings_and_nodes_keep_the_size_rule():
    """Issue 9, item 8: every module of medsteer_core (MedSteer-mini's wing has its own test) and of
    nodes/ under 500 lines, every function at most 80, except the declarative tables ``build_parser``
    (argparse) and ``define_schema`` (node sockets)."""
    import ast

    core = ROOT / "medsteer_core"
    files = [p for p in core.rglob("*.py") if p.relative_to(core).parts[0] != "mini"]
    files += (ROOT / "nodes").glob("*.py")
    names = {p.relative_to(ROOT).as_posix() for p in files}
    # The split modules are checked too (a rename would otherwise drop them from the rule silently).
    for module in ("hooks.py", "site_forward.py", "vector.py", "vector_algebra.py", "driver.py", "headless/cli.py"):
        assert f"medsteer_core/{module}" in names, module
    assert "nodes/build_vector.py" in names
    for path in files:
        text = path.read_text()
        name = path.relative_to(ROOT).as_posix()
        assert text.count("\n") < 500, f"{name}: {text.count(chr(10))} lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in (
                "build_parser",
                "define_schema",
            ):
                length = node.end_lineno - node.lineno + 1
                assert length <= 80, f"{name}: {node.name} has {length} lines"
