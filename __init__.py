"""MedSteer for ComfyUI: counterfactual PixArt sampling by cross-attention steering.

ComfyUI imports this folder as a package and calls ``comfy_entrypoint``. Outside ComfyUI (pytest,
the CLI, a plain ``import``) comfy is missing and nothing is registered, but the import succeeds.
"""

try:  # GGUF's pattern: register nodes only when ComfyUI's API is importable.
    import comfy_api.latest  # noqa: F401
except ImportError:  # not running inside ComfyUI
    pass
else:
    from .nodes import comfy_entrypoint  # noqa: F401

WEB_DIRECTORY = "./web"  # node help pages: the frontend reads /extensions/<pack>/docs/<node_id>.md
