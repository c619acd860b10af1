"""Per-call manifold routing: which bias row each multi-bias layer of a model uses in one call.

A converted model's layers share a :class:`ModelKey` with the model. A forward of the model
opens a :class:`ManifoldSelection` (the manifold of every sample of that call) under its key in a
:class:`contextvars.ContextVar`; every layer of the model looks its key up there. The state
belongs to the call's context, never to a module object, so concurrent calls from several
threads (each thread has its own context) cannot see or overwrite each other's manifolds, and
a nested call of another converted model routes its own layers only.

:func:`use_manifold` pins a manifold for every forward of a model inside a ``with`` block, for
library code that samples through its own methods.

``torch.compile`` cannot trace :class:`~contextvars.ContextVar` methods; while Dynamo traces a
forward the selection is kept in a plain dict instead (Dynamo traces one frame at a time under
its own lock, and the compiled graph takes the selection's tensors as values, not the dict).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import Tensor, nn

from .ops import functorch_transforms_active

__all__ = ["ModelKey", "ManifoldSelection", "Manifold", "use_manifold", "selection_for", "open_selection",
           "close_selection", "check_manifold"]

#: A manifold choice: one index for the whole batch, or a ``(B,)`` integer tensor.
Manifold = int | Tensor


class ModelKey:
    """The identity of one converted model, shared by the model and its multi-bias layers.

    Holds the model's number of manifolds A, the manifold index of its last call
    (``last_manifold``) and the paths :func:`~qmm_plugin.convert` skipped (``skipped``). ``copy.deepcopy`` and pickling copy it together with the model, so a
    copy (an EMA generator) routes its own layers.
    """

    def __init__(self, num_biases: int) -> None:
        self.num_biases = num_biases
        self.last_manifold: Tensor | None = None
        self.skipped: tuple[str, ...] = ()


@dataclass
class ManifoldSelection:
    """Which bias every converted layer uses during one forward call.

    ``manifold``: ``None`` (sample ``i ~ Uniform{0..A-1}`` per sample, drawn once per call and
    shared by every layer), an ``int`` or a ``(B,)`` integer tensor. ``biases``: explicit bias
    rows per layer path. ``index`` is the resolved ``(B,)`` index, filled by the first layer that
    runs (the batch size is only known there). ``spreads``: when a dict (the call asked for the
    regularizer), each bank layer's first call stores its bias spread (Eq. 2) there by path,
    computed with its output (:func:`~qmm_plugin.ops.bank_linear_spread`).
    """

    num_biases: int
    manifold: Manifold | None = None
    biases: dict[str, Tensor] | None = None
    index: Tensor | None = field(default=None)
    spreads: dict[str, Tensor] | None = None

    def resolve_index(self, x: Tensor, path: str) -> Tensor:
        """The ``(B,)`` manifold index for the layer at ``path`` whose input is ``x`` (``B = x.shape[0]``)."""
        index = self.index
        batch = x.shape[0]
        first = index is None
        if index is None:
            if self.manifold is None:
                index = torch.randint(0, self.num_biases, (batch,), device=x.device)
            elif isinstance(self.manifold, int):
                index = torch.full((batch,), self.manifold, dtype=torch.long, device=x.device)
            else:
                index = self.manifold
            self.index = index
        if index.shape[0] != batch:
            raise ValueError(
                f"layer '{path}' got a batch of {batch} samples but the manifold index has "
                f"{index.shape[0]} entries; pass manifold= with one entry per sample (shape ({batch},)) "
                f"or an int for the whole batch")
        # .is_cpu first (~0.07 us) instead of building two torch.device objects (~1.6 us) on every
        # layer call; the full comparison only runs off the CPU
        if index.is_cpu != x.is_cpu or (not x.is_cpu and index.device != x.device):
            raise ValueError(
                f"layer '{path}': the manifold index is on {index.device} but the input is on "
                f"{x.device}; move the index with .to({str(x.device)!r})")
        # the range check reads the values on the host: not possible while compiling or inside a
        # torch.func transform (vmap), where the bank gather itself refuses an index out of range
        if (first and isinstance(self.manifold, Tensor) and batch > 0 and not torch.compiler.is_compiling()
                and not functorch_transforms_active()):
            lo, hi = int(index.min()), int(index.max())
            if lo < 0 or hi >= self.num_biases:
                raise ValueError(
                    f"manifold index out of range: values span {lo}..{hi} but this model has "
                    f"A={self.num_biases} manifolds (valid 0..{self.num_biases - 1})")
        return index


def check_manifold(manifold: object, num_biases: int) -> None:
    """Refuse a manifold choice that is not ``None``, an int in ``[0, A)`` or a 1-D integer tensor
    (its length, device and range are checked by the first layer, where the batch is known)."""
    a = num_biases
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


_EMPTY: Mapping[ModelKey, object] = MappingProxyType({})
#: the open selections of the calls running in this context, by model
_ACTIVE: ContextVar[Mapping[ModelKey, ManifoldSelection]] = ContextVar("qmm_active_selections", default=_EMPTY)
#: manifolds pinned by use_manifold in this context, by model
_PINNED: ContextVar[Mapping[ModelKey, Manifold]] = ContextVar("qmm_pinned_manifolds", default=_EMPTY)
#: the open selections while torch.compile traces a forward (Dynamo cannot trace ContextVar)
_TRACING: dict[ModelKey, ManifoldSelection] = {}


@torch.compiler.disable
def _pinned(key: ModelKey) -> Manifold | None:
    # a graph break under torch.compile: the pinned value is read from the context at run time
    return _PINNED.get().get(key)


#: how many use_manifold blocks are open in any thread: a compiled forward reads the pins (a graph
#: break) only while this is not 0 (Dynamo guards on the value, so opening a block recompiles)
_PINS_OPEN = 0
_PINS_LOCK = threading.Lock()


def pinned_manifold(key: ModelKey) -> Manifold | None:
    """The manifold :func:`use_manifold` pinned for the model of ``key`` in this context, if any."""
    if torch.compiler.is_compiling():
        return _pinned(key) if _PINS_OPEN else None
    return _PINNED.get().get(key)


def open_selection(key: ModelKey, selection: ManifoldSelection) -> object:
    """Make ``selection`` the one the layers of ``key``'s model use until :func:`close_selection`."""
    if torch.compiler.is_compiling():
        previous = _TRACING.get(key)
        _TRACING[key] = selection
        return previous
    return _ACTIVE.set({**_ACTIVE.get(), key: selection})


