"""Temperature softmax / log-softmax, forward and backward.

Grid: a fixed number of programs, each looping over rows ``pid, pid + P, ...``
(one row at a time). A row is read in column blocks of ``BLOCK``: pass 1
(first block to last) keeps a per-lane online maximum and sum; pass 2 (last
block to first, so the blocks pass 1 read last are re-read from L2 first)
writes the output.
"""

import triton
import triton.language as tl

from .common import FLT_MAX, LN2, LOG2E, lane_total, load, log2_f64, online, store


@triton.jit
def softmax_fwd_kernel(
    X,
    Y,
    rows,
    V,
    stride_x,
    stride_y,
    k,
    LOG: tl.constexpr,
    BLOCK: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr = 0,  # a grid choice of the launcher, unused here
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lanes = tl.arange(0, BLOCK)
    nblk = tl.cdiv(V, BLOCK)
    for row in range(pid, rows, nprog):
        r = tl.cast(row, tl.int64)
        x_row = X + r * stride_x
        y_row = Y + r * stride_y
        m = tl.full([BLOCK], -FLT_MAX, tl.float32)
        z = tl.zeros([BLOCK], tl.float32)
        for b in range(0, nblk):
            cols = b * BLOCK + lanes
            x = load(x_row + cols, cols < V)
            m, z, _, _ = online(x, m, z, k)
        big, total, _ = lane_total(m, z, k)
        log2z = log2_f64(total).to(tl.float32)
        for i in range(0, nblk):
            cols = (nblk - 1 - i) * BLOCK + lanes
            inside = cols < V
            a = (load(x_row + cols, inside) - big) * k - log2z
            if LOG:
                store(y_row + cols, a * LN2, inside)
            else:
                store(y_row + cols, tl.exp2(a), inside)


@triton.jit
def softmax_bwd_kernel(
    Y,
    G,
    DX,
    rows,
    V,
    stride_y,
    stride_g,
    stride_dx,
    inv_t,
    LOG: tl.constexpr,
    BLOCK: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr = 0,  # a grid choice of the launcher, unused here
):
    """dx = (g - exp(y) Σ g) / T (log-softmax) or y (g - Σ g y) / T (softmax)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lanes = tl.arange(0, BLOCK)
    nblk = tl.cdiv(V, BLOCK)
    for row in range(pid, rows, nprog):
        r = tl.cast(row, tl.int64)
        y_row = Y + r * stride_y
        g_row = G + r * stride_g
        dx_row = DX + r * stride_dx
        acc = tl.zeros([BLOCK], tl.float32)
        for b in range(0, nblk):
            cols = b * BLOCK + lanes
            inside = cols < V
            g = tl.load(g_row + cols, mask=inside, other=0.0).to(tl.float32)
            if LOG:
                acc += g
            else:
                acc += g * tl.load(y_row + cols, mask=inside, other=0.0).to(tl.float32)
        total = tl.sum(acc.to(tl.float64), 0).to(tl.float32)
        for i in range(0, nblk):
            cols = (nblk - 1 - i) * BLOCK + lanes
            inside = cols < V
            g = tl.load(g_row + cols, mask=inside, other=0.0).to(tl.float32)
            y = tl.load(y_row + cols, mask=inside, other=0.0).to(tl.float32)
            if LOG:
                dx = (g - tl.exp2(y * LOG2E) * total) * inv_t
            else:
                dx = y * (g - total) * inv_t
            store(dx_row + cols, dx, inside)
