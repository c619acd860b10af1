"""Data loading for qmm_plugin: idx files, MNIST (with an embedded subset), EMNIST,
font-rendered letters and image folders (3D-Chair / UT-Zap50k style).

Everything returns ``uint8`` image tensors in the layout the data ships in
(``(N, H, W)`` grey or ``(N, H, W, 3)`` RGB) plus ``int64`` labels where there are any;
:func:`to_model_range` turns them into the ``float32`` ``(N, C, H, W)`` tensors in
``[-1, 1]`` that the models consume, and :func:`to_uint8` is its inverse.

Embedded MNIST subset
---------------------
``load_mnist()`` with no ``data_dir`` needs no download: the package ships

* ``split="train"``: the **first 10,000 digits of the MNIST training set** (indices
  0..9,999 of ``train-images-idx3-ubyte``), and
* ``split="test"``: the **first 2,000 digits of the MNIST test set** (indices 0..1,999 of
  ``t10k-images-idx3-ubyte``), enough for a quick MNIST-FID without a download,

stored unchanged (``uint8``) as gzip'd idx files in ``qmm_plugin/_assets/``
(``mnist_subset_{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``), built by
``scripts/build_mnist_subset.py``. Origin and licence: the MNIST database of handwritten
digits by Yann LeCun and Corinna Cortes (with Christopher J. C. Burges),
http://yann.lecun.com/exdb/mnist/, made available under the terms of the Creative Commons
Attribution-Share Alike 3.0 licence (CC BY-SA 3.0).

For the full 60,000/10,000 digits pass ``data_dir`` pointing at a folder with the four
standard files (plain or ``.gz``).

Example:
    >>> from qmm_plugin.data import load_mnist, to_model_range
    >>> images, labels = load_mnist()          # embedded subset, no download
    >>> images.shape, images.dtype, labels.dtype
    (torch.Size([10000, 28, 28]), torch.uint8, torch.int64)
    >>> x = to_model_range(images[:64])         # (64, 1, 28, 28) float32 in [-1, 1]
"""

from __future__ import annotations

import gzip
import math
import os
import random
import string
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "read_idx",
    "load_mnist",
    "load_emnist",
    "to_model_range",
    "to_uint8",
    "render_letters",
    "load_image_folder",
    "EMBEDDED_MNIST_TRAIN_COUNT",
    "EMBEDDED_MNIST_TEST_COUNT",
]

#: Number of digits in the embedded training subset (first N of MNIST train).
EMBEDDED_MNIST_TRAIN_COUNT = 10_000
#: Number of digits in the embedded test subset (first N of MNIST t10k).
EMBEDDED_MNIST_TEST_COUNT = 2_000

_ASSET_PREFIX = "mnist_subset_"

# idx type code -> (torch dtype, item size in bytes). Multi-byte types are big-endian.
_IDX_DTYPES: dict[int, tuple[torch.dtype, int]] = {
    0x08: (torch.uint8, 1),
    0x09: (torch.int8, 1),
    0x0B: (torch.int16, 2),
    0x0C: (torch.int32, 4),
    0x0D: (torch.float32, 4),
    0x0E: (torch.float64, 8),
}
_GZIP_MAGIC = b"\x1f\x8b"


# ----------------------------------------------------------------------------- idx files


def _parse_idx(data: bytes, source: str) -> Tensor:
    """Parse the bytes of an (already decompressed) idx file."""
    if len(data) < 4:
        raise ValueError(
            f"{source}: not an idx file: only {len(data)} bytes, an idx header needs at least 4. "
            "Check that the download completed (re-download the file)."
        )
    if data[0] != 0 or data[1] != 0:
        raise ValueError(
            f"{source}: not an idx file: magic number starts with bytes "
            f"{data[0]:#04x} {data[1]:#04x}, expected 0x00 0x00. If this is a compressed file "
            "other than gzip, decompress it first; if it is an HTML error page, re-download it."
        )
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"{k:#04x}={v[0]}" for k, v in _IDX_DTYPES.items())
        raise ValueError(
            f"{source}: unknown idx data type code {code:#04x} in the magic number; "
            f"known codes: {known}. The file is corrupt or not an idx file."
        )
    if ndim == 0:
        raise ValueError(f"{source}: idx header declares 0 dimensions; the file is corrupt.")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(
            f"{source}: truncated idx header: {ndim} dimensions need {header_len} header bytes, "
            f"the file has {len(data)}. Re-download the file."
        )
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype, itemsize = _IDX_DTYPES[code]
    expected = math.prod(dims) * itemsize
    got = len(data) - header_len
    if got != expected:
        what = "truncated" if got < expected else "has trailing bytes"
        raise ValueError(
            f"{source}: idx payload {what}: header says shape {tuple(dims)} of {dtype} "
            f"({expected} bytes) but {got} bytes follow the header. Re-download the file."
        )
    if expected == 0:
        return torch.empty(dims, dtype=dtype)
    payload = bytearray(data[header_len:])
    flat = torch.frombuffer(payload, dtype=torch.uint8)
    if itemsize > 1:  # big-endian on disk -> native order
        flat = flat.view(-1, itemsize)
        if torch.tensor([1], dtype=torch.int16).view(torch.uint8)[0].item() == 1:  # little-endian host
            flat = flat.flip(-1).contiguous()
        flat = flat.view(-1)
    return flat.view(dtype).reshape(dims)


