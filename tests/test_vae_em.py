"""Appendix C's EM (``qmm_plugin.paper.vae_em``): the all-decoder likelihood and the M-step terms."""

from __future__ import annotations

import torch

import qmm_plugin
from qmm_plugin.paper.models import BetaVAEEncoder, beta_vae_decoder
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
