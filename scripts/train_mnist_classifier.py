"""Train the MNIST-FID feature classifier and write ``qmm_plugin/paper/_assets/mnist_classifier.pt``.

Usage (from the repository root)::

    python scripts/train_mnist_classifier.py [--data-dir ../shared/datasets/mnist] [--epochs 3]

Trains :class:`qmm_plugin.paper.metrics.MNISTClassifier` on the full MNIST training set (60,000
images, inputs scaled to [-1, 1]) with Adam (lr 2e-3, cosine decay, batch 128, small random
translations of ±2 px), 2 CPU threads, then prints the test accuracy on t10k and saves the
state_dict atomically (torch.save to a temporary file + os.replace).

``scripts/eval_mnist_classifier.py`` measures the shipped weights' test accuracy and writes it to
``docs/results/mnist_classifier.json``.
"""

from __future__ import annotations

import argparse
import gzip
import os
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qmm_plugin.paper.metrics import MNISTClassifier  # noqa: E402


def _read_idx(path: Path) -> np.ndarray:
    """Minimal idx(.gz) reader (uint8 payloads only)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not a uint8 idx file")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(data_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N,28,28), labels int64 (N,)) for split 'train' or 'test'.

    Uses ``qmm_plugin.paper.data.load_mnist`` when available, else the private reader above."""
    try:
        from qmm_plugin.paper.data import load_mnist
    except ImportError:
        load_mnist = None
    if load_mnist is not None:
        return load_mnist(data_dir, "train" if split == "train" else "test")
    prefix = "train" if split == "train" else "t10k"
    imgs = _read_idx(data_dir / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(data_dir / f"{prefix}-labels-idx1-ubyte.gz")
    return torch.from_numpy(imgs.copy()), torch.from_numpy(labels.astype(np.int64))


def to_input(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float().unsqueeze(1) / 127.5 - 1.0


def random_shift(x: torch.Tensor, max_px: int = 2) -> torch.Tensor:
    """Random integer translation per image (background -1)."""
    b = x.shape[0]
    padded = F.pad(x, (max_px,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_px + 1, (b,))
    dy = torch.randint(0, 2 * max_px + 1, (b,))
    rows = (dy[:, None] + torch.arange(28)[None]).view(b, 1, 28, 1).expand(b, 1, 28, 28 + 2 * max_px)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(28)[None]).view(b, 1, 1, 28).expand(b, 1, 28, 28)
    return out.gather(3, cols)


@torch.no_grad()
def accuracy(model: MNISTClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(
        int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(1000), y.split(1000))
    )
    return correct / len(y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=REPO / ".." / "shared" / "datasets" / "mnist")
    ap.add_argument("--out", type=Path, default=REPO / "qmm_plugin" / "paper" / "_assets" / "mnist_classifier.pt")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    xtr_u8, ytr = load_split(args.data_dir, "train")
    xte_u8, yte = load_split(args.data_dir, "test")
    xtr, xte = to_input(xtr_u8), to_input(xte_u8)

    model = MNISTClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps = args.epochs * ((len(ytr) + args.batch_size - 1) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.15)
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(ytr))
        for i, idx in enumerate(perm.split(args.batch_size)):
            loss = F.cross_entropy(model(random_shift(xtr[idx])), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if i % 100 == 0:
                print(f"epoch {epoch} step {i} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
        print(f"epoch {epoch}: test accuracy {accuracy(model, xte, yte):.4f}", flush=True)

    acc = accuracy(model, xte, yte)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, args.out)
    nparams = sum(p.numel() for p in model.parameters())
    print(f"params {nparams}, file {args.out.stat().st_size} bytes, {time.time() - t0:.0f}s")
    print(f"TEST ACCURACY {acc * 100:.2f}%")


if __name__ == "__main__":
    main()
