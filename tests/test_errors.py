"""Bad input to the plugin's API: each case gets a clear error naming the problem and the fix, or
the correct behaviour (invert under no_grad/inference_mode, images outside the generator's range
warned about). The cases of issue 14's probe list, one test (or parameter) each."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import qmm_plugin
from qmm_plugin import MultiBiasLinear
from qmm_plugin._checks import check_finite_state, check_int, check_real
from qmm_plugin.ops import multi_bias_linear, sample_bias_linear

A = 3


def small(final: nn.Module | None = None, seed: int = 0) -> qmm_plugin.QuotientModel:
    """4 -> 16 -> 12 generator with an optional final activation, A = 3, banks aligned."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(4, 16), nn.LeakyReLU(0.2), nn.Linear(16, 12)]
    if final is not None:
        layers.append(final)
    return qmm_plugin.align_biases_(qmm_plugin.convert(nn.Sequential(*layers), A))


def images(q: qmm_plugin.QuotientModel, n: int = 4) -> torch.Tensor:
    with torch.no_grad():
        return q(torch.randn(n, 4, generator=torch.Generator().manual_seed(3)), manifold=1)


# ------------------------------------------------------------------------------- validators
@pytest.mark.parametrize("value, kw, exc, match", [
    (float("nan"), {}, ValueError, r"lr must be a finite number, got nan"),
    (float("inf"), {"low": 0.0}, ValueError, r"must be a finite number >= 0, got inf"),
    (0.0, {"low": 0.0, "low_open": True}, ValueError, r"> 0, got 0"),
    (2.0, {"low": 0.0, "high": 1.0}, ValueError, r">= 0 and <= 1, got 2"),
    ("0.1", {}, TypeError, r"got '0.1'"),
    (True, {}, TypeError, r"got True"),
])
def test_check_real_refuses(value, kw: dict, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        check_real(value, "lr", **kw)


def test_check_real_accepts_ints_and_0dim_tensors() -> None:
    assert check_real(2, "x", low=0.0) == 2.0
    assert check_real(torch.tensor(0.25), "x", high=1.0) == 0.25


@pytest.mark.parametrize("value, exc", [(0, ValueError), (2.0, TypeError), (True, TypeError), (None, TypeError)])
def test_check_int_refuses(value, exc: type) -> None:
    with pytest.raises(exc, match=r"steps \(cap\) must be an int >= 1"):
        check_int(value, "steps", meaning="cap")


def test_check_finite_state_names_the_tensor_and_count() -> None:
    m = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    check_finite_state(m, "here")
    with torch.no_grad():
        m[0].weight[1, 0] = float("inf")
    with pytest.raises(ValueError, match=r"here: parameter '0.weight' holds 1 non-finite .* of 6; .*last good"):
        check_finite_state(m, "here")
    with torch.no_grad():
        m[0].weight.zero_()
    m[1].running_var[0] = float("nan")
    with pytest.raises(ValueError, match=r"buffer '1.running_var' holds 1 non-finite"):
        check_finite_state(m, "here")


# ---------------------------------------------------------------------------------- convert
@pytest.mark.parametrize("std, exc, match", [
    (float("inf"), ValueError, "got inf"),
    (float("nan"), ValueError, "got nan"),
    (-0.1, ValueError, "got -0.1"),
    ("small", TypeError, "got 'small'"),
])
def test_init_std_must_be_finite_and_non_negative(std, exc: type, match: str) -> None:
    with pytest.raises(exc, match=r"init_std \(std of the per-manifold bias noise.*\) must be a finite number >= 0, "
                                  + match):
        qmm_plugin.convert(nn.Sequential(nn.Linear(2, 3)), 2, init_std=std)


def test_multibiaslinear_constructor_checks_sizes() -> None:
    with pytest.raises(ValueError, match=r"num_biases \(the number of manifolds A\) must be an int >= 1, got 0"):
        MultiBiasLinear(3, 5, num_biases=0)
    with pytest.raises(TypeError, match="out_features must be an int >= 1"):
        MultiBiasLinear(3, 5.0, num_biases=2)
    with pytest.raises(ValueError, match=r"init_std .* got nan"):
        MultiBiasLinear.from_plain(nn.Linear(2, 3), 2, float("nan"))


# ----------------------------------------------------------------------------- explicit biases
def test_explicit_biases_in_another_dtype_are_refused_with_the_cast() -> None:
    q = small()
    z = torch.randn(2, 4)
    biases = {p: m.bias_bank.detach()[0] for p, m in q.multi_bias_layers().items()}
    assert torch.equal(q(z, biases=biases), q(z, manifold=0))
    bad = dict(biases, **{"0": biases["0"].double()})
    with pytest.raises(TypeError, match=r"biases\['0'\] has dtype torch.float64 but the layer computes in "
                                        r"torch.float32; pass it as biases\['0'\].to\(torch.float32\)"):
        q(z, biases=bad)
    with pytest.raises(TypeError, match=r"bias has dtype torch.float64"):
        q.model[0](z, bias=biases["0"].double())


def test_explicit_biases_on_another_device_are_refused_with_the_move() -> None:
    q = small()
    biases = {p: m.bias_bank.detach()[0] for p, m in q.multi_bias_layers().items()}
    biases["2"] = biases["2"].to("meta")
    with pytest.raises(ValueError, match=r"biases\['2'\] is on meta but the layer's weight is on cpu; "
                                         r"move it with .to\('cpu'\)"):
        q(torch.randn(2, 4), biases=biases)


@pytest.mark.parametrize("manifold, exc, match", [
    (torch.tensor(0), TypeError, r"takes one int in 0..2.*got Tensor \(for a 0-dim tensor t: merge\(int\(t\)\)\)"),
    (torch.tensor([0, 1]), TypeError, r"takes one int in 0..2"),
    (True, TypeError, r"takes one int in 0..2.*got bool"),
    (3, ValueError, r"manifold=3 is out of range"),
])
def test_merge_takes_one_int(manifold, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        small().merge(manifold)


# ---------------------------------------------------------------------------------------- ops
def test_ops_name_a_bank_or_bias_of_the_wrong_width() -> None:
    x, w = torch.randn(2, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"bank must be 2-D with weight.shape\[0\] = 5 columns, got shape \(4, 6\)"):
        multi_bias_linear(x, w, torch.randn(4, 6), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"bias must be 2-D with weight.shape\[0\] = 5 columns, got shape \(2, 4\)"):
        sample_bias_linear(x, w, torch.randn(2, 4))


# -------------------------------------------------------------------------------- regularizer
@pytest.mark.parametrize("eps", [float("nan"), float("inf"), -1e-8])
def test_eps_must_be_finite_and_positive(eps: float) -> None:
    with pytest.raises(ValueError, match=r"eps \(inside the log of Eq. 2.*\) must be a finite number > 0"):
        small().ba_regularizer(eps=eps)


@pytest.mark.parametrize("param", ["bias_bank", "weight"])
def test_nonfinite_parameters_are_refused_by_tangential_spread_and_alignment(param: str) -> None:
    q = small()
    with torch.no_grad():
        getattr(q.model[2], param)[0, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"tangential_spread, layer '2': parameter '{param}' holds 1 non-finite"):
        q.tangential_spread()
    with pytest.raises(ValueError, match=rf"align_biases_, layer '2': parameter '{param}' holds 1 non-finite"):
        qmm_plugin.align_biases_(q)


def test_huge_finite_banks_keep_an_exact_tangential_spread() -> None:
    """Banks at 1e20 overflow R_BA in float32 (documented in the README; the examples' loss check
    stops such a run) but the float64 monitor stays finite and exact: aligned banks give 0."""
    torch.manual_seed(0)
    q = qmm_plugin.convert(nn.Sequential(nn.Linear(4, 16), nn.LeakyReLU(0.2), nn.Linear(16, 12)), A)
    with torch.no_grad():
        for m in q.multi_bias_layers().values():
            m.bias_bank.mul_(1e20)
    assert torch.isinf(q.ba_regularizer())
    before = q.tangential_spread()
    assert all(math.isfinite(v) and v > 1e38 for v in before.values())
    qmm_plugin.align_biases_(q)
    assert all(v < 1e-10 * before[p] for p, v in q.tangential_spread().items())


# ------------------------------------------------------------------------------------- invert
def test_invert_refuses_a_nan_bank_before_fitting() -> None:
    q = small()
    x = images(q)
    with torch.no_grad():
        q.model[0].bias_bank[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"invert: parameter 'model.0.bias_bank' holds 1 non-finite .* Reload"):
        q.invert(x, steps=5)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_invert_runs_under_no_grad_and_inference_mode(context) -> None:
    q = small(nn.Tanh())
    x = images(q)
    ref = q.invert(x, steps=60, seed=0)
    with context():
        x_ctx = x.clone()  # an inference tensor under inference_mode
        inv = q.invert(x_ctx, steps=60, seed=0)
        samples = q.sample_manifold(inv, 2)
    torch.testing.assert_close(inv.z, ref.z)
    torch.testing.assert_close(inv.loss, ref.loss)
    assert samples.shape == (4, 2, 12)
    assert all(p.grad is None and p.requires_grad for p in q.parameters())


@pytest.mark.parametrize("kw, exc, match", [
    ({"min_lr_ratio": -0.1}, ValueError, r"min_lr_ratio .* must be a finite number >= 0 and <= 1, got -0.1"),
    ({"min_lr_ratio": 2.0}, ValueError, r"min_lr_ratio .* got 2"),
    ({"min_lr_ratio": float("nan")}, ValueError, r"min_lr_ratio .* got nan"),
    ({"mu": float("nan")}, ValueError, r"mu \(the weight of the log penalty of Eq. 3\) .* got nan"),
    ({"lr": float("inf")}, ValueError, r"lr \(Adam learning rate\) must be a finite number > 0, got inf"),
    ({"lr": 0}, ValueError, r"lr .* > 0, got 0"),
    ({"tol": float("nan")}, ValueError, r"tol .* got nan"),
    ({"steps": True}, TypeError, r"steps \(cap on Adam steps\) must be an int >= 1, got True"),
    ({"window": 0}, ValueError, r"window .* must be an int >= 1, got 0"),
])
def test_invert_argument_checks(kw: dict, exc: type, match: str) -> None:
    q = small()
    with pytest.raises(exc, match=match):
        q.invert(images(q), **kw)


def test_invert_empty_batch() -> None:
    with pytest.raises(ValueError, match=r"x is an empty batch \(shape \(0, 12\)\); pass at least one image"):
        small().invert(torch.zeros(0, 12))


@pytest.mark.parametrize("final, transform, match", [
    (nn.Tanh(), lambda x: (x + 1) / 2, r"only in the upper half of .* ends in Tanh: \[-1, 1\].*images in \[0, 1\]\? "
                                       r"use x \* 2 - 1"),
    (nn.Tanh(), lambda x: (x + 1) * 127.5, r"beyond .*images in \[0, 255\]\? use x / 127.5 - 1"),
    (nn.Sigmoid(), lambda x: x * 2 - 1, r"beyond .* ends in Sigmoid: \[0, 1\].*images in \[-1, 1\]\? use x / 2 \+ 0.5"),
    (nn.Hardtanh(-2.0, 2.0), lambda x: x * 300, r"beyond .* ends in Hardtanh: \[-2, 2\]"),
    (None, lambda x: x * 100, r"more than 10x beyond the values the generator makes \(it made 16 samples: "),
])
def test_images_outside_the_generator_range_are_warned_about(final: nn.Module | None, transform, match: str) -> None:
    q = small(final)
    with pytest.warns(UserWarning, match=r"invert: the images span .*" + match):
        q.invert(transform(images(q)), steps=2)


@pytest.mark.parametrize("final", [nn.Tanh(), nn.Sigmoid(), None])
def test_images_in_the_generator_range_give_no_warning(final: nn.Module | None) -> None:
    q = small(final)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q.invert(images(q), steps=2)


# ------------------------------------------------------------------------------- the paper kit
def test_corrupt_gzip_idx_body_names_the_file(tmp_path) -> None:
    from qmm_plugin.paper.data import read_idx, write_idx

    path = tmp_path / "labels-idx1-ubyte.gz"
    write_idx(torch.arange(200, dtype=torch.uint8), path)
    data = bytearray(path.read_bytes())
    for i in range(12, len(data) - 8):  # the deflate body, between the gzip header and trailer
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{path.name}: looks gzip-compressed but could not be decompressed .*"
                                         "re-download the file"):
        read_idx(path)
