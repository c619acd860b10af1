r"""The bias-aligning regularizer (Eq. 2), the tangential spread it bounds (Theorem 1), and exact
alignment of bias banks (Proposition 1's hypothesis, enforced as a hard constraint).

For a converted layer with shared weight :math:`W` (``(out, in)``; the paper's :math:`U`) and
bias bank :math:`a^{(1..A)}`, write :math:`\bar a` for the bank mean. Proposition 1 needs the
*tangential components* :math:`a_\parallel^{(i)} = P a^{(i)}`, with :math:`P = W W^+` the
projector onto the column space of :math:`W`, to coincide. Theorem 1 bounds their spread by a
quantity that needs no inverse:

.. math::

    \operatorname{tr}\operatorname{cov}_i(W^\top a^{(i)})
      \;\ge\; \frac{\operatorname{tr}\operatorname{cov}_i(a_\parallel^{(i)})}
                   {\operatorname{tr}((W^\top W)^{-1})},

and Eq. 2 minimises the log of the left side summed over layers:

.. math::

    R_{BA} = \sum_l \log\big(\operatorname{tr}\operatorname{cov}_i(W_l^\top a_l^{(i)}) + \epsilon\big),
    \qquad
    \operatorname{tr}\operatorname{cov}_i(W^\top a^{(i)}) = \frac{1}{A-1}\sum_i \lVert W^\top (a^{(i)} - \bar a)\rVert^2 .

Choices the paper leaves open (documented here, tested in ``tests/test_regularizer.py``):

* ``epsilon`` (default ``1e-8``) inside the log: identical biases give ``log(eps)`` and a zero
  gradient instead of ``-inf``/NaN;
* ``A = 1``: the covariance of one sample is taken as 0 (divide by ``max(A - 1, 1)``), so
  ``R_BA = log(eps)`` per layer with zero gradient — a plain WGAN pays nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ._checks import check_finite_state, check_real
from .layer import MultiBiasLayer
from .ops import bias_spread

__all__ = ["bias_spread", "ba_regularizer_terms", "tangential_spread", "tangential_basis", "align_biases_"]

DEFAULT_EPS = 1e-8


def ba_regularizer_terms(layers: Mapping[str, MultiBiasLayer], eps: float = DEFAULT_EPS,
                         spreads: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Per-layer terms ``log(tr cov(W_l^T a_l) + eps)`` of Eq. 2, keyed by layer path.

    ``spreads``: :func:`bias_spread` values some layers already computed in a forward
    (:func:`~qmm_plugin.ops.multi_bias_linear_spread`, ``q(..., return_regularizer=True)``); the
    other layers compute theirs here.
    """
    eps = check_real(eps, "eps", low=0.0, low_open=True,
                     meaning="inside the log of Eq. 2, so that identical biases give a finite R_BA")
    given = spreads or {}
    return {path: torch.log((given[path] if path in given else m.bias_spread()) + eps)
            for path, m in layers.items()}


def _column_space(w: Tensor, rtol: float | None) -> tuple[Tensor, Tensor | None]:
    """An orthonormal basis of col(w) in factored form, from the eigendecomposition of the small
    Gram matrix: ``(V, s)`` with ``Q = w V / s`` when w is tall, ``(Q, None)`` when it is wide."""
    tol = rtol if rtol is not None else max(w.shape) * torch.finfo(torch.float32).eps
    if w.shape[0] <= w.shape[1]:  # wide or square: the eigenvectors of W W^T span col(W) directly
        evals, evecs = torch.linalg.eigh(w @ w.T)
        sing = evals.clamp_min(0).sqrt()
        return evecs[:, sing > tol * sing.max()], None
    evals, v = torch.linalg.eigh(w.T @ w)
    sing = evals.clamp_min(0).sqrt()
    keep = sing > tol * sing.max()
    return v[:, keep], sing[keep]


def tangential_basis(weight: Tensor, rtol: float | None = None) -> Tensor:
    """Orthonormal basis ``Q`` (``(out, r)``, float64) of the column space of ``weight``.

    ``Q Q^T`` is the projector onto the tangential space; ``r`` is the numerical rank (singular
    values above ``rtol * s_max``, default ``rtol = max(out, in) * eps(float32)``). Computed from
    the eigendecomposition of the small Gram matrix (``W^T W``, in x in, then ``Q = W V / s``)
    rather than an SVD of ``W``: for the paper's 1024->6272 layer that is a 1024 x 1024 problem.
    """
    w = weight.detach().double()
    right, sing = _column_space(w, rtol)
    return right if sing is None else (w @ right) / sing


def tangential_spread(layers: Mapping[str, MultiBiasLayer]) -> dict[str, float]:
    r"""Exact :math:`\operatorname{tr}\operatorname{cov}_i(a_\parallel^{(i)})` per layer, in float64.

    The quantity Theorem 1 bounds; for monitoring (not differentiable). Zero means the bank
    satisfies Proposition 1 exactly. :math:`a_\parallel = P B a` with :math:`P` the projector
    onto the column space of the layer's operator :math:`W` (``layer.output_operator()``) and
    :math:`B` the map from a bias to its output tensor (``layer.bias_image``; the identity for a
    Linear). The coordinates ``(B(a_i - a_bar))^T Q`` are computed as ``((B(a_i - a_bar))^T W) V / s``
    without forming ``Q``.
    """
    out: dict[str, float] = {}
    for path, m in layers.items():
        check_finite_state(m, f"tangential_spread, layer '{path}'")
        w = m.output_operator().detach().double()
        bank = m.bias_bank.detach().double()
        image = m.bias_image(bank - bank.mean(0, keepdim=True))
        right, sing = _column_space(w, None)
        coords = image @ right if sing is None else (image @ w) @ right / sing
        out[path] = float(coords.pow(2).sum() / max(bank.shape[0] - 1, 1))
    return out


@torch.no_grad()
def align_biases_(model: object) -> object:
    r"""Make the tangential components of every bias bank coincide exactly, in place.

    Each row becomes :math:`a^{(i)} - P(a^{(i)} - \bar a)`: its normal component is kept and its
    tangential component is replaced by the bank mean's, :math:`P\bar a`. Afterwards
    :func:`tangential_spread` is 0 (to float precision) and Proposition 1 applies, so one encoder
    inverts every manifold. A hard-constraint alternative to the regularizer (beyond the paper).

    Args:
        model: a converted model, or any module containing multi-bias layers.

    Returns:
        ``model``.

    Example::

        >>> import torch, qmm_plugin
        >>> q = qmm_plugin.convert(torch.nn.Sequential(torch.nn.Linear(2, 6)), num_biases=3)
        >>> _ = qmm_plugin.align_biases_(q)
        >>> max(q.tangential_spread().values()) < 1e-10
        True
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"align_biases_ expects an nn.Module, got {type(model).__name__}")
    layers = [m for m in model.modules() if isinstance(m, MultiBiasLayer)]
    if not layers:
        raise ValueError("align_biases_: the model has no multi-bias layer; call qmm_plugin.convert first")
    for m in layers:
        check_finite_state(m, f"align_biases_, layer '{m.path}'")
    for m in layers:
        q = tangential_basis(m.bias_operator())
        bank = m.bias_bank.double()
        centred = bank - bank.mean(0, keepdim=True)
        m.bias_bank.copy_(bank - (centred @ q) @ q.t())
    return model
