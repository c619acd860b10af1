"""``torch.func`` over a converted model: per-sample gradients with ``vmap(grad(...))`` equal the
gradients of each sample's own backward pass (the layer entry points take the out-of-place
reference path inside a transform, ``qmm_plugin.ops.functorch_transforms_active``)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

import qmm_plugin

A = 4


def converted(seed: int = 0) -> qmm_plugin.QuotientModel:
    torch.manual_seed(seed)
    g = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 5)).double()
    return qmm_plugin.convert(g, num_biases=A, init_std=0.5)


def params_of(q: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in q.named_parameters()}


def loop_gradients(q: nn.Module, loss_of_one) -> list[dict[str, Tensor]]:  # noqa: ANN001
    """Each sample's gradients from its own ordinary backward pass (zeros for an unused parameter,
    as torch.func.grad gives)."""
    names, params = zip(*q.named_parameters())
    out = []
    for i in range(6):
        grads = torch.autograd.grad(loss_of_one(i), params, allow_unused=True)
        out.append({n: torch.zeros_like(p) if g is None else g for n, p, g in zip(names, params, grads)})
    return out


def assert_per_sample(got: dict[str, Tensor], loop: list[dict[str, Tensor]]) -> None:
    assert got.keys() == loop[0].keys()
    for name, g in got.items():
        assert g.shape[0] == len(loop)
        torch.testing.assert_close(g, torch.stack([d[name] for d in loop]), rtol=1e-10, atol=1e-12, msg=name)
    assert any(float(g[0].sub(g[1]).abs().max()) > 1e-6 for g in got.values())  # samples differ


def test_per_sample_gradients_over_codes_and_manifolds() -> None:
    q = converted()
    z = torch.randn(6, 3, dtype=torch.float64)
    idx = torch.tensor([0, 1, 2, 3, 1, 0])

    def loss(p: dict[str, Tensor], zi: Tensor, ii: Tensor) -> Tensor:
        return functional_call(q, p, (zi.unsqueeze(0),), {"manifold": ii.unsqueeze(0)}).pow(2).sum()

    got = vmap(grad(loss), in_dims=(None, 0, 0))(params_of(q), z, idx)
    assert_per_sample(got, loop_gradients(q, lambda i: q(z[i:i + 1], manifold=idx[i:i + 1]).pow(2).sum()))


@pytest.mark.parametrize("shape", [(6, 3), (6, 2, 3)])  # (B, in) and (B, middle, in)
def test_per_sample_gradients_with_one_manifold(shape: tuple[int, ...]) -> None:
    """The index is shared (not vmapped) while the input is: the bias rows are not batched."""
    q = converted(1)
    z = torch.randn(*shape, dtype=torch.float64)

    def loss(p: dict[str, Tensor], zi: Tensor) -> Tensor:
        return functional_call(q, p, (zi.unsqueeze(0),), {"manifold": 2}).pow(2).sum()

    got = vmap(grad(loss), in_dims=(None, 0))(params_of(q), z)
    assert_per_sample(got, loop_gradients(q, lambda i: q(z[i:i + 1], manifold=2).pow(2).sum()))


@pytest.mark.parametrize("fused_from", [0, 1 << 30])  # every layer through the fused op's size rule / none
def test_per_sample_gradients_with_the_forward_regularizer(fused_from: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qmm_plugin.ops, "FUSED_SPREAD_MIN_WEIGHTS", fused_from)
    q = converted(2)
    z = torch.randn(6, 3, dtype=torch.float64)
    idx = torch.tensor([3, 2, 1, 0, 0, 1])

    def one(p: dict[str, Tensor] | None, zi: Tensor, ii: Tensor) -> Tensor:
        args, kwargs = (zi.unsqueeze(0),), {"manifold": ii.unsqueeze(0), "return_regularizer": True}
        out, r_ba = functional_call(q, p, args, kwargs) if p is not None else q(*args, **kwargs)
        return out.pow(2).sum() + 0.3 * r_ba

    got = vmap(grad(one), in_dims=(None, 0, 0))(params_of(q), z, idx)
    assert_per_sample(got, loop_gradients(q, lambda i: one(None, z[i], idx[i])))


def test_per_sample_gradients_with_explicit_biases() -> None:
    q = converted(3)
    z = torch.randn(6, 3, dtype=torch.float64)
    rows = torch.randn(6, 8, dtype=torch.float64)  # one explicit bias row of layer "0" per sample

    def loss(p: dict[str, Tensor], zi: Tensor, bi: Tensor) -> Tensor:
        kwargs = {"manifold": 1, "biases": {"0": bi.unsqueeze(0)}}
        return functional_call(q, p, (zi.unsqueeze(0),), kwargs).pow(2).sum()

    got = vmap(grad(loss), in_dims=(None, 0, 0))(params_of(q), z, rows)
    assert_per_sample(got, loop_gradients(
        q, lambda i: q(z[i:i + 1], manifold=1, biases={"0": rows[i:i + 1]}).pow(2).sum()))


def test_out_of_range_index_under_vmap_is_refused() -> None:
    q = converted()

    def out(zi: Tensor, ii: Tensor) -> Tensor:
        return q(zi.unsqueeze(0), manifold=ii.unsqueeze(0))

    with pytest.raises(RuntimeError, match="index 4 is out of bounds"):
        vmap(out)(torch.randn(2, 3, dtype=torch.float64), torch.tensor([0, A]))
