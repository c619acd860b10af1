"""The shared-weight, A-bias linear layer (paper Sec. 4: one weight, a bank of manifold biases).

A :class:`MultiBiasLinear` keeps ``.weight`` exactly where an ``nn.Linear`` keeps it (same shape
``(out, in)``, same name), so code that reads ``layer.weight`` keeps working, and replaces the
single ``.bias`` by a *bias bank* ``.bias_bank`` of shape ``(A, out)``: row ``i`` is the bias
:math:`a^{(i)}` of manifold (generator) ``i``.

Which row a sample uses is decided by the :class:`ManifoldSelection` that a
:class:`~qmm_plugin.QuotientModel` shares with all its layers for the duration of one forward
call, so the user's own ``forward`` runs unchanged. A layer can also be called on its own with
``manifold=`` or ``bias=``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import check_int, check_real
from .ops import bank_linear, bank_linear_spread, rows_linear

__all__ = ["MultiBiasLinear", "ManifoldSelection", "Manifold", "check_explicit_bias"]

#: A manifold choice: one index for the whole batch, or a ``(B,)`` integer tensor.
Manifold = int | Tensor


@dataclass
class ManifoldSelection:
    """Which bias every converted layer uses during one forward call.

    ``manifold``: ``None`` (sample ``i ~ Uniform{0..A-1}`` per sample, drawn once per call and
    shared by every layer), an ``int`` or a ``(B,)`` integer tensor. ``biases``: explicit bias
    rows per layer path. ``index`` is the resolved ``(B,)`` index, filled by the first layer that
    runs (the batch size is only known there). ``spreads``: when a dict (the call asked for the
    regularizer), each bank layer's first call stores its bias spread (Eq. 2) there by path,
    computed with its output (:func:`~qmm_plugin.ops.bank_linear_spread`).
    """

    num_biases: int
    manifold: Manifold | None = None
    biases: dict[str, Tensor] | None = None
    index: Tensor | None = field(default=None)
    spreads: dict[str, Tensor] | None = None

    def resolve_index(self, x: Tensor, path: str) -> Tensor:
        """The ``(B,)`` manifold index for the layer at ``path`` whose input is ``x`` (``B = x.shape[0]``)."""
        index = self.index
        batch = x.shape[0]
        first = index is None
        if index is None:
            if self.manifold is None:
                index = torch.randint(0, self.num_biases, (batch,), device=x.device)
            elif isinstance(self.manifold, int):
                index = torch.full((batch,), self.manifold, dtype=torch.long, device=x.device)
            else:
                index = self.manifold
            self.index = index
        if index.shape[0] != batch:
            raise ValueError(
                f"layer '{path}' got a batch of {batch} samples but the manifold index has "
                f"{index.shape[0]} entries; pass manifold= with one entry per sample (shape ({batch},)) "
                f"or an int for the whole batch")
        # .is_cpu first (~0.07 us) instead of building two torch.device objects (~1.6 us) on every
        # layer call; the full comparison only runs off the CPU
        if index.is_cpu != x.is_cpu or (not x.is_cpu and index.device != x.device):
            raise ValueError(
                f"layer '{path}': the manifold index is on {index.device} but the input is on "
                f"{x.device}; move the index with .to({str(x.device)!r})")
        if first and isinstance(self.manifold, Tensor) and batch > 0 and not torch.compiler.is_compiling():
            lo, hi = int(index.min()), int(index.max())
            if lo < 0 or hi >= self.num_biases:
                raise ValueError(
                    f"manifold index out of range: values span {lo}..{hi} but this model has "
                    f"A={self.num_biases} manifolds (valid 0..{self.num_biases - 1})")
        return index


def check_explicit_bias(bias: object, weight: Tensor, name: str) -> None:
    """Refuse an explicit bias that the layer with ``weight`` (``(out, in)``) cannot add: not a
    tensor, not ``(out,)`` or ``(B, out)``, another dtype or another device than the weight."""
    out = weight.shape[0]
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


class MultiBiasLinear(nn.Module):
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
        self.num_biases = num_biases
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias_bank = nn.Parameter(torch.empty(num_biases, out_features, device=device, dtype=dtype))
        self.path = ""  # set by convert(): this layer's path in the wrapped model
        self.selection: ManifoldSelection | None = None  # shared with the QuotientModel
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation, with an independent bias draw per manifold."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
        nn.init.uniform_(self.bias_bank, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, num_biases: int, init_std: float | None) -> MultiBiasLinear:
        """A layer that takes over ``linear``'s weight Parameter and starts every bank row at its bias.

        Each row gets independent ``N(0, std^2)`` noise; ``init_std=None`` uses
        ``std = 1/sqrt(3 * in_features)``, the spread of nn.Linear's own default bias
        initialisation. A ``bias=False`` layer starts from zero.
        """
        w = linear.weight
        std = (1.0 / math.sqrt(3 * max(linear.in_features, 1)) if init_std is None
               else check_real(init_std, "init_std", low=0.0, meaning="std of the per-manifold bias noise"))
        with torch.no_grad():
            base = linear.bias if linear.bias is not None else torch.zeros_like(w[:, 0])
            bank = base.detach().expand(num_biases, -1).clone()
            if std > 0:
                bank.add_(torch.randn_like(bank) * std)
        layer = cls(linear.in_features, linear.out_features, num_biases, device="meta", dtype=w.dtype)
        layer.weight = w  # the same Parameter: optimisers and code holding it keep working
        layer.bias_bank = nn.Parameter(bank, requires_grad=linear.bias is None or linear.bias.requires_grad)
        return layer

    def to_linear(self, manifold: int) -> nn.Linear:
        """An ordinary ``nn.Linear`` carrying this layer's weight and bias ``manifold``."""
        lin = nn.Linear(self.in_features, self.out_features, bias=True,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            lin.bias.copy_(self.bias_bank[manifold])
        return lin

    def forward(self, x: Tensor, manifold: Manifold | None = None, bias: Tensor | None = None) -> Tensor:
        if bias is not None:
            check_explicit_bias(bias, self.weight, "bias")
            return self._explicit(x, bias)
        sel = self.selection
        if manifold is not None:
            sel = ManifoldSelection(self.num_biases, manifold=manifold)
        elif sel is None:
            raise RuntimeError(
                f"MultiBiasLinear '{self.path}' does not know which manifold to use: call it through "
                "the QuotientModel returned by qmm_plugin.convert, or pass manifold= / bias=")
        if sel.biases is not None and self.path in sel.biases:
            return self._explicit(x, sel.biases[self.path])
        index = sel.resolve_index(x, self.path)
        if sel.spreads is not None and self.path not in sel.spreads:
            y, sel.spreads[self.path] = bank_linear_spread(x, self.weight, self.bias_bank, index)
            return y
        return bank_linear(x, self.weight, self.bias_bank, index)

    def _explicit(self, x: Tensor, bias: Tensor) -> Tensor:
        """Explicit bias rows: ``(out,)`` is shared by the batch, ``(B, out)`` is one row per sample."""
        rows = bias.expand(x.shape[0], self.out_features) if bias.dim() == 1 else bias
        return rows_linear(x, self.weight, rows)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        bank = state_dict.get(prefix + "bias_bank")
        if bank is not None and bank.dim() == 2 and bank.shape[0] != self.num_biases:
            raise RuntimeError(
                f"cannot load '{prefix}bias_bank': the checkpoint was made with A={bank.shape[0]} "
                f"manifolds but this model has A={self.num_biases}; convert the model with "
                f"num_biases={bank.shape[0]} before loading")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, num_biases={self.num_biases}"
