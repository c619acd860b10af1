"""β-VAE / Q-β-VAE parts (Appendix C; architectures from Appendix B).

The decoder is the Q-WGAN generator without BatchNorm, emitting Bernoulli logits. The paper does
not specify the encoder; :class:`BetaVAEEncoder` mirrors the MNIST critic's convolutional stack
(Conv(64,4,2,1),BN,LReLU → Conv(128,4,2,1),BN,LReLU → flatten 6272 → FC1024,BN,LReLU) with two
linear heads (mean, log-variance). Likelihood helpers return one value per sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gan import CRITIC_CONFIGS, LRELU_SLOPE, CriticConfig, MNISTGenerator, build_conv_stack

__all__ = [
    "BetaVAEEncoder",
    "beta_vae_decoder",
    "gaussian_kl",
    "bernoulli_log_likelihood",
    "reparameterize",
]


class BetaVAEEncoder(nn.Module):
    """Gaussian encoder q(z|x) mirroring the MNIST critic's conv stack, with two heads.

    ``forward(x: (B,1,28,28) in [0,1] or [-1,1]) -> (mu, logvar)``, each (B, z_dim).
    No spectral normalisation. ``config`` selects another critic shape (e.g.
    ``CRITIC_CONFIGS["chair"]``).
    """

    def __init__(self, z_dim: int = 8, batchnorm: bool = True, config: CriticConfig | None = None) -> None:
        super().__init__()
        cfg = config if config is not None else CRITIC_CONFIGS["mnist"]
        self.z_dim = z_dim
        hidden = cfg.fc[-1]
        layers: list[nn.Module] = [build_conv_stack(cfg.in_channels, cfg.conv, batchnorm, sn=False), nn.Flatten()]
        prev = cfg.flat_dim
        for w in cfg.fc:
            layers.append(nn.Linear(prev, w))
            if batchnorm:
                layers.append(nn.BatchNorm1d(w))
            layers.append(nn.LeakyReLU(LRELU_SLOPE))
            prev = w
        self.body = nn.Sequential(*layers)
        self.mean = nn.Linear(hidden, z_dim)
        self.logvar = nn.Linear(hidden, z_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.body(x)
        return self.mean(h), self.logvar(h)


def beta_vae_decoder(z_dim: int = 8) -> MNISTGenerator:
    """The β-VAE decoder: ``MNISTGenerator(z_dim, batchnorm=False, output="logits")``
    (Appendix C: the Q-WGAN generator without BatchNorm; Bernoulli logits (B,1,28,28))."""
    return MNISTGenerator(z_dim=z_dim, batchnorm=False, output="logits")


def reparameterize(mu: Tensor, logvar: Tensor) -> Tensor:
    """z = mu + exp(logvar / 2) · ε, ε ~ N(0, I)."""
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL( N(mu, diag(exp(logvar))) || N(0, I) ) per sample: ``0.5 Σ (mu² + σ² − 1 − log σ²)``
    summed over all non-batch dims; returns shape (B,)."""
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1)


def bernoulli_log_likelihood(logits: Tensor, x01: Tensor) -> Tensor:
    """log p(x | logits) under independent Bernoullis per sample, shape (B,).

    ``x01`` in [0, 1] (binary, or grey values as "soft" targets, the usual MNIST practice);
    numerically stable (``-binary_cross_entropy_with_logits``), summed over non-batch dims.
    """
    ll = -F.binary_cross_entropy_with_logits(logits, x01.to(logits.dtype), reduction="none")
    return ll.flatten(1).sum(1)
