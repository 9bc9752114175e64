"""The synthetic endoscopy generator: determinism, exact masks, shared backgrounds, captions."""

from __future__ import annotations

import pytest
import torch

from medsteer_core.mini import synthetic


@pytest.mark.parametrize("name", synthetic.CLASSES)
def test_same_seed_same_frame(name):
    a, b = synthetic.render(7, name), synthetic.render(7, name)
    assert torch.equal(a.image, b.image)
    assert torch.equal(a.lesion, b.lesion) and torch.equal(a.dye, b.dye)
    assert a.image.shape == (3, 32, 32) and a.image.dtype == torch.float32
    assert float(a.image.min()) >= 0 and float(a.image.max()) <= 1


def test_different_seeds_differ():
    assert not torch.equal(synthetic.render(1, "polyp").image, synthetic.render(2, "polyp").image)


@pytest.mark.parametrize("seed", [0, 5, 11, 123])
@pytest.mark.parametrize("name", synthetic.CLASSES)
def test_masks_are_exact(seed, name):
    """A pixel is in a mask if and only if the concept changed it."""
    s = synthetic.render(seed, name)
    changed = (s.image - s.background).abs().amax(0) > 0
    concept = s.lesion | s.dye
    assert torch.equal(changed & ~concept, torch.zeros_like(changed)), "pixels changed outside the masks"
    # Inside the masks almost every pixel changed (a blend can leave a rare pixel equal by chance).
    if concept.any():
        assert float(changed[concept].float().mean()) > 0.95
    assert not (s.lesion & s.dye).any()
    assert not (concept & ~s.fov).any(), "concepts stay inside the field of view"


def test_class_contents():
    normal, polyp = synthetic.render(3, "normal"), synthetic.render(3, "polyp")
    dyed, colitis = synthetic.render(3, "dyed"), synthetic.render(3, "colitis")
    assert not normal.lesion.any() and not normal.dye.any()
    assert polyp.lesion.sum() >= 60 and not polyp.dye.any()  # large polyps (issue 5)
    assert dyed.dye.sum() >= 80 and dyed.lesion.any()
    assert colitis.lesion.sum() >= 60 and not colitis.dye.any()
    # Dye is blue: blue above red wherever the dye visibly changed the frame.
    visible = dyed.dye & ((dyed.image - dyed.background).abs().amax(0) > 0.2)
    rgb = dyed.image[:, visible]
    assert visible.sum() >= 60 and float((rgb[2] > rgb[0]).float().mean()) > 0.95


def test_counterfactual_ground_truth_shares_background():
    """Same seed: every class has the same background; the dyed frame is the polyp frame plus dye."""
    frames = {name: synthetic.render(9, name) for name in synthetic.CLASSES}
    for frame in frames.values():
        assert torch.equal(frame.background, frames["normal"].image)
    polyp, dyed = frames["polyp"], frames["dyed"]
    assert torch.equal(polyp.lesion, dyed.lesion)
    outside_dye = ~dyed.dye
    assert torch.equal(polyp.image[:, outside_dye & ~dyed.lesion], dyed.image[:, outside_dye & ~dyed.lesion])


def test_captions_vary_context_not_concept():
    captions = [synthetic.caption("dyed", k) for k in range(len(synthetic.TEMPLATES))]
    assert len(set(captions)) == len(synthetic.TEMPLATES)
    assert all("dyed lifted polyps" in c for c in captions)
    assert synthetic.caption(1, 0) == "an endoscopic image of polyps"


def test_bad_inputs_name_the_fix():
    with pytest.raises(ValueError, match="choose one of"):
        synthetic.render(0, "esophagitis")
    with pytest.raises(ValueError, match="multiple of 4"):
        synthetic.render(0, "polyp", size=30)
    with pytest.raises(ValueError, match="template"):
        synthetic.caption("polyp", 99)


def test_dataset_layout():
    data = synthetic.dataset(3, seed=10)
    assert data["images"].shape == (12, 3, 32, 32)
    assert data["labels"].tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert data["seeds"][:3].tolist() == [10, 11, 12]
    assert torch.equal(data["images"][4], synthetic.render(11, "polyp").image)
