#!/usr/bin/env python
r"""The Table 1 study's GAN trainer: Q-WGAN and the GAN baselines with Appendix B's settings.

``benchmarks/reproduce_table1.py`` runs it once per (model, seed); the main example,
``examples/mnist_qwgan.py``, is the short Q-WGAN-only script with the recipe that separates the
manifolds. Run it directly as::

    python benchmarks/table1/train_gan.py --model qwgan
    python benchmarks/table1/train_gan.py --data-dir ../shared/datasets/mnist --steps 20000   # full MNIST
    python benchmarks/table1/train_gan.py --model wgan --out runs/table1_wgan                 # a baseline
    python benchmarks/table1/train_gan.py --resume                                            # continue
    torchrun --nproc_per_node=2 benchmarks/table1/train_gan.py                                # DDP

``--model``:

=========  ============================================================================
qwgan      Q-WGAN: MNIST generator converted with ``qmm_plugin.convert(g, num_biases=10)``,
           generator loss ``-E[D(G(z))] + λ R_BA`` (Eq. 2), λ = 0.05 (default)
wgan       WGAN: the same generator with one bias (A = 1; R_BA is then a constant)
qwgan-l0   Q-WGAN with λ = 0 (ten biases, no bias-aligning regularizer)
dmwgan     DMWGAN-style: ten separate generators with widths / 4 (uniform π)
madgan     MADGAN-like: ten generators sharing the FC stack and the first ConvT layer
infogan    InfoGAN: 1 categorical(10) + 2 continuous codes + 8 noise; mutual-information
           loss (categorical cross-entropy + Gaussian log-likelihood of the codes) on G and D
=========  ============================================================================

All use the Wasserstein loss with a spectrally normalised critic (L_D = E[D(fake)] − E[D(real)]), Adam(lr 2e-4, default betas), ``--n-critic`` critic steps per generator step.
The critic has no BatchNorm by default, unlike Appendix B's table (``--critic-bn`` restores it):
real and fake batches go through the critic separately, so per-batch BatchNorm normalises away
exactly the batch statistics that tell them apart (overall brightness, for one). (InfoGAN's
discriminator, ``qmm_plugin.paper.models.InfoGANDiscriminator``, keeps its BatchNorm.)

Writes into ``--out`` (only rank 0 writes): ``samples_step{N}.png`` (one row per manifold —
generator, category — and one column per shared latent, like the paper's Fig. 3),
``metrics.csv`` / ``metrics.json`` (losses, R_BA, per-layer tangential spread, final MNIST-FID
against the test split, and the FID of real training digits for reference) and
``checkpoint.pt`` (atomic; ``--resume`` restores models, optimisers, step and RNG states, so a
resumed run continues exactly; Ctrl-C writes one before exiting).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qmm_plugin.paper import training as C
from qmm_plugin.paper.data import load_mnist, to_model_range
from qmm_plugin.paper.gan_families import (
    MODELS,
    NUM_MANIFOLDS,
    InfoFamily,
    eval_sampler,
    family_report,
    make_family,
    manifold_grid,
    spread_metrics,
)
from qmm_plugin.paper.manifold_classes import ManifoldClassReport
from qmm_plugin.paper.metrics import load_mnist_classifier
from qmm_plugin.paper.viz import save_manifold_grid


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="qwgan", help="which GAN (default: qwgan)")
    p.add_argument("--lam", type=float, default=None, help="λ of λ·R_BA for --model qwgan (default: 0.05)")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate, G and D (default: 2e-4)")
    p.add_argument("--beta1", type=float, default=0.9,
                   help="Adam beta1, G and D (default: 0.9, the paper's 'default Adam settings')")
    p.add_argument("--n-critic", type=int, default=1, help="critic steps per generator step (default: 1)")
    p.add_argument("--critic-bn", action="store_true",
                   help="BatchNorm in the critic as listed in Appendix B (default: off; see the module docstring)")
    p.add_argument("--grid-columns", type=int, default=10, help="shared latents per sample grid (default: 10)")
    C.add_common_args(p, out="runs/table1_gan", steps=400, batch_size=32, sample_every=100,
                      ckpt_every=100, fid_samples=2000)
    args = p.parse_args(argv)
    given = C.explicit_flags(p, argv)
    if args.smoke:  # never overrides a flag given on the command line
        given |= C.apply_smoke(args, given, {"steps": 4, "batch_size": 20, "fid_samples": 200, "ckpt_every": 2,
                                             "log_every": 1, "sample_every": lambda a: a.steps})
    C.check_positive(args, "steps", "batch_size", "sample_every", "ckpt_every", "log_every", "n_critic",
                     "grid_columns")
    C.resume_settings(args, given)
    if args.model in ("dmwgan", "madgan") and args.batch_size < 2 * NUM_MANIFOLDS:
        p.error(f"--model {args.model} needs --batch-size >= {2 * NUM_MANIFOLDS} (every one of the "
                f"{NUM_MANIFOLDS} generators needs >= 2 samples per batch for BatchNorm)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    d = C.setup_runtime(args)
    out = Path(args.out)
    C.seed_all(args.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    fam = make_family(args.model, args.lam, args.critic_bn)
    fam.generator.to(d.device)
    fam.critic.to(d.device)
    opt_g = torch.optim.Adam(fam.generator.parameters(), lr=args.lr, betas=(args.beta1, 0.999))
    opt_d = torch.optim.Adam(fam.critic.parameters(), lr=args.lr, betas=(args.beta1, 0.999))
    images, _ = load_mnist(args.data_dir, "train")
    batches = C.ShardedBatches(to_model_range(images), args.batch_size, seed=args.seed, rank=d.rank,
                               world_size=d.world_size)
    settings = {"model": args.model, "world_size": d.world_size, "batch_size": args.batch_size,
                "lam": fam.lam, "seed": args.seed, "n_critic": args.n_critic, "critic_bn": args.critic_bn}
    run = C.TrainRun(args, d, settings, {"generator": fam.generator, "critic": fam.critic},
                     {"generator": opt_g, "critic": opt_d})

    g_train, d_train = fam.generator, fam.critic
    if d.enabled:
        ddp_kw: dict[str, Any] = {"device_ids": [d.device.index]} if d.device.type == "cuda" else {}
        g_train = nn.parallel.DistributedDataParallel(fam.generator, **ddp_kw)
        d_train = nn.parallel.DistributedDataParallel(fam.critic, **ddp_kw)

    def train_step(step: int) -> dict[str, float]:
        # critic: L_D = E[D(G(z))] - E[D(x)]  (+ InfoGAN's Q loss on the fakes)
        for k in range(args.n_critic):
            real = batches.batch((step - 1) * args.n_critic + k, d.device)
            gargs, gkw = fam.latents(real.shape[0], d.device)
            with torch.no_grad():
                fake = g_train(*gargs, **gkw)
            d_real, _ = fam.score(d_train, real)
            d_fake, extra = fam.score(d_train, fake)
            loss_d = d_fake.mean() - d_real.mean()
            info_d = fam.info_loss(extra, gargs)
            if info_d is not None:
                loss_d = loss_d + InfoFamily.info_weight * info_d
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
        row = {"loss_d": loss_d.item(), "wasserstein": (d_real.mean() - d_fake.mean()).item()}
        # generator: L_G = -E[D(G(z))] + λ R_BA  (Eq. 2)
        fam.critic.requires_grad_(False)
        gargs, gkw = fam.latents(args.batch_size, d.device)
        fake, r_ba = fam.generate(g_train, gargs, gkw)
        d_gen, extra = fam.score(fam.critic, fake)
        loss_g = -d_gen.mean()
        if r_ba is not None:
            loss_g = loss_g + fam.lam * r_ba
            row["r_ba"] = r_ba.item()
        info_g = fam.info_loss(extra, gargs)
        if info_g is not None:
            loss_g = loss_g + InfoFamily.info_weight * info_g
            row["info_loss"] = info_g.item()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        fam.critic.requires_grad_(True)
        row["loss_g"] = loss_g.item()
        return row

    test_x, test_y = load_mnist(args.data_dir, "test")
    real_test = to_model_range(test_x).reshape(-1, 1, 28, 28)
    classifier = load_mnist_classifier().to(d.device)
    reports: list[ManifoldClassReport] = []

    def on_sample(step: int) -> dict[str, Any]:
        """Labelled grid and manifold-class report (rows: manifolds, generators or categories)."""
        reports.append(family_report(fam, classifier, 10 if args.smoke else 100, d.device, args.seed + step,
                                     real_test, test_y))
        grid = manifold_grid(fam, args.grid_columns, d.device, seed=args.seed + 12345)
        save_manifold_grid(grid, out / f"samples_step{step}.png", scale=2, row_labels=reports[-1].row_labels())
        return {**spread_metrics(fam), **reports[-1].scalars()}

    code = run.run(train_step, on_sample, args.model)
    if code == 0 and d.is_main:  # final entry also with --fid-samples 0 (report and steps, no FID)
        final: dict[str, Any] = {"report": reports[-1].summary() if reports else None, "steps": args.steps,
                                 "model": args.model,
                                 **{k: v for k, v in run.log.rows[-1].items() if k.startswith("tangential_spread/")}}
        if args.fid_samples > 0:
            test = test_x
            fam.generator.eval()
            fid = C.mnist_fid(eval_sampler(fam, d.device, args.seed + 777), args.fid_samples, test)
            fam.generator.train()
            pick = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(1))
            train_ref = images[pick[:min(args.fid_samples, images.shape[0])]]
            fid_ref = C.mnist_fid(train_ref, train_ref.shape[0], test)
            final.update({"mnist_fid": fid, "mnist_fid_samples": args.fid_samples,
                          "mnist_fid_test_images": test.shape[0], "mnist_fid_real_train_vs_test": fid_ref})
            print(f"{args.model}: step {args.steps}, MNIST-FID {fid:.2f} ({args.fid_samples} samples vs "
                  f"{test.shape[0]} test digits; {train_ref.shape[0]} real training digits score {fid_ref:.2f}); "
                  f"outputs in {out}/")
        else:
            print(f"{args.model}: step {args.steps} (no MNIST-FID: --fid-samples 0); outputs in {out}/")
        run.finish(final)
    C.cleanup_distributed()
    return code


if __name__ == "__main__":
    sys.exit(main())
