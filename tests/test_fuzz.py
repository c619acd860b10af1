"""Property-based fuzzing of convert() over random small generators (hypothesis).

Each example builds a random Linear / norm / activation stack (some Linears without bias), fed a
``(B, F)`` batch, a ``(B, T, F)`` batch or a tuple of two inputs, converts it with a random
A in 1..12 and checks the contracts every converted model must keep:

* outputs (random manifolds, a manifold index per sample, explicit biases) are finite whenever
  the inputs and parameters are, and so are R_BA (Eq. 2) and its gradients;
* manifold ``i`` of the converted model equals the plain model ``q.merge(i)``, and explicit
  biases equal to bank row ``i`` give the same output;
* a per-sample manifold index picks, row by row, the output of that sample's manifold;
* a ``state_dict`` round trip into a freshly converted copy is exact.

``derandomize=True`` keeps the examples the same from run to run (a CI failure reproduces).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import qmm_plugin

FUZZ = settings(max_examples=25, deadline=None, derandomize=True)

ACTIVATIONS = {
    "relu": nn.ReLU, "leaky": lambda: nn.LeakyReLU(0.2), "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
    "elu": nn.ELU, "gelu": nn.GELU, "identity": nn.Identity,
}


@dataclass(frozen=True)
class Spec:
    """A random generator: layer widths, per-layer norm/activation/bias, the input form, A."""

    in_features: int
    widths: tuple[int, ...]
    norms: tuple[str, ...]       # "none" | "batch" (flat inputs only) | "layer"
    activations: tuple[str, ...]
    with_bias: tuple[bool, ...]
    inputs: str                  # "flat" (B, F) | "seq" (B, T, F) | "tuple" (two (B, F_i))
    batch: int
    steps: int                   # T of a (B, T, F) input
    num_biases: int
    train: bool
    dtype: torch.dtype
    seed: int


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    depth = draw(st.integers(1, 3))
    inputs = draw(st.sampled_from(["flat", "seq", "tuple"]))
    norm_kinds = ["none", "layer"] + (["batch"] if inputs != "seq" else [])
    return Spec(
        in_features=draw(st.integers(2, 6)),
        widths=tuple(draw(st.lists(st.integers(1, 12), min_size=depth, max_size=depth))),
        norms=tuple(draw(st.lists(st.sampled_from(norm_kinds), min_size=depth, max_size=depth))),
        activations=tuple(draw(st.lists(st.sampled_from(sorted(ACTIVATIONS)), min_size=depth, max_size=depth))),
        with_bias=tuple(draw(st.lists(st.booleans(), min_size=depth, max_size=depth))),
        inputs=inputs,
        batch=draw(st.integers(2, 6)),  # >= 2: BatchNorm in train mode needs two samples
        steps=draw(st.integers(1, 4)),
        num_biases=draw(st.integers(1, 12)),
        train=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        seed=draw(st.integers(0, 2**16)),
    )


class Stack(nn.Module):
    """The spec's generator; ``forward(*xs)`` concatenates a tuple of inputs on the last dim."""

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = spec.in_features
        for out, norm, act, bias in zip(spec.widths, spec.norms, spec.activations, spec.with_bias, strict=True):
            layers.append(nn.Linear(width, out, bias=bias))
            if norm == "batch":
                layers.append(nn.BatchNorm1d(out))
            elif norm == "layer":
                layers.append(nn.LayerNorm(out))
            layers.append(ACTIVATIONS[act]())
            width = out
        self.net = nn.Sequential(*layers)

    def forward(self, *xs: Tensor) -> Tensor:
        return self.net(torch.cat(xs, -1) if len(xs) > 1 else xs[0])


def build(spec: Spec, seed: int) -> qmm_plugin.QuotientModel:
    torch.manual_seed(seed)
    q = qmm_plugin.convert(Stack(spec).to(spec.dtype), spec.num_biases)
    return q.train(spec.train)


