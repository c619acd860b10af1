#!/usr/bin/env python
"""Turn your own GAN into a Q-GAN: the whole change is the three lines marked ``# QMM:``.

Below is a typical user's DCGAN-style generator, discriminator and training loop (non-saturating
BCE loss, spectrally normalised discriminator), written without qmm_plugin in mind. QMM needs:

1. ``G = qmm_plugin.convert(G, num_biases=10)`` — every ``nn.Linear`` of G gets a bank of 10
   biases: ten generators (manifolds) sharing every weight; ``G(z)`` draws a manifold per sample;
2. ``loss_g = loss_g + 0.05 * G.ba_regularizer()`` — the bias-aligning regularizer (Eq. 2), so
   that one encoder inverts all ten;
3. ``G(z, manifold=i)`` to look at one manifold (here: the sample grid).

The optimiser is built after the conversion (it then sees the bias banks). ``--no-qmm`` runs
the original, unmodified GAN for comparison. Run::

    python examples/wrap_your_gan.py               # Q-GAN, writes runs/wrap_your_gan/samples.png
    python examples/wrap_your_gan.py --no-qmm      # the user's plain GAN
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm
from tqdm.auto import tqdm

import qmm_plugin  # QMM: (the import)
from qmm_plugin.paper.data import load_mnist, to_model_range
from qmm_plugin.paper.training import apply_smoke, explicit_flags
from qmm_plugin.paper.viz import save_grid, save_manifold_grid


class Generator(nn.Module):
    """A DCGAN-style generator: z → FC → (128, 7, 7) → two transposed convolutions → 28x28."""

    def __init__(self, z_dim: int = 16) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.project = nn.Sequential(nn.Linear(z_dim, 128 * 7 * 7), nn.BatchNorm1d(128 * 7 * 7), nn.ReLU())
        self.net = nn.Sequential(
            nn.ConvTranspose2d(128, 64, 4, 2, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            nn.ConvTranspose2d(64, 1, 4, 2, 1), nn.Tanh())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.project(z).view(-1, 128, 7, 7))


class Discriminator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            spectral_norm(nn.Conv2d(1, 64, 4, 2, 1)), nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(64, 128, 4, 2, 1)), nn.LeakyReLU(0.2),
            nn.Flatten(), spectral_norm(nn.Linear(128 * 7 * 7, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="A user's DCGAN, turned into a Q-GAN with three lines.")
    p.add_argument("--no-qmm", action="store_true", help="train the original GAN (no QMM lines)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default="runs/wrap_your_gan")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="3 steps with a batch of 8 (for tests)")
    args = p.parse_args(argv)
    if args.smoke:  # never overrides a flag given on the command line
        apply_smoke(args, explicit_flags(p, argv), {"steps": 3, "batch_size": 8})
    use_qmm = not args.no_qmm
    torch.manual_seed(args.seed)
    data = to_model_range(load_mnist()[0])  # the embedded 10k-digit MNIST subset, in [-1, 1]

    G, D = Generator(), Discriminator()
    if use_qmm:
        G = qmm_plugin.convert(G, num_biases=10)  # QMM: ten manifolds sharing every weight
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))

    for step in tqdm(range(args.steps), desc="train"):
        real = data[torch.randint(0, data.shape[0], (args.batch_size,))]
        z = torch.randn(args.batch_size, G.z_dim)
        fake = G(z)  # a QuotientModel draws one manifold per sample here
        ones, zeros = torch.ones(args.batch_size, 1), torch.zeros(args.batch_size, 1)
        loss_d = (F.binary_cross_entropy_with_logits(D(real), ones)
                  + F.binary_cross_entropy_with_logits(D(fake.detach()), zeros))
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()

        loss_g = F.binary_cross_entropy_with_logits(D(fake), ones)
        if use_qmm:
            loss_g = loss_g + 0.05 * G.ba_regularizer()  # QMM: bias-aligning regularizer (Eq. 2)
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()

    G.eval()
    out = Path(args.out)
    with torch.no_grad():
        z = torch.randn(10, G.z_dim)
        if use_qmm:  # QMM: one row per manifold, the same ten z in every row
            path = save_manifold_grid(torch.stack([G(z, manifold=i) for i in range(10)]), out / "samples.png", scale=2)
        else:
            path = save_grid(G(z), out / "samples.png", nrow=10, scale=2)
    print(f"loss_d {loss_d.item():.3f}  loss_g {loss_g.item():.3f}  samples: {path}")


if __name__ == "__main__":
    main()
