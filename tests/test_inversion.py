"""Tests for the Eq. 3 fit (qmm_plugin.inversion: invert, fit_codes), derived-manifold sampling
(qmm_plugin.sampling) and Proposition 1's encoder (qmm_plugin.analytic_encoder)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qmm_plugin
from qmm_plugin.analytic_encoder import analytic_encoder
from qmm_plugin.inversion import Inversion, fit_codes, invert
from qmm_plugin.sampling import sample_manifold

A = 5


def aligned_mlp(seed: int = 0, batchnorm: bool = False) -> qmm_plugin.QuotientModel:
    """The issue's small aligned generator, 4 -> 32 -> 64 -> 100, A = 5."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(4, 32)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(32))
    layers += [nn.LeakyReLU(0.2), nn.Linear(32, 64), nn.LeakyReLU(0.2), nn.Linear(64, 100)]
    q = qmm_plugin.convert(nn.Sequential(*layers), A)
    qmm_plugin.align_biases_(q)
    return q


def rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)


def new_bias_like(q: qmm_plugin.QuotientModel, gen: torch.Generator, b: int) -> dict[str, torch.Tensor]:
    """Biases of untrained manifolds: the banks' shared tangential part, a fresh normal part."""
    out = {}
    for p, m in q.multi_bias_layers().items():
        bank = m.bias_bank.detach()
        basis = qmm_plugin.regularizer.tangential_basis(m.weight).float()
        noise = torch.randn(b, m.out_features, generator=gen) * bank.std()
        out[p] = bank.mean(0) + noise - (noise @ basis) @ basis.t()
    return out


@pytest.fixture(scope="module")
def fitted() -> dict[str, object]:
    """One batched fit: 10 images on trained manifolds (2 each) + 4 images on untrained manifolds."""
    torch.set_num_threads(1)
    q = aligned_mlp()
    gen = torch.Generator().manual_seed(1)
    z_tr = torch.randn(10, 4, generator=gen)
    m_tr = torch.arange(10) % A
    z_new = torch.randn(4, 4, generator=gen)
    b_new = new_bias_like(q, gen, 4)
    with torch.no_grad():
        x = torch.cat([q(z_tr, manifold=m_tr), q(z_new, biases=b_new)])
    inv = q.invert(x, seed=0)
    return {"q": q, "x": x, "z": torch.cat([z_tr, z_new]), "m": m_tr, "b_new": b_new, "inv": inv}


# --------------------------------------------------------------------------------- quality
def test_recovers_z_of_generated_images(fitted: dict) -> None:
    inv, z = fitted["inv"], fitted["z"]
    assert isinstance(inv, Inversion)
    err = rel(inv.z, z)
    assert float(err.median()) < 0.01 and float(err.max()) < 0.05, err
    assert float(rel(inv.reconstruction, fitted["x"]).max()) < 0.01
    assert inv.steps <= 6000


def test_assigns_trained_manifold(fitted: dict) -> None:
    inv, m = fitted["inv"], fitted["m"]
    assert inv.manifold.dtype == torch.long and inv.manifold.shape == (14,)
    assert float((inv.manifold[:10] == m).float().mean()) >= 0.95


def test_derived_manifold_matches_untrained_generator(fitted: dict) -> None:
    q, inv, b_new = fitted["q"], fitted["inv"], fitted["b_new"]
    n = 6
    samples = sample_manifold(q, inv, n, generator=torch.Generator().manual_seed(7))
    assert samples.shape == (14, n, 100)
    z = torch.randn(14 * n, 4, generator=torch.Generator().manual_seed(7)).view(14, n, 4)[10:]  # same draws
    with torch.no_grad():
        truth = q(z.reshape(-1, 4), biases={p: v.repeat_interleave(n, 0) for p, v in b_new.items()})
    err = rel(samples[10:].reshape(-1, 100), truth)
    assert float(err.median()) < 0.03, err


def test_biases_regenerate_reconstruction(fitted: dict) -> None:
    q, inv = fitted["q"], fitted["inv"]
    with torch.no_grad():
        again = q(inv.z, biases=inv.biases)
    torch.testing.assert_close(again, inv.reconstruction)
    per_image = (fitted["x"] - inv.reconstruction).pow(2).sum(1)
    torch.testing.assert_close(inv.loss, per_image, rtol=1e-4, atol=1e-7)


