r"""Encoding images into the quotient space: the Eq. 3 fit.

:func:`invert` solves Eq. 3 of the paper for every image of a batch at once,

.. math::

    z^*, \{a_l^*\} = \arg\min_{z, \{a_l\}} \; \lVert x - f(z; \{a_l\}) \rVert^2
        + \mu \sum_l \log \lVert W_l^\top (a_l - \bar a_l) \rVert^2 ,

with free per-image biases :math:`a_l` and :math:`\bar a_l` the mean of the trained biases of
layer :math:`l` (their shared tangential part once the banks are aligned). Fixing
:math:`\{a_l^*\}` and drawing new :math:`z` samples the *derived* manifold of the image
(:func:`qmm_plugin.sampling.sample_manifold`; the operation of the paper's Fig. 5 and 6).
:func:`fit_codes` is the same fit with every bias fixed to a trained one (codes only), for any
generator given as ``forward(z, manifold)``; ``invert(manifolds="trained")`` runs it.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._checks import check_finite_state, check_int, check_real
from ._generator import check_returned, frozen_eval, infer_z_dim, param_like
from .layer import MultiBiasLayer, MultiBiasLinear
from .regularizer import DEFAULT_EPS, tangential_basis

if TYPE_CHECKING:
    from .convert import QuotientModel

__all__ = ["Inversion", "invert", "fit_codes"]

BiasMode = Literal["normal", "penalty"]
ManifoldMode = Literal["free", "trained"]
#: the per-row losses of one optimisation step, ``(rows,)``
RowObjective = Callable[[], Tensor]
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
        fit_seconds: wall time of the optimisation loop (without the set-up: the tangential basis of
            every weight (an eigendecomposition of its Gram matrix) for ``bias_mode="normal"``, and the final evaluation).
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


def check_owner(q: QuotientModel, inv: Inversion) -> None:
    if not isinstance(inv, Inversion):
        raise TypeError(f"expected an Inversion returned by q.invert(x), got {type(inv).__name__}")
    if inv.model_fingerprint != _fingerprint(q) or inv.model_id != id(q.model):
        raise ValueError(
            "this Inversion was made by another model (layers/A "
            f"{inv.model_fingerprint!r}, this model {_fingerprint(q)!r}); its biases only define a "
            "manifold of the model that inverted the images. Call q.invert(x) with this model first")


# ------------------------------------------------------------------------------------ helpers
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
        with frozen_eval(q), torch.no_grad():
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
    images the generator cannot make, and the loss stays high). Exact range: x beyond it, or x
    confined to its upper half while the range is
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
    dtype, device and in-place version counter) and, for a convolution, the input size too: for
    the MNIST generator's 6272x1024 weight the float64 eigendecomposition costs more than a short
    fit."""
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
        if mode == "normal":  # first call per weight: one Gram eigendecomposition per layer (cached)
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


def _check_schedule(steps: int, lr: float, tol: float, window: int, min_lr_ratio: float
                    ) -> tuple[float, float, float]:
    """Checks the fit's schedule arguments; returns ``(lr, tol, min_lr_ratio)`` as floats."""
    check_int(steps, "steps", meaning="cap on Adam steps")
    check_int(window, "window", meaning="steps per plateau check")
    lr = check_real(lr, "lr", low=0.0, low_open=True, meaning="Adam learning rate")
    tol = check_real(tol, "tol", low=0.0, meaning="relative improvement per window that counts as progress")
    min_lr_ratio = check_real(min_lr_ratio, "min_lr_ratio", low=0.0, high=1.0,
                              meaning="an image is done once its step size fell below lr * min_lr_ratio")
    return lr, tol, min_lr_ratio


