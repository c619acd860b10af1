"""Multi-bias convolutions: forward per manifold, Eq. 2's term against a reference built from
autograd VJPs, merge back to plain convolutions, tangential spread against a dense projector,
alignment, inversion with channel biases, and the conv-only DCGAN of pytorch/examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import qmm_plugin
from qmm_plugin import MultiBiasConv2d, MultiBiasConvTranspose2d

CONV_TYPES = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)


class DCGANGenerator(nn.Module):
    """pytorch/examples dcgan/main.py's generator (ConvTranspose2d only, bias=False), small."""

    def __init__(self, nz: int = 6, ngf: int = 4, nc: int = 1) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 2, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh())

    def forward(self, z: Tensor) -> Tensor:
        return self.main(z)


# (plain layer, input shape): strides, paddings, groups, dilation, odd sizes
LAYERS = {
    "conv_s2_p1": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (4, 8, 7)),  # one row never read
    "conv_groups_dil": (lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2), (4, 6, 5)),
    "conv_same_nobias": (lambda: nn.Conv2d(3, 5, 3, padding="same", bias=False), (3, 5, 6)),
    "deconv_s2_p1": (lambda: nn.ConvTranspose2d(4, 6, 4, stride=2, padding=1), (4, 3, 5)),
    "deconv_outpad_groups": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
                             (4, 4, 3)),
}


def converted_layer(name: str, num_biases: int = 4, seed: int = 0) -> tuple[nn.Module, nn.Module, tuple[int, ...]]:
    torch.manual_seed(seed)
    make, shape = LAYERS[name]
    model = nn.Sequential(make().double())
    plain = make().double()
    plain.load_state_dict(model[0].state_dict())
    qmm_plugin.convert(model, num_biases=num_biases, layer_types=CONV_TYPES, init_std=0.7)
    return model, plain, shape


def vjp_spread(plain: nn.Module, bank: Tensor, in_shape: tuple[int, ...]) -> Tensor:
    """tr cov_i(W^T B a_i) with W^T B c taken as the VJP of the bias-free layer at the input size."""
    x0 = torch.zeros(1, *in_shape, dtype=bank.dtype, requires_grad=True)
    y = F.conv2d(x0, plain.weight, None, plain.stride, plain.padding, plain.dilation, plain.groups) \
        if isinstance(plain, nn.Conv2d) else \
        F.conv_transpose2d(x0, plain.weight, None, plain.stride, plain.padding, plain.output_padding, plain.groups,
                           plain.dilation)
    centred = bank - bank.mean(0, keepdim=True)
    total = bank.new_zeros(())
    for c in centred:
        (v,) = torch.autograd.grad(y, x0, c.view(1, -1, 1, 1).expand_as(y), create_graph=True, retain_graph=True)
        total = total + v.pow(2).sum()
    return total / (bank.shape[0] - 1)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_forward_per_manifold_and_merge(name: str) -> None:
    model, plain, shape = converted_layer(name)
    layer = model[0]
    assert isinstance(layer, (MultiBiasConv2d, MultiBiasConvTranspose2d)) and layer.bias is None
    x = torch.randn(5, *shape, dtype=torch.float64)
    index = torch.tensor([0, 3, 1, 2, 3])
    y = model(x, manifold=index)
    for b, i in enumerate(index.tolist()):
        with torch.no_grad():
            plain.bias.copy_(layer.bias_bank[i]) if plain.bias is not None else None
        ref = plain(x[b:b + 1]) if plain.bias is not None else plain(x[b:b + 1]) + layer.bias_bank[i].view(1, -1, 1, 1)
        torch.testing.assert_close(y[b:b + 1], ref)
    merged = model.merge(2)
    assert type(merged[0]) is type(plain) and merged[0].bias is not None
    torch.testing.assert_close(merged(x), model(x, manifold=2))
    rows = torch.randn(5, layer.bias_size, dtype=torch.float64)
    torch.testing.assert_close(model(x, biases={"0": rows}), model(x, manifold=0) - layer.bias_bank[0].view(1, -1, 1, 1)
                               + rows.view(5, -1, 1, 1))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_regularizer_term_equals_the_vjp_reference(name: str) -> None:
    """Eq. 2's conv term log(tr cov_i(W^T B a_i) + eps), value and gradients, against autograd VJPs."""
    model, plain, shape = converted_layer(name)
    layer = model[0]
    model(torch.randn(2, *shape, dtype=torch.float64))  # the operator's input size comes from a forward
    ref = vjp_spread(plain, layer.bias_bank, shape)
    got = layer.bias_spread()
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(model.ba_regularizer_terms()["0"], torch.log(ref + 1e-8))
    params = [layer.weight, layer.bias_bank]
    g_got = torch.autograd.grad(got, params)
    ref_w = torch.autograd.grad(vjp_spread(plain, layer.bias_bank, shape), [plain.weight, layer.bias_bank])
    for a, b in zip(g_got, ref_w):
        torch.testing.assert_close(a, b)
    out, r_ba = model(torch.randn(3, *shape, dtype=torch.float64), return_regularizer=True)
    torch.testing.assert_close(r_ba, model.ba_regularizer())


