"""``manifest.json`` of a stored top-k teacher: what the shards hold and how
to check them. Written atomically after every finished shard."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

from .._files import atomic_write

NAME = "manifest.json"
FORMAT = "kdcore-topk"
VERSION = 1
#: Settings a resumed capture must share with the one it continues.
RESUME_KEYS = ("source", "k", "temperature", "shard_tokens", "tokenizer_fingerprint", "teacher")


def fingerprint(tokens: np.ndarray) -> bytes:
    """8-byte fingerprint of one sequence's token ids (blake2b of int64 little-endian)."""
    data = np.ascontiguousarray(tokens, dtype="<i8").tobytes()
    return hashlib.blake2b(data, digest_size=8).digest()


def load(out_dir: str) -> dict[str, Any] | None:
    """The manifest in ``out_dir``, or None if there is none."""
    path = os.path.join(out_dir, NAME)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a valid manifest: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a kdcore top-k manifest (format {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise ValueError(
            f"{path} has format version {manifest.get('version')!r}; this kdcore reads {VERSION}"
        )
    _check_fields(manifest, path)
    return manifest


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_fields(manifest: dict[str, Any], path: str) -> None:
    """The fields kdcore reads have the types it expects (a clear error, not a
    KeyError deep inside); shard files are only ever ``shard-NNNNN.kdtopk``."""
    problems = []
    if not (_count(manifest.get("k")) and manifest["k"] >= 1):
        problems.append("k is not a positive int")
    temperature = manifest.get("temperature")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        problems.append("temperature is not a number")
    vocab = manifest.get("vocab_size")
    if vocab is not None and not (_count(vocab) and vocab >= 1):
        problems.append("vocab_size is not a positive int")
    if not isinstance(manifest.get("complete"), bool):
        problems.append("complete is not a bool")
    for key in ("sequences", "tokens", "rows", "shard_tokens"):
        if not _count(manifest.get(key)):
            problems.append(f"{key} is not a non-negative int")
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        problems.append("shards is not a list")
        shards = []
    for i, entry in enumerate(shards):
        if not isinstance(entry, dict) or entry.get("file") != f"shard-{i:05d}.kdtopk":
            problems.append(f"shards[{i}] is not shard-{i:05d}.kdtopk")
            continue
        for key in ("units", "sequences", "tokens", "rows", "bytes"):
            if not _count(entry.get(key)):
                problems.append(f"shard {entry['file']}: {key} is not a non-negative int")
        for key in ("sha256", "inputs_sha256"):
            if not (isinstance(entry.get(key), str) and len(entry[key]) == 64):
                problems.append(f"shard {entry['file']}: {key} is not a SHA-256 hex digest")
    if problems:
        raise ValueError(f"{path} is not a valid manifest: {'; '.join(problems[:5])}")


def save(out_dir: str, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    atomic_write(os.path.join(out_dir, NAME), lambda f: f.write(text.encode("utf-8")))


def check_resumable(out_dir: str, old: dict[str, Any], new: dict[str, Any]) -> None:
    """Raises ValueError if ``new`` settings differ from the capture in ``out_dir``."""
    diff = [
        f"{key}: {old.get(key)!r} there, {new.get(key)!r} now"
        for key in RESUME_KEYS
        if old.get(key) != new.get(key)
    ]
    if diff:
        raise ValueError(
            f"{out_dir} holds a capture with other settings ({'; '.join(diff)}): "
            "resume with the same settings, or capture into another directory"
        )
