r"""Manifold-class report: does each manifold account for one discrete class (paper Fig. 3)?

QMM's claim on MNIST is that every manifold :math:`i` (one bias row of every bank) draws one digit
class, while z varies the shared structure (slant, width). Given, for N samples, the manifold each
was drawn from and an independent classifier's class probabilities, :func:`manifold_class_report`
measures that claim:

* ``histogram[i, k]``: how many samples of manifold i the classifier puts in class k;
* ``purity``: the mean over manifolds of the majority class's share;
* ``nmi``: normalised mutual information :math:`I(M; K) / \tfrac12 (H(M) + H(K))` between the
  manifold index M and the predicted class K (0: independent, 1: a bijection);
* ``distinct_majorities``: how many different majority classes the manifolds have;
* ``confident``: share of samples classified with :math:`p > 0.9` (a digit-quality proxy);
* ``coverage``: the class histogram over all samples, as shares;
* ``diversity`` (when images are given): for each manifold, the mean pairwise L2 distance of its
  samples over that of real images of its majority class; near 0 means z stopped mattering.

Input contract: ``manifold`` ``(N,)`` int64 in ``[0, A)``; ``probs`` ``(N, K)`` rows of class
probabilities (softmax output); optional ``images`` ``(N, ...)`` and ``real_images`` ``(M, ...)``
with ``real_labels`` ``(M,)`` in the same value range.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

__all__ = [
    "ManifoldClassReport",
    "class_histogram",
    "normalized_mutual_information",
    "mean_pairwise_distance",
    "manifold_class_report",
    "sample_manifold_class_report",
]


def class_histogram(manifold: Tensor, labels: Tensor, num_manifolds: int, num_classes: int) -> Tensor:
    """``(A, K)`` int64 counts of (manifold, class) pairs."""
    if manifold.shape != labels.shape or manifold.ndim != 1:
        raise ValueError(f"manifold {tuple(manifold.shape)} and labels {tuple(labels.shape)} must be "
                         "equal-length 1-D tensors")
    for name, t, n in (("manifold", manifold, num_manifolds), ("labels", labels, num_classes)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
            raise ValueError(f"{name} values must lie in [0, {n}), got [{int(t.min())}, {int(t.max())}]")
    flat = manifold.long() * num_classes + labels.long()
    return torch.bincount(flat, minlength=num_manifolds * num_classes).reshape(num_manifolds, num_classes)


def _entropy(p: Tensor) -> float:
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def normalized_mutual_information(histogram: Tensor) -> float:
    r"""NMI of a joint count table: :math:`I(M;K) / \tfrac12(H(M) + H(K))` (arithmetic mean, as
    scikit-learn's default). 1.0 when both marginals are degenerate (nothing to tell apart)."""
    if histogram.ndim != 2 or histogram.sum() <= 0:
        raise ValueError("histogram must be a 2-D count table with at least one sample")
    joint = histogram.double() / histogram.sum()
    pm, pk = joint.sum(1), joint.sum(0)
    h_m, h_k = _entropy(pm), _entropy(pk)
    if h_m == 0.0 and h_k == 0.0:
        return 1.0
    mutual = h_m + h_k - _entropy(joint.flatten())
    return max(0.0, mutual) / (0.5 * (h_m + h_k))


def mean_pairwise_distance(x: Tensor) -> float:
    """Mean L2 distance over all unordered pairs of rows of ``x`` flattened to ``(n, d)``."""
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 samples for a pairwise distance, got {x.shape[0]}")
    flat = x.reshape(x.shape[0], -1).double()
    d = torch.cdist(flat, flat)
    n = flat.shape[0]
    return float(d.sum() / (n * (n - 1)))


@dataclass(frozen=True)
class ManifoldClassReport:
    """The numbers of :func:`manifold_class_report` (see the module docstring)."""

    histogram: Tensor
    purity: float
    nmi: float
    distinct_majorities: int
    confident: float
    coverage: Tensor
    diversity: Tensor | None = field(default=None)

    @property
    def majority(self) -> Tensor:
        """``(A,)`` majority class of each manifold."""
        return self.histogram.argmax(1)

    def row_labels(self) -> list[str]:
        """One grid-row label per manifold: ``"i: majority share"``, e.g. ``"3: 7 84%"``."""
        return [f"{i}: {int(row.argmax())} {float(row.max()) / max(1, int(row.sum())):.0%}"
                for i, row in enumerate(self.histogram)]

    def summary(self) -> dict[str, Any]:
        """Scalars and per-manifold lists, JSON-ready."""
        out: dict[str, Any] = {
            "nmi": round(self.nmi, 4),
            "purity": round(self.purity, 4),
            "distinct_majorities": self.distinct_majorities,
            "confident": round(self.confident, 4),
            "min_class_share": round(float(self.coverage.min()), 4),
            "majority": self.majority.tolist(),
            "coverage": [round(float(c), 4) for c in self.coverage],
        }
        if self.diversity is not None:
            out["diversity"] = round(float(self.diversity.nanmean()), 4)
            out["diversity_per_manifold"] = [round(float(d), 4) for d in self.diversity]
        return out

    def scalars(self, prefix: str = "report/") -> dict[str, float | int]:
        """The scalar entries of :meth:`summary`, keys prefixed (one row of a metrics log)."""
        return {prefix + k: v for k, v in self.summary().items() if not isinstance(v, list)}

    def format(self) -> str:
        """A plain-text table: one line per manifold, then the scalars."""
        lines = ["manifold  majority  share  " + " ".join(f"{k:>4d}" for k in range(self.histogram.shape[1]))]
        for i, row in enumerate(self.histogram):
            n = int(row.sum())
            share = float(row.max()) / n if n else float("nan")
            lines.append(f"{i:>8d}  {int(row.argmax()):>8d}  {share:5.2f}  " + " ".join(f"{int(c):>4d}" for c in row))
        return "\n".join([*lines, self.headline()])

    def headline(self) -> str:
        """The scalars on one line (the last line of :meth:`format`)."""
        s = self.summary()
        return (f"NMI {s['nmi']:.3f} | purity {s['purity']:.3f} | distinct majority classes "
                f"{s['distinct_majorities']} | confident (p>0.9) {s['confident']:.3f} | smallest class "
                f"share {s['min_class_share']:.3f}"
                + (f" | within-manifold diversity {s['diversity']:.3f}" if "diversity" in s else ""))


def manifold_class_report(manifold: Tensor, probs: Tensor, num_manifolds: int, *,
                          images: Tensor | None = None, real_images: Tensor | None = None,
                          real_labels: Tensor | None = None, confidence: float = 0.9) -> ManifoldClassReport:
    """Measure how manifolds map to classes (see the module docstring for every number).

    Args:
        manifold: ``(N,)`` manifold index of each sample, in ``[0, num_manifolds)``.
        probs: ``(N, K)`` class probabilities of each sample from an independent classifier.
        num_manifolds: A.
        images, real_images, real_labels: for ``diversity`` (all three or none).
        confidence: the probability above which a sample counts as confidently classified.
    """
    if manifold.ndim != 1 or manifold.numel() == 0:
        raise ValueError(f"manifold must be a non-empty 1-D tensor of indices, got shape {tuple(manifold.shape)}")
    if probs.ndim != 2 or probs.shape[0] != manifold.shape[0]:
        raise ValueError(f"probs must be (N, K) with N = {manifold.shape[0]} samples, got {tuple(probs.shape)}")
    if not torch.isfinite(probs).all() or bool((probs < 0).any()) or not torch.allclose(
            probs.sum(1).double(), torch.ones(probs.shape[0], dtype=torch.float64), atol=1e-3):
        raise ValueError("probs must hold finite class probabilities, each row summing to 1 (apply softmax "
                         "to the classifier's logits)")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    given = [t is not None for t in (images, real_images, real_labels)]
    if any(given) and not all(given):
        raise ValueError("diversity needs images, real_images and real_labels together")
    num_classes = probs.shape[1]
    labels = probs.argmax(1)
    hist = class_histogram(manifold.cpu(), labels.cpu(), num_manifolds, num_classes)
    sizes = hist.sum(1)
    used = sizes > 0
    purity = float((hist.max(1).values[used].double() / sizes[used]).mean())
    majority = hist.argmax(1)
    diversity = None
    if images is not None:
        assert real_images is not None and real_labels is not None
        if images.shape[0] != manifold.shape[0]:
            raise ValueError(f"images must have one row per sample ({manifold.shape[0]}), got {images.shape[0]}")
        div = torch.full((num_manifolds,), float("nan"), dtype=torch.float64)
        for i in range(num_manifolds):
            own = images[manifold.cpu() == i]
            real = real_images[real_labels.cpu() == majority[i]]
            if own.shape[0] >= 2 and real.shape[0] >= 2:
                div[i] = mean_pairwise_distance(own) / mean_pairwise_distance(real)
        diversity = div
    return ManifoldClassReport(
        histogram=hist,
        purity=purity,
        nmi=normalized_mutual_information(hist),
        distinct_majorities=int(majority[used].unique().numel()),
        confident=float((probs.max(1).values > confidence).double().mean()),
        coverage=hist.sum(0).double() / hist.sum(),
        diversity=diversity,
    )


@torch.no_grad()
def sample_manifold_class_report(sample: Callable[[int, int], Tensor], classifier: torch.nn.Module,
                                 num_manifolds: int, per_manifold: int, *, real_images: Tensor | None = None,
                                 real_labels: Tensor | None = None, num_classes: int = 10,
                                 batch_size: int = 500) -> ManifoldClassReport:
    """Draw ``per_manifold`` samples of every manifold with ``sample(i, n) -> (n, ...)`` images and
    report on them with ``classifier`` (images -> ``(n, K)`` logits).

    A classifier whose output is not ``(n, num_classes)`` logits is refused."""
    if per_manifold < 2:
        raise ValueError(f"per_manifold must be >= 2, got {per_manifold}")
    images, manifold, probs = [], [], []
    for i in range(num_manifolds):
        x = sample(i, per_manifold).cpu()
        logits = torch.cat([classifier(x[j:j + batch_size]) for j in range(0, x.shape[0], batch_size)])
        if logits.shape != (x.shape[0], num_classes):
            raise ValueError(f"classifier must map {x.shape[0]} images to ({x.shape[0]}, {num_classes}) logits "
                             f"(num_classes={num_classes}), got {tuple(logits.shape)}; pass the right "
                             "num_classes or a classifier with that many outputs")
        images.append(x)
        probs.append(logits.float().softmax(1))
        manifold.append(torch.full((x.shape[0],), i, dtype=torch.long))
    return manifold_class_report(torch.cat(manifold), torch.cat(probs), num_manifolds,
                                 images=torch.cat(images) if real_images is not None else None,
                                 real_images=real_images, real_labels=real_labels)

