"""A vector built on another model family is refused at plan time (issue 10).

SD1.x and SD2.x UNets have the same 16 sites and widths, so only the family tells an SD1.5 vector
from an SD2.1 one; PixArt-alpha/-sigma are one family for vectors; files without a family pass.
"""

from __future__ import annotations

import pytest
import torch

from medsteer_core import PathologyVector, SteeringPlan, VectorMismatchError, find_sites, steering
from medsteer_core.plan import check_family, family_group, make_plan
from medsteer_core.provenance import Provenance
from tests.tiny_models import full_unet, make_transformer, make_unet


def vector_for(sites, family: str) -> PathologyVector:
    """A random unit vector that fits ``sites``' widths, recorded as built on ``family``."""
    g = torch.Generator().manual_seed(0)
    rows = torch.zeros(2, sites.depth, sites.hidden_size)
    for i, width in enumerate(sites.widths):
        rows[:, i, :width] = torch.nn.functional.normalize(torch.randn(2, width, generator=g), dim=-1)
    provenance = Provenance(concept_with="dye", model_family=family or "")
    return PathologyVector.from_directions(rows, [100.0, 900.0], widths=sites.widths, provenance=provenance)


@pytest.fixture(scope="module")
def sd2():
    return find_sites(full_unet("sd2"))


@pytest.fixture(scope="module")
def sdxl():
    return find_sites(full_unet("sdxl"))


def test_sd1_vector_on_sd2_is_refused_although_the_widths_fit(sd2):
    sd1 = find_sites(full_unet("sd1"))
    assert sd1.widths == sd2.widths
    vector = vector_for(sd1, "sd1")
    with pytest.raises(VectorMismatchError, match=r"built on a sd1 model.*model to steer is sd2.*Build one"):
        make_plan(sd2, vector, strength=2.5, layer_start=0, layer_end=16)
    make_plan(sd1, vector, strength=2.5, layer_start=0, layer_end=16)  # its own family


def test_sd1_vector_on_sdxl_names_the_families_not_the_widths(sdxl):
    vector = vector_for(find_sites(full_unet("sd1")), "sd1")
    with pytest.raises(VectorMismatchError, match=r"sd1.*sdxl"):
        SteeringPlan(vector, layer_start=0, layer_end=16).validate(sdxl)


def test_unet_vector_on_pixart_and_pixart_vector_on_unet():
    pixart = make_transformer(num_layers=4, heads=2, head_dim=8)
    unet = make_unet("sd1")
    pixart_sites, unet_sites = find_sites(pixart), find_sites(unet)
    plan = SteeringPlan(vector_for(pixart_sites, "sd-unet"), layer_start=0, layer_end=4)
    with pytest.raises(VectorMismatchError, match=r"sd-unet.*pixart"), steering(pixart, plan):
        pass
    with pytest.raises(VectorMismatchError, match=r"pixart-alpha.*sd-unet"):
        check_family(vector_for(unet_sites, "pixart-alpha"), unet_sites)


@pytest.mark.parametrize("family", ["pixart", "pixart-alpha", "pixart-sigma", "PixArt-Sigma", "", "unknown", None])
def test_pixart_names_are_one_family_and_unknown_families_pass(family):
    sites = find_sites(make_transformer(num_layers=4, heads=2, head_dim=8))
    make_plan(sites, vector_for(sites, family), strength=2.5, layer_start=0, layer_end=4)


def test_empty_family_passes_on_a_unet_and_groups():
    sites = find_sites(make_unet("sdxl"))
    check_family(vector_for(sites, ""), sites)
    assert family_group("pixart-alpha") == family_group("pixart-sigma") == family_group("pixart") == "pixart"
    assert len({family_group(f) for f in ("sd1", "sd2", "sdxl", "sdxl-refiner", "medsteer-mini")}) == 5
