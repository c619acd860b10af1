"""Triton kernels for the QMM ops on CUDA tensors (the CPU keeps the reference path in :mod:`.ops`).

* :func:`biased_matmul` — ``y = x W^T + bias[row]``: a tiled matmul whose epilogue gathers each
  row's bias from the bank (``bank[index[sample]]``) or takes it from explicit per-sample rows, so
  the gathered ``(B, out)`` bias is never materialised (``qmm::multi_bias_linear``,
  ``qmm::sample_bias_linear``);
* :func:`segment_sum` — the bias bank's gradient as a segmented reduction: rows are sorted by
  manifold once, and each program sums one manifold's contiguous segment over a block of output
  columns (deterministic, no atomics; ``qmm::segment_sum``).

The input/weight gradients stay cuBLAS matmuls (the op's autograd in :mod:`.ops` is shared).
:func:`register` installs the kernels for the ``"cuda"`` dispatch key; it is called on import
when CUDA is available. The launchers also run on CPU tensors under ``TRITON_INTERPRET=1``,
which is how ``tests/test_triton.py`` checks them against the reference op without a GPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["biased_matmul", "segment_sum", "register", "INTERPRET"]

#: True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_FWD_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
]
if INTERPRET:  # the interpreter is slow: one small config, no autotuning sweep
    _FWD_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=1)]


@triton.autotune(configs=_FWD_CONFIGS, key=["M", "N", "K", "HAS_INDEX", "IEEE"])
@triton.jit
def _biased_matmul_kernel(
    x_ptr, w_ptr, bias_ptr, index_ptr, y_ptr,
    M, N, K, rows_per_sample,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_br, stride_bn, stride_ym, stride_yn,
    HAS_INDEX: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        a = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None] * stride_wk,
                    mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    # epilogue: this row's bias, gathered from the bank (or the explicit per-sample rows)
    sample = rm // rows_per_sample
    if HAS_INDEX:
        brow = tl.load(index_ptr + sample, mask=m_ok, other=0)
    else:
        brow = sample
    bias = tl.load(bias_ptr + brow[:, None] * stride_br + rn[None, :] * stride_bn,
                   mask=m_ok[:, None] & n_ok[None, :], other=0.0)
    acc += bias.to(tl.float32)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _segment_sum_kernel(
    values_ptr, order_ptr, offsets_ptr, out_ptr, N,
    stride_vr, stride_vn, stride_or, stride_on,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    seg = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    start = tl.load(offsets_ptr + seg)
    end = tl.load(offsets_ptr + seg + 1)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_ok = rr < end
        rows = tl.load(order_ptr + rr, mask=r_ok, other=0)
        tile = tl.load(values_ptr + rows[:, None] * stride_vr + rn[None, :] * stride_vn,
                       mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.sum(tile.to(tl.float32), axis=0)
    tl.store(out_ptr + seg * stride_or + rn * stride_on, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


def _check(x: Tensor, weight: Tensor) -> None:
    if x.dtype != weight.dtype:
        raise TypeError(f"qmm_plugin._triton: x is {x.dtype} but weight is {weight.dtype}; cast one of them")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"qmm_plugin._triton: x has {x.shape[-1]} features but weight expects {weight.shape[1]}")


def biased_matmul(x: Tensor, weight: Tensor, bias: Tensor, index: Tensor | None) -> Tensor:
    """``y[b, ...] = x[b, ...] @ weight.T + bias[index[b]]`` (or ``bias[b]`` when ``index`` is None).

    ``x``: ``(B, ..., in)``; ``weight``: ``(out, in)``; ``bias``: the bank ``(A, out)`` with
    ``index`` ``(B,)``, or per-sample rows ``(B, out)`` with ``index=None``.
    """
    _check(x, weight)
    batch, out_features = x.shape[0], weight.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    rows, k = x2.shape
    rows_per_sample = rows // batch if batch else 1
    y = torch.empty((rows, out_features), device=x.device, dtype=x.dtype)
    if rows == 0 or out_features == 0:
        return y.view(*x.shape[:-1], out_features)
    if index is not None:
        index = index.contiguous()
    ieee = x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32

    def grid(meta: dict[str, int]) -> tuple[int, int]:
        return triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(out_features, meta["BLOCK_N"])

    _biased_matmul_kernel[grid](
        x2, weight, bias, index if index is not None else bias, y,
        rows, out_features, k, max(rows_per_sample, 1),
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1),
        bias.stride(0), bias.stride(1), y.stride(0), y.stride(1),
        HAS_INDEX=index is not None, IEEE=ieee,
    )
    return y.view(*x.shape[:-1], out_features)


def segment_sum(values: Tensor, index: Tensor, num_segments: int) -> Tensor:
    """``out[a] = values[index == a].sum(0)``: ``(B, n)``, ``(B,)`` -> ``(num_segments, n)``.

    The rows are sorted by segment once (stable); each program reduces one segment's rows over
    ``BLOCK_N`` columns, accumulating in float32. Deterministic: no atomics.
    """
    if values.dim() != 2 or index.dim() != 1 or index.shape[0] != values.shape[0]:
        raise ValueError(f"segment_sum expects values (B, n) and index (B,), got {tuple(values.shape)} "
                         f"and {tuple(index.shape)}")
    n = values.shape[1]
    out = torch.empty((num_segments, n), device=values.device, dtype=values.dtype)
    if num_segments == 0 or n == 0:
        return out
    order = torch.argsort(index, stable=True)
    counts = torch.bincount(index, minlength=num_segments)
    offsets = torch.zeros(num_segments + 1, device=index.device, dtype=torch.int64)
    torch.cumsum(counts, 0, out=offsets[1:])
    block_n = 32 if INTERPRET else 128
    grid = (num_segments, triton.cdiv(n, block_n))
    _segment_sum_kernel[grid](values, order, offsets, out, n, values.stride(0), values.stride(1),
                              out.stride(0), out.stride(1), BLOCK_R=16 if INTERPRET else 32, BLOCK_N=block_n)
    return out


def _mbl_cuda(x: Tensor, weight: Tensor, bank: Tensor, index: Tensor) -> Tensor:
    if index.shape[0] != x.shape[0]:
        raise ValueError(f"qmm_plugin.ops: index has {index.shape[0]} rows but the batch has {x.shape[0]}")
    return biased_matmul(x, weight, bank, index)


def _sbl_cuda(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    if bias.shape[0] != x.shape[0]:
        raise ValueError(f"qmm_plugin.ops: bias has {bias.shape[0]} rows but the batch has {x.shape[0]}")
    return biased_matmul(x, weight, bias, None)


_registered = False


def register() -> None:
    """Install the Triton kernels for the ``"cuda"`` key of the ``qmm::`` ops (idempotent)."""
    global _registered
    if _registered:
        return
    from . import ops  # noqa: F401  (defines the ops)

    torch.library.register_kernel("qmm::multi_bias_linear", "cuda", _mbl_cuda)
    torch.library.register_kernel("qmm::sample_bias_linear", "cuda", _sbl_cuda)
    torch.library.register_kernel("qmm::segment_sum", "cuda", segment_sum)
    _registered = True


if torch.cuda.is_available():
    register()
