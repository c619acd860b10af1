"""Font-rendered letters, MNIST-style (a no-download stand-in for EMNIST letters)."""

from __future__ import annotations

import math
import random
import string
from functools import lru_cache

import torch
from torch import Tensor

from ._pil import pil_to_tensor

__all__ = ["render_letters"]

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
    g = pil_to_tensor(glyph).to(torch.float32)
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
    return pil_to_tensor(out)


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
        >>> from qmm_plugin.paper.data import render_letters
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
