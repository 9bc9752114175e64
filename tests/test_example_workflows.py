"""example_workflows/ is what scripts/make_example_workflows.py writes (CI; no ComfyUI needed).

tests/comfyui/test_workflows.py validates the same files against ComfyUI's real node schemas.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location(
        "make_example_workflows", ROOT / "scripts" / "make_example_workflows.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_workflow_files_are_up_to_date_and_have_thumbnails():
    generator = _generator()
    assert generator.main(["--check"]) == 0, "run: python scripts/make_example_workflows.py"
    for name in generator.WORKFLOWS:
        assert (ROOT / "example_workflows" / f"{name}.png").is_file()


def test_links_are_consistent_both_ways():
    for path in sorted((ROOT / "example_workflows").glob("*.json")):
        workflow = json.loads(path.read_text())
        nodes = {n["id"]: n for n in workflow["nodes"]}
        assert workflow["last_node_id"] == max(nodes) and workflow["last_link_id"] == len(workflow["links"])
        for link_id, origin, origin_slot, target, target_slot, link_type in workflow["links"]:
            output = nodes[origin]["outputs"][origin_slot]
            assert link_id in output["links"] and output["type"] == link_type, (path.name, link_id)
            assert nodes[target]["inputs"][target_slot]["link"] == link_id, (path.name, link_id)
