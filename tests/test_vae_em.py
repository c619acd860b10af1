"""Appendix C's EM (``qmm_plugin.paper.vae_em``): the all-decoder likelihood and the M-step terms."""

from __future__ import annotations

import math

import pytest
import torch

import qmm_plugin
from qmm_plugin.paper import vae_em
from qmm_plugin.paper.models import BetaVAEEncoder, beta_vae_decoder, reparameterize
from qmm_plugin.paper.vae_em import decode_all_manifolds, em_losses


def test_decode_all_manifolds_equals_one_forward_per_manifold() -> None:
    torch.manual_seed(0)
    q = qmm_plugin.convert(beta_vae_decoder(8), num_biases=3)
    z = torch.randn(2, 8)
    stacked = decode_all_manifolds(q, z)
    assert stacked.shape == (3, 2, 1, 28, 28)
    for i in range(3):
        torch.testing.assert_close(stacked[i], q(z, manifold=i), rtol=1e-5, atol=1e-5)
    # the manifolds really differ (so the check above can fail if rows were mixed up)
    assert (stacked[0] - stacked[1]).abs().max() > 1e-3


def test_em_responsibilities_sum_to_one_and_pick_the_best_decoder() -> None:
    torch.manual_seed(1)
    q = qmm_plugin.convert(beta_vae_decoder(8), num_biases=4)
    enc = BetaVAEEncoder(8)
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    terms = em_losses(q, enc, x, beta=4.0)
    torch.testing.assert_close(terms["gamma"].sum(0), torch.ones(3))
    assert torch.isfinite(terms["loss"]) and terms["loss"].requires_grad


def test_em_responsibilities_match_a_hand_computed_case(monkeypatch: pytest.MonkeyPatch) -> None:
    """A = 3 decoders whose Bernoulli logits differ only at pixel 0 (target 1 there, 1/2 elsewhere):
    p(pixel 0) = σ(logit) gives γ ∝ p by hand; the E-step must pick the best decoder per sample
    and the M-step gradient must hold γ fixed (Appendix C)."""
    log3 = math.log(3.0)
    logits = torch.zeros(3, 2, 1, 28, 28, dtype=torch.float64)
    logits[:, 0, 0, 0, 0] = torch.tensor([0.0, log3, -log3])  # sample 0: p = 1/2, 3/4, 1/4
    logits[:, 1, 0, 0, 0] = torch.tensor([-log3, 0.0, log3])  # sample 1: p = 1/4, 1/2, 3/4
    logits.requires_grad_(True)
    monkeypatch.setattr(vae_em, "decode_all_manifolds", lambda q, z, return_regularizer=False: logits)

    class ZeroEncoder(torch.nn.Module):  # mu = logvar = 0: the KL term is 0
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x.new_zeros(x.shape[0], 8), x.new_zeros(x.shape[0], 8)

    x = torch.zeros(2, 1, 28, 28, dtype=torch.float64)  # target (x + 1) / 2 = 1/2 ...
    x[:, 0, 0, 0] = 1.0  # ... except pixel 0, target 1
    terms = em_losses(None, ZeroEncoder(), x, beta=4.0)
    p0 = torch.tensor([[1 / 2, 1 / 4], [3 / 4, 1 / 2], [1 / 4, 3 / 4]], dtype=torch.float64)  # (A, B)
    gamma = p0 / p0.sum(0)  # [[1/3, 1/6], [1/2, 1/3], [1/6, 1/2]]
    torch.testing.assert_close(terms["gamma"], gamma, rtol=1e-6, atol=1e-9)
    assert terms["gamma"].argmax(0).tolist() == [1, 2]  # the best decoder of each sample
    rest = 783 * math.log(2.0)  # the 783 pixels at logit 0, target 1/2: -log p = log 2 each
    log_p = p0.log() - rest
    torch.testing.assert_close(terms["log_px_best"], log_p.max(0).values.mean(), rtol=1e-9, atol=1e-6)
    torch.testing.assert_close(terms["nll"], -(gamma * log_p).sum(0).mean(), rtol=1e-9, atol=1e-6)
    torch.testing.assert_close(terms["kl"], torch.tensor(0.0, dtype=torch.float64))
    torch.testing.assert_close(terms["loss"], terms["nll"])
    # M-step: γ is held fixed, so d loss / d logit_i (pixel 0) = -γ_i (1 - p_i) / B
    (grad,) = torch.autograd.grad(terms["loss"], logits)
    torch.testing.assert_close(grad[:, :, 0, 0, 0], -gamma * (1 - p0) / 2, rtol=1e-6, atol=1e-9)


