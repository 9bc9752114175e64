"""Stand-in for the `spandrel` package (upscale-model loading), which has no wheel for the CPU torch here.

ComfyUI imports `ModelLoader` and `ImageModelDescriptor` from it at start-up; without them its
upscale-model nodes fail to load, and frontend 1.27.10 then throws in `isAssetBrowserEligible` and
draws every model loader red. The browser tests never upscale: loading a model through this
stand-in raises ImportError.
"""


class ImageModelDescriptor:
    """Only a type to check against; no model is ever described by it."""


class ModelLoader:
    def __init__(self, *args, **kwargs):
        raise ImportError("spandrel is a stand-in in the MedSteer browser tests: upscale models cannot load")


MAIN_REGISTRY = None
