"""KL from a sparse (top-k) teacher to the student's full softmax (``kdcore::sparse_kl``).

The same contract as the Rust kernel ``sparse.rs``. The host prepares, per
row and in float64, the teacher's k+1 category probabilities at temperature
T (re-tempered, with the tail bucket), Σ p log p, log p_tail and Σ p, and
sorts the k ids (with their p) so that a block of columns finds its ids by
advancing one pointer.

Passes over a row (column blocks of ``BLOCK``):

1. forward: per-lane online max and Z of the student at T, and for the tail
   bucket the mass outside the k ids summed directly (no 1 − Σ cancellation);
   then the k student logits of the ids are gathered for
   Σ_i p_i log Q_i (float64);
2. backward, only for the gradient: every token gets Q_j m_out, the ids
   Q_j m_in − p_j (times w / T), written in one store per block.
"""

import triton
import triton.language as tl

from .common import FLT_MAX, LN2, lane_total, load, log2_f64, online, store

BUCKET = tl.constexpr(0)
RENORMALIZE = tl.constexpr(1)
ZERO = tl.constexpr(2)
_END = tl.constexpr(1 << 62)


@triton.jit
def sparse_kl_kernel(
    S,
    IDS,
    P,
    PLOGP,
    PTAIL,
    LOG_PTAIL,
    PSUM,
    W,
    LOSS,
    G,
    rows,
    V,
    K,
    stride_s,
    stride_g,
    inv_t,
    k,
    TAIL: tl.constexpr,
    GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
    KBLOCK: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr = 0,  # a grid choice of the launcher, unused here
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lanes = tl.arange(0, BLOCK)
    klanes = tl.arange(0, KBLOCK)
    nblk = tl.cdiv(V, BLOCK)
    for row in range(pid, rows, nprog):
        r64 = tl.cast(row, tl.int64)
        s_row = S + r64 * stride_s
        g_row = G + r64 * stride_g
        ids_row = IDS + r64 * K
        p_row = P + r64 * K
        w = tl.load(W + row)
        if w == 0.0:
            tl.store(LOSS + row, 0.0)
            if GRAD:
                for b in range(0, nblk):
                    cols = b * BLOCK + lanes
                    store(g_row + cols, tl.zeros([BLOCK], tl.float32), cols < V)
        else:
            m = tl.full([BLOCK], -FLT_MAX, tl.float32)
            z = tl.zeros([BLOCK], tl.float32)
            z_out = tl.zeros([BLOCK], tl.float32)
            at = 0
            nxt = tl.load(ids_row)  # k >= 1
            for b in range(0, nblk):
                cols = b * BLOCK + lanes
                s = load(s_row + cols, cols < V)
                m, z, r, n = online(s, m, z, k)
                if TAIL == BUCKET:
                    ids_here = cols < 0
                    while nxt < (b + 1) * BLOCK:
                        ids_here = ids_here | (cols == nxt)
                        at += 1
                        nxt = tl.load(ids_row + at, mask=at < K, other=_END)
                    z_out = z_out * r + tl.where(ids_here, 0.0, n)
            big, total, r_lane = lane_total(m, z, k)
            log2_z = log2_f64(total)
            # Σ_i p_i log Q_i over the k ids, in float64.
            k64 = tl.cast(k, tl.float64)
            acc = tl.zeros([KBLOCK], tl.float64)
            for j in range(0, K, KBLOCK):
                idx = j + klanes
                valid = idx < K
                ids = tl.load(ids_row + idx, mask=valid, other=0)
                p = tl.load(p_row + idx, mask=valid, other=0.0)
                s_id = tl.load(s_row + ids, mask=valid, other=0.0).to(tl.float32)
                log_q = ((s_id - big).to(tl.float64) * k64 - log2_z) * LN2
                acc += tl.where(valid & (p > 0.0), p * log_q, 0.0)
            loss = tl.load(PLOGP + row) - tl.sum(acc, 0)
            p_tail = tl.load(PTAIL + row)
            m_in = p_tail * 0.0 + 1.0
            m_out = m_in
            if TAIL == BUCKET:
                outside = tl.sum(z_out.to(tl.float64) * r_lane.to(tl.float64), 0)
                log_q_tail = (log2_f64(outside) - log2_z) * LN2
                has_tail = p_tail > 0.0
                loss += tl.where(has_tail, p_tail * (tl.load(LOG_PTAIL + row) - log_q_tail), 0.0)
                ratio = p_tail / (outside / total)
                m_out = 1.0 - tl.where(has_tail, ratio, 0.0)
            if TAIL == ZERO:
                m_in = tl.load(PSUM + row)
                m_out = m_in
            tl.store(LOSS + row, (w.to(tl.float64) * loss).to(tl.float32))
            if GRAD:
                c = w * inv_t
                log2_z32 = log2_z.to(tl.float32)
                m_in32 = m_in.to(tl.float32)
                m_out32 = m_out.to(tl.float32)
                at = K - 1
                nxt = tl.load(ids_row + at, mask=at >= 0, other=-1)
                for i in range(0, nblk):
                    b = nblk - 1 - i
                    cols = b * BLOCK + lanes
                    inside = cols < V
                    q = tl.exp2((load(s_row + cols, inside) - big) * k - log2_z32)
                    ids_here = cols < 0
                    p_here = tl.zeros([BLOCK], tl.float32)
                    while nxt >= b * BLOCK:
                        hit = cols == nxt
                        ids_here = ids_here | hit
                        p_at = tl.load(p_row + at).to(tl.float32)
                        p_here = tl.where(hit, p_at, p_here)
                        at -= 1
                        nxt = tl.load(ids_row + at, mask=at >= 0, other=-1)
                    g = tl.where(ids_here, q * m_in32 - p_here, q * m_out32) * c
                    store(g_row + cols, g, inside)