def make_inputs(spec: Spec, gen: torch.Generator) -> tuple[Tensor, ...]:
    b, f = spec.batch, spec.in_features
    if spec.inputs == "seq":
        return (torch.randn(b, spec.steps, f, generator=gen, dtype=spec.dtype),)
    if spec.inputs == "tuple":
        first = f // 2
        return (torch.randn(b, first, generator=gen, dtype=spec.dtype),
                torch.randn(b, f - first, generator=gen, dtype=spec.dtype))
    return (torch.randn(b, f, generator=gen, dtype=spec.dtype),)


def explicit_biases(q: qmm_plugin.QuotientModel, spec: Spec, gen: torch.Generator) -> dict[str, Tensor]:
    """Random explicit biases, ``(B, out)`` rows or one shared ``(out,)`` vector per layer."""
    out = {}
    for i, (p, m) in enumerate(q.multi_bias_layers().items()):
        shape = (spec.batch, m.out_features) if i % 2 == 0 else (m.out_features,)
        out[p] = torch.randn(*shape, generator=gen, dtype=spec.dtype)
    return out


@FUZZ
@given(spec=specs())
def test_outputs_and_regularizer_are_finite(spec: Spec) -> None:
    q = build(spec, spec.seed)
    gen = torch.Generator().manual_seed(spec.seed)
    xs = make_inputs(spec, gen)
    index = torch.randint(0, spec.num_biases, (spec.batch,), generator=gen)
    outputs = [q(*xs), q(*xs, manifold=index), q(*xs, biases=explicit_biases(q, spec, gen))]
    out, r_fused = q(*xs, manifold=index, return_regularizer=True)
    assert all(bool(torch.isfinite(o).all()) for o in outputs + [out])
    r_ba = q.ba_regularizer()
    torch.testing.assert_close(r_fused, r_ba)
    (out.sum() + r_ba + r_fused).backward()
    assert torch.isfinite(r_ba)
    for name, p in q.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name


@FUZZ
@given(spec=specs())
def test_each_manifold_equals_its_merged_plain_model(spec: Spec) -> None:
    q = build(spec, spec.seed)
    xs = make_inputs(spec, torch.Generator().manual_seed(spec.seed))
    tol = {"rtol": 1e-5, "atol": 1e-6} if spec.dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    with torch.no_grad():
        for i in range(spec.num_biases):
            merged = q.merge(i)
            assert not any(isinstance(m, qmm_plugin.MultiBiasLinear) for m in merged.modules())
            y = q(*xs, manifold=i)
            torch.testing.assert_close(merged(*xs), y, **tol)
            rows = {p: m.bias_bank[i] for p, m in q.multi_bias_layers().items()}
            torch.testing.assert_close(q(*xs, biases=rows), y, **tol)


@FUZZ
@given(spec=specs())
def test_per_sample_index_picks_each_samples_manifold(spec: Spec) -> None:
    q = build(spec, spec.seed).eval()  # eval: BatchNorm does not couple the samples of a batch
    gen = torch.Generator().manual_seed(spec.seed)
    xs = make_inputs(spec, gen)
    index = torch.randint(0, spec.num_biases, (spec.batch,), generator=gen)
    with torch.no_grad():
        mixed = q(*xs, manifold=index)
        per_manifold = torch.stack([q(*xs, manifold=i) for i in range(spec.num_biases)])
    tol = {"rtol": 1e-5, "atol": 1e-6} if spec.dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(mixed, per_manifold[index, torch.arange(spec.batch)], **tol)


@FUZZ
@given(spec=specs())
def test_state_dict_round_trip_is_exact(spec: Spec) -> None:
    q = build(spec, spec.seed)
    buffer = io.BytesIO()
    torch.save(q.state_dict(), buffer)
    buffer.seek(0)
    fresh = build(spec, spec.seed + 1)
    fresh.load_state_dict(torch.load(buffer))
    for (name, a), (_, b) in zip(q.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    xs = make_inputs(spec, torch.Generator().manual_seed(spec.seed))
    q.eval()
    fresh.eval()
    with torch.no_grad():
        for i in range(spec.num_biases):
            assert torch.equal(q(*xs, manifold=i), fresh(*xs, manifold=i))
