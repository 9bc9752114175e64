import pytest
import torch
from torch import nn

from medsteer_core import UnsupportedModelError, find_sites
from medsteer_core.backbones import Backbone, register_backbone, unregister_backbone
from medsteer_core.provenance import Provenance
from tests.tiny_models import make_transformer


def test_diffusers_sites_in_depth_order(transformer):
    sites = find_sites(transformer)
    assert sites.host == "diffusers"
    assert sites.depth == 4 and sites.widths == (16,) * 4 and sites.token_grid(3, (8, 12)) == (4, 6)
    assert (sites.family, sites.latent_channels, sites.pixel_scale) == ("pixart", 4, 8)
    assert list(sites.modules) == [b.attn2 for b in transformer.transformer_blocks]


def test_peft_wrapped_transformer_is_found():
    from peft import LoraConfig, get_peft_model

    model = make_transformer(num_layers=2)
    wrapped = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v"]))
    sites = find_sites(wrapped)
    assert sites.depth == 2
    assert sites.modules[1] is model.transformer_blocks[1].attn2


class _ComfyLikeBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.cross_attn = nn.Sequential(nn.Linear(d, d), nn.Linear(d, d))


class _ComfyLikePixArtMS(nn.Module):
    """The structure of ComfyUI's PixArtMS (blocks[i].cross_attn, x_embedder, t_block), no comfy import."""

    def __init__(self, depth=3, d=12):
        super().__init__()
        self.blocks = nn.ModuleList(_ComfyLikeBlock(d) for _ in range(depth))
        self.x_embedder = nn.Identity()
        self.t_block = nn.Identity()
        self.patch_size = 2
        self.hidden_size = d


def test_comfyui_pixartms_is_recognised_structurally_also_through_base_model():
    inner = _ComfyLikePixArtMS()
    holder = nn.Module()
    holder.diffusion_model = inner  # ComfyUI's BaseModel keeps the transformer here
    for model in (inner, holder):
        sites = find_sites(model)
        assert sites.host == "comfyui" and sites.depth == 3 and sites.hidden_size == 12
        assert sites.modules[2] is inner.blocks[2].cross_attn


@pytest.mark.parametrize("model", [nn.Linear(3, 3), nn.Sequential(nn.Conv2d(3, 3, 1))])
def test_other_models_get_a_clear_error_naming_supported_classes(model):
    with pytest.raises(UnsupportedModelError, match="PixArtTransformer2DModel.*PixArtMS.*matcher="):
        find_sites(model)


def test_check_window_names_depth():
    sites = find_sites(make_transformer(num_layers=4))
    sites.check_window(0, 4)
    for start, end in ((3, 3), (2, 1), (-1, 2), (0, 5)):
        with pytest.raises(ValueError, match="4 layers"):
            sites.check_window(start, end)
    assert torch.is_tensor(next(sites.transformer.parameters()))


