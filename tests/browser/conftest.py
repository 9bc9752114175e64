"""Browser tests: ComfyUI's real server and web UI (frontend 1.27.10) driven in headless chromium.

Every test here gets the ``browser`` marker. They need ``COMFYUI_PATH`` (a ComfyUI 0.3.64 checkout
whose Python environment - this one - has the web UI packages: ``setup.sh DEST PY --frontend``),
the ``playwright`` package and a ``chromium`` executable on PATH (Debian: ``apt-get install
chromium``; ``playwright install`` is never needed: the system browser is driven through
``executable_path``). Without them the tests skip with the reason; with ``CI=true`` that is an
error instead, so CI cannot silently stop testing the UI.

The session starts ComfyUI once (``comfy_server.py``: main.py on 127.0.0.1, a free port, --cpu, a
temporary base directory whose custom_nodes/medsteer links to this repository) and stops it at the end.

    COMFYUI_PATH=/path/to/ComfyUI python -m pytest tests/browser -m browser
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PACK = "medsteer"  # the folder name under custom_nodes/: ComfyUI's module name, template category and URL prefix
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
START_TIMEOUT_S = 180


def missing_requirement() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not COMFYUI_PATH:
        return "COMFYUI_PATH is not set: the browser tests start a real ComfyUI checkout's server"
    if not (Path(COMFYUI_PATH) / "main.py").is_file():
        return f"COMFYUI_PATH={COMFYUI_PATH} has no main.py"
    if importlib.util.find_spec("comfyui_frontend_package") is None:
        return "comfyui-frontend-package is not installed: run ComfyUI's setup with the web UI packages (--frontend)"
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed: pip install playwright (no browser download needed)"
    if not shutil.which("chromium"):
        return "no chromium executable on PATH: apt-get install chromium"
    return None


def pytest_collection_modifyitems(config, items):
    ours = [item for item in items if HERE in Path(str(item.fspath)).resolve().parents]
    reason = missing_requirement() if ours else None
    if reason and os.environ.get("CI", "").lower() == "true":
        raise pytest.UsageError(f"CI=true but the browser tests cannot run: {reason}")
    for item in ours:
        item.add_marker(pytest.mark.browser)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    url: str
    base: Path
    log: Path
    process: subprocess.Popen

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, b""

    def get_json(self, path: str):
        status, body = self.get(path)
        assert status == 200, f"GET {path}: HTTP {status}"
        return json.loads(body)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_web")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK).symlink_to(REPO, target_is_directory=True)
    (base / "user").mkdir()
    port = _free_port()
    log = base / "server.log"
    command = [
        sys.executable,
        str(HERE / "comfy_server.py"),
        COMFYUI_PATH,
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--cpu",
        "--base-directory",
        str(base),
        "--database-url",
        "sqlite:///:memory:",
        "--disable-auto-launch",
    ]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", base, log, process)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited with code {process.returncode} while starting:\n{server.log_tail()}")
            try:
                if server.get("/api/system_stats")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"ComfyUI did not answer within {START_TIMEOUT_S} s:\n{server.log_tail()}")
            time.sleep(0.5)
        # A fresh user folder opens the template browser on its own at the first page load; the
        # tests open it themselves, the way a returning user does.
        request = urllib.request.Request(
            server.url + "/api/settings/Comfy.TutorialCompleted", data=b"true", method="POST"
        )
        urllib.request.urlopen(request, timeout=30).close()
        yield server
    finally:
        _stop(process)


@pytest.fixture(scope="module")
def chromium():
    # Module scope: playwright's sync API keeps an asyncio loop running in this thread while it is
    # open, and the comfyui tests that run after this folder call asyncio.run().
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="session")
def screenshot_dir(tmp_path_factory) -> Path:
    """Where the tests save screenshots: $MEDSTEER_SCREENSHOT_DIR (to keep them), else a temporary folder."""
    keep = os.environ.get("MEDSTEER_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        return Path(keep)
    return tmp_path_factory.mktemp("screenshots")