def read_idx(path: str | os.PathLike[str]) -> Tensor:
    """Read an idx file (the MNIST/EMNIST format), plain or gzip-compressed.

    The magic number gives dtype and number of dimensions; gzip compression is detected from
    the file content, not the name. Supported types: ``uint8`` (0x08), ``int8`` (0x09),
    ``int16`` (0x0B), ``int32`` (0x0C), ``float32`` (0x0D), ``float64`` (0x0E).

    Args:
        path: file to read.

    Returns:
        A tensor of the stored dtype and shape (e.g. ``uint8`` ``(60000, 28, 28)``).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the header is invalid or the payload size disagrees with it.

    Example:
        >>> import tempfile, os, torch
        >>> from qmm_plugin.data import read_idx
        >>> p = os.path.join(tempfile.mkdtemp(), "x-idx1-ubyte")
        >>> _ = open(p, "wb").write(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9]))
        >>> read_idx(p)
        tensor([7, 8, 9], dtype=torch.uint8)
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"idx file not found: {p}")
    raw = p.read_bytes()
    return _parse_idx(_maybe_gunzip(raw, str(p)), str(p))


def _maybe_gunzip(raw: bytes, source: str) -> bytes:
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError) as e:
        raise ValueError(
            f"{source}: looks gzip-compressed but could not be decompressed ({e}). "
            "The download is probably incomplete; re-download the file."
        ) from e


def _write_idx(tensor: Tensor, path: str | os.PathLike[str], *, compress: bool | None = None) -> None:
    """Write ``tensor`` as an idx file (gzip'd if ``compress`` or the name ends in ``.gz``).

    Internal helper (used by the asset build script and the tests). gzip mtime is fixed to 0
    so the output is byte-reproducible.
    """
    inverse = {v[0]: k for k, v in _IDX_DTYPES.items()}
    if tensor.dtype not in inverse:
        raise TypeError(f"idx cannot store dtype {tensor.dtype}")
    if not 1 <= tensor.ndim <= 255:
        raise ValueError(f"idx needs 1..255 dimensions, got {tensor.ndim}")
    t = tensor.detach().cpu().contiguous()
    header = bytes([0, 0, inverse[t.dtype], t.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in t.shape
    )
    itemsize = t.element_size()
    buf = bytearray(t.numel() * itemsize)
    if buf:
        view = torch.frombuffer(buf, dtype=torch.uint8)
        as_bytes = t.view(-1).view(torch.uint8).view(-1, itemsize)
        if itemsize > 1 and torch.tensor([1], dtype=torch.int16).view(torch.uint8)[0].item() == 1:
            as_bytes = as_bytes.flip(-1)
        view.copy_(as_bytes.reshape(-1))
    data = header + bytes(buf)
    p = Path(path)
    if compress is None:
        compress = p.name.endswith(".gz")
    if compress:
        data = gzip.compress(data, compresslevel=9, mtime=0)
    p.write_bytes(data)


# ----------------------------------------------------------------------------- MNIST

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
    assets = resources.files("qmm_plugin") / "_assets"
    for kind in ("images-idx3", "labels-idx1"):
        name = f"{_ASSET_PREFIX}{prefix}-{kind}-ubyte.gz"
        res = assets / name
        if not res.is_file():
            raise FileNotFoundError(
                f"embedded MNIST subset asset qmm_plugin/_assets/{name} is missing from this "
                "installation; reinstall qmm_plugin, run scripts/build_mnist_subset.py, or pass "
                "data_dir= pointing at the full MNIST files."
            )
        out.append(_parse_idx(_maybe_gunzip(res.read_bytes(), name), name))
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
        >>> from qmm_plugin.data import load_mnist
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
    return _load_idx_pair(dirs, _MNIST_PREFIX[split], f"MNIST {split}", hint, root)


def _load_idx_pair(dirs: Sequence[Path], prefix: str, what: str, hint: str, root: Path) -> tuple[Tensor, Tensor]:
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


# ----------------------------------------------------------------------------- EMNIST

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
        >>> from qmm_plugin.data import load_emnist
        >>> x, y = load_emnist("~/data/emnist", "letters", train=False)  # doctest: +SKIP
    """
    if split not in _EMNIST_SPLITS:
        raise ValueError(f"unknown EMNIST split {split!r}; choose one of {_EMNIST_SPLITS}")
    root = Path(data_dir).expanduser()
    part = "train" if train else "test"
    dirs = [root, root / "gzip", root / "EMNIST" / "raw"]
    hint = ("Download the EMNIST 'gzip' archive from NIST "
            "(https://www.nist.gov/itl/products-and-services/emnist-dataset) and unpack it "
            f"into {root}; or use qmm_plugin.data.render_letters() for font-rendered letters.")
    images, labels = _load_idx_pair(dirs, f"emnist-{split}-{part}", "EMNIST", hint, root)
    return images.transpose(1, 2).contiguous(), labels


# ----------------------------------------------------------------------------- value range


def to_model_range(images_uint8: Tensor) -> Tensor:
    """Convert ``uint8`` images to ``float32`` ``(N, C, H, W)`` in ``[-1, 1]``.

    Accepted layouts: ``(N, H, W)`` grey -> ``(N, 1, H, W)``; ``(N, H, W, 3)`` RGB (or
    ``(N, H, W, 1)``) -> ``(N, 3, H, W)``; a single ``(H, W)`` image -> ``(1, 1, H, W)``.
    Mapping: ``x / 127.5 - 1`` (0 -> -1, 255 -> 1).

    Example:
        >>> import torch
        >>> from qmm_plugin.data import to_model_range
        >>> to_model_range(torch.tensor([[[0, 255]]], dtype=torch.uint8))
        tensor([[[[-1.,  1.]]]])
    """
    x = images_uint8
    if x.dtype != torch.uint8:
        raise TypeError(
            f"to_model_range expects uint8 images (0..255), got {x.dtype}; for float images in "
            "[0, 1] use x * 2 - 1 instead."
        )
    if x.ndim == 2:
        x = x[None, None]
    elif x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)
    else:
        raise ValueError(
            f"to_model_range expects (N, H, W) grey or (N, H, W, 3) RGB uint8 images, got shape "
            f"{tuple(x.shape)}"
        )
    return (x.to(torch.float32) / 127.5 - 1.0).contiguous()


