"""Multi-bias layers: one shared weight, a bank of manifold biases (paper Sec. 4).

:class:`MultiBiasLayer` is what every converted layer type shares: the bias bank ``.bias_bank``
of shape ``(A, C)`` (row ``i`` is the bias :math:`a^{(i)}` of manifold ``i``; ``C`` the output
features or channels), the per-call choice of a row for each sample, explicit bias rows, and the
operator views the regularizer (Eq. 2) and inversion (Eq. 3) need. A layer type is one subclass
that supplies its forward and those views; :class:`MultiBiasLinear` is the paper's (fully
connected) one.

Which row a sample uses is decided by the :class:`~qmm_plugin.routing.ManifoldSelection` of the
model call running in the current context (:mod:`qmm_plugin.routing`), so the user's own
``forward`` runs unchanged. A layer can also be called on its own with ``manifold=`` or ``bias=``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import check_int, check_real
from .ops import bank_linear, bank_linear_spread, bias_spread, rows_linear
from .routing import Manifold, ManifoldSelection, ModelKey, selection_for

__all__ = ["MultiBiasLayer", "MultiBiasLinear", "ManifoldSelection", "Manifold", "check_explicit_bias"]


def check_explicit_bias(bias: object, layer: MultiBiasLayer, name: str) -> None:
    """Refuse an explicit bias that ``layer`` cannot add: not a tensor, not ``(C,)`` or ``(B, C)``
    (``C = layer.bias_size``), another dtype or another device than the layer's weight."""
    out, weight = layer.bias_size, layer.weight
    if not isinstance(bias, Tensor) or bias.shape[-1:] != (out,) or bias.dim() not in (1, 2):
        shape = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
        raise ValueError(f"{name} must have shape ({out},) or (B, {out}), got {shape}")
    if bias.dtype != weight.dtype:
        raise TypeError(f"{name} has dtype {bias.dtype} but the layer computes in {weight.dtype}; "
                        f"pass it as {name}.to({weight.dtype})")
    # .is_cpu first: two torch.device objects cost ~1.6 us, and inversion calls this every step
    if bias.is_cpu != weight.is_cpu or (not bias.is_cpu and bias.device != weight.device):
        raise ValueError(f"{name} is on {bias.device} but the layer's weight is on {weight.device}; "
                         f"move it with .to({str(weight.device)!r})")