def _fit_rows(objective: RowObjective, params: list[Tensor], *, steps: int, lr: float, tol: float, window: int,
              min_lr_ratio: float, after_step: Callable[[Tensor], None] | None = None, progress: bool = False
              ) -> tuple[int, float]:
    """The optimiser loop of Eq. 3: minimise ``objective()`` (one loss per row, ``(rows,)``) over
    ``params`` (each ``(rows, k)``) with per-row Adam and the per-row reduce-on-plateau schedule of
    the module docstring. ``after_step(active)`` runs after every Adam step with the mask of rows
    not yet done (normal mode's projection). Leaves every row of ``params`` at its best point;
    returns ``(steps run, seconds)``. Needs autograd on."""
    like = params[0]
    rows = like.shape[0]
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
        loss = objective()
        with torch.no_grad():
            better = (loss < best) & ~done
            best = torch.where(better, loss.detach(), best)
            for p, bp in zip(params, best_params, strict=True):
                bp.copy_(torch.where(better.unsqueeze(1), p.detach(), bp))
        loss.sum().backward()
        opt.step(~done)
        if after_step is not None:
            after_step(~done)
        ran = step + 1
        if ran % window == 0:
            with torch.no_grad():
                stalled = (window_ref - best <= tol * best.abs()) & ~done
                window_ref = best.clone()
                # plateau: restart a stalled row from its best point with half the step size;
                # it is done once the step size fell below lr * min_lr_ratio
                opt.lr[stalled] *= 0.5
                for p, bp in zip(params, best_params, strict=True):
                    p.copy_(torch.where(stalled.unsqueeze(1), bp, p))
                done |= opt.lr < lr * min_lr_ratio
            if progress:
                bar.set_postfix(loss=f"{float(best.mean()):.4g}", done=f"{float(done.float().mean()):.0%}")
            if bool(done.all()):
                break
    seconds = time.perf_counter() - t0
    bar.close()
    with torch.no_grad():
        for p, bp in zip(params, best_params, strict=True):
            p.copy_(bp)
    return ran, seconds


def _fit_codes(forward: Callable[[Tensor, Tensor], Tensor], x: Tensor, manifold: Tensor, z_init: Tensor, *,
               steps: int, lr: float, tol: float, window: int, min_lr_ratio: float, progress: bool
               ) -> tuple[Tensor, Tensor, int, float]:
    """Codes-only fit (autograd on): ``(z, loss, steps run, seconds)``."""
    z = z_init.detach().clone().requires_grad_(True)

    def objective() -> Tensor:
        return _per_image_sq_error(x, forward(z, manifold))

    ran, seconds = _fit_rows(objective, [z], steps=steps, lr=lr, tol=tol, window=window,
                             min_lr_ratio=min_lr_ratio, progress=progress)
    with torch.no_grad():
        loss = objective()
    return z.detach(), loss, ran, seconds


