"""Image grids as PNG files: sample sheets and the paper's manifold grid (Fig. 3 layout); line plots
of a metric against steps or seconds (:func:`save_line_plot`).

Images come in the models' layout, ``(N, C, H, W)`` float in ``value_range`` (default
``[-1, 1]``), or ``uint8`` (taken as 0..255 whatever ``value_range`` says). PNG files are
written atomically (temp file in the same folder, then ``os.replace``).

Example:
    >>> import os, tempfile, torch
    >>> from qmm_plugin.paper.viz import make_grid, save_grid
    >>> x = torch.rand(10, 1, 28, 28) * 2 - 1
    >>> make_grid(x, nrow=5).shape          # 2 rows x 5 columns, 2 px padding
    torch.Size([62, 152, 1])
    >>> p = save_grid(x, os.path.join(tempfile.mkdtemp(), "samples.png"), nrow=5, scale=2)
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor

from ..io import atomic_write_bytes

__all__ = ["make_grid", "save_grid", "save_manifold_grid", "save_image", "save_line_plot"]


def _to_uint8_nchw(images: Tensor, value_range: tuple[float, float] | None) -> Tensor:
    x = images.detach().cpu()
    if x.ndim == 3:  # (N, H, W) grey
        x = x[:, None]
    if x.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W) or (N, H, W), got {tuple(x.shape)}")
    if x.shape[1] not in (1, 3):
        raise ValueError(
            f"expected 1 or 3 channels in dim 1 (N, C, H, W), got shape {tuple(x.shape)}; "
            "channels-last images need .permute(0, 3, 1, 2) first"
        )
    if x.dtype == torch.uint8:
        return x
    if x.dtype == torch.bool:
        return x.to(torch.uint8) * 255
    x = x.float()
    if value_range is None:
        finite = x[torch.isfinite(x)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
        if hi <= lo:  # constant batch
            hi = lo + 1.0
    else:
        lo, hi = float(value_range[0]), float(value_range[1])
        if hi <= lo:
            raise ValueError(f"value_range must be (lo, hi) with hi > lo, got {value_range}")
    x = torch.nan_to_num(x, nan=lo)
    return ((x - lo) / (hi - lo)).clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)


def make_grid(
    images: Tensor,
    nrow: int,
    padding: int = 2,
    value_range: tuple[float, float] | None = (-1.0, 1.0),
    *,
    scale: int = 1,
    pad_value: int = 0,
) -> Tensor:
    """Tile images into one ``uint8`` ``(H', W', C)`` picture.

    ``nrow`` images per row (as in torchvision), ``ceil(N / nrow)`` rows; every image is
    upscaled by ``scale`` (nearest neighbour, so a 28x28 digit stays crisp) and surrounded by
    ``padding`` pixels of ``pad_value``: ``H' = rows * (H * scale + padding) + padding`` and
    ``W' = nrow * (W * scale + padding) + padding``. Unused cells of the last row stay
    ``pad_value``.

    Args:
        images: ``(N, C, H, W)`` with ``C`` in {1, 3} (or ``(N, H, W)`` grey); float values
            are mapped from ``value_range`` to 0..255 and clamped; ``uint8`` is used as is.
        nrow: images per row.
        padding: pixels between and around the images.
        value_range: ``(lo, hi)`` of float input, or ``None`` for the batch's min/max.
        scale: integer upscaling factor.
        pad_value: grey level 0..255 of the padding.

    Example:
        >>> import torch
        >>> g = make_grid(torch.ones(3, 1, 4, 4), nrow=2, padding=1)
        >>> g.shape, g.dtype, int(g[1, 1, 0]), int(g[0, 0, 0])
        (torch.Size([11, 11, 1]), torch.uint8, 255, 0)
    """
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    if padding < 0 or scale < 1:
        raise ValueError(f"need padding >= 0 and scale >= 1, got padding={padding}, scale={scale}")
    if not 0 <= pad_value <= 255:
        raise ValueError(f"pad_value must be in 0..255, got {pad_value}")
    x = _to_uint8_nchw(images, value_range)
    n, c, h, w = x.shape
    if n == 0:
        raise ValueError("make_grid got an empty batch (N = 0)")
    if scale > 1:
        x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
        h, w = h * scale, w * scale
    ncol = min(nrow, n)
    rows = math.ceil(n / nrow)
    grid = torch.full(
        (rows * (h + padding) + padding, ncol * (w + padding) + padding, c),
        pad_value,
        dtype=torch.uint8,
    )
    hwc = x.permute(0, 2, 3, 1)
    for i in range(n):
        r, col = divmod(i, nrow)
        y0 = padding + r * (h + padding)
        x0 = padding + col * (w + padding)
        grid[y0 : y0 + h, x0 : x0 + w] = hwc[i]
    return grid


def save_image(grid_hwc: Tensor, path: str | os.PathLike[str]) -> Path:
    """Write a ``uint8`` ``(H, W, C)`` (C in {1, 3}) or ``(H, W)`` tensor as a PNG, atomically.

    Example:
        >>> import os, tempfile, torch
        >>> p = save_image(torch.zeros(4, 6, dtype=torch.uint8), os.path.join(tempfile.mkdtemp(), "a.png"))
    """
    from PIL import Image

    g = grid_hwc.detach().cpu()
    if g.ndim == 2:
        g = g[..., None]
    if g.dtype != torch.uint8 or g.ndim != 3 or g.shape[2] not in (1, 3):
        raise ValueError(f"save_image expects uint8 (H, W[, 1|3]), got {g.dtype} {tuple(g.shape)}")
    hh, ww, c = g.shape
    buf = bytearray(g.numel())
    torch.frombuffer(buf, dtype=torch.uint8).copy_(g.contiguous().view(-1))
    img = Image.frombytes("L" if c == 1 else "RGB", (ww, hh), bytes(buf))
    out = io.BytesIO()
    img.save(out, format="PNG", optimize=False)
    return atomic_write_bytes(out.getvalue(), path)


def save_grid(
    images: Tensor,
    path: str | os.PathLike[str],
    nrow: int,
    padding: int = 2,
    value_range: tuple[float, float] | None = (-1.0, 1.0),
    *,
    scale: int = 1,
    pad_value: int = 0,
) -> Path:
    """:func:`make_grid` then write it as a PNG at ``path`` (atomically); returns the path.

    Example:
        >>> import os, tempfile, torch
        >>> p = save_grid(torch.rand(8, 3, 32, 32) * 2 - 1, os.path.join(tempfile.mkdtemp(), "s.png"), nrow=4)
    """
    grid = make_grid(images, nrow, padding, value_range, scale=scale, pad_value=pad_value)
    return save_image(grid, path)


def save_manifold_grid(
    images: Tensor,
    path: str | os.PathLike[str],
    padding: int = 2,
    value_range: tuple[float, float] | None = (-1.0, 1.0),
    *,
    scale: int = 1,
    pad_value: int = 0,
    row_labels: Sequence[str] | None = None,
) -> Path:
    """Save the paper's Fig. 3 layout: one row per manifold, one column per shared ``z``.

    Args:
        images: ``(A, n, C, H, W)``: ``images[a, j]`` is generator output for manifold ``a``
            with the ``j``-th latent ``z`` (the same ``z`` down each column).
        path: PNG file to write (atomically).
        row_labels: optional text for each row (e.g. the manifold's majority class), written in a
            margin left of the row.

    Example:
        >>> import os, tempfile, torch
        >>> x = torch.rand(10, 8, 1, 28, 28) * 2 - 1      # A=10 manifolds, 8 shared z
        >>> p = save_manifold_grid(x, os.path.join(tempfile.mkdtemp(), "fig3.png"), scale=2)
    """
    if images.ndim != 5:
        raise ValueError(
            f"save_manifold_grid expects (A, n, C, H, W) (rows = manifolds, columns = shared z), "
            f"got shape {tuple(images.shape)}"
        )
    a, n = images.shape[:2]
    if a == 0 or n == 0:
        raise ValueError(f"save_manifold_grid got an empty grid: A={a}, n={n}")
    flat = images.reshape(a * n, *images.shape[2:])
    grid = make_grid(flat, n, padding, value_range, scale=scale, pad_value=pad_value)
    if row_labels is not None:
        if len(row_labels) != a:
            raise ValueError(f"row_labels has {len(row_labels)} entries for {a} rows; give one label per manifold")
        grid = _label_rows(grid, list(row_labels), row_height=images.shape[3] * scale + padding, top=padding)
    return save_image(grid, path)


def _label_rows(grid: Tensor, labels: list[str], row_height: int, top: int) -> Tensor:
    """``grid`` with a left margin holding ``labels[r]`` beside row ``r`` (white on black)."""
    from PIL import Image, ImageDraw

    font_h = 11  # PIL's default bitmap font
    width = 6 * max(len(t) for t in labels) + 8
    margin = Image.new("L", (width, grid.shape[0]), 0)
    draw = ImageDraw.Draw(margin)
    for r, text in enumerate(labels):
        draw.text((4, top + r * row_height + max(0, (row_height - font_h) // 2)), text, fill=255)
    strip = torch.frombuffer(bytearray(margin.tobytes()), dtype=torch.uint8).reshape(grid.shape[0], width, 1)
    return torch.cat([strip.expand(-1, -1, grid.shape[2]), grid], dim=1)


#: Line colours of :func:`save_line_plot`, in series order (matplotlib's "tab10").
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def save_line_plot(
    series: Mapping[str, Sequence[tuple[float, float]]],
    path: str | os.PathLike[str],
    xlabel: str,
    ylabel: str,
    *,
    y_range: tuple[float, float] = (0.0, 1.0),
    hlines: Sequence[float] = (),
) -> Path:
    """One polyline per series, with a legend on the right, as a PNG at ``path`` (atomically).

    The x axis runs from 0 to the largest x of any point; the y axis over ``y_range``, with six
    labelled grid lines. Under the plot: ``"{xlabel} (0 to {largest x}); {ylabel}"``. Series keep
    their order (and :data:`PALETTE` colour); points are joined in the order given, so sort them
    by x first; a series of one point is drawn as a dot. ``hlines``: y values drawn as darker
    horizontal lines (e.g. a threshold). 990 x 420 pixels, PIL only (no matplotlib).

    Example:
        >>> import os, tempfile
        >>> p = save_line_plot({"a": [(0, 0.1), (100, 0.7)], "b": [(50, 0.4)]},
        ...                    os.path.join(tempfile.mkdtemp(), "nmi.png"), "steps", "NMI")
    """
    from PIL import Image, ImageDraw

    if not series or not any(series.values()):
        raise ValueError("save_line_plot needs at least one series with at least one (x, y) point")
    lo, hi = float(y_range[0]), float(y_range[1])
    if hi <= lo:
        raise ValueError(f"y_range must be (lo, hi) with hi > lo, got {y_range}")
    w, h, left, bottom, top = 760, 420, 50, 30, 10
    img = Image.new("RGB", (w + 230, h), "white")
    draw = ImageDraw.Draw(img)
    xmax = max(x for pts in series.values() for x, _ in pts)
    span = xmax if xmax > 0 else 1.0

    def xy(x: float, y: float) -> tuple[float, float]:
        return left + (w - left - 10) * x / span, top + (h - top - bottom) * (1 - (y - lo) / (hi - lo))

    for t in range(0, 11, 2):
        v = lo + (hi - lo) * t / 10
        y = xy(0, v)[1]
        draw.line([(left, y), (w - 10, y)], fill=(225, 225, 225))
        draw.text((8, y - 6), f"{v:.1f}", fill="black")
    for v in hlines:
        y = xy(0, v)[1]
        draw.line([(left, y), (w - 10, y)], fill=(120, 120, 120))
    draw.text((left, h - bottom + 8), f"{xlabel} (0 to {xmax:.6g}); {ylabel}", fill="black")
    for k, (name, points) in enumerate(series.items()):
        pts = [xy(x, y) for x, y in points]
        colour = PALETTE[k % len(PALETTE)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        elif pts:
            (px, py), = pts
            draw.ellipse([(px - 3, py - 3), (px + 3, py + 3)], fill=colour)
        draw.line([(w + 5, 20 + 16 * k), (w + 25, 20 + 16 * k)], fill=colour, width=3)
        draw.text((w + 30, 14 + 16 * k), name, fill="black")
    out = io.BytesIO()
    img.save(out, format="PNG", optimize=False)
    return atomic_write_bytes(out.getvalue(), path)
