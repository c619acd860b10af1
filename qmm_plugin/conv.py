r"""Multi-bias convolutions: ``nn.Conv2d`` / ``nn.ConvTranspose2d`` with a per-channel bias bank.

The paper converts fully connected layers; its multi-bias construction applies unchanged to a
convolution, whose bias is one value per output channel broadcast over the output positions:
``y = W x + B a^{(i)}`` with :math:`W` the convolution as a linear operator (no bias) and
:math:`B` the broadcast of a ``C_out`` vector over the ``H_out x W_out`` positions. The bank is
``(A, C_out)``. Eq. 2's term of the layer is

.. math::

    \log\big(\operatorname{tr}\operatorname{cov}_i(W^\top B a^{(i)}) + \epsilon\big),

where :math:`W^\top` is the adjoint operator: a transposed convolution for a convolution and a
convolution for a transposed one, so :math:`W^\top B C` for the A centred rows is *one* call
with batch A (:meth:`_MultiBiasConv2d.bias_adjoint`). :math:`W` depends on the input size; the
layer records the spatial size of its last forward (``input_size``), so the regularizer needs
one forward first.

The layers subclass the plain ones (``isinstance(layer, nn.Conv2d)`` holds; ``.weight``, stride
and padding are where they were; ``.bias`` is ``None``), and :meth:`to_plain` gives the plain
layer of one manifold back. Zero padding only (``padding_mode='zeros'``, numeric or symmetric
``'same'``/``'valid'`` padding): other padding modes make the operator depend on the data layout
in a way the adjoint call does not cover, and are refused at conversion.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_real
from .layer import MultiBiasLayer, initial_bank

__all__ = ["MultiBiasConv2d", "MultiBiasConvTranspose2d", "DENSE_OPERATOR_MAX"]

#: :meth:`output_operator` (the exact tangential spread) builds the layer's operator as a dense
#: ``(n_out, n_in)`` float64 matrix; above this many entries it refuses with the sizes.
DENSE_OPERATOR_MAX = 1 << 25


def _numeric_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """The conv's padding as two ints (``'valid'`` -> 0; symmetric ``'same'`` -> d(k-1)/2)."""
    if not isinstance(conv.padding, str):
        return tuple(conv.padding)  # type: ignore[return-value]
    if conv.padding == "valid":
        return (0, 0)
    pads = []
    for k, d in zip(conv.kernel_size, conv.dilation, strict=True):
        total = d * (k - 1)
        if total % 2:
            raise ValueError(
                f"convert: a Conv2d with padding='same' and kernel {conv.kernel_size} pads unevenly; give it "
                "numeric padding (or an odd kernel) or exclude it")
        pads.append(total // 2)
    return tuple(pads)  # type: ignore[return-value]


class _MultiBiasConv2d(MultiBiasLayer):
    """What the two multi-bias convolutions share: the per-channel bank, the recorded sizes, the
    broadcast :math:`B`, the dense operator and the conversion back."""

    out_channels: int
    in_channels: int
    input_size: tuple[int, int] | None
    output_size: tuple[int, int] | None

    def _init_bank(self, num_biases: int, device: Any, dtype: Any) -> None:
        self._init_routing(num_biases)
        self.bias_bank = nn.Parameter(torch.zeros(num_biases, self.out_channels, device=device, dtype=dtype))
        self.input_size = None  # spatial size of the last forward's input (the operator's domain)
        self.output_size = None

    # ------------------------------------------------------------------------ per type
    def plain_forward(self, x: Tensor) -> Tensor:
        """:math:`W x`: the convolution without bias."""
        raise NotImplementedError

    def bias_adjoint(self, c: Tensor) -> Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------------ shared
    @classmethod
    def from_plain(cls, conv: nn.Module, num_biases: int, init_std: float | None) -> _MultiBiasConv2d:
        """A layer that takes over ``conv``'s weight Parameter; every bank row starts at its bias
        (zeros for ``bias=False``) plus ``N(0, std^2)`` noise, ``std = 1/sqrt(3 * fan_in)`` by
        default, the spread of the plain layer's own bias initialisation (``fan_in`` as PyTorch
        computes it from the weight: ``weight.shape[1] * k_h * k_w``)."""
        if conv.padding_mode != "zeros":
            raise ValueError(f"convert: a {type(conv).__name__} with padding_mode={conv.padding_mode!r} cannot be "
                             "converted (zero padding only); exclude it or use padding_mode='zeros'")
        w = conv.weight
        fan_in = w.shape[1] * math.prod(w.shape[2:])
        std = (1.0 / math.sqrt(3 * max(fan_in, 1)) if init_std is None
               else check_real(init_std, "init_std", low=0.0, meaning="std of the per-manifold bias noise"))
        layer = cls._empty_like(conv, num_biases)
        layer.weight = w  # the same Parameter: optimisers and code holding it keep working
        bank = initial_bank(conv.bias, w.new_empty(conv.out_channels), num_biases, std)
        layer.bias_bank = nn.Parameter(bank, requires_grad=conv.bias is None or conv.bias.requires_grad)
        return layer

    @classmethod
    def _empty_like(cls, conv: nn.Module, num_biases: int) -> _MultiBiasConv2d:
        raise NotImplementedError

    def _record(self, x: Tensor, y: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__} '{self.path}' needs a batched (B, C, H, W) input, got shape "
                             f"{tuple(x.shape)}; add the batch dimension with x.unsqueeze(0)")
        size, out = (x.shape[-2], x.shape[-1]), (y.shape[-2], y.shape[-1])
        if self.input_size != size or self.output_size != out:
            self.input_size, self.output_size = size, out

    def bank_forward(self, x: Tensor, index: Tensor) -> Tensor:
        y = self.plain_forward(x)
        self._record(x, y)
        return y + self.bias_bank.index_select(0, index).view(x.shape[0], -1, 1, 1)

    def rows_forward(self, x: Tensor, rows: Tensor) -> Tensor:
        y = self.plain_forward(x)
        self._record(x, y)
        return y + rows.view(rows.shape[0], -1, 1, 1)

    def _sizes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        if self.input_size is None or self.output_size is None:
            raise RuntimeError(
                f"{type(self).__name__} '{self.path}': its linear operator depends on the input size, which "
                "it learns from a forward; run the model once (any manifold) before asking for R_BA, the "
                "tangential spread, alignment or inversion")
        return self.input_size, self.output_size

    def bias_image(self, c: Tensor) -> Tensor:
        """:math:`B c`: each channel's bias at every output position, ``(N, C_out * H_out * W_out)``."""
        _, (h, w) = self._sizes()
        return c[:, :, None, None].expand(c.shape[0], c.shape[1], h, w).reshape(c.shape[0], -1)

    def bias_operator(self) -> Tensor:
        """:math:`B^\\top W` as a ``(C_out, C_in * H_in * W_in)`` matrix: one adjoint call on the
        identity of the channel space."""
        eye = torch.eye(self.bias_size, dtype=self.weight.dtype, device=self.weight.device)
        return self.bias_adjoint(eye).detach()

    def output_operator(self) -> Tensor:
        """:math:`W` as a dense ``(C_out H_out W_out, C_in H_in W_in)`` float64 matrix (the plain
        convolution applied to the identity), at most :data:`DENSE_OPERATOR_MAX` entries."""
        (hi, wi), (ho, wo) = self._sizes()
        n_in, n_out = self.in_channels * hi * wi, self.out_channels * ho * wo
        if n_in * n_out > DENSE_OPERATOR_MAX:
            raise ValueError(
                f"{type(self).__name__} '{self.path}': the exact tangential spread needs the layer's operator as a "
                f"dense ({n_out}, {n_in}) matrix, above qmm_plugin.conv.DENSE_OPERATOR_MAX={DENSE_OPERATOR_MAX} "
                "entries; monitor R_BA (ba_regularizer_terms) for this layer instead")
        eye = torch.eye(n_in, dtype=torch.float64, device=self.weight.device).view(n_in, self.in_channels, hi, wi)
        with torch.no_grad():
            cols = self._plain_forward_with(eye, self.weight.detach().double())
        return cols.reshape(n_in, n_out).t()

    def _plain_forward_with(self, x: Tensor, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def to_plain(self, manifold: int) -> nn.Module:
        """The plain layer with this layer's weight Parameter (the same object) and bias
        ``manifold`` (a new Parameter with the bank's ``requires_grad``)."""
        plain = self._plain_twin()
        plain.weight = self.weight
        plain.bias = nn.Parameter(self.bias_bank.detach()[manifold].clone(), requires_grad=self.bias_bank.requires_grad)
        return plain

    def _plain_twin(self) -> nn.Module:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return super().extra_repr().replace(", bias=False", "") + f", num_biases={self.num_biases}"


class MultiBiasConv2d(_MultiBiasConv2d, nn.Conv2d):
    r"""``y = conv2d(x, W) + a^{(i)}`` per channel: an ``nn.Conv2d`` whose bias is chosen per sample
    from a ``(A, C_out)`` bank. Adjoint :math:`W^\top`: ``conv_transpose2d`` with the same weight.

    Example::

        >>> import torch
        >>> layer = MultiBiasConv2d(3, 4, 3, num_biases=2, padding=1)
        >>> layer(torch.randn(2, 3, 5, 5), manifold=torch.tensor([0, 1])).shape
        torch.Size([2, 4, 5, 5])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], num_biases: int, *,
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, device: Any = None, dtype: Any = None) -> None:
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                           dilation=dilation, groups=groups, bias=False, device=device, dtype=dtype)
        self._init_bank(num_biases, device, dtype)

    @classmethod
    def _empty_like(cls, conv: nn.Module, num_biases: int) -> MultiBiasConv2d:
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, num_biases, stride=conv.stride,
                   padding=_numeric_padding(conv), dilation=conv.dilation, groups=conv.groups, device="meta",
                   dtype=conv.weight.dtype)

    def plain_forward(self, x: Tensor) -> Tensor:
        return self._plain_forward_with(x, self.weight)

    def _plain_forward_with(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)

    def bias_adjoint(self, c: Tensor) -> Tensor:
        """:math:`W^\\top B c` for ``(N, C_out)`` rows ``c``: one ``conv_transpose2d`` onto the
        input size of the last forward, flattened to ``(N, C_in * H_in * W_in)``."""
        (hi, wi), (ho, wo) = self._sizes()
        extra = []
        for n_in, n_out, s, p, d, k in zip((hi, wi), (ho, wo), self.stride, self.padding, self.dilation,
                                           self.kernel_size, strict=True):
            extra.append(n_in - ((n_out - 1) * s - 2 * p + d * (k - 1) + 1))  # rows the conv never read
        image = c[:, :, None, None].expand(c.shape[0], c.shape[1], ho, wo)
        return F.conv_transpose2d(image, self.weight, None, self.stride, self.padding, tuple(extra), self.groups,
                                  self.dilation).reshape(c.shape[0], -1)

    def _plain_twin(self) -> nn.Conv2d:
        return nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, bias=True, device="meta", dtype=self.weight.dtype)


class MultiBiasConvTranspose2d(_MultiBiasConv2d, nn.ConvTranspose2d):
    r"""``y = conv_transpose2d(x, W) + a^{(i)}`` per channel: an ``nn.ConvTranspose2d`` whose bias is
    chosen per sample from a ``(A, C_out)`` bank. Adjoint :math:`W^\top`: ``conv2d`` with the same
    weight. (``output_size=`` in the call is not supported; the layer's ``output_padding`` is used.)
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], num_biases: int, *,
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                 output_padding: int | tuple[int, int] = 0, groups: int = 1, dilation: int | tuple[int, int] = 1,
                 device: Any = None, dtype: Any = None) -> None:
        nn.ConvTranspose2d.__init__(self, in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                    output_padding=output_padding, groups=groups, bias=False, dilation=dilation,
                                    device=device, dtype=dtype)
        self._init_bank(num_biases, device, dtype)

    @classmethod
    def _empty_like(cls, conv: nn.Module, num_biases: int) -> MultiBiasConvTranspose2d:
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, num_biases, stride=conv.stride,
                   padding=conv.padding, output_padding=conv.output_padding, groups=conv.groups,
                   dilation=conv.dilation, device="meta", dtype=conv.weight.dtype)

    def plain_forward(self, x: Tensor) -> Tensor:
        return self._plain_forward_with(x, self.weight)

    def _plain_forward_with(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.conv_transpose2d(x, weight, None, self.stride, self.padding, self.output_padding, self.groups,
                                  self.dilation)

    def bias_adjoint(self, c: Tensor) -> Tensor:
        """:math:`W^\\top B c` for ``(N, C_out)`` rows ``c``: one ``conv2d``, flattened to
        ``(N, C_in * H_in * W_in)``."""
        _, (ho, wo) = self._sizes()
        image = c[:, :, None, None].expand(c.shape[0], c.shape[1], ho, wo)
        return F.conv2d(image, self.weight, None, self.stride, self.padding, self.dilation,
                        self.groups).reshape(c.shape[0], -1)

    def _plain_twin(self) -> nn.ConvTranspose2d:
        return nn.ConvTranspose2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                                  self.output_padding, self.groups, bias=True, dilation=self.dilation, device="meta",
                                  dtype=self.weight.dtype)
