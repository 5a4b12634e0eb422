"""One shard file of a stored top-k teacher (all little-endian):

======  =====================  ==============================================
offset  type                   content
======  =====================  ==============================================
0       8 bytes                magic ``b"KDTOPK\\x00\\x01"`` (format version 1)
8       uint32                 header size H (64)
12      uint32                 k
16      uint64                 S, sequences in the shard
24      uint64                 N, rows in the shard (Σ (L_i - 1))
32      uint8, uint8           id bits (18), value bits (14)
34      zeros                  up to H
H       uint64 × (S + 1)       token offsets: sequence i has tokens
                               [off[i], off[i+1]), L_i >= 1
..      8 bytes × S            per-sequence input fingerprint
..      uint32 × N × k         entries (see ``codec``), row-major; sequence i's
                               rows start at row off[i] - i
======  =====================  ==============================================

Row t of a sequence is the teacher's distribution for token t + 1; the last
token has no next token in the sequence and no row.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass

import numpy as np

from .._files import atomic_write
from . import codec

MAGIC = b"KDTOPK\x00\x01"
HEADER = 64
_FIXED = struct.Struct("<8sIIQQBB")
SUFFIX = ".kdtopk"


class ShardError(ValueError):
    """A shard that is missing, truncated, corrupted or disagrees with the manifest."""


def name(index: int) -> str:
    return f"shard-{index:05d}{SUFFIX}"


@dataclass(frozen=True)
class Layout:
    """Where the parts of a shard are, from its header."""

    k: int
    sequences: int
    rows: int
    id_bits: int
    value_bits: int

    @property
    def offsets_at(self) -> int:
        return HEADER

    @property
    def fingerprints_at(self) -> int:
        return HEADER + 8 * (self.sequences + 1)

    @property
    def entries_at(self) -> int:
        return self.fingerprints_at + 8 * self.sequences

    @property
    def size(self) -> int:
        return self.entries_at + 4 * self.rows * self.k


def write(
    path: str, offsets: np.ndarray, fingerprints: bytes, words: np.ndarray
) -> tuple[int, str]:
    """Writes a shard atomically; returns (bytes, sha256 hex of the file)."""
    sequences = len(offsets) - 1
    rows, k = words.shape
    header = _FIXED.pack(MAGIC, HEADER, k, sequences, rows, codec.ID_BITS, codec.VALUE_BITS)
    parts = [
        header.ljust(HEADER, b"\0"),
        np.ascontiguousarray(offsets, dtype="<u8").tobytes(),
        fingerprints,
        np.ascontiguousarray(words, dtype="<u4").tobytes(),
    ]
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)

    def dump(f) -> None:
        for part in parts:
            f.write(part)

    atomic_write(path, dump)
    return sum(len(p) for p in parts), digest.hexdigest()


def read_layout(path: str) -> Layout:
    """The shard's header, checked against its size (a truncated shard raises)."""
    shard = os.path.basename(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(HEADER)
    except FileNotFoundError:
        raise ShardError(f"shard {shard}: missing from {os.path.dirname(path)}") from None
    if len(head) < HEADER:
        raise ShardError(f"shard {shard}: truncated ({size} bytes, shorter than its header)")
    magic, header, k, sequences, rows, ib, vb = _FIXED.unpack_from(head)
    if magic != MAGIC or header != HEADER:
        raise ShardError(f"shard {shard}: not a kdcore top-k shard of format version 1")
    if (ib, vb) != (codec.ID_BITS, codec.VALUE_BITS):
        raise ShardError(f"shard {shard}: entries of {ib} + {vb} bits; this kdcore reads 18 + 14")
    layout = Layout(k, sequences, rows, ib, vb)
    if size != layout.size:
        what = "truncated" if size < layout.size else "longer than its header says"
        raise ShardError(f"shard {shard}: {what} ({size} bytes, expected {layout.size})")
    return layout


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