def test_normal_mode_keeps_tangential_part(fitted: dict) -> None:
    q, inv = fitted["q"], fitted["inv"]
    for p, m in q.multi_bias_layers().items():
        dev = (inv.biases[p] - m.bias_bank.detach().mean(0)) @ m.weight.detach()
        assert float(dev.abs().max()) < 1e-4


def test_trained_manifolds_mode() -> None:
    q = aligned_mlp(2)
    gen = torch.Generator().manual_seed(3)
    z, m = torch.randn(5, 4, generator=gen), torch.tensor([4, 3, 2, 1, 0])
    with torch.no_grad():
        x = q(z, manifold=m)
    inv = q.invert(x, manifolds="trained", steps=1500, seed=0)
    assert torch.equal(inv.manifold, m)
    for p, layer in q.multi_bias_layers().items():
        torch.testing.assert_close(inv.biases[p], layer.bias_bank.detach()[m])
    assert float(rel(inv.z, z).median()) < 0.05
    assert inv.bias_mode == "trained"


def test_nearest_manifold_rule_is_best_reconstruction() -> None:
    """manifold = argmin_i ||x - f(z*; a^(i))||^2 at the recovered z (documented rule)."""
    q = aligned_mlp(3)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 100, generator=gen)  # off every manifold
    inv = q.invert(x, steps=100, seed=0)
    with torch.no_grad():
        errs = torch.stack([(x - q(inv.z, manifold=i)).pow(2).sum(1) for i in range(A)], 1)
    assert torch.equal(inv.manifold, errs.argmin(1))


def test_restarts_keep_best_per_image() -> None:
    q = aligned_mlp(4)
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        x = q(3 * torch.randn(8, 4, generator=gen), manifold=0)
    one = q.invert(x, steps=60, seed=0, restarts=1)
    many = q.invert(x, steps=60, seed=0, restarts=6)
    assert float(many.loss.mean()) < float(one.loss.mean())
    # the first restart of `many` is not `one`'s start, but each image keeps its own best:
    with torch.no_grad():
        again = (x - q(many.z, biases=many.biases)).pow(2).sum(1)
    torch.testing.assert_close(many.loss, again, rtol=1e-4, atol=1e-6)


def test_penalty_mode_fits_and_spends_tangential_freedom() -> None:
    q = aligned_mlp(5)
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        x = q(torch.randn(4, 4, generator=gen), manifold=1)
    inv = q.invert(x, steps=400, seed=0, bias_mode="penalty", mu=0.05)
    assert inv.bias_mode == "penalty"
    start = (x - q(torch.zeros(4, 4), manifold=1).detach()).pow(2).sum(1)
    assert float(inv.loss.max()) < float(start.min())
    dev = max(float(((inv.biases[p] - m.bias_bank.detach().mean(0)) @ m.weight.detach()).abs().max())
              for p, m in q.multi_bias_layers().items())
    assert dev > 1e-4  # the soft penalty does not pin the tangential part


