"""Atomic file writes: a crash or Ctrl-C mid-write never leaves a half-written file behind.

Each function writes to a temporary file in the *same* folder as the target (so the final
``os.replace`` is an atomic rename on the same file system), flushes and fsyncs it, then
renames it over the target. On any error the temporary file is removed and the old target,
if any, is left untouched. Missing parent folders are created. The written file gets the mode a
plain ``open(path, "w")`` would give it (``0o666`` minus the process umask), not the ``0o600`` of
the temporary file. A process killed mid-write (``kill -9``, power loss) leaves its temporary file
``.NAME.XXXXXXXX.tmp`` behind; :func:`remove_stale_temp_files` deletes those.

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
import re
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

__all__ = ["atomic_torch_save", "atomic_write_text", "atomic_write_bytes", "stale_temp_files",
           "remove_stale_temp_files"]

_TEMP_SUFFIX = ".tmp"
#: ``tempfile.mkstemp(prefix=".NAME.", suffix=".tmp")`` names: 8 random characters in between
_TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")
_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask (``os.umask`` can only be read by setting it; set back at once)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=_TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
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


def stale_temp_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Temporary files that interrupted atomic writes left in ``folder``: ``.NAME.XXXXXXXX.tmp``
    next to a file ``NAME`` that this module writes (``NAME`` itself need not exist yet).

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> _ = open(os.path.join(d, ".checkpoint.pt.k2j4xq8a.tmp"), "wb").write(b"half")
        >>> [p.name for p in stale_temp_files(d)]
        ['.checkpoint.pt.k2j4xq8a.tmp']
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _TEMP_NAME.fullmatch(p.name) and p.is_file())


def remove_stale_temp_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete :func:`stale_temp_files` of ``folder``; returns the paths removed. Call it only when
    no other process writes into ``folder`` (at the start of a run), since a write in progress
    has a temporary file of the same form."""
    removed = []
    for p in stale_temp_files(folder):
        try:
            p.unlink()
        except FileNotFoundError:
            continue
        removed.append(p)
    return removed
