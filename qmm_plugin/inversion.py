r"""Encoding images into the quotient space (Eq. 3), deriving new manifolds, and the explicit
encoder of Proposition 1.

:func:`invert` solves Eq. 3 of the paper for every image of a batch at once,

.. math::

    z^*, \{a_l^*\} = \arg\min_{z, \{a_l\}} \; \lVert x - f(z; \{a_l\}) \rVert^2
        + \mu \sum_l \log \lVert W_l^\top (a_l - \bar a_l) \rVert^2 ,

with free per-image biases :math:`a_l` and :math:`\bar a_l` the mean of the trained biases of
layer :math:`l` (their shared tangential part once the banks are aligned). Fixing
:math:`\{a_l^*\}` and drawing new :math:`z` samples the *derived* manifold of the image
(:func:`sample_manifold`; the operation of the paper's Fig. 5 and 6).

Bias parametrisations (``bias_mode``):

* ``"normal"`` (default): :math:`a_l \in \bar a_l + \operatorname{col}(W_l)^\perp`, kept there
  by projected Adam: after every step :math:`a_l \leftarrow a_l - Q_l Q_l^\top (a_l - \bar a_l)`
  with :math:`Q_l` an orthonormal basis of the column space of :math:`W_l`
  (:func:`~qmm_plugin.regularizer.tangential_basis`). The tangential deviation
  :math:`W_l^\top(a_l - \bar a_l)` is exactly zero (to float precision): the :math:`\mu \to \infty`
  limit of Eq. 3. The projection is two thin matmuls per layer and step (``((a - a_bar) Q) Q^T``);
  no ``(out, out)`` matrix is formed. (Projecting once per step, rather than parametrising
  :math:`a = \bar a + (I - QQ^\top) v` inside the forward pass, halves the projection cost: the
  backward pass needs no projection.) When a layer has ``out <= in`` and full rank, its normal space
  is empty and its bias stays at :math:`\bar a_l`.
* ``"penalty"``: the paper's soft log penalty with weight ``mu`` (``eps = 1e-8`` inside the log,
  as in Eq. 2, so that :math:`a_l = \bar a_l` gives a finite value).

Why ``"normal"`` is the default: with ``"penalty"`` the reconstruction converges but the latent
code does not — z is only identifiable once the tangential part of every bias is pinned, and the
soft penalty leaves it loose. ``benchmarks/bench_inversion.py`` measures both modes on an aligned
MLP and writes the z errors to ``benchmarks/results/inversion.md``.

Identifiability: z and the normal parts of the biases are determined by the image only when the
generator is injective in them, e.g. when every layer after the converted ones is injective (the
aligned MLPs of ``tests/test_inversion.py``, where z is recovered). On the paper's MNIST generator the free
normal space of FC6272 alone has 6272 - 1024 = 5248 dimensions, more than the 784 pixels, and the
convolutional tail is not injective: almost every image is reproduced exactly by many
:math:`(z, \{a_l\})`, so Eq. 3 reconstructs the image but returns *one* of these codes, not the
generating one (``benchmarks/results/inversion.md``: reconstruction error < 0.1 % while the z error
stays near 100 %). Which code comes back then depends on the start (``seed``, ``restarts``).

The fit runs the generator in eval mode (BatchNorm in train mode would couple the images of a
batch), with every parameter frozen; modes and ``requires_grad`` flags are restored afterwards and
no ``.grad`` is written. Adam's update is element-wise, so the per-image objectives stay
independent although the whole batch (times restarts, times manifolds for
``manifolds="trained"``) is one forward/backward per step. The fit stops when every image has
converged. Each image (each candidate row) has its own Adam step size: when its best objective
improved by less than ``tol`` (relative) over the last ``window`` steps, the row restarts from its
best point with half the step size, and it is done once the step size fell below
``lr * min_lr_ratio``; ``steps`` is the cap. The schedule is a stopping rule first: on the aligned
MLP of the benchmark the loss keeps improving by more than ``tol`` per window for thousands of
steps, the schedule never fires there and the z error matches plain Adam at ``lr = 0.1``
(``benchmarks/results/inversion.md``, section 3). A done image's
parameters are frozen, so an image's result does not depend on the other images of its batch.
"""

from __future__ import annotations

import math
import time
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._checks import check_finite_state, check_int, check_real
from .layer import MultiBiasLayer, MultiBiasLinear
from .regularizer import DEFAULT_EPS, tangential_basis
from .routing import ModelKey

if TYPE_CHECKING:
    from .convert import QuotientModel

__all__ = ["Inversion", "invert", "sample_manifold", "analytic_encoder", "AnalyticEncoder"]

BiasMode = Literal["normal", "penalty"]
ManifoldMode = Literal["free", "trained"]
#: std of the noise added to a_bar to start the penalty-mode biases (Eq. 3 is -inf-steep at a_bar)
PENALTY_INIT_STD = 0.01


