"""The user's own object is the converted model: library methods that call ``self.forward``,
``use_manifold``, per-call state under threads, deepcopy (EMA), state_dict, pickling, DDP,
torch.compile, and the conversion edge cases (shared modules, MultiheadAttention, hook-based
reparametrizations, merge keeping ties and requires_grad)."""

from __future__ import annotations

import copy
import io
import pickle
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import qmm_plugin


class LibraryGenerator(nn.Module):
    """A GAN library's generator: one Linear head, conv blocks, and the library's own sampling and
    training methods, which call ``self.forward`` directly (as e.g. torch-mimicry's do)."""

    def __init__(self, nz: int = 8) -> None:
        super().__init__()
        self.nz = nz
        self.l1 = nn.Linear(nz, 4 * 4 * 8)
        self.block = nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(8, 4, 4, 2, 1), nn.ReLU(), nn.Conv2d(4, 1, 3, 1, 1))

    def forward(self, z: Tensor) -> Tensor:
        return torch.tanh(self.block(self.l1(z).view(-1, 8, 4, 4)))

    def generate_images(self, num_images: int) -> Tensor:
        noise = torch.randn(num_images, self.nz)
        with torch.no_grad():
            return self.forward(noise)

    def train_step(self, real: Tensor, opt: torch.optim.Optimizer) -> float:
        fake = self(torch.randn(real.shape[0], self.nz))
        loss = F.mse_loss(fake, real)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss.detach())


def converted(num_biases: int = 4, seed: int = 0) -> tuple[LibraryGenerator, qmm_plugin.QuotientModel]:
    torch.manual_seed(seed)
    g = LibraryGenerator()
    q = qmm_plugin.convert(g, num_biases=num_biases, init_std=0.5)
    return g, q


def per_manifold_reference(g: nn.Module, z: Tensor, index: Tensor) -> Tensor:
    """Row b from the merged plain model of manifold index[b]."""
    plain = {int(i): g.merge(int(i)) for i in index.unique()}
    return torch.cat([plain[int(i)](z[b:b + 1]) for b, i in enumerate(index)])


# ----------------------------------------------------------------------- the user's object
def test_user_object_methods_and_returned_wrapper_agree() -> None:
    g, q = converted()
    assert isinstance(g, LibraryGenerator) and isinstance(g, qmm_plugin.QuotientMixin) and q.model is g
    z = torch.randn(6, 8)
    index = torch.tensor([0, 1, 2, 3, 2, 1])
    torch.testing.assert_close(g(z, manifold=index), q(z, manifold=index))
    torch.testing.assert_close(g(z, manifold=index), per_manifold_reference(g, z, index))
    torch.testing.assert_close(g.forward(z, manifold=2), g.merge(2)(z))
    torch.testing.assert_close(g.ba_regularizer(), q.ba_regularizer())
    assert g.tangential_spread() == q.tangential_spread()
    y, r_ba = g(z, return_regularizer=True)
    torch.testing.assert_close(r_ba, g.ba_regularizer())
    # a sampled call uses one manifold per sample in every layer
    y = g(z)
    torch.testing.assert_close(y, per_manifold_reference(g, z, q.last_manifold))
    merged = g.merge(1)
    assert type(merged) is LibraryGenerator and not any(isinstance(m, qmm_plugin.MultiBiasLayer) for m in merged.modules())


def test_library_methods_that_call_self_forward() -> None:
    g, q = converted()
    assert g.generate_images(5).shape == (5, 1, 8, 8)
    opt = torch.optim.SGD(g.parameters(), lr=0.01)
    bank_before = g.l1.bias_bank.detach().clone()
    g.train_step(torch.zeros(6, 1, 8, 8), opt)
    assert not torch.equal(g.l1.bias_bank.detach(), bank_before)  # the library's own step trained the bank


