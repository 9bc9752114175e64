"""example_workflows/ is what scripts/make_example_workflows.py writes (CI; no ComfyUI needed).

tests/comfyui/test_workflows.py validates the same files against ComfyUI's real node schemas.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

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
# Where the real-PixArt templates' weights come from (README's "Loading PixArt-XL-2-512x512" too).
WEIGHT_SOURCES = (
    "PixArt-XL-2-512x512",
    "PixArt-alpha/PixArt-alpha",
    "t5xxl_fp16.safetensors",
    "stabilityai/sd-vae-ft-ema",
    "MedSteer authors' Kvasir LoRA",
)


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
        assert (ROOT / "example_workflows" / f"{name}.jpg").is_file()


@pytest.mark.parametrize("path", TEMPLATES, ids=[p.stem for p in TEMPLATES])
def test_thumbnail_is_the_jpeg_the_template_browser_requests(path):
    # Frontend 1.27.10 lists custom-node templates with mediaSubtype "jpg" and requests
    # /api/workflow_templates/<pack>/<name>.jpg (useTemplateWorkflows.getTemplateThumbnailUrl).
    thumbnail = path.with_suffix(".jpg")
    assert thumbnail.is_file(), f"{path.name} has no {thumbnail.name}: run python scripts/make_example_workflows.py"
    with Image.open(thumbnail) as image:
        assert image.format == "JPEG", f"{thumbnail.name} is a {image.format} file with a .jpg name"
        assert image.width >= 800 and image.height >= 300, image.size


def test_readme_image_links_into_example_workflows_resolve():
    links = re.findall(r"\]\((example_workflows/[^)]+)\)", (ROOT / "README.md").read_text())
    assert links, "README shows no example workflow picture"
    missing = [link for link in links if not (ROOT / link).is_file()]
    assert not missing, f"README links to missing files: {missing}"


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
        "without text; set VIEW_SCALE in scripts/make_example_workflows.py"
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


def test_readme_pixart_section_lists_the_same_weight_sources():
    text = (ROOT / "README.md").read_text()
    section = text.split("### Loading PixArt-XL-2-512x512 and the MedSteer LoRA", 1)[1].split("\n#", 1)[0]
    missing = [source for source in WEIGHT_SOURCES if source not in section]
    assert not missing, f"README's PixArt loading section does not name {missing}"


def test_links_are_consistent_both_ways():
    for path in sorted((ROOT / "example_workflows").glob("*.json")):
        workflow = json.loads(path.read_text())
        nodes = {n["id"]: n for n in workflow["nodes"]}
        assert workflow["last_node_id"] == max(nodes) and workflow["last_link_id"] == len(workflow["links"])
        for link_id, origin, origin_slot, target, target_slot, link_type in workflow["links"]:
            output = nodes[origin]["outputs"][origin_slot]
            assert link_id in output["links"] and output["type"] == link_type, (path.name, link_id)
            assert nodes[target]["inputs"][target_slot]["link"] == link_id, (path.name, link_id)
