"""Proposition 1, Theorem 1 and Eq. 2 checked against the math (float64)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qmm_plugin
from qmm_plugin.analytic_encoder import analytic_encoder
from qmm_plugin.regularizer import bias_spread, tangential_basis

dims = st.tuples(st.integers(1, 6), st.integers(1, 10)).map(lambda t: (t[0], t[0] + t[1]))  # d_z < d_x


def _full_rank(d_x: int, d_z: int, rng: np.random.Generator) -> np.ndarray:
    u = rng.standard_normal((d_x, d_z))
    assert np.linalg.matrix_rank(u) == d_z
    return u


@settings(max_examples=40, deadline=None)
@given(dims=dims, a=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_proposition1_single_layer(dims: tuple[int, int], a: int, seed: int) -> None:
    """Proposition 1 through the package: biases a_i = a_par + a_perp^(i) (shared tangential part,
    built with NumPy's projector) give tangential_spread 0, are left as they are by align_biases_,
    and analytic_encoder inverts every f_i(z) = U z + a_i as h_E(x) = W^T x + b with
    W = U (U^T U)^-1, b = -W^T a_par. Moving one bias tangentially breaks all three."""
    d_z, d_x = dims
    rng = np.random.default_rng(seed)
    u = _full_rank(d_x, d_z, rng)
    proj = u @ np.linalg.solve(u.T @ u, u.T)  # projector onto col(U)
    a_par = proj @ rng.standard_normal(d_x)
    normals = (np.eye(d_x) - proj) @ rng.standard_normal((d_x, a))  # a_perp^(i), one column each
    bank = (a_par[:, None] + normals).T  # (A, d_x)
    q = qmm_plugin.convert(nn.Sequential(nn.Linear(d_z, d_x)).double(), num_biases=a)
    layer = q.model[0]
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(u))
        layer.bias_bank.copy_(torch.from_numpy(bank))
    assert qmm_plugin.regularizer.tangential_spread({"l": layer})["l"] < 1e-20
    qmm_plugin.align_biases_(q)
    np.testing.assert_allclose(layer.bias_bank.detach().numpy(), bank, rtol=1e-9, atol=1e-9)
    encoder = analytic_encoder(q)
    w = u @ np.linalg.inv(u.T @ u)
    b = -w.T @ a_par
    z = rng.standard_normal((7, d_z))
    with torch.no_grad():
        for i in range(a):
            x = q(torch.from_numpy(z), manifold=i)
            h = encoder(x).numpy()
            np.testing.assert_allclose(h, z, rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(h, x.numpy() @ w + b, rtol=1e-9, atol=1e-9)
    if a > 1:  # a tangential move of bias 0: the bank no longer satisfies Proposition 1
        with torch.no_grad():
            layer.bias_bank[0] += torch.from_numpy(u[:, 0])
        assert qmm_plugin.regularizer.tangential_spread({"l": layer})["l"] > 1e-3
        with torch.no_grad():
            moved = analytic_encoder(q)(q(torch.from_numpy(z), manifold=0)).numpy()
        assert np.abs(moved - z).max() > 1e-3


@settings(max_examples=50, deadline=None)
@given(dims=dims, a=st.integers(2, 8), seed=st.integers(0, 2**31 - 1))
def test_theorem1_inequality(dims: tuple[int, int], a: int, seed: int) -> None:
    """tr cov(U^T a) >= tr cov(a_par) / tr((U^T U)^-1), with equality's harmonic-mean form."""
    d_z, d_x = dims
    rng = np.random.default_rng(seed)
    u = _full_rank(d_x, d_z, rng)
    biases = rng.standard_normal((a, d_x)) * rng.uniform(0.1, 3.0)
    proj = u @ np.linalg.solve(u.T @ u, u.T)
    lhs = np.trace(np.atleast_2d(np.cov((biases @ u).T)))
    rhs_num = np.trace(np.atleast_2d(np.cov((biases @ proj).T)))
    gram = u.T @ u
    rhs = rhs_num / np.trace(np.linalg.inv(gram))
    assert lhs >= rhs * (1 - 1e-9) - 1e-12
    harmonic = d_z / np.sum(1.0 / np.linalg.eigvalsh(gram))
    np.testing.assert_allclose(rhs, harmonic / d_z * rhs_num, rtol=1e-9)
    # The library's exact tangential spread is the right side's numerator.
    layer = qmm_plugin.MultiBiasLinear(d_z, d_x, a).double()
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(u))
        layer.bias_bank.copy_(torch.from_numpy(biases))
    spread = qmm_plugin.regularizer.tangential_spread({"l": layer})["l"]
    np.testing.assert_allclose(spread, rhs_num, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(float(bias_spread(layer.weight, layer.bias_bank).detach()), lhs, rtol=1e-9)


def test_ba_regularizer_matches_float64_reference() -> None:
    torch.manual_seed(0)
    g = nn.Sequential(nn.Linear(3, 16), nn.LeakyReLU(0.2), nn.Linear(16, 40)).double()
    q = qmm_plugin.convert(g, num_biases=5)
    expected = 0.0
    for layer in q.multi_bias_layers().values():
        w = layer.weight.detach().numpy()
        bank = layer.bias_bank.detach().numpy()
        cov = np.cov((bank @ w).T)  # rows of bank @ w are (W^T a_i)^T
        expected += np.log(np.trace(cov) + 1e-8)
    np.testing.assert_allclose(float(q.ba_regularizer().detach()), expected, rtol=1e-10)
    terms = q.ba_regularizer_terms()
    assert set(terms) == {"0", "2"}
    np.testing.assert_allclose(sum(float(t.detach()) for t in terms.values()), expected, rtol=1e-10)


def test_ba_regularizer_gradient_reduces_spread() -> None:
    """A few gradient steps on R_BA alone shrink the true tangential spread (Theorem 1 at work)."""
    torch.manual_seed(1)
    q = qmm_plugin.convert(nn.Sequential(nn.Linear(4, 32)), num_biases=6, init_std=1.0)
    before = q.tangential_spread()["0"]
    opt = torch.optim.Adam([q.model[0].bias_bank], lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        q.ba_regularizer().backward()
        opt.step()
    assert q.tangential_spread()["0"] < 0.01 * before


@pytest.mark.parametrize("a", [1, 4])
def test_degenerate_banks_are_finite(a: int) -> None:
    """A = 1 and identical biases: finite R_BA = log(eps) per layer, finite (zero) gradients."""
    q = qmm_plugin.convert(nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 5)), num_biases=a, init_std=0.0)
    r = q.ba_regularizer(eps=1e-8)
    r.backward()
    assert torch.isfinite(r)
    np.testing.assert_allclose(float(r.detach()), 2 * np.log(1e-8), rtol=1e-5)
    for layer in q.multi_bias_layers().values():
        assert torch.isfinite(layer.bias_bank.grad).all() and torch.isfinite(layer.weight.grad).all()
    with pytest.raises(ValueError, match=r"eps \(inside the log of Eq. 2.*\) must be a finite number > 0, got 0"):
        q.ba_regularizer(eps=0.0)