def close_selection(key: ModelKey, token: object) -> None:
    """Restore what was open before the matching :func:`open_selection`."""
    if isinstance(token, Token):
        _ACTIVE.reset(token)
    elif token is None:
        _TRACING.pop(key, None)
    else:
        _TRACING[key] = token  # type: ignore[assignment]


def active_selection(key: ModelKey) -> ManifoldSelection | None:
    """The selection of the call of ``key``'s model running in this context, if any."""
    if torch.compiler.is_compiling():
        return _TRACING.get(key)
    return _ACTIVE.get().get(key)


def selection_for(key: ModelKey | None) -> ManifoldSelection | None:
    """What a layer of ``key``'s model uses when called without ``manifold=``: the open call's
    selection, else a fresh one for the manifold :func:`use_manifold` pinned, else ``None``."""
    if key is None:
        return None
    selection = active_selection(key)
    if selection is None:
        pinned = pinned_manifold(key)
        if pinned is not None:
            selection = ManifoldSelection(key.num_biases, manifold=pinned)
    return selection


def model_key(model: nn.Module) -> ModelKey:
    """The :class:`ModelKey` of a converted model (the user's object or the returned wrapper)."""
    key = getattr(model, "_qmm_key", None)
    if not isinstance(key, ModelKey):
        raise TypeError(f"{type(model).__name__} is not a converted model; call qmm_plugin.convert(model, "
                        "num_biases=A) first")
    return key


@contextmanager
def use_manifold(model: nn.Module, manifold: Manifold) -> Iterator[None]:
    """Route every forward of ``model`` inside the ``with`` block to ``manifold``.

    ``model``: the converted model (the user's object or the object :func:`~qmm_plugin.convert`
    returned). ``manifold``: an int (the whole batch) or a ``(B,)`` integer tensor. Forwards that
    pass ``manifold=`` or ``biases=`` themselves keep their own choice. For library code that
    samples through its own methods::

        with qmm_plugin.use_manifold(g, 3):
            images = g.generate_images(16)   # the library's own sampler, all on manifold 3

    The pin belongs to the current context (thread), like a forward's own selection.
    """
    key = model_key(model)
    if manifold is None:
        raise TypeError("use_manifold needs a manifold (an int or a (B,) integer tensor), got None")
    check_manifold(manifold, key.num_biases)
    global _PINS_OPEN
    token = _PINNED.set({**_PINNED.get(), key: manifold})
    with _PINS_LOCK:
        _PINS_OPEN += 1
    try:
        yield
    finally:
        _PINNED.reset(token)
        with _PINS_LOCK:
            _PINS_OPEN -= 1
