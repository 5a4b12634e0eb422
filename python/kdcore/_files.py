"""Atomic file writes: a crash mid-write never leaves a half-written file."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
import time
from collections.abc import Callable
from typing import BinaryIO

try:  # POSIX: a writer holds a lock on its temporary file while it writes
    import fcntl
except ImportError:  # pragma: no cover (Windows)
    fcntl = None  # type: ignore[assignment]

# Like open(path, "wb"): new files get 0o666 less the umask (the kernel applies
# it), not tempfile.mkstemp's private 0o600.
_NEW_FILE_MODE = 0o666
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
_NAME_ATTEMPTS = 100
#: A temporary file this old whose writer holds no lock is left over from a
#: killed write. (The age covers the instant between creating a file and locking it.)
_STALE_AFTER_S = 5.0


def _create_temp(directory: str, basename: str) -> tuple[int, str]:
    """Creates a new, uniquely named file in ``directory``; returns (fd, path).

    O_EXCL makes the name ours alone (no race with another writer, no
    following a planted symlink); a name clash just draws another name.
    """
    for _ in range(_NAME_ATTEMPTS):
        tmp = os.path.join(directory, f".{basename}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, _OPEN_FLAGS, _NEW_FILE_MODE)
        except FileExistsError:
            continue
        if fcntl is not None:  # released by the kernel when the writer dies
            # (A file system without locks: the file then never looks stale.)
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd, tmp
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


def _temp_pattern(basename: str) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(basename)}\.[0-9a-f]{{12}}\.tmp")


def remove_stale_temps(path: str | os.PathLike) -> list[str]:
    """Removes the temporary files :func:`atomic_write` left next to ``path`` when
    a write was killed (``kill -9``, power loss); returns their paths.

    A temporary file is stale when no live writer holds its lock (POSIX; the
    kernel drops the lock of a dead process) and it is a few seconds old;
    without file locks (Windows), when it was not modified for an hour.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    pattern = _temp_pattern(os.path.basename(path))
    try:
        names = [n for n in os.listdir(directory) if pattern.fullmatch(n)]
    except OSError:
        return []
    removed = []
    for name in names:
        tmp = os.path.join(directory, name)
        with contextlib.suppress(OSError):
            if _is_stale(tmp):
                os.unlink(tmp)
                removed.append(tmp)
    return removed


def _is_stale(tmp: str) -> bool:
    age = time.time() - os.stat(tmp).st_mtime
    if fcntl is None:
        return age > 3600.0
    if age < _STALE_AFTER_S:
        return False
    fd = os.open(tmp, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # a live writer holds it
    finally:
        os.close(fd)  # (drops the lock we may hold)
    return True