def test_use_manifold_routes_library_sampling() -> None:
    g, q = converted()
    for model in (g, q):
        torch.manual_seed(1)
        with qmm_plugin.use_manifold(model, 3):
            got = g.generate_images(4)
            direct = g.l1(torch.zeros(2, 8))  # a layer called outside any forward uses the pin too
        torch.manual_seed(1)
        torch.testing.assert_close(got, torch.tanh(g.merge(3).block(g.merge(3).l1(torch.randn(4, 8)).view(-1, 8, 4, 4))))
        torch.testing.assert_close(direct, g.l1.bias_bank.detach()[3].expand(2, -1))
    index = torch.tensor([0, 3, 1])
    z = torch.randn(3, 8)
    with qmm_plugin.use_manifold(g, index):
        torch.testing.assert_close(g(z), per_manifold_reference(g, z, index))
        torch.testing.assert_close(g(z, manifold=2), g.merge(2)(z))  # an explicit choice wins
    with pytest.raises(RuntimeError, match="does not know which manifold"):
        g.l1(torch.zeros(2, 8))
    with pytest.raises(ValueError, match="out of range"):
        with qmm_plugin.use_manifold(g, 4):
            pass
    with pytest.raises(TypeError, match="not a converted model"):
        with qmm_plugin.use_manifold(LibraryGenerator(), 0):
            pass


