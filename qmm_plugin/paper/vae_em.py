r"""Appendix C's EM for the Q-β-VAE: every decoder's likelihood from one forward, and one EM
iteration's objective.

* E-step: responsibilities :math:`\gamma^{(i)} = p^{(i)}(x|z) / \sum_j p^{(j)}(x|z)` (uniform π),
  computed at the current parameters and held fixed (detached);
* M-step objective: :math:`-\mathbb E_{q(z|x)}[\sum_i \gamma^{(i)} \log p^{(i)}(x|z)]
  + \beta\,\mathrm{KL}(q(z|x)\,\|\,p(z)) + \lambda R_{BA}` (Eq. 2).

Both steps use one evaluation of :math:`\log p^{(i)}(x|z)` for all A decoders
(:func:`decode_all_manifolds`). Likelihood: Bernoulli with the grey values in [0, 1] as soft targets.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..convert import QuotientModel
from .models import gaussian_kl, reparameterize

__all__ = ["Z_DIM", "decode_all_manifolds", "em_losses"]

#: Latent size of the MNIST β-VAE (Appendix B/C).
Z_DIM = 8


def decode_all_manifolds(q: QuotientModel, z: Tensor, return_regularizer: bool = False) -> Any:
    """Logits of every decoder for every z: ``(A, B, 1, 28, 28)``; row ``i`` = decoder ``i``.

    One forward of ``q`` on the stacked batch ``z.repeat(A, 1)`` with manifold index
    ``arange(A).repeat_interleave(B)`` (block ``i`` = manifold ``i``): one matmul per layer for all
    A decoders. ``return_regularizer=True`` returns ``(logits, R_BA)``, R_BA (Eq. 2) taken from
    the same forward.
    """
    a, b = q.num_biases, z.shape[0]
    index = torch.arange(a, device=z.device).repeat_interleave(b)
    out = q(z.repeat(a, 1), manifold=index, return_regularizer=return_regularizer)
    if not return_regularizer:
        return out.reshape(a, b, *out.shape[1:])
    logits, r_ba = out
    return logits.reshape(a, b, *logits.shape[1:]), r_ba


def em_losses(q: QuotientModel, encoder: nn.Module, x: Tensor, beta: float, lam: float = 0.0
              ) -> dict[str, Tensor]:
    """One EM iteration's terms for a batch ``x`` in [-1, 1] (Appendix C).

    Returns ``loss`` (the M-step objective, batch mean, plus ``lam * R_BA`` when ``lam > 0``),
    ``nll`` (−Σ γ log p), ``kl``, ``log_px_best`` (log-likelihood under the best decoder),
    ``gamma`` (A, B) and, when ``lam > 0``, ``r_ba`` (from the decoder's forward).
    """
    target = (x + 1) / 2
    mu, logvar = encoder(x)
    z = reparameterize(mu, logvar)
    if lam > 0:
        logits, r_ba = decode_all_manifolds(q, z, return_regularizer=True)  # (A, B, 1, 28, 28), R_BA
    else:
        logits, r_ba = decode_all_manifolds(q, z), None
    a, b = logits.shape[:2]
    log_p = -F.binary_cross_entropy_with_logits(
        logits, target.unsqueeze(0).expand_as(logits), reduction="none").reshape(a, b, -1).sum(-1)
    gamma = torch.softmax(log_p.detach(), dim=0)  # E-step: uniform π cancels; held fixed
    nll = -(gamma * log_p).sum(0)
    kl = gaussian_kl(mu, logvar)
    terms = {"loss": (nll + beta * kl).mean(), "nll": nll.mean(), "kl": kl.mean(),
             "log_px_best": log_p.detach().max(0).values.mean(), "gamma": gamma}
    if r_ba is not None:
        terms["r_ba"] = r_ba
        terms["loss"] = terms["loss"] + lam * r_ba
    return terms
