"""kdcore.offline: a teacher's top-k distributions, captured once, trained from later.

>>> kdcore.offline.capture(teacher, batches, "topk/", k=64)    # runs the teacher once
>>> data = kdcore.offline.TopKDataset("topk/", vocab_size=V, inputs=encoded_items)
>>> loader = DataLoader(data, batch_size=8, collate_fn=kdcore.agent.collate)

The format (shards of 4-byte entries plus a JSON manifest) is in docs/offline.md.
"""

from __future__ import annotations

from .capture import capture
from .codec import decode, encode
from .dataset import TopKDataset
from .fingerprint import tokenizer_fingerprint
from .serving import import_prompt_logprobs
from .shard import ShardError

__all__ = [
    "ShardError",
    "TopKDataset",
    "capture",
    "decode",
    "encode",
    "import_prompt_logprobs",
    "tokenizer_fingerprint",
]
