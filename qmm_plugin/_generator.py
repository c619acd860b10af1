"""Running a converted generator as a fixed function: the model :func:`~qmm_plugin.convert`
returned, frozen eval mode, its parameters' device and dtype, its latent size (shared by the Eq. 3
fit, derived-manifold sampling and Proposition 1's encoder)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from torch import Tensor, nn

from .layer import MultiBiasLinear
from .routing import ModelKey

if TYPE_CHECKING:
    from .convert import QuotientModel

__all__ = ["check_returned", "frozen_eval", "param_like", "infer_z_dim"]


def check_returned(q: object, fn: str) -> None:
    """Refuse anything but the :class:`~qmm_plugin.QuotientModel` that :func:`~qmm_plugin.convert`
    returned: its ``.model`` is a converted model (with a routing key), it is not one itself."""
    model = getattr(q, "model", None)
    if (not isinstance(getattr(q, "_qmm_key", None), ModelKey) or hasattr(type(q), "_qmm_base")
            or not hasattr(type(model), "_qmm_base")):
        hint = f"; on the converted model itself call model.{fn}(...)" if fn == "invert" else ""
        raise TypeError(f"{fn} expects the QuotientModel that qmm_plugin.convert returned, got {type(q).__name__}{hint}")


@contextmanager
def frozen_eval(q: nn.Module) -> Iterator[None]:
    """Eval mode and ``requires_grad=False`` everywhere; both restored on exit."""
    modes = [(m, m.training) for m in q.modules()]
    flags = [(p, p.requires_grad) for p in q.parameters()]
    try:
        q.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)


def param_like(q: nn.Module) -> Tensor:
    for p in q.parameters():
        return p
    raise ValueError("the model has no parameters")


def infer_z_dim(q: QuotientModel, z_dim: int | None) -> int:
    if z_dim is not None:
        if isinstance(z_dim, bool) or not isinstance(z_dim, int) or z_dim < 1:
            raise ValueError(f"z_dim must be a positive int, got {z_dim!r}")
        return z_dim
    declared = getattr(q.model, "z_dim", None)
    if isinstance(declared, int) and not isinstance(declared, bool):
        return declared
    first = next(iter(q.multi_bias_layers().values()))
    # a convolution first: its input channels (the probe then says whether (B, d) codes fit)
    return first.in_features if isinstance(first, MultiBiasLinear) else first.in_channels
