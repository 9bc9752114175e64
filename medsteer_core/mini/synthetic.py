"""Synthetic endoscopy: a deterministic, seeded world where every concept has an exact mask.

The MedSteer-mini model (``mini.py``) is trained on these images, the oracle (``oracle.py``) learns
to classify and segment them, and the demo measures steering against them (issue 5). Each image is
a procedural colonoscopy frame: pink mucosa with low-frequency texture, a few vessels, a light
spot, vignetting and a circular field of view. The classes add one concept on top:

| class | concept phrase | what is drawn | mask |
|---|---|---|---|
| ``normal`` | normal cecum | background only | - |
| ``polyp`` | polyps | one large raised red dome with a highlight (radius 5-7 px at 32 px) | lesion |
| ``dyed`` | dyed lifted polyps | the same polyp on an irregular indigo dye cushion | lesion + dye |
| ``colitis`` | ulcerative colitis | 3-4 dark-red granular patches with white fibrin spots | lesion |

Counterfactual ground truth comes for free: the background of seed ``s`` is drawn from its own
random stream, so ``render(s, "polyp")`` and ``render(s, "normal")`` share every background pixel,
and ``render(s, "dyed")`` is ``render(s, "polyp")`` plus dye. Masks are exact: a pixel is in a mask
if and only if the concept changed it (``background`` is the image without any concept).

Concepts are large and high-contrast on purpose: the feasibility run behind issue 5 found that
3-6 px low-contrast polyps are not learnt by a 1.8 M-parameter model at 32x32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "CLASSES",
    "CONCEPTS",
    "TEMPLATES",
    "Sample",
    "caption",
    "dataset",
    "render",
]

#: Class ids in label order (the oracle's output order).
CLASSES = ("normal", "polyp", "dyed", "colitis")
#: The concept phrase of each class (what a caption says).
CONCEPTS = {
    "normal": "normal cecum",
    "polyp": "polyps",
    "dyed": "dyed lifted polyps",
    "colitis": "ulcerative colitis",
}
#: Caption templates: varied context phrasing around one concept slot (method.md: "context phrasing
#: and seeds vary across pairs").
TEMPLATES = (
    "an endoscopic image of {}",
    "a colonoscopy image showing {}",
    "endoscopy photo with {}",
    "{} seen during colonoscopy",
    "a close up endoscopic view of {}",
    "a clinical colonoscopy frame of {}",
    "an endoscopy picture of the colon with {}",
    "high quality endoscopic image of {}",
)

_RENDER_SCALE = 2  # render at 2x and average down, so edges are anti-aliased but deterministic


@dataclass(frozen=True)
class Sample:
    """One rendered frame.

    Attributes:
        image: ``[3, S, S]`` float32 in 0-1.
        background: ``[3, S, S]`` the same frame without the concept.
        lesion: ``[S, S]`` bool, pixels changed by the polyp or colitis patches.
        dye: ``[S, S]`` bool, pixels changed by the dye (and not by the lesion).
        fov: ``[S, S]`` bool, the circular field of view.
        label: class index in ``CLASSES``.
    """

    image: torch.Tensor
    background: torch.Tensor
    lesion: torch.Tensor
    dye: torch.Tensor
    fov: torch.Tensor
    label: int


def caption(label: int | str, template: int = 0) -> str:
    """The caption of a class with one of the ``TEMPLATES``.

    Example:
        >>> caption("dyed", 0)
        'an endoscopic image of dyed lifted polyps'
    """
    name = CLASSES[label] if isinstance(label, int) else label
    if name not in CONCEPTS:
        raise ValueError(f"unknown class {label!r}; choose one of {CLASSES}")
    if not 0 <= template < len(TEMPLATES):
        raise ValueError(f"template {template} out of range; there are {len(TEMPLATES)} (0-{len(TEMPLATES) - 1})")
    return TEMPLATES[template].format(CONCEPTS[name])


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Bilinear upsampling of a ``cells x cells`` random grid to ``size x size`` (values ~N(0,1))."""
    grid = rng.standard_normal((cells + 1, cells + 1))
    pos = np.linspace(0, cells, size, endpoint=False) + cells / size / 2
    i = np.floor(pos).astype(int).clip(0, cells - 1)
    f = pos - i
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _background(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Mucosa with texture, vessels, lighting, vignette and field of view: ``[n, n, 3]``, fov ``[n, n]``."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64) + 0.5
    c = n / 2
    base = np.array([0.86, 0.47, 0.42]) + rng.uniform(-0.05, 0.05, 3) * np.array([1.0, 0.8, 0.8])
    tex = _smooth_noise(rng, n, 4) * 0.06 + _smooth_noise(rng, n, 8) * 0.03
    img = base[None, None, :] + tex[..., None] * np.array([1.0, 0.7, 0.7])
    # Vessels: thin dark-red sinuous lines.
    for _ in range(int(rng.integers(2, 5))):
        angle = rng.uniform(0, np.pi)
        offset = rng.uniform(-0.35, 0.35) * n
        amp, freq, phase = rng.uniform(0.02, 0.08) * n, rng.uniform(1.0, 3.0), rng.uniform(0, 2 * np.pi)
        u = (xx - c) * np.cos(angle) + (yy - c) * np.sin(angle)
        w = -(xx - c) * np.sin(angle) + (yy - c) * np.cos(angle)
        dist = np.abs(w - offset - amp * np.sin(freq * 2 * np.pi * u / n + phase))
        alpha = 0.55 * _smoothstep(1 - dist / (0.022 * n))
        img = img * (1 - alpha[..., None]) + np.array([0.55, 0.12, 0.16]) * alpha[..., None]
    # Light spot and vignette.
    lx, ly = c + rng.uniform(-0.15, 0.15) * n, c + rng.uniform(-0.15, 0.15) * n
    light = 0.75 + 0.35 * np.exp(-((xx - lx) ** 2 + (yy - ly) ** 2) / (2 * (0.3 * n) ** 2))
    r = np.sqrt((xx - c) ** 2 + (yy - c) ** 2)
    vignette = 1 - 0.45 * (r / (0.47 * n)) ** 2
    img = img * (light * vignette)[..., None]
    fov_alpha = _smoothstep((0.47 * n - r) / (0.03 * n))
    img = img * fov_alpha[..., None]
    return np.clip(img, 0, 1), fov_alpha > 0


def _polyp(rng: np.random.Generator, n: int, img: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple]:
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64) + 0.5
    c = n / 2
    angle, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.2) * n
    px, py = c + dist * np.cos(angle), c + dist * np.sin(angle)
    radius = rng.uniform(0.16, 0.22) * n
    d = np.sqrt((xx - px) ** 2 + (yy - py) ** 2)
    edge = 0.04 * n
    # A dark shadow ring then a bright red dome shaded from the upper left, with a specular spot.
    ring = _smoothstep((radius + edge - d) / edge) * (1 - _smoothstep((radius - d) / edge))
    dome = _smoothstep((radius - d) / edge)
    shade = 0.8 + 0.35 * np.clip(((px - xx) + (py - yy)) / (radius * 1.4), -1, 1)
    colour = np.array([0.98, 0.30, 0.24])[None, None, :] * shade[..., None]
    hx, hy = px - 0.35 * radius, py - 0.35 * radius
    spec = np.exp(-((xx - hx) ** 2 + (yy - hy) ** 2) / (2 * (0.18 * radius) ** 2))
    colour = colour * (1 - spec[..., None]) + spec[..., None]
    out = img * (1 - 0.6 * ring[..., None]) + 0.0 * ring[..., None]
    out = out * (1 - dome[..., None]) + colour * dome[..., None]
    mask = (ring > 0) | (dome > 0)
    return np.clip(out, 0, 1), mask, (px, py, radius)