# ------------------------------------------------------------------------------------ result
@dataclass
class Inversion:
    """The result of :func:`invert` for a batch of B images.

    Attributes:
        z: ``(B, d_z)`` recovered latent codes.
        biases: ``{layer path: (B, out)}`` recovered per-image biases :math:`a_l^*` (the image's
            derived manifold); ``q(z, biases=inv.biases)`` regenerates the images.
        manifold: ``(B,)`` the trained manifold nearest to each image. With
            ``manifolds="trained"`` it is the manifold of the best fit. With ``manifolds="free"``
            it is :math:`\\arg\\min_i \\lVert x - f(z^*; a^{(i)}) \\rVert^2`: the trained manifold that
            reconstructs the image best at the recovered code :math:`z^*` (one batched forward
            per manifold).
        loss: ``(B,)`` the minimised objective per image: :math:`\\lVert x - f\\rVert^2` (sum
            over pixels), plus the log penalty for ``bias_mode="penalty"``.
        reconstruction: ``f(z; biases)``, same shape as the input images.
        steps: optimisation steps run (the fit stops early once every image has converged).
        fit_seconds: wall time of the optimisation loop (without the set-up: the SVD of every
            weight for ``bias_mode="normal"``, and the final evaluation).
        bias_mode: ``"normal"``, ``"penalty"`` or ``"trained"`` (biases taken from the banks).
    """

    z: Tensor
    biases: dict[str, Tensor]
    manifold: Tensor
    loss: Tensor
    reconstruction: Tensor
    steps: int
    fit_seconds: float
    bias_mode: str
    model_fingerprint: str = field(repr=False)
    model_id: int = field(repr=False)

    def __len__(self) -> int:
        return self.z.shape[0]


def _fingerprint(q: QuotientModel) -> str:
    layers = ",".join(f"{p}:{tuple(m.weight.shape)}" for p, m in q.multi_bias_layers().items())
    return f"A={q.num_biases};{layers}"


def _check_returned(q: object, fn: str) -> None:
    """Refuse anything but the :class:`~qmm_plugin.QuotientModel` that :func:`~qmm_plugin.convert`
    returned: its ``.model`` is a converted model (with a routing key), it is not one itself."""
    model = getattr(q, "model", None)
    if (not isinstance(getattr(q, "_qmm_key", None), ModelKey) or hasattr(type(q), "_qmm_base")
            or not hasattr(type(model), "_qmm_base")):
        hint = f"; on the converted model itself call model.{fn}(...)" if fn == "invert" else ""
        raise TypeError(f"{fn} expects the QuotientModel that qmm_plugin.convert returned, got {type(q).__name__}{hint}")


def _check_owner(q: QuotientModel, inv: Inversion) -> None:
    if not isinstance(inv, Inversion):
        raise TypeError(f"expected an Inversion returned by q.invert(x), got {type(inv).__name__}")
    if inv.model_fingerprint != _fingerprint(q) or inv.model_id != id(q.model):
        raise ValueError(
            "this Inversion was made by another model (layers/A "
            f"{inv.model_fingerprint!r}, this model {_fingerprint(q)!r}); its biases only define a "
            "manifold of the model that inverted the images. Call q.invert(x) with this model first")


# ------------------------------------------------------------------------------------ helpers
@contextmanager
def _frozen_eval(q: nn.Module) -> Iterator[None]:
    """Eval mode and ``requires_grad=False`` everywhere; both restored on exit."""
    modes = [(m, m.training) for m in q.modules()]
    flags = [(p, p.requires_grad) for p in q.parameters()]
    try:
        q.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)


def _param_like(q: nn.Module) -> Tensor:
    for p in q.parameters():
        return p
    raise ValueError("the model has no parameters")


def _infer_z_dim(q: QuotientModel, z_dim: int | None) -> int:
    if z_dim is not None:
        if isinstance(z_dim, bool) or not isinstance(z_dim, int) or z_dim < 1:
            raise ValueError(f"z_dim must be a positive int, got {z_dim!r}")
        return z_dim
    declared = getattr(q.model, "z_dim", None)
    if isinstance(declared, int) and not isinstance(declared, bool):
        return declared
    first = next(iter(q.multi_bias_layers().values()))
    # a convolution first: its input channels (the probe then says whether (B, d) codes fit)
    return first.in_features if isinstance(first, MultiBiasLinear) else first.in_channels


@dataclass(frozen=True)
class _OutputRange:
    """The value range of the generator's images: bounded by a final activation (``exact``) or
    seen in a few samples (``exact=False``); ``source`` says which, for messages."""

    low: float
    high: float
    source: str
    exact: bool


#: Samples drawn by the probe forward of :func:`invert` (shape and value range of the output).
PROBE_SAMPLES = 16
#: Without a known final activation, images whose largest magnitude exceeds this many times the
#: largest magnitude of the probe samples are warned about (e.g. [0, 255] images for a generator
#: that makes values near [-1, 1]).
SAMPLE_RANGE_FACTOR = 10.0


