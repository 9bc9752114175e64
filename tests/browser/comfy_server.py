"""Start ComfyUI's real web server (its own main.py) for the browser tests.

    python tests/browser/comfy_server.py COMFYUI_PATH --listen 127.0.0.1 --port N --cpu --base-directory DIR ...

Arguments after COMFYUI_PATH go to ComfyUI's main.py unchanged. Two packages ComfyUI imports at
start-up have no CPU wheel for the torch we test with, and the PixArt graphs never use them:
- torchvision: an inert module is registered in its place when it cannot be imported (touching any
  of its attributes raises ImportError);
- spandrel: the stand-in package in ``stand_ins/`` goes first on the import path.
Only 127.0.0.1 is served.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import runpy
import sys
import types
from pathlib import Path

STAND_INS = Path(__file__).resolve().parent / "stand_ins"


class _Absent(types.ModuleType):
    """A module object for a package that is not installed: every attribute lookup fails."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError(f"{self.__name__}.{name}: torchvision is not installed (browser-test placeholder)")


def _register_absent_torchvision() -> None:
    if importlib.util.find_spec("torchvision") is not None:
        return
    # transformers decides once whether torchvision exists; ask before the placeholder is visible.
    import transformers  # noqa: F401

    package = _Absent("torchvision")
    package.__path__ = []
    package.__spec__ = importlib.machinery.ModuleSpec("torchvision", None, is_package=True)
    transforms = _Absent("torchvision.transforms")
    transforms.__spec__ = importlib.machinery.ModuleSpec("torchvision.transforms", None)
    package.transforms = transforms
    sys.modules.update({"torchvision": package, "torchvision.transforms": transforms})


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit(__doc__)
    comfy, args = Path(argv[0]).resolve(), argv[1:]
    if "--listen" in args and args[args.index("--listen") + 1] != "127.0.0.1":
        sys.exit("the browser tests serve on --listen 127.0.0.1 only")
    if not (comfy / "main.py").is_file():
        sys.exit(f"no main.py in {comfy}: pass the ComfyUI folder (COMFYUI_PATH)")
    if importlib.util.find_spec("spandrel") is None:
        sys.path.insert(0, str(STAND_INS))
    _register_absent_torchvision()
    sys.path.insert(0, str(comfy))
    os.chdir(comfy)
    sys.argv = [str(comfy / "main.py"), *args]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
