"""PIL image -> ``uint8`` tensor (shared by the letter renderer and the image-folder reader)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from PIL import Image

def pil_to_tensor(img: Image.Image) -> Tensor:
    w, h = img.size
    c = len(img.getbands())
    t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return t.view(h, w, c)[..., 0] if c == 1 else t.view(h, w, c)
