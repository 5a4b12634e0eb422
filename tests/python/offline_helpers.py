"""Small teachers and batches for the kdcore.offline tests."""

from __future__ import annotations

import torch
from torch import nn

from kdcore.agent import collate


class Toy(nn.Module):
    """A tiny causal LM: embeddings, a running mean over the prefix, a head."""

    def __init__(self, vocab: int = 50, dim: int = 16, seed: int = 0, scale: float = 3.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Parameter(torch.randn(vocab, dim, generator=g))
        self.head = nn.Parameter(torch.randn(vocab, dim, generator=g) / dim**0.5)
        self.scale = scale

    def forward(self, input_ids, attention_mask=None):
        h = self.emb[input_ids]
        steps = torch.arange(1, h.shape[1] + 1, dtype=h.dtype).reshape(1, -1, 1)
        h = torch.tanh(h + h.cumsum(1) / steps)
        return self.scale * h @ self.head.T


def items(n: int, vocab: int = 50, seed: int = 0, min_len: int = 1, max_len: int = 12):
    """``n`` encoded-like items (input_ids, labels, spans) of random lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(0, vocab, (length,), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone(), "spans": torch.ones_like(ids)})
    return out


def batches(data: list, batch_size: int = 3) -> list[dict]:
    return [collate(data[i : i + batch_size]) for i in range(0, len(data), batch_size)]
