r"""Module surgery: turn a user's generator or decoder into A encoder-compatible generators.

:func:`convert` replaces every targeted ``nn.Linear`` of the user's model by a
:class:`~qmm_plugin.MultiBiasLinear` (shared weight, bank of A biases) and wraps the model in a
:class:`QuotientModel`. The user's ``forward`` is untouched: the wrapper decides, per call, which
bias each sample uses (ancestral sampling :math:`i \sim \mathrm{Uniform}\{0..A-1\}` by default,
paper Sec. 5), and adds the one loss term of QMM, :meth:`QuotientModel.ba_regularizer` (Eq. 2).
"""

from __future__ import annotations

import copy
import fnmatch
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ._checks import check_finite_state, check_real
from .layer import Manifold, ManifoldSelection, MultiBiasLinear, check_explicit_bias
from .regularizer import DEFAULT_EPS, ba_regularizer_terms, tangential_spread

if TYPE_CHECKING:
    from .inversion import Inversion

__all__ = ["convert", "QuotientModel"]


def _as_patterns(patterns: str | Sequence[str] | None, name: str) -> list[str] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        return [patterns]
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{name} must be a string or a sequence of fnmatch pattern strings, got {patterns!r}")
    return list(patterns)


def _matches(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, child, module)


def _select_linears(model: nn.Module, include: list[str] | None, exclude: list[str] | None
                    ) -> list[tuple[str, nn.Linear]]:
    paths = [p for p, _ in model.named_modules()]
    for kind, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns or []:
            if not any(fnmatch.fnmatchcase(p, pattern) for p in paths):
                raise ValueError(
                    f"convert: {kind} pattern {pattern!r} matches no module path; paths in the model "
                    f"are {[p for p in paths if p]}. Patterns are fnmatch patterns over named_modules() paths, "
                    "e.g. 'decoder.*'")
    linears = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        kinds = Counter(type(m).__name__ for _, m in model.named_modules() if not list(m.children()))
        raise ValueError(
            f"convert: the model has no nn.Linear layer to convert (found: {dict(kinds) or 'no layers'}). "
            "QMM converts fully connected layers only; convolution layers (Conv*/ConvTranspose*) are "
            "not converted, so give the generator at least one nn.Linear (e.g. its latent projection).")
    chosen = [(p, m) for p, m in linears
              if (include is None or _matches(p, include)) and not (exclude and _matches(p, exclude))]
    if not chosen:
        raise ValueError(
            f"convert: include={include} / exclude={exclude} leave no nn.Linear to convert; the Linear "
            f"layers are {[p for p, _ in linears]}")
    for p, m in chosen:
        if isinstance(m, nn.LazyLinear) or isinstance(m.weight, nn.parameter.UninitializedParameter):
            raise ValueError(f"convert: layer '{p}' is an uninitialised LazyLinear; run one forward pass first")
        if torch.nn.utils.parametrize.is_parametrized(m):
            raise ValueError(
                f"convert: layer '{p}' carries a parametrization (e.g. spectral_norm); remove it or "
                "exclude the layer — a bias bank needs a plain weight")
    return chosen


