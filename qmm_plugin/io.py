"""Atomic file writes: a crash or Ctrl-C mid-write never leaves a half-written file behind.

Each function writes to a temporary file in the *same* folder as the target (so the final
``os.replace`` is an atomic rename on the same file system), flushes and fsyncs it, then
renames it over the target. On any error the temporary file is removed and the old target,
if any, is left untouched. Missing parent folders are created.

Example:
    >>> import tempfile, os, torch
    >>> from qmm_plugin.io import atomic_torch_save, atomic_write_text
    >>> d = tempfile.mkdtemp()
    >>> _ = atomic_torch_save({"step": 3}, os.path.join(d, "ckpt.pt"))
    >>> torch.load(os.path.join(d, "ckpt.pt"))["step"]
    3
    >>> _ = atomic_write_text("done\\n", os.path.join(d, "status.txt"))
    >>> sorted(os.listdir(d))
    ['ckpt.pt', 'status.txt']
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

__all__ = ["atomic_torch_save", "atomic_write_text", "atomic_write_bytes"]


def _atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return target


def atomic_write_bytes(data: bytes, path: str | os.PathLike[str]) -> Path:
    """Atomically write ``data`` to ``path``; returns the path.

    Example:
        >>> import tempfile, os
        >>> p = atomic_write_bytes(b"abc", os.path.join(tempfile.mkdtemp(), "x.bin"))
        >>> p.read_bytes()
        b'abc'
    """
    return _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(text: str, path: str | os.PathLike[str], encoding: str = "utf-8") -> Path:
    """Atomically write ``text`` to ``path``; returns the path.

    Example:
        >>> import tempfile, os
        >>> atomic_write_text("hi", os.path.join(tempfile.mkdtemp(), "a.txt")).read_text()
        'hi'
    """
    return _atomic_write(path, lambda f: f.write(text.encode(encoding)))


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj, path)``, atomically (temp file in the same folder + ``os.replace``).

    Example:
        >>> import tempfile, os, torch
        >>> p = atomic_torch_save(torch.arange(3), os.path.join(tempfile.mkdtemp(), "t.pt"))
        >>> torch.load(p)
        tensor([0, 1, 2])
    """
    return _atomic_write(path, lambda f: torch.save(obj, f))