# ------------------------------------------------------------------ a backbone the library does not know
class _TinyCrossAttention(nn.Module):
    """Single-head cross-attention: image tokens [B, N, width] attend to context [B, T, 6]."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(6, width), nn.Linear(6, width)
        self.out = nn.Linear(width, width)

    def forward(self, tokens, context):
        weights = torch.softmax(self.q(tokens) @ self.k(context).transpose(1, 2) / tokens.shape[-1] ** 0.5, -1)
        return self.out(weights @ self.v(context))


class _TwoLevelModel(nn.Module):
    """Neither PixArt nor a UNet: a width-8 level on the latent's grid, then a width-16 level on a
    grid half as fine, each with its own cross-attention (so the two sites differ in width and grid)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Conv2d(4, 8, 1)
        self.attn_fine = _TinyCrossAttention(8)
        self.down = nn.Linear(8, 16)
        self.attn_coarse = _TinyCrossAttention(16)
        self.up = nn.Linear(16, 8)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x, timesteps, context):
        b, _, h, w = x.shape
        fine = self.inp(x).flatten(2).transpose(1, 2) + timesteps.reshape(b, 1, 1) / 1000
        fine = fine + self.attn_fine(fine, context)
        pooled = nn.functional.avg_pool2d(fine.transpose(1, 2).reshape(b, 8, h, w), 2)
        coarse = self.down(pooled.flatten(2).transpose(1, 2))
        coarse = coarse + self.attn_coarse(coarse, context)
        back = self.up(coarse).transpose(1, 2).reshape(b, 8, h // 2, w // 2)
        fine = fine.transpose(1, 2).reshape(b, 8, h, w) + nn.functional.interpolate(back, scale_factor=2.0)
        return self.out(fine)


class _TwoLevelBackbone(Backbone):
    """The test-only adapter: everything MedSteer needs to know about ``_TwoLevelModel``."""

    name = "two-level test model"
    family = "two-level-test"

    def transformer(self, model):
        return model if isinstance(model, _TwoLevelModel) else None

    def site_modules(self, transformer):
        return [transformer.attn_fine, transformer.attn_coarse]

    def token_grid(self, transformer, index, latent_size):
        return latent_size if index == 0 else (latent_size[0] // 2, latent_size[1] // 2)

    def read_call(self, transformer, args, kwargs):
        return args[0], args[1], {}

    def pixel_scale(self, transformer):
        return 1


@pytest.fixture
def two_level():
    backbone = register_backbone(_TwoLevelBackbone())
    yield _TwoLevelModel().eval()
    unregister_backbone(backbone)


def _call(model, seed: int, t: float, concept: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 4, 6, generator=g)  # [uncond, cond], a 4x6 latent
    context = torch.randn(2, 3, 6, generator=g)
    context[1, :, 0] += concept  # the "concept" lives in the conditional row's context
    return model(x, torch.full((2,), t), context)


def test_an_unknown_backbone_runs_capture_build_save_steer_and_gates_without_library_changes(two_level, tmp_path):
    from medsteer_core import (
        GateRecord,
        SteeringPlan,
        VectorEstimator,
        capture,
        load_vector,
        save_vector,
        steering,
    )

    model = two_level
    sites = find_sites(model)
    assert sites.widths == (8, 16) and sites.family == "two-level-test"
    assert [sites.token_grid(i, (4, 6)) for i in range(2)] == [(4, 6), (2, 3)]

    # capture + build: the conditional rows' means per site, each at its own width
    estimator = VectorEstimator.for_model(model)
    with torch.no_grad():
        for seed in range(3):
            for t in (900.0, 100.0):
                with capture(model, estimator, "with"):
                    _call(model, seed, t, concept=3.0)
                with capture(model, estimator, "without"):
                    _call(model, seed, t, concept=0.0)
    vector = estimator.result(Provenance(concept_with="x", concept_without=""))
    assert vector.depth == 2 and tuple(vector.widths) == (8, 16)
    assert torch.all(vector.directions[:, 0, 8:] == 0)  # the width-8 site's rows are padded with zeros
    assert torch.allclose(vector.directions[:, 1].norm(dim=-1), torch.ones(2))

    # save / load keeps the ragged widths
    loaded = load_vector(save_vector(vector, tmp_path / "two_level"))
    assert tuple(loaded.widths) == (8, 16) and torch.equal(loaded.directions, vector.directions)

    with torch.no_grad():
        plain = _call(model, 7, 500.0, concept=3.0)
        with steering(model, SteeringPlan(loaded, strength=0.0, layer_start=0, layer_end=2)):
            zero = _call(model, 7, 500.0, concept=3.0)
        assert torch.equal(zero, plain)  # strength 0 is bit-identical to unsteered
        record = GateRecord()
        for t in (900.0, 500.0, 100.0):  # one run: timesteps going down
            with steering(model, SteeringPlan(loaded, strength=2.0, layer_start=0, layer_end=2), record=record):
                steered = _call(model, 7, t, concept=3.0)
        assert not torch.equal(steered, _call(model, 7, 100.0, concept=3.0))
    gates = record.maps()
    # [steps, layers, conditional images, rows, columns]: the coarse site's 2x3 gates on the 4x6 grid
    assert gates.maps.shape == (3, 2, 1, 4, 6) and gates.layers == (0, 1)
    coarse = gates.maps[:, 1, 0]
    own = torch.stack([e.gate.reshape(1, 2, 3) for e in record.entries if e.site == 1])  # [steps, 1, 2, 3]
    upsampled = torch.nn.functional.interpolate(own.float(), size=(4, 6), mode="bilinear", align_corners=False)
    assert torch.equal(coarse, upsampled[:, 0])  # the coarse site upsampled bilinearly (issue 10)
    assert gates.grids == ((4, 6), (2, 3))
    assert float(gates.maps.max()) > 0

    # a vector of the two-level model does not fit PixArt, and says so with both width lists
    with pytest.raises(ValueError, match=r"8, 16"):
        SteeringPlan(loaded, strength=1.0, layer_start=0, layer_end=2).validate(
            find_sites(make_transformer(num_layers=2))
        )


def test_the_override_names_sites_of_a_model_no_backbone_knows():
    model = _TwoLevelModel()
    with pytest.raises(UnsupportedModelError, match="matcher="):
        find_sites(model)
    sites = find_sites(model, matcher=lambda m: [m.attn_fine, m.attn_coarse])
    assert sites.widths == (8, 16) and sites.modules[1] is model.attn_coarse
    model.medsteer_backbone = _TwoLevelBackbone()
    assert find_sites(model).token_grid(1, (8, 8)) == (4, 4)
