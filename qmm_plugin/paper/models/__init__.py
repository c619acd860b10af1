"""The paper's networks (Appendix B) as plain ``nn.Module`` s; convert with ``qmm_plugin.convert``."""

from .baselines import InfoGANDiscriminator, InfoGANGenerator, MADGANLike, MultiGenerator
from .gan import (
    CRITIC_CONFIGS,
    GENERATOR_CONFIGS,
    ChairCritic,
    ChairGenerator,
    ConvCritic,
    ConvGenerator,
    CriticConfig,
    GeneratorConfig,
    MNISTCritic,
    MNISTGenerator,
    ZapposCritic,
    ZapposGenerator,
)
from .vae import BetaVAEEncoder, bernoulli_log_likelihood, beta_vae_decoder, gaussian_kl, reparameterize

__all__ = [
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
    "BetaVAEEncoder",
    "beta_vae_decoder",
    "gaussian_kl",
    "bernoulli_log_likelihood",
    "reparameterize",
    "MultiGenerator",
    "MADGANLike",
    "InfoGANGenerator",
    "InfoGANDiscriminator",
]
