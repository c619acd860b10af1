"""EMNIST (handwritten letters and digits) from idx files the user downloaded."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from torch import Tensor

from .mnist import load_idx_pair

__all__ = ["load_emnist"]

_EMNIST_SPLITS = ("byclass", "bymerge", "balanced", "letters", "digits", "mnist")


def load_emnist(
    data_dir: str | os.PathLike[str],
    split: Literal["byclass", "bymerge", "balanced", "letters", "digits", "mnist"] = "letters",
    train: bool = True,
) -> tuple[Tensor, Tensor]:
    """Load real EMNIST idx files that you have downloaded yourself.

    Reads ``emnist-{split}-{train|test}-images-idx3-ubyte[.gz]`` and the matching
    ``labels-idx1`` file from ``data_dir`` (or ``data_dir/gzip``, the folder the official
    archive unpacks to). EMNIST stores every image transposed; this function transposes it
    back so letters appear upright like MNIST digits.

    Labels are returned as stored (``int64``): for ``split="letters"`` they are 1..26 for
    a..z (upper and lower case merged). Nothing is embedded for EMNIST; for a no-download
    stand-in use :func:`render_letters` (font-rendered letters, not EMNIST).

    Returns:
        ``(images uint8 (N, 28, 28), labels int64 (N,))``.

    Raises:
        ValueError: for an unknown split.
        FileNotFoundError: listing every path that was looked for.

    Example:
        >>> from qmm_plugin.paper.data import load_emnist
        >>> x, y = load_emnist("~/data/emnist", "letters", train=False)  # doctest: +SKIP
    """
    if split not in _EMNIST_SPLITS:
        raise ValueError(f"unknown EMNIST split {split!r}; choose one of {_EMNIST_SPLITS}")
    root = Path(data_dir).expanduser()
    part = "train" if train else "test"
    dirs = [root, root / "gzip", root / "EMNIST" / "raw"]
    hint = ("Download the EMNIST 'gzip' archive from NIST "
            "(https://www.nist.gov/itl/products-and-services/emnist-dataset) and unpack it "
            f"into {root}; or use qmm_plugin.paper.data.render_letters() for font-rendered letters.")
    images, labels = load_idx_pair(dirs, f"emnist-{split}-{part}", "EMNIST", hint, root)
    return images.transpose(1, 2).contiguous(), labels
