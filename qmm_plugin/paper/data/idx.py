"""The idx file format (MNIST, EMNIST): read and write, plain or gzip-compressed."""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["read_idx", "write_idx", "parse_idx_bytes"]

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
        >>> from qmm_plugin.paper.data import read_idx
        >>> p = os.path.join(tempfile.mkdtemp(), "x-idx1-ubyte")
        >>> _ = open(p, "wb").write(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9]))
        >>> read_idx(p)
        tensor([7, 8, 9], dtype=torch.uint8)
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"idx file not found: {p}")
    return parse_idx_bytes(p.read_bytes(), str(p))


def parse_idx_bytes(raw: bytes, source: str) -> Tensor:
    """Parse the bytes of an idx file, plain or gzip-compressed; ``source`` names it in errors."""
    return _parse_idx(_maybe_gunzip(raw, source), source)


def _maybe_gunzip(raw: bytes, source: str) -> bytes:
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(
            f"{source}: looks gzip-compressed but could not be decompressed ({e}). "
            "The download is probably incomplete; re-download the file."
        ) from e


def write_idx(tensor: Tensor, path: str | os.PathLike[str], *, compress: bool | None = None) -> None:
    """Write ``tensor`` as an idx file (gzip'd if ``compress`` or the name ends in ``.gz``).

    Used by ``scripts/build_mnist_subset.py`` and the tests. gzip mtime is fixed to 0 so the
    output is byte-reproducible.
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
