"""Image folders (3D-Chair / UT-Zap50k style): every png/jpg/jpeg under a root as one tensor."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from ._pil import pil_to_tensor

__all__ = ["load_image_folder"]

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
        >>> from qmm_plugin.paper.data import load_image_folder, to_model_range
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
        out[i] = pil_to_tensor(im2)
    return out
