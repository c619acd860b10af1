#!/usr/bin/env python
"""Build the MNIST subset embedded in qmm_plugin (``qmm_plugin/paper/_assets/mnist_subset_*``).

Contents: the first 10,000 digits of the MNIST training set (indices 0..9,999 of
``train-images-idx3-ubyte``) and the first 2,000 digits of the MNIST test set (indices
0..1,999 of ``t10k-images-idx3-ubyte``), with their labels, stored unchanged (uint8) as
gzip'd idx files (gzip mtime 0, so rebuilding gives identical bytes):

    qmm_plugin/paper/_assets/mnist_subset_train-images-idx3-ubyte.gz
    qmm_plugin/paper/_assets/mnist_subset_train-labels-idx1-ubyte.gz
    qmm_plugin/paper/_assets/mnist_subset_t10k-images-idx3-ubyte.gz
    qmm_plugin/paper/_assets/mnist_subset_t10k-labels-idx1-ubyte.gz

Origin and licence: the MNIST database of handwritten digits, Yann LeCun and Corinna Cortes
(with Christopher J. C. Burges), http://yann.lecun.com/exdb/mnist/, licensed under Creative
Commons Attribution-Share Alike 3.0 (CC BY-SA 3.0).

Usage (from the repository root):
    python scripts/build_mnist_subset.py [--data-dir ../shared/datasets/mnist]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qmm_plugin.paper.data import (  # noqa: E402
    EMBEDDED_MNIST_TEST_COUNT,
    EMBEDDED_MNIST_TRAIN_COUNT,
    write_idx,
    load_mnist,
    read_idx,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "datasets" / "mnist",
                    help="folder with the full MNIST idx files (default: ../shared/datasets/mnist)")
    ap.add_argument("--out-dir", type=Path, default=REPO / "qmm_plugin" / "_assets")
    ap.add_argument("--n-train", type=int, default=EMBEDDED_MNIST_TRAIN_COUNT)
    ap.add_argument("--n-test", type=int, default=EMBEDDED_MNIST_TEST_COUNT)
    args = ap.parse_args(argv)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    total = 0
    for split, prefix, n in (("train", "train", args.n_train), ("test", "t10k", args.n_test)):
        images, labels = load_mnist(args.data_dir, split)
        if n > images.shape[0]:
            raise SystemExit(f"asked for {n} {split} digits, {args.data_dir} has {images.shape[0]}")
        for kind, t in (("images-idx3", images[:n]), ("labels-idx1", labels[:n].to("cpu").byte())):
            path = args.out_dir / f"mnist_subset_{prefix}-{kind}-ubyte.gz"
            write_idx(t.contiguous(), path)
            back = read_idx(path)
            assert back.dtype == t.dtype and bool((back == t).all()), path
            size = path.stat().st_size
            total += size
            print(f"wrote {path} {tuple(t.shape)} {size / 1e6:.2f} MB")
    print(f"total {total / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