# ------------------------------------------------------------------------ batching and state
def test_per_image_objectives_are_independent_and_state_restored() -> None:
    q = aligned_mlp(6, batchnorm=True)
    q.train()
    with torch.no_grad():
        q(torch.randn(64, 4), manifold=0)  # give BatchNorm non-trivial running statistics
    q.model[-1].weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in q.named_parameters()}
    state = {k: v.clone() for k, v in q.state_dict().items()}
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3, 100, generator=gen)
    full = q.invert(x, steps=150, seed=0)
    part = q.invert(x[:2], steps=150, seed=0)
    torch.testing.assert_close(part.z, full.z[:2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(part.loss, full.loss[:2], rtol=1e-4, atol=1e-5)
    assert q.training and all(m.training for m in q.modules())
    assert {n: p.requires_grad for n, p in q.named_parameters()} == flags
    assert all(p.grad is None for p in q.parameters())
    for k, v in q.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_sample_manifold_uses_fresh_z_and_same_biases(fitted: dict) -> None:
    q, inv = fitted["q"], fitted["inv"]
    s1 = sample_manifold(q, inv, 3, generator=torch.Generator().manual_seed(0))
    s2 = sample_manifold(q, inv, 3, generator=torch.Generator().manual_seed(0))
    s3 = sample_manifold(q, inv, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(s1, s2) and not torch.allclose(s1, s3)
    assert not torch.allclose(s1[:, 0], s1[:, 1])
    assert torch.equal(q.sample_manifold(inv, 3, generator=torch.Generator().manual_seed(0)), s1)  # the method


# --------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad, match", [
    (lambda x: x.clone().fill_(float("nan")), "NaN or inf"),
    (lambda x: torch.where(torch.arange(100) == 3, torch.inf, x), "NaN or inf"),
    (lambda x: x[:, :50], "shape"),
    (lambda x: x[0], "unsqueeze"),
    (lambda x: x.double(), "dtype"),
    (lambda x: x.to("meta"), "device"),
])
def test_bad_images(bad, match: str) -> None:
    q = aligned_mlp()
    with pytest.raises((ValueError, TypeError), match=match):
        q.invert(bad(torch.zeros(2, 100)), steps=1)


@pytest.mark.parametrize("kw, match", [
    ({"steps": 0}, "steps"), ({"mu": -0.1}, "mu"), ({"restarts": 0}, "restarts"),
    ({"manifolds": "all"}, "manifolds"), ({"bias_mode": "soft"}, "bias_mode"), ({"z_dim": 7}, "z_dim"),
])
def test_bad_arguments(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        aligned_mlp().invert(torch.zeros(2, 100), **kw)


def test_inversion_from_another_model() -> None:
    q, other, wider = aligned_mlp(0), aligned_mlp(1), qmm_plugin.convert(nn.Sequential(nn.Linear(4, 100)), A)
    inv = q.invert(torch.zeros(2, 100), steps=2, seed=0)
    assert sample_manifold(q, inv, 2).shape == (2, 2, 100)
    for m in (other, wider):
        with pytest.raises(ValueError, match="another model"):
            sample_manifold(m, inv, 2)
    with pytest.raises(ValueError, match="n must"):
        sample_manifold(q, inv, 0)


# --------------------------------------------------------------------------- analytic encoder
def test_analytic_encoder_inverts_every_manifold() -> None:
    torch.manual_seed(0)
    g = nn.Sequential(nn.Linear(4, 32), nn.BatchNorm1d(32), nn.PReLU(32), nn.Linear(32, 64),
                      nn.LeakyReLU(0.2), nn.Unflatten(1, (4, 16)), nn.Flatten(), nn.Linear(64, 100), nn.Tanh())
    q = qmm_plugin.convert(g, A)
    with torch.no_grad():
        q(torch.randn(64, 4))
        q.model[1].weight.uniform_(0.5, 1.5)
        q.model[2].weight.uniform_(0.1, 0.5)
    qmm_plugin.align_biases_(q)
    q.eval()
    enc = analytic_encoder(q)
    z = 0.5 * torch.randn(32, 4)
    for i in range(A):
        with torch.no_grad():
            torch.testing.assert_close(enc(q(z, manifold=i)), z, rtol=1e-3, atol=1e-3)


def test_analytic_encoder_needs_aligned_banks() -> None:
    torch.manual_seed(1)
    q = qmm_plugin.convert(nn.Sequential(nn.Linear(4, 32), nn.LeakyReLU(0.2), nn.Linear(32, 64)), A)
    enc = analytic_encoder(q)
    z = torch.randn(16, 4)
    with torch.no_grad():
        assert float(rel(enc(q(z, manifold=0)), z).median()) > 0.05  # unaligned: Prop. 1 fails
        qmm_plugin.align_biases_(q)
        assert float(rel(analytic_encoder(q)(q(z, manifold=0)), z).max()) < 1e-4


@settings(max_examples=15, deadline=None)
@given(widths=st.lists(st.integers(1, 24), min_size=1, max_size=3), z_dim=st.integers(1, 6),
       num_biases=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_analytic_encoder_property(widths: list[int], z_dim: int, num_biases: int, seed: int) -> None:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    prev = z_dim
    for w in widths:
        w = prev + w  # full column rank
        layers += [nn.Linear(prev, w), nn.LeakyReLU(0.2)]
        prev = w
    q = qmm_plugin.align_biases_(qmm_plugin.convert(nn.Sequential(*layers), num_biases))
    enc = analytic_encoder(q, z_dim=z_dim)
    z = torch.randn(8, z_dim, dtype=torch.float32)
    with torch.no_grad():
        for i in range(num_biases):
            torch.testing.assert_close(enc(q(z, manifold=i)), z, rtol=1e-3, atol=1e-3)


def test_analytic_encoder_errors() -> None:
    from qmm_plugin.paper.models.gan import MNISTGenerator

    q = qmm_plugin.convert(MNISTGenerator(), 2).eval()
    with pytest.raises(ValueError, match=r"'deconv\.0' \(ConvTranspose2d\)"):
        analytic_encoder(q)
    bn = qmm_plugin.convert(nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8)), 2)
    bn.train()
    with pytest.raises(ValueError, match="eval mode"):
        analytic_encoder(bn)
    narrow = qmm_plugin.convert(nn.Sequential(nn.Linear(8, 4)), 2)
    with pytest.raises(ValueError, match="not injective"):
        analytic_encoder(narrow)
    relu = qmm_plugin.convert(nn.Sequential(nn.Linear(2, 8), nn.ReLU()), 2)
    with pytest.raises(ValueError, match="ReLU"):
        analytic_encoder(relu)


def test_analytic_encoder_detects_functional_ops() -> None:
    class Hidden(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 9)
            self.z_dim = 3

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return torch.sin(self.fc(z)) * 2.0

    with pytest.raises(ValueError, match="outside modules"):
        analytic_encoder(qmm_plugin.convert(Hidden(), 2))


def test_invert_function_matches_method() -> None:
    q = aligned_mlp()
    x = torch.randn(2, 100, generator=torch.Generator().manual_seed(0))
    a, b = invert(q, x, steps=20, seed=3), q.invert(x, steps=20, seed=3)
    torch.testing.assert_close(a.z, b.z)


def test_tangential_basis_cache_follows_weight_updates() -> None:
    from qmm_plugin.inversion import _cached_tangential_basis

    q = aligned_mlp()
    layer = q.multi_bias_layers()["4"]
    first = _cached_tangential_basis(layer)
    assert _cached_tangential_basis(layer) is first
    with torch.no_grad():
        layer.weight.mul_(2.0).add_(torch.randn_like(layer.weight))  # a training step changes W
    second = _cached_tangential_basis(layer)
    assert second is not first
    proj = second @ (second.t() @ layer.weight.detach())
    torch.testing.assert_close(proj, layer.weight.detach(), rtol=1e-4, atol=1e-4)


def test_fit_stops_on_convergence_before_the_cap() -> None:
    torch.manual_seed(0)
    q = qmm_plugin.align_biases_(qmm_plugin.convert(nn.Sequential(nn.Linear(2, 12)), 3))
    with torch.no_grad():
        x = q(torch.randn(4, 2), manifold=1)
    inv = q.invert(x, steps=20000, seed=0)
    assert inv.steps < 20000 and inv.steps % 50 == 0
    assert float(rel(inv.reconstruction, x).max()) < 1e-3
    cap = inv.steps + 100
    capped = q.invert(x, steps=cap, seed=0, tol=0.0, min_lr_ratio=0.0)  # schedule off: runs to the cap
    assert capped.steps == cap


def test_finished_images_are_frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    """An image whose step size fell below ``lr * min_lr_ratio`` is done: its code and biases stop
    changing while the other images of the batch keep fitting. Image 0 is made to finish at the
    first window check by starting its step size just below the threshold (Adam would still move
    it at that step size if the done mask were ignored)."""
    lr, ratio, window = 0.1, 1e-3, 10
    base = invert.__globals__["_RowAdam"]  # the optimiser class invert uses, wherever it is defined
    trace: list[tuple[bool, list[torch.Tensor]]] = []

    class SlowFirstRow(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            self.lr[0] = 0.5 * lr * ratio

        def step(self, active: torch.Tensor) -> None:
            trace.append((bool(active[0]), [p.detach()[:2].clone() for p in self.params]))
            super().step(active)

    monkeypatch.setitem(invert.__globals__, "_RowAdam", SlowFirstRow)
    q = aligned_mlp(7)
    x = torch.randn(2, 100, generator=torch.Generator().manual_seed(11))  # off every manifold
    inv = invert(q, x, steps=5 * window, lr=lr, min_lr_ratio=ratio, window=window, seed=0)
    assert inv.steps == 5 * window and len(trace) == inv.steps  # image 1 ran to the cap
    assert [active for active, _ in trace] == [True] * window + [False] * (4 * window)
    frozen = trace[window][1]
    for _, rows in trace[window:]:
        for got, ref in zip(rows, frozen, strict=True):
            assert torch.equal(got[0], ref[0])  # image 0: not one bit changes once done
    assert all(not torch.equal(a[1], b[1]) for a, b in zip(trace[-1][1], frozen, strict=True))  # image 1 moved
    before = trace[window - 1][1]
    assert not torch.equal(before[0][0], frozen[0][0])  # image 0 moved while it was active


# ------------------------------------------------------------------------- codes-only fit, z_init
def test_invert_on_given_manifolds_from_z_init_matches_fit_codes() -> None:
    """manifolds=(B,) indices with z_init: the codes-only fit on those manifolds, the same numbers
    as the library's fit_codes on q's forward; starting at the true codes it stays there."""
    q = aligned_mlp(3)
    gen = torch.Generator().manual_seed(0)
    z_true = torch.randn(6, 4, generator=gen)
    index = torch.tensor([0, 1, 2, 3, 4, 0])
    with torch.no_grad():
        x = q(z_true, manifold=index)
    z0 = z_true + 0.3 * torch.randn(6, 4, generator=gen)
    inv = q.invert(x, manifolds=index, z_init=z0, steps=400)
    assert inv.bias_mode == "trained" and torch.equal(inv.manifold, index)
    q.requires_grad_(False)
    z, loss = fit_codes(lambda z, i: q.eval()(z, manifold=i), x, index, z_init=z0, steps=400)
    q.requires_grad_(True)
    torch.testing.assert_close(inv.z, z)
    torch.testing.assert_close(inv.loss, loss)
    assert float(rel(inv.z, z_true).max()) < 1e-2  # the aligned MLP is injective in z
    start = q.invert(x, manifolds=index, z_init=z_true, steps=50)
    assert float(start.loss.max()) < 1e-8


def test_fit_codes_on_a_bank_of_separate_generators() -> None:
    """fit_codes takes any forward(z, manifold): here two separate injective linear generators."""
    torch.manual_seed(4)
    bank = nn.ModuleList([nn.Linear(3, 20), nn.Linear(3, 20)]).requires_grad_(False)

    def forward(z: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return torch.where(i[:, None] == 0, bank[0](z), bank[1](z))

    z_true = torch.randn(5, 3)
    index = torch.tensor([0, 1, 1, 0, 1])
    z, loss = fit_codes(forward, forward(z_true, index), index, z_init=torch.zeros(5, 3), steps=3000)
    assert float(rel(z, z_true).max()) < 1e-3 and float(loss.max()) < 1e-6


def test_z_init_and_manifold_index_errors() -> None:
    q = aligned_mlp(1)
    with torch.no_grad():
        x = q(torch.randn(3, 4), manifold=0)
    with pytest.raises(ValueError, match=r"z_init has shape \(3, 5\); expected \(3, 4\)"):
        q.invert(x, z_init=torch.zeros(3, 5), steps=2)
    with pytest.raises(ValueError, match=r"expected \(3, 2, 4\)"):
        q.invert(x, z_init=torch.zeros(3, 4), restarts=2, steps=2)
    with pytest.raises(ValueError, match=r"must lie in \[0, 5\)"):
        q.invert(x, manifolds=torch.tensor([0, 1, 5]), steps=2)
    with pytest.raises(ValueError, match="long manifold indices"):
        q.invert(x, manifolds=torch.tensor([0.0, 1.0, 2.0]), steps=2)
    with pytest.raises(ValueError, match="z_init must be"):
        fit_codes(lambda z, i: q(z, manifold=i), x, torch.zeros(3, dtype=torch.long), z_init=torch.zeros(2, 4))