def fit_codes(forward: Callable[[Tensor, Tensor], Tensor], x: Tensor, manifold: Tensor, *, z_init: Tensor,
              steps: int = 6000, lr: float = 0.1, tol: float = 1e-3, window: int = 50, min_lr_ratio: float = 1e-3,
              progress: bool = False) -> tuple[Tensor, Tensor]:
    r"""Eq. 3 with every bias fixed to a trained one: :math:`\min_z \lVert x - f(z; a^{(i)}) \rVert^2`
    per image, over the codes only.

    The :math:`\mu \to \infty` limit of Eq. 3 with :math:`a_l = a_l^{(i)}`, for any generator that
    maps codes and manifold indices to images: a converted generator
    (``lambda z, i: q(z, manifold=i)``; ``invert(manifolds="trained")`` runs this fit) or a bank of
    separate generators. Same per-image Adam and stopping rule as :func:`invert`; runs with autograd
    on also under ``torch.no_grad()``.

    Args:
        forward: ``forward(z (B, d), manifold (B,) long) -> images (B, ...)``. Put the generator
            in eval mode and freeze its parameters first (``requires_grad_(False)``): the fit
            differentiates through it.
        x: ``(B, ...)`` target images.
        manifold: ``(B,)`` long, the trained manifold each image is fitted on.
        z_init: ``(B, d)`` starting codes (warm starts, or draws from the prior).
        steps, lr, tol, window, min_lr_ratio, progress: as for :func:`invert`.

    Returns:
        ``(z, loss)``: each image's best code ``(B, d)`` and its squared error ``(B,)`` (sum over
        pixels).

    Example::

        >>> import torch, qmm_plugin
        >>> q = qmm_plugin.convert(torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(),
        ...                                            torch.nn.Linear(16, 20)), num_biases=3)
        >>> _ = q.requires_grad_(False)
        >>> x = q(torch.randn(4, 2), manifold=1)
        >>> z, loss = qmm_plugin.fit_codes(lambda z, i: q(z, manifold=i), x, torch.ones(4, dtype=torch.long),
        ...                                z_init=torch.zeros(4, 2), steps=300)
        >>> z.shape, loss.shape
        (torch.Size([4, 2]), torch.Size([4]))
    """
    lr, tol, min_lr_ratio = _check_schedule(steps, lr, tol, window, min_lr_ratio)
    for name, t in (("x", x), ("manifold", manifold), ("z_init", z_init)):
        if not isinstance(t, Tensor):
            raise TypeError(f"fit_codes: {name} must be a tensor, got {type(t).__name__}")
    b = x.shape[0] if x.dim() > 0 else 0
    if b < 1:
        raise ValueError(f"fit_codes: x must be a batch of images (B, ...), got shape {tuple(x.shape)}")
    if manifold.shape != (b,) or manifold.dtype != torch.long:
        raise ValueError(f"fit_codes: manifold must be a (B,) = ({b},) long tensor of manifold indices, got "
                         f"{manifold.dtype} {tuple(manifold.shape)}")
    if z_init.dim() != 2 or z_init.shape[0] != b:
        raise ValueError(f"fit_codes: z_init must be ({b}, z_dim) starting codes, one per image, got "
                         f"{tuple(z_init.shape)}")
    if not (x.device == manifold.device == z_init.device):
        raise ValueError(f"fit_codes: x, manifold and z_init must be on one device, got {x.device}, "
                         f"{manifold.device}, {z_init.device}; move them with .to(device)")
    with torch.inference_mode(False), torch.enable_grad():
        z, loss, _, _ = _fit_codes(forward, x.detach().clone(), manifold.clone(), z_init.clone(), steps=steps,
                                   lr=lr, tol=tol, window=window, min_lr_ratio=min_lr_ratio, progress=progress)
    return z, loss


def _start_codes(z_init: Tensor | None, b: int, restarts: int, d: int, gen: torch.Generator, like: Tensor
                 ) -> Tensor:
    """``(B, restarts, d)`` starting codes: ``z_init``, or draws from N(0, I) (image b's starts do not
    depend on the batch size: prefix-consistent draws)."""
    if z_init is None:
        return torch.randn(b, restarts, d, generator=gen, dtype=like.dtype).to(like.device)
    if tuple(z_init.shape) == (b, d) and restarts == 1:
        z_init = z_init.unsqueeze(1)
    return z_init.detach().clone()


def _check_z_init(z_init: object, b: int, restarts: int, d: int, like: Tensor) -> None:
    if z_init is None:
        return
    if not isinstance(z_init, Tensor):
        raise TypeError(f"z_init must be a tensor of starting codes, got {type(z_init).__name__}")
    ok = tuple(z_init.shape) == (b, restarts, d) or (restarts == 1 and tuple(z_init.shape) == (b, d))
    if not ok:
        want = f"({b}, {d}) or ({b}, 1, {d})" if restarts == 1 else f"({b}, {restarts}, {d})"
        raise ValueError(f"z_init has shape {tuple(z_init.shape)}; expected {want}: one starting code per image "
                         "and restart (z_dim from the generator)")
    if z_init.device != like.device or z_init.dtype != like.dtype:
        raise ValueError(f"z_init is {z_init.dtype} on {z_init.device} but the generator computes in {like.dtype} "
                         f"on {like.device}; use z_init.to({str(like.device)!r}, {like.dtype})")
    if not bool(torch.isfinite(z_init).all()):
        raise ValueError("z_init contains NaN or inf values; pass finite starting codes")