def _activation_range(m: nn.Module) -> tuple[float, float] | None:
    if isinstance(m, nn.Tanh):
        return -1.0, 1.0
    if isinstance(m, nn.Sigmoid):
        return 0.0, 1.0
    if isinstance(m, nn.Hardtanh):  # also ReLU6
        return float(m.min_val), float(m.max_val)
    return None


def _probe_output(q: QuotientModel, z_dim: int, like: Tensor) -> tuple[torch.Size, _OutputRange]:
    """One forward of :data:`PROBE_SAMPLES` codes on random manifolds (fixed seed, the global RNG
    untouched): the image shape and the output range, exact when the output is that of a final
    Tanh/Sigmoid/Hardtanh module."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(PROBE_SAMPLES, z_dim, generator=gen, dtype=like.dtype).to(like.device)
    index = torch.randint(0, q.num_biases, (PROBE_SAMPLES,), generator=gen).to(like.device)
    last: list[tuple[nn.Module, object]] = []

    def hook(m: nn.Module, _args: tuple[object, ...], out: object) -> None:
        last[:] = [(m, out)]

    handles = [m.register_forward_hook(hook) for m in q.model.modules() if not list(m.children())]
    try:
        with _frozen_eval(q), torch.no_grad():
            out = q(z, manifold=index)
    except Exception as err:  # re-raised with the fix
        raise ValueError(
            f"could not run the generator on a latent code of size z_dim={z_dim} ({err}); pass "
            "z_dim= (the generator's latent size) to invert") from err
    finally:
        for h in handles:
            h.remove()
    if not isinstance(out, Tensor):
        raise TypeError(f"invert needs a generator that returns one tensor, got {type(out).__name__}")
    if last:
        module, final = last[0]
        bounds = _activation_range(module)
        same_values = (isinstance(final, Tensor) and final.numel() == out.numel()
                       and final.data_ptr() == out.data_ptr())
        if bounds is not None and same_values:
            return out.shape[1:], _OutputRange(*bounds, f"ends in {type(module).__name__}", exact=True)
    lo, hi = float(out.min()), float(out.max())
    return out.shape[1:], _OutputRange(lo, hi, f"made {PROBE_SAMPLES} samples", exact=False)


def _rescale_hint(x_lo: float, x_hi: float, r: _OutputRange) -> str:
    """``x * a + b`` mapping the usual image range x appears to be in onto ``r`` (or '')."""
    for s_lo, s_hi in ((0.0, 1.0), (-1.0, 1.0), (0.0, 255.0)):
        if s_lo <= x_lo and x_hi <= s_hi and (s_lo, s_hi) != (r.low, r.high):
            scale = (r.high - r.low) / (s_hi - s_lo)
            shift = r.low - s_lo * scale
            mul = f"x * {scale:g}" if scale >= 1 else f"x / {1 / scale:g}"
            add = "" if shift == 0 else f" {'+' if shift > 0 else '-'} {abs(shift):g}"
            return f"; images in [{s_lo:g}, {s_hi:g}]? use {mul}{add}"
    return ""


def _warn_outside_range(x: Tensor, r: _OutputRange) -> None:
    """Warn when the images cannot come from the generator's value range (Eq. 3 then fits
    something else: a tanh generator reaches 0.2 loss on [0, 1] MNIST digits against 2e-4 on
    [-1, 1] ones). Exact range: x beyond it, or x confined to its upper half while the range is
    symmetric around 0 (images in [0, 1] for a tanh generator). Sampled range: x's largest
    magnitude above :data:`SAMPLE_RANGE_FACTOR` times the samples'."""
    x_lo, x_hi = float(x.min()), float(x.max())
    span = r.high - r.low
    if r.exact:
        outside = x_lo < r.low - 1e-3 * span or x_hi > r.high + 1e-3 * span
        upper_half = r.low == -r.high and x_lo >= 0 and x_hi > 0
        if not (outside or upper_half):
            return
        where = "beyond" if outside else "only in the upper half of"
    else:
        scale = max(abs(r.low), abs(r.high))
        if max(abs(x_lo), abs(x_hi)) <= SAMPLE_RANGE_FACTOR * scale:
            return
        where = f"more than {SAMPLE_RANGE_FACTOR:g}x beyond"
    warnings.warn(
        f"invert: the images span [{x_lo:.4g}, {x_hi:.4g}], {where} the values the generator makes "
        f"(it {r.source}: [{r.low:.4g}, {r.high:.4g}]); Eq. 3 then fits the wrong images. Rescale x to the "
        f"generator's range{_rescale_hint(x_lo, x_hi, r) if r.exact else ''}", UserWarning, stacklevel=3)


