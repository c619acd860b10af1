"""The batched-bias op: gradients, agreement with a per-manifold loop, opcheck, torch.compile."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmm_plugin.ops import (
    NARROW_FAN_IN,
    bank_linear,
    multi_bias_linear,
    multi_bias_linear_spread,
    sample_bias_linear,
)
from qmm_plugin.regularizer import bias_spread


def _loop_reference(x: torch.Tensor, weight: torch.Tensor, bank: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """A-generator loop: run each manifold's own nn.Linear on its samples (DMWGAN style)."""
    out = x.new_zeros(*x.shape[:-1], weight.shape[0])
    for i in range(bank.shape[0]):
        sel = index == i
        out[sel] = torch.nn.functional.linear(x[sel], weight, bank[i])
    return out


def _inputs(batch: int, fin: int, fout: int, a: int, mid: tuple[int, ...] = (), dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *mid, fin, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(fout, fin, generator=g, dtype=dtype, requires_grad=True)
    bank = torch.randn(a, fout, generator=g, dtype=dtype, requires_grad=True)
    index = torch.randint(0, a, (batch,), generator=g)
    return x, w, bank, index


@pytest.mark.parametrize("mid", [(), (3,), (2, 2)])
def test_gradcheck_bank_form(mid: tuple[int, ...]) -> None:
    x, w, bank, index = _inputs(6, 4, 5, 3, mid)
    assert torch.autograd.gradcheck(lambda x, w, b: multi_bias_linear(x, w, b, index), (x, w, bank))


@pytest.mark.parametrize("mid", [(), (3,)])
def test_gradcheck_explicit_form(mid: tuple[int, ...]) -> None:
    x, w, _, _ = _inputs(5, 3, 4, 2, mid)
    bias = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(sample_bias_linear, (x, w, bias))


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 12), fin=st.integers(1, 7), fout=st.integers(1, 7), a=st.integers(1, 6),
       mid=st.sampled_from([(), (2,), (1, 3)]), seed=st.integers(0, 10_000))
def test_matches_per_manifold_loop(batch: int, fin: int, fout: int, a: int, mid: tuple[int, ...], seed: int) -> None:
    x, w, bank, index = _inputs(batch, fin, fout, a, mid, seed=seed)
    y = multi_bias_linear(x, w, bank, index)
    y_ref = _loop_reference(x, w, bank, index)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, bank), g)
    grads_ref = torch.autograd.grad(y_ref, (x, w, bank), g)
    for got, ref in zip(grads, grads_ref):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_bank_gradient_is_segment_sum() -> None:
    """Rows of unused manifolds get exactly zero gradient; used rows get the sum over their samples."""
    x, w, bank, _ = _inputs(4, 3, 2, 5)
    index = torch.tensor([1, 1, 3, 1])
    multi_bias_linear(x, w, bank, index).sum().backward()
    expected = torch.zeros(5, 2, dtype=torch.float64)
    expected[1] = 3.0
    expected[3] = 1.0
    torch.testing.assert_close(bank.grad, expected)


def test_explicit_form_equals_bank_form_with_gathered_rows() -> None:
    x, w, bank, index = _inputs(7, 3, 4, 3)
    torch.testing.assert_close(sample_bias_linear(x, w, bank[index]), multi_bias_linear(x, w, bank, index))


@pytest.mark.parametrize("mid", [(), (3,)])
def test_opcheck(mid: tuple[int, ...]) -> None:
    x, w, bank, index = _inputs(6, 4, 5, 3, mid, dtype=torch.float32)
    torch.library.opcheck(multi_bias_linear, (x, w, bank, index))
    torch.library.opcheck(sample_bias_linear, (x, w, torch.randn(6, 5, requires_grad=True)))


def test_shape_errors_are_clear() -> None:
    x, w, bank, index = _inputs(6, 4, 5, 3, dtype=torch.float32)
    with pytest.raises(ValueError, match="index has 5 rows but the batch has 6"):
        multi_bias_linear(x, w, bank, index[:5])
    with pytest.raises(ValueError, match="x has 3 features but weight expects 4"):
        multi_bias_linear(x[:, :3], w, bank, index)