def _check_manifold_index(index: Tensor, b: int, a: int, like: Tensor) -> Tensor:
    if index.shape != (b,) or index.dtype != torch.long:
        raise ValueError(f"manifolds as a tensor must be ({b},) long manifold indices (one per image), got "
                         f"{index.dtype} {tuple(index.shape)}")
    if int(index.min()) < 0 or int(index.max()) >= a:
        raise ValueError(f"manifold indices must lie in [0, {a}) (A = {a} trained biases), got "
                         f"[{int(index.min())}, {int(index.max())}]")
    return index.to(like.device)


# ------------------------------------------------------------------------------------ invert
def invert(q: QuotientModel, x: Tensor, *, steps: int = 6000, lr: float = 0.1, mu: float = 0.05,
           restarts: int = 1, manifolds: ManifoldMode | Tensor = "free", bias_mode: BiasMode = "normal",
           tol: float = 1e-3, window: int = 50, min_lr_ratio: float = 1e-3, z_dim: int | None = None,
           z_init: Tensor | None = None, seed: int | None = None, progress: bool = False) -> Inversion:
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
        restarts: independent starts per image; the best objective per image is kept.
        manifolds: ``"free"``: free per-image biases (Eq. 3; the image may lie on an untrained,
            derived manifold). ``"trained"``: biases restricted to the A trained ones; every
            (restart, manifold) pair is fitted over z (:func:`fit_codes`) and the best is kept per
            image. A ``(B,)`` long tensor: each image fitted over z on its given trained manifold.
        bias_mode: ``"normal"`` (default; exact tangential constraint, the :math:`\mu\to\infty`
            limit that recovers the quotient map) or ``"penalty"`` (the paper's soft penalty).
            See the module docstring for why.
        tol, window, min_lr_ratio: per-image reduce-on-plateau schedule and stop: when an image's
            best objective improved by less than ``tol`` (relative) over the last ``window`` steps,
            it restarts from its best point with half its step size; it is done once its step size
            fell below ``lr * min_lr_ratio``. The fit ends when every image is done (or at ``steps``).
        z_dim: latent size (default: ``q.model.z_dim`` if the model has one, else the input size
            of the first converted layer).
        z_init: starting codes, ``(B, z_dim)`` (``restarts=1``) or ``(B, restarts, z_dim)``, e.g.
            warm starts from an earlier fit; default: draws :math:`z \sim \mathcal N(0, I)`.
        seed: seed of the random starting codes (and of the penalty-mode bias starts).
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
    check_returned(q, "invert")
    lr, tol, min_lr_ratio = _check_schedule(steps, lr, tol, window, min_lr_ratio)
    check_int(restarts, "restarts", meaning="starts per image")
    mu = check_real(mu, "mu", low=0.0, meaning="the weight of the log penalty of Eq. 3")
    if not isinstance(manifolds, Tensor) and manifolds not in ("free", "trained"):
        raise ValueError(f"manifolds must be 'free' (Eq. 3, free biases), 'trained' (the A trained biases) or a "
                         f"(B,) tensor of manifold indices, got {manifolds!r}")
    if bias_mode not in ("normal", "penalty"):
        raise ValueError(f"bias_mode must be 'normal' (exact tangential constraint) or 'penalty' (the paper's "
                         f"soft log penalty), got {bias_mode!r}")
    like = param_like(q)
    check_finite_state(q, "invert")
    d = infer_z_dim(q, z_dim)
    shape, out_range = _probe_output(q, d, like)
    _check_images(x, shape, like)
    _warn_outside_range(x, out_range)
    if isinstance(manifolds, Tensor):
        manifolds = _check_manifold_index(manifolds, x.shape[0], q.num_biases, like)
    _check_z_init(z_init, x.shape[0], restarts, d, like)
    # evaluation code runs under no_grad/inference_mode as a rule; the fit needs autograd
    with torch.inference_mode(False), torch.enable_grad():
        return _fit_eq3(q, x.clone() if x.is_inference() else x, d, steps=steps, lr=lr, mu=mu,
                        restarts=restarts, manifolds=manifolds, bias_mode=bias_mode, tol=tol, window=window,
                        min_lr_ratio=min_lr_ratio, z_init=z_init, seed=seed, progress=progress)


def _fit_eq3(q: QuotientModel, x: Tensor, d: int, *, steps: int, lr: float, mu: float, restarts: int,
             manifolds: ManifoldMode | Tensor, bias_mode: BiasMode, tol: float, window: int, min_lr_ratio: float,
             z_init: Tensor | None, seed: int | None, progress: bool) -> Inversion:
    """The body of :func:`invert` once its arguments are checked (autograd on)."""
    like = param_like(q)
    layers = q.multi_bias_layers()
    a = q.num_biases
    b = x.shape[0]
    gen = torch.Generator(device="cpu")
    if seed is not None:
        gen.manual_seed(seed)
    else:
        gen.seed()
    z0 = _start_codes(z_init, b, restarts, d, gen, like)  # (B, R, d)
    schedule = {"steps": steps, "lr": lr, "tol": tol, "window": window, "min_lr_ratio": min_lr_ratio}

    with frozen_eval(q):
        if isinstance(manifolds, str) and manifolds == "free":
            per_image = restarts
            x_rep = x.detach().repeat_interleave(per_image, 0)
            z = z0.reshape(b * per_image, d).clone().requires_grad_(True)
            bias_params = _BiasParams(layers, b * per_image, bias_mode, float(mu), gen)

            def objective() -> tuple[Tensor, dict[str, Tensor], Tensor]:
                biases = bias_params.biases()
                out = q(z, biases=biases)
                loss = _per_image_sq_error(x_rep, out)
                pen = bias_params.penalty(biases)
                return (loss if pen is None else loss + pen), biases, out

            ran, fit_seconds = _fit_rows(lambda: objective()[0], [z, *bias_params.params.values()], **schedule,
                                         after_step=bias_params.project_, progress=progress)
            with torch.no_grad():
                loss, biases, out = objective()
                rows_kept = torch.arange(b, device=like.device) * per_image + loss.view(b, per_image).argmin(1)
                z_best = z.detach()[rows_kept]
                biases_best = {p: v.detach()[rows_kept] for p, v in biases.items()}
                manifold = _nearest_trained(q, x, z_best)
                loss_best, recon = loss.detach()[rows_kept], out.detach()[rows_kept]
            kind = bias_mode
        else:
            if isinstance(manifolds, Tensor):  # each image on its given manifold
                per_image = restarts
                z_rows = z0.reshape(-1, d)
                index = manifolds.repeat_interleave(restarts)
            else:  # every (restart, manifold) pair from the same start
                per_image = restarts * a
                z_rows = z0.unsqueeze(2).expand(b, restarts, a, d).reshape(-1, d)
                index = torch.arange(a, device=like.device).repeat(b * restarts)
            z_all, loss_all, ran, fit_seconds = _fit_codes(
                lambda z, i: q(z, manifold=i), x.detach().repeat_interleave(per_image, 0), index, z_rows,
                **schedule, progress=progress)
            with torch.no_grad():
                rows_kept = torch.arange(b, device=like.device) * per_image + loss_all.view(b, per_image).argmin(1)
                z_best, manifold, loss_best = z_all[rows_kept], index[rows_kept], loss_all[rows_kept]
                biases_best = {p: m.bias_bank.detach()[manifold] for p, m in layers.items()}
                recon = q(z_best, manifold=manifold)
            kind = "trained"
    return Inversion(z=z_best, biases=biases_best, manifold=manifold, loss=loss_best, reconstruction=recon,
                     steps=ran, fit_seconds=fit_seconds, bias_mode=kind, model_fingerprint=_fingerprint(q),
                     model_id=id(q.model))


def _nearest_trained(q: QuotientModel, x: Tensor, z: Tensor) -> Tensor:
    r""":math:`\arg\min_i \lVert x - f(z; a^{(i)}) \rVert^2` per image, in one batched forward."""
    a, b = q.num_biases, x.shape[0]
    index = torch.arange(a, device=x.device).repeat(b)
    out = q(z.repeat_interleave(a, 0), manifold=index)
    return _per_image_sq_error(x.repeat_interleave(a, 0), out).view(b, a).argmin(1)
