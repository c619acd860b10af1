"""The batched-bias linear op underneath every :class:`~qmm_plugin.MultiBiasLinear`.

QMM's A generators share every weight and differ only in the biases of their linear layers, so
a minibatch in which sample ``b`` lives on manifold ``index[b]`` is still one matrix product:

.. math::

    y_b = W x_b + a^{(\\mathrm{index}_b)}, \\qquad b = 1..B,

computed here as a single ``addmm`` whose additive input is the gathered bias rows
(``bank.index_select(0, index)``), whatever A is. The backward pass is the ordinary linear
backward for ``x`` and ``W`` plus a segment sum for the bias bank:
``grad_bank = zeros(A, out).index_add_(0, index, grad_y)``.

Three forms are registered with :func:`torch.library.custom_op` (fake impl + autograd), so they
pass :func:`torch.library.opcheck` and trace into ``torch.compile(fullgraph=True)`` graphs as
single nodes:

* ``multi_bias_linear(x, weight, bank, index)``: biases chosen from a bank by manifold index;
* ``sample_bias_linear(x, weight, bias)``: explicit per-sample bias rows ``(B, out)`` (inversion
  and derived manifolds, Eq. 3, where each image carries free biases);
* ``multi_bias_linear_spread(x, weight, bank, index)``: the bank form plus the layer's bias
  spread, the quantity of the regularizer (Eq. 2), from one autograd node (R_BA taken from the
  forward, ``q(..., return_regularizer=True)``).

``x`` may be ``(B, in)`` or ``(B, ..., in)``; a sample's bias is broadcast over its middle dims.
A device-specific kernel (e.g. Triton on CUDA, :mod:`qmm_plugin._triton`) can be registered for
the same ops with ``register_kernel``; the reference implementation below serves every device.

Example::

    >>> import torch
    >>> from qmm_plugin.ops import multi_bias_linear
    >>> x, w, bank = torch.randn(4, 3), torch.randn(5, 3), torch.randn(2, 5)
    >>> idx = torch.tensor([0, 1, 1, 0])
    >>> y = multi_bias_linear(x, w, bank, idx)
    >>> torch.allclose(y[1], w @ x[1] + bank[1], atol=1e-6)
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["multi_bias_linear", "multi_bias_linear_spread", "sample_bias_linear", "segment_sum", "bank_linear",
           "bank_linear_spread", "rows_linear", "bias_spread"]


#: Input widths up to this use the transposed weight as a contiguous ``(in, out)`` matrix. The
#: CPU BLAS computes the weight gradient of a layer this narrow (the paper's 8→1024, 10→256 latent
#: layers) several times faster as ``(x^T g)^T`` than in the ``g^T x`` layout autograd picks for a
#: transposed operand (``benchmarks/run.py``: nn.Linear at 8→1024, B=1024 spends most of its
#: backward there); at 32 inputs and more the default layout is as fast or faster.
NARROW_FAN_IN = 16


def _narrow(weight: Tensor) -> bool:
    """Whether ``weight`` (``(out, in)``) gets the narrow-layer layout (:data:`NARROW_FAN_IN`)."""
    return weight.shape[1] <= NARROW_FAN_IN


def _weight_operand(weight: Tensor) -> Tensor:
    """``weight.T`` as the matmul's second operand: contiguous for narrow layers (see
    :data:`NARROW_FAN_IN`; a copy of ``in * out <= 16 * out`` numbers), else the free view."""
    wt = weight.t()
    return wt.contiguous() if _narrow(weight) else wt


def functorch_transforms_active() -> bool:
    """True inside a :mod:`torch.func` transform (``vmap``, ``grad``, ``jacrev``, ...).

    Under ``vmap`` an in-place op whose destination is not batched but whose operands are (a
    bias gathered by a shared index, the input vmapped per sample) is an error, and a custom op
    needs a vmap rule; the layer entry points then take the out-of-place reference path.
    """
    return torch._C._are_functorch_transforms_active()


def _affine_rows(x: Tensor, weight: Tensor, bias_rows: Tensor, owned: bool = False) -> Tensor:
    """``x @ weight.T`` plus one bias row per sample (dim 0), broadcast over middle dims.

    ``owned=True`` says ``bias_rows`` is a fresh tensor made for this call (the gathered bank
    rows): the matmul then accumulates into it in place (``addmm_``), which saves ``addmm``'s
    copy of its additive input, one ``(B, out)`` pass (measurable at the paper's small layers).
    Inside a :mod:`torch.func` transform every step is out of place
    (:func:`functorch_transforms_active`).
    """
    wt = _weight_operand(weight)
    in_place = not functorch_transforms_active()
    if x.dim() == 2:
        if owned and in_place:
            return bias_rows.addmm_(x, wt)
        return torch.addmm(bias_rows, x, wt)
    batch = x.shape[0]
    y = torch.mm(x.reshape(-1, x.shape[-1]), wt).view(batch, -1, weight.shape[0])
    if in_place:
        y.add_(bias_rows.unsqueeze(1))
    else:
        y = y + bias_rows.unsqueeze(1)
    return y.view(*x.shape[:-1], weight.shape[0])


def _linear_input_grads(grad: Tensor, x: Tensor, weight: Tensor, need_x: bool, need_w: bool
                        ) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of ``x @ weight.T`` w.r.t. ``x`` and ``weight`` (narrow layers: ``(x^T g)^T``,
    the faster layout, see :data:`NARROW_FAN_IN`)."""
    g2 = grad.reshape(-1, grad.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    grad_x = torch.mm(g2, weight).view(x.shape) if need_x else None
    grad_w = None
    if need_w:
        grad_w = torch.mm(x2.t(), g2).t().contiguous() if _narrow(weight) else torch.mm(g2.t(), x2)
    return grad_x, grad_w


def _per_sample(grad: Tensor) -> Tensor:
    """Sum a ``(B, ..., out)`` gradient over its middle dims: ``(B, out)``."""
    return grad if grad.dim() == 2 else grad.reshape(grad.shape[0], -1, grad.shape[-1]).sum(1)


def _check_shapes(x: Tensor, weight: Tensor, rows: int, what: str, bias: Tensor) -> None:
    """Shapes of one op call; ``bias`` is the bank ``(A, out)`` or the explicit rows ``(B, out)``."""
    if x.dim() < 2:
        raise ValueError(f"qmm_plugin.ops: x must be (B, ..., in_features), got shape {tuple(x.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"qmm_plugin.ops: x has {x.shape[-1]} features but weight expects {weight.shape[1]}")
    if rows != x.shape[0]:
        raise ValueError(f"qmm_plugin.ops: {what} has {rows} rows but the batch has {x.shape[0]}")
    if bias.dim() != 2 or bias.shape[1] != weight.shape[0]:
        kind = "bank" if what == "index" else "bias"
        raise ValueError(f"qmm_plugin.ops: {kind} must be 2-D with weight.shape[0] = {weight.shape[0]} columns, "
                         f"got shape {tuple(bias.shape)}")


# ------------------------------------------------------------------------------ segment sum
@torch.library.custom_op("qmm::segment_sum", mutates_args=())
def segment_sum(values: Tensor, index: Tensor, num_segments: int) -> Tensor:
    """``out[a] = sum of values[b] over b with index[b] == a``: ``(B, n) -> (num_segments, n)``.

    The bias bank's gradient (a segmented reduction over the samples of each manifold); its own op
    so that a device kernel (the Triton one on CUDA) can replace ``index_add_``.
    """
    return values.new_zeros(num_segments, values.shape[-1]).index_add_(0, index, values)


@segment_sum.register_fake
def _(values: Tensor, index: Tensor, num_segments: int) -> Tensor:
    return values.new_empty((num_segments, values.shape[-1]))


# ------------------------------------------------------------------------------- bias spread
def bias_spread(weight: Tensor, bank: Tensor) -> Tensor:
    r""":math:`\operatorname{tr}\operatorname{cov}_i(W^\top a^{(i)})` for one Linear layer (differentiable):
    the quantity whose log the bias-aligning regularizer (Eq. 2) sums.

    ``weight``: ``(out, in)``; ``bank``: ``(A, out)``. Unbiased covariance; 0 for ``A = 1``.
    """
    centred = bank - bank.mean(0, keepdim=True)
    projected = centred @ weight  # rows: W^T (a_i - a_bar)
    return projected.pow(2).sum() / max(bank.shape[0] - 1, 1)


# --------------------------------------------------------------------------------- bank + index
@torch.library.custom_op("qmm::multi_bias_linear", mutates_args=())
def multi_bias_linear(x: Tensor, weight: Tensor, bank: Tensor, index: Tensor) -> Tensor:
    """``y[b] = weight @ x[b] + bank[index[b]]`` for the whole batch in one matmul.

    Args:
        x: ``(B, in)`` or ``(B, ..., in)``.
        weight: ``(out, in)``, shared by all manifolds.
        bank: ``(A, out)``, the bias bank (one row per manifold).
        index: ``(B,)`` integer manifold index per sample, values in ``[0, A)``.
    """
    _check_shapes(x, weight, index.shape[0], "index", bank)
    return _affine_rows(x, weight, bank.index_select(0, index), owned=True)


@multi_bias_linear.register_fake
def _(x: Tensor, weight: Tensor, bank: Tensor, index: Tensor) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _mbl_setup(ctx: Any, inputs: tuple[Tensor, ...], output: Tensor) -> None:
    x, weight, bank, index = inputs
    ctx.save_for_backward(x, weight, index)
    ctx.num_biases = bank.shape[0]


def _mbl_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    x, weight, index = ctx.saved_tensors
    need_x, need_w, need_bank, _ = ctx.needs_input_grad
    grad_x, grad_w = _linear_input_grads(grad, x, weight, need_x, need_w)
    grad_bank = None
    if need_bank:  # segment sum over the samples of each manifold
        grad_bank = segment_sum(_per_sample(grad), index, ctx.num_biases)
    return grad_x, grad_w, grad_bank, None


multi_bias_linear.register_autograd(_mbl_backward, setup_context=_mbl_setup)


# ------------------------------------------------ bank + index, with the layer's bias spread
def _few_rows_mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for an ``a`` with few rows (the A centred bank rows) and a tall ``b`` (``(K, N)``).

    On the CPU, MKL's product with ~10 rows gains nothing from a second thread; splitting the
    reduction over K into one bmm batch entry per thread keeps every core busy
    (``benchmarks/run.py``'s "R_BA per layer" rows time the op it belongs to). Elsewhere, or when
    K does not split evenly, it is the plain product.
    """
    k = torch.get_num_threads()
    rows, depth = a.shape
    if not a.is_cpu or k < 2 or depth % k:
        return a @ b
    return torch.bmm(a.view(rows, k, depth // k).transpose(0, 1), b.view(k, depth // k, -1)).sum(0)


@torch.library.custom_op("qmm::multi_bias_linear_spread", mutates_args=())
def _spread_op(x: Tensor, weight: Tensor, bank: Tensor, index: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, spread, P, P W^T)``; the last two are kept for the backward (not differentiable)."""
    _check_shapes(x, weight, index.shape[0], "index", bank)
    proj = _few_rows_mm(bank - bank.mean(0, keepdim=True), weight)  # (A, in): rows W^T (a_i - a_bar)
    batch, rows = x.shape[0], x.numel() // max(x.shape[-1], 1)
    acc = bank.new_empty((rows + proj.shape[0], weight.shape[0]))
    if x.dim() == 2:
        torch.index_select(bank, 0, index, out=acc[:batch])
    else:  # middle dims: every row of a sample gets its bias
        acc[:rows].view(batch, -1, weight.shape[0]).copy_(bank.index_select(0, index).unsqueeze(1))
    acc[rows:].zero_()
    # one matmul over the stacked rows [x; P]: the layer's output and P W^T for the backward
    acc.addmm_(torch.cat([x.reshape(rows, -1), proj]), _weight_operand(weight))
    y = acc[:rows].view(*x.shape[:-1], weight.shape[0])
    # outputs of a custom op may not alias each other: the A rows of P W^T are copied out
    return y, proj.pow(2).sum() / max(bank.shape[0] - 1, 1), proj, acc[rows:].clone()


@_spread_op.register_fake
def _(x: Tensor, weight: Tensor, bank: Tensor, index: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return (x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty(()),
            x.new_empty((bank.shape[0], weight.shape[1])), x.new_empty((bank.shape[0], weight.shape[0])))


def _spread_setup(ctx: Any, inputs: tuple[Tensor, ...], output: tuple[Tensor, ...]) -> None:
    x, weight, bank, index = inputs
    _, _, proj, proj_wt = output
    ctx.mark_non_differentiable(proj, proj_wt)
    ctx.save_for_backward(x, weight, bank, index, proj, proj_wt)


def _spread_backward(ctx: Any, grad: Tensor, grad_spread: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
    if torch.is_grad_enabled():  # backward(create_graph=True): P and P W^T are saved as constants
        raise RuntimeError(
            "qmm::multi_bias_linear_spread has no double backward (backward(create_graph=True) or "
            "torch.autograd.grad(..., create_graph=True) through R_BA taken from the forward); use the "
            "separate q.ba_regularizer(), which plain autograd differentiates to any order")
    x, weight, bank, index, proj, proj_wt = ctx.saved_tensors
    need_x, need_w, need_bank, _ = ctx.needs_input_grad
    grad_x, grad_w = _linear_input_grads(grad, x, weight, need_x, need_w)
    scale = grad_spread * (2.0 / max(bank.shape[0] - 1, 1))
    if need_w:  # d spread / dW = 2 C^T P / (A-1): a rank-A update of the layer's weight gradient
        grad_w.addmm_((bank - bank.mean(0, keepdim=True)).t(), proj * scale)
    grad_bank = None
    if need_bank:  # d spread / dC = 2 P W^T / (A-1), centred (centring is a symmetric projection)
        through = proj_wt * scale
        grad_bank = segment_sum(_per_sample(grad), index, bank.shape[0])
        grad_bank += through - through.mean(0, keepdim=True)
    return grad_x, grad_w, grad_bank, None


_spread_op.register_autograd(_spread_backward, setup_context=_spread_setup)


def multi_bias_linear_spread(x: Tensor, weight: Tensor, bank: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    r""":func:`multi_bias_linear` and the layer's bias spread (Eq. 2) in one autograd node.

    Returns ``(y, spread)``: ``y`` as :func:`multi_bias_linear`, and the 0-dim
    :math:`\operatorname{tr}\operatorname{cov}_i(W^\top a^{(i)}) = \lVert C W\rVert^2 / (A-1)`
    with :math:`C` the centred bank (rows :math:`a^{(i)} - \bar a`; 0 for ``A = 1``), the
    quantity whose log the bias-aligning regularizer sums
    (:func:`bias_spread`; the same value).

    Why one node: with :math:`P = C W`, the spread's gradients are :math:`2 C^\top P / (A-1)`
    for :math:`W` and :math:`2 P W^\top / (A-1)` for :math:`C`. The forward gets
    :math:`P W^\top` from the layer's own matmul (``[x; P] W^T``: A more rows, no second pass
    over :math:`W`), and the backward adds the rank-A :math:`C^\top P` in place into the
    layer's weight gradient, where a separate regularizer makes autograd allocate and add a
    second full ``(out, in)`` gradient. The one extra pass over :math:`W` left is :math:`P = C W`
    itself. A registered custom op (``qmm::multi_bias_linear_spread``: fake impl + autograd),
    so it traces into ``torch.compile`` graphs. Used by ``q(..., return_regularizer=True)``.

    Example::

        >>> import torch
        >>> from qmm_plugin.ops import bias_spread
        >>> x, w, bank = torch.randn(4, 3), torch.randn(6, 3), torch.randn(2, 6)
        >>> y, spread = multi_bias_linear_spread(x, w, bank, torch.tensor([0, 1, 1, 0]))
        >>> torch.allclose(spread, bias_spread(w, bank))
        True
    """
    y, spread, _, _ = _spread_op(x, weight, bank, index)
    return y, spread


# ------------------------------------------------------------------------ explicit per-sample rows
@torch.library.custom_op("qmm::sample_bias_linear", mutates_args=())
def sample_bias_linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``y[b] = weight @ x[b] + bias[b]``: explicit bias rows ``(B, out)``, one per sample.

    The explicit form of :func:`multi_bias_linear`, used when each sample carries its own free
    biases (inversion, Eq. 3; derived manifolds). ``bias`` must be ``(B, out)``.
    """
    _check_shapes(x, weight, bias.shape[0], "bias", bias)
    return _affine_rows(x, weight, bias)


@sample_bias_linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _sbl_setup(ctx: Any, inputs: tuple[Tensor, ...], output: Tensor) -> None:
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight)


def _sbl_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    x, weight = ctx.saved_tensors
    need_x, need_w, need_bias = ctx.needs_input_grad
    grad_x, grad_w = _linear_input_grads(grad, x, weight, need_x, need_w)
    return grad_x, grad_w, (_per_sample(grad) if need_bias else None)


sample_bias_linear.register_autograd(_sbl_backward, setup_context=_sbl_setup)


# ------------------------------------------------------------------------ layer entry points
def _eager_reference(x: Tensor) -> bool:
    """True when the call runs the reference computation instead of the custom op: eager mode on
    a CPU tensor, or inside a :mod:`torch.func` transform on any device (the custom ops have no
    vmap rule; the reference is plain differentiable ATen calls)."""
    # .is_cpu: ~13x cheaper than .device
    return (x.is_cpu or functorch_transforms_active()) and not torch.compiler.is_compiling()


def bank_linear(x: Tensor, weight: Tensor, bank: Tensor, index: Tensor) -> Tensor:
    """What :class:`~qmm_plugin.MultiBiasLinear` calls: :func:`multi_bias_linear`'s result.

    Under ``torch.compile`` and on devices with a registered kernel (CUDA: Triton) this *is* the
    custom op, so graphs keep one node per layer. In eager mode on the CPU it runs the op's
    reference computation (``addmm`` with ``bank.index_select``) directly under autograd, whose
    backward is the same (``index_add_`` segment sum for the bank): this skips the custom-op
    dispatcher's fixed per-call cost, which matters at the paper's small layers (8→1024, B=64),
    where the matmuls themselves take a fraction of a millisecond (``benchmarks/run.py``).
    """
    if not _eager_reference(x):
        return multi_bias_linear(x, weight, bank, index)
    _check_shapes(x, weight, index.shape[0], "index", bank)
    return _affine_rows(x, weight, bank.index_select(0, index), owned=True)


#: Layers with fewer weights than this compute their spread in eager mode on the CPU as a
#: separate small product (:func:`bias_spread`) beside :func:`bank_linear`:
#: the fused op's fixed cost (a dozen small tensor ops in Python) is then larger than the weight
#: gradient it saves. ``benchmarks/run.py`` times both forms per layer of the MNIST generator
#: ("R_BA per layer" in ``benchmarks/results/RESULTS.md``): at 8→1024 the separate form is
#: cheaper, at 1024→6272 the fused one.
FUSED_SPREAD_MIN_WEIGHTS = 1 << 18


def bank_linear_spread(x: Tensor, weight: Tensor, bank: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """What :class:`~qmm_plugin.MultiBiasLinear` calls when the forward also returns R_BA:
    :func:`multi_bias_linear_spread`'s result. Small layers in eager mode on the CPU (fewer than
    :data:`FUSED_SPREAD_MIN_WEIGHTS` weights) take the separate form, the same value and
    gradients at less fixed cost; so does every layer inside a :mod:`torch.func` transform."""
    if _eager_reference(x) and (weight.numel() < FUSED_SPREAD_MIN_WEIGHTS or functorch_transforms_active()):
        return bank_linear(x, weight, bank, index), bias_spread(weight, bank)
    return multi_bias_linear_spread(x, weight, bank, index)


def rows_linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """What :class:`~qmm_plugin.MultiBiasLinear` calls for explicit rows: :func:`sample_bias_linear`'s
    result, dispatched like :func:`bank_linear` (custom op when compiling or off the CPU)."""
    if not _eager_reference(x):
        return sample_bias_linear(x, weight, bias)
    _check_shapes(x, weight, bias.shape[0], "bias", bias)
    return _affine_rows(x, weight, bias)