def to_uint8(images: Tensor) -> Tensor:
    """Inverse of :func:`to_model_range`: float ``(N, C, H, W)`` in ``[-1, 1]`` -> ``uint8``.

    ``C == 1`` gives ``(N, H, W)``, ``C == 3`` gives ``(N, H, W, 3)``. Values are clamped to
    ``[-1, 1]`` and rounded, so ``to_uint8(to_model_range(u))`` returns ``u`` exactly.

    Example:
        >>> import torch
        >>> from qmm_plugin.data import to_uint8
        >>> to_uint8(torch.tensor([[[[-1.0, 0.0, 1.0, 3.0]]]]))
        tensor([[[  0, 128, 255, 255]]], dtype=torch.uint8)
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"to_uint8 expects float images of shape (N, 1|3, H, W), got {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise TypeError(f"to_uint8 expects a float tensor in [-1, 1], got {images.dtype}")
    u = ((images.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    if u.shape[1] == 1:
        return u[:, 0].contiguous()
    return u.permute(0, 2, 3, 1).contiguous()


# ----------------------------------------------------------------------------- PIL helpers


def _pil_to_tensor(img: "Image.Image") -> Tensor:  # noqa: F821 (PIL imported lazily)
    w, h = img.size
    c = len(img.getbands())
    t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return t.view(h, w, c)[..., 0] if c == 1 else t.view(h, w, c)


# ----------------------------------------------------------------------------- rendered letters

_SUPERSAMPLE = 4


@lru_cache(maxsize=8)
def _letter_font(px: int):  # -> ImageFont.FreeTypeFont | ImageFont.ImageFont
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=px)  # scalable bundled font, Pillow >= 10.1
    except TypeError:  # older Pillow: fixed-size bitmap font (blocky after resizing)
        return ImageFont.load_default()


def _render_one(ch: str, rng: random.Random, size: int) -> Tensor:
    from PIL import Image, ImageDraw

    s = _SUPERSAMPLE
    canvas = size * s * 2
    font_px = int(size * s * 0.8)
    font = _letter_font(font_px)
    # stroke jitter: 0..~1.3 px at output resolution
    stroke = rng.randint(0, max(1, round(size * s * 0.045)))
    img = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(img)
    try:
        draw.text((canvas / 2, canvas / 2), ch, fill=255, font=font, anchor="mm",
                  stroke_width=stroke, stroke_fill=255)
    except (ValueError, TypeError):  # bitmap fonts do not support anchors
        draw.text((canvas / 4, canvas / 4), ch, fill=255, font=font)

    # random affine: rotation, shear, anisotropic scale, about the canvas centre
    theta = math.radians(rng.uniform(-15.0, 15.0))
    shear = rng.uniform(-0.3, 0.3)
    sx = rng.uniform(0.85, 1.15)
    sy = rng.uniform(0.85, 1.15)
    cos, sin = math.cos(theta), math.sin(theta)
    # forward map M = R @ Shear @ Scale
    a, b = cos * sx, (cos * shear - sin) * sy
    c, d = sin * sx, (sin * shear + cos) * sy
    det = a * d - b * c
    ia, ib, ic, id_ = d / det, -b / det, -c / det, a / det
    cx = cy = canvas / 2
    # PIL wants the inverse map: input = Minv @ (output - centre) + centre
    coeffs = (ia, ib, cx - ia * cx - ib * cy, ic, id_, cy - ic * cx - id_ * cy)
    img = img.transform((canvas, canvas), Image.Transform.AFFINE, coeffs,
                        resample=Image.Resampling.BILINEAR)

    bbox = img.getbbox()
    if bbox is None:  # nothing drawn (e.g. whitespace character)
        return torch.zeros(size, size, dtype=torch.uint8)
    glyph = img.crop(bbox)
    gw, gh = glyph.size
    # MNIST-style normalisation: fit into a 20/28 box, with scale jitter
    box = size * 20 / 28 * rng.uniform(0.8, 1.05)
    f = box / max(gw, gh)
    nw, nh = max(1, round(gw * f)), max(1, round(gh * f))
    glyph = glyph.resize((nw, nh), Image.Resampling.LANCZOS)
    g = _pil_to_tensor(glyph).to(torch.float32)
    mass = g.sum()
    if mass > 0:
        ys = torch.arange(nh, dtype=torch.float32)
        xs = torch.arange(nw, dtype=torch.float32)
        com_y = float((g.sum(1) * ys).sum() / mass)
        com_x = float((g.sum(0) * xs).sum() / mass)
    else:
        com_y, com_x = nh / 2, nw / 2
    jitter = size * 1.5 / 28
    ty = size / 2 + rng.uniform(-jitter, jitter) - com_y
    tx = size / 2 + rng.uniform(-jitter, jitter) - com_x
    oy = int(round(min(max(ty, 0), size - nh)))
    ox = int(round(min(max(tx, 0), size - nw)))
    out = Image.new("L", (size, size), 0)
    out.paste(glyph, (ox, oy))
    return _pil_to_tensor(out)


def render_letters(
    n: int,
    *,
    seed: int = 0,
    letters: str = string.ascii_uppercase,
    size: int = 28,
) -> tuple[Tensor, Tensor]:
    """Render ``n`` random letters with Pillow's bundled font, MNIST-style.

    These are *font-rendered letters*, not EMNIST (use :func:`load_emnist` for the real
    handwritten data). Each sample draws a letter uniformly from ``letters``, renders it
    white on black with a random stroke width, applies a random affine map (rotation
    ±15°, shear ±0.3, per-axis scale 0.85..1.15), fits it into a ``20/28 * size`` box
    (times a random 0.8..1.05), and centres its centre of mass in a ``size x size`` frame
    with up to ±1.5/28 * size pixels of translation. Rendering is 4x supersampled, so edges
    are anti-aliased. Needs Pillow >= 10.1 for the scalable default font (older versions fall
    back to a small bitmap font). Deterministic for a given ``seed``.

    Args:
        n: number of images.
        seed: random seed (a private ``random.Random``; global RNG state is untouched).
        letters: the alphabet to draw from; labels index into it.
        size: output side length in pixels.

    Returns:
        ``(images uint8 (n, size, size), labels int64 (n,))`` with ``letters[labels[i]]``
        the letter drawn in ``images[i]``.

    Example:
        >>> from qmm_plugin.data import render_letters
        >>> x, y = render_letters(16, seed=1, letters="AB")
        >>> x.shape, x.dtype, sorted(set(y.tolist())) <= [0, 1]
        (torch.Size([16, 28, 28]), torch.uint8, True)
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not letters:
        raise ValueError("letters must be a non-empty string")
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size}")
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    images = torch.empty(n, size, size, dtype=torch.uint8)
    labels = torch.empty(n, dtype=torch.int64)
    for i in tqdm(range(n), desc="render_letters", disable=n < 5000, leave=False):
        k = rng.randrange(len(letters))
        labels[i] = k
        images[i] = _render_one(letters[k], rng, size)
    return images, labels


