#!/usr/bin/env python
r"""Q-β-VAE on MNIST with Appendix C's EM, and the β-VAE and λ = 0 baselines (Table 1).

Run::

    python examples/mnist_qbvae.py                       # Q-β-VAE, A = 10, β = 4, λ = 1
    python examples/mnist_qbvae.py --model bvae          # β-VAE (one decoder, A = 1)
    python examples/mnist_qbvae.py --model qbvae-l0      # Q-β-VAE with λ = 0

The decoder is the Q-WGAN generator without BatchNorm emitting Bernoulli logits
(``qmm_plugin.paper.models.beta_vae_decoder``), converted with ``qmm_plugin.convert(dec, num_biases=A)``:
A decoders sharing every weight. Each minibatch gets ``--em-repeats`` (10) EM iterations:

* E-step: responsibilities :math:`\gamma^{(i)} = p^{(i)}(x|z) / \sum_j p^{(j)}(x|z)` (uniform π),
  computed at the current parameters and held fixed (detached);
* M-step: one Adam step on :math:`-\mathbb E_{q(z|x)}[\sum_i \gamma^{(i)} \log p^{(i)}(x|z)]
  + \beta\,\mathrm{KL}(q(z|x)\,\|\,p(z)) + \lambda R_{BA}` (Eq. 2).

Both steps use one evaluation of :math:`\log p^{(i)}(x|z)` for all A decoders
(:func:`decode_all_manifolds`): one call of the converted decoder on the stacked ``(A·B)`` batch,
block ``i`` on manifold ``i``, which also returns R_BA from the same forward
(``q(..., return_regularizer=True)``). λ = 1: Sec. 5 and Appendix C write the M-step
objective with ``+ R_BA`` (Appendix C puts the weight λ inside R_BA without a value). Likelihood: Bernoulli with the grey values in [0, 1] as soft targets.

Outputs in ``--out`` as for ``mnist_qwgan.py``: ``samples_step{N}.png`` (rows = decoders, columns
= shared z; pixel = Bernoulli mean), ``metrics.csv/json`` (ELBO terms, R_BA, final MNIST-FID),
``checkpoint.pt`` (``--resume``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import qmm_plugin
from qmm_plugin import QuotientModel
from qmm_plugin.paper import training as C
from qmm_plugin.paper.data import load_mnist, to_model_range
from qmm_plugin.paper.models import BetaVAEEncoder, beta_vae_decoder
from qmm_plugin.paper.vae_em import Z_DIM, decode_all_manifolds, em_losses
from qmm_plugin.paper.viz import save_manifold_grid

MODELS = ("qbvae", "bvae", "qbvae-l0")


@torch.no_grad()
def sample_grid(q: QuotientModel, columns: int, device: torch.device, seed: int) -> Tensor:
    """``(A, columns, 1, 28, 28)`` Bernoulli means in [0, 1]: row = decoder, column = shared z."""
    z = torch.randn(columns, Z_DIM, generator=torch.Generator().manual_seed(seed)).to(device)
    return torch.sigmoid(decode_all_manifolds(q, z)).cpu()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="qbvae", help="which VAE (default: qbvae)")
    p.add_argument("--num-biases", type=int, default=10, help="A for qbvae / qbvae-l0 (default: 10)")
    p.add_argument("--beta", type=float, default=4.0, help="β of the KL term (default: 4)")
    p.add_argument("--lam", type=float, default=None, help="λ of λ·R_BA for qbvae (default: 1)")
    p.add_argument("--em-repeats", type=int, default=10, help="EM iterations per minibatch (default: 10)")
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate (default: 2e-4)")
    p.add_argument("--grid-columns", type=int, default=10, help="shared z per sample grid (default: 10)")
    C.add_common_args(p, out="runs/mnist_qbvae", steps=150, batch_size=32, sample_every=50, ckpt_every=50,
                      fid_samples=2000)
    args = p.parse_args(argv)
    given = C.explicit_flags(p, argv)
    if args.smoke:  # never overrides a flag given on the command line
        given |= C.apply_smoke(args, given, {"steps": 2, "batch_size": 8, "em_repeats": 2, "fid_samples": 100,
                                             "ckpt_every": 1, "log_every": 1, "sample_every": lambda a: a.steps})
    C.check_positive(args, "steps", "batch_size", "sample_every", "ckpt_every", "log_every", "em_repeats",
                     "grid_columns", "num_biases")
    C.resume_settings(args, given)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    d = C.setup_runtime(args)
    out = Path(args.out)
    C.seed_all(args.seed)
    a = 1 if args.model == "bvae" else args.num_biases
    lam = 0.0 if args.model != "qbvae" else (1.0 if args.lam is None else args.lam)
    q = qmm_plugin.convert(beta_vae_decoder(Z_DIM), num_biases=a).to(d.device)
    encoder = BetaVAEEncoder(Z_DIM).to(d.device)
    opt = torch.optim.Adam([*encoder.parameters(), *q.parameters()], lr=args.lr)
    images, _ = load_mnist(args.data_dir, "train")
    batches = C.ShardedBatches(to_model_range(images), args.batch_size, seed=args.seed, rank=d.rank,
                               world_size=d.world_size)
    settings = {"model": args.model, "num_biases": a, "lam": lam, "beta": args.beta,
                "world_size": d.world_size, "batch_size": args.batch_size, "seed": args.seed}
    run = C.TrainRun(args, d, settings, {"decoder": q, "encoder": encoder}, {"adam": opt})
    # Under torchrun the gradients of encoder and decoder are averaged by hand after backward (one
    # all-reduce per M-step) instead of through two DDP wrappers.
    params = [p for p in [*encoder.parameters(), *q.parameters()] if p.requires_grad]

    def train_step(step: int) -> dict[str, float]:
        x = batches.batch(step - 1, d.device)
        for _ in range(args.em_repeats):
            terms = em_losses(q, encoder, x, args.beta, lam)
            loss = terms["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if d.enabled:
                C.average_gradients(params, d)
            opt.step()
        row = {"loss": loss.item(), "nll": terms["nll"].item(), "kl": terms["kl"].item(),
               "log_px_best": terms["log_px_best"].item(),
               "gamma_max_mean": terms["gamma"].max(0).values.mean().item()}
        if "r_ba" in terms:
            row["r_ba"] = terms["r_ba"].item()
        return row

    def on_sample(step: int) -> dict[str, float]:
        save_manifold_grid(sample_grid(q, args.grid_columns, d.device, args.seed + 12345),
                           out / f"samples_step{step}.png", value_range=(0.0, 1.0), scale=2)
        if a < 2:
            return {}
        return {f"tangential_spread/{p}": v for p, v in q.tangential_spread().items()}

    code = run.run(train_step, on_sample, args.model)
    if code == 0 and d.is_main and args.fid_samples > 0:
        gen = torch.Generator().manual_seed(args.seed + 777)

        @torch.no_grad()
        def sample(k: int) -> Tensor:
            z = torch.randn(k, Z_DIM, generator=gen).to(d.device)
            i = torch.randint(0, a, (k,), generator=gen).to(d.device)
            return torch.sigmoid(q(z, manifold=i)) * 2 - 1  # Bernoulli mean, in [-1, 1]

        test, _ = load_mnist(args.data_dir, "test")
        fid = C.mnist_fid(sample, args.fid_samples, test)
        final: dict[str, Any] = {"mnist_fid": fid, "mnist_fid_samples": args.fid_samples,
                                 "steps": args.steps, "model": args.model}
        final.update({k: v for k, v in run.log.rows[-1].items() if k.startswith("tangential_spread/")})
        run.finish(final)
        print(f"{args.model}: step {args.steps}, MNIST-FID {fid:.2f} ({args.fid_samples} samples vs "
              f"{test.shape[0]} test digits); outputs in {out}/")
    C.cleanup_distributed()
    return code


if __name__ == "__main__":
    sys.exit(main())