def convert(model: nn.Module, num_biases: int, *, include: str | Sequence[str] | None = None,
            exclude: str | Sequence[str] | None = None, init_std: float | None = None) -> QuotientModel:
    r"""Give every targeted ``nn.Linear`` of ``model`` a bank of ``num_biases`` biases (QMM, Sec. 4).

    Each targeted layer becomes a :class:`~qmm_plugin.MultiBiasLinear` **in place** (like
    ``torch.nn.utils.spectral_norm``): it keeps the layer's ``.weight`` (same tensor values, name
    and shape, shared by all manifolds) and gets ``.bias_bank`` of shape ``(A, out)``. Manifold
    (generator) :math:`i` is the network that uses row :math:`i` of every bank; every other module
    (BatchNorm, convolutions) is shared by all A generators. The model is returned wrapped in a
    :class:`QuotientModel`.

    Initialisation: every bank row starts from the layer's existing bias (zero for ``bias=False``)
    plus independent :math:`\mathcal N(0, \sigma^2)` noise. Default ``init_std=None`` uses
    :math:`\sigma = 1/\sqrt{3\,\text{in\_features}}`, the spread of ``nn.Linear``'s own default
    bias initialisation: training from scratch then starts as A independently initialised biases
    (distinct manifolds from step one) at no unusual scale. ``init_std=0`` copies the bias exactly,
    so a pretrained generator keeps its function on every manifold.

    Args:
        model: the user's generator/decoder (any ``nn.Module``).
        num_biases: A >= 1, the number of manifolds.
        include: fnmatch pattern(s) over ``model.named_modules()`` paths; only matching Linear
            layers are converted (default: all).
        exclude: pattern(s) of Linear layers to leave alone (e.g. a VAE's ``'encoder.*'``).
        init_std: std of the per-manifold bias noise (see above).

    Example::

        >>> import torch, qmm_plugin
        >>> g = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.LeakyReLU(0.2), torch.nn.Linear(64, 784))
        >>> q = qmm_plugin.convert(g, num_biases=10)
        >>> x = q(torch.randn(16, 8))                # each sample on a random manifold
        >>> x0 = q(torch.randn(16, 8), manifold=0)   # all on manifold 0
        >>> loss = -x.mean() + 0.05 * q.ba_regularizer()
    """
    if isinstance(num_biases, bool) or not isinstance(num_biases, int):
        raise TypeError(f"num_biases must be an int >= 1 (the number of manifolds A), got {num_biases!r}")
    if num_biases < 1:
        raise ValueError(f"num_biases must be >= 1 (the number of manifolds A), got {num_biases}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, QuotientModel) or any(isinstance(m, MultiBiasLinear) for m in model.modules()):
        raise ValueError(
            "convert: the model is already converted (it contains MultiBiasLinear layers); use the "
            "existing QuotientModel, or q.merge(manifold=i) to get a plain model back first")
    if init_std is not None:
        init_std = check_real(init_std, "init_std", low=0.0,
                              meaning="std of the per-manifold bias noise; None for the default")
    chosen = _select_linears(model, _as_patterns(include, "include"), _as_patterns(exclude, "exclude"))
    for path, linear in chosen:
        layer = MultiBiasLinear.from_linear(linear, num_biases, init_std)
        layer.train(linear.training)
        if path == "":
            model = layer
        else:
            _set_submodule(model, path, layer)
        layer.path = path
    return QuotientModel(model, num_biases)


class QuotientModel(nn.Module):
    """A user's model whose Linear layers carry A biases: A generators sharing every weight.

    Returned by :func:`convert`; calls the wrapped model's forward unchanged. Attribute look-ups
    it does not know fall through to the wrapped model (``q.z_dim`` works if the model has one).

    Forward: ``q(*args, manifold=None, biases=None, **kwargs)``

    * ``manifold=None``: each sample draws its manifold ``i ~ Uniform{0..A-1}`` (ancestral
      sampling); the draw is kept in ``q.last_manifold`` (``(B,)``).
    * ``manifold=i`` (int) or a ``(B,)`` integer tensor: the manifold of each sample.
    * ``biases={path: tensor}``: explicit bias vectors per layer, ``(B, out)`` or ``(out,)``
      (inversion and derived manifolds, Eq. 3). Layers not in the dict need ``manifold=``.
    * ``return_regularizer=True``: return ``(output, R_BA)``, with R_BA (Eq. 2, default ``eps``)
      computed inside the same op calls as the forward
      (:func:`~qmm_plugin.ops.multi_bias_linear_spread`). Same value as
      :meth:`ba_regularizer`, but its backward shares the layers' weight-gradient buffers, which
      makes a regularized generator step cheaper (``benchmarks/run.py``). Its gradient flows
      through this forward's graph: backpropagate it together with the loss on ``output``.
      First-order gradients only (``create_graph=True`` raises; the separate form has any order).

    Example::

        >>> import torch, qmm_plugin
        >>> q = qmm_plugin.convert(torch.nn.Sequential(torch.nn.Linear(4, 6)), num_biases=3)
        >>> x, r_ba = q(torch.randn(5, 4), return_regularizer=True)
        >>> torch.allclose(r_ba, q.ba_regularizer())
        True
    """

    def __init__(self, model: nn.Module, num_biases: int) -> None:
        super().__init__()
        self.model = model
        self.num_biases = num_biases
        self.last_manifold: Tensor | None = None
        layers = self.multi_bias_layers()
        self._out_features = {p: m.out_features for p, m in layers.items()}
        self._layer_at = layers
        # the layers a forward hands its ManifoldSelection to (no module walk per call)
        self._layers: tuple[MultiBiasLinear, ...] = tuple(layers.values())

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # ------------------------------------------------------------------------------ structure
    def multi_bias_layers(self) -> dict[str, MultiBiasLinear]:
        """``{path: MultiBiasLinear}``, paths as in the wrapped model's ``named_modules()``."""
        return {p: m for p, m in self.model.named_modules() if isinstance(m, MultiBiasLinear)}

    # -------------------------------------------------------------------------------- forward
    def _check_manifold(self, manifold: Manifold | None) -> None:
        a = self.num_biases
        if manifold is None:
            return
        if isinstance(manifold, bool) or not isinstance(manifold, (int, Tensor)):
            raise TypeError(f"manifold must be an int or a (B,) integer tensor, got {type(manifold).__name__}")
        if isinstance(manifold, int):
            if not 0 <= manifold < a:
                raise ValueError(f"manifold={manifold} is out of range: this model has A={a} manifolds (0..{a - 1})")
            return
        if manifold.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"manifold tensor must have dtype torch.long (or int32), got {manifold.dtype}; "
                            "use manifold.long()")
        if manifold.dim() != 1:
            raise ValueError(f"manifold tensor must be 1-D with one entry per sample, got shape {tuple(manifold.shape)}")
        # length, device and range are checked by the first layer, where the batch is known

    def _check_biases(self, biases: dict[str, Tensor], manifold: Manifold | None) -> None:
        if not isinstance(biases, dict):
            raise TypeError(f"biases must be a dict {{layer path: tensor}}, got {type(biases).__name__}")
        unknown = set(biases) - set(self._out_features)
        if unknown:
            raise KeyError(f"biases has unknown layer path(s) {sorted(unknown)}; the converted layers are "
                           f"{sorted(self._out_features)}")
        missing = set(self._out_features) - set(biases)
        if missing and manifold is None:
            raise ValueError(f"biases covers {sorted(biases)} but not {sorted(missing)}; give those too, or "
                             "pass manifold= for the layers left out")
        for path, b in biases.items():
            check_explicit_bias(b, self._layer_at[path].weight, f"biases['{path}']")

    def forward(self, *args: Any, manifold: Manifold | None = None, biases: dict[str, Tensor] | None = None,
                return_regularizer: bool = False, **kwargs: Any) -> Any:
        self._check_manifold(manifold)
        if biases is not None:
            self._check_biases(biases, manifold)
        if not isinstance(return_regularizer, bool):
            raise TypeError(f"return_regularizer must be True or False, got {return_regularizer!r}")
        selection = ManifoldSelection(self.num_biases, manifold=manifold, biases=biases,
                                      spreads={} if return_regularizer else None)
        layers = self._layers
        for m in layers:
            m.selection = selection
        try:
            out = self.model(*args, **kwargs)
        finally:
            for m in layers:
                m.selection = None
        self.last_manifold = selection.index
        if return_regularizer:
            return out, self._regularizer(DEFAULT_EPS, selection.spreads)
        return out

    # ---------------------------------------------------------------------------- regularizer
    def ba_regularizer_terms(self, eps: float = DEFAULT_EPS) -> dict[str, Tensor]:
        """Per-layer terms of Eq. 2 (for logging): ``{path: log(tr cov(W_l^T a_l) + eps)}``."""
        return ba_regularizer_terms(self.multi_bias_layers(), eps)

    def ba_regularizer(self, eps: float = DEFAULT_EPS) -> Tensor:
        r"""The bias-aligning regularizer, Eq. 2: :math:`R_{BA} = \sum_l \log \operatorname{tr}
        \operatorname{cov}_i(W_l^\top a_l^{(i)})` (with ``eps`` inside the log; see
        :mod:`qmm_plugin.regularizer`). Add ``lambda * q.ba_regularizer()`` to the generator loss,
        or take it from the forward, ``out, r_ba = q(z, return_regularizer=True)`` (same value,
        cheaper backward).
        """
        return self._regularizer(eps, None)

    def _regularizer(self, eps: float, spreads: dict[str, Tensor] | None) -> Tensor:
        """Eq. 2 summed over layers; ``spreads``: those a forward already computed (fused op)."""
        return torch.stack(list(ba_regularizer_terms(self.multi_bias_layers(), eps, spreads).values())).sum()

    def tangential_spread(self) -> dict[str, float]:
        """Exact per-layer ``tr cov(a_par)`` in float64 (the quantity Theorem 1 bounds)."""
        return tangential_spread(self.multi_bias_layers())

    # ---------------------------------------------------------------------------------- export
    def merge(self, manifold: int) -> nn.Module:
        """A plain copy of the wrapped model in which every MultiBiasLinear is an ``nn.Linear``
        carrying bias ``manifold``: the generator of that one manifold, loadable without
        qmm_plugin (like PEFT's ``merge_and_unload``). Equals ``q(..., manifold=manifold)``.
        """
        if isinstance(manifold, bool) or not isinstance(manifold, int):
            fix = " (for a 0-dim tensor t: merge(int(t)))" if isinstance(manifold, Tensor) else ""
            raise TypeError(f"merge(manifold=...) takes one int in 0..{self.num_biases - 1}: a plain model has "
                            f"one bias per layer; got {type(manifold).__name__}{fix}")
        self._check_manifold(manifold)
        layers = self.multi_bias_layers()
        if "" in layers:
            return layers[""].to_linear(manifold).train(self.model.training)
        for m in layers.values():  # keep the live selection objects out of the copy
            m.selection = None
        merged = copy.deepcopy(self.model)
        for path, m in layers.items():
            _set_submodule(merged, path, m.to_linear(manifold).train(m.training))
        return merged

    # ------------------------------------------------------------------------------- inversion
    def invert(self, x: Tensor, **kwargs: Any) -> Inversion:
        """Encode images by Eq. 3; see :func:`qmm_plugin.inversion.invert` for the arguments."""
        from .inversion import invert

        return invert(self, x, **kwargs)

    def sample_manifold(self, inv: Inversion, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` fresh samples on each inverted image's derived manifold (same biases, new z;
        Fig. 5-6): ``(B, n, *image)``. See :func:`qmm_plugin.inversion.sample_manifold`."""
        from .inversion import sample_manifold

        return sample_manifold(self, inv, n, generator=generator)

    def extra_repr(self) -> str:
        return f"num_biases={self.num_biases}, layers={list(self._out_features)}"
