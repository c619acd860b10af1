#!/usr/bin/env python
r"""Generalisation beyond the training manifolds (paper Fig. 5-6): encode images that lie on no
trained manifold with Eq. 3 (``q.invert``) and sample the manifolds they derive.

Three kinds of off-manifold input for an MNIST-trained Q-WGAN:

* ``noise``:   test digits with a rectangle of uniform noise pasted in;
* ``colour``:  test digits coloured with a random RGB colour. The model is grey, so each colour
  channel is encoded as its own grey image (three inversions per digit); fresh samples decode the
  **same** z with each channel's derived biases and stack the three channels back into RGB;
* ``letters``: font-rendered letters (``qmm_plugin.paper.data.render_letters``; not EMNIST).

For each kind one PNG, ``generalize_{kind}.png``: one row per input image, columns = input |
reconstruction | ``--samples`` fresh samples on the image's derived manifold (biases fixed to the
recovered :math:`a_l^*`, new :math:`z \sim N(0, I)`; the same z in every row, as in Fig. 3).
``generalize.json`` holds the per-kind mean squared reconstruction error.

Run (after ``python examples/mnist_qwgan.py``)::

    python examples/generalize.py --checkpoint runs/mnist_qwgan/checkpoint.pt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import Tensor

import qmm_plugin
from qmm_plugin.io import atomic_write_text
from qmm_plugin.paper import training as C
from qmm_plugin.paper.data import load_mnist, render_letters, to_model_range
from qmm_plugin.paper.models import MNISTGenerator
from qmm_plugin.paper.viz import save_grid

KINDS = ("noise", "colour", "letters")
Z_DIM = 8


def load_generator(path: Path | None, device: torch.device) -> qmm_plugin.QuotientModel:
    """The Q-WGAN generator of an ``examples/mnist_qwgan.py`` checkpoint (``None``: a randomly
    initialised one with A = 10, for ``--smoke``)."""
    if path is None:
        return qmm_plugin.convert(MNISTGenerator(z_dim=Z_DIM), num_biases=10).to(device).eval()
    if not path.is_file():
        raise SystemExit(f"error: checkpoint {path} not found; train one with `python examples/mnist_qwgan.py` "
                         "(it writes runs/mnist_qwgan/checkpoint.pt) or pass --checkpoint")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = ckpt.get("settings", {}).get("model")
    if model not in ("qwgan", "qwgan-l0", "wgan"):
        raise SystemExit(f"error: {path} holds a '{model}' model; generalize.py needs a converted generator "
                         "from examples/mnist_qwgan.py or benchmarks/table1/train_gan.py --model qwgan|qwgan-l0|wgan")
    state = C.sampled_generator_state(ckpt)  # the moving average of G when the run kept one (--ema)
    a = state["model.fc.0.bias_bank"].shape[0]
    q = qmm_plugin.convert(MNISTGenerator(z_dim=Z_DIM), num_biases=a)
    q.load_state_dict(state)
    return q.to(device).eval()


def make_inputs(kind: str, n: int, data_dir: str | None, seed: int) -> Tensor:
    """``n`` off-manifold images in [-1, 1]: ``(n, 1, 28, 28)``, or ``(n, 3, 28, 28)`` for colour."""
    g = torch.Generator().manual_seed(seed)
    if kind == "letters":
        return to_model_range(render_letters(n, seed=seed)[0])
    digits = to_model_range(load_mnist(data_dir, "test")[0][:n])
    if kind == "noise":
        out = digits.clone()
        for img in out:
            h, w = (int(v) for v in torch.randint(8, 15, (2,), generator=g))
            top, left = (int(v) for v in torch.randint(0, 28 - 14, (2,), generator=g))
            img[:, top:top + h, left:left + w] = torch.rand(1, h, w, generator=g) * 2 - 1
        return out
    if kind == "colour":
        colour = 0.3 + 0.7 * torch.rand(n, 3, 1, 1, generator=g)  # a random, not too dark RGB colour
        return ((digits + 1) / 2 * colour) * 2 - 1
    raise ValueError(f"unknown kind {kind!r}; choose from {KINDS}")


@torch.no_grad()
def derived_samples(q: qmm_plugin.QuotientModel, biases: dict[str, Tensor], z: Tensor) -> Tensor:
    """``(B, n, 1, 28, 28)``: the n codes ``z`` decoded on each of the B derived manifolds."""
    b, n = next(iter(biases.values())).shape[0], z.shape[0]
    out = q(z.repeat(b, 1), biases={p: v.repeat_interleave(n, 0) for p, v in biases.items()})
    return out.view(b, n, *out.shape[1:])


def generalize(q: qmm_plugin.QuotientModel, x: Tensor, z: Tensor, inv_steps: int, seed: int
               ) -> tuple[Tensor, Tensor]:
    """Encode ``x`` (grey or RGB) and sample its derived manifolds with codes ``z``.

    Returns ``(reconstruction like x, samples (B, n, C, 28, 28))``. RGB images are encoded
    channel by channel (each channel a grey image) and decoded with the same z per channel.
    """
    b, c = x.shape[:2]
    grey = x.reshape(b * c, 1, *x.shape[2:])
    inv = q.invert(grey, steps=inv_steps, seed=seed, progress=True)
    samples = derived_samples(q, inv.biases, z)  # (b*c, n, 1, H, W)
    recon = inv.reconstruction.reshape(b, c, *x.shape[2:])
    return recon, samples.reshape(b, c, z.shape[0], *x.shape[2:]).transpose(1, 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/mnist_qwgan/checkpoint.pt",
                   help="checkpoint of examples/mnist_qwgan.py (default: runs/mnist_qwgan/checkpoint.pt)")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="which inputs (default: all)")
    p.add_argument("--images", type=int, default=6, help="input images per kind (default: 6)")
    p.add_argument("--samples", type=int, default=8, help="fresh samples per derived manifold (default: 8)")
    p.add_argument("--inv-steps", type=int, default=2000, help="cap on Eq. 3 Adam steps (default: 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--data-dir", default=None, help="MNIST folder (default: the embedded subset)")
    p.add_argument("--out", default="runs/generalize", help="output folder (default: runs/generalize)")
    p.add_argument("--smoke", action="store_true",
                   help="no checkpoint: a randomly initialised generator, 2 images, 5 inversion steps")
    args = p.parse_args(argv)
    if args.smoke:  # never overrides a flag given on the command line
        C.apply_smoke(args, C.explicit_flags(p, argv), {"images": 2, "samples": 3, "inv_steps": 5})
    C.check_positive(args, "images", "samples", "inv_steps")
    device = C.setup_distributed(args.device).device
    torch.manual_seed(args.seed)
    q = load_generator(None if args.smoke else Path(args.checkpoint), device)
    out = Path(args.out)
    z = torch.randn(args.samples, Z_DIM, generator=torch.Generator().manual_seed(args.seed + 1)).to(device)
    report: dict[str, dict[str, float]] = {}
    for kind in args.kinds:
        x = make_inputs(kind, args.images, args.data_dir, args.seed).to(device)
        recon, samples = generalize(q, x, z, args.inv_steps, args.seed)
        rows = torch.cat([x.unsqueeze(1), recon.unsqueeze(1), samples], dim=1)  # (B, 2 + n, C, H, W)
        path = save_grid(rows.reshape(-1, *rows.shape[2:]).cpu(), out / f"generalize_{kind}.png",
                         nrow=rows.shape[1], scale=2)
        report[kind] = {"reconstruction_mse": float((recon - x).pow(2).mean()), "images": args.images}
        print(f"{kind}: reconstruction MSE {report[kind]['reconstruction_mse']:.4f}; grid {path}")
    atomic_write_text(json.dumps(report, indent=1) + "\n", out / "generalize.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
