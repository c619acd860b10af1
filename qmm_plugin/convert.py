r"""Module surgery: turn a user's generator or decoder into A encoder-compatible generators.

:func:`convert` replaces every targeted layer of the user's model (``nn.Linear`` by default,
the paper's choice; convolutions with ``layer_types=``) by its multi-bias counterpart (shared
weight, bank of A biases) and makes the user's own object the converted model: its class is
swapped for a subclass (as ``torch.nn.utils.parametrize`` does) whose ``forward`` decides, per
call, which bias each sample uses (ancestral sampling :math:`i \sim \mathrm{Uniform}\{0..A-1\}`
by default, paper Sec. 5) before running the user's ``forward`` unchanged, and which adds QMM's
methods: ``ba_regularizer()`` (Eq. 2), ``invert(x)`` (Eq. 3), ``merge(i)`` and the rest of
:class:`QuotientMixin`. Library code that holds the object (``self.forward(z)`` inside its own
sampler, a trainer, an EMA copy, DDP) therefore runs QMM's generator. :func:`convert` also
returns a :class:`QuotientModel`, a thin wrapper with the same methods.
"""

from __future__ import annotations

import copy
import fnmatch
import threading
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import check_real
from .conv import MultiBiasConv2d, MultiBiasConvTranspose2d
from .inversion import Inversion, invert
from .layer import MultiBiasLayer, MultiBiasLinear, check_explicit_bias
from .regularizer import DEFAULT_EPS, ba_regularizer_terms, tangential_spread
from .routing import (Manifold, ManifoldSelection, ModelKey, active_selection, check_manifold, close_selection,
                      open_selection, pinned_manifold)
from .sampling import sample_manifold


__all__ = ["convert", "QuotientModel", "QuotientMixin", "MULTI_BIAS_TYPES", "register_layer_type"]

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


#: plain layer class -> its multi-bias class. A new layer type is one MultiBiasLayer subclass
#: (with ``from_plain``) and one entry here (:func:`register_layer_type`).
MULTI_BIAS_TYPES: dict[type[nn.Module], type[MultiBiasLayer]] = {
    nn.Linear: MultiBiasLinear, nn.Conv2d: MultiBiasConv2d, nn.ConvTranspose2d: MultiBiasConvTranspose2d}


def register_layer_type(plain: type[nn.Module], multi_bias: type[MultiBiasLayer]) -> None:
    """Let :func:`convert` turn ``plain`` layers (and subclasses) into ``multi_bias`` layers."""
    if not (isinstance(multi_bias, type) and issubclass(multi_bias, MultiBiasLayer)):
        raise TypeError(f"register_layer_type: {multi_bias!r} is not a MultiBiasLayer subclass")
    MULTI_BIAS_TYPES[plain] = multi_bias


def _multi_bias_class(module: nn.Module, layer_types: tuple[type[nn.Module], ...]) -> type[MultiBiasLayer] | None:
    """The registered multi-bias class for ``module`` if its type is one of ``layer_types``
    (the most derived registered base class wins)."""
    if not isinstance(module, layer_types):
        return None
    for cls in type(module).__mro__:
        if cls in MULTI_BIAS_TYPES:
            return MULTI_BIAS_TYPES[cls]
    return None


def _type_names(types: tuple[type[nn.Module], ...]) -> str:
    return " / ".join(f"nn.{t.__name__}" if t.__module__.startswith("torch.nn") else t.__name__ for t in types)


#: containers whose forward reads a child Linear's ``.weight``/``.bias`` directly (never calls it)
_READS_CHILD_BIAS: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)

_HOOK_REPARAMETRIZATIONS = {
    "SpectralNorm": "torch.nn.utils.spectral_norm", "WeightNorm": "torch.nn.utils.weight_norm"}


