"""What ComfyUI and the Comfy Registry read from the pack besides the nodes: [tool.comfy], the icon and
the node help pages.

Help pages: frontend 1.27.10 (NodeHelpService.fetchCustomNodeHelp) fetches
``/extensions/<pack>/docs/<node_id>/<locale>.md``, then ``/extensions/<pack>/docs/<node_id>.md``,
and ComfyUI serves ``/extensions/<pack>/`` from the pack's ``WEB_DIRECTORY``. tests/browser checks
the served pages on a running server.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from PIL import Image

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
NODE_IDS = sorted(
    {m for path in (ROOT / "nodes").glob("*.py") for m in re.findall(r'node_id="(\w+)"', path.read_text())}
)


def _web_directory() -> Path:
    tree = ast.parse((ROOT / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "WEB_DIRECTORY" for t in node.targets):
            value = ast.literal_eval(node.value)
            assert value, "WEB_DIRECTORY is unset: the node help pages are not served"
            return (ROOT / value).resolve()
    raise AssertionError("__init__.py does not set WEB_DIRECTORY")


def test_registry_metadata_names_comfyui_and_an_icon_in_the_repository():
    comfy = PYPROJECT["tool"]["comfy"]
    assert comfy["requires-comfyui"] == ">=0.3.64"
    repository = PYPROJECT["project"]["urls"]["Repository"]
    owner_name = repository.removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{owner_name}/main/"
    assert comfy["Icon"].startswith(prefix), f"Icon {comfy['Icon']!r} is not a raw file of {repository}"
    icon = ROOT / comfy["Icon"].removeprefix(prefix)
    assert icon.is_file(), f"the Icon URL points at {icon.relative_to(ROOT)}, which the repository does not have"
    with Image.open(icon) as image:
        assert image.width == image.height and 128 <= image.width <= 400, image.size


def test_every_node_has_a_help_page():
    assert len(NODE_IDS) >= 8, NODE_IDS  # the regex still finds the nodes
    docs = _web_directory() / "docs"
    missing = [node_id for node_id in NODE_IDS if not (docs / f"{node_id}.md").is_file()]
    assert not missing, f"no help page {docs.relative_to(ROOT)}/<node_id>.md for {missing}"
    orphans = sorted({p.stem for p in docs.glob("*.md")} - set(NODE_IDS))
    assert not orphans, f"help pages for nodes that do not exist: {orphans}"


def test_help_pages_start_with_the_nodes_display_name():
    docs = _web_directory() / "docs"
    for node_id in NODE_IDS:
        source = next(p for p in (ROOT / "nodes").glob("*.py") if f'node_id="{node_id}"' in p.read_text())
        display = re.search(rf'node_id="{node_id}",[^)]*?display_name="([^"]+)"', source.read_text(), re.S)
        title = (docs / f"{node_id}.md").read_text().splitlines()[0]
        assert display, f"{node_id}: no display_name right after node_id in {source.name}"
        assert title == f"# {display.group(1)}", f"{node_id}.md starts with {title!r}"


def test_web_directory_holds_no_scripts():
    # ComfyUI loads every .js file under WEB_DIRECTORY into the page as a frontend extension.
    assert not list(_web_directory().rglob("*.js"))
