"""Atomic file writes: the one helper every output of this project goes through.

A file is written to a temporary file in its destination folder (same suffixes, so that writers that pick a
format from the name keep working), then renamed over the final name with ``os.replace``. Readers see
either the previous file or the complete new one; a write interrupted at any moment (exception, kill) leaves
no file under the final name, and the temporary file is removed on an exception.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "file_mode", "temporary_sibling"]


def file_mode() -> int:
    """Permissions of a new ordinary file under the process's umask (``0o666 & ~umask``, 0o644 under umask 022).

    ``mkstemp`` creates its files readable by their owner only; outputs get the mode ``open()`` would give them.
    """
    try:
        with open("/proc/self/status") as status:  # Linux: read the umask without changing it
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)  # elsewhere: read it by setting it, then restore it at once
    os.umask(umask)
    return 0o666 & ~umask


def temporary_sibling(path: str | os.PathLike) -> Path:
    """Create and return an empty, uniquely named temporary file next to ``path`` with the same suffixes.

    Its name starts with ``.`` and the stem of ``path``, so leftovers of a killed process are recognisable.
    The caller renames it over ``path`` (``os.replace``) when complete, or deletes it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{stem}-", suffix=f".partial{suffix}")
    os.close(fd)
    return Path(tmp)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(temporary_path)`` to write the file, then rename it to ``path``; returns ``path``.

    ``temporary_path`` lies in the folder of ``path`` (created if missing) and ends with the same suffixes.
    """
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns ``path``."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding=encoding))
