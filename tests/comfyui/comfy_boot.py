"""Boot a real ComfyUI headlessly on the CPU and run API-format prompts through its executor.

Used by ``conftest.py`` and, as a script, by the fresh-process test:

    python comfy_boot.py PROMPT.json OUT.safetensors NODE_ID [NODE_ID ...]

runs the prompt in a new process and saves the first output (a LATENT's samples) of each named
node. ComfyUI is found at ``$COMFYUI_PATH``. Nothing starts a server or opens a socket; packs are
loaded with ComfyUI's own ``nodes.load_custom_node``, the way the server loads ``custom_nodes/``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import tempfile
import types
import uuid
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TEST_PACK = HERE / "medsteer_test_nodes"


@dataclass
class Booted:
    comfy_path: str
    base_directory: str
    packs: dict[str, object] = field(default_factory=dict)  # pack dir -> its module
    progress: list = field(default_factory=list)  # (value, total, node_id) of every ProgressBar update
    on_progress: list = field(default_factory=list)  # callables(value, total, node_id), e.g. to interrupt


@dataclass
class Result:
    """One executed prompt: outputs by node id (first list item of each output slot)."""

    success: bool
    outputs: dict
    ui: dict
    messages: list
    error: str | None = None
    error_type: str | None = None
    node_errors: dict | None = None

    def output(self, node_id: str, slot: int = 0):
        return self.outputs[str(node_id)][slot][0]


class Node:
    """A node of a ``Graph``; ``node[slot]`` is the API-format link to one of its outputs."""

    def __init__(self, node_id: str) -> None:
        self.id = node_id

    def __getitem__(self, slot: int) -> list:
        return [self.id, slot]


class Graph:
    """An API-format prompt built in code: ``g.add("KSampler", model=m, ...)`` returns a ``Node``.

    A ``Node`` passed as an input links its first output; ``node[k]`` links output ``k``.
    """

    def __init__(self) -> None:
        self.prompt: dict[str, dict] = {}

    def add(self, class_type: str, node_id: str | None = None, **inputs) -> Node:
        node_id = node_id or f"{len(self.prompt) + 1}"
        self.prompt[node_id] = {
            "class_type": class_type,
            "inputs": {k: (v[0] if isinstance(v, Node) else v) for k, v in inputs.items()},
        }
        return Node(node_id)


# ------------------------------------------------------------------ graph builders
#: The test model: PixArt-alpha layout, 4 blocks of width 48 (fast on one CPU thread).
SMALL = {"hidden_size": 48, "depth": 4, "num_heads": 2, "caption_channels": 16}
#: A latent of 34x34 latent pixels: the smallest PixArt can sample (see check_latent_size).
SIZE = 272
STEER = {
    "strength": 2.5,
    "layer_start": 1,
    "layer_end": 3,
    "start_percent": 0.0,
    "end_percent": 1.0,
    "rows": "cond and uncond",
    "preserve_norm": False,
    "interpolation": "nearest",
}
SAMPLE = {"seed": 5, "steps": 4, "cfg": 4.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}


def pixart(g: Graph, seed: int = 0, **geometry) -> Node:
    return g.add("MedSteerTestPixArt", seed=seed, kind=geometry.pop("kind", "pixart"), **{**SMALL, **geometry})


def prompt(g: Graph, text: str, tokens: int = 8, channels: int = SMALL["caption_channels"]) -> Node:
    return g.add("MedSteerTestConditioning", text=text, tokens=tokens, channels=channels)


def empty_latent(g: Graph, size: int = SIZE, batch: int = 1, width: int | None = None) -> Node:
    return g.add("EmptyLatentImage", width=width or size, height=size, batch_size=batch)


def steer(g: Graph, model, vector, **overrides) -> Node:
    return g.add("ApplySSPSSteer", model=model, pathology_vector=vector, **{**STEER, **overrides})


def ksampler(g: Graph, model, positive, negative, latent, **overrides) -> Node:
    return g.add(
        "KSampler", model=model, positive=positive, negative=negative, latent_image=latent, **{**SAMPLE, **overrides}
    )


def keep(g: Graph, value) -> Node:
    return g.add("MedSteerTestKeep", value=value)


_BOOTED: Booted | None = None
_EXECUTOR = None


class _Server:
    """The few attributes of server.PromptServer that the executor uses."""

    def __init__(self) -> None:
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata: dict = {}
        self.messages: list = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


def _torchvision_stub() -> None:
    # comfy.model_base imports modules that import torchvision at import time (cosmos, cascade); PixArt
    # never uses them. Where no torchvision wheel fits the installed torch, an inert module suffices.
    try:
        import torchvision  # noqa: F401

        return
    except Exception:
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
    import importlib.machinery

    class Missing(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            raise ImportError(f"torchvision is not installed ({self.__name__}.{name})")

    package = Missing("torchvision")
    package.__path__ = []
    package.__spec__ = importlib.machinery.ModuleSpec("torchvision", None, is_package=True)
    transforms = Missing("torchvision.transforms")
    transforms.__spec__ = importlib.machinery.ModuleSpec("torchvision.transforms", None)
    package.transforms = transforms
    sys.modules["torchvision"] = package
    sys.modules["torchvision.transforms"] = transforms


def boot(comfy_path: str | None = None, base_directory: str | None = None, threads: int = 1) -> Booted:
    """Import ComfyUI on the CPU and load this repository and the test pack as custom nodes.

    Idempotent within a process.
    """
    global _BOOTED
    if _BOOTED is not None:
        return _BOOTED
    comfy_path = os.path.abspath(comfy_path or os.environ["COMFYUI_PATH"])
    if not os.path.isfile(os.path.join(comfy_path, "comfy", "model_management.py")):
        raise FileNotFoundError(f"COMFYUI_PATH={comfy_path!r} is not a ComfyUI checkout")
    if comfy_path not in sys.path:
        sys.path.insert(0, comfy_path)
    import torch

    torch.set_num_threads(threads)
    logging.getLogger().setLevel(logging.WARNING)
    import transformers  # noqa: F401  (caches torchvision availability before any stub)

    _torchvision_stub()
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    args = comfy.cli_args.args
    args.cpu = True
    args.disable_api_nodes = True
    base_directory = base_directory or tempfile.mkdtemp(prefix="medsteer_comfy_")
    os.makedirs(base_directory, exist_ok=True)
    args.base_directory = base_directory
    # main.py imports ComfyUI's top-level `utils` before `nodes` puts comfy/ first on sys.path.
    import comfy.model_management
    import comfy.utils
    import folder_paths  # noqa: F401
    import utils.extra_config  # noqa: F401

    import nodes

    booted = Booted(comfy_path, base_directory)

    def progress_hook(value, total, preview, prompt_id=None, node_id=None):
        # What main.py's hook does, minus the websocket: resolve the node and honour interrupts.
        from comfy_execution.utils import get_executing_context

        context = get_executing_context()
        if node_id is None and context is not None:
            node_id = context.node_id
        booted.progress.append((value, total, node_id))
        for callback in list(booted.on_progress):
            callback(value, total, node_id)
        comfy.model_management.throw_exception_if_processing_interrupted()

    comfy.utils.set_progress_bar_global_hook(progress_hook)
    comfy.utils.set_progress_bar_enabled(False)
    asyncio.run(nodes.init_public_apis())
    for pack in (REPO, TEST_PACK):
        booted.packs[str(pack)] = load_pack(pack)
    _BOOTED = booted
    return booted


def load_pack(path: Path):
    """Load a custom node folder exactly as ComfyUI's startup does; return its module."""
    import folder_paths

    import nodes

    path = Path(path).resolve()
    folder_paths.add_model_folder_path("custom_nodes", str(path.parent))
    ok = asyncio.run(nodes.load_custom_node(str(path), ignore=set(nodes.NODE_CLASS_MAPPINGS)))
    if not ok:
        raise RuntimeError(f"ComfyUI failed to load the custom node folder {path}")
    return sys.modules[str(path).replace(".", "_x_")]


