"""qmm_plugin: Quotient Manifold Modeling (QMM) as a drop-in PyTorch plugin.

``q = qmm_plugin.convert(generator, num_biases=A)`` turns every ``nn.Linear`` of a user's
generator or decoder into a shared-weight, A-bias layer: A generators that share every weight and
differ only in their biases. Add ``lam * q.ba_regularizer()`` (Eq. 2) to the generator loss so
that one encoder inverts all A generators; ``q.invert(x)`` (Eq. 3) then encodes images, including
images off every trained manifold, into new, derived manifolds.

The paper-reproduction kit (its networks, data, metrics, image grids, baselines and training
machinery) is the subpackage :mod:`qmm_plugin.paper`, imported on demand.
"""

from . import io, ops
from .analytic_encoder import AnalyticEncoder, analytic_encoder
from .convert import QuotientMixin, QuotientModel, convert, register_layer_type
from .inversion import Inversion, fit_codes, invert
from .conv import MultiBiasConv2d, MultiBiasConvTranspose2d
from .layer import MultiBiasLayer, MultiBiasLinear
from .regularizer import align_biases_
from .routing import ManifoldSelection, use_manifold
from .sampling import sample_manifold

__all__ = [
    "convert",
    "QuotientModel",
    "QuotientMixin",
    "register_layer_type",
    "use_manifold",
    "MultiBiasLayer",
    "MultiBiasLinear",
    "MultiBiasConv2d",
    "MultiBiasConvTranspose2d",
    "ManifoldSelection",
    "align_biases_",
    "Inversion",
    "invert",
    "fit_codes",
    "sample_manifold",
    "analytic_encoder",
    "AnalyticEncoder",
    "io",
    "ops",
]
__version__ = "0.1.0"

import importlib.util as _ilu

import torch as _torch

if _torch.cuda.is_available() and _ilu.find_spec("triton") is not None:
    from . import _triton  # noqa: F401  (registers the Triton CUDA kernels behind the qmm:: ops)

