"""convert(): module surgery on the generator/decoder shapes popular codebases use, the forward
contract (manifold=, biases=), export (merge), serialisation, and the errors on bad input."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import Tensor, nn

import qmm_plugin
from qmm_plugin import MultiBiasLinear, QuotientModel


# ------------------------------------------------------------------- generator shapes in the wild
def mlp_generator() -> nn.Module:
    """PyTorch-GAN style MLP generator with BatchNorm1d(out, 0.8)."""
    def block(i: int, o: int, norm: bool = True) -> list[nn.Module]:
        return [nn.Linear(i, o)] + ([nn.BatchNorm1d(o, 0.8)] if norm else []) + [nn.LeakyReLU(0.2)]
    return nn.Sequential(*block(8, 32, norm=False), *block(32, 64), nn.Linear(64, 1 * 8 * 8), nn.Tanh())


class LinearHeadConvGenerator(nn.Module):
    """DCGAN/WGAN-GP style: Linear head, .view, ConvTranspose stack."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16 * 4 * 4)
        self.net = nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(), nn.ConvTranspose2d(16, 1, 4, 2, 1), nn.Tanh())

    def forward(self, z: Tensor) -> Tensor:
        return self.net(self.fc(z).view(-1, 16, 4, 4))


class View(nn.Module):
    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: Tensor) -> Tensor:
        return x.view(x.shape[0], *self.shape)


def view_in_sequential() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 8 * 4 * 4), View(8, 4, 4),
                         nn.ConvTranspose2d(8, 1, 4, 2, 1), nn.Sigmoid())


class ConditionalGenerator(nn.Module):
    """InfoGAN style multi-input forward(noise, labels, code)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 10)
        self.body = nn.Sequential(nn.Linear(8 + 10 + 2, 32), nn.LeakyReLU(0.2), nn.Linear(32, 49), nn.Tanh())

    def forward(self, noise: Tensor, labels: Tensor, code: Tensor) -> Tensor:
        return self.body(torch.cat([noise, self.embed(labels), code], dim=1)).view(-1, 1, 7, 7)


class VAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(49, 32), nn.ReLU())
        self.fc_mu, self.fc_logvar = nn.Linear(32, 4), nn.Linear(32, 4)
        self.decoder = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 49))

    def forward(self, x: Tensor) -> Tensor:
        h = self.encoder(x)
        return self.decoder(self.fc_mu(h)).view(-1, 1, 7, 7)


class TokenMixer(nn.Module):
    """A Linear applied to (B, T, in) tensors: the per-sample bias broadcasts over T."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.ModuleDict({"proj": nn.Linear(6, 5)})

    def forward(self, x: Tensor) -> Tensor:
        return self.inner["proj"](x)


def _call_inputs(model: nn.Module, batch: int) -> tuple[Tensor, ...]:
    if isinstance(model, ConditionalGenerator):
        return torch.randn(batch, 8), torch.randint(0, 10, (batch,)), torch.rand(batch, 2)
    if isinstance(model, VAE):
        return (torch.randn(batch, 1, 7, 7),)
    if isinstance(model, TokenMixer):
        return (torch.randn(batch, 3, 6),)
    return (torch.randn(batch, 8),)