def test_torch_compile_fullgraph() -> None:
    torch._dynamo.reset()
    x, w, bank, index = _inputs(6, 4, 5, 3, dtype=torch.float32)

    def f(x: torch.Tensor, w: torch.Tensor, bank: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return torch.tanh(multi_bias_linear(x, w, bank, index)).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    y = compiled(x, w, bank, index)
    y.backward()
    got = bank.grad.clone()
    bank.grad = None
    f(x, w, bank, index).backward()
    torch.testing.assert_close(got, bank.grad)


@pytest.mark.parametrize("fan_in", [3, NARROW_FAN_IN, NARROW_FAN_IN + 1, 40])
@pytest.mark.parametrize("entry", ["eager", "custom_op"])
def test_narrow_and_wide_layers_match_reference_gradients(fan_in: int, entry: str) -> None:
    """Both weight-gradient layouts (narrow layers: (x^T g)^T, else g^T x) give F.linear's
    gradients, through the eager path and through the registered op's own backward."""
    g = torch.Generator().manual_seed(fan_in)
    x = torch.randn(7, fan_in, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, fan_in, generator=g, dtype=torch.float64, requires_grad=True)
    bank = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([0, 2, 2, 1, 0, 2, 1])
    grad = torch.randn(7, 5, generator=g, dtype=torch.float64)
    fn = bank_linear if entry == "eager" else multi_bias_linear
    got = torch.autograd.grad(fn(x, w, bank, idx), (x, w, bank), grad)
    ref = torch.autograd.grad(torch.nn.functional.linear(x, w) + bank[idx], (x, w, bank), grad)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    fn(x, w, bank, idx).backward(grad)
    assert w.grad is not None and w.grad.is_contiguous()  # .grad keeps the weight's layout


# ------------------------------------------------------ the op with the layer's bias spread
def _spread_reference(x: torch.Tensor, w: torch.Tensor, bank: torch.Tensor, index: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Separate autograd graphs: F.linear + gathered rows, and Eq. 2's tr cov_i(W^T a_i)."""
    rows = bank[index].view(x.shape[0], *[1] * (x.dim() - 2), -1)  # broadcast over middle dims
    return torch.nn.functional.linear(x, w) + rows, bias_spread(w, bank)


@pytest.mark.parametrize("fout", [6, 5])  # even: P = C W split over 2 threads; odd: the plain product
@pytest.mark.parametrize("fan_in", [3, NARROW_FAN_IN + 1])
@pytest.mark.parametrize("mid", [(), (2,)])
def test_spread_gradcheck(set_threads: Callable[[int], None], fout: int, fan_in: int, mid: tuple[int, ...]) -> None:
    set_threads(2)  # the spread's few-row product splits across threads on the CPU: test that path too
    x, w, bank, index = _inputs(6, fan_in, fout, 3, mid)
    assert torch.autograd.gradcheck(lambda x, w, b: multi_bias_linear_spread(x, w, b, index), (x, w, bank))
    # one output unused: its gradient arrives as zeros
    assert torch.autograd.gradcheck(lambda x, w, b: multi_bias_linear_spread(x, w, b, index)[1], (x, w, bank))
    assert torch.autograd.gradcheck(lambda x, w, b: multi_bias_linear_spread(x, w, b, index)[0], (x, w, bank))


# the thread count is set once per test; no example changes it
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.integers(1, 10), fin=st.integers(1, 20), fout=st.sampled_from([1, 2, 4, 7, 8]),
       a=st.integers(1, 6), mid=st.sampled_from([(), (3,)]), seed=st.integers(0, 10_000))
def test_spread_matches_separate_graphs(set_threads: Callable[[int], None], batch: int, fin: int, fout: int, a: int,
                                        mid: tuple[int, ...], seed: int) -> None:
    set_threads(2)
    x, w, bank, index = _inputs(batch, fin, fout, a, mid, seed=seed)
    y, spread = multi_bias_linear_spread(x, w, bank, index)
    y_ref, spread_ref = _spread_reference(x, w, bank, index)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(spread, spread_ref, rtol=1e-12, atol=1e-12)
    gy, gs = torch.randn_like(y), torch.randn(())
    got = torch.autograd.grad((y, spread), (x, w, bank), (gy, gs))
    ref = torch.autograd.grad((y_ref, spread_ref), (x, w, bank), (gy, gs))
    for g_got, g_ref in zip(got, ref):
        torch.testing.assert_close(g_got, g_ref, rtol=1e-10, atol=1e-10)


def test_spread_opcheck_and_compile() -> None:
    x, w, bank, index = _inputs(6, 4, 6, 3, dtype=torch.float32)
    torch.library.opcheck(torch.ops.qmm.multi_bias_linear_spread.default, (x.detach(), w, bank, index))
    torch._dynamo.reset()

    def f(x: torch.Tensor, w: torch.Tensor, bank: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        y, spread = multi_bias_linear_spread(x, w, bank, index)
        return torch.tanh(y).sum() + torch.log(spread)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, w, bank, index), (w, bank))
    ref = torch.autograd.grad(f(x, w, bank, index), (w, bank))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


def test_spread_refuses_double_backward() -> None:
    """Its backward treats P and P W^T as constants: second derivatives would be wrong, so it says so."""
    x, w, bank, index = _inputs(5, 4, 6, 3)
    y, spread = multi_bias_linear_spread(x, w, bank, index)
    with pytest.raises(RuntimeError, match="no double backward.*q.ba_regularizer"):
        torch.autograd.grad(y.sum() + spread, (w,), create_graph=True)
    # first-order gradients are unaffected
    assert torch.autograd.grad(multi_bias_linear_spread(x, w, bank, index)[1], (w,))[0].shape == w.shape
