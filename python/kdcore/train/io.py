"""Atomic checkpoint files and the JSONL training log."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from .._files import atomic_write, remove_stale_temps

#: Appended after torch.save's bytes (torch.load ignores it): a tag, the
#: SHA-256 of those bytes and their length.
_TRAILER = struct.Struct("<8s32sQ")
_TAG = b"KDCKSUM1"
_READ_CHUNK = 16 << 20
#: What torch.load raises on a file that is not a complete checkpoint.
_UNREADABLE = (
    RuntimeError,
    pickle.UnpicklingError,
    EOFError,
    zipfile.BadZipFile,
    ValueError,
    KeyError,
    IndexError,
    struct.error,
    OSError,
)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file."""


class _HashingWriter:
    """A write-only file object that hashes and counts what passes through it."""

    def __init__(self, f) -> None:
        self.f, self.hash, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same directory, then rename:
    a crash mid-write leaves the previous file intact. A SHA-256 of the
    contents goes at the end (checked by :func:`load_checkpoint`); temporary
    files of earlier killed writes to ``path`` are removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)

    def write(f) -> None:
        out = _HashingWriter(f)
        torch.save(obj, out)
        f.write(_TRAILER.pack(_TAG, out.hash.digest(), out.size))

    try:
        atomic_write(path, write)
    except (OSError, RuntimeError) as exc:  # torch reports a full disk as RuntimeError
        message = (
            f"could not write checkpoint {path}: {_first_line(exc)} (is the disk full or the "
            "directory read-only?); the previous checkpoint, if any, is untouched"
        )
        if isinstance(exc, OSError):  # keeps its type (and errno: ENOSPC, EACCES, ...)
            raise OSError(exc.errno, message) from exc
        raise CheckpointError(message) from exc


def verify_checkpoint(path: str | os.PathLike) -> bool:
    """Checks ``path``'s stored SHA-256; False for a file without one (written by an
    older kdcore), :class:`CheckpointError` naming the file if it does not match."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): it was never written")
    if size < _TRAILER.size:
        return False
    with open(path, "rb") as f:
        f.seek(size - _TRAILER.size)
        tag, digest, length = _TRAILER.unpack(f.read(_TRAILER.size))
        if tag != _TAG:
            return False
        if length != size - _TRAILER.size:
            raise CheckpointError(
                f"checkpoint {path} is damaged: {size - _TRAILER.size} bytes of data where "
                f"{length} were written (truncated or appended to)"
            )
        f.seek(0)
        h, left = hashlib.sha256(), length
        while left:
            chunk = f.read(min(left, _READ_CHUNK))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    if h.digest() != digest:
        raise CheckpointError(
            f"checkpoint {path} is corrupted: its contents do not match the SHA-256 stored "
            "when it was written (a damaged disk or an incomplete copy); resume from "
            "another checkpoint"
        )
    return True


def load_checkpoint(path: str | os.PathLike, map_location=None) -> dict:
    """Loads a checkpoint written by :func:`atomic_save` (tensors and plain data only),
    after checking its SHA-256. Raises :class:`CheckpointError` naming the file for a
    corrupted, truncated or unreadable one (FileNotFoundError if it does not exist)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    remove_stale_temps(path)
    if not verify_checkpoint(path):
        warnings.warn(
            f"checkpoint {path} carries no checksum (written by kdcore 0.1 or by plain "
            "torch.save, or bytes were appended to it): it loads unverified",
            stacklevel=2,
        )
    try:
        # Optimizer and RNG states are plain containers of tensors and numbers.
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except _UNREADABLE as exc:
        raise CheckpointError(
            f"checkpoint {path} cannot be read: it is not a complete checkpoint (truncated, "
            f"overwritten or another kind of file); torch.load said {type(exc).__name__}: "
            f"{_first_line(exc)}"
        ) from exc
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(obj).__name__}, not the dict kdcore writes"
        )
    return obj


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


class JsonlLog:
    """Appends one JSON object per line and flushes it (a crash loses nothing written).

    With ``after_step=n``, an existing file is first cut back: records of
    steps ``> n`` (a run resumed from step ``n`` writes them again) and lines
    that are not JSON (one cut short by a crash) are appended to
    ``<path>.discarded`` rather than lost; other records stay. (The file is
    replaced, so another process still appending to it is not followed.)
    """

    def __init__(self, path: str | os.PathLike, *, after_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if after_step is not None and self.path.exists():
            _cut_back(self.path, after_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write(self, record: dict[str, Any]) -> None:
        clean = {str(k): _jsonable(v) for k, v in record.items()}
        self._file.write(json.dumps(clean, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _keeps(line: str, last_step: int) -> bool:
    """A JSON line stays unless it is the record of a step after ``last_step``."""
    try:
        record = json.loads(line)
    except ValueError:
        return False
    step = record.get("step") if isinstance(record, dict) else None
    return not (isinstance(step, int) and step > last_step)


def _cut_back(path: Path, last_step: int) -> None:
    """Keeps the lines :func:`_keeps` keeps; the rest go to ``<path>.discarded``."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept, dropped = [], []
    for line in lines:
        (kept if _keeps(line, last_step) else dropped).append(line)
    if not dropped:
        return
    with open(path.with_name(path.name + ".discarded"), "a", encoding="utf-8") as f:
        f.writelines(x if x.endswith("\n") else x + "\n" for x in dropped)
    text = "".join(kept)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
