#!/usr/bin/env python
r"""Q-β-VAE on MNIST with Appendix C's EM, and the β-VAE and λ = 0 baselines (Table 1).

    python examples/mnist_qbvae.py                       # Q-β-VAE, A = 10, β = 4, λ = 1
    python examples/mnist_qbvae.py --model bvae          # β-VAE (one decoder, A = 1)
    python examples/mnist_qbvae.py --model qbvae-l0      # Q-β-VAE with λ = 0
    python examples/mnist_qbvae.py --resume --steps 300  # continue a run

The lines marked ``# QMM:`` are all QMM adds to a β-VAE loop. The decoder is the Q-WGAN generator
without BatchNorm emitting Bernoulli logits, converted to A decoders that share every weight.
Each minibatch gets ``--em-repeats`` (10) EM iterations (``qmm_plugin.paper.vae_em``):

* E-step: responsibilities :math:`\gamma^{(i)} = p^{(i)}(x|z) / \sum_j p^{(j)}(x|z)` (uniform π),
  computed at the current parameters and held fixed;
* M-step: one Adam step on :math:`-\mathbb E_{q(z|x)}[\sum_i \gamma^{(i)} \log p^{(i)}(x|z)]
  + \beta\,\mathrm{KL}(q(z|x)\,\|\,p(z)) + \lambda R_{BA}` (Eq. 2), all A decoders in one forward
  of the stacked batch, R_BA from that forward. λ = 1: Sec. 5 and Appendix C write the M-step
  with ``+ R_BA``. Likelihood: Bernoulli with the grey values in [0, 1] as soft targets.

Every sample grid (``samples_step{N}.png``: one row per decoder, one shared z per column, pixel =
Bernoulli mean, each row labelled with its majority class) comes with the manifold-class report of
the bundled MNIST classifier on ``--report-samples`` samples per decoder: NMI(manifold; class),
purity, distinct majority classes, confident share, smallest class share, within-manifold
diversity (``qmm_plugin.paper.manifold_classes``). ``metrics.json`` holds the logged rows (ELBO
terms, R_BA, tangential spread, the report) and the final report and MNIST-FID; ``checkpoint.pt``
is written atomically, ``--resume`` continues exactly, Ctrl-C writes it before exiting.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import qmm_plugin
from qmm_plugin.paper import training as C
from qmm_plugin.paper.data import load_mnist, to_model_range
from qmm_plugin.paper.manifold_classes import ManifoldClassReport, sample_manifold_class_report
from qmm_plugin.paper.metrics import load_mnist_classifier
from qmm_plugin.paper.models import BetaVAEEncoder, beta_vae_decoder
from qmm_plugin.paper.vae_em import Z_DIM, decode_all_manifolds, em_losses, kmeans
from qmm_plugin.paper.viz import save_manifold_grid

#: model -> (A is --num-biases, λ is --lam): β-VAE has one decoder, the λ = 0 ablation no R_BA.
MODELS = {"qbvae": (True, True), "bvae": (False, False), "qbvae-l0": (True, False)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="qbvae", help="which VAE (default: qbvae)")
    p.add_argument("--num-biases", type=int, default=10, help="A for qbvae / qbvae-l0 (default: 10)")
    p.add_argument("--beta", type=float, default=4.0, help="β of the KL term (default: 4)")
    p.add_argument("--lam", type=float, default=1.0, help="λ of λ·R_BA for qbvae (default: 1)")
    p.add_argument("--em-repeats", type=int, default=10, help="EM iterations per minibatch (default: 10)")
    p.add_argument("--kmeans-steps", type=int, default=0,
                   help="warm start against the symmetric start: for the first N steps the E-step is replaced "
                        "by each image's k-means cluster of the training pixels (default: 0, plain EM)")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate (default: 2e-4)")
    p.add_argument("--grid-columns", type=int, default=10, help="shared z per sample grid (default: 10)")
    p.add_argument("--report-samples", type=int, default=100, help="samples per decoder for the report")
    C.add_common_args(p, out="runs/mnist_qbvae", steps=150, batch_size=32, sample_every=50, ckpt_every=50,
                      fid_samples=2000)
    args = p.parse_args(argv)
    given = C.explicit_flags(p, argv)
    if args.smoke:  # never overrides a flag given on the command line
        given |= C.apply_smoke(args, given, {"steps": 2, "batch_size": 8, "em_repeats": 2, "fid_samples": 100,
                                             "ckpt_every": 1, "log_every": 1, "report_samples": 10,
                                             "sample_every": lambda a: a.steps})
    if args.kmeans_steps < 0:
        p.error(f"--kmeans-steps must be >= 0, got {args.kmeans_steps}")
    C.check_positive(args, "steps", "batch_size", "sample_every", "ckpt_every", "log_every", "em_repeats",
                     "grid_columns", "num_biases", "report_samples")
    for flag, dest, models in (("--lam", "lam", ("qbvae",)), ("--num-biases", "num_biases", ("qbvae", "qbvae-l0")),
                                 ("--kmeans-steps", "kmeans_steps", ("qbvae", "qbvae-l0"))):
        if dest in given and args.model not in models:
            p.error(f"{flag} applies to --model {' / '.join(models)}, not {args.model}; drop it")
    C.resume_settings(args, given)  # --resume: the checkpoint's flags, unless one given can change
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    d = C.setup_runtime(args)
    if d.enabled:
        raise SystemExit("error: this example trains in one process; run it without torchrun")
    dev, out = d.device, Path(args.out)
    many, with_r_ba = MODELS[args.model]
    a, lam = (args.num_biases if many else 1), (args.lam if with_r_ba else 0.0)
    C.prepare_output_dir(out)
    C.seed_all(args.seed)

    q = qmm_plugin.convert(beta_vae_decoder(Z_DIM), num_biases=a).to(dev)  # QMM: A decoders, shared weights
    encoder = BetaVAEEncoder(Z_DIM).to(dev)
    opt = torch.optim.Adam([*encoder.parameters(), *q.parameters()], lr=args.lr)

    images, _ = load_mnist(args.data_dir, "train")
    batches = C.ShardedBatches(to_model_range(images), args.batch_size, seed=args.seed)
    test_x, test_y = load_mnist(args.data_dir, "test")
    real_test = to_model_range(test_x).reshape(-1, 1, 28, 28)
    classifier = load_mnist_classifier().to(dev)
    clusters = kmeans(batches.data, a, seed=args.seed) if args.kmeans_steps > 0 else None  # ours: warm start

    def warm_gamma(step: int) -> Tensor | None:
        """One-hot k-means clusters of the batch (A, B) during the warm start, else None (E-step)."""
        if clusters is None or step > args.kmeans_steps:
            return None
        return F.one_hot(clusters[batches.indices(step - 1)], a).T.float().to(dev)

    def train_step(step: int) -> dict[str, float]:
        x, gamma = batches.batch(step - 1, dev), warm_gamma(step)
        for _ in range(args.em_repeats):
            terms = em_losses(q, encoder, x, args.beta, lam, gamma)          # QMM: E-step, M-step + λ R_BA
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
        row = {"loss": terms["loss"].item(), "nll": terms["nll"].item(), "kl": terms["kl"].item(),
               "log_px_best": terms["log_px_best"].item(),
               "gamma_max_mean": terms["gamma"].max(0).values.mean().item()}
        if "r_ba" in terms:
            row["r_ba"] = terms["r_ba"].item()
        return row

    @torch.no_grad()
    def decode(z: Tensor, manifold: Tensor | int) -> Tensor:
        """Bernoulli means in [-1, 1] (the classifier's and MNIST-FID's range)."""
        return torch.sigmoid(q(z, manifold=manifold)) * 2 - 1

    @torch.no_grad()
    def report(step: int) -> ManifoldClassReport:
        """Manifold-class report and labelled grid ``samples_step{step}.png``."""
        gen = torch.Generator().manual_seed(args.seed + step)
        q.eval()
        rep = sample_manifold_class_report(
            lambda i, n: decode(torch.randn(n, Z_DIM, generator=gen).to(dev), i),  # QMM: sample decoder i
            classifier, a, args.report_samples, real_images=real_test, real_labels=test_y)
        z = torch.randn(args.grid_columns, Z_DIM, generator=torch.Generator().manual_seed(args.seed + 12345))
        grid = torch.sigmoid(decode_all_manifolds(q, z.to(dev))).cpu()       # rows = decoders
        q.train()
        save_manifold_grid(grid, out / f"samples_step{step}.png", value_range=(0.0, 1.0), scale=2,
                           row_labels=rep.row_labels())
        return rep

    run = C.FlatRun(args, d, {"model": args.model, "num_biases": a, "lam": lam, "beta": args.beta},
                    {"decoder": q, "encoder": encoder}, {"adam": opt})           # save / --resume / Ctrl-C
    start = run.resume()
    for step in run.steps(start, args.model):  # progress bar, checkpoints; Ctrl-C: save, exit
        row = {"step": step, **train_step(step)}
        if a > 1 and C.every(step, args.sample_every, args.steps):
            row.update({f"tangential_spread/{p}": v for p, v in q.tangential_spread().items()})
        run.record(row, step, report, postfix=("loss", "gamma_max_mean"))  # log + report; NaN/inf: exit, no save

    final: dict[str, object] = {"steps": args.steps, "model": args.model}
    if a > 1:
        final.update({f"tangential_spread/{p}": v for p, v in q.tangential_spread().items()})
    if args.fid_samples > 0:
        gen = torch.Generator().manual_seed(args.seed + 777)
        q.eval()
        final["mnist_fid"] = C.mnist_fid(
            lambda k: decode(torch.randn(k, Z_DIM, generator=gen).to(dev),
                             torch.randint(0, a, (k,), generator=gen).to(dev)), args.fid_samples, test_x)
        final["mnist_fid_samples"] = args.fid_samples
        q.train()
    return run.finish(final, report, args.model)  # final report, metrics.json, summary


if __name__ == "__main__":
    sys.exit(main())
