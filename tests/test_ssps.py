"""ssps against the method's formulas written out longhand (method.md, "SSPS")."""

import torch

from medsteer_core import ssps


def _unit(d: int, seed: int) -> torch.Tensor:
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return v / v.norm()


def _tokens(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(2, n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_matches_longhand_formula_token_by_token():
    h, v, alpha = _tokens(7, 5, 0), _unit(5, 1), 2.5
    out, gate = ssps(h, v, alpha)
    for b in range(h.shape[0]):
        for n in range(h.shape[1]):
            dot = sum(float(h[b, n, i]) * float(v[i]) for i in range(5))
            sigma = max(dot, 0.0)
            expected = [float(h[b, n, i]) - alpha * sigma * float(v[i]) for i in range(5)]
            assert abs(float(gate[b, n]) - sigma) < 1e-12
            assert torch.allclose(out[b, n], torch.tensor(expected, dtype=torch.float64), atol=1e-12)


def test_gate_is_nonnegative_and_negative_aligned_tokens_are_untouched():
    h, v = _tokens(50, 8, 2), _unit(8, 3)
    out, gate = ssps(h, v, 3.0)
    assert (gate >= 0).all()
    negative = (h @ v) <= 0
    assert negative.any() and (~negative).any()
    assert torch.equal(out[negative], h[negative])
    assert not torch.equal(out[~negative], h[~negative])


def test_orthogonal_components_are_untouched():
    h, v = _tokens(30, 6, 4), _unit(6, 5)
    out, _ = ssps(h, v, 2.5)
    project = lambda x: x - (x @ v)[..., None] * v  # noqa: E731
    assert torch.allclose(project(out), project(h), atol=1e-12)


def test_strength_one_removes_exactly_the_positive_component():
    h, v = _tokens(40, 6, 6), _unit(6, 7)
    out, _ = ssps(h, v, 1.0)
    along = out @ v
    positive = (h @ v) > 0
    assert torch.allclose(along[positive], torch.zeros_like(along[positive]), atol=1e-12)
    assert torch.equal(along[~positive], (h @ v)[~positive])


def test_preserve_norm_keeps_every_token_norm():
    h, v = _tokens(40, 6, 8), _unit(6, 9)
    out, _ = ssps(h, v, 2.5, preserve_norm=True)
    assert torch.allclose(out.norm(dim=-1), h.norm(dim=-1), rtol=1e-9)
    plain, _ = ssps(h, v, 2.5)
    assert not torch.allclose(out, plain)


def test_strength_zero_returns_input_unchanged_even_with_preserve_norm():
    h, v = _tokens(10, 4, 10).float(), _unit(4, 11).float()
    for preserve in (False, True):
        out, _ = ssps(h, v, 0.0, preserve_norm=preserve)
        assert torch.equal(out, h)


def test_per_row_strength_zero_rows_are_bit_identical():
    h, v = _tokens(10, 4, 12).float(), _unit(4, 13).float()
    strength = torch.tensor([0.0, 2.5]).reshape(2, 1, 1)
    for preserve in (False, True):
        out, _ = ssps(h, v, strength, preserve_norm=preserve)
        assert torch.equal(out[0], h[0])
        assert not torch.equal(out[1], h[1])


def test_inputs_are_not_modified():
    h, v = _tokens(10, 4, 14), _unit(4, 15)
    h_copy, v_copy = h.clone(), v.clone()
    ssps(h, v, 2.5, preserve_norm=True)
    assert torch.equal(h, h_copy) and torch.equal(v, v_copy)


def test_negative_strength_amplifies_the_concept():
    h, v = _tokens(20, 4, 16), _unit(4, 17)
    out, _ = ssps(h, v, -1.0)
    positive = (h @ v) > 0
    assert torch.allclose((out @ v)[positive], 2 * (h @ v)[positive])


def test_untouched_tokens_stay_exact_even_when_the_strength_overflows():
    """fp16 at strength 7e4: the row strength is inf and 0 x inf made untouched tokens NaN (issue 12 F7)."""
    h, v = _tokens(10, 4, 16).half(), _unit(4, 17).half()
    gate = (h.float() * v.float()).sum(-1)
    untouched = gate <= 0
    assert untouched.any() and (~untouched).any()
    strength = torch.tensor([7e4, 0.0]).half().reshape(2, 1, 1)  # inf in float16, and a row at 0
    assert torch.isinf(strength[0]).all()
    for preserve in (False, True):
        out, _ = ssps(h, v, strength, preserve_norm=preserve)
        assert torch.equal(out[untouched], h[untouched])
        assert torch.equal(out[1], h[1])
    out, _ = ssps(h.float(), v.float(), float("inf"))
    assert torch.equal(out[untouched], h.float()[untouched])


def test_untouched_tokens_are_selected_not_recomputed():
    """``h - 0 * v`` can flip the sign of a zero; untouched tokens now come back bit for bit."""
    h = torch.tensor([[[-0.0, -0.0], [2.0, -0.0]]])
    v = torch.tensor([-1.0, 1.0]) / 2**0.5
    out, gate = ssps(h, v, 1.0)
    assert gate[0, 0] == 0 and gate[0, 1] == 0
    assert torch.equal(torch.signbit(out), torch.signbit(h))