def _check_plain_weight(path: str, m: nn.Module) -> None:
    if isinstance(getattr(m, "weight", None), nn.parameter.UninitializedParameter):
        raise ValueError(f"convert: layer '{path}' is an uninitialised lazy layer; run one forward pass first")
    if torch.nn.utils.parametrize.is_parametrized(m):
        raise ValueError(
            f"convert: layer '{path}' carries a parametrization (e.g. spectral_norm); remove it or "
            "exclude the layer — a bias bank needs a plain weight")
    for hook in m._forward_pre_hooks.values():
        name = _HOOK_REPARAMETRIZATIONS.get(type(hook).__name__)
        if name is not None:
            raise ValueError(
                f"convert: layer '{path}' carries the hook-based {name}; remove it first "
                f"({name.replace('spectral_norm', 'remove_spectral_norm').replace('weight_norm', 'remove_weight_norm')}"
                "(layer)) or exclude the layer — a bias bank needs a plain weight")


def _select_layers(model: nn.Module, include: list[str] | None, exclude: list[str] | None,
                   layer_types: tuple[type[nn.Module], ...]
                   ) -> tuple[list[tuple[list[str], nn.Module, type[MultiBiasLayer]]], list[str]]:
    """The layers to convert, each with all the paths it is registered under, and the skipped paths."""
    paths = [p for p, _ in model.named_modules()]
    for kind, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns or []:
            if not any(fnmatch.fnmatchcase(p, pattern) for p in paths):
                raise ValueError(
                    f"convert: {kind} pattern {pattern!r} matches no module path; paths in the model "
                    f"are {[p for p in paths if p]}. Patterns are fnmatch patterns over named_modules() paths, "
                    "e.g. 'decoder.*'")
    readers = {id(child) for m in model.modules() if isinstance(m, _READS_CHILD_BIAS) for child in m.children()}
    all_paths: dict[int, list[str]] = {}
    for p, m in model.named_modules(remove_duplicate=False):
        all_paths.setdefault(id(m), []).append(p)
    candidates = [(p, m, cls) for p, m in model.named_modules()
                  if (cls := _multi_bias_class(m, layer_types)) is not None]
    names = _type_names(layer_types)
    if not candidates:
        kinds = Counter(type(m).__name__ for _, m in model.named_modules() if not list(m.children()))
        raise ValueError(
            f"convert: the model has no {names} layer to convert (found: {dict(kinds) or 'no layers'}). "
            "By default QMM converts nn.Linear layers only (the paper's choice); other layer types get a "
            f"bias bank when listed in layer_types= (convertible: {_type_names(tuple(MULTI_BIAS_TYPES))}).")
    chosen, skipped = [], []
    for p, m, cls in candidates:
        if (include is not None and not _matches(p, include)) or (exclude and _matches(p, exclude)):
            continue
        if id(m) in readers:
            skipped.append(p)
            continue
        chosen.append((all_paths[id(m)], m, cls))
    if skipped:
        warnings.warn(
            f"convert: skipped {skipped}: their parent ({', '.join(t.__name__ for t in _READS_CHILD_BIAS)}) reads "
            ".weight/.bias directly instead of calling the layer, so a bias bank cannot take effect there; they "
            "keep their single bias (shared by all manifolds)", stacklevel=3)
    if not chosen:
        raise ValueError(
            f"convert: include={include} / exclude={exclude} leave no {names} to convert; the candidate "
            f"layers are {[p for p, _, _ in candidates]}")
    for ps, m, _ in chosen:
        _check_plain_weight(ps[0], m)
    return chosen, skipped


