"""kdcore._files.atomic_write: whole-file replacement with the usual file mode."""

from __future__ import annotations

import os
import stat
import sys

import pytest

from kdcore._files import atomic_write

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")


@pytest.fixture
def set_umask():
    """Sets the process umask for one test and restores it afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


@posix_only
@pytest.mark.parametrize(
    ("umask", "mode"),
    [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)],
    ids=["022", "077", "002"],
)
def test_new_file_mode_follows_the_umask(tmp_path, set_umask, umask, mode):
    set_umask(umask)
    path = tmp_path / "out.bin"
    atomic_write(path, lambda f: f.write(b"data"))
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert path.read_bytes() == b"data"


@posix_only
def test_mode_matches_plain_open(tmp_path, set_umask):
    set_umask(0o027)
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"x")
    atomic = tmp_path / "atomic.bin"
    atomic_write(atomic, lambda f: f.write(b"x"))
    assert stat.S_IMODE(atomic.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o640


@posix_only
def test_an_existing_file_keeps_its_mode(tmp_path, set_umask):
    set_umask(0o022)
    path = tmp_path / "log.jsonl"
    path.write_bytes(b"old")
    path.chmod(0o640)
    atomic_write(path, lambda f: f.write(b"new"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and path.read_bytes() == b"new"


def test_replaces_existing_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "out.txt"
    path.write_bytes(b"old")
    atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_failed_write_keeps_old_file_and_removes_temp(tmp_path):
    path = tmp_path / "out.txt"
    path.write_bytes(b"old")

    def fail(f):
        f.write(b"partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(path, fail)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.txt"]
