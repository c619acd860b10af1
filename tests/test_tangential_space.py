"""The tangential space col(W) of every layer shape, checked against an independent projector.

``tangential_basis``, ``tangential_spread``, ``align_biases_`` and ``invert`` (``bias_mode="normal"``)
share one column-space routine with a separate branch for ``out <= in`` (wide or square layers).
Each is compared here with the orthogonal projector onto col(W) that NumPy's SVD gives, for
tall, square and wide weights of full and of deficient rank.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import qmm_plugin
from qmm_plugin.regularizer import tangential_basis, tangential_spread

A = 4

# (out, in, rank): tall, square and wide layers, each at full and at deficient rank
SHAPES = [(12, 4, 4), (12, 5, 3), (8, 8, 8), (8, 8, 5), (6, 10, 6), (6, 10, 4)]
IDS = [f"{o}x{i}-rank{r}" for o, i, r in SHAPES]


def weight_of_rank(out: int, inp: int, rank: int, seed: int) -> torch.Tensor:
    """A float64 ``(out, in)`` weight of exactly the given rank: ``U diag(s) V^T`` with random
    orthonormal ``U`` (out, rank), ``V`` (in, rank) and singular values in [1, 2] (well
    conditioned, so that the fit of :func:`invert` converges within the test's step cap)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(out, rank, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(inp, rank, generator=gen, dtype=torch.float64)).Q
    s = 1 + torch.rand(rank, generator=gen, dtype=torch.float64)
    return (u * s) @ v.t()


def reference_projector(w: torch.Tensor) -> np.ndarray:
    """The orthogonal projector onto col(w), from NumPy's SVD (not the package's Gram eigh)."""
    u, s, _ = np.linalg.svd(w.numpy())
    r = int((s > s[0] * 1e-10).sum())
    return u[:, :r] @ u[:, :r].T


def converted_layer(out: int, inp: int, rank: int, seed: int) -> qmm_plugin.QuotientModel:
    """One converted layer carrying the weight of the given rank and a random A-row bank."""
    q = qmm_plugin.convert(nn.Sequential(nn.Linear(inp, out)).double(), A, init_std=1.0)
    with torch.no_grad():
        q.model[0].weight.copy_(weight_of_rank(out, inp, rank, seed))
    return q


@pytest.mark.parametrize("out, inp, rank", SHAPES, ids=IDS)
def test_tangential_basis_spans_the_column_space(out: int, inp: int, rank: int) -> None:
    w = weight_of_rank(out, inp, rank, seed=out * inp + rank)
    proj = reference_projector(w)
    assert np.linalg.matrix_rank(proj) == rank
    q = tangential_basis(w)
    assert q.shape == (out, rank)
    torch.testing.assert_close(q.t() @ q, torch.eye(rank, dtype=torch.float64), rtol=0, atol=1e-10)
    # same span in both directions: Q Q^T is the reference projector
    np.testing.assert_allclose((q @ q.t()).numpy(), proj, atol=1e-10)


@pytest.mark.parametrize("out, inp, rank", SHAPES, ids=IDS)
def test_tangential_spread_against_reference(out: int, inp: int, rank: int) -> None:
    q = converted_layer(out, inp, rank, seed=1)
    layer = q.model[0]
    proj = reference_projector(layer.weight.detach())
    bank = layer.bias_bank.detach().numpy()
    expected = np.trace(np.cov((bank @ proj).T))  # tr cov_i(P a_i)
    assert expected > 1e-3
    np.testing.assert_allclose(tangential_spread({"l": layer})["l"], expected, rtol=1e-9)


@pytest.mark.parametrize("out, inp, rank", SHAPES, ids=IDS)
def test_align_biases_against_reference(out: int, inp: int, rank: int) -> None:
    q = converted_layer(out, inp, rank, seed=2)
    layer = q.model[0]
    proj = reference_projector(layer.weight.detach())
    before = layer.bias_bank.detach().numpy().copy()
    qmm_plugin.align_biases_(q)
    after = layer.bias_bank.detach().numpy()
    normal = np.eye(out) - proj
    # tangential parts: all equal to the bank mean's; normal parts: unchanged
    np.testing.assert_allclose(after @ proj, np.broadcast_to(before.mean(0) @ proj, after.shape), atol=1e-10)
    np.testing.assert_allclose(after @ normal, before @ normal, atol=1e-10)
    assert tangential_spread({"l": layer})["l"] < 1e-18


@pytest.mark.parametrize("out, inp, rank", SHAPES, ids=IDS)
def test_invert_keeps_biases_in_the_normal_space(out: int, inp: int, rank: int) -> None:
    """Eq. 3 in normal mode on one layer ``x = W z + a``: the optimum's bias is
    ``a_bar + (I - P)(x - a_bar)`` (the normal part takes what ``W z`` cannot reach) and its
    image is ``x`` itself; for a full-rank wide or square layer P = I and the bias stays ``a_bar``."""
    q = qmm_plugin.align_biases_(converted_layer(out, inp, rank, seed=3))
    layer = q.model[0]
    proj = reference_projector(layer.weight.detach())
    a_bar = layer.bias_bank.detach().mean(0).numpy()
    x = torch.randn(3, out, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    inv = q.invert(x, steps=4000, seed=0)
    got = inv.biases["0"].numpy()
    expected = a_bar + (x.numpy() - a_bar) @ (np.eye(out) - proj)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_allclose(inv.reconstruction.numpy(), x.numpy(), atol=1e-4)
