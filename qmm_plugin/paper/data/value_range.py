"""The value range the models consume: ``uint8`` images <-> ``float32`` ``(N, C, H, W)`` in [-1, 1]."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["to_model_range", "to_uint8"]

def to_model_range(images_uint8: Tensor) -> Tensor:
    """Convert ``uint8`` images to ``float32`` ``(N, C, H, W)`` in ``[-1, 1]``.

    Accepted layouts: ``(N, H, W)`` grey -> ``(N, 1, H, W)``; ``(N, H, W, 3)`` RGB (or
    ``(N, H, W, 1)``) -> ``(N, 3, H, W)``; a single ``(H, W)`` image -> ``(1, 1, H, W)``.
    Mapping: ``x / 127.5 - 1`` (0 -> -1, 255 -> 1).

    Example:
        >>> import torch
        >>> from qmm_plugin.paper.data import to_model_range
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
        >>> from qmm_plugin.paper.data import to_uint8
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
