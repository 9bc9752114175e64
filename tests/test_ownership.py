"""ARCHITECTURE.md's ownership claims, pinned (issue 18).

- Vector metadata strings are read and written only by ``provenance`` and ``vector_file``.
- No import cycles in ``medsteer_core`` or ``nodes`` (module-level imports).
- Latent facts and model structure are asked of ``Sites``: nothing outside the model-knowledge
  modules reads ``patch_size``, ``transformer_blocks``, ``cross_attn``, ``attn2`` or a VAE factor.
- ``Backbone`` declares every method a backbone may implement, and ARCHITECTURE.md names them.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from medsteer_core import provenance
from medsteer_core.backbones import Backbone

ROOT = Path(__file__).resolve().parents[1]
CODE = sorted(
    p
    for folder in ("medsteer_core", "nodes", "scripts")
    for p in (ROOT / folder).rglob("*.py")
    if "assets" not in p.parts
)
#: The modules that own the vector file's strings.
METADATA_OWNERS = {"medsteer_core/provenance.py", "medsteer_core/vector_file.py"}
#: Other files with metadata of their own (the MedSteer-mini model and oracle files, not vectors).
OTHER_FORMATS = re.compile(r"handle\.metadata\(\)|mini\.FORMAT_NAME|meta\.get\([\"'](format|denoiser)[\"']")


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_only_provenance_and_vector_file_touch_vector_metadata_keys():
    keys = "|".join(sorted(re.escape(k) for k in provenance._OWNED_KEYS))
    access = re.compile(rf"\b(metadata|meta|md)\s*(\[|\.get\(|\.setdefault\(|\.pop\()\s*[\"']({keys})[\"']")
    string_api = re.compile(
        r"\b(to_metadata|from_metadata|metadata_list|build_metadata)\(|(?<!\.)\bcalibrated_setting\(\w"
    )
    found = []
    for path in CODE:
        if _rel(path) in METADATA_OWNERS:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if OTHER_FORMATS.search(line):
                continue
            if access.search(line) or string_api.search(line) or re.search(r"\bvector\.metadata\b", line):
                found.append(f"{_rel(path)}:{number}: {line.strip()}")
    assert not found, "vector metadata touched outside provenance/vector_file:\n" + "\n".join(found)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules ``path`` imports at module level (not in functions or TYPE_CHECKING)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for child in [node] if not isinstance(node, ast.Try) else node.body:
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join([*base, child.module] if child.module else base)
                else:
                    target = child.module or ""
                submodules = [f"{target}.{alias.name}" for alias in child.names]
                out.update(c for c in submodules if c in modules and c != name)
                if target in modules and target != name and not all(c in modules for c in submodules):
                    out.add(target)  # a name defined in the package's __init__
            elif isinstance(child, ast.Import):
                out.update(a.name for a in child.names if a.name in modules and a.name != name)
    return out


def test_no_import_cycles_in_the_engine_or_the_nodes():
    paths = [p for p in CODE if p.parts[len(ROOT.parts)] in ("medsteer_core", "nodes")]
    modules = {_module_name(p): p for p in paths}
    graph = {name: _imports(path, set(modules)) for name, path in modules.items()}
    # A package's __init__ importing its own submodules is how packages work; a cycle through it
    # is one where the submodule imports the package (or a module that imports it) back.
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                if not all(
                    a.startswith(b + ".") or b.startswith(a + ".") for a, b in zip(cycle, cycle[1:], strict=False)
                ):
                    cycles.append(" -> ".join(cycle))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


#: Modules that define or load models, and so may read their structure (ARCHITECTURE.md).
MODEL_KNOWLEDGE = ("medsteer_core/backbones/", "medsteer_core/weights/", "medsteer_core/mini/")
MODEL_KNOWLEDGE_FILES = {
    "medsteer_core/headless/models.py",
    "medsteer_core/headless/sd_models.py",
    "medsteer_core/headless/lora.py",
    "nodes/mini.py",
    "nodes/mini_unet.py",
    "nodes/loaders.py",
}


def test_nothing_else_reads_model_structure_or_a_vae_factor():
    pattern = re.compile(
        r"\.(patch_size|transformer_blocks|cross_attn|attn2)\b|\b(height|width)\s*\*\s*8\b|\bchannels\s*=\s*4\b"
    )
    found = []
    for path in CODE:
        rel = _rel(path)
        if rel.startswith(MODEL_KNOWLEDGE) or rel in MODEL_KNOWLEDGE_FILES or rel.startswith("scripts/"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if pattern.search(code) and not code.strip().startswith(('"', "'")):
                found.append(f"{rel}:{number}: {line.strip()}")
    assert not found, "model structure read outside the model-knowledge modules:\n" + "\n".join(found)


def test_the_backbone_protocol_is_declared_and_documented():
    protocol = (
        "transformer",
        "site_modules",
        "site_width",
        "token_grid",
        "site_name",
        "read_call",
        "check_latent",
        "latent_channels",
        "pixel_scale",
        "family_of",
        "default_window",
        "resolution_condition",
    )
    architecture = (ROOT / "ARCHITECTURE.md").read_text()
    for method in protocol:
        assert callable(getattr(Backbone, method, None)), f"Backbone.{method} is not declared"
        assert f"`{method}`" in architecture, f"ARCHITECTURE.md's 'To add a backbone' does not name {method}"
