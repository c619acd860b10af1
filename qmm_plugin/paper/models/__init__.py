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

from . import baselines, gan, vae

#: every public name of the three modules (``gan``'s layer constant stays in ``gan``)
__all__ = [name for module in (gan, vae, baselines) for name in module.__all__ if name != "LRELU_SLOPE"]