def test_tangential_basis_handles_rank_deficient_weight() -> None:
    w = torch.zeros(6, 3)
    w[0, 0], w[1, 1] = 1.0, 2.0  # rank 2
    q = tangential_basis(w)
    assert q.shape == (6, 2)
    torch.testing.assert_close(q.t() @ q, torch.eye(2, dtype=torch.float64))
    # span: Q Q^T fixes every column of W (col(W) in span(Q)), and both have dimension 2
    torch.testing.assert_close(q @ (q.t() @ w.double()), w.double(), rtol=0, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(a=st.integers(1, 5), widths=st.lists(st.integers(1, 4), min_size=1, max_size=3), seed=st.integers(0, 10_000))
def test_align_biases_makes_layerwise_inverse_exact(a: int, widths: list[int], seed: int) -> None:
    """Multi-layer Proposition 1: an MLP of Linear + LeakyReLU with banks aligned by align_biases_
    is inverted on every manifold by the layer-wise inverse x -> W^+ (leaky^-1(x) - a_bar)."""
    torch.manual_seed(seed)
    sizes = [2]
    for w in widths:
        sizes.append(sizes[-1] + w)  # strictly widening: full column rank
    layers: list[nn.Module] = []
    for fin, fout in zip(sizes, sizes[1:]):
        layers += [nn.Linear(fin, fout), nn.LeakyReLU(0.2)]
    q = qmm_plugin.convert(nn.Sequential(*layers).double(), num_biases=a, init_std=1.0)
    assert a == 1 or max(q.tangential_spread().values()) > 1e-3
    qmm_plugin.align_biases_(q)
    assert max(q.tangential_spread().values()) < 1e-18 + 1e-12
    z = torch.randn(9, 2, dtype=torch.float64)
    linears = list(q.multi_bias_layers().values())
    with torch.no_grad():
        for i in range(a):
            h = q(z, manifold=i)
            for layer in reversed(linears):
                h = torch.where(h >= 0, h, h / 0.2)  # LeakyReLU^-1
                h = torch.linalg.pinv(layer.weight) @ (h - layer.bias_bank.mean(0)).T
                h = h.T
            torch.testing.assert_close(h, z, rtol=1e-8, atol=1e-8)


def test_align_biases_keeps_normal_components() -> None:
    torch.manual_seed(0)
    q = qmm_plugin.convert(nn.Sequential(nn.Linear(2, 7)).double(), num_biases=4, init_std=1.0)
    layer = q.model[0]
    basis = tangential_basis(layer.weight)
    normal = lambda b: b - (b @ basis) @ basis.T  # noqa: E731
    before = normal(layer.bias_bank.detach().clone())
    qmm_plugin.align_biases_(q)
    torch.testing.assert_close(normal(layer.bias_bank.detach()), before)
    with pytest.raises(ValueError, match="no multi-bias layer"):
        qmm_plugin.align_biases_(nn.Linear(2, 3))


# ------------------------------------------------- R_BA taken from the forward (fused op)
def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # a narrow layer (4 inputs) and a wide one; even widths take the threads-split products
    return nn.Sequential(nn.Linear(4, 24), nn.Tanh(), nn.Linear(24, 10), nn.Tanh(), nn.Linear(10, 7)).double()


def _grads(q: qmm_plugin.QuotientModel, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    names, params = zip(*[(n, p) for n, p in q.named_parameters() if p.requires_grad])
    return dict(zip(names, torch.autograd.grad(loss, params)))


@pytest.mark.parametrize("fused_from", [0, 1 << 30])  # every layer through the fused op / none
@pytest.mark.parametrize("threads", [1, 2])
def test_forward_regularizer_equals_separate_value_and_gradients(threads: int, fused_from: int, set_threads: Callable[[int], None],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qmm_plugin.ops, "FUSED_SPREAD_MIN_WEIGHTS", fused_from)
    set_threads(threads)
    q = qmm_plugin.convert(_mlp(), num_biases=4, init_std=0.5)
    z, index = torch.randn(9, 4, dtype=torch.float64), torch.arange(9) % 4
    out, r_ba = q(z, manifold=index, return_regularizer=True)
    sep_out = q(z, manifold=index)
    torch.testing.assert_close(out, sep_out, rtol=0, atol=0)
    r_sep = q.ba_regularizer()
    torch.testing.assert_close(r_ba, r_sep, rtol=1e-12, atol=1e-12)
    target = torch.randn_like(out)
    fused = _grads(q, ((out - target) ** 2).sum() + 0.7 * r_ba)
    separate = _grads(q, ((sep_out - target) ** 2).sum() + 0.7 * r_sep)
    assert fused.keys() == separate.keys()
    for name in fused:
        torch.testing.assert_close(fused[name], separate[name], rtol=1e-10, atol=1e-10, msg=name)
    # the regularizer alone through the forward's graph (the output's gradient is absent)
    reg_only = _grads(q, q(z, manifold=index, return_regularizer=True)[1])
    for name, g in _grads(q, q.ba_regularizer()).items():
        torch.testing.assert_close(reg_only[name], g, rtol=1e-10, atol=1e-10, msg=name)


def test_forward_regularizer_covers_layers_the_forward_did_not_project(monkeypatch: pytest.MonkeyPatch) -> None:
    """Layers given explicit biases, and a layer applied twice, still count exactly once."""
    monkeypatch.setattr(qmm_plugin.ops, "FUSED_SPREAD_MIN_WEIGHTS", 0)
    torch.manual_seed(1)
    shared = nn.Linear(6, 6)
    q = qmm_plugin.convert(nn.Sequential(nn.Linear(3, 6), shared, nn.Tanh(), shared), num_biases=3)
    z = torch.randn(5, 3)
    _, r_twice = q(z, return_regularizer=True)
    torch.testing.assert_close(r_twice, q.ba_regularizer())
    assert len(q.ba_regularizer_terms()) == 2
    biases = {"0": torch.randn(6)}
    _, r_explicit = q(z, manifold=1, biases=biases, return_regularizer=True)
    torch.testing.assert_close(r_explicit, q.ba_regularizer())


def test_forward_regularizer_rejects_non_bool() -> None:
    q = qmm_plugin.convert(_mlp(), num_biases=2)
    with pytest.raises(TypeError, match="return_regularizer must be True or False"):
        q(torch.randn(2, 4, dtype=torch.float64), return_regularizer="yes")