# ----------------------------------------------------------------------------- image folders

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def load_image_folder(
    root: str | os.PathLike[str],
    *,
    size: int,
    channels: Literal[1, 3],
    max_images: int | None = None,
) -> Tensor:
    """Load every png/jpg/jpeg under ``root`` (recursively) as one ``uint8`` tensor.

    For 3D-Chair (``size=64, channels=1``) and UT-Zap50k (``size=32, channels=3``) style
    data. Files are taken in sorted path order (deterministic), converted to grey (``"L"``)
    or RGB, transparent pixels composited onto white, and resized to ``size x size`` with
    Lanczos filtering (the aspect ratio is *not* kept: non-square images are stretched).
    A tqdm progress bar is shown for 500 files or more.

    Args:
        root: folder to search.
        size: output side length.
        channels: 1 (grey) or 3 (RGB).
        max_images: keep only the first ``max_images`` files of the sorted list.

    Returns:
        ``uint8`` ``(N, size, size)`` for ``channels=1``, ``(N, size, size, 3)`` for 3.

    Raises:
        FileNotFoundError: ``root`` missing or containing no png/jpg/jpeg files.
        ValueError: a file could not be decoded (the message names it).

    Example:
        >>> from qmm_plugin.data import load_image_folder, to_model_range
        >>> chairs = load_image_folder("data/rendered_chairs", size=64, channels=1)  # doctest: +SKIP
        >>> x = to_model_range(chairs)  # (N, 1, 64, 64) in [-1, 1]                   # doctest: +SKIP
    """
    from PIL import Image, UnidentifiedImageError
    from tqdm.auto import tqdm

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    base = Path(root).expanduser()
    if not base.is_dir():
        raise FileNotFoundError(f"image folder {base} does not exist or is not a folder")
    files = sorted(
        p for p in base.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file()
    )
    if max_images is not None:
        files = files[: max(0, max_images)]
    if not files:
        raise FileNotFoundError(
            f"no .png/.jpg/.jpeg files found under {base} (searched recursively). Check the path "
            "and that the archive was unpacked."
        )
    mode = "L" if channels == 1 else "RGB"
    shape = (len(files), size, size) if channels == 1 else (len(files), size, size, 3)
    out = torch.empty(shape, dtype=torch.uint8)
    for i, f in enumerate(tqdm(files, desc="load_image_folder", disable=len(files) < 500,
                               leave=False)):
        try:
            with Image.open(f) as im:
                im.load()
                if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                    rgba = im.convert("RGBA")
                    bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                    im2 = Image.alpha_composite(bg, rgba).convert(mode)
                else:
                    im2 = im.convert(mode)
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"could not decode image {f}: {e}. Delete or replace the file.") from e
        if im2.size != (size, size):
            im2 = im2.resize((size, size), Image.Resampling.LANCZOS)
        out[i] = _pil_to_tensor(im2)
    return out