def dense_operator(plain: nn.Module, in_shape: tuple[int, ...]) -> np.ndarray:
    """The bias-free layer as a dense matrix, from its Jacobian."""
    def f(x: Tensor) -> Tensor:
        return F.conv2d(x, plain.weight, None, plain.stride, plain.padding, plain.dilation, plain.groups) \
            if isinstance(plain, nn.Conv2d) else \
            F.conv_transpose2d(x, plain.weight, None, plain.stride, plain.padding, plain.output_padding,
                               plain.groups, plain.dilation)
    x = torch.zeros(1, *in_shape, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: f(v.view_as(x)).flatten(), x.flatten())
    return jac.detach().numpy()


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_tangential_spread_and_alignment_against_a_dense_projector(name: str) -> None:
    model, plain, shape = converted_layer(name)
    layer = model[0]
    model(torch.randn(1, *shape, dtype=torch.float64))
    w = dense_operator(plain, shape)
    proj = w @ np.linalg.pinv(w)
    bank = layer.bias_bank.detach().numpy()
    out_hw = model(torch.zeros(1, *shape, dtype=torch.float64), manifold=0).shape[-2:]
    broadcast = np.repeat(bank - bank.mean(0), int(np.prod(out_hw)), axis=1)  # B (a_i - a_bar)
    expected = float(((broadcast @ proj.T) ** 2).sum() / (bank.shape[0] - 1))
    assert model.tangential_spread()["0"] == pytest.approx(expected, rel=1e-6, abs=1e-12)
    qmm_plugin.align_biases_(model)
    assert model.tangential_spread()["0"] < 1e-12
    assert float(layer.bias_spread().detach()) < 1e-12


def test_operator_needs_a_forward_first() -> None:
    model, _, _ = converted_layer("conv_s2_p1")
    with pytest.raises(RuntimeError, match="depends on the input size.*run the model once"):
        model.ba_regularizer()


def test_dcgan_conv_only_default_refused_then_converted() -> None:
    torch.manual_seed(0)
    g = DCGANGenerator()
    with pytest.raises(ValueError, match=r"no nn.Linear layer.*ConvTranspose2d.*layer_types="):
        qmm_plugin.convert(g, num_biases=3)
    q = qmm_plugin.convert(g, num_biases=3, layer_types=CONV_TYPES)
    assert set(q.multi_bias_layers()) == {"main.0", "main.3", "main.6"}
    z = torch.randn(4, 6, 1, 1)
    opt = torch.optim.Adam(g.parameters(), lr=1e-3)
    for _ in range(3):  # the user's training loop on the user's object
        fake, r_ba = g(z, return_regularizer=True)
        loss = fake.square().mean() + 0.05 * r_ba
        opt.zero_grad()
        loss.backward()
        opt.step()
    g.eval()
    for i in range(3):
        torch.testing.assert_close(g.merge(i).eval()(z), g(z, manifold=i))
    assert all(v >= 0 for v in g.tangential_spread().values())


class LinearHeadConv(nn.Module):
    """Linear head then a conv tail, all converted: inversion fits channel biases too."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4 * 3 * 3)
        self.deconv = nn.ConvTranspose2d(4, 2, 4, 2, 1)

    def forward(self, z: Tensor) -> Tensor:
        return self.deconv(torch.tanh(self.fc(z)).view(-1, 4, 3, 3))


def test_invert_with_conv_layers_keeps_the_normal_space_constraint() -> None:
    torch.manual_seed(0)
    g = LinearHeadConv().double()
    q = qmm_plugin.convert(g, num_biases=3, layer_types=CONV_TYPES, init_std=0.3)
    g(torch.zeros(1, 3, dtype=torch.float64))
    qmm_plugin.align_biases_(g)
    x = g(torch.randn(2, 3, dtype=torch.float64), manifold=torch.tensor([0, 2])).detach()
    inv = g.invert(x, steps=300, seed=0)
    assert set(inv.biases) == {"fc", "deconv"}
    layer = g.deconv
    drift = layer.bias_adjoint(inv.biases["deconv"] - layer.bias_bank.detach().mean(0))
    assert float(drift.detach().abs().max()) < 1e-8  # W^T B (a - a_bar) = 0: only normal-space channel biases
    assert float(inv.loss.max()) < 1e-2 * float(x.pow(2).flatten(1).sum(1).min())
    pen = q.invert(x, steps=50, seed=0, bias_mode="penalty")
    assert pen.biases["deconv"].shape == (2, 2)


def test_core_modules_import_one_way() -> None:
    """The plugin's modules import each other without cycles (function-level imports included,
    type-only imports under ``if TYPE_CHECKING:`` excluded)."""
    import ast
    from pathlib import Path

    pkg = Path(qmm_plugin.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in pkg.glob("*.py"):
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and id(node) not in typing_only:
                deps.update([node.module] if node.module else [a.name for a in node.names])
        graph[path.stem] = {d.split(".")[0] for d in deps} - {path.stem}
    graph.pop("__init__")

    def visit(mod: str, stack: list[str]) -> None:
        assert mod not in stack, f"import cycle: {' -> '.join(stack + [mod])}"
        for dep in graph.get(mod, ()):
            visit(dep, stack + [mod])

    for mod in graph:
        visit(mod, [])