def _check_images(x: Tensor, shape: torch.Size, like: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor of images (B, {', '.join(map(str, shape))}), got {type(x).__name__}")
    if x.dim() >= 1 and x.shape[0] == 0 and tuple(x.shape[1:]) == tuple(shape):
        raise ValueError(f"x is an empty batch (shape {tuple(x.shape)}); pass at least one image")
    if tuple(x.shape[1:]) != tuple(shape) or x.shape[0] < 1:
        single = tuple(x.shape) == tuple(shape)
        hint = " (a single image? add the batch dimension with x.unsqueeze(0))" if single else ""
        raise ValueError(
            f"x has shape {tuple(x.shape)} but the generator makes images of shape (B, "
            f"{', '.join(map(str, shape))}){hint}; pass a batch of images of that shape")
    if x.device != like.device:
        raise ValueError(f"x is on device {x.device} but the generator is on {like.device}; move x with "
                         f".to({str(like.device)!r})")
    if x.dtype != like.dtype:
        raise TypeError(f"x has dtype {x.dtype} but the generator computes in {like.dtype}; use x.to({like.dtype})")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or inf values; clean the images (e.g. torch.nan_to_num) before inverting")


_BASIS_CACHE: weakref.WeakKeyDictionary[MultiBiasLayer, tuple[tuple[object, ...], Tensor]] = (
    weakref.WeakKeyDictionary())


def _cached_tangential_basis(layer: MultiBiasLayer) -> Tensor:
    """:func:`~qmm_plugin.regularizer.tangential_basis` of the layer's ``bias_operator()`` (its
    weight for a Linear), in its dtype, reused while the weight is unchanged (same storage, shape,
    dtype, device and in-place version counter) and, for a convolution, the input size too: the
    float64 eigendecomposition for the MNIST generator's 6272x1024 weight takes seconds, more than
    a short fit."""
    w = layer.weight
    key = (w.data_ptr(), w._version, tuple(w.shape), w.dtype, w.device, getattr(layer, "input_size", None))
    hit = _BASIS_CACHE.get(layer)
    if hit is not None and hit[0] == key:
        return hit[1]
    basis = tangential_basis(layer.bias_operator()).to(w.dtype)
    _BASIS_CACHE[layer] = (key, basis)
    return basis


class _BiasParams:
    """Per-candidate free biases of every converted layer in one of the two parametrisations."""

    def __init__(self, layers: dict[str, MultiBiasLayer], rows: int, mode: BiasMode, mu: float,
                 gen: torch.Generator) -> None:
        self.mode = mode
        self.mu = mu
        self.mean: dict[str, Tensor] = {p: m.bias_bank.detach().mean(0) for p, m in layers.items()}
        self.layers = layers
        if mode == "normal":  # first call per weight: one SVD per layer (cached afterwards)
            self.basis = {p: _cached_tangential_basis(m) for p, m in layers.items()}
            self.params = {p: self.mean[p].expand(rows, -1).clone().requires_grad_(True) for p in layers}
        else:
            # the log penalty is infinitely steep at a_bar itself: start just off it
            self.params = {p: (self.mean[p] + PENALTY_INIT_STD * torch.randn(
                rows, m.bias_size, generator=gen, dtype=m.weight.dtype).to(m.weight.device)).requires_grad_(True)
                for p, m in layers.items()}

    def biases(self) -> dict[str, Tensor]:
        return dict(self.params)

    @torch.no_grad()
    def project_(self, active: Tensor) -> None:
        """Normal mode: ``a <- a - Q Q^T (a - a_bar)``, the exact tangential constraint (after each
        step), on the rows where ``active`` is true (a done row keeps every bit). Two thin matmuls
        per layer; no ``(out, out)`` projector is formed."""
        if self.mode != "normal":
            return
        for p, a in self.params.items():
            q = self.basis[p]
            a.sub_(torch.where(active.unsqueeze(1), ((a - self.mean[p]) @ q) @ q.t(), 0.0))

    def penalty(self, biases: dict[str, Tensor]) -> Tensor | None:
        """``mu * sum_l log(||W_l^T B_l (a_l - a_bar_l)||^2 + eps)`` per row (penalty mode only;
        ``B_l`` the identity for a Linear, the broadcast over positions for a convolution)."""
        if self.mode != "penalty" or self.mu == 0:
            return None
        terms = [torch.log(self.layers[p].bias_adjoint(b - self.mean[p]).pow(2).sum(1) + DEFAULT_EPS)
                 for p, b in biases.items()]
        return self.mu * torch.stack(terms).sum(0)


class _RowAdam:
    """Adam (Kingma & Ba) with one learning rate per row (image candidate) of every parameter.

    Adam's update is element-wise, so rows never interact; the per-row step size lets each image
    follow its own reduce-on-plateau schedule inside one batched fit. Rows masked out by
    ``active=False`` keep their parameters and moments.
    """

    def __init__(self, params: list[Tensor], lr: float, rows: int, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.params = params
        self.lr = torch.full((rows,), lr, device=params[0].device, dtype=params[0].dtype)
        self.betas = betas
        self.eps = eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self, active: Tensor) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        rate = (self.lr * active).unsqueeze(1) / c1
        for p, m, v in zip(self.params, self.m, self.v, strict=True):
            if p.grad is None:
                continue
            m.lerp_(p.grad, 1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            p.sub_(rate * m / (v.div(c2).sqrt_().add_(self.eps)))


def _per_image_sq_error(x: Tensor, y: Tensor) -> Tensor:
    return (x - y).pow(2).flatten(1).sum(1)


# ------------------------------------------------------------------------------------ invert
def invert(q: QuotientModel, x: Tensor, *, steps: int = 6000, lr: float = 0.1, mu: float = 0.05,
           restarts: int = 1, manifolds: ManifoldMode = "free", bias_mode: BiasMode = "normal",
           tol: float = 1e-3, window: int = 50, min_lr_ratio: float = 1e-3, z_dim: int | None = None,
           seed: int | None = None, progress: bool = False) -> Inversion:
    r"""Encode a batch of images by Eq. 3: recover each image's code and (derived) manifold.

    Args:
        q: the converted generator.
        x: ``(B, *image_shape)`` images in the generator's output range, on its device and dtype.
            Finite values only (else ``ValueError``). Images outside the range a final
            Tanh/Sigmoid/Hardtanh module produces (or, without one, far beyond the range of a
            few samples) get a ``UserWarning`` naming both ranges and the rescaling.
        steps: cap on Adam steps (the fit stops earlier once every image converged).
        lr: Adam learning rate (paper: 0.1).
        mu: weight of the log penalty of Eq. 3 (``bias_mode="penalty"`` only; paper: 0.05).
        restarts: independent random starts per image; the best objective per image is kept.
        manifolds: ``"free"``: free per-image biases (Eq. 3; the image may lie on an untrained,
            derived manifold). ``"trained"``: biases restricted to the A trained ones; every
            (restart, manifold) pair is fitted over z and the best is kept per image.
        bias_mode: ``"normal"`` (default; exact tangential constraint, the :math:`\mu\to\infty`
            limit that recovers the quotient map) or ``"penalty"`` (the paper's soft penalty).
            See the module docstring for why.
        tol, window, min_lr_ratio: per-image reduce-on-plateau schedule and stop: when an image's
            best objective improved by less than ``tol`` (relative) over the last ``window`` steps,
            it restarts from its best point with half its step size; it is done once its step size
            fell below ``lr * min_lr_ratio``. The fit ends when every image is done (or at ``steps``).
        z_dim: latent size (default: ``q.model.z_dim`` if the model has one, else the input size
            of the first converted layer).
        seed: seed of the random starting codes :math:`z \sim \mathcal N(0, I)`.
        progress: show a tqdm bar.

    Runs with autograd on also when called under ``torch.no_grad()`` or
    ``torch.inference_mode()``. Refuses a model with a NaN/inf parameter or buffer (the fit would
    only return NaN).

    Returns:
        an :class:`Inversion`.

    Example::

        >>> import torch, qmm_plugin
        >>> g = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.LeakyReLU(0.2), torch.nn.Linear(16, 20))
        >>> q = qmm_plugin.align_biases_(qmm_plugin.convert(g, num_biases=3))
        >>> inv = q.invert(q(torch.randn(4, 2), manifold=1), steps=300, seed=0)
        >>> inv.z.shape, inv.manifold.shape
        (torch.Size([4, 2]), torch.Size([4]))
    """
    _check_returned(q, "invert")
    check_int(steps, "steps", meaning="cap on Adam steps")
    check_int(restarts, "restarts", meaning="random starts per image")
    check_int(window, "window", meaning="steps per plateau check")
    mu = check_real(mu, "mu", low=0.0, meaning="the weight of the log penalty of Eq. 3")
    lr = check_real(lr, "lr", low=0.0, low_open=True, meaning="Adam learning rate")
    tol = check_real(tol, "tol", low=0.0, meaning="relative improvement per window that counts as progress")
    min_lr_ratio = check_real(min_lr_ratio, "min_lr_ratio", low=0.0, high=1.0,
                              meaning="an image is done once its step size fell below lr * min_lr_ratio")
    if manifolds not in ("free", "trained"):
        raise ValueError(f"manifolds must be 'free' (Eq. 3, free biases) or 'trained' (the A trained biases), "
                         f"got {manifolds!r}")
    if bias_mode not in ("normal", "penalty"):
        raise ValueError(f"bias_mode must be 'normal' (exact tangential constraint) or 'penalty' (the paper's "
                         f"soft log penalty), got {bias_mode!r}")
    like = _param_like(q)
    check_finite_state(q, "invert")
    d = _infer_z_dim(q, z_dim)
    shape, out_range = _probe_output(q, d, like)
    _check_images(x, shape, like)
    _warn_outside_range(x, out_range)
    # evaluation code runs under no_grad/inference_mode as a rule; the fit needs autograd
    with torch.inference_mode(False), torch.enable_grad():
        return _fit_eq3(q, x.clone() if x.is_inference() else x, d, steps=steps, lr=lr, mu=mu,
                        restarts=restarts, manifolds=manifolds, bias_mode=bias_mode, tol=tol, window=window,
                        min_lr_ratio=min_lr_ratio, seed=seed, progress=progress)


def _fit_eq3(q: QuotientModel, x: Tensor, d: int, *, steps: int, lr: float, mu: float, restarts: int,
             manifolds: ManifoldMode, bias_mode: BiasMode, tol: float, window: int, min_lr_ratio: float,
             seed: int | None, progress: bool) -> Inversion:
    """The body of :func:`invert` once its arguments are checked (autograd on)."""
    like = _param_like(q)
    layers = q.multi_bias_layers()
    a = q.num_biases
    b = x.shape[0]
    per_image = restarts * (a if manifolds == "trained" else 1)  # candidates per image
    rows = b * per_image
    gen = torch.Generator(device="cpu")
    if seed is not None:
        gen.manual_seed(seed)
    else:
        gen.seed()
    # (B, R, d): image b's starts do not depend on the batch size (prefix-consistent draws)
    z0 = torch.randn(b, restarts, d, generator=gen, dtype=like.dtype).to(like.device)
    if manifolds == "trained":
        z0 = z0.unsqueeze(2).expand(b, restarts, a, d)
        index = torch.arange(a, device=like.device).repeat(b * restarts)
    x_rep = x.detach().repeat_interleave(per_image, 0)

    with _frozen_eval(q):
        z = z0.reshape(rows, d).clone().requires_grad_(True)
        bias_params = _BiasParams(layers, rows, bias_mode, float(mu), gen) if manifolds == "free" else None
        params = [z] + (list(bias_params.params.values()) if bias_params else [])

        def objective() -> tuple[Tensor, dict[str, Tensor] | None, Tensor]:
            if bias_params is None:
                out = q(z, manifold=index)
                return _per_image_sq_error(x_rep, out), None, out
            biases = bias_params.biases()
            out = q(z, biases=biases)
            loss = _per_image_sq_error(x_rep, out)
            pen = bias_params.penalty(biases)
            return (loss if pen is None else loss + pen), biases, out

        opt = _RowAdam(params, lr, rows)
        best = torch.full((rows,), math.inf, device=like.device, dtype=like.dtype)
        best_params = [p.detach().clone() for p in params]
        window_ref = best.clone()
        done = torch.zeros(rows, dtype=torch.bool, device=like.device)
        ran = 0
        bar = tqdm(range(steps), desc="invert (Eq. 3)", disable=not progress, leave=False)
        t0 = time.perf_counter()
        for step in bar:
            for p in params:
                p.grad = None
            loss, _, _ = objective()
            with torch.no_grad():
                better = (loss < best) & ~done
                best = torch.where(better, loss.detach(), best)
                for p, bp in zip(params, best_params, strict=True):
                    bp.copy_(torch.where(better.unsqueeze(1), p.detach(), bp))
            loss.sum().backward()
            opt.step(~done)
            if bias_params is not None:
                bias_params.project_(~done)
            ran = step + 1
            if ran % window == 0:
                with torch.no_grad():
                    stalled = (window_ref - best <= tol * best.abs()) & ~done
                    window_ref = best.clone()
                    # plateau: restart a stalled image from its best point with half the step size;
                    # it is done once the step size fell below lr * min_lr_ratio
                    opt.lr[stalled] *= 0.5
                    for p, bp in zip(params, best_params, strict=True):
                        p.copy_(torch.where(stalled.unsqueeze(1), bp, p))
                    done |= opt.lr < lr * min_lr_ratio
                if progress:
                    bar.set_postfix(loss=f"{float(best.mean()):.4g}", done=f"{float(done.float().mean()):.0%}")
                if bool(done.all()):
                    break
        fit_seconds = time.perf_counter() - t0
        bar.close()

        with torch.no_grad():
            for p, bp in zip(params, best_params, strict=True):
                p.copy_(bp)
            loss, biases, out = objective()
            pick = loss.view(b, per_image).argmin(1)
            rows_kept = torch.arange(b, device=like.device) * per_image + pick
            z_best = z.detach()[rows_kept]
            if biases is None:
                manifold = index[rows_kept]
                biases_best = {p: m.bias_bank.detach()[manifold] for p, m in layers.items()}
            else:
                biases_best = {p: v.detach()[rows_kept] for p, v in biases.items()}
                manifold = _nearest_trained(q, x, z_best)
            result = Inversion(
                z=z_best, biases=biases_best, manifold=manifold, loss=loss.detach()[rows_kept],
                reconstruction=out.detach()[rows_kept], steps=ran, fit_seconds=fit_seconds,
                bias_mode=bias_mode if manifolds == "free" else "trained",
                model_fingerprint=_fingerprint(q), model_id=id(q.model))
    return result


def _nearest_trained(q: QuotientModel, x: Tensor, z: Tensor) -> Tensor:
    r""":math:`\arg\min_i \lVert x - f(z; a^{(i)}) \rVert^2` per image, in one batched forward."""
    a, b = q.num_biases, x.shape[0]
    index = torch.arange(a, device=x.device).repeat(b)
    out = q(z.repeat_interleave(a, 0), manifold=index)
    return _per_image_sq_error(x.repeat_interleave(a, 0), out).view(b, a).argmin(1)


# ------------------------------------------------------------------------------ derived manifold
def sample_manifold(q: QuotientModel, inv: Inversion, n: int, *, generator: torch.Generator | None = None
                    ) -> Tensor:
    """Draw ``n`` fresh samples on each image's derived manifold (Fig. 5, 6): same biases
    ``inv.biases``, new codes :math:`z \\sim \\mathcal N(0, I)`.

    Runs without gradient, in eval mode (restored afterwards) so that BatchNorm does not couple
    the samples. Returns ``(B, n, *image_shape)``.
    """
    _check_owner(q, inv)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1 (samples per derived manifold), got {n!r}")
    b, d = inv.z.shape
    z = torch.randn(b * n, d, generator=generator, dtype=inv.z.dtype,
                    device=generator.device if generator is not None else "cpu").to(inv.z.device)
    biases = {p: v.repeat_interleave(n, 0) for p, v in inv.biases.items()}
    with _frozen_eval(q), torch.no_grad():
        out = q(z, biases=biases)
    return out.view(b, n, *out.shape[1:])


# ------------------------------------------------------------------------------ analytic encoder
class _InverseAffine(nn.Module):
    r"""``z = W^+ (y - b)``: the left inverse of ``y = W z + b`` (W full column rank)."""

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        w = weight.detach().double()
        self.register_buffer("pinv", torch.linalg.pinv(w).to(weight.dtype))  # (in, out)
        self.register_buffer("bias", bias.detach().clone())

    def forward(self, y: Tensor) -> Tensor:
        return (y - self.bias) @ self.pinv.t()


class _InverseLeakyReLU(nn.Module):
    def __init__(self, slope: Tensor, channel_dim: int = 1) -> None:
        super().__init__()
        self.register_buffer("slope", slope.detach().clone())
        self.channel_dim = channel_dim

    def forward(self, y: Tensor) -> Tensor:
        s = self.slope
        if s.numel() > 1:  # PReLU with one slope per channel (dim 1)
            s = s.view(-1, *([1] * (y.dim() - 2)))
        return torch.where(y >= 0, y, y / s)


class _InverseBatchNorm(nn.Module):
    def __init__(self, bn: nn.BatchNorm1d) -> None:
        super().__init__()
        std = torch.sqrt(bn.running_var.detach() + bn.eps)
        gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(std)
        beta = bn.bias.detach() if bn.bias is not None else torch.zeros_like(std)
        self.register_buffer("scale", std / gamma)
        self.register_buffer("shift", beta)
        self.register_buffer("mean", bn.running_mean.detach().clone())

    def forward(self, y: Tensor) -> Tensor:
        view = (-1,) + (1,) * (y.dim() - 2)
        return (y - self.shift.view(view)) * self.scale.view(view) + self.mean.view(view)


class _InverseSquash(nn.Module):
    """atanh / logit, with the input clamped just inside the open range."""

    def __init__(self, kind: Literal["tanh", "sigmoid"]) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, y: Tensor) -> Tensor:
        eps = torch.finfo(y.dtype).eps
        if self.kind == "tanh":
            return torch.atanh(y.clamp(-1 + eps, 1 - eps))
        return torch.logit(y, eps=eps)


class _Reshape(nn.Module):
    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, y: Tensor) -> Tensor:
        return y.reshape(y.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


class AnalyticEncoder(nn.Sequential):
    """The explicit deep encoder :math:`h_E` of Proposition 1: the generator's layers inverted in
    reverse order (see :func:`analytic_encoder`). ``forward(x: images) -> z``."""


def _invert_module(path: str, m: nn.Module, in_shape: tuple[int, ...]) -> nn.Module:
    name = f"'{path}' ({type(m).__name__})"
    if isinstance(m, (MultiBiasLinear, nn.Linear)):
        w = m.weight
        if w.shape[0] < w.shape[1] or torch.linalg.matrix_rank(w.detach().double()) < w.shape[1]:
            raise ValueError(f"analytic_encoder: layer {name} with weight {tuple(w.shape)} is not injective "
                             "(Proposition 1 needs full column rank: out >= in and rank = in)")
        if isinstance(m, MultiBiasLinear):
            bias = m.bias_bank.detach().mean(0)  # W^+ only sees the tangential part a_par
        else:
            bias = m.bias.detach() if m.bias is not None else torch.zeros_like(w[:, 0])
        return _InverseAffine(w, bias)
    if isinstance(m, nn.LeakyReLU):
        if m.negative_slope <= 0:
            raise ValueError(f"analytic_encoder: {name} has negative_slope={m.negative_slope} and is not "
                             "invertible; use a positive slope")
        return _InverseLeakyReLU(torch.tensor(m.negative_slope))
    if isinstance(m, nn.PReLU):
        if bool((m.weight <= 0).any()):
            raise ValueError(f"analytic_encoder: {name} has a slope <= 0 and is not invertible")
        return _InverseLeakyReLU(m.weight)
    if isinstance(m, nn.BatchNorm1d):
        if m.training or m.running_mean is None:
            raise ValueError(f"analytic_encoder: {name} normalises with batch statistics; put the model in "
                             "eval mode (q.eval()) with track_running_stats=True so the layer is a fixed affine map")
        if m.weight is not None and bool((m.weight == 0).any()):
            raise ValueError(f"analytic_encoder: {name} has a zero scale and is not invertible")
        return _InverseBatchNorm(m)
    if isinstance(m, nn.Tanh):
        return _InverseSquash("tanh")
    if isinstance(m, nn.Sigmoid):
        return _InverseSquash("sigmoid")
    if isinstance(m, (nn.Flatten, nn.Unflatten)):
        return _Reshape(in_shape)
    if isinstance(m, (nn.Identity, nn.Dropout)):
        return nn.Identity()
    raise _unsupported(path, m)


_INVERTIBLE = (MultiBiasLinear, nn.Linear, nn.LeakyReLU, nn.PReLU, nn.BatchNorm1d, nn.Tanh, nn.Sigmoid,
               nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout)


def _unsupported(path: str, m: nn.Module) -> ValueError:
    return ValueError(
        f"analytic_encoder: cannot invert module '{path}' ({type(m).__name__}); the explicit encoder of "
        "Proposition 1 supports Linear/MultiBiasLinear (full column rank), LeakyReLU/PReLU (positive slope), "
        "eval-mode BatchNorm1d, Tanh/Sigmoid, Flatten/Unflatten and Identity/Dropout. Use q.invert(x) (Eq. 3) "
        "for other generators")


def analytic_encoder(q: QuotientModel, *, z_dim: int | None = None, check: bool = True) -> AnalyticEncoder:
    r"""The explicit encoder :math:`h_E` of Proposition 1 for a converted generator.

    For generators built from Linear/MultiBiasLinear, LeakyReLU/PReLU, eval-mode BatchNorm1d,
    Tanh/Sigmoid and reshapes (Flatten/Unflatten), each layer is inverted in reverse order: a linear
    layer by :math:`z = W^+(y - \bar a)` (pseudo-inverse; :math:`W^+` sees only the tangential part
    of the bias, so one encoder inverts every manifold whose bias shares it — exactly so after
    :func:`~qmm_plugin.align_biases_`), activations by their inverses. The layers are found by
    recording which leaf modules one probe forward runs, in order; the first module that cannot be
    inverted is named in the error. The encoder is a snapshot of the current weights.

    Args:
        q: the converted generator (put BatchNorm in eval mode first: ``q.eval()``).
        z_dim: latent size (default as in :func:`invert`).
        check: verify :math:`h_E(f(z; \bar a)) \approx z` (mean biases) for random codes; an error then
            means the generator's ``forward`` applies operations outside modules (e.g.
            ``torch.tanh`` calls), which the encoder cannot see.
    """
    _check_returned(q, "analytic_encoder")
    like = _param_like(q)
    d = _infer_z_dim(q, z_dim)
    paths = {m: p for p, m in q.model.named_modules()}
    trace: list[tuple[str, nn.Module, tuple[int, ...]]] = []

    def hook(m: nn.Module, args: tuple[object, ...], _out: object) -> None:
        shape = tuple(args[0].shape[1:]) if args and isinstance(args[0], Tensor) else ()
        trace.append((paths[m], m, shape))

    leaves = [m for m in q.model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with _frozen_eval(q), torch.no_grad():  # no running-statistics update
            q(torch.zeros(2, d, device=like.device, dtype=like.dtype), manifold=0)
    finally:
        for h in handles:
            h.remove()
    for p, m, _ in trace:  # name the first unsupported module (in forward order) before any SVD
        if not isinstance(m, _INVERTIBLE):
            raise _unsupported(p, m)
    inverses = [_invert_module(p, m, s) for p, m, s in trace]
    encoder = AnalyticEncoder(*reversed(inverses))
    if check:
        gen = torch.Generator().manual_seed(0)
        z = torch.randn(16, d, generator=gen, dtype=like.dtype).to(like.device)
        mean_biases = {p: m.bias_bank.detach().mean(0) for p, m in q.multi_bias_layers().items()}
        with _frozen_eval(q), torch.no_grad():
            err = (encoder(q(z, biases=mean_biases)) - z).norm() / z.norm()
        if not bool(err < 1e-2):
            raise ValueError(
                f"analytic_encoder: the layer-wise inverse does not invert the generator (relative error "
                f"{float(err):.3g} with the mean biases): its forward applies operations outside modules or is not "
                "a chain of its modules; use q.invert(x) (Eq. 3) instead")
    return encoder
