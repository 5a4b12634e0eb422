"""Atomic file writes: a crash mid-write never leaves a half-written file."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Callable
from typing import BinaryIO

# Like open(path, "wb"): new files get 0o666 less the umask (the kernel applies
# it), not tempfile.mkstemp's private 0o600.
_NEW_FILE_MODE = 0o666
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
_NAME_ATTEMPTS = 100


def _create_temp(directory: str, basename: str) -> tuple[int, str]:
    """Creates a new, uniquely named file in ``directory``; returns (fd, path).

    O_EXCL makes the name ours alone (no race with another writer, no
    following a planted symlink); a name clash just draws another name.
    """
    for _ in range(_NAME_ATTEMPTS):
        tmp = os.path.join(directory, f".{basename}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, _OPEN_FLAGS, _NEW_FILE_MODE), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name for {basename!r} in {directory!r}")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Calls ``write(f)`` on a temporary file in ``path``'s directory, then renames it.

    The rename (``os.replace``) is atomic on POSIX and Windows file systems, so
    readers see the old file or the new one; on any failure the temporary
    file is removed and the old file is untouched. The directory must exist.
    The file's mode is what ``open(path, "wb")`` would leave: an existing
    file's own mode, else 0o666 less the umask.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = _create_temp(directory, os.path.basename(path))
    try:
        with contextlib.suppress(FileNotFoundError):
            os.chmod(fd, stat.S_IMODE(os.stat(path).st_mode))
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
