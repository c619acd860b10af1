"""Shapes, parameter counts and helper maths of qmm_plugin.paper.models (Appendix B/C architectures)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qmm_plugin.paper.models import (
    GENERATOR_CONFIGS,
    BetaVAEEncoder,
    ChairCritic,
    ChairGenerator,
    GeneratorConfig,
    InfoGANDiscriminator,
    InfoGANGenerator,
    MADGANLike,
    MNISTCritic,
    MNISTGenerator,
    MultiGenerator,
    ZapposCritic,
    ZapposGenerator,
    bernoulli_log_likelihood,
    beta_vae_decoder,
    gaussian_kl,
)


def nparams(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize(
    ("cls", "z_dim", "shape"),
    [(MNISTGenerator, 8, (1, 28, 28)), (ChairGenerator, 10, (1, 64, 64)), (ZapposGenerator, 8, (3, 32, 32))],
)
def test_generator_shapes_and_tanh_range(cls, z_dim, shape) -> None:
    g = cls()
    x = g(torch.randn(4, z_dim))
    assert x.shape == (4, *shape)
    assert x.abs().max() <= 1.0
    assert isinstance(g.unflatten, nn.Unflatten)
    assert any(isinstance(m, nn.BatchNorm1d) for m in g.modules())


def test_mnist_generator_layers_match_appendix_b() -> None:
    g = MNISTGenerator()
    lin = [m for m in g.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in lin] == [(8, 1024), (1024, 6272)]
    assert all(m.bias is not None for m in lin)  # QMM's multi-bias lives here
    convt = [m for m in g.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [(m.out_channels, m.kernel_size, m.stride, m.padding) for m in convt] == [
        (64, (4, 4), (2, 2), (1, 1)),
        (32, (4, 4), (2, 2), (1, 1)),
        (1, (3, 3), (1, 1), (1, 1)),
    ]
    assert all(m.negative_slope == 0.2 for m in g.modules() if isinstance(m, nn.LeakyReLU))


def test_generator_variants_for_vae_decoder() -> None:
    dec = beta_vae_decoder(8)
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in dec.modules())
    assert not any(isinstance(m, nn.Tanh) for m in dec.modules())
    out = dec(torch.randn(3, 8))
    assert out.shape == (3, 1, 28, 28)
    with pytest.raises(ValueError):
        MNISTGenerator(output="sigmoid")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("cls", "shape", "flat"),
    [(MNISTCritic, (1, 28, 28), 6272), (ChairCritic, (1, 64, 64), 8192), (ZapposCritic, (3, 32, 32), 8192)],
)
def test_critic_shapes_and_spectral_norm(cls, shape, flat) -> None:
    d = cls()
    assert d(torch.randn(4, *shape)).shape == (4, 1)
    assert d.config.flat_dim == flat
    weighted = [m for m in d.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert weighted and all(torch.nn.utils.parametrize.is_parametrized(m, "weight") for m in weighted)
    d_plain = cls(spectral_norm=False, batchnorm=False)
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in d_plain.modules())
    assert d_plain(torch.randn(2, *shape)).shape == (2, 1)


def test_spectral_norm_bounds_linear_gain() -> None:
    d = MNISTCritic()
    d.train()
    for _ in range(3):  # power iteration runs in training-mode forwards (the head is rank 1)
        d(torch.randn(4, 1, 28, 28))
    w = d.head.weight  # parametrised: already divided by its spectral norm
    assert torch.linalg.matrix_norm(w, ord=2).item() == pytest.approx(1.0, rel=1e-3)


def test_config_validation_and_scaling() -> None:
    with pytest.raises(ValueError):
        GeneratorConfig(fc=(10, 100), reshape=(2, 7, 7), deconv=(4,), out_channels=1)
    small = GENERATOR_CONFIGS["mnist"].scaled(4)
    assert small.fc == (256, 1568) and small.reshape == (32, 7, 7) and small.deconv == (16, 8)
    assert small.image_size == 28


def test_multigenerator_groups_and_param_count() -> None:
    single = nparams(MNISTGenerator())
    mg = MultiGenerator(num_generators=10)
    assert mg.num_generators == 10
    total = nparams(mg)
    # widths / 4 -> ~1/10..1/16 of the parameters each; at A = 10 the bank is 0.63x the single G
    assert 0.5 * single < total < 2 * single
    z = torch.randn(20, 8)
    idx = torch.arange(20) % 10
    mg.eval()
    out = mg(z, idx)
    assert out.shape == (20, 1, 28, 28)
    for g in (0, 7):  # each row comes from its own generator
        rows = idx == g
        torch.testing.assert_close(out[rows], mg.generators[g](z[rows]))
    with pytest.raises(IndexError):
        mg(z[:2], torch.tensor([0, 10]))


def test_madgan_like_shares_fc_stack() -> None:
    m = MADGANLike(num_generators=4)
    assert m.num_generators == 4
    lin = [mod for mod in m.modules() if isinstance(mod, nn.Linear)]
    assert len(lin) == 2  # one shared FC stack
    head_params = nparams(m.heads[0])
    assert nparams(m) == nparams(m.shared) + 4 * head_params
    z = torch.randn(8, 8)
    idx = torch.tensor([0, 1, 2, 3] * 2)
    assert m(z, idx).shape == (8, 1, 28, 28)
    m3 = MADGANLike(num_generators=4, num_shared_deconv=1)  # "first three layers" of the paper
    assert nparams(m3.heads[0]) < head_params
    assert m3(z, idx).shape == (8, 1, 28, 28)


def test_infogan_shapes() -> None:
    g = InfoGANGenerator()
    x = g(torch.randn(6, 8), torch.randint(0, 10, (6,)), torch.rand(6, 2) * 2 - 1)
    assert x.shape == (6, 1, 28, 28)
    assert g.net.fc[0].in_features == 20
    d = InfoGANDiscriminator()
    real, cat_logits, cont = d(x)
    assert real.shape == (6, 1) and cat_logits.shape == (6, 10) and cont.shape == (6, 2)


def test_vae_encoder_shapes() -> None:
    enc = BetaVAEEncoder(z_dim=8)
    mu, logvar = enc(torch.rand(5, 1, 28, 28))
    assert mu.shape == logvar.shape == (5, 8)
    convs = [m for m in enc.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128]


def test_gaussian_kl_closed_form() -> None:
    mu = torch.randn(7, 8, dtype=torch.float64)
    logvar = torch.randn(7, 8, dtype=torch.float64)
    expected = torch.zeros(7, dtype=torch.float64)
    for b in range(7):
        for j in range(8):
            m, s = float(mu[b, j]), math.exp(0.5 * float(logvar[b, j]))
            expected[b] += math.log(1.0 / s) + (s * s + m * m) / 2.0 - 0.5
    torch.testing.assert_close(gaussian_kl(mu, logvar), expected)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    torch.testing.assert_close(gaussian_kl(mu, logvar), torch.distributions.kl_divergence(q, p).sum(1))
    assert torch.all(gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3)) == 0)


def test_bernoulli_log_likelihood() -> None:
    logits = torch.randn(4, 1, 28, 28, dtype=torch.float64) * 5
    x = (torch.rand(4, 1, 28, 28) > 0.5).double()
    expected = torch.distributions.Bernoulli(logits=logits).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(bernoulli_log_likelihood(logits, x), expected)
    # extreme logits stay finite
    assert torch.isfinite(bernoulli_log_likelihood(torch.full((1, 4), 200.0), torch.zeros(1, 4))).all()
