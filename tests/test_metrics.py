"""Fréchet distance (closed forms, scipy), MNIST classifier / MNIST-FID, InceptionFID plumbing,
and the Appendix D disentanglement score."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from qmm_plugin.paper.metrics import (
    DEFAULT_MAX_STRENGTH,
    MNISTFID,
    InceptionFID,
    MNISTClassifier,
    apply_transform,
    disentanglement_score,
    disentanglement_score_from_codes,
    frechet_distance,
    frechet_distance_from_stats,
    load_mnist_classifier,
)

def _random_rotation(d: int, gen: torch.Generator) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


# ------------------------------------------------------------------------------ Fréchet distance
def test_frechet_diagonal_closed_form() -> None:
    gen = torch.Generator().manual_seed(0)
    d = 6
    mu1, mu2 = (torch.randn(d, generator=gen, dtype=torch.float64) for _ in range(2))
    sd1, sd2 = (torch.rand(d, generator=gen, dtype=torch.float64) + 0.1 for _ in range(2))
    expected = float(((mu1 - mu2) ** 2).sum() + ((sd1 - sd2) ** 2).sum())
    got = frechet_distance_from_stats(mu1, torch.diag(sd1**2), mu2, torch.diag(sd2**2))
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert frechet_distance_from_stats(mu1, torch.diag(sd1**2), mu1, torch.diag(sd1**2)) == pytest.approx(0, abs=1e-12)


def test_frechet_rotated_closed_form() -> None:
    # Commuting covariances S_k = R D_k Rᵀ: distance = ||Δμ||² + Σ (sqrt(d1) - sqrt(d2))².
    gen = torch.Generator().manual_seed(1)
    d = 10
    rot = _random_rotation(d, gen)
    d1 = torch.rand(d, generator=gen, dtype=torch.float64) * 3
    d2 = torch.rand(d, generator=gen, dtype=torch.float64) * 3
    mu1 = torch.randn(d, generator=gen, dtype=torch.float64)
    mu2 = torch.randn(d, generator=gen, dtype=torch.float64)
    s1, s2 = rot @ torch.diag(d1) @ rot.T, rot @ torch.diag(d2) @ rot.T
    expected = float(((mu1 - mu2) ** 2).sum() + ((d1.sqrt() - d2.sqrt()) ** 2).sum())
    assert frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    # float32 inputs give the same answer (float64 math inside)
    assert frechet_distance_from_stats(mu1.float(), s1.float(), mu2.float(), s2.float()) == pytest.approx(
        expected, rel=1e-5
    )


def test_frechet_against_scipy() -> None:
    import numpy as np  # both in the test extra: this reference always runs
    from scipy import linalg
    gen = torch.Generator().manual_seed(2)
    d = 12
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    b = torch.randn(d, d // 2, generator=gen, dtype=torch.float64)
    s1, s2 = a @ a.T, b @ b.T  # s2 rank-deficient (PSD, singular)
    mu1, mu2 = torch.randn(d, generator=gen, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    covmean = linalg.sqrtm(s1.numpy() @ s2.numpy())
    covmean = np.real(covmean)
    ref = float(((mu1 - mu2) ** 2).sum()) + float(np.trace(s1.numpy()) + np.trace(s2.numpy()) - 2 * np.trace(covmean))
    assert frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6)


def test_frechet_from_samples_matches_stats() -> None:
    gen = torch.Generator().manual_seed(3)
    fa = torch.randn(300, 5, generator=gen, dtype=torch.float64)
    fb = torch.randn(200, 5, generator=gen, dtype=torch.float64) * 2 + 1
    ref = frechet_distance_from_stats(fa.mean(0), torch.cov(fa.T), fb.mean(0), torch.cov(fb.T))
    assert frechet_distance(fa, fb) == pytest.approx(ref, rel=1e-10)
    assert frechet_distance(fa, fa) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError):
        frechet_distance(fa[:1], fb)


# ------------------------------------------------------------------------- classifier, MNIST-FID
def _mnist_test_images() -> tuple[Tensor, Tensor]:
    """The first 2,000 MNIST test digits, embedded in the package (``load_mnist(None, "test")``)."""
    from qmm_plugin.paper.data import load_mnist

    return load_mnist(None, "test")


@pytest.fixture(scope="module")
def mnist_test() -> tuple[Tensor, Tensor]:
    return _mnist_test_images()


@pytest.fixture(scope="module")
def classifier() -> MNISTClassifier:
    return load_mnist_classifier()


def test_shipped_classifier_accuracy(mnist_test, classifier) -> None:
    x, y = mnist_test
    with torch.no_grad():
        pred = classifier(x.float().unsqueeze(1) / 127.5 - 1.0).argmax(1)
    acc = (pred == y).double().mean().item()
    assert acc >= 0.985, acc
    size = sum(p.numel() * p.element_size() for p in classifier.state_dict().values())
    assert size < 500_000


def test_mnist_fid_real_vs_real_much_smaller_than_noise(mnist_test, classifier) -> None:
    x, _ = mnist_test
    imgs = x[:1200].float().unsqueeze(1) / 127.5 - 1.0
    half = imgs.shape[0] // 2
    fid = MNISTFID(classifier)
    fid.update(imgs[:half], real=True)
    fid.update(imgs[half:], real=False)
    real_real = fid.compute()
    fid.reset()
    fid.update(imgs[:half], real=True)
    fid.update(torch.rand(half, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1, real=False)
    real_noise = fid.compute()
    assert real_real >= 0.0
    assert real_noise > 20 * real_real, (real_real, real_noise)
    fid.reset()
    with pytest.raises(RuntimeError):
        fid.compute()


def test_mnist_fid_streaming_equals_batch(classifier) -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(64, 1, 28, 28, generator=gen) * 2 - 1
    b = torch.rand(48, 28, 28, generator=gen) * 2 - 1  # (B, 28, 28) accepted too
    one = MNISTFID(classifier)
    one.update(a, real=True)
    one.update(b, real=False)
    many = MNISTFID(classifier, batch_size=16)
    for chunk in a.split(20):
        many.update(chunk, real=True)
    for chunk in b.split(7):
        many.update(chunk, real=False)
    assert many.compute() == pytest.approx(one.compute(), rel=1e-6, abs=1e-6)
    with pytest.raises(ValueError):
        one.update(torch.zeros(2, 3, 28, 28), real=True)


# ------------------------------------------------------------------------------ InceptionFID
class _FakeInception(nn.Module):
    def forward(self, x: Tensor, return_features: bool = False) -> Tensor:
        # per-channel mean and spread: (B, 6)
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def test_inception_fid_missing_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="never downloads"):
        InceptionFID(tmp_path / "nope.pt")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_inception_fid_plumbing(tmp_path) -> None:
    path = tmp_path / "fake_inception.pt"
    torch.jit.script(_FakeInception()).save(str(path))
    gen = torch.Generator().manual_seed(0)
    real = torch.rand(40, 1, 16, 16, generator=gen) * 2 - 1
    fake = torch.rand(30, 3, 16, 16, generator=gen) * 1.6 - 0.8
    metric = InceptionFID(path, resize=None, batch_size=16)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    ref_model = _FakeInception()
    fa = ref_model((real.expand(-1, 3, -1, -1) + 1) * 127.5)
    fb = ref_model((fake + 1) * 127.5)
    assert metric.compute() == pytest.approx(frechet_distance(fa, fb), rel=1e-5)
    resized = InceptionFID(path, resize=32)
    resized.update(real, real=True)
    resized.update(fake, real=False)
    assert math.isfinite(resized.compute())


# -------------------------------------------------------------------------- disentanglement
def _blobs(n: int, seed: int = 0) -> Tensor:
    """Synthetic 'digits': elongated Gaussian blobs in [-1, 1] on a -1 background."""
    gen = torch.Generator().manual_seed(seed)
    v, u = torch.meshgrid(torch.linspace(-1, 1, 28), torch.linspace(-1, 1, 28), indexing="ij")
    cx, cy = (torch.rand(2, n, 1, 1, generator=gen) - 0.5) * 0.3
    sx = 0.08 + 0.12 * torch.rand(n, 1, 1, generator=gen)
    sy = 0.2 + 0.15 * torch.rand(n, 1, 1, generator=gen)
    img = torch.exp(-((u - cx) ** 2) / (2 * sx**2) - (v - cy) ** 2 / (2 * sy**2))
    return (2 * img - 1).unsqueeze(1)


@pytest.mark.parametrize("transform", ["slant", "width"])
def test_transform_identity_at_zero(transform) -> None:
    x = _blobs(4)
    torch.testing.assert_close(apply_transform(x, transform, 0.0), x, atol=1e-5, rtol=0)


def test_transform_directions() -> None:
    # a vertical bar: slant moves the top left and the bottom right; width widens it
    x = torch.full((1, 1, 28, 28), -1.0)
    x[..., :, 13:15] = 1.0
    cols = torch.arange(28, dtype=torch.float32)

    def com(img: Tensor, rows: slice) -> float:
        w = (img[0, 0, rows] + 1).sum(0)
        return float((w * cols).sum() / w.sum())

    s = apply_transform(x, "slant", 0.3)
    assert com(s, slice(0, 5)) < 13.5 - 2 and com(s, slice(23, 28)) > 13.5 + 2
    w = apply_transform(x, "width", 0.5)
    assert ((w + 1) > 0.5).sum() > ((x + 1) > 0.5).sum() * 1.3
    assert w.min() >= -1 - 1e-6 and w.max() <= 1 + 1e-6  # background fill stays -1
    with pytest.raises(ValueError):
        apply_transform(x, "height", 0.1)  # type: ignore[arg-type]


def test_score_from_codes_known_ratio() -> None:
    # codes[n, s] = R @ [a·t_s, b·v_s, 0] + c_n with t ⊥ v, both zero-mean over s:
    # eigenvalues ∝ a² Σt², b² Σv²  ->  ratio = a² Σt² / (b² Σv²), invariant to R and c_n.
    t = torch.linspace(-1, 1, 11, dtype=torch.float64)
    v = t**2 - (t**2).mean()
    a, b = 3.0, 2.0
    base = torch.stack([a * t, b * v, torch.zeros_like(t)], dim=1)  # (S, 3)
    rot = _random_rotation(3, torch.Generator().manual_seed(0))
    offsets = torch.randn(7, 1, 3, dtype=torch.float64) * 10
    codes = (base @ rot.T).unsqueeze(0) + offsets
    expected = (a**2 * (t**2).sum()) / (b**2 * (v**2).sum())
    assert disentanglement_score_from_codes(codes) == pytest.approx(float(expected), rel=1e-9)
    assert disentanglement_score_from_codes(codes[..., :2] * 0 + torch.stack([t, 0 * t], 1)) == math.inf


@pytest.mark.parametrize("transform", ["width", "slant"])
def test_score_aligned_encoder_beats_random_projection(transform) -> None:
    images = _blobs(40, seed=1)
    v, u = torch.meshgrid(torch.linspace(-1, 1, 28), torch.linspace(-1, 1, 28), indexing="ij")
    # A linear (in the image) code whose first coordinate tracks the transform strength
    # (horizontal spread for width, x·y moment for slant); the rest is a tiny random map.
    row0 = (u.abs() if transform == "width" else u * v).reshape(-1)
    gen = torch.Generator().manual_seed(0)
    rand = torch.randn(7, 28 * 28, generator=gen) / 28
    aligned = torch.cat([row0[None], 1e-3 * rand])
    random_proj = torch.randn(8, 28 * 28, generator=gen) / 28

    def enc_aligned(x: Tensor) -> Tensor:
        return (x.flatten(1) + 1) @ aligned.T

    def enc_random(x: Tensor) -> Tensor:
        return (x.flatten(1) + 1) @ random_proj.T

    s_aligned = disentanglement_score(enc_aligned, images, transform, num_images=40)
    s_random = disentanglement_score(enc_random, images, transform, num_images=40)
    assert s_aligned > 10 * s_random, (s_aligned, s_random)
    assert s_random >= 1.0
    assert DEFAULT_MAX_STRENGTH[transform] > 0
