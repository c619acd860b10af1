"""Baselines of the paper's Table 1 (compact re-implementations of their architectures).

* :class:`MultiGenerator` — DMWGAN-style: A *separate* generators, each with every FC width and
  channel count divided by 4 (paper: "to match parameters").
* :class:`MADGANLike` — A generators sharing their first layers (the FC stack, plus optionally the
  first ``num_shared_deconv`` ConvT layers; the paper says "first three layers", which for MNIST
  is ``num_shared_deconv=1``), each with its own convolutional head.
* :class:`InfoGANGenerator` / :class:`InfoGANDiscriminator` — MNIST InfoGAN: 1 categorical(10) +
  2 continuous codes + 8 noise dims; the discriminator has a Q head.
Generation index/mixing (π) is left to the training code: uniform in the paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gan import (
    CRITIC_CONFIGS,
    GENERATOR_CONFIGS,
    LRELU_SLOPE,
    ConvCritic,
    ConvGenerator,
    GeneratorConfig,
    OutputKind,
    build_deconv_stack,
    build_fc_stack,
)

__all__ = ["MultiGenerator", "MADGANLike", "InfoGANGenerator", "InfoGANDiscriminator"]


def _config(config: GeneratorConfig | str) -> GeneratorConfig:
    return GENERATOR_CONFIGS[config] if isinstance(config, str) else config


def _run_groups(modules: nn.ModuleList, x: Tensor, index: Tensor) -> Tensor:
    """Run ``modules[g]`` on the rows of ``x`` with ``index == g``; reassemble in input order."""
    index = torch.as_tensor(index, device=x.device).long().reshape(-1)
    if index.shape[0] != x.shape[0]:
        raise ValueError(f"index has {index.shape[0]} entries for a batch of {x.shape[0]}")
    if index.numel() and (index.min() < 0 or index.max() >= len(modules)):
        raise IndexError(f"index out of range [0, {len(modules)})")
    out: Tensor | None = None
    for g in torch.unique(index).tolist():
        rows = (index == g).nonzero(as_tuple=True)[0]
        y = modules[g](x[rows])
        if out is None:
            out = y.new_empty((x.shape[0], *y.shape[1:]))
        out[rows] = y
    if out is None:
        raise ValueError("empty batch")
    return out


class MultiGenerator(nn.Module):
    """DMWGAN-style bank of ``num_generators`` independent generators with widths / ``width_divisor``.

    ``forward(z: (B, z_dim), index: (B,) long in [0, A)) -> images``; each generator sees only
    its own group (so its BatchNorm statistics are per-generator; in train mode every group
    present in the batch needs at least 2 rows, as BatchNorm1d requires).
    """

    def __init__(
        self,
        num_generators: int = 10,
        config: GeneratorConfig | str = "mnist",
        z_dim: int = 8,
        width_divisor: int = 4,
        batchnorm: bool = True,
        output: OutputKind = "tanh",
    ) -> None:
        super().__init__()
        cfg = _config(config).scaled(width_divisor)
        self.z_dim = z_dim
        self.generators = nn.ModuleList(
            ConvGenerator(cfg, z_dim, batchnorm, output) for _ in range(num_generators)
        )

    @property
    def num_generators(self) -> int:
        return len(self.generators)

    def forward(self, z: Tensor, index: Tensor) -> Tensor:
        return _run_groups(self.generators, z, index)


class MADGANLike(nn.Module):
    """``num_generators`` generators sharing the FC stack (and the first ``num_shared_deconv``
    ConvT layers) with separate convolutional heads.

    ``forward(z: (B, z_dim), index: (B,) long in [0, A)) -> images``.
    """

    def __init__(
        self,
        num_generators: int = 10,
        config: GeneratorConfig | str = "mnist",
        z_dim: int = 8,
        num_shared_deconv: int = 0,
        batchnorm: bool = True,
        output: OutputKind = "tanh",
    ) -> None:
        super().__init__()
        cfg = _config(config)
        if not 0 <= num_shared_deconv <= len(cfg.deconv):
            raise ValueError(f"num_shared_deconv must be in [0, {len(cfg.deconv)}]")
        self.z_dim = z_dim
        shared_ch = cfg.deconv[:num_shared_deconv]
        self.shared = nn.Sequential(
            build_fc_stack(z_dim, cfg.fc, batchnorm),
            nn.Unflatten(1, cfg.reshape),
            build_deconv_stack(cfg.reshape[0], shared_ch, None, batchnorm),
        )
        head_in = shared_ch[-1] if shared_ch else cfg.reshape[0]
        self.heads = nn.ModuleList(
            build_deconv_stack(head_in, cfg.deconv[num_shared_deconv:], cfg.out_channels, batchnorm, output)
            for _ in range(num_generators)
        )

    @property
    def num_generators(self) -> int:
        return len(self.heads)

    def forward(self, z: Tensor, index: Tensor) -> Tensor:
        return _run_groups(self.heads, self.shared(z), index)


class InfoGANGenerator(nn.Module):
    """MNIST InfoGAN generator: input = [noise (8) | one-hot category (10) | continuous code (2)]
    → the MNIST generator architecture (Appendix B) with z_dim = 20.

    ``forward(noise: (B, noise_dim), labels: (B,) long, code: (B, num_continuous)) -> (B,1,28,28)``.
    """

    def __init__(self, noise_dim: int = 8, num_categories: int = 10, num_continuous: int = 2) -> None:
        super().__init__()
        self.noise_dim, self.num_categories, self.num_continuous = noise_dim, num_categories, num_continuous
        self.net = ConvGenerator(GENERATOR_CONFIGS["mnist"], noise_dim + num_categories + num_continuous)

    def forward(self, noise: Tensor, labels: Tensor, code: Tensor) -> Tensor:
        onehot = F.one_hot(labels.long(), self.num_categories).to(noise.dtype)
        return self.net(torch.cat([noise, onehot, code.to(noise.dtype)], dim=1))


class InfoGANDiscriminator(nn.Module):
    """MNIST InfoGAN discriminator: the MNIST critic body (Appendix B) with a real/fake head and
    a Q head (FC128,BN,LReLU → categorical logits and continuous means).

    ``forward(x: (B,1,28,28)) -> (d: (B,1), cat_logits: (B,10), cont_mean: (B,2))``.
    """

    def __init__(
        self, num_categories: int = 10, num_continuous: int = 2, spectral_norm: bool = False
    ) -> None:
        super().__init__()
        self.num_categories = num_categories
        self.critic = ConvCritic(CRITIC_CONFIGS["mnist"], spectral_norm=spectral_norm)
        self.q = nn.Sequential(
            nn.Linear(CRITIC_CONFIGS["mnist"].fc[-1], 128),
            nn.BatchNorm1d(128),
            nn.LeakyReLU(LRELU_SLOPE),
            nn.Linear(128, num_categories + num_continuous),
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = self.critic.features(x)
        q = self.q(h)
        return self.critic.head(h), q[:, : self.num_categories], q[:, self.num_categories :]
