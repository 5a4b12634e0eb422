"""Peak memory and time of the fused linear + distillation loss on the CPU.

Runs each variant in its own process (peak RSS is per process) at the issue's
shape, 2048 rows x H 512 x V 32000 fp32, alpha 0.5, T 2:

    python benches/cpu_fused_linear_memory.py          # all four variants
    python benches/cpu_fused_linear_memory.py fused peak|time   # one number, one variant

fused: kdcore.fused_linear_distillation_loss (row chunks); fused_vocab: the same
with chunk_over="vocab"; unfused_kdcore: logits, then
kdcore.distillation_loss; unfused_eager: logits, then the plain PyTorch formula.

The peak (first forward + backward) is measured in a child run with
MALLOC_MMAP_THRESHOLD_=1048576 (unless set): buffers of 1 MiB and more get
their own mappings and go back to the system when freed, so the peak is the
memory the variant holds at once. Times (median of 5 after a warm-up) come
from another child with the default allocator. With glibc's default (a
threshold that grows to 32 MiB), freed 10-30 MiB temporaries stay in the heap
and the peak RSS of one variant varied 150-920 MiB between identical runs.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ("fused", "fused_vocab", "unfused_kdcore", "unfused_eager")


def measure(variant: str, what: str) -> None:
    import torch
    import torch.nn.functional as F

    import kdcore

    torch.set_num_threads(2)
    kdcore.set_num_threads(2)
    torch.manual_seed(0)
    n, hidden, vocab, temp = 2048, 512, 32000, 2.0
    h = torch.randn(n, hidden, requires_grad=True)
    w = (torch.randn(vocab, hidden) / hidden**0.5).requires_grad_()
    th, tw = torch.randn(n, hidden), torch.randn(vocab, hidden) / hidden**0.5
    labels = torch.randint(0, vocab, (n,))

    def fused():
        return kdcore.fused_linear_distillation_loss(
            h, w, teacher_hidden=th, teacher_weight=tw, labels=labels, alpha=0.5, temperature=temp
        )

    def fused_vocab():
        return kdcore.fused_linear_distillation_loss(
            h,
            w,
            teacher_hidden=th,
            teacher_weight=tw,
            labels=labels,
            alpha=0.5,
            temperature=temp,
            chunk_over="vocab",
        )

    def unfused_kdcore():
        with torch.no_grad():
            zt = th @ tw.t()
        return kdcore.distillation_loss(h @ w.t(), zt, labels, alpha=0.5, temperature=temp)

    def unfused_eager():
        zs = h @ w.t()
        with torch.no_grad():
            zt = th @ tw.t()
        ls, lt = F.log_softmax(zs / temp, -1), F.log_softmax(zt / temp, -1)
        kd = F.kl_div(ls, lt, log_target=True, reduction="batchmean") * temp**2
        return 0.5 * F.cross_entropy(zs, labels) + 0.5 * kd

    fn = {
        "fused": fused,
        "fused_vocab": fused_vocab,
        "unfused_kdcore": unfused_kdcore,
        "unfused_eager": unfused_eager,
    }
    step = fn[variant]
    if what == "peak":
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step().backward()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((peak - base) / 1024, flush=True)
        return
    step().backward()  # warm-up
    times = []
    for _ in range(5):
        h.grad = w.grad = None
        start = time.perf_counter()
        step().backward()
        times.append(time.perf_counter() - start)
    print(statistics.median(times) * 1e3, flush=True)


def child(variant: str, what: str, env: dict) -> float:
    out = subprocess.run(
        [sys.executable, __file__, variant, what],
        check=True,
        env=env,
        capture_output=True,
        text=True,
    )
    return float(out.stdout.split()[-1])


if __name__ == "__main__":
    if len(sys.argv) > 2:
        measure(sys.argv[1], sys.argv[2])
    else:
        # Peak: large buffers mmapped (see above). Time: the allocator as users have it.
        peak_env = {"MALLOC_MMAP_THRESHOLD_": "1048576", **os.environ}
        for v in VARIANTS:
            peak, ms = child(v, "peak", peak_env), child(v, "time", dict(os.environ))
            print(f"{v:>15}: peak RSS growth {peak:6.0f} MiB, forward+backward median {ms:6.0f} ms")
