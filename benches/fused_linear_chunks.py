"""Where the CPU fused linear + distillation loss spends its time, by chunk size.

    python benches/fused_linear_chunks.py [--threads 2] [--rounds 5] [--chunks 349,699,1024]

At ``kdcore bench``'s fused case (2048 rows x H 512 x V 32000 fp32, teacher as
hidden states, labels, alpha 0.5, T 2), in one process, interleaved rounds,
medians, each as a ratio to the first:

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
from kdcore.bench import FUSED_SHAPE, TEMPERATURE, FusedCase


def chunked_gemms(case: FusedCase, chunk: int):
    """The case's four GEMMs in row chunks, each chunk's logits into the same rows
    of the preallocated outputs (reused buffers, as the fused loss uses)."""
    hd, wd = case.h.detach(), case.w.detach()
    rows = hd.shape[0]

    def run() -> None:
        case.gw.zero_()
        for start in range(0, rows, chunk):
            stop = min(rows, start + chunk)
            z = torch.mm(hd[start:stop], wd.t(), out=case.zs[: stop - start])
            torch.mm(case.th[start:stop], case.tw.t(), out=case.zt[: stop - start])
            torch.mm(z, wd, out=case.gh[start:stop])
            case.gw.addmm_(z.t(), hd[start:stop])

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chunks", default="349,699,1024", help="row chunk sizes")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    kdcore.set_num_threads(opts.threads)
    chunks = [int(c) for c in opts.chunks.split(",")]

    case = FusedCase(FUSED_SHAPE, torch.Generator().manual_seed(0))
    rows, _, _ = FUSED_SHAPE
    case.gemms()
    case.zt.copy_(case.zs * 1.1)  # (a teacher near the student, as in training)
    div_w = torch.full((rows,), TEMPERATURE**2 / rows)
    ce_w = torch.full((rows,), 0.5 / rows)
    kernel_args = DistillArgs(
        case.zs, case.zt, div_w, TEMPERATURE, "kl", 0.5, case.labels, ce_w, True, False
    )

    variants = {"gemms": case.gemms}
    variants.update({f"gemms/{c}": chunked_gemms(case, c) for c in chunks})
    variants["kernel"] = lambda: BACKEND.distill(kernel_args)
    variants["fused"] = case.fused
    variants.update({f"fused/{c}": (lambda c=c: case.fused(c)) for c in chunks})
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(opts.rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    base = times["gemms"]
    n, hidden, vocab = FUSED_SHAPE
    print(f"{n}x{hidden}x{vocab} fp32, {opts.threads} threads, medians of {opts.rounds} rounds")
    for name, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, base, strict=True))
        print(f"  {name:12s} {statistics.median(ts) * 1e3:9.1f} ms   /gemms {ratio:.3f}")


if __name__ == "__main__":
    main()
