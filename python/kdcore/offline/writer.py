"""Writes shards and the manifest; resumes after the shards a previous run finished.

Work comes in units (a batch of a capture, one sequence of an import). A
shard is closed after the unit that brings it to ``shard_tokens`` tokens, so
shard boundaries depend only on the units: a resumed run writes the same
shards as an uninterrupted one. The manifest records, per shard, how many
units it holds and a hash of their inputs, so a resumed run skips those units
without computing them and detects inputs that differ from the first run.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..train.progress import progress_bar
from . import codec, shard
from . import manifest as _manifest


@dataclass
class Unit:
    """Token arrays (1-D int64, one per sequence, each of length >= 1) and how to
    get their rows: ``compute()`` -> (ids, logprobs, vocab_size), (Σ (L_i - 1), k)
    in sequence order."""

    sequences: list[np.ndarray]
    compute: Callable[[], tuple[torch.Tensor, torch.Tensor, int]]


def _inputs_hash(sequences: Iterable[np.ndarray], h: Any) -> None:
    for tokens in sequences:
        h.update(len(tokens).to_bytes(8, "little"))
        h.update(_manifest.fingerprint(tokens))


def _clean_temporaries(out_dir: str) -> None:
    """Temporary files a killed writer left behind (only our own names)."""
    for entry in os.listdir(out_dir):
        ours = entry.startswith((".shard-", f".{_manifest.NAME}."))
        if ours and entry.endswith(".tmp"):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(out_dir, entry))


def run(
    out_dir: str | os.PathLike,
    units: Iterable[Unit],
    settings: dict[str, Any],
    *,
    total: int | None,
    progress: bool,
    description: str,
) -> dict[str, Any]:
    """Resumes or starts the capture ``settings`` describes; returns the manifest."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    _clean_temporaries(out_dir)
    old = _manifest.load(out_dir)
    if old is not None:
        _manifest.check_resumable(out_dir, old, settings)
        state = _keep_intact(out_dir, old)
    else:
        state = {
            "format": _manifest.FORMAT,
            "version": _manifest.VERSION,
            **settings,
            "vocab_size": None,
            "id_bits": codec.ID_BITS,
            "value_bits": codec.VALUE_BITS,
            "complete": False,
            "sequences": 0,
            "tokens": 0,
            "rows": 0,
            "shards": [],
        }
    bar = progress_bar(total, 0, description, progress, unit="batch")
    try:
        iterator = iter(units)
        _skip_done(out_dir, state, iterator, bar)
        if state["complete"]:
            if next(iterator, None) is not None:
                raise ValueError(
                    f"the capture in {out_dir} is complete, but these inputs go on beyond "
                    f"its {sum(s['units'] for s in state['shards'])} units: capture into "
                    "another directory"
                )
            return state
        _write_rest(out_dir, state, iterator, bar)
    finally:
        bar.close()
    return state


def _keep_intact(out_dir: str, state: dict) -> dict:
    """Drops the first shard whose file is missing, truncated or changed, and every
    shard after it, from the manifest: they are captured again."""
    for i, entry in enumerate(state["shards"]):
        path = os.path.join(out_dir, entry["file"])
        try:
            intact = (
                os.path.getsize(path) == entry["bytes"] and shard.sha256(path) == entry["sha256"]
            )
        except FileNotFoundError:
            intact = False
        if not intact:
            kept = state["shards"][:i]
            state.update(
                shards=kept,
                complete=False,
                sequences=sum(e["sequences"] for e in kept),
                tokens=sum(e["tokens"] for e in kept),
                rows=sum(e["rows"] for e in kept),
            )
            break
    return state


def _skip_done(out_dir: str, state: dict, iterator, bar) -> None:
    for entry in state["shards"]:
        h = hashlib.sha256()
        for i in range(entry["units"]):
            unit = next(iterator, None)
            if unit is None:
                raise ValueError(
                    f"resuming in {out_dir}: shard {entry['file']} holds {entry['units']} units "
                    f"of input, but the inputs end after {i} of them: these are not the "
                    "inputs of the interrupted capture"
                )
            _inputs_hash(unit.sequences, h)
            bar.update(1)
        if h.hexdigest() != entry["inputs_sha256"]:
            raise ValueError(
                f"resuming in {out_dir}: the inputs of shard {entry['file']} differ from the "
                "ones it was captured from (other batches, order or padding): resume with "
                "the same inputs, or capture into another directory"
            )


class _Buffer:
    """The shard being filled."""

    def __init__(self) -> None:
        self.offsets = [0]
        self.fingerprints: list[bytes] = []
        self.words: list[np.ndarray] = []
        self.units = 0
        self.hash = hashlib.sha256()

    @property
    def tokens(self) -> int:
        return self.offsets[-1]

    def add(self, unit: Unit, words: np.ndarray) -> None:
        for tokens in unit.sequences:
            self.offsets.append(self.offsets[-1] + len(tokens))
            self.fingerprints.append(_manifest.fingerprint(tokens))
        _inputs_hash(unit.sequences, self.hash)
        self.words.append(words)
        self.units += 1


def _write_rest(out_dir: str, state: dict, iterator, bar) -> None:
    buf = _Buffer()
    for unit in iterator:
        ids, lps, vocab = unit.compute()
        _set_vocab(state, vocab)
        rows = sum(len(t) - 1 for t in unit.sequences)
        if ids.shape != (rows, state["k"]) or lps.shape != ids.shape:
            raise RuntimeError(
                f"a unit of {rows} rows gave top-k of shape {tuple(ids.shape)}, "
                f"{tuple(lps.shape)}; expected ({rows}, {state['k']})"
            )
        buf.add(unit, codec.encode(ids, lps, state["vocab_size"]))
        bar.update(1)
        if buf.tokens >= state["shard_tokens"]:
            _flush(out_dir, state, buf)
            buf = _Buffer()
    if buf.units:
        _flush(out_dir, state, buf)
    state["complete"] = True
    _manifest.save(out_dir, state)


def _set_vocab(state: dict, vocab: int) -> None:
    if state["vocab_size"] is None:
        codec.check_vocab(vocab)
        state["vocab_size"] = vocab
    elif state["vocab_size"] != vocab:
        raise ValueError(
            f"the teacher's vocabulary has {vocab} tokens, but the capture being resumed "
            f"has {state['vocab_size']}: not the same teacher"
        )


def _flush(out_dir: str, state: dict, buf: _Buffer) -> None:
    index = len(state["shards"])
    file = shard.name(index)
    words = np.concatenate(buf.words) if buf.words else np.zeros((0, state["k"]), "<u4")
    size, digest = shard.write(
        os.path.join(out_dir, file),
        np.asarray(buf.offsets, dtype=np.uint64),
        b"".join(buf.fingerprints),
        words,
    )
    sequences = len(buf.offsets) - 1
    state["shards"].append(
        {
            "file": file,
            "units": buf.units,
            "sequences": sequences,
            "tokens": buf.tokens,
            "rows": int(words.shape[0]),
            "bytes": size,
            "sha256": digest,
            "inputs_sha256": buf.hash.hexdigest(),
        }
    )
    state["sequences"] += sequences
    state["tokens"] += buf.tokens
    state["rows"] += int(words.shape[0])
    _manifest.save(out_dir, state)  # after the shard: a listed shard is always complete
