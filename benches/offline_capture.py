"""Offline teacher on the CPU: capture throughput, bytes on disk, training steps.

    python benches/offline_capture.py [--threads 2] [--vocab 32000] [--k 64]

Captures a synthetic teacher (an MLP language model, hidden 512, 4 blocks)
on random token batches with ``kdcore.offline.capture``, then times
Distiller steps of a small student trained from the shards (``TopKDataset``
+ ``collate``) against steps with the teacher model in memory (its forward
every step, dense KL). About a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import torch
from torch import nn

from kdcore import offline
from kdcore.agent import collate
from kdcore.offline import codec
from kdcore.train import Distiller, topk_logprobs


class MLPLM(nn.Module):
    """Embeddings, a causal running mean, residual MLP blocks, a vocabulary head."""

    def __init__(self, vocab: int, dim: int, blocks: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
            for _ in range(blocks)
        )
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        steps = torch.arange(1, h.shape[1] + 1, dtype=h.dtype).reshape(1, -1, 1)
        h = h + h.cumsum(1) / steps
        for block in self.blocks:
            h = h + block(h)
        return 4.0 * self.head(h)


def _items(n: int, length: int, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (length,), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone(), "spans": torch.ones_like(ids)})
    return out


def _steps(distiller: Distiller, batches, repeat: int) -> float:
    distiller.step(batches[0])  # warm-up
    start = time.perf_counter()
    for i in range(repeat):
        distiller.step(batches[(i + 1) % len(batches)])
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("KDCORE_NUM_THREADS", str(args.threads))

    teacher = MLPLM(args.vocab, 512, 4, seed=0).eval().requires_grad_(False)
    items = _items(args.sequences, args.length, args.vocab)
    batches = [collate(items[i : i + args.batch]) for i in range(0, len(items), args.batch)]
    tokens = args.sequences * args.length
    out = tempfile.mkdtemp(prefix="kdcore-offline-bench-")
    try:
        # Teacher forward alone, to split the capture time.
        start = time.perf_counter()
        with torch.no_grad():
            for b in batches:
                teacher(b["input_ids"])
        forward_s = time.perf_counter() - start
        # Top-k and encoding alone, on one batch's logits.
        with torch.no_grad():
            logits = teacher(batches[0]["input_ids"]).reshape(-1, args.vocab)
        start = time.perf_counter()
        ids, lps = topk_logprobs(logits, args.k)
        topk_s = time.perf_counter() - start
        start = time.perf_counter()
        codec.encode(ids, lps, args.vocab)
        encode_s = time.perf_counter() - start
        rows = logits.shape[0]

        start = time.perf_counter()
        manifest = offline.capture(
            teacher, batches, out, k=args.k, shard_tokens=tokens // 4, progress=False
        )
        capture_s = time.perf_counter() - start
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
        print(
            f"capture: {tokens} tokens, V = {args.vocab}, k = {args.k}, "
            f"{len(manifest['shards'])} shards, {args.threads} threads"
        )
        print(f"  capture throughput      {tokens / capture_s:10.0f} tokens/s ({capture_s:.2f} s)")
        print(f"  teacher forward alone   {tokens / forward_s:10.0f} tokens/s")
        print(f"  top-k of the logits     {rows / topk_s:10.0f} tokens/s")
        print(f"  encoding the entries    {rows * args.k / encode_s:10.0f} entries/s")
        print(
            f"  on disk                 {size / tokens:10.1f} bytes/token, "
            f"{size / (tokens * args.k):.4f} bytes/entry (all files)"
        )
        print(f"  bf16 logits would be    {2 * args.vocab:10d} bytes/token")

        data = offline.TopKDataset(out, vocab_size=args.vocab, k=args.k, inputs=items)
        loader = torch.utils.data.DataLoader(data, batch_size=args.batch, collate_fn=collate)
        from_shards = list(loader)[: args.steps + 1]
        in_memory = batches[: args.steps + 1]

        def distiller(with_teacher: bool) -> Distiller:
            student = MLPLM(args.vocab, 128, 1, seed=1)
            opt = torch.optim.SGD(student.parameters(), lr=1e-3)
            return Distiller(student, teacher if with_teacher else None, opt, loss="token")

        shard_step = _steps(distiller(False), from_shards, args.steps)
        teacher_step = _steps(distiller(True), in_memory, args.steps)
        start = time.perf_counter()
        for _ in loader:
            pass
        load_s = (time.perf_counter() - start) / len(loader)
        params = sum(p.numel() for p in teacher.parameters())
        print(f"training step (student hidden 128, batch {args.batch} x {args.length}):")
        print(
            f"  from shards (sparse KL)        {shard_step * 1e3:8.1f} ms "
            f"(+ {load_s * 1e3:.1f} ms to load and collate a batch)"
        )
        print(
            f"  teacher in memory (dense KL)   {teacher_step * 1e3:8.1f} ms "
            f"(teacher: {params / 1e6:.1f}M parameters held)"
        )
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
