"""The Triton kernels (qmm_plugin._triton) against the reference op, on CPU under TRITON_INTERPRET=1,
and torch.compile(fullgraph=True) through the op.

Run the kernel tests with ``TRITON_INTERPRET=1 python -m pytest -m triton tests/test_triton.py``
(they need ``pip install triton``; the default suite deselects them).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import qmm_plugin
from qmm_plugin.ops import multi_bias_linear, sample_bias_linear, segment_sum


def _kernels():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1 (set it before starting pytest)")
    from qmm_plugin import _triton

    return _triton


def _device() -> str:
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


# Odd sizes so that every tile has masked rows/columns; B·… rows not a multiple of the block.
SHAPES = [(1, 1, 1, 1), (37, 19, 45, 5), (8, 33, 70, 1), (20, 16, 32, 12)]


@pytest.mark.triton
@pytest.mark.parametrize("batch,fan_in,fan_out,num", SHAPES)
def test_forward_matches_reference(batch: int, fan_in: int, fan_out: int, num: int) -> None:
    T = _kernels()
    g = torch.Generator().manual_seed(batch * 7 + num)
    dev = _device()
    x = torch.randn(batch, fan_in, generator=g).to(dev)
    w = torch.randn(fan_out, fan_in, generator=g).to(dev)
    bank = torch.randn(num, fan_out, generator=g).to(dev)
    idx = torch.randint(0, num, (batch,), generator=g).to(dev)
    ref = multi_bias_linear(x.cpu(), w.cpu(), bank.cpu(), idx.cpu())
    torch.testing.assert_close(T.biased_matmul(x, w, bank, idx).cpu(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.triton
def test_forward_bias_really_gathered_per_sample() -> None:
    """A zero weight leaves exactly the gathered bias rows: catches a wrong/ignored index."""
    T = _kernels()
    dev = _device()
    bank = torch.arange(3 * 20, dtype=torch.float32).view(3, 20).to(dev)
    idx = torch.tensor([2, 0, 1, 1, 2]).to(dev)
    y = T.biased_matmul(torch.randn(5, 7).to(dev), torch.zeros(20, 7).to(dev), bank, idx)
    torch.testing.assert_close(y.cpu(), bank.cpu()[idx.cpu()], rtol=0, atol=0)


@pytest.mark.triton
def test_forward_with_middle_dims_and_explicit_rows() -> None:
    T = _kernels()
    g = torch.Generator().manual_seed(3)
    dev = _device()
    x = torch.randn(6, 5, 19, generator=g).to(dev)  # a sample's bias broadcasts over 5 rows
    w = torch.randn(40, 19, generator=g).to(dev)
    bank = torch.randn(4, 40, generator=g).to(dev)
    idx = torch.tensor([3, 0, 0, 2, 1, 3]).to(dev)
    ref = multi_bias_linear(x.cpu(), w.cpu(), bank.cpu(), idx.cpu())
    torch.testing.assert_close(T.biased_matmul(x, w, bank, idx).cpu(), ref, rtol=1e-4, atol=1e-4)
    rows = torch.randn(6, 40, generator=g).to(dev)
    ref_rows = sample_bias_linear(x.cpu(), w.cpu(), rows.cpu())
    torch.testing.assert_close(T.biased_matmul(x, w, rows, None).cpu(), ref_rows, rtol=1e-4, atol=1e-4)


@pytest.mark.triton
@pytest.mark.parametrize("batch,width,num", [(1, 1, 1), (37, 45, 7), (64, 33, 3), (5, 70, 10)])
def test_segment_sum_matches_index_add(batch: int, width: int, num: int) -> None:
    """The bank gradient; num > batch leaves empty segments, which must come out as zeros."""
    T = _kernels()
    g = torch.Generator().manual_seed(batch + width)
    dev = _device()
    values = torch.randn(batch, width, generator=g).to(dev)
    idx = torch.randint(0, num, (batch,), generator=g).to(dev)
    ref = segment_sum(values.cpu(), idx.cpu(), num)
    torch.testing.assert_close(T.segment_sum(values, idx, num).cpu(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.triton
def test_segment_sum_rejects_mismatched_index() -> None:
    T = _kernels()
    with pytest.raises(ValueError, match="index"):
        T.segment_sum(torch.zeros(4, 3), torch.zeros(5, dtype=torch.long), 2)


@pytest.mark.triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the registered CUDA kernel needs a GPU")
def test_registered_cuda_kernel_forward_and_backward() -> None:
    _kernels()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(50, 30, generator=g, dtype=torch.float64)
    w = torch.randn(70, 30, generator=g, dtype=torch.float64)
    bank = torch.randn(6, 70, generator=g, dtype=torch.float64)
    idx = torch.randint(0, 6, (50,), generator=g)
    grads = []
    for dev in ("cpu", "cuda"):
        leaves = [t.to(dev).requires_grad_() for t in (x, w, bank)]
        y = multi_bias_linear(*leaves, idx.to(dev))
        y.backward(torch.ones_like(y))
        grads.append([y.detach().cpu()] + [t.grad.cpu() for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


# ------------------------------------------------------------------------- torch.compile
def _small_generator() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.LeakyReLU(0.2), nn.Linear(32, 48),
                         nn.LeakyReLU(0.2), nn.Unflatten(1, (3, 4, 4)), nn.ConvTranspose2d(3, 2, 4, 2, 1))


def test_compile_fullgraph_does_not_break_at_the_op() -> None:
    """fullgraph=True raises on any graph break; the op must appear as a single graph node."""
    torch.manual_seed(0)
    q = qmm_plugin.convert(_small_generator(), num_biases=4)
    z, idx = torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    ops_seen: list[str] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):  # records the graph
        ops_seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(q, fullgraph=True, backend=backend)
    y = compiled(z, manifold=idx)
    torch.testing.assert_close(y, q(z, manifold=idx))
    assert sum("qmm.multi_bias_linear" in s for s in ops_seen) == 2, ops_seen


@pytest.mark.slow
def test_compile_fullgraph_aot_backward_matches_eager() -> None:
    """Through AOTAutograd (fake impls + registered autograd), gradients equal eager ones."""
    torch.manual_seed(1)
    q = qmm_plugin.convert(_small_generator(), num_biases=3)
    z, idx = torch.randn(5, 8), torch.tensor([2, 0, 1, 1, 2])
    torch._dynamo.reset()
    compiled = torch.compile(q, fullgraph=True, backend="aot_eager")
    compiled(z, manifold=idx).square().mean().backward()
    got = {n: p.grad.clone() for n, p in q.named_parameters()}
    q.zero_grad()
    q(z, manifold=idx).square().mean().backward()
    for n, p in q.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-6, msg=n)


# ------------------------------------------------------------- eager CPU entry points (ops.py)
@pytest.mark.parametrize("mid", [(), (3,)])
def test_eager_entry_points_match_the_custom_op(mid: tuple[int, ...]) -> None:
    """bank_linear/rows_linear (what layers call in eager CPU mode) equal the custom ops,
    values and every gradient, including (B, ..., in) inputs."""
    from qmm_plugin.ops import bank_linear, rows_linear

    g = torch.Generator().manual_seed(11)
    x = torch.randn(7, *mid, 5, generator=g, dtype=torch.float64)
    w = torch.randn(9, 5, generator=g, dtype=torch.float64)
    bank = torch.randn(4, 9, generator=g, dtype=torch.float64)
    idx = torch.tensor([3, 0, 1, 1, 3, 2, 0])
    gy = torch.randn(7, *mid, 9, generator=g, dtype=torch.float64)
    for fast, ref, extra in ((bank_linear, multi_bias_linear, (bank, idx)),
                             (rows_linear, sample_bias_linear, (bank[idx].clone(),))):
        results = []
        for fn in (fast, ref):
            leaves = [t.clone().requires_grad_() for t in (x, w, extra[0])]
            y = fn(leaves[0], leaves[1], leaves[2], *extra[1:])
            y.backward(gy)
            results.append([y.detach()] + [t.grad for t in leaves])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_eager_entry_point_rejects_bad_index_length() -> None:
    from qmm_plugin.ops import bank_linear

    with pytest.raises(ValueError, match="index has 2 rows but the batch has 3"):
        bank_linear(torch.randn(3, 4), torch.randn(5, 4), torch.randn(2, 5), torch.tensor([0, 1]))
