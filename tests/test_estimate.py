"""VectorEstimator: equals a brute-force average, uses conditional rows only, constant memory."""

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from medsteer_core import MedSteerError, VectorEstimator, capture, find_sites
from medsteer_core.driver import SamplingSpec, sample
from medsteer_core.hooks import CallInfo
from medsteer_core.provenance import Provenance

SPEC = SamplingSpec(steps=3, cfg=4.0, height=8, width=8)


def _brute_force(transformer, embeds, seeds):
    """Record every conditional-row CA output with plain hooks, then average (the definition)."""
    sites = find_sites(transformer)
    records = {label: {} for label in ("with", "without")}
    current = {}

    def pre(module, args, kwargs):
        current["t"] = float(kwargs["timestep"][0])

    def make(i, label):
        def hook(module, args, out):
            cond = out[out.shape[0] // 2 :]  # [uncond, cond]: the second half is conditional
            records[label].setdefault((current["t"], i), []).extend(cond.double().mean(dim=1).unbind(0))

        return hook

    for label in ("with", "without"):
        handles = [transformer.register_forward_pre_hook(pre, with_kwargs=True)]
        handles += [m.register_forward_hook(make(i, label)) for i, m in enumerate(sites.modules)]
        try:
            sample(
                transformer, DPMSolverMultistepScheduler(), embeds[label], seeds, SPEC, negative_embeds=embeds["uncond"]
            )
        finally:
            for h in handles:
                h.remove()
    keys = sorted({t for t, _ in records["with"]})
    directions = torch.zeros(len(keys), sites.depth, sites.hidden_size, dtype=torch.float64)
    for k, t in enumerate(keys):
        for i in range(sites.depth):
            diff = torch.stack(records["with"][(t, i)]).mean(0) - torch.stack(records["without"][(t, i)]).mean(0)
            directions[k, i] = diff / diff.norm()
    return torch.tensor(keys), directions, len(records["with"][(keys[0], 0)])


def _estimate(transformer, embeds, seeds, batch=None):
    est = VectorEstimator.for_model(transformer)
    batch = batch or len(seeds)
    for label in ("with", "without"):
        for i in range(0, len(seeds), batch):
            sample(
                transformer,
                DPMSolverMultistepScheduler(),
                embeds[label],
                seeds[i : i + batch],
                SPEC,
                negative_embeds=embeds["uncond"],
                estimator=est,
                label=label,
            )
    return est


def test_estimator_equals_brute_force(transformer, embeds):
    seeds = [0, 1, 2, 3]
    keys, expected, n = _brute_force(transformer, embeds, seeds)
    vector = _estimate(transformer, embeds, seeds, batch=3).result()
    assert n == len(seeds)
    assert torch.allclose(vector.timesteps, keys.float())
    assert torch.allclose(vector.directions.double(), expected, atol=1e-5)
    assert vector.count_with.tolist() == [4] * len(keys)


def test_only_conditional_rows_are_used(transformer, embeds):
    """Garbage in the unconditional rows of a CFG batch does not change what is captured."""

    def call(uncond_latent):
        est = VectorEstimator.for_model(transformer)
        g = torch.Generator().manual_seed(0)
        cond_latent = torch.randn(1, 4, 8, 8, generator=g)
        x = torch.cat([uncond_latent, cond_latent])
        ctx = torch.cat([embeds["uncond"], embeds["with"]])
        for label in ("with", "without"):
            with capture(
                transformer, est, label, call_info=CallInfo(torch.tensor([500.0, 500.0]), (False, True), (4, 4))
            ):
                transformer(
                    x,
                    encoder_hidden_states=ctx,
                    timestep=torch.tensor([500.0, 500.0]),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                )
        return est

    a = call(torch.zeros(1, 4, 8, 8))
    b = call(torch.full((1, 4, 8, 8), 37.0))
    assert torch.equal(a._sums["with"][500.0], b._sums["with"][500.0])
    assert a.images("with") == 1


def test_memory_does_not_grow_with_the_number_of_seeds(transformer, embeds):
    small = _estimate(transformer, embeds, [0, 1])
    large = _estimate(transformer, embeds, [0, 1, 2, 3, 4, 5], batch=2)
    assert small.nbytes == large.nbytes > 0
    assert small.nbytes == 2 * SPEC.steps * 4 * 16 * 8  # 2 classes x K x L x D float64
    assert large.images("with") == 6


def test_comfyui_split_calls_equal_one_cfg_batch(transformer, embeds):
    """ComfyUI often runs cond and uncond as separate batch-1 calls: same sums as one [uncond, cond] batch."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, generator=g)
    extra = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    t2 = torch.tensor([300.0, 300.0])
    one = VectorEstimator.for_model(transformer)
    with capture(transformer, one, "with", call_info=CallInfo.from_layout(t2, 2, "comfyui", cond_or_uncond=[1, 0])):
        transformer(
            torch.cat([x, x]), encoder_hidden_states=torch.cat([embeds["uncond"], embeds["with"]]), timestep=t2, **extra
        )
    split = VectorEstimator.for_model(transformer)
    for flag, ctx in ((1, embeds["uncond"]), (0, embeds["with"])):
        info = CallInfo.from_layout(t2[:1], 1, "comfyui", cond_or_uncond=[flag])
        with capture(transformer, split, "with", call_info=info):
            transformer(x, encoder_hidden_states=ctx, timestep=t2[:1], **extra)
    assert torch.allclose(one._sums["with"][300.0], split._sums["with"][300.0], atol=1e-6)
    assert one.images("with") == split.images("with") == 1


def test_result_needs_both_classes(transformer):
    with pytest.raises(MedSteerError, match="no images captured for the 'with' class"):
        VectorEstimator.for_model(transformer).result()


def test_capture_refuses_unknown_label_and_wrong_model(transformer):
    with (
        pytest.raises(ValueError, match="label must be one of"),
        capture(transformer, VectorEstimator.for_model(transformer), "maybe"),
    ):
        pass
    with (
        pytest.raises(MedSteerError, match="collects 3 layers of width 16"),
        capture(transformer, VectorEstimator(3, 16), "with"),
    ):
        pass


def _snapshot(est: VectorEstimator) -> dict:
    return {
        label: (
            {k: v.clone() for k, v in est._sums[label].items()},
            dict(est._counts[label]),
        )
        for label in ("with", "without")
    }


def _same(a: dict, b: dict) -> bool:
    return all(
        a[label][1] == b[label][1]
        and a[label][0].keys() == b[label][0].keys()
        and all(torch.equal(a[label][0][k], b[label][0][k]) for k in a[label][0])
        for label in a
    )


@pytest.mark.parametrize("interrupt_at", [0, 1, 2])  # of the 4 sites: the last site completes the call
def test_an_interrupted_call_leaves_the_estimator_as_it_was(transformer, embeds, interrupt_at):
    """It used to count the call's images but lack the later layers' sums (issue 12)."""
    extra = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    ctx = torch.cat([embeds["uncond"], embeds["with"]])

    def call(t: float, seed: int):
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
        transformer(torch.cat([x, x]), encoder_hidden_states=ctx, timestep=torch.tensor([t, t]), **extra)

    est = VectorEstimator.for_model(transformer)
    with capture(transformer, est, "with"):
        call(500.0, 0)
    before = _snapshot(est)
    assert est.images("with") == 1

    class Interrupted(Exception):
        pass

    def boom(module, args, output):
        raise Interrupted

    site = find_sites(transformer).modules[interrupt_at]
    with capture(transformer, est, "with"):
        handle = site.register_forward_hook(boom)
        try:
            with pytest.raises(Interrupted):
                call(500.0, 1)  # the same timestep key: a half-counted image would show here
            with pytest.raises(Interrupted):
                call(700.0, 1)  # a new key: it must not appear at all
        finally:
            handle.remove()
    assert _same(_snapshot(est), before)
    assert est.images("with") == 1 and 700.0 not in est._counts["with"]
    # and a completed call afterwards adds exactly what it adds without the interruption
    with capture(transformer, est, "with"):
        call(500.0, 1)
    clean = VectorEstimator.for_model(transformer)
    with capture(transformer, clean, "with"):
        call(500.0, 0)
        call(500.0, 1)
    assert _same(_snapshot(est), _snapshot(clean))


# ---------------------------------------------------------------------------------- ragged widths (issue 9)
class _CrossAttention(torch.nn.Module):
    def __init__(self, width: int, context: int = 4) -> None:
        super().__init__()
        self.q = torch.nn.Linear(width, width)
        self.k = torch.nn.Linear(context, width)
        self.v = torch.nn.Linear(context, width)
        self.out = torch.nn.Linear(width, width)

    def forward(self, x, context):
        weights = torch.softmax(self.q(x) @ self.k(context).transpose(1, 2) / x.shape[-1] ** 0.5, dim=-1)
        return self.out(weights @ self.v(context))


class _TwoWidths(torch.nn.Module):
    """Cross-attention sites of widths 8, 8 and 16 (an up-projection between them)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = _CrossAttention(8), _CrossAttention(8), _CrossAttention(16)
        self.up = torch.nn.Linear(8, 16)
        self.medsteer_backbone = lambda model: [model.a, model.b, model.c]  # find_sites' override

    def forward(self, x, context, site_a=None):
        h = x + (self.a(x, context) if site_a is None else site_a)
        h = self.up(h + self.b(h, context))
        return h + self.c(h, context)


def test_ragged_sites_capture_save_load_and_steer(tmp_path):
    """Sites of two widths: the estimator keeps [L, 16] sums zero beyond width 8, the vector file
    keeps the widths, and steering gives each site its own width of the direction."""
    from medsteer_core import SteeringPlan, load_vector, save_vector, steering
    from medsteer_core.ssps import ssps

    torch.manual_seed(0)
    model = _TwoWidths().eval()
    x = torch.randn(2, 4, 8)
    contexts = {"with": torch.randn(2, 3, 4), "without": torch.randn(2, 3, 4)}
    estimator = VectorEstimator.for_model(model)
    assert estimator.widths == (8, 8, 16) and estimator.hidden_size == 16
    outputs = {}
    with torch.no_grad():
        for label, context in contexts.items():
            for t in (700.0, 300.0):
                call = CallInfo(torch.tensor([t, t]), (False, True))
                with capture(model, estimator, label, call_info=call):
                    model(x, context)
            outputs[label] = [model.a(x, context)[1].mean(0), model.c(_c_input(model, x, context), context)[1].mean(0)]
    vector = estimator.result(Provenance(concept_with="w", concept_without="o", seeds=[0]))
    assert vector.widths == (8, 8, 16)
    assert float(vector.sum_with[:, :2, 8:].abs().max()) == 0.0
    for site, width, index in ((0, 8, 0), (2, 16, 1)):
        diff = (outputs["with"][index] - outputs["without"][index]).double()
        torch.testing.assert_close(vector.directions[0, site, :width].double(), diff / diff.norm(), atol=1e-5, rtol=0)

    loaded = load_vector(save_vector(vector, tmp_path / "ragged"))
    assert loaded == vector and loaded.widths == (8, 8, 16)
    context, call = contexts["with"], CallInfo(torch.tensor([700.0, 700.0]), (False, True))
    with torch.no_grad():
        plain = model(x, context)
        with steering(model, SteeringPlan(loaded, strength=0.0, layer_start=0, layer_end=3), call_info=call):
            assert torch.equal(model(x, context), plain)
        with steering(model, SteeringPlan(loaded, strength=2.0, layer_start=0, layer_end=1), call_info=call):
            steered = model(x, context)
        by_hand, _ = ssps(model.a(x, context), loaded.at(700.0)[0, :8], 2.0)
        torch.testing.assert_close(steered, model(x, context, site_a=by_hand))
        with steering(model, SteeringPlan(loaded, strength=2.0, layer_start=2, layer_end=3), call_info=call):
            assert not torch.equal(model(x, context), plain)  # the 16-wide site takes the full rows


def _c_input(model, x, context):
    h = x + model.a(x, context)
    return model.up(h + model.b(h, context))


def test_estimator_widths_must_agree_with_depth_and_hidden_size():
    assert VectorEstimator(3, 16).widths == (16, 16, 16)
    with pytest.raises(ValueError, match=r"widths \[8, 16\] disagree with depth 3"):
        VectorEstimator(3, 16, widths=(8, 16))
    with pytest.raises(MedSteerError, match=r"cannot add an estimator of 2 layers of widths \[8, 16\]"):
        VectorEstimator(2, 16).add(VectorEstimator(widths=(8, 16)))