CASES = {
    "mlp_bn08": (mlp_generator, None, None, {"0", "2", "5"}),
    "linear_head_conv": (LinearHeadConvGenerator, None, None, {"fc"}),
    "view_in_sequential": (view_in_sequential, None, None, {"0", "2"}),
    "multi_input": (ConditionalGenerator, None, None, {"body.0", "body.2"}),
    "vae_decoder_only": (VAE, None, ["encoder.*", "fc_*"], {"decoder.0", "decoder.2"}),
    "vae_include": (VAE, "decoder.*", None, {"decoder.0", "decoder.2"}),
    "nested_3d_input": (TokenMixer, None, None, {"inner.proj"}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_convert_popular_shapes(name: str) -> None:
    """With init_std=0 every manifold reproduces the original model exactly; the surgery touches
    exactly the targeted Linear layers and keeps .weight in place."""
    make, include, exclude, expected_paths = CASES[name]
    torch.manual_seed(0)
    original = make().eval()
    converted_src = make()
    converted_src.load_state_dict(original.state_dict())
    weights_before = {p: m.weight for p, m in converted_src.named_modules() if isinstance(m, nn.Linear)}
    q = qmm_plugin.convert(converted_src, num_biases=3, include=include, exclude=exclude, init_std=0.0).eval()
    assert set(q.multi_bias_layers()) == expected_paths
    for path, layer in q.multi_bias_layers().items():
        assert layer.weight is weights_before[path]  # same Parameter object, same place
        assert layer.bias_bank.shape == (3, layer.out_features)
    untouched = {p for p, m in q.model.named_modules() if type(m) is nn.Linear}
    assert untouched == set(weights_before) - expected_paths
    inputs = _call_inputs(original, 5)
    with torch.no_grad():
        ref = original(*inputs)
        for i in range(3):
            torch.testing.assert_close(q(*inputs, manifold=i), ref)
        torch.testing.assert_close(q(*inputs), ref)  # sampled manifolds are all identical here


def test_manifolds_differ_and_sampling_is_per_sample() -> None:
    torch.manual_seed(0)
    q = qmm_plugin.convert(view_in_sequential(), num_biases=4, init_std=0.5)
    z = torch.randn(64, 8)
    with torch.no_grad():
        per_manifold = torch.stack([q(z, manifold=i) for i in range(4)])  # (A, B, ...)
        y = q(z)
    index = q.last_manifold
    assert index is not None and index.shape == (64,) and set(index.tolist()) == {0, 1, 2, 3}
    torch.testing.assert_close(y, per_manifold[index, torch.arange(64)])
    assert (per_manifold[0] - per_manifold[1]).abs().max() > 1e-3
    with torch.no_grad():
        torch.testing.assert_close(q(z, manifold=index), y)


def test_explicit_biases_forward() -> None:
    torch.manual_seed(0)
    q = qmm_plugin.convert(mlp_generator(), num_biases=3).eval()
    z = torch.randn(4, 8)
    layers = q.multi_bias_layers()
    index = torch.tensor([2, 0, 1, 2])
    with torch.no_grad():
        rows = {p: m.bias_bank[index] for p, m in layers.items()}
        torch.testing.assert_close(q(z, biases=rows), q(z, manifold=index))
        shared = {p: m.bias_bank[1] for p, m in layers.items()}  # (out,) broadcasts
        torch.testing.assert_close(q(z, biases=shared), q(z, manifold=1))
        partial = {"0": layers["0"].bias_bank[2]}
        torch.testing.assert_close(q(z, biases=partial, manifold=2), q(z, manifold=2))
    bias = {p: m.bias_bank[0].detach().expand(4, -1).clone().requires_grad_() for p, m in layers.items()}
    q(z, biases=bias).sum().backward()
    assert all(b.grad is not None and b.grad.abs().sum() > 0 for b in bias.values())


def test_merge_equals_manifold_and_loads_without_plugin(tmp_path) -> None:
    torch.manual_seed(0)
    q = qmm_plugin.convert(mlp_generator(), num_biases=4)
    q.train()
    q(torch.randn(16, 8))  # move BatchNorm running stats
    q.eval()
    merged = q.merge(manifold=2)
    assert not any(isinstance(m, MultiBiasLinear) for m in merged.modules())
    assert isinstance(merged, nn.Sequential) and not merged.training
    z = torch.randn(6, 8)
    with torch.no_grad():
        torch.testing.assert_close(merged(z), q(z, manifold=2))
    path = tmp_path / "merged.pt"
    torch.save(merged, path)
    torch.save(z, tmp_path / "z.pt")
    torch.save(merged(z).detach(), tmp_path / "y.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.modules['qmm_plugin'] = None  # importing qmm_plugin would fail
        m = torch.load({str(path)!r}, weights_only=False)
        z, y = torch.load({str(tmp_path / 'z.pt')!r}), torch.load({str(tmp_path / 'y.pt')!r})
        assert torch.allclose(m(z), y, atol=1e-6)
        print('ok')
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    # merging a model whose root is a Linear
    q_root = qmm_plugin.convert(nn.Linear(3, 4), num_biases=2)
    lin = q_root.merge(manifold=1)
    assert type(lin) is nn.Linear
    torch.testing.assert_close(lin(torch.ones(1, 3)), q_root(torch.ones(1, 3), manifold=1))


def test_state_dict_round_trip_and_A_mismatch() -> None:
    torch.manual_seed(0)
    q = qmm_plugin.convert(mlp_generator(), num_biases=4)
    q2 = qmm_plugin.convert(mlp_generator(), num_biases=4)
    q2.load_state_dict(q.state_dict())
    for (k, v), (k2, v2) in zip(q.state_dict().items(), q2.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert "model.0.bias_bank" in q.state_dict() and "model.0.weight" in q.state_dict()
    q_other = qmm_plugin.convert(mlp_generator(), num_biases=7)
    with pytest.raises(RuntimeError, match=r"A=4 manifolds but this model has A=7"):
        q_other.load_state_dict(q.state_dict())


def test_torch_save_load_and_to_dtype() -> None:
    torch.manual_seed(0)
    q = qmm_plugin.convert(ConditionalGenerator(), num_biases=3).eval()
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    q2 = torch.load(buf, weights_only=False)
    inputs = _call_inputs(q.model, 4)
    with torch.no_grad():
        torch.testing.assert_close(q2(*inputs, manifold=1), q(*inputs, manifold=1))
    q64 = q2.to(torch.float64)
    assert q64.multi_bias_layers()["body.0"].bias_bank.dtype == torch.float64
    out = q64(inputs[0].double(), inputs[1], inputs[2].double(), manifold=2)
    assert out.dtype == torch.float64


def test_functional_call() -> None:
    """functional_call with substituted parameters, forward and backward (torch.autograd.grad).

    torch.func.grad/vmap through the registered custom op (compile, CUDA) are not supported:
    PyTorch's custom_op autograd does not support functorch transforms yet (pytorch/pytorch#168393)."""
    torch.manual_seed(0)
    q = qmm_plugin.convert(view_in_sequential(), num_biases=3)
    params = {k: v.detach() * 0 for k, v in q.named_parameters()}
    out = torch.func.functional_call(q, params, (torch.randn(2, 8),), {"manifold": 1})
    torch.testing.assert_close(out, torch.full_like(out, 0.5))  # Sigmoid(0)
    live = {k: v.detach().clone().requires_grad_() for k, v in q.named_parameters()}
    loss = torch.func.functional_call(q, live, (torch.randn(4, 8),), {"manifold": torch.tensor([0, 0, 2, 2])}).sum()
    (grad_bank,) = torch.autograd.grad(loss, [live["model.0.bias_bank"]])
    assert grad_bank.shape == (3, 64) and grad_bank[1].abs().sum() == 0 and grad_bank[0].abs().sum() > 0
    # eager CPU runs the op's reference computation, so torch.func.grad works there
    grads = torch.func.grad(lambda p: torch.func.functional_call(q, p, (torch.randn(4, 8),), {"manifold": 2}).sum())(
        dict(q.named_parameters()))
    assert grads["model.0.bias_bank"][2].abs().sum() > 0 and grads["model.0.bias_bank"][:2].abs().sum() == 0


def test_torch_compile_converted_generator_fullgraph() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    q = qmm_plugin.convert(view_in_sequential(), num_biases=5).eval()
    compiled = torch.compile(q, fullgraph=True, backend="aot_eager")
    z = torch.randn(6, 8)
    index = torch.randint(0, 5, (6,))
    torch.testing.assert_close(compiled(z, manifold=index), q(z, manifold=index))
    y = compiled(z)  # sampled manifolds inside the graph
    assert y.shape == (6, 1, 8, 8)
    torch.testing.assert_close(y, q(z, manifold=compiled.last_manifold))


def test_attribute_fallthrough_and_repr() -> None:
    g = LinearHeadConvGenerator()
    g.z_dim = 8
    q = qmm_plugin.convert(g, num_biases=2)
    assert q.z_dim == 8 and q.fc is g.fc
    assert "num_biases=2" in repr(q)


def test_default_init_std_spreads_biases_like_linear_init() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(300, 2000)
    q = qmm_plugin.convert(nn.Sequential(lin), num_biases=50)
    bank = q.model[0].bias_bank.detach()
    noise = bank - lin.bias.detach()
    assert abs(float(noise.std()) - (1 / (3 * 300)) ** 0.5) < 0.002


# ------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("bad, exc, msg", [
    (0, ValueError, "num_biases must be >= 1"),
    (2.0, TypeError, "num_biases must be an int"),
    (True, TypeError, "num_biases must be an int"),
])
def test_bad_num_biases(bad, exc, msg) -> None:
    with pytest.raises(exc, match=msg):
        qmm_plugin.convert(mlp_generator(), num_biases=bad)


def test_no_linear_names_what_it_found() -> None:
    g = nn.Sequential(nn.ConvTranspose2d(8, 4, 4), nn.ReLU(), nn.ConvTranspose2d(4, 1, 4))
    with pytest.raises(ValueError, match=r"no nn.Linear.*ConvTranspose2d.*layer_types="):
        qmm_plugin.convert(g, num_biases=2)


def test_patterns_that_match_nothing() -> None:
    with pytest.raises(ValueError, match=r"include pattern 'decoder\.\*' matches no module path"):
        qmm_plugin.convert(mlp_generator(), num_biases=2, include="decoder.*")
    with pytest.raises(ValueError, match="exclude pattern 'nope' matches no module path"):
        qmm_plugin.convert(mlp_generator(), num_biases=2, exclude=["nope"])
    with pytest.raises(ValueError, match="leave no nn.Linear to convert"):
        qmm_plugin.convert(VAE(), num_biases=2, include="encoder.*", exclude="encoder.*")


def test_already_converted() -> None:
    q = qmm_plugin.convert(mlp_generator(), num_biases=2)
    with pytest.raises(ValueError, match="already converted"):
        qmm_plugin.convert(q, num_biases=2)
    with pytest.raises(ValueError, match="already converted"):
        qmm_plugin.convert(q.model, num_biases=2)


def test_parametrized_linear_is_refused() -> None:
    g = nn.Sequential(torch.nn.utils.parametrizations.spectral_norm(nn.Linear(3, 4)))
    with pytest.raises(ValueError, match="parametrization"):
        qmm_plugin.convert(g, num_biases=2)


def test_bad_manifold_index() -> None:
    q = qmm_plugin.convert(mlp_generator(), num_biases=3)
    z = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"manifold=3 is out of range: this model has A=3"):
        q(z, manifold=3)
    with pytest.raises(ValueError, match=r"values span 0\.\.5 but this model has A=3"):
        q(z, manifold=torch.tensor([0, 5, 1, 1]))
    # the boundary: index A is refused, A - 1 is the last manifold (int and tensor forms)
    with pytest.raises(ValueError, match=r"values span 0\.\.3 but this model has A=3"):
        q(z, manifold=torch.tensor([0, 3, 1, 1]))
    torch.testing.assert_close(q(z, manifold=torch.tensor([2, 2, 2, 2])), q(z, manifold=2))
    with pytest.raises(ValueError, match=r"values span 0\.\.3 but this model has A=3"):
        q.model[0](z, manifold=torch.tensor([0, 3, 1, 1]))  # a layer called on its own
    with pytest.raises(ValueError, match=r"values span -1\.\.1"):
        q(z, manifold=torch.tensor([0, -1, 1, 1]))
    with pytest.raises(ValueError, match=r"batch of 4 samples but the manifold index has 3 entries"):
        q(z, manifold=torch.tensor([0, 1, 1]))
    with pytest.raises(TypeError, match="dtype torch.long"):
        q(z, manifold=torch.tensor([0.0, 1.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="1-D"):
        q(z, manifold=torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(TypeError, match="int or a"):
        q(z, manifold="1")
    with pytest.raises(ValueError, match="is on meta but the input is on cpu"):
        q(z, manifold=torch.zeros(4, dtype=torch.long, device="meta"))


def test_bad_biases_dict() -> None:
    q = qmm_plugin.convert(mlp_generator(), num_biases=3)
    z = torch.randn(4, 8)
    good = {p: m.bias_bank[0].detach() for p, m in q.multi_bias_layers().items()}
    with pytest.raises(KeyError, match=r"unknown layer path\(s\) \['fc9'\]"):
        q(z, biases={**good, "fc9": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"biases\['0'\] must have shape \(32,\) or \(B, 32\)"):
        q(z, biases={**good, "0": torch.zeros(31)})
    with pytest.raises(ValueError, match="but not"):
        q(z, biases={"0": good["0"]})
    with pytest.raises(ValueError, match="bias has 3 rows but the batch has 4"):
        q(z, biases={**good, "0": torch.zeros(3, 32)})


def test_layer_outside_a_quotient_model_needs_a_manifold() -> None:
    layer = MultiBiasLinear(3, 4, num_biases=2)
    with pytest.raises(RuntimeError, match="does not know which manifold"):
        layer(torch.randn(2, 3))
    assert layer(torch.randn(2, 3), manifold=1).shape == (2, 4)


def test_merge_rejects_tensor_manifold() -> None:
    q = qmm_plugin.convert(mlp_generator(), num_biases=3)
    with pytest.raises(TypeError, match="one int"):
        q.merge(manifold=torch.tensor([1]))
    assert isinstance(q, QuotientModel)


def test_torch_compile_fullgraph_with_forward_regularizer() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    q = qmm_plugin.convert(view_in_sequential(), num_biases=5).eval()
    compiled = torch.compile(q, fullgraph=True, backend="aot_eager")
    z, index = torch.randn(6, 8), torch.randint(0, 5, (6,))
    y, r_ba = compiled(z, manifold=index, return_regularizer=True)
    torch.testing.assert_close(y, q(z, manifold=index))
    torch.testing.assert_close(r_ba, q.ba_regularizer())
    params = [p for p in q.parameters() if p.requires_grad]
    got = torch.autograd.grad(y.square().mean() + r_ba, params)
    ref = torch.autograd.grad(q(z, manifold=index).square().mean() + q.ba_regularizer(), params)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