def convert(model: nn.Module, num_biases: int, *, include: str | Sequence[str] | None = None,
            exclude: str | Sequence[str] | None = None, init_std: float | None = None,
            layer_types: Sequence[type[nn.Module]] = (nn.Linear,)) -> QuotientModel:
    r"""Give every targeted layer of ``model`` a bank of ``num_biases`` biases (QMM, Sec. 4).

    Each targeted layer is replaced by its multi-bias counterpart (:class:`~qmm_plugin.MultiBiasLinear`
    for ``nn.Linear``; see :data:`MULTI_BIAS_TYPES`) at every path it is registered under (a
    layer registered twice stays one shared layer): it keeps the layer's ``.weight`` Parameter
    (the same object, shared by all manifolds) and gets ``.bias_bank`` of shape ``(A, C)``, ``C``
    the output features (Linear) or channels (convolutions: one bias per channel, as the plain
    layer's). Manifold (generator) :math:`i` is the network that uses row :math:`i` of every bank;
    every other module is shared by all A generators.

    ``model`` itself becomes the converted model (its class is swapped for a subclass, like
    ``torch.nn.utils.parametrize`` does; ``isinstance(model, YourClass)`` stays true): ``model(z)``,
    ``model.forward(z)``, ``model(z, manifold=i)``, ``model.ba_regularizer()``,
    ``model.invert(x)``, ``model.merge(i)`` (:class:`QuotientMixin`). The returned
    :class:`QuotientModel` wraps the same object and offers the same calls. A model that *is*
    one Linear is replaced; use the returned object then.

    Initialisation: every bank row starts from the layer's existing bias (zero for ``bias=False``)
    plus independent :math:`\mathcal N(0, \sigma^2)` noise. Default ``init_std=None`` uses
    :math:`\sigma = 1/\sqrt{3\,\text{fan\_in}}`, the spread of ``nn.Linear``'s own default
    bias initialisation: training from scratch then starts as A independently initialised biases
    (distinct manifolds from step one) at no unusual scale. ``init_std=0`` copies the bias exactly,
    so a pretrained generator keeps its function on every manifold.

    Args:
        model: the user's generator/decoder (any ``nn.Module``).
        num_biases: A >= 1, the number of manifolds.
        include: fnmatch pattern(s) over ``model.named_modules()`` paths; only matching layers are
            converted (default: all).
        exclude: pattern(s) of layers to leave alone (e.g. a VAE's ``'encoder.*'``).
        init_std: std of the per-manifold bias noise (see above).
        layer_types: the plain layer classes to convert (default ``(nn.Linear,)``, the paper's
            choice); ``(nn.Linear, nn.Conv2d, nn.ConvTranspose2d)`` also converts convolutions.

    Linears that ``nn.MultiheadAttention`` holds (its ``out_proj``) are skipped with a warning: it
    reads their ``.bias`` directly. Layers under hook-based ``spectral_norm``/``weight_norm`` or a
    parametrization are refused with the fix.

    Example::

        >>> import torch, qmm_plugin
        >>> g = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.LeakyReLU(0.2), torch.nn.Linear(64, 784))
        >>> q = qmm_plugin.convert(g, num_biases=10)
        >>> x = g(torch.randn(16, 8))                # the user's object: each sample on a random manifold
        >>> x0 = q(torch.randn(16, 8), manifold=0)   # the returned wrapper: all on manifold 0
        >>> loss = -x.mean() + 0.05 * g.ba_regularizer()
    """
    if isinstance(num_biases, bool) or not isinstance(num_biases, int):
        raise TypeError(f"num_biases must be an int >= 1 (the number of manifolds A), got {num_biases!r}")
    if num_biases < 1:
        raise ValueError(f"num_biases must be >= 1 (the number of manifolds A), got {num_biases}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, (QuotientModel, QuotientMixin)) or any(isinstance(m, MultiBiasLayer) for m in model.modules()):
        raise ValueError(
            "convert: the model is already converted (it contains multi-bias layers); use it as it is, "
            "or q.merge(manifold=i) to get a plain model back first")
    if init_std is not None:
        init_std = check_real(init_std, "init_std", low=0.0,
                              meaning="std of the per-manifold bias noise; None for the default")
    types = tuple(layer_types) if not isinstance(layer_types, type) else (layer_types,)
    unknown = [t for t in types if not (isinstance(t, type) and any(issubclass(t, b) for b in MULTI_BIAS_TYPES))]
    if unknown or not types:
        raise ValueError(f"convert: layer_types={layer_types!r} names no convertible layer class; supported: "
                         f"{[t.__name__ for t in MULTI_BIAS_TYPES]} (register others with register_layer_type)")
    chosen, skipped = _select_layers(model, _as_patterns(include, "include"), _as_patterns(exclude, "exclude"), types)
    _check_free_names(model)
    key = ModelKey(num_biases)
    key.skipped = tuple(skipped)
    for paths, plain, cls in chosen:
        layer = cls.from_plain(plain, num_biases, init_std)
        layer.train(plain.training)
        layer.path = paths[0]
        layer.route_key = key
        for path in paths:
            if path == "":
                model = layer
            else:
                _set_submodule(model, path, layer)
    model._qmm_key = key
    model.__class__ = _quotient_class(type(model))
    return QuotientModel(model)


# ------------------------------------------------------------------------ the converted model
def _check_free_names(model: nn.Module) -> None:
    """Refuse a model whose submodules/parameters/buffers carry a name the injected methods use."""
    taken = set(model._modules) | set(model._parameters) | set(model._buffers)
    clash = sorted(taken & set(_MIXIN_NAMES))
    if clash:
        raise ValueError(
            f"convert: the model has members named {clash}, which the converted model's methods "
            f"({', '.join(_MIXIN_NAMES)}) would hide; rename them before converting")


def _check_biases(layers: dict[str, MultiBiasLayer], biases: dict[str, Tensor], manifold: Manifold | None) -> None:
    if not isinstance(biases, dict):
        raise TypeError(f"biases must be a dict {{layer path: tensor}}, got {type(biases).__name__}")
    unknown = set(biases) - set(layers)
    if unknown:
        raise KeyError(f"biases has unknown layer path(s) {sorted(unknown)}; the converted layers are "
                       f"{sorted(layers)}")
    missing = set(layers) - set(biases)
    if missing and manifold is None:
        raise ValueError(f"biases covers {sorted(biases)} but not {sorted(missing)}; give those too, or "
                         "pass manifold= for the layers left out")
    for path, b in biases.items():
        check_explicit_bias(b, layers[path], f"biases['{path}']")


def _routed_forward(self: nn.Module, *args: Any, manifold: Manifold | None = None,
                    biases: dict[str, Tensor] | None = None, return_regularizer: bool = False, **kwargs: Any) -> Any:
    """The converted model's forward: open this call's manifold selection, run the user's forward."""
    key: ModelKey = self._qmm_key
    base_forward = type(self)._qmm_base.forward
    if manifold is None and biases is None and return_regularizer is False:
        if active_selection(key) is not None:  # self.forward(...) from inside a routed call: same manifolds
            return base_forward(self, *args, **kwargs)
        manifold = pinned_manifold(key)
    check_manifold(manifold, key.num_biases)
    if biases is not None:
        _check_biases(QuotientMixin.multi_bias_layers(self), biases, manifold)
    if not isinstance(return_regularizer, bool):
        raise TypeError(f"return_regularizer must be True or False, got {return_regularizer!r}")
    selection = ManifoldSelection(key.num_biases, manifold=manifold, biases=biases,
                                  spreads={} if return_regularizer else None)
    token = open_selection(key, selection)
    try:
        out = base_forward(self, *args, **kwargs)
    finally:
        close_selection(key, token)
    key.last_manifold = selection.index
    if return_regularizer:
        return out, QuotientMixin._regularizer(self, DEFAULT_EPS, selection.spreads)
    return out


class QuotientMixin:
    """The methods a converted model gains (:func:`convert` adds them to the user's object).

    Forward: ``model(*args, manifold=None, biases=None, return_regularizer=False, **kwargs)``

    * ``manifold=None``: each sample draws its manifold ``i ~ Uniform{0..A-1}`` (ancestral
      sampling), once per call for every converted layer; the draw is kept in ``last_manifold``
      (of the returned :class:`QuotientModel`). Inside :func:`~qmm_plugin.use_manifold` the pinned
      manifold is used instead.
    * ``manifold=i`` (int) or a ``(B,)`` integer tensor: the manifold of each sample.
    * ``biases={path: tensor}``: explicit bias vectors per layer, ``(B, C)`` or ``(C,)``
      (inversion and derived manifolds, Eq. 3). Layers not in the dict need ``manifold=``.
    * ``return_regularizer=True``: return ``(output, R_BA)``, with R_BA (Eq. 2, default ``eps``)
      computed with the same layer calls as the forward
      (:func:`~qmm_plugin.ops.multi_bias_linear_spread` for large Linear layers). Same value as
      :meth:`ba_regularizer`; for large layers its backward shares the layers' weight-gradient
      buffers, which makes a regularized generator step cheaper (``benchmarks/run.py``). Its
      gradient flows through this forward's graph: backpropagate it together with the loss on
      ``output``.

    The manifold choice of a call lives in the call's context (:mod:`qmm_plugin.routing`), never
    on the modules: calls from several threads do not mix. Also ``self.forward(...)`` called by
    library code directly routes the same way.
    """

    def multi_bias_layers(self: Any) -> dict[str, MultiBiasLayer]:
        """``{path: layer}`` of the converted layers, paths as in ``named_modules()``."""
        return {p: m for p, m in nn.Module.named_modules(self) if isinstance(m, MultiBiasLayer)}

    def ba_regularizer_terms(self: Any, eps: float = DEFAULT_EPS) -> dict[str, Tensor]:
        """Per-layer terms of Eq. 2 (for logging): ``{path: log(tr cov(W_l^T B a_l) + eps)}``."""
        return ba_regularizer_terms(QuotientMixin.multi_bias_layers(self), eps)

    def ba_regularizer(self: Any, eps: float = DEFAULT_EPS) -> Tensor:
        r"""The bias-aligning regularizer, Eq. 2: :math:`R_{BA} = \sum_l \log \operatorname{tr}
        \operatorname{cov}_i(W_l^\top a_l^{(i)})` (with ``eps`` inside the log; see
        :mod:`qmm_plugin.regularizer`). Add ``lambda * g.ba_regularizer()`` to the generator loss,
        or take it from the forward, ``out, r_ba = g(z, return_regularizer=True)`` (same value).
        """
        return QuotientMixin._regularizer(self, eps, None)

    def _regularizer(self: Any, eps: float, spreads: dict[str, Tensor] | None) -> Tensor:
        """Eq. 2 summed over layers; ``spreads``: those a forward already computed."""
        terms = ba_regularizer_terms(QuotientMixin.multi_bias_layers(self), eps, spreads)
        return torch.stack(list(terms.values())).sum()

    def tangential_spread(self: Any) -> dict[str, float]:
        """Exact per-layer ``tr cov(a_par)`` in float64 (the quantity Theorem 1 bounds)."""
        return tangential_spread(QuotientMixin.multi_bias_layers(self))

    def merge(self: Any, manifold: int) -> nn.Module:
        """A plain copy of the model in which every multi-bias layer is the plain layer carrying
        bias ``manifold``: the generator of that one manifold, loadable without qmm_plugin (like
        PEFT's ``merge_and_unload``). Equals ``model(..., manifold=manifold)``. Weights tied
        between modules stay tied in the copy, shared modules stay shared, and every Parameter
        keeps its ``requires_grad``.
        """
        key: ModelKey = self._qmm_key
        if isinstance(manifold, bool) or not isinstance(manifold, int):
            fix = " (for a 0-dim tensor t: merge(int(t)))" if isinstance(manifold, Tensor) else ""
            raise TypeError(f"merge(manifold=...) takes one int in 0..{key.num_biases - 1}: a plain model has "
                            f"one bias per layer; got {type(manifold).__name__}{fix}")
        check_manifold(manifold, key.num_biases)
        merged = copy.deepcopy(self)
        plain = {id(m): m.to_plain(manifold).train(m.training)
                 for m in nn.Module.modules(merged) if isinstance(m, MultiBiasLayer)}
        if id(merged) in plain:  # the model is one layer
            return plain[id(merged)]
        for path, m in list(nn.Module.named_modules(merged, remove_duplicate=False)):
            if id(m) in plain and path:
                _set_submodule(merged, path, plain[id(m)])
        merged.__class__ = type(merged)._qmm_base
        del merged.__dict__["_qmm_key"]
        return merged

    def invert(self: Any, x: Tensor, **kwargs: Any) -> Inversion:
        """Encode images by Eq. 3; see :func:`qmm_plugin.inversion.invert` for the arguments."""
        return invert(_as_wrapper(self), x, **kwargs)

    def sample_manifold(self: Any, inv: Inversion, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` fresh samples on each inverted image's derived manifold (same biases, new z;
        Fig. 5-6): ``(B, n, *image)``. See :func:`qmm_plugin.sampling.sample_manifold`."""
        return sample_manifold(_as_wrapper(self), inv, n, generator=generator)


_MIXIN_NAMES = tuple(n for n in vars(QuotientMixin) if not n.startswith("__"))


def _as_wrapper(model: nn.Module) -> QuotientModel:
    return model if isinstance(model, QuotientModel) else QuotientModel(model)


def _restore_converted(base: type[nn.Module]) -> nn.Module:
    """Unpickling / deepcopy: an empty instance of the converted class of ``base``."""
    obj = base.__new__(base)
    obj.__class__ = _quotient_class(base)
    return obj


def _reduce_ex(self: nn.Module, protocol: int) -> tuple[Any, ...]:
    return _restore_converted, (type(self)._qmm_base,), self.__getstate__()


_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}
_CLASSES_LOCK = threading.Lock()


def _quotient_class(base: type[nn.Module]) -> type[nn.Module]:
    """The converted class of ``base``: ``base`` first (its own methods win), then
    :class:`QuotientMixin`; ``forward`` routes the call's manifolds. One class per ``base``."""
    with _CLASSES_LOCK:
        cls = _CLASSES.get(base)
        if cls is None:
            cls = type(f"Quotient{base.__name__}", (base, QuotientMixin), {
                "forward": _routed_forward, "_qmm_base": base, "__reduce_ex__": _reduce_ex,
                "__module__": base.__module__, "__qualname__": f"Quotient{base.__qualname__}"})
            _CLASSES[base] = cls
    return cls


class QuotientModel(nn.Module):
    """The object :func:`convert` returns: a thin wrapper around the converted model (``.model``,
    the user's own object), with the same calls (:class:`QuotientMixin`): ``q(z)`` is
    ``model(z)``, ``q.ba_regularizer()`` is ``model.ba_regularizer()``, and so on. Attribute
    look-ups it does not know fall through to the model (``q.z_dim`` works if the model has one).

    Example::

        >>> import torch, qmm_plugin
        >>> q = qmm_plugin.convert(torch.nn.Sequential(torch.nn.Linear(4, 6)), num_biases=3)
        >>> x, r_ba = q(torch.randn(5, 4), return_regularizer=True)
        >>> torch.allclose(r_ba, q.ba_regularizer())
        True
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(getattr(model, "_qmm_key", None), ModelKey):
            raise TypeError("QuotientModel wraps a converted model; use qmm_plugin.convert(model, num_biases=A)")
        self.model = model

    @property
    def num_biases(self) -> int:
        """A, the number of manifolds."""
        return self.model._qmm_key.num_biases

    @property
    def last_manifold(self) -> Tensor | None:
        """The ``(B,)`` manifold index of the model's last call (``None`` before the first)."""
        return self.model._qmm_key.last_manifold

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def multi_bias_layers(self) -> dict[str, MultiBiasLayer]:
        """``{path: layer}``, paths as in the wrapped model's ``named_modules()``."""
        return QuotientMixin.multi_bias_layers(self.model)

    def ba_regularizer_terms(self, eps: float = DEFAULT_EPS) -> dict[str, Tensor]:
        return QuotientMixin.ba_regularizer_terms(self.model, eps)

    def ba_regularizer(self, eps: float = DEFAULT_EPS) -> Tensor:
        return QuotientMixin.ba_regularizer(self.model, eps)

    def tangential_spread(self) -> dict[str, float]:
        return QuotientMixin.tangential_spread(self.model)

    def merge(self, manifold: int) -> nn.Module:
        return QuotientMixin.merge(self.model, manifold)

    def invert(self, x: Tensor, **kwargs: Any) -> Inversion:
        return QuotientMixin.invert(self, x, **kwargs)

    def sample_manifold(self, inv: Inversion, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        return QuotientMixin.sample_manifold(self, inv, n, generator=generator)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def extra_repr(self) -> str:
        key = self.model._qmm_key
        skipped = f", skipped={list(key.skipped)}" if getattr(key, "skipped", ()) else ""
        return f"num_biases={key.num_biases}, layers={list(self.multi_bias_layers())}{skipped}"
