"""Data for the paper's experiments, one module per source: idx files (:mod:`.idx`), MNIST with an
embedded subset (:mod:`.mnist`), EMNIST (:mod:`.emnist`), font-rendered letters (:mod:`.letters`)
and image folders (:mod:`.folders`).

Every loader returns ``uint8`` image tensors in the layout the data ships in (``(N, H, W)`` grey or
``(N, H, W, 3)`` RGB) plus ``int64`` labels where there are any; :func:`to_model_range` turns them
into the ``float32`` ``(N, C, H, W)`` tensors in ``[-1, 1]`` that the models consume, and
:func:`to_uint8` is its inverse (:mod:`.value_range`).

Example:
    >>> from qmm_plugin.paper.data import load_mnist, to_model_range
    >>> images, labels = load_mnist()          # embedded subset, no download
    >>> images.shape, images.dtype, labels.dtype
    (torch.Size([10000, 28, 28]), torch.uint8, torch.int64)
    >>> x = to_model_range(images[:64])         # (64, 1, 28, 28) float32 in [-1, 1]
"""

from .emnist import load_emnist
from .folders import load_image_folder
from .idx import read_idx, write_idx
from .letters import render_letters
from .mnist import EMBEDDED_MNIST_TEST_COUNT, EMBEDDED_MNIST_TRAIN_COUNT, load_mnist
from .value_range import to_model_range, to_uint8

__all__ = [
    "read_idx",
    "write_idx",
    "load_mnist",
    "load_emnist",
    "to_model_range",
    "to_uint8",
    "render_letters",
    "load_image_folder",
    "EMBEDDED_MNIST_TRAIN_COUNT",
    "EMBEDDED_MNIST_TEST_COUNT",
]
