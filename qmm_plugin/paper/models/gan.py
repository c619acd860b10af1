"""Generators and critics of the paper (Appendix B, Table "network architectures"; LReLU 0.2).

Plain ``nn.Module`` s: ``qmm_plugin.convert`` turns every ``nn.Linear`` of a generator into a
multi-bias layer afterwards. Fully-connected layers therefore always keep their bias (it is the
manifold-specific parameter of QMM); transposed/plain convolutions followed by BatchNorm have no
bias (BatchNorm's shift makes it redundant).

All three generator shapes come from one builder, :class:`ConvGenerator`, driven by a
:class:`GeneratorConfig` (FC widths → reshape → ConvT(4,2,1) channels → ConvT(out,3,1,1));
critics likewise come from :class:`ConvCritic` driven by a :class:`CriticConfig`.

=========  ==========================================================================
MNIST      G: FC1024 → FC6272 → (128,7,7) → ConvT64 → ConvT32 → ConvT(1,3,1,1), Tanh
(z = 8)    D: Conv64 → Conv128 → flatten 6272 → FC1024 → FC1
3D-Chair   G: FC256 → FC8192 → (128,8,8) → ConvT64 → ConvT32 → ConvT16 → ConvT(1,3,1,1)
(z = 10)   D: Conv64 → Conv128 → Conv128 → flatten 8192 → FC1024 → FC1
UT-Zap50k  G: FC512 → FC1024 → FC8192 → (512,4,4) → ConvT256 → ConvT128 → ConvT64 → ConvT(3,3,1,1)
(z = 8)    D: Conv128 → Conv256 → Conv512 → flatten 8192 → FC1024 → FC512 → FC1
=========  ==========================================================================
Every hidden layer is followed by BatchNorm (optional) and LeakyReLU(0.2); ConvT/Conv hidden
layers are (kernel 4, stride 2, padding 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _sn

__all__ = [
    "LRELU_SLOPE",
    "GeneratorConfig",
    "CriticConfig",
    "GENERATOR_CONFIGS",
    "CRITIC_CONFIGS",
    "ConvGenerator",
    "ConvCritic",
    "MNISTGenerator",
    "MNISTCritic",
    "ChairGenerator",
    "ChairCritic",
    "ZapposGenerator",
    "ZapposCritic",
]

LRELU_SLOPE = 0.2
OutputKind = Literal["tanh", "logits"]


@dataclass(frozen=True)
class GeneratorConfig:
    """Shape of a generator: ``fc`` widths, ``reshape`` (C, H, W) with C·H·W == fc[-1],
    ``deconv`` channels of the (4,2,1) ConvT layers, and ``out_channels`` of the final
    ConvT(·,3,1,1)."""

    fc: tuple[int, ...]
    reshape: tuple[int, int, int]
    deconv: tuple[int, ...]
    out_channels: int

    def __post_init__(self) -> None:
        if math.prod(self.reshape) != self.fc[-1]:
            raise ValueError(f"reshape {self.reshape} does not match last FC width {self.fc[-1]}")

    @property
    def image_size(self) -> int:
        return self.reshape[1] * 2 ** len(self.deconv)

    def scaled(self, divisor: int) -> GeneratorConfig:
        """Every FC width and channel count divided by ``divisor`` (DMWGAN-style baselines);
        the spatial reshape and the output channels stay."""
        c, h, w = self.reshape
        return replace(
            self,
            fc=tuple(max(1, f // divisor) for f in self.fc[:-1]) + (max(1, c // divisor) * h * w,),
            reshape=(max(1, c // divisor), h, w),
            deconv=tuple(max(1, d // divisor) for d in self.deconv),
        )


@dataclass(frozen=True)
class CriticConfig:
    """Shape of a critic: ``in_channels``, ``image_size``, ``conv`` channels of the (4,2,1)
    Conv layers, ``fc`` hidden widths (a final FC1 is always appended)."""

    in_channels: int
    image_size: int
    conv: tuple[int, ...]
    fc: tuple[int, ...]

    @property
    def flat_dim(self) -> int:
        side = self.image_size // 2 ** len(self.conv)
        return self.conv[-1] * side * side


GENERATOR_CONFIGS: dict[str, GeneratorConfig] = {
    "mnist": GeneratorConfig(fc=(1024, 6272), reshape=(128, 7, 7), deconv=(64, 32), out_channels=1),
    "chair": GeneratorConfig(fc=(256, 8192), reshape=(128, 8, 8), deconv=(64, 32, 16), out_channels=1),
    "zappos": GeneratorConfig(
        fc=(512, 1024, 8192), reshape=(512, 4, 4), deconv=(256, 128, 64), out_channels=3
    ),
}
CRITIC_CONFIGS: dict[str, CriticConfig] = {
    "mnist": CriticConfig(in_channels=1, image_size=28, conv=(64, 128), fc=(1024,)),
    "chair": CriticConfig(in_channels=1, image_size=64, conv=(64, 128, 128), fc=(1024,)),
    "zappos": CriticConfig(in_channels=3, image_size=32, conv=(128, 256, 512), fc=(1024, 512)),
}


def _act() -> nn.LeakyReLU:
    return nn.LeakyReLU(LRELU_SLOPE)


def build_fc_stack(z_dim: int, widths: tuple[int, ...], batchnorm: bool) -> nn.Sequential:
    """FC(w),[BN],LReLU for each width (bias always kept: QMM's multi-bias lives there)."""
    layers: list[nn.Module] = []
    prev = z_dim
    for w in widths:
        layers.append(nn.Linear(prev, w))
        if batchnorm:
            layers.append(nn.BatchNorm1d(w))
        layers.append(_act())
        prev = w
    return nn.Sequential(*layers)


def build_deconv_stack(
    in_channels: int,
    channels: tuple[int, ...],
    out_channels: int | None,
    batchnorm: bool,
    output: OutputKind = "tanh",
) -> nn.Sequential:
    """ConvT(c,4,2,1),[BN],LReLU per channel count, then (if ``out_channels``) ConvT(out,3,1,1)
    followed by Tanh (``output="tanh"``) or nothing (``output="logits"``)."""
    if output not in ("tanh", "logits"):
        raise ValueError(f"output must be 'tanh' or 'logits', got {output!r}")
    layers: list[nn.Module] = []
    prev = in_channels
    for c in channels:
        layers.append(nn.ConvTranspose2d(prev, c, 4, 2, 1, bias=not batchnorm))
        if batchnorm:
            layers.append(nn.BatchNorm2d(c))
        layers.append(_act())
        prev = c
    if out_channels is not None:
        layers.append(nn.ConvTranspose2d(prev, out_channels, 3, 1, 1))
        if output == "tanh":
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def build_conv_stack(in_channels: int, channels: tuple[int, ...], batchnorm: bool, sn: bool) -> nn.Sequential:
    """Conv(c,4,2,1),[BN],LReLU per channel count, optionally spectrally normalised."""
    layers: list[nn.Module] = []
    prev = in_channels
    for c in channels:
        conv = nn.Conv2d(prev, c, 4, 2, 1, bias=not batchnorm)
        layers.append(_sn(conv) if sn else conv)
        if batchnorm:
            layers.append(nn.BatchNorm2d(c))
        layers.append(_act())
        prev = c
    return nn.Sequential(*layers)


class ConvGenerator(nn.Module):
    """Generic Appendix B generator: ``fc`` (FC stack) → ``unflatten`` → ``deconv`` (ConvT stack).

    Args:
        config: the shape (see :data:`GENERATOR_CONFIGS`).
        z_dim: latent size.
        batchnorm: BatchNorm after every hidden layer (``False`` for the β-VAE decoder, App. C).
        output: ``"tanh"`` (images in [-1, 1], GANs) or ``"logits"`` (Bernoulli decoder).

    ``forward(z: (B, z_dim)) -> (B, out_channels, S, S)``.
    """

    def __init__(
        self,
        config: GeneratorConfig,
        z_dim: int,
        batchnorm: bool = True,
        output: OutputKind = "tanh",
    ) -> None:
        super().__init__()
        self.config = config
        self.z_dim = z_dim
        self.fc = build_fc_stack(z_dim, config.fc, batchnorm)
        self.unflatten = nn.Unflatten(1, config.reshape)
        self.deconv = build_deconv_stack(config.reshape[0], config.deconv, config.out_channels, batchnorm, output)

    def forward(self, z: Tensor) -> Tensor:
        return self.deconv(self.unflatten(self.fc(z)))


class ConvCritic(nn.Module):
    """Generic Appendix B critic: ``conv`` stack → flatten → ``fc`` stack → FC1 (``head``).

    Args:
        config: the shape (see :data:`CRITIC_CONFIGS`).
        spectral_norm: wrap every Conv2d/Linear with
            ``torch.nn.utils.parametrizations.spectral_norm`` (the Q-WGAN Lipschitz constraint).
        batchnorm: BatchNorm after every hidden layer (as listed in Appendix B).

    ``forward(x: (B, C, S, S)) -> (B, 1)`` unbounded critic values.
    """

    def __init__(self, config: CriticConfig, spectral_norm: bool = True, batchnorm: bool = True) -> None:
        super().__init__()
        self.config = config
        self.conv = build_conv_stack(config.in_channels, config.conv, batchnorm, spectral_norm)
        self.flatten = nn.Flatten()
        fc: list[nn.Module] = []
        prev = config.flat_dim
        for w in config.fc:
            lin = nn.Linear(prev, w)
            fc.append(_sn(lin) if spectral_norm else lin)
            if batchnorm:
                fc.append(nn.BatchNorm1d(w))
            fc.append(_act())
            prev = w
        self.fc = nn.Sequential(*fc)
        head = nn.Linear(prev, 1)
        self.head = _sn(head) if spectral_norm else head

    def features(self, x: Tensor) -> Tensor:
        """Output of the last hidden FC layer."""
        return self.fc(self.flatten(self.conv(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class MNISTGenerator(ConvGenerator):
    """MNIST generator (Appendix B): FC1024,BN,LReLU → FC6272,BN,LReLU → reshape(128,7,7) →
    ConvT(64,4,2,1),BN,LReLU → ConvT(32,4,2,1),BN,LReLU → ConvT(1,3,1,1),Tanh. Output (B,1,28,28).
    ``batchnorm=False, output="logits"`` is the β-VAE decoder (Appendix C)."""

    def __init__(self, z_dim: int = 8, batchnorm: bool = True, output: OutputKind = "tanh") -> None:
        super().__init__(GENERATOR_CONFIGS["mnist"], z_dim, batchnorm, output)


class ChairGenerator(ConvGenerator):
    """3D-Chair generator (Appendix B): FC256 → FC8192 → reshape(128,8,8) → ConvT64 → ConvT32 →
    ConvT16 (each 4,2,1, BN, LReLU) → ConvT(1,3,1,1),Tanh. Output (B,1,64,64)."""

    def __init__(self, z_dim: int = 10, batchnorm: bool = True, output: OutputKind = "tanh") -> None:
        super().__init__(GENERATOR_CONFIGS["chair"], z_dim, batchnorm, output)


class ZapposGenerator(ConvGenerator):
    """UT-Zap50k generator (Appendix B): FC512 → FC1024 → FC8192 → reshape(512,4,4) → ConvT256 →
    ConvT128 → ConvT64 (each 4,2,1, BN, LReLU) → ConvT(3,3,1,1),Tanh. Output (B,3,32,32)."""

    def __init__(self, z_dim: int = 8, batchnorm: bool = True, output: OutputKind = "tanh") -> None:
        super().__init__(GENERATOR_CONFIGS["zappos"], z_dim, batchnorm, output)


class MNISTCritic(ConvCritic):
    """MNIST critic (Appendix B): Conv(64,4,2,1),BN,LReLU → Conv(128,4,2,1),BN,LReLU →
    flatten 6272 → FC1024,BN,LReLU → FC1. Input (B,1,28,28)."""

    def __init__(self, spectral_norm: bool = True, batchnorm: bool = True) -> None:
        super().__init__(CRITIC_CONFIGS["mnist"], spectral_norm, batchnorm)


class ChairCritic(ConvCritic):
    """3D-Chair critic (Appendix B): Conv64 → Conv128 → Conv128 (each 4,2,1, BN, LReLU) →
    flatten 8192 → FC1024 → FC1. Input (B,1,64,64)."""

    def __init__(self, spectral_norm: bool = True, batchnorm: bool = True) -> None:
        super().__init__(CRITIC_CONFIGS["chair"], spectral_norm, batchnorm)


class ZapposCritic(ConvCritic):
    """UT-Zap50k critic (Appendix B): Conv128 → Conv256 → Conv512 (each 4,2,1, BN, LReLU) →
    flatten 8192 → FC1024 → FC512 → FC1. Input (B,3,32,32)."""

    def __init__(self, spectral_norm: bool = True, batchnorm: bool = True) -> None:
        super().__init__(CRITIC_CONFIGS["zappos"], spectral_norm, batchnorm)