def test_threads_never_mix_manifolds() -> None:
    """Many threads call one model at once, each with its own manifold (explicit, pinned with
    use_manifold, or per-sample); every output equals the merged plain model of its manifold."""
    g, q = converted(num_biases=5)
    g.eval()
    plain = [g.merge(i).eval() for i in range(5)]
    z = torch.randn(3, 8)
    with torch.no_grad():
        expected = [p(z) for p in plain]
    errors: list[str] = []
    barrier = threading.Barrier(8)

    def worker(t: int) -> None:
        barrier.wait()
        try:
            for step in range(40):
                i = (t + step) % 5
                with torch.no_grad():
                    if t % 3 == 0:
                        out = g(z, manifold=i)
                    elif t % 3 == 1:
                        with qmm_plugin.use_manifold(g, i):
                            out = g.forward(z)
                    else:
                        out = q(z, manifold=torch.full((3,), i))
                if not torch.allclose(out, expected[i], atol=1e-6):
                    errors.append(f"thread {t} step {step}: wrong manifold")
        except Exception as err:  # reported below with the thread and step
            errors.append(f"thread {t}: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []


# ------------------------------------------------------------------- copies and serialisation
def test_deepcopy_ema_copy_routes_its_own_layers() -> None:
    g, q = converted()
    ema = copy.deepcopy(g)
    assert type(ema) is type(g) and ema.l1 is not g.l1
    z = torch.randn(4, 8)
    torch.testing.assert_close(ema(z, manifold=1), g(z, manifold=1))
    with torch.no_grad():
        g.l1.bias_bank.add_(1.0)
    assert not torch.allclose(ema(z, manifold=1), g(z, manifold=1))
    assert ema(z).shape == (4, 1, 8, 8) and ema.ba_regularizer().isfinite()
    with torch.no_grad():  # the EMA update loop of a training framework
        for pe, pg in zip(ema.parameters(), g.parameters()):
            pe.lerp_(pg, 0.5)
    q_copy = copy.deepcopy(q)
    torch.testing.assert_close(q_copy(z, manifold=2), q(z, manifold=2))


def test_state_dict_round_trip_on_the_users_object() -> None:
    g, _ = converted(seed=0)
    g2, _ = converted(seed=1)
    assert set(g.state_dict()) == {"l1.weight", "l1.bias_bank", "block.1.weight", "block.1.bias",
                                   "block.3.weight", "block.3.bias"}
    g2.load_state_dict(g.state_dict())
    z = torch.randn(3, 8)
    torch.testing.assert_close(g2(z, manifold=3), g(z, manifold=3))


def test_pickle_and_torch_save_of_the_users_object() -> None:
    g, _ = converted()
    z = torch.randn(3, 8)
    buf = io.BytesIO()
    torch.save(g, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded) is type(g) and isinstance(loaded, LibraryGenerator)
    torch.testing.assert_close(loaded(z, manifold=1), g(z, manifold=1))
    again = pickle.loads(pickle.dumps(g))
    torch.testing.assert_close(again(z, manifold=2), g(z, manifold=2))
    assert again.generate_images(2).shape == (2, 1, 8, 8)


def test_ddp_wraps_the_users_object(tmp_path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    g, _ = converted()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DDP(g)
        z = torch.randn(4, 8)
        torch.testing.assert_close(ddp(z, manifold=2), g.merge(2)(z))
        fake, r_ba = ddp(z, return_regularizer=True)
        (fake.square().mean() + 0.05 * r_ba).backward()
        assert g.l1.bias_bank.grad is not None and g.l1.weight.grad is not None
    finally:
        dist.destroy_process_group()


def test_torch_compile_of_the_users_object() -> None:
    torch._dynamo.reset()
    g, _ = converted()
    compiled = torch.compile(g, fullgraph=True, backend="aot_eager")
    z, index = torch.randn(5, 8), torch.tensor([0, 1, 2, 3, 0])
    torch.testing.assert_close(compiled(z, manifold=index), g(z, manifold=index))
    assert compiled(z).shape == (5, 1, 8, 8)


def test_use_manifold_reaches_a_compiled_forward() -> None:
    torch._dynamo.reset()
    g, _ = converted()
    compiled = torch.compile(g, backend="aot_eager")
    z = torch.randn(3, 8)
    with qmm_plugin.use_manifold(g, 2):
        torch.testing.assert_close(compiled(z), g.merge(2)(z))


# ------------------------------------------------------------------------------ edge cases
class SharedLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.hidden = nn.Linear(6, 6)
        self.again = self.hidden  # the same module under a second name

    def forward(self, z: Tensor) -> Tensor:
        return self.again(torch.relu(self.hidden(self.inp(z))))


def test_module_registered_under_two_names_is_converted_once_and_shared() -> None:
    torch.manual_seed(0)
    g = SharedLinear()
    q = qmm_plugin.convert(g, num_biases=3, init_std=1.0)
    assert isinstance(g.hidden, qmm_plugin.MultiBiasLinear) and g.again is g.hidden
    assert set(q.multi_bias_layers()) == {"inp", "hidden"}
    z = torch.randn(2, 4)
    bank_h = g.hidden.bias_bank.detach()
    h = torch.relu(F.linear(F.linear(z, g.inp.weight, g.inp.bias_bank[1]), g.hidden.weight, bank_h[1]))
    torch.testing.assert_close(g(z, manifold=1), F.linear(h, g.hidden.weight, bank_h[1]))
    merged = g.merge(1)
    assert merged.again is merged.hidden and isinstance(merged.hidden, nn.Linear)
    torch.testing.assert_close(merged(z), g(z, manifold=1))


class AttentionDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, z: Tensor) -> Tensor:
        h = self.embed(z)
        return self.head(self.attn(h, h, h, need_weights=False)[0])


def test_multihead_attention_out_proj_is_skipped_with_a_warning() -> None:
    g = AttentionDecoder()
    with pytest.warns(UserWarning, match=r"skipped \['attn.out_proj'\].*MultiheadAttention"):
        q = qmm_plugin.convert(g, num_biases=2)
    assert set(q.multi_bias_layers()) == {"embed", "head"} and type(g.attn.out_proj) is not qmm_plugin.MultiBiasLinear
    assert "skipped=['attn.out_proj']" in repr(q)
    assert g(torch.randn(2, 5, 4), manifold=1).shape == (2, 5, 3)


@pytest.mark.parametrize("wrap, remover", [
    (torch.nn.utils.spectral_norm, "remove_spectral_norm"),
    (torch.nn.utils.weight_norm, "remove_weight_norm"),
])
def test_hook_based_reparametrization_is_refused_clearly(wrap, remover) -> None:
    g = nn.Sequential(wrap(nn.Linear(3, 4)), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=rf"layer '0' carries the hook-based .*{remover}\(layer\)"):
        qmm_plugin.convert(g, num_biases=2)


class TiedFrozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Linear(5, 5)
        self.b.weight = self.a.weight  # tied
        self.c = nn.Linear(5, 2)
        self.c.weight.requires_grad_(False)

    def forward(self, z: Tensor) -> Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(z)))))


def test_merge_keeps_weight_ties_and_requires_grad() -> None:
    torch.manual_seed(0)
    g = TiedFrozen()
    g.c.bias.requires_grad_(False)
    qmm_plugin.convert(g, num_biases=3)
    assert g.b.weight is g.a.weight
    merged = g.merge(2)
    assert merged.b.weight is merged.a.weight and merged.a.weight is not g.a.weight
    assert not merged.c.weight.requires_grad and not merged.c.bias.requires_grad
    assert merged.a.weight.requires_grad and merged.a.bias.requires_grad
    z = torch.randn(4, 5)
    torch.testing.assert_close(merged(z), g(z, manifold=2))


def test_member_named_like_a_method_is_refused() -> None:
    class HasMerge(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.merge = nn.Linear(2, 2)

        def forward(self, z: Tensor) -> Tensor:
            return self.merge(z)

    with pytest.raises(ValueError, match=r"members named \['merge'\]"):
        qmm_plugin.convert(HasMerge(), num_biases=2)
