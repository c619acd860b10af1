"""The GANs of Table 1 behind one interface: Q-WGAN (the user's generator converted with
``qmm_plugin.convert``, Eq. 2's R_BA in the generator loss), WGAN (A = 1), Q-WGAN with λ = 0,
DMWGAN-style separate generators, MADGAN-like shared-layer generators and InfoGAN.

A :class:`Family` holds a generator and a critic and says how latents are drawn and fed, which
extra losses apply (R_BA, InfoGAN's mutual-information term) and how a Fig. 3-style grid is laid
out (:func:`manifold_grid`). :func:`make_family` builds one by its ``--model`` name.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import qmm_plugin

from .manifold_classes import ManifoldClassReport, sample_manifold_class_report
from .models import InfoGANDiscriminator, InfoGANGenerator, MADGANLike, MNISTCritic, MNISTGenerator, MultiGenerator

__all__ = [
    "MODELS",
    "Z_DIM",
    "NUM_MANIFOLDS",
    "Family",
    "QMMFamily",
    "MultiFamily",
    "InfoFamily",
    "make_family",
    "manifold_grid",
    "family_report",
    "eval_sampler",
    "spread_metrics",
]

MODELS = ("qwgan", "wgan", "qwgan-l0", "dmwgan", "madgan", "infogan")
Z_DIM = 8
NUM_MANIFOLDS = 10


# ------------------------------------------------------------------------------ model families
class Family:
    """What differs between the Table 1 GANs: how latents are drawn and fed, and extra losses.

    ``latents(n, device, gen, row)`` returns ``(args, kwargs)`` for the generator; ``row`` fixes
    the manifold (generator / category) of every sample, ``gen`` is a private
    ``torch.Generator`` for evaluation (training draws from the global RNG).
    """

    num_rows: int = NUM_MANIFOLDS
    lam: float = 0.0

    def __init__(self) -> None:
        self.generator: nn.Module = nn.Identity()
        self.critic: nn.Module = nn.Identity()

    def latents(self, n: int, device: torch.device, gen: torch.Generator | None = None,
                row: int | None = None) -> tuple[tuple[Tensor, ...], dict[str, Any]]:
        raise NotImplementedError

    def shared_latents(self, n: int, gen: torch.Generator) -> Any:
        """The latent part shared down a grid column (everything but the manifold)."""
        return torch.randn(n, Z_DIM, generator=gen)

    def grid_inputs(self, shared: Any, row: int, device: torch.device) -> tuple[tuple[Tensor, ...], dict[str, Any]]:
        raise NotImplementedError

    def score(self, critic: nn.Module, x: Tensor) -> tuple[Tensor, Any]:
        """Critic values ``(B,)`` and anything extra (InfoGAN's Q head)."""
        return critic(x).reshape(-1), None

    def info_loss(self, extra: Any, args: tuple[Tensor, ...]) -> Tensor | None:
        return None

    def generate(self, g: nn.Module, args: tuple[Tensor, ...], kwargs: dict[str, Any]
                 ) -> tuple[Tensor, Tensor | None]:
        """The generator step's forward: ``(fakes, R_BA or None)``."""
        return g(*args, **kwargs), None


def _index(n: int, a: int, device: torch.device, gen: torch.Generator | None) -> Tensor:
    """Stratified uniform manifold indices: a shuffled ``0,1,..,A-1,0,1,..`` (each group of a
    separate-generator baseline gets >= n // A rows, so its BatchNorm1d sees > 1 sample)."""
    return (torch.randperm(n, generator=gen) % a).to(device)


class QMMFamily(Family):
    """Q-WGAN (A = 10), Q-WGAN λ = 0, and WGAN (A = 1): the user's generator, converted."""

    def __init__(self, num_biases: int, lam: float, critic_bn: bool) -> None:
        super().__init__()
        self.num_rows, self.lam = num_biases, lam
        self.generator = qmm_plugin.convert(MNISTGenerator(z_dim=Z_DIM), num_biases=num_biases)
        self.critic = MNISTCritic(spectral_norm=True, batchnorm=critic_bn)

    def latents(self, n, device, gen=None, row=None):
        z = torch.randn(n, Z_DIM, generator=gen).to(device) if gen is not None else torch.randn(n, Z_DIM, device=device)
        if row is not None:
            return (z,), {"manifold": row}
        if gen is not None:
            return (z,), {"manifold": torch.randint(0, self.num_rows, (n,), generator=gen).to(device)}
        return (z,), {}  # the QuotientModel draws i ~ Uniform{0..A-1} per sample (ancestral sampling)

    def grid_inputs(self, shared, row, device):
        return (shared.to(device),), {"manifold": row}

    def generate(self, g, args, kwargs):
        if self.lam <= 0:
            return g(*args, **kwargs), None
        # R_BA (Eq. 2) from the same op calls as the forward: same value as q.ba_regularizer(),
        # cheaper backward (benchmarks/run.py)
        return g(*args, **kwargs, return_regularizer=True)


class MultiFamily(Family):
    """DMWGAN-style (separate generators, widths / 4) and MADGAN-like (shared first layers)."""

    def __init__(self, kind: str, critic_bn: bool) -> None:
        super().__init__()
        self.generator = (MultiGenerator(NUM_MANIFOLDS, z_dim=Z_DIM) if kind == "dmwgan"
                          else MADGANLike(NUM_MANIFOLDS, z_dim=Z_DIM, num_shared_deconv=1))
        self.critic = MNISTCritic(spectral_norm=True, batchnorm=critic_bn)

    def latents(self, n, device, gen=None, row=None):
        z = torch.randn(n, Z_DIM, generator=gen).to(device) if gen is not None else torch.randn(n, Z_DIM, device=device)
        idx = torch.full((n,), row, dtype=torch.long, device=device) if row is not None \
            else _index(n, self.num_rows, device, gen)
        return (z, idx), {}

    def grid_inputs(self, shared, row, device):
        z = shared.to(device)
        return (z, torch.full((z.shape[0],), row, dtype=torch.long, device=device)), {}


class InfoFamily(Family):
    """InfoGAN (MNIST): rows of a grid are the 10 categories; the MI loss trains G and the Q head."""

    info_weight = 1.0

    def __init__(self) -> None:
        super().__init__()
        self.generator = InfoGANGenerator(noise_dim=Z_DIM)
        self.critic = InfoGANDiscriminator(spectral_norm=True)

    def _noise_code(self, n: int, gen: torch.Generator | None) -> tuple[Tensor, Tensor]:
        noise = torch.randn(n, Z_DIM, generator=gen)
        code = torch.rand(n, 2, generator=gen) * 2 - 1  # continuous codes ~ U(-1, 1)
        return noise, code

    def latents(self, n, device, gen=None, row=None):
        noise, code = self._noise_code(n, gen)
        labels = torch.full((n,), row, dtype=torch.long) if row is not None else \
            torch.randint(0, self.num_rows, (n,), generator=gen)
        return (noise.to(device), labels.to(device), code.to(device)), {}

    def shared_latents(self, n, gen):
        return self._noise_code(n, gen)

    def grid_inputs(self, shared, row, device):
        noise, code = shared
        labels = torch.full((noise.shape[0],), row, dtype=torch.long)
        return (noise.to(device), labels.to(device), code.to(device)), {}

    def score(self, critic, x):
        d, cat_logits, cont_mean = critic(x)
        return d.reshape(-1), (cat_logits, cont_mean)

    def info_loss(self, extra, args):
        """−(lower bound of the mutual information): cross-entropy of the category plus the
        Gaussian (unit variance) negative log-likelihood of the continuous codes, up to constants."""
        cat_logits, cont_mean = extra
        _, labels, code = args
        return F.cross_entropy(cat_logits, labels) + 0.5 * (cont_mean - code).pow(2).sum(1).mean()


def make_family(model: str, lam: float | None, critic_bn: bool = False) -> Family:
    if model == "qwgan":
        return QMMFamily(NUM_MANIFOLDS, 0.05 if lam is None else lam, critic_bn)
    if model == "qwgan-l0":
        return QMMFamily(NUM_MANIFOLDS, 0.0, critic_bn)
    if model == "wgan":
        return QMMFamily(1, 0.0, critic_bn)
    if model in ("dmwgan", "madgan"):
        return MultiFamily(model, critic_bn)
    if model == "infogan":
        return InfoFamily()
    raise ValueError(f"unknown --model {model!r}; choose one of {MODELS}")


@torch.no_grad()
def family_report(fam: Family, classifier: nn.Module, per_manifold: int, device: torch.device, seed: int,
                  real_images: Tensor, real_labels: Tensor) -> ManifoldClassReport:
    """The manifold-class report (:mod:`qmm_plugin.paper.manifold_classes`) of any family: rows are
    its manifolds, generators or categories; ``per_manifold`` samples each, eval mode, private RNG."""
    g = fam.generator
    was_training = g.training
    g.eval()
    gen = torch.Generator().manual_seed(seed)

    def sample(row: int, n: int) -> Tensor:
        args, kwargs = fam.latents(n, device, gen, row=row)
        return g(*args, **kwargs)

    rep = sample_manifold_class_report(sample, classifier, fam.num_rows, per_manifold, real_images=real_images,
                                       real_labels=real_labels)
    g.train(was_training)
    return rep


@torch.no_grad()
def manifold_grid(fam: Family, columns: int, device: torch.device, seed: int) -> Tensor:
    """``(rows, columns, 1, 28, 28)``: row = manifold, column = one shared latent (Fig. 3)."""
    g = fam.generator
    was_training = g.training
    g.eval()
    shared = fam.shared_latents(columns, torch.Generator().manual_seed(seed))
    rows = []
    for r in range(fam.num_rows):
        args, kwargs = fam.grid_inputs(shared, r, device)
        rows.append(g(*args, **kwargs).cpu())
    g.train(was_training)
    return torch.stack(rows)


@torch.no_grad()
def eval_sampler(fam: Family, device: torch.device, seed: int) -> Any:
    """``sample(k)``: k images from the model in eval mode, from a private RNG (the global RNG,
    and hence ``--resume``, is untouched)."""
    gen = torch.Generator().manual_seed(seed)

    def sample(k: int) -> Tensor:
        args, kwargs = fam.latents(k, device, gen)
        return fam.generator(*args, **kwargs)

    return sample


def spread_metrics(fam: Family) -> dict[str, float]:
    """Per-layer exact tangential spread tr cov(a_par) (Theorem 1's right side) for QMM models.

    Costs an eigendecomposition of every converted weight's Gram matrix, so it is
    logged with the sample grids only; the per-layer Eq. 2 terms are logged every ``--log-every``."""
    g = fam.generator
    if not isinstance(g, qmm_plugin.QuotientModel) or g.num_biases < 2:
        return {}
    return {f"tangential_spread/{p}": v for p, v in g.tangential_spread().items()}
