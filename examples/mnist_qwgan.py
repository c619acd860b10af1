#!/usr/bin/env python
r"""Q-WGAN on MNIST: ten manifolds that share every weight, one digit class per manifold (paper Fig. 3).

    python examples/mnist_qwgan.py                      # our recipe, bundled 10k digits, a few CPU minutes
    python examples/mnist_qwgan.py --preset paper       # Appendix B's settings exactly
    python examples/mnist_qwgan.py --lam 0              # the same recipe without R_BA
    python examples/mnist_qwgan.py --num-biases 1 --info 0   # a plain GAN under the same recipe
    python examples/mnist_qwgan.py --resume --steps 4000     # continue a run

The lines marked ``# QMM:`` are all QMM adds to a GAN loop; ``# ours:`` marks the
manifold-recovery term, an extension of ours (a linear head on the critic's features predicts
which manifold drew a fake; its cross-entropy trains the head and G). The model is the paper's
(Appendix B: MNIST generator, z = 8, A = 10; spectrally normalised critic without BatchNorm).
``--preset paper`` is Appendix B's training (Wasserstein loss, Adam's default betas, one learning
rate, manifolds drawn at random); ``ours`` (default) uses hinge loss, β1 = 0.5, G's learning rate
5 × the critic's, balanced manifolds per batch, the recovery term and samples from a moving
average of G (``PRESETS``). Each sample grid ``samples_step{N}.png`` (rows: manifolds labelled
with their majority class; columns: shared z) comes with the manifold-class report
(``qmm_plugin.paper.manifold_classes``); ``metrics.json`` keeps it with the losses and the final
MNIST-FID; ``checkpoint.pt`` is written atomically (also on Ctrl-C) and ``--resume`` continues.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import qmm_plugin
from qmm_plugin.paper import training as C
from qmm_plugin.paper.data import load_mnist, to_model_range
from qmm_plugin.paper.manifold_classes import ManifoldClassReport, sample_manifold_class_report
from qmm_plugin.paper.metrics import load_mnist_classifier
from qmm_plugin.paper.models import MNISTCritic, MNISTGenerator
from qmm_plugin.paper.viz import save_manifold_grid

PRESETS = {
    "ours": {"loss": "hinge", "beta1": 0.5, "info": 1.0, "stratified": True, "g_lr_scale": 5.0, "ema": 0.995},
    "paper": {"loss": "wasserstein", "beta1": 0.9, "info": 0.0, "stratified": False, "g_lr_scale": 1.0, "ema": 0.0},
}
Z_DIM = 8


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    d = C.setup_runtime(args)
    if d.enabled:
        raise SystemExit("error: this example trains in one process; for torchrun use the study's trainer "
                         "(benchmarks/table1)")
    dev, out, a = d.device, Path(args.out), args.num_biases
    C.prepare_output_dir(out)
    C.seed_all(args.seed)

    g = MNISTGenerator(z_dim=Z_DIM)
    g = qmm_plugin.convert(g, num_biases=a)                                   # QMM: A bias banks
    critic = MNISTCritic(spectral_norm=True, batchnorm=False)
    recover = nn.Linear(critic.config.fc[-1], a)                              # ours: manifold-recovery head
    for m in (g, critic, recover):
        m.to(dev)
    ema = AveragedModel(g, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True) if args.ema else None
    sampler = g if ema is None else ema.module  # reports, grids and FID sample from the moving average of G
    betas = (args.beta1, 0.999)
    opt_g = torch.optim.Adam(g.parameters(), lr=args.lr * args.g_lr_scale, betas=betas)
    opt_d = torch.optim.Adam([*critic.parameters(), *recover.parameters()], lr=args.lr, betas=betas)

    images, _ = load_mnist(args.data_dir, "train")
    batches = C.ShardedBatches(to_model_range(images), args.batch_size, seed=args.seed)
    test_x, test_y = load_mnist(args.data_dir, "test")
    real_test = to_model_range(test_x).reshape(-1, 1, 28, 28)
    classifier = load_mnist_classifier().to(dev)

    def manifolds(n: int) -> Tensor:                                         # QMM: manifold of each sample
        return (torch.randperm(n) % a if args.stratified else torch.randint(0, a, (n,))).to(dev)

    def d_loss(real: Tensor, fake: Tensor) -> Tensor:
        if args.loss == "hinge":
            return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
        return fake.mean() - real.mean()

    def train_step(step: int) -> dict[str, float]:
        idx = manifolds(args.batch_size)
        z = torch.randn(args.batch_size, Z_DIM, device=dev)
        fake, r_ba = g(z, manifold=idx, return_regularizer=True)              # QMM: R_BA (Eq. 2) from the forward
        # critic: real and fake as one batch (the critic has no BatchNorm)
        real = batches.batch(step - 1, dev)
        feats = critic.features(torch.cat([real, fake.detach()]))
        scores = critic.head(feats).reshape(-1)
        loss_d = d_loss(scores[:real.shape[0]], scores[real.shape[0]:])
        if args.info > 0:                                                     # ours: recover the manifold
            loss_d = loss_d + args.info * F.cross_entropy(recover(feats[real.shape[0]:]), idx)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        # generator, on the same fakes: -D(G(z)) + λ R_BA (+ our recovery term)
        critic.requires_grad_(False)
        feats = critic.features(fake)
        loss_g = -critic.head(feats).mean() + args.lam * r_ba                 # QMM: + λ R_BA
        info = F.cross_entropy(recover(feats), idx) if args.info > 0 else torch.zeros((), device=dev)
        loss_g = loss_g + args.info * info
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        if ema is not None:
            ema.update_parameters(g)
        critic.requires_grad_(True)
        return {"loss_d": loss_d.item(), "loss_g": loss_g.item(), "r_ba": r_ba.item(), "info": info.item()}

    @torch.no_grad()
    def report(step: int) -> ManifoldClassReport:
        """Manifold-class report and labelled grid ``samples_step{step}.png``."""
        gen = torch.Generator().manual_seed(args.seed + step)
        sampler.eval()
        rep = sample_manifold_class_report(
            lambda i, n: sampler(torch.randn(n, Z_DIM, generator=gen).to(dev), manifold=i),  # QMM: manifold i
            classifier, a, args.report_samples, real_images=real_test, real_labels=test_y)
        z = torch.randn(10, Z_DIM, generator=torch.Generator().manual_seed(args.seed + 12345)).to(dev)
        grid = torch.stack([sampler(z, manifold=i).cpu() for i in range(a)])  # Fig. 3: rows = manifolds
        sampler.train()
        save_manifold_grid(grid, out / f"samples_step{step}.png", scale=2, row_labels=rep.row_labels())
        return rep

    run = C.FlatRun(args, d, {"model": "qwgan" if a > 1 else "wgan"},     # save / --resume / Ctrl-C
                    {"generator": g, "critic": critic, "recover": recover, **({"ema": ema} if ema else {})},
                    {"generator": opt_g, "critic": opt_d})
    start = run.resume()
    for step in run.steps(start, f"Q-WGAN ({args.preset})"):  # progress bar, checkpoints; Ctrl-C: save, exit
        row = {"step": step, **train_step(step)}
        run.record(row, step, report, postfix=("loss_d", "loss_g"))  # log + report; NaN/inf: exit, no save

    final: dict[str, object] = {"steps": args.steps, "preset": args.preset}
    if args.fid_samples > 0:
        gen = torch.Generator().manual_seed(args.seed + 777)
        sampler.eval()
        final["mnist_fid"] = C.mnist_fid(lambda k: sampler(torch.randn(k, Z_DIM, generator=gen).to(dev)),
                                         args.fid_samples, test_x)
        final.update(mnist_fid_samples=args.fid_samples, mnist_fid_test_images=test_x.shape[0])
        sampler.train()
    return run.finish(final, report, f"Q-WGAN ({args.preset})")  # final report, metrics.json, summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="ours", help="training recipe (default: ours)")
    p.add_argument("--num-biases", type=int, default=10, help="A, the number of manifolds (default: 10)")
    p.add_argument("--lam", type=float, default=0.05, help="λ of the λ·R_BA term, Eq. 2 (default: 0.05)")
    p.add_argument("--info", type=float, default=None, help="weight of the manifold-recovery term (preset's)")
    p.add_argument("--loss", choices=("hinge", "wasserstein"), default=None, help="GAN loss (preset's)")
    p.add_argument("--beta1", type=float, default=None, help="Adam β1 of G and D (preset's)")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate of D (default: 2e-4)")
    p.add_argument("--g-lr-scale", type=float, default=None, help="G's learning rate is --lr times this (preset's)")
    p.add_argument("--ema", type=float, default=None,
                   help="decay of the moving average of G that is sampled; 0: sample G itself (preset's)")
    p.add_argument("--report-samples", type=int, default=100, help="samples per manifold for the report")
    C.add_common_args(p, out="runs/mnist_qwgan", steps=3000, batch_size=32, sample_every=600,
                      ckpt_every=300, fid_samples=2000)
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    given = C.explicit_flags(p, argv)
    if args.smoke:  # never overrides a flag given on the command line
        given |= C.apply_smoke(args, given, {"steps": 4, "batch_size": 20, "fid_samples": 200, "ckpt_every": 2,
                                             "log_every": 1, "report_samples": 10, "sample_every": lambda a: a.steps})
    C.resume_settings(args, given, C.RESUMABLE_FLAGS | {"g_lr_scale"})  # --resume: the checkpoint's flags,
                                                                         # unless one given may change
    C.check_positive(args, "steps", "batch_size", "sample_every", "ckpt_every", "log_every", "num_biases",
                     "report_samples")
    if not (args.lr > 0 and args.g_lr_scale > 0):
        p.error(f"--lr and --g-lr-scale must be > 0, got {args.lr:g} and {args.g_lr_scale:g}")
    if not 0 <= args.ema < 1:
        p.error(f"--ema must be in [0, 1) (0: no moving average), got {args.ema:g}")
    if args.info > 0 and args.num_biases < 2:
        p.error("--info needs --num-biases >= 2 (there is no manifold index to recover); pass --info 0")
    return args


if __name__ == "__main__":
    sys.exit(main())
