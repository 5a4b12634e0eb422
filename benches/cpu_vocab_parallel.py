"""Cost of ``vocab_parallel`` on one process (CPU): the fused linear loss with
gradients, plain vs ``VocabParallel(0, V)`` without a process group (the
plain path after the shard checks) vs the sharded arithmetic forced there.

    python benches/cpu_vocab_parallel.py [--rows 1024] [--hidden 512] [--vocab 32000] [--reps 5]

Plain and VocabParallel run interleaved; each reports its fastest run (the
least disturbed by other work on a shared machine) and the ratio to plain.
"""

from __future__ import annotations

import argparse
import time

import torch

import kdcore
from kdcore.ops import vocab_parallel as vp_module


def fastest(fns: list, reps: int) -> list[float]:
    """The fastest of ``reps`` interleaved runs of each function, in seconds."""
    for fn in fns:
        fn()  # warm-up
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    h = torch.randn(args.rows, args.hidden, generator=g).requires_grad_()
    w = (torch.randn(args.vocab, args.hidden, generator=g) / args.hidden**0.5).requires_grad_()
    th = torch.randn(args.rows, args.hidden, generator=g)
    tw = torch.randn(args.vocab, args.hidden, generator=g) / args.hidden**0.5
    labels = torch.randint(0, args.vocab, (args.rows,), generator=g)

    def run(vp):
        loss = kdcore.fused_linear_distillation_loss(
            h,
            w,
            teacher_hidden=th,
            teacher_weight=tw,
            labels=labels,
            alpha=0.3,
            temperature=2.0,
            vocab_parallel=vp,
        )
        return torch.autograd.grad(loss, (h, w))

    whole = kdcore.VocabParallel(0, args.vocab)
    plain, routed = fastest([lambda: run(None), lambda: run(whole)], args.reps)
    vp_module.PLAIN_PATH_AT_SIZE_ONE = False
    try:
        (sharded,) = fastest([lambda: run(whole)], max(1, args.reps // 3))
    finally:
        vp_module.PLAIN_PATH_AT_SIZE_ONE = True
    shape = f"{args.rows} x {args.hidden} x {args.vocab}, fp32, {torch.get_num_threads()} threads"
    print(f"fused linear loss + gradients, {shape}")
    for name, t in (
        ("plain", plain),
        ("VocabParallel(0, V), one process", routed),
        ("sharded arithmetic forced", sharded),
    ):
        print(f"  {name:<34} {t * 1e3:9.1f} ms  {t / plain:5.2f}x plain")


if __name__ == "__main__":
    main()
