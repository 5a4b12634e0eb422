"""``TopKDataset``: a stored top-k teacher as a map-style dataset."""

from __future__ import annotations

import bisect
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from . import codec, shard
from . import manifest as _manifest
from .shard import ShardError

#: Shards kept memory-mapped at once (the least recently read is closed first).
MAX_OPEN_SHARDS = 64


class TopKDataset(torch.utils.data.Dataset):
    """Sequence ``i`` of a capture as ``{"teacher_ids": (L, k) int32,
    "teacher_logprobs": (L, k) float32}``, in capture order.

    Shards are memory-mapped when first read; an item decodes only its own
    rows (O(1) random access). Row t is the teacher's distribution for
    token t + 1; the last row, which no token of the sequence follows, is
    not stored and comes back as ids 0..k-1 with log-probability -inf (the
    losses never read it: its label lies beyond the sequence).

    Checks: every shard's size and header against the manifest when the
    dataset is built, its SHA-256 when it is first read (``verify=False``
    skips that; :meth:`verify` checks every shard now) — a mismatch raises
    :class:`ShardError` naming the shard. ``vocab_size``, ``k``,
    ``temperature`` and ``tokenizer_fingerprint``, when given, must match
    the capture's (what the student expects). With ``inputs`` (a sequence
    of dicts or ``kdcore.agent.Encoded`` items, one per captured sequence),
    item i is ``inputs[i]`` with the teacher added, ready for
    :func:`kdcore.agent.collate`; its ``input_ids`` must be the tokens the
    teacher saw (checked against a stored fingerprint).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        vocab_size: int | None = None,
        k: int | None = None,
        temperature: float | None = None,
        tokenizer_fingerprint: str | None = None,
        inputs: Sequence[Any] | None = None,
        verify: bool = True,
    ) -> None:
        self.out_dir = os.fspath(out_dir)
        manifest = _manifest.load(self.out_dir)
        if manifest is None:
            raise FileNotFoundError(f"{self.out_dir} has no {_manifest.NAME}: not a capture")
        if not manifest.get("complete"):
            raise ValueError(
                f"the capture in {self.out_dir} is not complete ({len(manifest['shards'])} "
                "shards so far): run capture() again with the same batches to finish it"
            )
        self.manifest = manifest
        self.k = int(manifest["k"])
        self.vocab_size = manifest["vocab_size"]
        self.temperature = float(manifest["temperature"])
        self._expect("vocab_size", vocab_size, self.vocab_size)
        self._expect("k", k, self.k)
        self._expect("temperature", temperature, self.temperature)
        self._expect(
            "tokenizer_fingerprint", tokenizer_fingerprint, manifest.get("tokenizer_fingerprint")
        )
        self._verify = bool(verify)
        self._entries = manifest["shards"]
        self._layouts = [self._check_layout(e) for e in self._entries]
        self._starts = np.cumsum([0] + [e["sequences"] for e in self._entries]).tolist()
        if self._starts[-1] != manifest["sequences"]:
            raise ValueError(
                f"{self.out_dir}/{_manifest.NAME}: its shards hold {self._starts[-1]} "
                f"sequences, but it says {manifest['sequences']}"
            )
        if inputs is not None and len(inputs) != len(self):
            raise ValueError(
                f"inputs has {len(inputs)} items, but the capture holds {len(self)} sequences"
            )
        self.inputs = inputs
        self._open: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._verified: set[int] = set()

    def _expect(self, name: str, wanted: Any, stored: Any) -> None:
        if wanted is not None and wanted != stored:
            raise ValueError(
                f"the capture in {self.out_dir} has {name} = {stored!r}, but {wanted!r} is "
                "expected: it was captured for another student setup (re-capture, or fix the "
                f"expected {name})"
            )

    def _check_layout(self, entry: Mapping[str, Any]) -> shard.Layout:
        path = os.path.join(self.out_dir, entry["file"])
        layout = shard.read_layout(path)
        found = (layout.k, layout.sequences, layout.rows, layout.size)
        listed = (self.k, entry["sequences"], entry["rows"], entry["bytes"])
        if found != listed:
            raise ShardError(
                f"shard {entry['file']}: its header (k, sequences, rows, bytes) "
                f"= {found} disagrees with the manifest's {listed}"
            )
        return layout

    def __len__(self) -> int:
        return self._starts[-1]

    def verify(self) -> None:
        """Checks every shard's SHA-256 now (ShardError naming the first bad one)."""
        for index in range(len(self._entries)):
            self._check_sum(index)

    def _check_sum(self, index: int) -> None:
        if index in self._verified:
            return
        entry = self._entries[index]
        if shard.sha256(os.path.join(self.out_dir, entry["file"])) != entry["sha256"]:
            raise ShardError(
                f"shard {entry['file']}: its SHA-256 does not match the manifest (the file "
                "is corrupted or was changed after the capture)"
            )
        self._verified.add(index)

    def _shard(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token offsets, fingerprints, entries) of a shard, memory-mapped."""
        if index in self._open:
            self._open[index] = self._open.pop(index)  # most recently used last
        else:
            if len(self._open) >= MAX_OPEN_SHARDS:  # each map holds a file descriptor
                del self._open[next(iter(self._open))]
            if self._verify:
                self._check_sum(index)
            entry, layout = self._entries[index], self._layouts[index]
            path = os.path.join(self.out_dir, entry["file"])
            data = np.memmap(path, dtype=np.uint8, mode="r")
            offsets = data[layout.offsets_at : layout.fingerprints_at].view("<u8")
            prints = data[layout.fingerprints_at : layout.entries_at].view("V8")
            words = data[layout.entries_at :].view("<u4").reshape(layout.rows, layout.k)
            lengths = np.diff(offsets.astype(np.int64))
            if (
                offsets[0] != 0
                or int(offsets[-1]) != entry["tokens"]
                or (lengths < 1).any()
                or int(offsets[-1]) - layout.sequences != layout.rows
            ):
                raise ShardError(
                    f"shard {entry['file']}: its sequence offsets disagree with its "
                    "rows and the manifest's token count"
                )
            self._open[index] = (offsets, prints, words)
        return self._open[index]

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self)
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"TopKDataset index must be an int, got {type(i).__name__}")
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} sequences")
        i = int(i) % n
        index = bisect.bisect_right(self._starts, i) - 1
        j = i - self._starts[index]
        offsets, prints, words = self._shard(index)
        start, stop = int(offsets[j]), int(offsets[j + 1])
        first_row = start - j
        ids, lps = codec.decode(words[first_row : first_row + stop - start - 1])
        pad_ids = torch.arange(self.k, dtype=torch.int32).unsqueeze(0)
        item = {
            "teacher_ids": torch.cat([ids, pad_ids]),
            "teacher_logprobs": torch.cat([lps, torch.full((1, self.k), -torch.inf)]),
        }
        if self.inputs is None:
            return item
        return self._merge(i, item, stop - start, bytes(prints[j]))

    def _merge(self, i: int, item: dict, length: int, fingerprint: bytes) -> dict[str, Any]:
        source = self.inputs[i]
        data = source.to_dict() if hasattr(source, "to_dict") else dict(source)
        tokens = torch.as_tensor(data["input_ids"]).reshape(-1)
        if tokens.numel() != length or _manifest.fingerprint(tokens.numpy()) != fingerprint:
            raise ValueError(
                f"inputs[{i}]: its input_ids ({tokens.numel()} tokens) are not the "
                f"{length} tokens the teacher saw for sequence {i}: the inputs are not "
                "in capture order, or were tokenized differently"
            )
        data.update(item)
        return data

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = {}  # memory maps are reopened in the worker
        return state
