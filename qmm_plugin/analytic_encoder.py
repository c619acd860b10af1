r"""The explicit deep encoder :math:`h_E` of Proposition 1: a converted generator built from
invertible layers, inverted layer by layer in reverse order."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from ._generator import check_returned, frozen_eval, infer_z_dim, param_like
from .layer import MultiBiasLinear

if TYPE_CHECKING:
    from .convert import QuotientModel

__all__ = ["AnalyticEncoder", "analytic_encoder"]


class _InverseAffine(nn.Module):
    r"""``z = W^+ (y - b)``: the left inverse of ``y = W z + b`` (W full column rank)."""

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        w = weight.detach().double()
        self.register_buffer("pinv", torch.linalg.pinv(w).to(weight.dtype))  # (in, out)
        self.register_buffer("bias", bias.detach().clone())

    def forward(self, y: Tensor) -> Tensor:
        return (y - self.bias) @ self.pinv.t()


class _InverseLeakyReLU(nn.Module):
    def __init__(self, slope: Tensor, channel_dim: int = 1) -> None:
        super().__init__()
        self.register_buffer("slope", slope.detach().clone())
        self.channel_dim = channel_dim

    def forward(self, y: Tensor) -> Tensor:
        s = self.slope
        if s.numel() > 1:  # PReLU with one slope per channel (dim 1)
            s = s.view(-1, *([1] * (y.dim() - 2)))
        return torch.where(y >= 0, y, y / s)


class _InverseBatchNorm(nn.Module):
    def __init__(self, bn: nn.BatchNorm1d) -> None:
        super().__init__()
        std = torch.sqrt(bn.running_var.detach() + bn.eps)
        gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(std)
        beta = bn.bias.detach() if bn.bias is not None else torch.zeros_like(std)
        self.register_buffer("scale", std / gamma)
        self.register_buffer("shift", beta)
        self.register_buffer("mean", bn.running_mean.detach().clone())

    def forward(self, y: Tensor) -> Tensor:
        view = (-1,) + (1,) * (y.dim() - 2)
        return (y - self.shift.view(view)) * self.scale.view(view) + self.mean.view(view)


class _InverseSquash(nn.Module):
    """atanh / logit, with the input clamped just inside the open range."""

    def __init__(self, kind: Literal["tanh", "sigmoid"]) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, y: Tensor) -> Tensor:
        eps = torch.finfo(y.dtype).eps
        if self.kind == "tanh":
            return torch.atanh(y.clamp(-1 + eps, 1 - eps))
        return torch.logit(y, eps=eps)


class _Reshape(nn.Module):
    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, y: Tensor) -> Tensor:
        return y.reshape(y.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


class AnalyticEncoder(nn.Sequential):
    """The explicit deep encoder :math:`h_E` of Proposition 1: the generator's layers inverted in
    reverse order (see :func:`analytic_encoder`). ``forward(x: images) -> z``."""


def _invert_module(path: str, m: nn.Module, in_shape: tuple[int, ...]) -> nn.Module:
    name = f"'{path}' ({type(m).__name__})"
    if isinstance(m, (MultiBiasLinear, nn.Linear)):
        w = m.weight
        if w.shape[0] < w.shape[1] or torch.linalg.matrix_rank(w.detach().double()) < w.shape[1]:
            raise ValueError(f"analytic_encoder: layer {name} with weight {tuple(w.shape)} is not injective "
                             "(Proposition 1 needs full column rank: out >= in and rank = in)")
        if isinstance(m, MultiBiasLinear):
            bias = m.bias_bank.detach().mean(0)  # W^+ only sees the tangential part a_par
        else:
            bias = m.bias.detach() if m.bias is not None else torch.zeros_like(w[:, 0])
        return _InverseAffine(w, bias)
    if isinstance(m, nn.LeakyReLU):
        if m.negative_slope <= 0:
            raise ValueError(f"analytic_encoder: {name} has negative_slope={m.negative_slope} and is not "
                             "invertible; use a positive slope")
        return _InverseLeakyReLU(torch.tensor(m.negative_slope))
    if isinstance(m, nn.PReLU):
        if bool((m.weight <= 0).any()):
            raise ValueError(f"analytic_encoder: {name} has a slope <= 0 and is not invertible")
        return _InverseLeakyReLU(m.weight)
    if isinstance(m, nn.BatchNorm1d):
        if m.training or m.running_mean is None:
            raise ValueError(f"analytic_encoder: {name} normalises with batch statistics; put the model in "
                             "eval mode (q.eval()) with track_running_stats=True so the layer is a fixed affine map")
        if m.weight is not None and bool((m.weight == 0).any()):
            raise ValueError(f"analytic_encoder: {name} has a zero scale and is not invertible")
        return _InverseBatchNorm(m)
    if isinstance(m, nn.Tanh):
        return _InverseSquash("tanh")
    if isinstance(m, nn.Sigmoid):
        return _InverseSquash("sigmoid")
    if isinstance(m, (nn.Flatten, nn.Unflatten)):
        return _Reshape(in_shape)
    if isinstance(m, (nn.Identity, nn.Dropout)):
        return nn.Identity()
    raise _unsupported(path, m)


_INVERTIBLE = (MultiBiasLinear, nn.Linear, nn.LeakyReLU, nn.PReLU, nn.BatchNorm1d, nn.Tanh, nn.Sigmoid,
               nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout)


def _unsupported(path: str, m: nn.Module) -> ValueError:
    return ValueError(
        f"analytic_encoder: cannot invert module '{path}' ({type(m).__name__}); the explicit encoder of "
        "Proposition 1 supports Linear/MultiBiasLinear (full column rank), LeakyReLU/PReLU (positive slope), "
        "eval-mode BatchNorm1d, Tanh/Sigmoid, Flatten/Unflatten and Identity/Dropout. Use q.invert(x) (Eq. 3) "
        "for other generators")


def analytic_encoder(q: QuotientModel, *, z_dim: int | None = None, check: bool = True) -> AnalyticEncoder:
    r"""The explicit encoder :math:`h_E` of Proposition 1 for a converted generator.

    For generators built from Linear/MultiBiasLinear, LeakyReLU/PReLU, eval-mode BatchNorm1d,
    Tanh/Sigmoid and reshapes (Flatten/Unflatten), each layer is inverted in reverse order: a linear
    layer by :math:`z = W^+(y - \bar a)` (pseudo-inverse; :math:`W^+` sees only the tangential part
    of the bias, so one encoder inverts every manifold whose bias shares it — exactly so after
    :func:`~qmm_plugin.align_biases_`), activations by their inverses. The layers are found by
    recording which leaf modules one probe forward runs, in order; the first module that cannot be
    inverted is named in the error. The encoder is a snapshot of the current weights.

    Args:
        q: the converted generator (put BatchNorm in eval mode first: ``q.eval()``).
        z_dim: latent size (default as in :func:`invert`).
        check: verify :math:`h_E(f(z; \bar a)) \approx z` (mean biases) for random codes; an error then
            means the generator's ``forward`` applies operations outside modules (e.g.
            ``torch.tanh`` calls), which the encoder cannot see.
    """
    check_returned(q, "analytic_encoder")
    like = param_like(q)
    d = infer_z_dim(q, z_dim)
    paths = {m: p for p, m in q.model.named_modules()}
    trace: list[tuple[str, nn.Module, tuple[int, ...]]] = []

    def hook(m: nn.Module, args: tuple[object, ...], _out: object) -> None:
        shape = tuple(args[0].shape[1:]) if args and isinstance(args[0], Tensor) else ()
        trace.append((paths[m], m, shape))

    leaves = [m for m in q.model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with frozen_eval(q), torch.no_grad():  # no running-statistics update
            q(torch.zeros(2, d, device=like.device, dtype=like.dtype), manifold=0)
    finally:
        for h in handles:
            h.remove()
    for p, m, _ in trace:  # name the first unsupported module (in forward order) before any pseudo-inverse
        if not isinstance(m, _INVERTIBLE):
            raise _unsupported(p, m)
    inverses = [_invert_module(p, m, s) for p, m, s in trace]
    encoder = AnalyticEncoder(*reversed(inverses))
    if check:
        gen = torch.Generator().manual_seed(0)
        z = torch.randn(16, d, generator=gen, dtype=like.dtype).to(like.device)
        mean_biases = {p: m.bias_bank.detach().mean(0) for p, m in q.multi_bias_layers().items()}
        with frozen_eval(q), torch.no_grad():
            err = (encoder(q(z, biases=mean_biases)) - z).norm() / z.norm()
        if not bool(err < 1e-2):
            raise ValueError(
                f"analytic_encoder: the layer-wise inverse does not invert the generator (relative error "
                f"{float(err):.3g} with the mean biases): its forward applies operations outside modules or is not "
                "a chain of its modules; use q.invert(x) (Eq. 3) instead")
    return encoder
