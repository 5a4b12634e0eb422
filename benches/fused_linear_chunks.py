"""Where the CPU fused linear + distillation loss spends its time, by chunk size.

    python benches/fused_linear_chunks.py [--threads 2] [--rounds 5] [--chunks 349,699,1024]

At 2048 rows x H 512 x V 32000 fp32 (teacher as hidden states, labels,
alpha 0.5, T 2), in one process, interleaved rounds, medians, each as a ratio
to the first:

- ``gemms``: the four GEMMs alone at full size into preallocated outputs
  (student and teacher logits, hidden-state and weight gradients), what
  ``kdcore bench --ops fused`` compares against;
- ``gemms/<c>``: the same four GEMMs in row chunks of ``c`` into reused
  buffers (what the fused loss's GEMMs cost at that chunk size);
- ``kernel``: the distillation kernel alone over the full logits;
- ``fused``: ``kdcore.fused_linear_distillation_loss`` with its default
  chunks, and ``fused/<c>`` with ``chunk_size=c``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import kdcore
from kdcore._backend import DistillArgs
from kdcore._rust import BACKEND

ROWS, HIDDEN, VOCAB, T = 2048, 512, 32000, 2.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chunks", default="349,699,1024", help="row chunk sizes")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    kdcore.set_num_threads(opts.threads)
    chunks = [int(c) for c in opts.chunks.split(",")]

    g = torch.Generator().manual_seed(0)
    h = torch.randn(ROWS, HIDDEN, generator=g).requires_grad_()
    w = (torch.randn(VOCAB, HIDDEN, generator=g) / HIDDEN**0.5).requires_grad_()
    th = torch.randn(ROWS, HIDDEN, generator=g)
    tw = torch.randn(VOCAB, HIDDEN, generator=g) / HIDDEN**0.5
    labels = torch.randint(0, VOCAB, (ROWS,), generator=g)
    hd, wd = h.detach(), w.detach()
    zs, zt = torch.empty(ROWS, VOCAB), torch.empty(ROWS, VOCAB)
    grad_logits = torch.randn(ROWS, VOCAB, generator=g)
    gh, gw = torch.empty(ROWS, HIDDEN), torch.empty(VOCAB, HIDDEN)

    def gemms():
        torch.mm(hd, wd.t(), out=zs)
        torch.mm(th, tw.t(), out=zt)
        torch.mm(grad_logits, wd, out=gh)
        torch.mm(grad_logits.t(), hd, out=gw)

    def chunked(c: int):
        def run():
            gw.zero_()
            for start in range(0, ROWS, c):
                stop = min(ROWS, start + c)
                z = torch.mm(hd[start:stop], wd.t(), out=zs[: stop - start])
                torch.mm(th[start:stop], tw.t(), out=zt[: stop - start])
                torch.mm(z, wd, out=gh[start:stop])
                gw.addmm_(z.t(), hd[start:stop])

        return run

    div_w = torch.full((ROWS,), T * T / ROWS)
    ce_w = torch.full((ROWS,), 0.5 / ROWS)

    def fused(c: int | None):
        def run():
            loss = kdcore.fused_linear_distillation_loss(
                h,
                w,
                teacher_hidden=th,
                teacher_weight=tw,
                labels=labels,
                alpha=0.5,
                temperature=T,
                chunk_size=c,
            )
            torch.autograd.grad(loss, (h, w))

        return run

    def kernel_only():
        BACKEND.distill(DistillArgs(zs, zt, div_w, T, "kl", 0.5, labels, ce_w, True, False))

    variants = {"gemms": gemms}
    variants.update({f"gemms/{c}": chunked(c) for c in chunks})
    variants["kernel"] = kernel_only
    variants["fused"] = fused(None)
    variants.update({f"fused/{c}": fused(c) for c in chunks})
    gemms()
    zt.copy_(zs * 1.1)
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(opts.rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    base = times["gemms"]
    print(f"{ROWS}x{HIDDEN}x{VOCAB} fp32, {opts.threads} threads, medians of {opts.rounds} rounds")
    for name, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, base, strict=True))
        print(f"  {name:12s} {statistics.median(ts) * 1e3:9.1f} ms   /gemms {ratio:.3f}")


if __name__ == "__main__":
    main()
