"""MNIST digits: the full idx files from a folder, or the subset embedded in the package.

Embedded MNIST subset
---------------------
``load_mnist()`` with no ``data_dir`` needs no download: the package ships

* ``split="train"``: the **first 10,000 digits of the MNIST training set** (indices
  0..9,999 of ``train-images-idx3-ubyte``), and
* ``split="test"``: the **first 2,000 digits of the MNIST test set** (indices 0..1,999 of
  ``t10k-images-idx3-ubyte``), enough for a quick MNIST-FID without a download,

stored unchanged (``uint8``) as gzip'd idx files in ``qmm_plugin/paper/_assets/``
(``mnist_subset_{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``), built by
``scripts/build_mnist_subset.py``. Origin and licence: the MNIST database of handwritten
digits by Yann LeCun and Corinna Cortes (with Christopher J. C. Burges),
http://yann.lecun.com/exdb/mnist/, made available under the terms of the Creative Commons
Attribution-Share Alike 3.0 licence (CC BY-SA 3.0).

For the full 60,000/10,000 digits pass ``data_dir`` pointing at a folder with the four
standard files (plain or ``.gz``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from .idx import parse_idx_bytes, read_idx

__all__ = ["load_mnist", "EMBEDDED_MNIST_TRAIN_COUNT", "EMBEDDED_MNIST_TEST_COUNT"]

#: Number of digits in the embedded training subset (first N of MNIST train).
EMBEDDED_MNIST_TRAIN_COUNT = 10_000
#: Number of digits in the embedded test subset (first N of MNIST t10k).
EMBEDDED_MNIST_TEST_COUNT = 2_000

_ASSET_PREFIX = "mnist_subset_"


_MNIST_PREFIX = {"train": "train", "test": "t10k"}


def _find_file(dirs: Sequence[Path], stem: str) -> tuple[Path | None, list[Path]]:
    tried: list[Path] = []
    for d in dirs:
        for name in (stem, stem + ".gz"):
            cand = d / name
            tried.append(cand)
            if cand.is_file():
                return cand, tried
    return None, tried


def _check_image_label_pair(images: Tensor, labels: Tensor, source: str) -> None:
    if images.dtype != torch.uint8 or images.ndim != 3:
        raise ValueError(
            f"{source}: expected uint8 images of shape (N, H, W), got {images.dtype} "
            f"{tuple(images.shape)}; is this an images-idx3 file?"
        )
    if labels.ndim != 1:
        raise ValueError(
            f"{source}: expected 1-D labels, got shape {tuple(labels.shape)}; is this a labels-idx1 file?"
        )
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{source}: {images.shape[0]} images but {labels.shape[0]} labels; the image and "
            "label files belong to different splits or one is truncated."
        )


def _load_embedded_mnist(split: str) -> tuple[Tensor, Tensor]:
    prefix = _MNIST_PREFIX[split]
    out = []
    assets = resources.files("qmm_plugin.paper") / "_assets"
    for kind in ("images-idx3", "labels-idx1"):
        name = f"{_ASSET_PREFIX}{prefix}-{kind}-ubyte.gz"
        res = assets / name
        if not res.is_file():
            raise FileNotFoundError(
                f"embedded MNIST subset asset qmm_plugin/paper/_assets/{name} is missing from this "
                "installation; reinstall qmm_plugin, run scripts/build_mnist_subset.py, or pass "
                "data_dir= pointing at the full MNIST files."
            )
        out.append(parse_idx_bytes(res.read_bytes(), name))
    images, labels = out
    _check_image_label_pair(images, labels, f"embedded MNIST {split} subset")
    return images, labels.to(torch.int64)


def load_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    split: Literal["train", "test"] = "train",
) -> tuple[Tensor, Tensor]:
    """Load MNIST digits as ``uint8`` images ``(N, 28, 28)`` and ``int64`` labels ``(N,)``.

    Args:
        data_dir: folder holding the standard files ``train-images-idx3-ubyte``,
            ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``
            (each plain or ``.gz``; ``data_dir/MNIST/raw`` as written by torchvision is also
            searched). ``None`` returns the subset embedded in the package: the first 10,000
            training digits for ``split="train"``, the first 2,000 test digits for
            ``split="test"`` (see the module docstring for origin and licence).
        split: ``"train"`` or ``"test"``.

    Returns:
        ``(images, labels)``: white digits on black, values 0..255; labels 0..9.

    Raises:
        FileNotFoundError: listing every path that was looked for.

    Example:
        >>> from qmm_plugin.paper.data import load_mnist
        >>> x, y = load_mnist(split="test")    # embedded: first 2,000 test digits
        >>> x.shape, int(y[0])
        (torch.Size([2000, 28, 28]), 7)
    """
    if split not in _MNIST_PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if data_dir is None:
        return _load_embedded_mnist(split)
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"MNIST data_dir {root} does not exist or is not a folder. Download the four MNIST "
            "idx files (e.g. train-images-idx3-ubyte.gz) into it, or pass data_dir=None for the "
            "embedded subset."
        )
    dirs = [root, root / "MNIST" / "raw", root / "raw"]
    hint = f"Download it from the MNIST mirror into {root}, or pass data_dir=None for the embedded subset."
    return load_idx_pair(dirs, _MNIST_PREFIX[split], f"MNIST {split}", hint, root)


def load_idx_pair(dirs: Sequence[Path], prefix: str, what: str, hint: str, root: Path) -> tuple[Tensor, Tensor]:
    """Images ``{prefix}-images-idx3-ubyte[.gz]`` and labels ``{prefix}-labels-idx1-ubyte[.gz]``
    from the first of ``dirs`` holding them; a missing file names every path tried and ``hint``."""
    found: list[Path] = []
    for kind in ("images-idx3", "labels-idx1"):
        path, tried = _find_file(dirs, f"{prefix}-{kind}-ubyte")
        if path is None:
            listing = "\n  ".join(str(t) for t in tried)
            raise FileNotFoundError(
                f"{what} file '{prefix}-{kind}-ubyte[.gz]' not found. Looked for:\n  {listing}\n{hint}")
        found.append(path)
    images, labels = read_idx(found[0]), read_idx(found[1])
    _check_image_label_pair(images, labels, str(root))
    return images, labels.to(torch.int64)
