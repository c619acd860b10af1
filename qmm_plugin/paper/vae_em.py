r"""Appendix C's EM for the Q-β-VAE: every decoder's likelihood from one forward, and one EM
iteration's objective.

* E-step: responsibilities :math:`\gamma^{(i)} = p^{(i)}(x|z) / \sum_j p^{(j)}(x|z)` (uniform π),
  computed at the current parameters and held fixed (detached);
* M-step objective: :math:`-\mathbb E_{q(z|x)}[\sum_i \gamma^{(i)} \log p^{(i)}(x|z)]
  + \beta\,\mathrm{KL}(q(z|x)\,\|\,p(z)) + \lambda R_{BA}` (Eq. 2).

Both steps use one evaluation of :math:`\log p^{(i)}(x|z)` for all A decoders
(:func:`decode_all_manifolds`). Likelihood: Bernoulli with the grey values in [0, 1] as soft targets.

Symmetric start: the A decoders share every weight and start with near-identical biases, so the
E-step's γ hardly depends on the image and every decoder gets nearly the same M-step gradient.
:func:`kmeans` gives a data-dependent start instead (as a Gaussian mixture is commonly started
from k-means, e.g. scikit-learn's ``GaussianMixture(init_params="kmeans")``): for a warm-up,
``em_losses(..., gamma=one_hot(cluster))`` replaces the E-step by each image's cluster, so
decoder i is fitted to cluster i; the EM then continues from decoders that already differ.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..convert import QuotientModel
from .models import gaussian_kl, reparameterize

__all__ = ["Z_DIM", "decode_all_manifolds", "em_losses", "kmeans"]

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


def em_losses(q: QuotientModel, encoder: nn.Module, x: Tensor, beta: float, lam: float = 0.0,
              gamma: Tensor | None = None) -> dict[str, Tensor]:
    """One EM iteration's terms for a batch ``x`` in [-1, 1] (Appendix C).

    ``gamma``: ``(A, B)`` responsibilities to use instead of the E-step (each column summing to
    1, e.g. one-hot k-means clusters for a warm start); ``None`` computes them (the E-step).

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
    if gamma is None:
        gamma = torch.softmax(log_p.detach(), dim=0)  # E-step: uniform π cancels; held fixed
    elif gamma.shape != (a, b) or not torch.allclose(gamma.sum(0).double(), torch.ones(b, dtype=torch.float64)):
        raise ValueError(f"gamma must be ({a}, {b}) responsibilities (A decoders x batch), each column summing "
                         f"to 1, got shape {tuple(gamma.shape)}; pass None for the E-step")
    else:
        gamma = gamma.to(log_p.dtype)
    nll = -(gamma * log_p).sum(0)
    kl = gaussian_kl(mu, logvar)
    terms = {"loss": (nll + beta * kl).mean(), "nll": nll.mean(), "kl": kl.mean(),
             "log_px_best": log_p.detach().max(0).values.mean(), "gamma": gamma}
    if r_ba is not None:
        terms["r_ba"] = r_ba
        terms["loss"] = terms["loss"] + lam * r_ba
    return terms


def kmeans(points: Tensor, k: int, *, iters: int = 30, seed: int = 0) -> Tensor:
    """Lloyd's k-means of the rows of ``points`` (flattened to ``(N, D)``), seeded by k-means++
    (``torch.Generator`` seeded with ``seed``); returns the ``(N,)`` int64 cluster of each row.

    ``iters`` Lloyd iterations at most (it stops early when no assignment changes). A cluster that
    loses all its points keeps its centre.
    """
    x = points.reshape(points.shape[0], -1).float()
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"kmeans: k must lie in [1, {n}] (the number of points), got {k}")
    gen = torch.Generator().manual_seed(seed)
    centres = x[torch.randint(0, n, (1,), generator=gen)]
    d2 = torch.cdist(x, centres).squeeze(1).pow(2)
    for _ in range(1, k):  # k-means++: the next centre drawn with probability ∝ squared distance
        nxt = x[torch.multinomial(d2 / d2.sum(), 1, generator=gen)]
        centres = torch.cat([centres, nxt])
        d2 = torch.minimum(d2, torch.cdist(x, nxt).squeeze(1).pow(2))
    labels = torch.cdist(x, centres).argmin(1)
    for _ in range(iters):
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)
        new = torch.cdist(x, centres).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
    return labels