class MultiBiasLayer(nn.Module):
    r"""A layer whose bias is chosen per sample from a bank of A biases (one per manifold).

    Subclasses keep the plain layer's ``.weight`` and give:

    * :meth:`bank_forward` / :meth:`rows_forward`: the output with bank rows chosen by a ``(B,)``
      index / with explicit ``(B, C)`` bias rows;
    * :meth:`bias_adjoint`: :math:`W^\top B c` for ``(N, C)`` bias vectors ``c``, with :math:`W` the
      layer's linear operator and :math:`B` the map from a bias vector to its output tensor
      (identity for a Linear, broadcast over positions for a convolution): Eq. 2's quantity;
    * :meth:`bias_image`: :math:`B c`, flattened to ``(N, n_out)``;
    * :meth:`bias_operator`: :math:`B^\top W` as a ``(C, n_in)`` matrix, whose column space is the
      tangential part of the bias space (inversion's exact constraint, Eq. 3);
    * :meth:`output_operator`: :math:`W` as a ``(n_out, n_in)`` matrix (exact tangential spread);
    * :meth:`from_plain` / :meth:`to_plain`: conversion from and back to the plain layer.
    """

    num_biases: int
    bias_bank: nn.Parameter
    weight: nn.Parameter

    def _init_routing(self, num_biases: int) -> None:
        self.num_biases = num_biases
        self.path = ""  # set by convert(): this layer's path in the converted model
        self.route_key: ModelKey | None = None  # set by convert(): the model whose calls route this layer

    @property
    def bias_size(self) -> int:
        """``C``: the length of one bias vector (output features or channels)."""
        return self.bias_bank.shape[1]

    # ------------------------------------------------------------------------ per type
    def bank_forward(self, x: Tensor, index: Tensor) -> Tensor:
        raise NotImplementedError

    def bank_forward_spread(self, x: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`bank_forward` and the layer's bias spread (Eq. 2) from the same call."""
        return self.bank_forward(x, index), self.bias_spread()

    def rows_forward(self, x: Tensor, rows: Tensor) -> Tensor:
        raise NotImplementedError

    def bias_adjoint(self, c: Tensor) -> Tensor:
        raise NotImplementedError

    def bias_image(self, c: Tensor) -> Tensor:
        raise NotImplementedError

    def bias_operator(self) -> Tensor:
        raise NotImplementedError

    def output_operator(self) -> Tensor:
        raise NotImplementedError

    def to_plain(self, manifold: int) -> nn.Module:
        raise NotImplementedError

    # ------------------------------------------------------------------------ shared
    def bias_spread(self) -> Tensor:
        r""":math:`\operatorname{tr}\operatorname{cov}_i(W^\top B a^{(i)})`, the quantity whose log
        Eq. 2 sums (unbiased covariance over the A rows; 0 for ``A = 1``). Differentiable."""
        bank = self.bias_bank
        centred = bank - bank.mean(0, keepdim=True)
        return self.bias_adjoint(centred).pow(2).sum() / max(bank.shape[0] - 1, 1)

    def forward(self, x: Tensor, manifold: Manifold | None = None, bias: Tensor | None = None) -> Tensor:
        if bias is not None:
            check_explicit_bias(bias, self, "bias")
            return self._explicit(x, bias)
        if manifold is not None:
            sel = ManifoldSelection(self.num_biases, manifold=manifold)
        else:
            sel = selection_for(self.route_key)
            if sel is None:
                raise RuntimeError(
                    f"{type(self).__name__} '{self.path}' does not know which manifold to use: call the "
                    "converted model (it picks the manifolds of a call), wrap the code in "
                    "`with qmm_plugin.use_manifold(model, i):`, or pass manifold= / bias=")
        if sel.biases is not None and self.path in sel.biases:
            return self._explicit(x, sel.biases[self.path])
        index = sel.resolve_index(x, self.path)
        if sel.spreads is not None and self.path not in sel.spreads:
            y, sel.spreads[self.path] = self.bank_forward_spread(x, index)
            return y
        return self.bank_forward(x, index)

    def _explicit(self, x: Tensor, bias: Tensor) -> Tensor:
        """Explicit bias rows: ``(C,)`` is shared by the batch, ``(B, C)`` is one row per sample."""
        rows = bias.expand(x.shape[0], self.bias_size) if bias.dim() == 1 else bias
        return self.rows_forward(x, rows)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        bank = state_dict.get(prefix + "bias_bank")
        if bank is not None and bank.dim() == 2 and bank.shape[0] != self.num_biases:
            raise RuntimeError(
                f"cannot load '{prefix}bias_bank': the checkpoint was made with A={bank.shape[0]} "
                f"manifolds but this model has A={self.num_biases}; convert the model with "
                f"num_biases={bank.shape[0]} before loading")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def initial_bank(bias: Tensor | None, like: Tensor, num_biases: int, std: float) -> Tensor:
    """A ``(A, C)`` bank whose rows start at ``bias`` (zeros when ``None``, shaped like ``like``)
    plus independent ``N(0, std^2)`` noise per row."""
    with torch.no_grad():
        base = bias if bias is not None else torch.zeros_like(like)
        bank = base.detach().expand(num_biases, -1).clone()
        if std > 0:
            bank.add_(torch.randn_like(bank) * std)
    return bank


class MultiBiasLinear(MultiBiasLayer):
    r"""``y = x W^T + a^{(i)}``: an ``nn.Linear`` whose bias is chosen per sample from a bank.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        num_biases: A, the number of manifolds (rows of the bias bank).

    Attributes:
        weight: ``(out, in)`` shared weight :math:`W_l` (the paper's :math:`U_l`).
        bias_bank: ``(A, out)`` bias bank; row ``i`` is :math:`a_l^{(i)}`.

    Example::

        >>> import torch
        >>> layer = MultiBiasLinear(3, 5, num_biases=4)
        >>> layer(torch.randn(2, 3), manifold=torch.tensor([0, 3])).shape
        torch.Size([2, 5])
    """

    def __init__(self, in_features: int, out_features: int, num_biases: int, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_int(in_features, "in_features", minimum=0)
        check_int(out_features, "out_features", minimum=1)
        check_int(num_biases, "num_biases", meaning="the number of manifolds A")
        self.in_features = in_features
        self.out_features = out_features
        self._init_routing(num_biases)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias_bank = nn.Parameter(torch.empty(num_biases, out_features, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation, with an independent bias draw per manifold."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
        nn.init.uniform_(self.bias_bank, -bound, bound)

    @classmethod
    def from_plain(cls, linear: nn.Linear, num_biases: int, init_std: float | None) -> MultiBiasLinear:
        """A layer that takes over ``linear``'s weight Parameter and starts every bank row at its bias.

        Each row gets independent ``N(0, std^2)`` noise; ``init_std=None`` uses
        ``std = 1/sqrt(3 * in_features)``, the spread of nn.Linear's own default bias
        initialisation. A ``bias=False`` layer starts from zero.
        """
        w = linear.weight
        std = (1.0 / math.sqrt(3 * max(linear.in_features, 1)) if init_std is None
               else check_real(init_std, "init_std", low=0.0, meaning="std of the per-manifold bias noise"))
        bank = initial_bank(linear.bias, w[:, 0], num_biases, std)
        layer = cls(linear.in_features, linear.out_features, num_biases, device="meta", dtype=w.dtype)
        layer.weight = w  # the same Parameter: optimisers and code holding it keep working
        layer.bias_bank = nn.Parameter(bank, requires_grad=linear.bias is None or linear.bias.requires_grad)
        return layer

    def to_plain(self, manifold: int) -> nn.Linear:
        """An ordinary ``nn.Linear`` with this layer's weight Parameter (the same object) and bias
        ``manifold`` (a new Parameter with the bank's ``requires_grad``)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=True, device="meta", dtype=self.weight.dtype)
        lin.weight = self.weight
        lin.bias = nn.Parameter(self.bias_bank.detach()[manifold].clone(), requires_grad=self.bias_bank.requires_grad)
        return lin

    def bank_forward(self, x: Tensor, index: Tensor) -> Tensor:
        return bank_linear(x, self.weight, self.bias_bank, index)

    def bank_forward_spread(self, x: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        return bank_linear_spread(x, self.weight, self.bias_bank, index)

    def rows_forward(self, x: Tensor, rows: Tensor) -> Tensor:
        return rows_linear(x, self.weight, rows)

    def bias_adjoint(self, c: Tensor) -> Tensor:
        """:math:`W^\\top c` for each row of ``c`` (``(N, out)`` -> ``(N, in)``)."""
        return c @ self.weight

    def bias_spread(self) -> Tensor:
        return bias_spread(self.weight, self.bias_bank)

    def bias_image(self, c: Tensor) -> Tensor:
        return c

    def bias_operator(self) -> Tensor:
        return self.weight

    def output_operator(self) -> Tensor:
        return self.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, num_biases={self.num_biases}"