def _dye(rng: np.random.Generator, n: int, img: np.ndarray, polyp: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Indigo-carmine cushion under a lifted polyp: an irregular blue blob around it."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64) + 0.5
    px, py, radius = polyp
    theta = np.arctan2(yy - py, xx - px)
    d = np.sqrt((xx - px) ** 2 + (yy - py) ** 2)
    reach = radius * rng.uniform(1.7, 2.0)
    wobble = 1 + sum(rng.uniform(0.04, 0.1) * np.sin(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    alpha = 0.92 * _smoothstep((reach * wobble - d) / (0.06 * n))
    lum = img.mean(axis=-1, keepdims=True) / 0.6
    blue = np.array([0.16, 0.26, 0.72])[None, None, :] * np.clip(lum, 0.3, 1.3)
    out = img * (1 - alpha[..., None]) + blue * alpha[..., None]
    return np.clip(out, 0, 1), alpha > 0


def _colitis(rng: np.random.Generator, n: int, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ulcerative colitis: dark-red granular inflamed patches with white-yellow fibrin spots."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64) + 0.5
    c = n / 2
    out = img.copy()
    mask = np.zeros((n, n), dtype=bool)
    grain = _smooth_noise(rng, n, n // 4)
    count = int(rng.integers(3, 5))
    start = rng.uniform(0, 2 * np.pi)
    for k in range(count):
        angle = start + 2 * np.pi * k / count + rng.uniform(-0.3, 0.3)
        dist = rng.uniform(0.14, 0.28) * n
        qx, qy = c + dist * np.cos(angle), c + dist * np.sin(angle)
        radius = rng.uniform(0.11, 0.15) * n
        d = np.sqrt((xx - qx) ** 2 + (yy - qy) ** 2)
        alpha = 0.9 * _smoothstep((radius - d) / (0.04 * n))
        red = np.array([0.55, 0.08, 0.10])[None, None, :] * (1 + 0.25 * grain[..., None])
        out = out * (1 - alpha[..., None]) + red * alpha[..., None]
        sx, sy = qx + rng.uniform(-0.3, 0.3) * radius, qy + rng.uniform(-0.3, 0.3) * radius
        spot = _smoothstep((0.45 * radius - np.sqrt((xx - sx) ** 2 + (yy - sy) ** 2)) / (0.03 * n))
        out = out * (1 - spot[..., None]) + np.array([0.97, 0.93, 0.75])[None, None, :] * spot[..., None]
        mask |= (alpha > 0) | (spot > 0)
    return np.clip(out, 0, 1), mask


def _downsample(x: np.ndarray, k: int) -> np.ndarray:
    if k == 1:
        return x
    n = x.shape[0] // k
    return x.reshape(n, k, n, k, *x.shape[2:]).mean(axis=(1, 3))


def render(seed: int, label: int | str, size: int = 32) -> Sample:
    """Render one frame of a class.

    Args:
        seed: any non-negative integer; the same seed gives the same background in every class.
        label: a class index or name from ``CLASSES``.
        size: image side in pixels (multiple of 4).

    Returns:
        A ``Sample`` (image, background, exact masks, label).

    Example:
        >>> s = render(3, "dyed")
        >>> s.image.shape, bool(s.dye.any())
        (torch.Size([3, 32, 32]), True)
    """
    index = CLASSES.index(label) if isinstance(label, str) and label in CLASSES else label
    if not isinstance(index, int) or not 0 <= index < len(CLASSES):
        raise ValueError(f"unknown class {label!r}; choose one of {CLASSES} or their indices 0-{len(CLASSES) - 1}")
    if size % 4 or size < 8:
        raise ValueError(f"size must be a multiple of 4 and at least 8, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    n = size * _RENDER_SCALE
    streams = np.random.SeedSequence([int(seed), 5]).spawn(3)
    background, fov = _background(np.random.default_rng(streams[0]), n)
    image = background
    lesion = np.zeros((n, n), dtype=bool)
    dye = np.zeros((n, n), dtype=bool)
    name = CLASSES[index]
    if name in ("polyp", "dyed"):
        rng = np.random.default_rng(streams[1])
        # The polyp is drawn from the same stream in both classes, so dyed(s) = polyp(s) + dye.
        under = background
        if name == "dyed":
            _, _, geometry = _polyp(np.random.default_rng(streams[1]), n, background)
            under, dye = _dye(np.random.default_rng(streams[2]), n, background, geometry)
        image, lesion, _ = _polyp(rng, n, under)
    elif name == "colitis":
        image, lesion = _colitis(np.random.default_rng(streams[1]), n, background)
    image = image * fov[..., None]
    k = _RENDER_SCALE

    def pool_mask(m: np.ndarray) -> np.ndarray:
        return _downsample(m.astype(np.float64), k) > 0

    # Black outside the field of view hides whatever a concept drew there.
    lesion_small = pool_mask(lesion & fov)
    dye_small = pool_mask(dye & fov) & ~lesion_small
    to_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(_downsample(a, k).transpose(2, 0, 1))).float()  # noqa: E731
    return Sample(
        image=to_tensor(image),
        background=to_tensor(background * fov[..., None]),
        lesion=torch.from_numpy(lesion_small),
        dye=torch.from_numpy(dye_small),
        fov=torch.from_numpy(pool_mask(fov)),
        label=index,
    )


def dataset(
    count_per_class: int,
    seed: int = 0,
    size: int = 32,
    classes: tuple[str, ...] = CLASSES,
) -> dict[str, torch.Tensor]:
    """A batch of frames: ``count_per_class`` per class with seeds ``seed, seed + 1, ...``.

    Returns:
        ``{"images": [N, 3, S, S] in 0-1, "labels": [N] class indices, "lesion": [N, S, S] bool,
        "dye": [N, S, S] bool, "fov": [N, S, S] bool, "seeds": [N]}``.
    """
    images, labels, lesions, dyes, fovs, seeds = [], [], [], [], [], []
    for name in classes:
        for i in range(count_per_class):
            s = render(seed + i, name, size)
            images.append(s.image)
            labels.append(s.label)
            lesions.append(s.lesion)
            dyes.append(s.dye)
            fovs.append(s.fov)
            seeds.append(seed + i)
    return {
        "images": torch.stack(images),
        "labels": torch.tensor(labels),
        "lesion": torch.stack(lesions),
        "dye": torch.stack(dyes),
        "fov": torch.stack(fovs),
        "seeds": torch.tensor(seeds),
    }
