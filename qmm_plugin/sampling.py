r"""Derived manifolds (Fig. 5, 6): fresh samples with an inverted image's biases and new codes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ._generator import frozen_eval
from .inversion import Inversion, check_owner

if TYPE_CHECKING:
    from .convert import QuotientModel

__all__ = ["sample_manifold"]


def sample_manifold(q: QuotientModel, inv: Inversion, n: int, *, generator: torch.Generator | None = None
                    ) -> Tensor:
    """Draw ``n`` fresh samples on each image's derived manifold (Fig. 5, 6): same biases
    ``inv.biases``, new codes :math:`z \\sim \\mathcal N(0, I)`.

    Runs without gradient, in eval mode (restored afterwards) so that BatchNorm does not couple
    the samples. Returns ``(B, n, *image_shape)``.
    """
    check_owner(q, inv)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1 (samples per derived manifold), got {n!r}")
    b, d = inv.z.shape
    z = torch.randn(b * n, d, generator=generator, dtype=inv.z.dtype,
                    device=generator.device if generator is not None else "cpu").to(inv.z.device)
    biases = {p: v.repeat_interleave(n, 0) for p, v in inv.biases.items()}
    with frozen_eval(q), torch.no_grad():
        out = q(z, biases=biases)
    return out.view(b, n, *out.shape[1:])
