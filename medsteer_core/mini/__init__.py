"""MedSteer-mini: the offline world in which the method is seen and measured in minutes.

A wing of ``medsteer_core``, apart from the method: nothing in the engine (hooks, estimation,
vectors, backbones, the headless route at import time) imports it. It holds

- ``model``: the tiny pixel-space PixArt and its T5 text encoder (``load_mini``);
- ``unet``: MedSteer-mini-UNet, a small ``UNet2DConditionModel`` under the same text encoder, in
  the same file format (``load_mini(DEFAULT_UNET_PATH)``);
- ``train``: training them again (``python -m medsteer_core.mini train [--denoiser unet]``);
- ``backbone``: the minis as model families (``find_sites`` names them ``"medsteer-mini"`` and
  ``"medsteer-mini-unet"``; registered on import);
- ``synthetic``: the procedural endoscopy classes the model is trained on;
- ``oracle``: a small CNN that labels and segments those classes (``load_oracle``);
- ``metrics``: the counterfactual metrics (removal, masked PSNR / SSIM);
- ``scan``: the layer scan and calibration, and ``build_vector`` through ``VectorEstimator``;
- ``demo``: ``medsteer demo`` on both backbones (also ``python -m medsteer_core.mini.demo``), its
  options (``demo_cli``), its ``report.md`` writer (``report``) and ``medsteer demo --calibrate``
  (``calibrate``);
- ``assets/``: the shipped models, oracle and pathology vectors (``vectors/`` for the PixArt,
  ``vectors_unet/`` for the UNet).

``from medsteer_core.mini import load_mini`` is the model's import path; ``python -m
medsteer_core.mini train`` trains it again.
"""

from .backbone import FAMILY, MiniDiffusers
from .model import (
    DEFAULT_PATH,
    FORMAT_NAME,
    FORMAT_VERSION,
    MAX_TOKENS,
    VECTOR_DIR,
    MiniModel,
    MiniParts,
    build_tokenizer,
    encode_unpadded,
    load_mini,
    load_mini_parts,
    new_mini,
    save_mini,
)
from .train import train

__all__ = [
    "DEFAULT_PATH",
    "FAMILY",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAX_TOKENS",
    "VECTOR_DIR",
    "MiniDiffusers",
    "MiniModel",
    "MiniParts",
    "build_tokenizer",
    "encode_unpadded",
    "load_mini",
    "load_mini_parts",
    "new_mini",
    "save_mini",
    "train",
]
