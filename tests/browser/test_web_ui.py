"""MedSteer in ComfyUI's real web UI: the pack's nodes, templates, thumbnails and help pages as a user meets them.

Fixtures (``comfy_server``, ``chromium``) are in conftest.py. Each test opens a fresh page; page
errors, console errors and failed requests are collected and those caused by the pack fail the test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACK = "medsteer"  # conftest.PACK: the folder name the server's custom_nodes/ links to this repository
TEMPLATES = sorted((REPO / "example_workflows").glob("*.json"))
QUICKSTART = REPO / "example_workflows" / "medsteer_quickstart_mini.json"
# Every node the pack registers (the V3 schemas' node_id), read from its source.
NODE_IDS = sorted(
    {m for path in (REPO / "nodes").glob("*.py") for m in re.findall(r'node_id="(\w+)"', path.read_text())}
)
VIEWPORT = {"width": 1920, "height": 1080}
READY = (
    "() => window.app && window.app.graph && window.app.canvas && window.LiteGraph"
    " && Object.keys(window.LiteGraph.registered_node_types).length > 100"
)
QUEUE_TIMEOUT_S = 300


def _ours(text: str) -> bool:
    low = text.lower()
    return PACK in low or any(node_id.lower() in low for node_id in NODE_IDS)


class UI:
    """One browser page on the server, with everything that went wrong on it."""

    def __init__(self, browser, server):
        self.server = server
        self.context = browser.new_context(viewport=VIEWPORT)
        self.page = self.context.new_page()
        self.page.set_default_timeout(60_000)
        self.problems: list[str] = []  # page errors, console errors, failed requests
        self.status: dict[str, int] = {}  # URL path -> last HTTP status
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}\n{e.stack or ''}"))
        self.page.on(
            "console",
            lambda m: (
                self.problems.append(f"console {m.type}: {m.text} ({m.location.get('url', '')})")
                if m.type == "error"
                else None
            ),
        )
        self.page.on("response", self._response)
        self.page.on("requestfailed", lambda r: self.problems.append(f"request failed: {r.url} {r.failure}"))

    def _response(self, response) -> None:
        path = response.url.split("://", 1)[-1].split("/", 1)[-1]
        self.status["/" + path] = response.status
        if response.status >= 400:
            self.problems.append(f"HTTP {response.status}: {response.url}")

    def open(self) -> None:
        self.page.goto(self.server.url + "/")
        self.page.wait_for_function(READY, timeout=120_000)

    def pack_problems(self) -> tuple[list[str], list[str]]:
        """(problems that mention the pack or its nodes, all the others)."""
        ours = [p for p in self.problems if _ours(p)]
        return ours, [p for p in self.problems if p not in ours]

    def assert_no_pack_problems(self, what: str) -> None:
        ours, others = self.pack_problems()
        assert not ours, (
            f"{what}: errors caused by the pack:\n"
            + "\n".join(ours)
            + ("\nother errors (not the pack's):\n" + "\n".join(others) if others else "")
        )

    def dialogs(self) -> list[str]:
        return [d.inner_text() for d in self.page.locator(".p-dialog").all() if d.is_visible()]

    def open_template_browser(self):
        """The left bar's Templates button, then this pack's category under Custom Nodes."""
        self.page.locator(".side-bar-button", has_text="Templates").first.click()
        dialog = self.page.locator(".p-dialog", has_text="Custom Nodes")
        dialog.wait_for()
        dialog.get_by_text(PACK, exact=True).first.click()
        return dialog

    def load_template(self, name: str) -> dict:
        """Open template ``name`` from the template browser; returns its JSON as served."""
        expected = json.loads((REPO / "example_workflows" / f"{name}.json").read_text())
        dialog = self.open_template_browser()
        dialog.get_by_text(name, exact=True).first.click()
        dialog.wait_for(state="hidden")
        self.page.wait_for_function(f"() => app.graph.nodes.length === {len(expected['nodes'])}")
        self.page.wait_for_timeout(1500)  # a missing-node dialog opens right after the graph is configured
        return expected

    def screenshot(self, path: Path) -> Path:
        self.page.screenshot(path=str(path))
        return path

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def ui(chromium, comfy_server):
    page = UI(chromium, comfy_server)
    page.open()
    yield page
    page.close()


def test_the_app_loads_without_errors_caused_by_the_pack(ui, comfy_server, screenshot_dir):
    ui.page.wait_for_timeout(2000)
    ui.screenshot(screenshot_dir / "app.png")
    ui.assert_no_pack_problems("loading the app")
    # ComfyUI lists each custom node folder under "Import times for custom nodes", marked
    # "(IMPORT FAILED)" when its import raised.
    log = comfy_server.log.read_text(errors="replace")
    ours = [line for line in log.splitlines() if line.rstrip().endswith(f"custom_nodes/{PACK}")]
    assert ours, f"ComfyUI did not list the pack among its custom nodes:\n{comfy_server.log_tail()}"
    assert not [line for line in ours if "IMPORT FAILED" in line], comfy_server.log_tail(80)


def test_every_medsteer_node_is_in_the_node_library(ui):
    assert len(NODE_IDS) >= 8, NODE_IDS
    registered = ui.page.evaluate(
        "ids => Object.fromEntries(ids.map(id => [id, LiteGraph.registered_node_types[id]?.category ?? null]))",
        NODE_IDS,
    )
    missing = [node_id for node_id, category in registered.items() if category is None]
    assert not missing, f"not registered in the web UI: {missing}"
    assert all(category.startswith("medsteer") for category in registered.values()), registered
    # The node library sidebar finds every one of them by the pack's name, under its category.
    titles = ui.page.evaluate("ids => ids.map(id => LiteGraph.registered_node_types[id].title)", NODE_IDS)
    ui.page.locator(".side-bar-button", has_text="Nodes").first.click()
    library = ui.page.locator(".sidebar-content-container").first
    library.get_by_placeholder(re.compile("Search", re.I)).first.fill(PACK)
    library.get_by_text(titles[0], exact=True).first.wait_for()
    listed = library.inner_text()
    assert not [t for t in titles if t not in listed], f"node library lists:\n{listed}\nexpected {titles}"
    assert PACK in listed.lower()
    ui.assert_no_pack_problems("node library")


@pytest.mark.parametrize("path", TEMPLATES, ids=[p.stem for p in TEMPLATES])
def test_template_opens_from_the_template_browser_readable_with_its_thumbnail(ui, path, screenshot_dir):
    name = path.stem
    thumbnail = f"/api/workflow_templates/{PACK}/{name}.jpg"
    dialog = ui.open_template_browser()
    # The card: the innermost element holding both the template's title and an image (the
    # frontend fetches the thumbnail URL and shows it as a blob: image).
    title = ui.page.get_by_text(name, exact=True)
    card = dialog.locator("div", has=title).filter(has=ui.page.locator("img")).last
    card.scroll_into_view_if_needed()
    card_image = card.locator("img").first
    ui.page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=card_image.element_handle())
    deadline = time.monotonic() + 30
    while thumbnail not in ui.status and time.monotonic() < deadline:
        ui.page.wait_for_timeout(200)
    assert ui.status.get(thumbnail) == 200, f"thumbnail {thumbnail}: HTTP {ui.status.get(thumbnail)}"
    ui.page.keyboard.press("Escape")
    dialog.wait_for(state="hidden")

    expected = ui.load_template(name)
    assert not ui.dialogs(), f"{name}: a dialog opened with the template:\n" + "\n---\n".join(ui.dialogs())
    unknown = ui.page.evaluate(
        "() => app.graph.nodes.filter(n => !(n.type in LiteGraph.registered_node_types)).map(n => n.type)"
    )
    assert not unknown, f"{name}: node types the UI does not know: {unknown}"
    view = ui.page.evaluate(
        "() => { app.canvas.draw(true, true); return {scale: app.canvas.ds.scale,"
        " cutoff: app.canvas._lowQualityZoomThreshold, low: app.canvas.low_quality} }"
    )
    # The text cut-off lives in LGraphCanvas.updateLowQualityThreshold (frontend 1.27.10's litegraph):
    # min_font_size_for_lod (8) / (NODE_TEXT_SIZE (14) * sqrt(devicePixelRatio)).
    assert view["cutoff"] > 0.5, view
    assert view["scale"] == pytest.approx(expected["extra"]["ds"]["scale"]), view
    assert view["scale"] >= view["cutoff"] and not view["low"], f"{name} opens with its text hidden: {view}"
    # ... and the whole graph is on the canvas (1920 x 1080 window).
    fit = ui.page.evaluate(
        "() => { const [ox, oy] = app.canvas.ds.offset, s = app.canvas.ds.scale;"
        " const r = app.canvas.canvas.getBoundingClientRect();"
        " const items = [...app.graph.nodes, ...(app.graph.groups ?? app.graph._groups)];"
        " const b = items.map(o => Array.from(o.boundingRect));"
        " return {left: (Math.min(...b.map(x => x[0])) + ox) * s, top: (Math.min(...b.map(x => x[1])) + oy) * s,"
        " right: (Math.max(...b.map(x => x[0] + x[2])) + ox) * s, bottom: (Math.max(...b.map(x => x[1] + x[3])) + oy) * s,"
        " width: r.width, height: r.height} }"
    )
    inside = fit["left"] >= 0 and fit["top"] >= 0 and fit["right"] <= fit["width"] and fit["bottom"] <= fit["height"]
    assert inside, f"{name}: the graph does not fit the canvas at the stored view: {fit}"
    ui.screenshot(screenshot_dir / f"{name}.png")
    ui.assert_no_pack_problems(f"opening {name}")


def test_the_missing_node_check_above_sees_a_missing_node(ui):
    # Guards the template test: the same page checks catch a graph with a node type nobody registers.
    workflow = json.loads(TEMPLATES[0].read_text())
    workflow["nodes"][0]["type"] = "MedSteerNodeThatDoesNotExist"
    ui.page.evaluate("w => app.loadGraphData(w, true, true, 'broken')", workflow)
    ui.page.wait_for_timeout(1500)
    assert ui.dialogs(), "no dialog for a missing node type"
    unknown = ui.page.evaluate(
        "() => app.graph.nodes.filter(n => !(n.type in LiteGraph.registered_node_types)).map(n => n.type)"
    )
    assert unknown == ["MedSteerNodeThatDoesNotExist"]


def test_every_node_has_a_help_page_the_frontend_finds(comfy_server):
    # Frontend 1.27.10 (NodeHelpService.fetchCustomNodeHelp) asks for
    # /extensions/<pack>/docs/<node>/<locale>.md, then /extensions/<pack>/docs/<node>.md; ComfyUI
    # serves /extensions/<pack>/ from the pack's WEB_DIRECTORY.
    info = comfy_server.get_json("/api/object_info")
    ours = sorted(k for k, v in info.items() if v.get("python_module", "").split(".")[:2] == ["custom_nodes", PACK])
    assert ours == NODE_IDS, f"registered {ours}, source has {NODE_IDS}"
    missing = [n for n in ours if comfy_server.get(f"/extensions/{PACK}/docs/{n}.md")[0] != 200]
    assert not missing, f"no help page served for {missing}"


@pytest.mark.skipif(not QUICKSTART.exists(), reason=f"{QUICKSTART.name} does not exist yet")
def test_queueing_the_quickstart_mini_shows_the_pair_and_the_heatmap(ui, screenshot_dir):
    expected = ui.load_template(QUICKSTART.stem)
    assert not ui.dialogs(), ui.dialogs()
    previews = [n for n in expected["nodes"] if n["type"] == "PreviewImage"]
    titles = {n["id"]: n.get("title", "") for n in previews}
    assert any("pair" in t.lower() for t in titles.values()), titles
    assert any("heatmap" in t.lower() for t in titles.values()), titles
    ui.page.evaluate(
        "() => { window.__medsteer_errors = [];"
        " app.api.addEventListener('execution_error', e => window.__medsteer_errors.push(e.detail)); }"
    )
    start = time.monotonic()
    ui.page.get_by_role("button", name=re.compile(r"^Run")).first.click()
    images = (
        "ids => window.__medsteer_errors.length > 0 || ids.every(id => {"
        " const n = app.graph.getNodeById(id);"
        " return n && n.imgs && n.imgs.length > 0 && n.imgs.every(i => i.complete && i.naturalWidth > 0); })"
    )
    ui.page.wait_for_function(images, arg=list(titles), timeout=QUEUE_TIMEOUT_S * 1000)
    errors = ui.page.evaluate("() => window.__medsteer_errors")
    assert not errors, f"the quickstart failed in ComfyUI: {json.dumps(errors)[:2000]}"
    seconds = time.monotonic() - start
    sizes = ui.page.evaluate(
        "ids => Object.fromEntries(ids.map(id => [id, app.graph.getNodeById(id).imgs.map(i => [i.naturalWidth, i.naturalHeight])]))",
        list(titles),
    )
    for node_id, title in titles.items():
        (width, height), *_ = sizes[str(node_id)]
        if "pair" in title.lower():  # unsteered | steered, side by side
            assert width > 1.9 * height, (title, width, height)
        else:
            assert width > 0 and height > 0, (title, width, height)
    ui.page.evaluate("() => app.canvas.draw(true, true)")
    ui.page.wait_for_timeout(500)
    shot = ui.screenshot(screenshot_dir / "comfyui_quickstart_mini.png")
    if os.environ.get("MEDSTEER_DOCS_SCREENSHOT") == "1":  # refresh the README's picture
        shutil.copyfile(shot, REPO / "docs" / "comfyui_quickstart_mini.png")
    print(f"quickstart queued and shown in {seconds:.1f} s; screenshot {shot}")
    ui.assert_no_pack_problems("queueing the quickstart")
