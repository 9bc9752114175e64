"""example_workflows/: hand-kept UI-format workflows (ComfyUI's template form) and their thumbnails.

No ComfyUI needed: each file is one consistent graph, its MedSteer nodes' widget values fit the
schemas in nodes/*.py, it opens at a readable zoom with its notes, and scripts/render_thumbnails.py
drew its thumbnail. tests/comfyui/test_workflows.py checks the same files against ComfyUI's live node
schemas and the shipped vectors' calibrated settings.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFont

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = sorted((ROOT / "example_workflows").glob("*.json"))

# ComfyUI frontend 1.27.10 (LGraphCanvas.updateLowQualityThreshold) draws node text only while
# ds.scale >= min_font_size_for_lod / (LiteGraph.NODE_TEXT_SIZE * sqrt(devicePixelRatio)), with the
# defaults 8 and 14: 0.571 on a screen with devicePixelRatio 1. tests/browser reads the live value.
TEXT_ZOOM_CUTOFF = 8 / 14
# The graph canvas ComfyUI's UI leaves in a 1920 x 1080 window (its tab bar and left side bar take
# the rest; measured in tests/browser): a template opened at its stored view should fit in it.
SCREEN = (1856, 1002)
# Group titles: LGraphGroup draws `font_size`px Arial at x + 4 in a bar 1.4 * font_size high.
GROUP_PADDING, GROUP_FONT = 4, "LiberationSans-Regular.ttf"  # Liberation Sans: Arial's metrics
# Where the real-PixArt templates' weights come from (docs/installation.md's "Loading PixArt-XL-2-512x512" too).
WEIGHT_SOURCES = (
    "PixArt-XL-2-512x512",
    "PixArt-alpha/PixArt-alpha",
    "t5xxl_fp16.safetensors",
    "stabilityai/sd-vae-ft-ema",
    "MedSteer authors' Kvasir LoRA",
)


def test_there_are_eight_workflows():
    assert [p.stem for p in TEMPLATES] == [
        "medsteer_batch_pairs",
        "medsteer_build_vector",
        "medsteer_compositional_edit",
        "medsteer_counterfactual_pair",
        "medsteer_counterfactual_pair_sd",
        "medsteer_dye_removal",
        "medsteer_quickstart_mini",
        "medsteer_quickstart_mini_unet",
    ]


# ------------------------------------------------------------------ the graph: nodes and links
def graph_problems(workflow: dict) -> list[str]:
    """What keeps a UI-format workflow (what the frontend saves) from loading as one graph.

    Every link in ``links`` joins an existing output slot that lists it to an existing input slot
    that holds it, with the output's type; every link a node names is in ``links``, from or to that
    node and slot; node and link ids are unique and within ``last_node_id`` / ``last_link_id``.
    """
    problems = [f"no {key!r}" for key in ("nodes", "links", "last_node_id", "last_link_id") if key not in workflow]
    if problems:
        return problems
    nodes = {}
    for node in workflow["nodes"]:
        missing = [
            key for key in ("id", "type", "pos", "size", "inputs", "outputs", "widgets_values") if key not in node
        ]
        if missing:
            problems.append(f"node {node.get('id')} ({node.get('type')}) has no {missing}")
        elif node["id"] in nodes:
            problems.append(f"node id {node['id']} is used twice")
        else:
            nodes[node["id"]] = node
    if problems:
        return problems
    links = {}
    for link_id, origin, origin_slot, target, target_slot, link_type in workflow["links"]:
        if link_id in links:
            problems.append(f"link id {link_id} is used twice")
        links[link_id] = (origin, origin_slot, target, target_slot, link_type)
        if origin not in nodes or target not in nodes:
            problems.append(f"link {link_id} joins missing node {origin if origin not in nodes else target}")
            continue
        outputs, inputs = nodes[origin]["outputs"], nodes[target]["inputs"]
        if origin_slot >= len(outputs) or link_id not in (outputs[origin_slot]["links"] or []):
            problems.append(f"link {link_id}: node {origin} output {origin_slot} does not list it")
        elif outputs[origin_slot]["type"] != link_type:
            problems.append(
                f"link {link_id} is {link_type}, node {origin} output {origin_slot} is {outputs[origin_slot]['type']}"
            )
        if target_slot >= len(inputs) or inputs[target_slot]["link"] != link_id:
            problems.append(f"link {link_id}: node {target} input {target_slot} does not hold it")
        elif inputs[target_slot]["type"] not in (link_type, "*"):
            problems.append(
                f"link {link_id} is {link_type}, node {target} input {target_slot} takes {inputs[target_slot]['type']}"
            )
    for node_id, node in nodes.items():
        label = f"node {node_id} ({node['type']})"
        for slot, inp in enumerate(node["inputs"]):
            link = links.get(inp["link"])
            if inp["link"] is not None and (link is None or link[2:4] != (node_id, slot)):
                problems.append(f"{label} input {inp['name']!r} holds link {inp['link']}, which does not end there")
        for slot, out in enumerate(node["outputs"]):
            for link_id in out["links"] or []:
                link = links.get(link_id)
                if link is None or link[:2] != (node_id, slot):
                    problems.append(f"{label} output {out['name']!r} lists link {link_id}, which does not start there")
    if nodes and workflow["last_node_id"] < max(nodes):
        problems.append(f"last_node_id {workflow['last_node_id']} is below node id {max(nodes)}")
    if links and workflow["last_link_id"] < max(links):
        problems.append(f"last_link_id {workflow['last_link_id']} is below link id {max(links)}")
    return problems


@pytest.mark.parametrize("path", TEMPLATES, ids=[p.stem for p in TEMPLATES])
def test_workflow_is_one_graph_with_links_consistent_both_ways(path):
    problems = graph_problems(json.loads(path.read_text()))
    assert not problems, f"{path.name}: " + "; ".join(problems)


def test_graph_check_catches_broken_links():
    workflow = json.loads((ROOT / "example_workflows" / "medsteer_counterfactual_pair.json").read_text())
    assert graph_problems(workflow) == []
    dangling = copy.deepcopy(workflow)
    dangling["links"].pop(3)
    assert any("which does not" in p for p in graph_problems(dangling))
    retyped = copy.deepcopy(workflow)
    next(link for link in retyped["links"] if link[5] == "PATHOLOGY_VECTOR")[5] = "MODEL"
    assert any("is MODEL, node" in p for p in graph_problems(retyped))
    moved = copy.deepcopy(workflow)
    moved["links"][0][4] += 1  # the target slot no longer holds it
    assert any("does not hold it" in p for p in graph_problems(moved))


# ------------------------------------------------------------------ MedSteer widgets vs the node schemas
WIDGET_KINDS = {"Int": "INT", "Float": "FLOAT", "Boolean": "BOOLEAN", "String": "STRING", "Combo": "COMBO"}
VALUE_TYPES = {"INT": int, "FLOAT": (int, float), "BOOLEAN": bool, "STRING": str, "COMBO": str}
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")


def medsteer_widgets() -> dict[str, list[tuple[str, str, dict]]]:
    """Each MedSteer node's widgets as ``(name, kind, literal options)``, in ``widgets_values`` order.

    Read from the ``io.Schema`` calls in nodes/*.py (no ComfyUI here): required widgets, then
    optional ones (the frontend's order); ``min``, ``max`` and ``control_after_generate`` when they
    are literals. tests/comfyui/test_workflows.py checks the same files against the live schemas.
    """
    schemas = {}
    for path in sorted((ROOT / "nodes").glob("*.py")):
        for call in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(call, ast.Call) and getattr(call.func, "attr", None) == "Schema"):
                continue
            keywords = {k.arg: k.value for k in call.keywords}
            widgets = []
            for item in keywords["inputs"].elts:  # io.Int.Input("seed", min=0, ...)
                kind = WIDGET_KINDS.get(getattr(item.func.value, "attr", None))
                options = {}
                for keyword in item.keywords:  # options=list(ROW_OPTIONS) and the like: only ComfyUI knows them
                    with contextlib.suppress(ValueError):
                        options[keyword.arg] = ast.literal_eval(keyword.value)
                if kind is not None and not options.get("force_input"):
                    widgets.append((ast.literal_eval(item.args[0]), kind, options))
            widgets.sort(key=lambda widget: bool(widget[2].get("optional")))  # stable: required first
            schemas[ast.literal_eval(keywords["node_id"])] = widgets
    return schemas


def widget_problems(node: dict, widgets: list[tuple[str, str, dict]]) -> list[str]:
    """How a node's ``widgets_values`` do not fit its widgets: count, types, literal ranges.

    An INT widget with ``control_after_generate`` (or named ``seed``, the frontend's legacy rule)
    carries a second value: fixed / increment / decrement / randomize.
    """
    label = f"node {node['id']} ({node['type']})"
    expected = []
    for name, kind, options in widgets:
        expected.append((name, kind, options))
        if kind == "INT" and options.get("control_after_generate", name in ("seed", "noise_seed")):
            expected.append((f"{name}'s control_after_generate", "CONTROL", {}))
    values = node["widgets_values"]
    if len(values) != len(expected):
        names = [name for name, _, _ in expected]
        return [f"{label} has {len(values)} widget values, its schema takes {len(expected)}: {names}"]
    problems = []
    for (name, kind, options), value in zip(expected, values, strict=True):
        if kind == "CONTROL":
            if value not in CONTROL_VALUES:
                problems.append(f"{label} {name} is {value!r}, not one of {CONTROL_VALUES}")
        elif not isinstance(value, VALUE_TYPES[kind]) or (kind != "BOOLEAN" and isinstance(value, bool)):
            problems.append(f"{label} {name} is {value!r}, not a {kind}")
        elif kind in ("INT", "FLOAT") and not options.get("min", value) <= value <= options.get("max", value):
            problems.append(f"{label} {name} is {value}, outside [{options.get('min')}, {options.get('max')}]")
    return problems


def test_schema_reader_finds_every_medsteer_node():
    schemas = medsteer_widgets()
    node_ids = {m for path in (ROOT / "nodes").glob("*.py") for m in re.findall(r'node_id="(\w+)"', path.read_text())}
    assert set(schemas) == node_ids and len(schemas) >= 9, sorted(set(schemas) ^ node_ids)
    assert [name for name, _, _ in schemas["ApplySSPSSteer"]][-1] == "layers"  # the optional widget comes last
    assert schemas["BuildPathologyVector"][0] == ("seed", "INT", schemas["BuildPathologyVector"][0][2])


@pytest.mark.parametrize("path", TEMPLATES, ids=[p.stem for p in TEMPLATES])
def test_medsteer_widget_values_fit_the_node_schemas(path):
    schemas = medsteer_widgets()
    medsteer = [n for n in json.loads(path.read_text())["nodes"] if n["type"] in schemas]
    assert medsteer, f"{path.name} uses no MedSteer node"
    problems = [p for node in medsteer for p in widget_problems(node, schemas[node["type"]])]
    assert not problems, f"{path.name}: " + "; ".join(problems)


def test_widget_check_catches_wrong_values():
    schemas = medsteer_widgets()
    workflow = json.loads((ROOT / "example_workflows" / "medsteer_build_vector.json").read_text())
    build = next(n for n in workflow["nodes"] if n["type"] == "BuildPathologyVector")
    assert widget_problems(build, schemas["BuildPathologyVector"]) == []
    for index, value, message in [
        (1, "sometimes", "not one of"),  # seed's control_after_generate
        (2, 0, "outside [1, 100000]"),  # num_seeds
        (3, 20.5, "not a INT"),  # steps
        (3, True, "not a INT"),
    ]:
        broken = copy.deepcopy(build)
        broken["widgets_values"][index] = value
        assert any(message in p for p in widget_problems(broken, schemas["BuildPathologyVector"])), (index, value)
    short = copy.deepcopy(build)
    short["widgets_values"].pop(1)  # a file written without the control value
    assert "its schema takes 7" in widget_problems(short, schemas["BuildPathologyVector"])[0]


def _renderer():
    spec = importlib.util.spec_from_file_location("render_thumbnails", ROOT / "scripts" / "render_thumbnails.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", TEMPLATES, ids=[p.stem for p in TEMPLATES])
def test_thumbnail_is_drawn_from_the_workflow_as_it_is(path):
    """A thumbnail left behind by an edit that moved, added or removed nodes differs in size, or in
    more pixels than JPEG noise touches, from what scripts/render_thumbnails.py draws from the file
    now (a node moved by 40 px: 0.9 % of the pixels; JPEG noise: 0.1 %). A changed value alone is
    too small to see here."""
    drawn = np.asarray(_renderer().render(json.loads(path.read_text())), dtype=float)
    with Image.open(path.with_suffix(".jpg")) as image:
        stored = np.asarray(image.convert("RGB"), dtype=float)
    fix = f"run python scripts/render_thumbnails.py {path.stem}"
    assert stored.shape == drawn.shape, (
        f"{path.stem}.jpg is {stored.shape[:2]}, the file draws {drawn.shape[:2]}: {fix}"
    )
    changed = (np.abs(stored - drawn).max(axis=-1) > 48).mean()
    assert changed < 0.003, f"{changed:.1%} of {path.stem}.jpg differs from what the file draws: {fix}"


@pytest.mark.parametrize("path", TEMPLATES, ids=[p.stem for p in TEMPLATES])
def test_thumbnail_is_the_jpeg_the_template_browser_requests(path):
    # Frontend 1.27.10 lists custom-node templates with mediaSubtype "jpg" and requests
    # /api/workflow_templates/<pack>/<name>.jpg (useTemplateWorkflows.getTemplateThumbnailUrl).
    thumbnail = path.with_suffix(".jpg")
    assert thumbnail.is_file(), f"{path.name} has no {thumbnail.name}: run python scripts/render_thumbnails.py"
    with Image.open(thumbnail) as image:
        assert image.format == "JPEG", f"{thumbnail.name} is a {image.format} file with a .jpg name"
        assert image.width >= 800 and image.height >= 300, image.size


def test_docs_image_links_into_example_workflows_resolve():
    quickstart = ROOT / "docs" / "quickstart.md"
    links = re.findall(r"\]\((\.\./example_workflows/[^)]+)\)", quickstart.read_text())
    assert links, "docs/quickstart.md shows no example workflow picture"
    missing = [link for link in links if not (quickstart.parent / link).is_file()]
    assert not missing, f"docs/quickstart.md links to missing files: {missing}"


def _extent(workflow: dict) -> tuple[float, float, float, float]:
    boxes = [g["bounding"] for g in workflow.get("groups", [])]
    boxes += [[n["pos"][0], n["pos"][1] - 30, n["size"][0], n["size"][1] + 30] for n in workflow["nodes"]]
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[0] + b[2] for b in boxes),
        max(b[1] + b[3] for b in boxes),
    )


@pytest.mark.parametrize("path", TEMPLATES, ids=[p.stem for p in TEMPLATES])
def test_template_opens_at_a_zoom_that_draws_text_with_the_graph_in_view(path):
    ds = json.loads(path.read_text())["extra"]["ds"]
    scale, (ox, oy) = ds["scale"], ds["offset"]
    assert scale >= TEXT_ZOOM_CUTOFF, (
        f"{path.name} opens at zoom {scale}: below the frontend's {TEXT_ZOOM_CUTOFF:.3f} every node is drawn "
        "without text; raise extra.ds.scale in the file"
    )
    # canvas -> screen: (x + offset) * scale
    x0, y0, x1, y1 = _extent(json.loads(path.read_text()))
    left, top, right, bottom = ((x0 + ox) * scale, (y0 + oy) * scale, (x1 + ox) * scale, (y1 + oy) * scale)
    assert left >= 0 and top >= 0, f"{path.name}: the graph starts off screen at ({left:.0f}, {top:.0f}) px"
    assert right <= SCREEN[0] and bottom <= SCREEN[1], (
        f"{path.name}: the graph ends at ({right:.0f}, {bottom:.0f}) px, outside the {SCREEN} px canvas of a "
        "1920 x 1080 window"
    )


def _title_width(text: str, size: int) -> float:
    try:
        font = ImageFont.truetype(GROUP_FONT, size)
    except OSError:  # no Liberation Sans: Pillow's own scalable font, with a 10 % margin
        return 1.1 * ImageFont.load_default(size).getlength(text)
    return font.getlength(text)


def _title_bars(workflow: dict) -> list[tuple[str, tuple[float, float, float, float]]]:
    """Each group's title bar, widened to where its title text ends if it runs past the bar."""
    bars = []
    for group in workflow.get("groups", []):
        x, y, w, _ = group["bounding"]
        size = group.get("font_size", 24)
        text_end = x + GROUP_PADDING + _title_width(group["title"], size)
        bars.append((group["title"], (x, y, max(x + w, text_end), y + 1.4 * size)))
    return bars


@pytest.mark.parametrize("path", TEMPLATES, ids=[p.stem for p in TEMPLATES])
def test_group_titles_fit_their_bars_and_no_title_bars_overlap(path):
    workflow = json.loads(path.read_text())
    for group in workflow.get("groups", []):
        x, _, w, _ = group["bounding"]
        width = GROUP_PADDING + _title_width(group["title"], group.get("font_size", 24))
        assert width <= w, f"{path.name}: group title {group['title']!r} is {width:.0f} wide, its group {w}"
    bars = _title_bars(workflow)
    for i, (title_a, a) in enumerate(bars):
        for title_b, b in bars[i + 1 :]:
            overlap = a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
            assert not overlap, f"{path.name}: the title bars of {title_a!r} and {title_b!r} overlap"


def test_overlapping_title_bars_are_caught():
    # The check above on a pair it must reject: a long title running into the next group's bar
    # (medsteer_batch_pairs before the fix: '3  One seed per run, 8 noises per batch').
    workflow = {
        "groups": [
            {"title": "3  One seed per run, 8 noises per batch", "bounding": [1330, 0, 360, 760], "font_size": 24},
            {"title": "4  Save aligned pairs", "bounding": [1730, 0, 1090, 760], "font_size": 24},
        ]
    }
    (_, a), (_, b) = _title_bars(workflow)
    assert a[2] > b[0]


def _notes(workflow: dict) -> str:
    return "\n".join(
        str(v) for n in workflow["nodes"] if n["type"] in ("MarkdownNote", "Note") for v in n["widgets_values"]
    )


@pytest.mark.parametrize("path", TEMPLATES, ids=[p.stem for p in TEMPLATES])
def test_template_notes_say_which_model_it_expects_and_where_to_get_the_weights(path):
    workflow = json.loads(path.read_text())
    notes = _notes(workflow)
    assert notes, f"{path.name} has no note saying which model it expects"
    if any(n["type"] == "MedSteerLoadPixArtAlpha" for n in workflow["nodes"]):
        missing = [source for source in WEIGHT_SOURCES if source not in notes]
        assert not missing, f"{path.name}'s note does not say where to get {missing}"


def test_installation_pixart_section_lists_the_same_weight_sources():
    text = (ROOT / "docs" / "installation.md").read_text()
    section = text.split("## Loading PixArt-XL-2-512x512 and the MedSteer LoRA", 1)[1].split("\n#", 1)[0]
    missing = [source for source in WEIGHT_SOURCES if source not in section]
    assert not missing, f"docs/installation.md's PixArt loading section does not name {missing}"
