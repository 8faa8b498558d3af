"""Durable writes of the helper's own files (/var/lib/capsuled, /var/log/capsuled's key and head).

These directories are root's alone (0700, StateDirectory=/LogsDirectory=), so plain paths are
safe here, unlike in capsule homes (capsuled.safefs). What matters is that a crash at any
instant leaves the old file or the new one, never a torn one (invariant 5): write a temporary
file, fsync it, rename it over the target, fsync the directory.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["create_file", "replace_file", "sync_dir"]


def sync_dir(path: Path) -> None:
    """fsync a directory: a rename or a new entry in it is durable only then."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes, mode: int) -> None:
    os.fchmod(fd, mode)  # whatever the umask
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def replace_file(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` atomically and durably.

    Raises:
        OSError: it could not be written (the temporary file is removed).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode)
    try:
        try:
            _write_all(fd, data, mode)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    sync_dir(path.parent)


def create_file(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Create `path` with `data` durably; never replaces an existing file (O_EXCL).

    Raises:
        FileExistsError: it exists.
        OSError: it could not be written.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, mode)
    try:
        _write_all(fd, data, mode)
    finally:
        os.close(fd)
    sync_dir(path.parent)