def test_em_loss_takes_r_ba_from_the_decoder_forward() -> None:
    """λ > 0: the M-step loss adds λ·R_BA, with R_BA (from the stacked forward) equal to the
    separate q.ba_regularizer() in value and in its gradient on every converted layer."""
    torch.manual_seed(2)
    q = qmm_plugin.convert(beta_vae_decoder(8), num_biases=4)
    enc = BetaVAEEncoder(8)
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    torch.manual_seed(5)
    plain = em_losses(q, enc, x, beta=4.0)
    torch.manual_seed(5)  # the same reparameterisation noise
    terms = em_losses(q, enc, x, beta=4.0, lam=0.5)
    assert "r_ba" not in plain
    separate = q.ba_regularizer()
    torch.testing.assert_close(terms["r_ba"], separate)
    torch.testing.assert_close(terms["loss"], plain["loss"] + 0.5 * separate)
    params = [p for layer in q.multi_bias_layers().values() for p in (layer.weight, layer.bias_bank)]
    got = torch.autograd.grad(terms["r_ba"], params)
    ref = torch.autograd.grad(separate, params)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_em_losses_uses_given_responsibilities_instead_of_the_e_step() -> None:
    """The warm start: a one-hot γ (e.g. k-means clusters) replaces the E-step, so only decoder
    γ's row gets each sample's likelihood term; a γ of the wrong shape or not summing to 1 is refused."""
    torch.manual_seed(3)
    q = qmm_plugin.convert(beta_vae_decoder(8), num_biases=3)
    enc = BetaVAEEncoder(8)
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    given = torch.nn.functional.one_hot(torch.tensor([2, 0, 2, 1]), 3).T.float()
    torch.manual_seed(7)
    free = em_losses(q, enc, x, beta=4.0)
    torch.manual_seed(7)  # the same z
    warm = em_losses(q, enc, x, beta=4.0, gamma=given)
    torch.testing.assert_close(warm["gamma"], given)
    assert not torch.allclose(free["gamma"], given)
    torch.manual_seed(7)
    mu, logvar = enc(x)
    z = reparameterize(mu, logvar)
    log_p = -torch.nn.functional.binary_cross_entropy_with_logits(
        decode_all_manifolds(q, z), ((x + 1) / 2).expand(3, -1, -1, -1, -1), reduction="none").flatten(2).sum(-1)
    torch.testing.assert_close(warm["nll"], -log_p[[2, 0, 2, 1], [0, 1, 2, 3]].mean(), rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match=r"gamma must be \(3, 4\) responsibilities"):
        em_losses(q, enc, x, beta=4.0, gamma=given[:, :3])
    with pytest.raises(ValueError, match="each column summing to 1"):
        em_losses(q, enc, x, beta=4.0, gamma=given * 2)


def test_kmeans_recovers_separated_clusters_and_refuses_bad_k() -> None:
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = torch.arange(3).repeat_interleave(20)
    points = centres[truth] + 0.5 * torch.randn(60, 2, generator=gen)
    labels = vae_em.kmeans(points, 3, seed=1)
    assert labels.shape == (60,) and labels.dtype == torch.int64
    for c in range(3):  # each true cluster is one label, and the three labels differ
        assert labels[truth == c].unique().numel() == 1
    assert labels.unique().numel() == 3
    torch.testing.assert_close(vae_em.kmeans(points, 3, seed=1), labels)  # deterministic given the seed
    with pytest.raises(ValueError, match=r"k must lie in \[1, 60\]"):
        vae_em.kmeans(points, 61)