def executor(fresh: bool = False):
    global _EXECUTOR
    import execution

    if _EXECUTOR is None or fresh:
        _EXECUTOR = execution.PromptExecutor(_Server(), cache_type=execution.CacheType.CLASSIC)
    return _EXECUTOR


def validate(prompt: dict):
    """``execution.validate_prompt``: (valid, error, outputs, node_errors)."""
    import execution

    return asyncio.run(execution.validate_prompt(str(uuid.uuid4()), prompt, None))


def run(prompt: dict, fresh: bool = False) -> Result:
    """Validate and execute an API-format prompt the way the server's queue does."""
    valid, error, outputs, node_errors = validate(prompt)
    details = "; ".join(
        f"{nid}: {e.get('message')} ({e.get('details')})" for nid, v in node_errors.items() for e in v["errors"]
    )
    if not valid:
        return Result(False, {}, {}, [], f"{error.get('message')}: {details}", "validation", node_errors)
    ex = executor(fresh)
    ex.server.messages.clear()
    ex.execute(prompt, str(uuid.uuid4()), {"client_id": "tests"}, outputs)
    results = {nid: ex.caches.outputs.get(nid) for nid in prompt}
    results = {nid: v for nid, v in results.items() if v is not None}
    error = error_type = None
    for event, data in ex.status_messages:
        if event == "execution_error":
            error, error_type = data.get("exception_message"), data.get("exception_type")
        elif event == "execution_interrupted":
            error, error_type = "interrupted", "interrupted"
    if node_errors and error is None:
        # Like the server: outputs that failed validation are dropped, the others still run.
        error, error_type = details, "validation"
    ui = dict(ex.history_result.get("outputs", {}))
    return Result(ex.success and error is None, results, ui, list(ex.server.messages), error, error_type, node_errors)


def main(argv: list[str]) -> int:
    prompt_file, out_file, *node_ids = argv
    boot(base_directory=os.environ.get("MEDSTEER_COMFY_BASE"))
    import torch
    from safetensors.torch import save_file

    result = run(json.loads(Path(prompt_file).read_text()))
    if not result.success:
        print(result.error, file=sys.stderr)
        return 1
    tensors = {nid: result.output(nid)["samples"].contiguous() for nid in node_ids}
    save_file({k: v.to(torch.float32) for k, v in tensors.items()}, out_file)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
