"""Measure the shipped MNIST-FID classifier's test accuracy and write it to a results file.

Usage (from the repository root)::

    python scripts/eval_mnist_classifier.py [--data-dir ../shared/datasets/mnist]
        [--out docs/results/mnist_classifier.json]

Loads ``qmm_plugin/paper/_assets/mnist_classifier.pt`` (:func:`qmm_plugin.paper.metrics.load_mnist_classifier`),
classifies the MNIST test digits of ``--data-dir`` (all 10,000 of t10k; without ``--data-dir``
files, the package's embedded 2,000) with inputs scaled to [-1, 1], as
``scripts/train_mnist_classifier.py`` trains it, and writes the accuracy, the number of digits,
their source, the weights' SHA-256 and the git commit as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
from importlib import resources
from pathlib import Path

import torch

from qmm_plugin.io import atomic_write_text
from qmm_plugin.paper.data import load_mnist
from qmm_plugin.paper.metrics import load_mnist_classifier

REPO = Path(__file__).resolve().parents[1]


@torch.no_grad()
def accuracy(images_u8: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of ``images_u8`` (uint8 ``(N, 28, 28)``) the shipped classifier labels correctly."""
    model = load_mnist_classifier()
    correct = sum(int((model(xb.float().unsqueeze(1) / 127.5 - 1.0).argmax(1) == yb).sum())
                  for xb, yb in zip(images_u8.split(1000), labels.split(1000)))
    return correct / len(labels)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=REPO / ".." / "shared" / "datasets" / "mnist",
                    help="folder with the MNIST idx(.gz) files; the embedded test subset if it has none")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "mnist_classifier.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    full = (args.data_dir / "t10k-images-idx3-ubyte.gz").exists() or (args.data_dir / "t10k-images-idx3-ubyte").exists()
    x, y = load_mnist(args.data_dir if full else None, "test")
    weights = resources.files("qmm_plugin.paper") / "_assets" / "mnist_classifier.pt"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or None
    result = {
        "accuracy": accuracy(x, y),
        "test_digits": len(y),
        "data": "MNIST t10k (full test set)" if full else "embedded subset: first 2,000 t10k digits",
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "git_commit": commit,
        "command": "python scripts/eval_mnist_classifier.py",
    }
    atomic_write_text(json.dumps(result, indent=2) + "\n", args.out)
    print(f"test accuracy {result['accuracy'] * 100:.2f}% on {result['test_digits']} digits -> {args.out}")


if __name__ == "__main__":
    main()
