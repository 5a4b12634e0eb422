"""The fused distillation kernel (``kdcore::distill`` on the GPU).

Per row r, with Q = softmax(s / T) (student), P = softmax(t / T) (teacher):
the loss w_r · D_r for D one of KL(P‖Q), KL(Q‖P), TVD, JSD(β), the
hard-label cross-entropy c_r · CE_r on the student at T = 1 (reported
apart), and the gradients of their sum w.r.t. the student and, on request,
the teacher — the same contract as the Rust kernel ``distill.rs`` (see its
table of gradients).

Passes over a row (column blocks of ``BLOCK``, per-lane accumulators, see
``common``):

1. forward: online maxima and partition functions of both rows (and Z at
   T = 1 for the CE when T != 1); for the KLs also the cross term
   C = Σ 2^{b - M_t} ((b - M_t) - (a - M_s)) (teacher-weighted, or the
   student-weighted mirror for the reverse KL), rescaled as the maxima move;
2. TVD and JSD only, backward: the sums their gradients need —
   Σ Q·½sign(Q−P), Σ P·½sign(P−Q), ½ Σ|P−Q|; or KL(Q‖M), KL(P‖M) from
   d = log P − log Q with log Q − log M = −LAE(log(1−β), log β + d) and
   log P − log M = −LAE(log β, log(1−β) − d), both sharing one exponential
   (no absolute log-probability enters, so far-below −104 stays finite);
3. the gradient pass (backward for the KLs, forward for TVD / JSD, so each
   pass starts on the blocks the previous one read last).

Rows whose weights are all 0 are never read: loss 0, gradient rows 0.
"""

import triton
import triton.language as tl

from .common import (
    FLT_MAX,
    LN2,
    LOG2E,
    half_sign,
    lane_total,
    load,
    log1p_unit,
    log2_f64,
    nan_like,
    online,
    shift,
    store,
)

KL = tl.constexpr(0)
REVERSE_KL = tl.constexpr(1)
TVD = tl.constexpr(2)
JSD = tl.constexpr(3)


@triton.jit
def _jsd_logs(d, log_beta, log_rest):
    """(log Q − log M, log P − log M) from d = log P − log Q (natural logs)."""
    gap = tl.abs(log_rest - log_beta - d)
    soft = log1p_unit(tl.exp2(-gap * LOG2E))
    q_m = -(tl.maximum(log_rest, log_beta + d) + soft)
    p_m = -(tl.maximum(log_beta, log_rest - d) + soft)
    return q_m, p_m


@triton.jit
def _cross_update(c, z_old, r, n, x_new, m_old, m_new, y, my_old, my_new, k):
    """Moves the cross term Σ 2^{x - m} ((x - m) - (y - m_y)) k to the new maxima
    and adds this element's term (x weights, y is the other row)."""
    moved = r * (c + (shift(my_new, my_old, k) - shift(m_new, m_old, k)) * z_old)
    term = n * ((x_new - m_new) - (y - my_new)) * k
    return tl.where(r > 0, moved, 0.0) + tl.where(n > 0, term, 0.0)


@triton.jit
def _cross_total(c, z, m, big, my, big_y, r, k):
    """Lane cross terms moved to the row maxima, summed in float64."""
    moved = c.to(tl.float64) + (
        shift(big_y, my, k).to(tl.float64) - shift(big, m, k).to(tl.float64)
    ) * z.to(tl.float64)
    return tl.sum(tl.where(r > 0, r.to(tl.float64) * moved, 0.0), 0)


@triton.jit
def distill_kernel(
    S,
    T,
    W,
    LOSS,
    LABELS,
    CEW,
    CELOSS,
    GS,
    GT,
    rows,
    V,
    stride_s,
    stride_t,
    stride_gs,
    stride_gt,
    inv_t,
    k,
    beta,
    rest,  # 1 - beta, formed in float64 (near beta = 1 an fp32 beta loses it)
    log_beta,
    log_rest,
    DIV: tl.constexpr,
    HAS_CE: tl.constexpr,
    CE_T1: tl.constexpr,
    GRAD_S: tl.constexpr,
    GRAD_T: tl.constexpr,
    BLOCK: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr = 0,  # a grid choice of the launcher, unused here
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lanes = tl.arange(0, BLOCK)
    nblk = tl.cdiv(V, BLOCK)
    for row in range(pid, rows, nprog):
        r64 = tl.cast(row, tl.int64)
        s_row = S + r64 * stride_s
        t_row = T + r64 * stride_t
        gs_row = GS + r64 * stride_gs
        gt_row = GT + r64 * stride_gt
        w = tl.load(W + row)
        wce = w * 0.0
        label = r64 * 0
        skip = w == 0.0
        if HAS_CE:
            wce = tl.load(CEW + row)
            label = tl.load(LABELS + row).to(tl.int64)
            skip = skip & (wce == 0.0)
        if skip:
            # A masked row: loss and gradient 0, logits never read.
            tl.store(LOSS + row, 0.0)
            if HAS_CE:
                tl.store(CELOSS + row, 0.0)
            for b in range(0, nblk):
                cols = b * BLOCK + lanes
                zero = tl.zeros([BLOCK], tl.float32)
                if GRAD_S:
                    store(gs_row + cols, zero, cols < V)
                if GRAD_T:
                    store(gt_row + cols, zero, cols < V)
        else:
            # Pass 1: maxima, partition functions, cross term.
            ms = tl.full([BLOCK], -FLT_MAX, tl.float32)
            mt = tl.full([BLOCK], -FLT_MAX, tl.float32)
            zs = tl.zeros([BLOCK], tl.float32)
            zt = tl.zeros([BLOCK], tl.float32)
            z1 = tl.zeros([BLOCK], tl.float32)
            cross = tl.zeros([BLOCK], tl.float32)
            for b in range(0, nblk):
                cols = b * BLOCK + lanes
                inside = cols < V
                s = load(s_row + cols, inside)
                t = load(t_row + cols, inside)
                ms_new, zs_new, rs, ns = online(s, ms, zs, k)
                mt_new, zt_new, rt, nt = online(t, mt, zt, k)
                if HAS_CE and CE_T1:
                    _, z1, _, _ = online(s, ms, z1, LOG2E)
                if DIV == KL:
                    cross = _cross_update(cross, zt, rt, nt, t, mt, mt_new, s, ms, ms_new, k)
                if DIV == REVERSE_KL:
                    cross = _cross_update(cross, zs, rs, ns, s, ms, ms_new, t, mt, mt_new, k)
                ms, zs, mt, zt = ms_new, zs_new, mt_new, zt_new
            max_s, z_s, r_s = lane_total(ms, zs, k)
            max_t, z_t, r_t = lane_total(mt, zt, k)
            log2_zs = log2_f64(z_s)
            log2_zt = log2_f64(z_t)
            ls = log2_zs.to(tl.float32)
            lt = log2_zt.to(tl.float32)
            lr = (log2_zt - log2_zs).to(tl.float32)
            # The divergence and the row sums its gradient needs.
            div = log2_zs * 0.0
            sum_s = ls * 0.0
            sum_t = ls * 0.0
            if DIV == KL:
                c = _cross_total(cross, zt, mt, max_t, ms, max_s, r_t, k)
                div = LN2 * (c / z_t - log2_zt + log2_zs)
            if DIV == REVERSE_KL:
                c = _cross_total(cross, zs, ms, max_s, mt, max_t, r_s, k)
                div = LN2 * (c / z_s - log2_zs + log2_zt)
            if DIV == TVD or DIV == JSD:
                # Pass 2 (last block first).
                acc_d = tl.zeros([BLOCK], tl.float32)
                acc_s = tl.zeros([BLOCK], tl.float32)
                acc_t = tl.zeros([BLOCK], tl.float32)
                for i in range(0, nblk):
                    cols = (nblk - 1 - i) * BLOCK + lanes
                    inside = cols < V
                    a = (load(s_row + cols, inside) - max_s) * k
                    bb = (load(t_row + cols, inside) - max_t) * k
                    q = tl.exp2(a - ls)
                    p = tl.exp2(bb - lt)
                    if DIV == TVD:
                        h = half_sign(q - p)
                        acc_d += tl.abs(p - q)
                        acc_s += q * h
                        acc_t -= p * h
                    else:
                        q_m, p_m = _jsd_logs(((bb - a) - lr) * LN2, log_beta, log_rest)
                        acc_s += tl.where(q == 0, 0.0, q * q_m)
                        acc_t += tl.where(p == 0, 0.0, p * p_m)
                kl_q = tl.sum(acc_s.to(tl.float64), 0)
                kl_p = tl.sum(acc_t.to(tl.float64), 0)
                if DIV == TVD:
                    div = 0.5 * tl.sum(acc_d.to(tl.float64), 0)
                else:
                    div = tl.cast(beta, tl.float64) * kl_p + tl.cast(rest, tl.float64) * kl_q
                sum_s = kl_q.to(tl.float32)
                sum_t = kl_p.to(tl.float32)
            tl.store(LOSS + row, tl.where(w == 0.0, 0.0, w.to(tl.float64) * div).to(tl.float32))
            # Hard-label cross-entropy at T = 1: log Z1 + max s - s_y.
            log2_z1 = ls
            if HAS_CE:
                log2_z1_64 = log2_zs
                if CE_T1:
                    _, z_1, _ = lane_total(ms, z1, LOG2E)
                    log2_z1_64 = log2_f64(z_1)
                log2_z1 = log2_z1_64.to(tl.float32)
                ok = (label >= 0) & (label < V)
                s_y = tl.load(s_row + label, mask=ok, other=0.0).to(tl.float32)
                s_y = tl.where(ok, s_y, nan_like(s_y))  # no error from a kernel: NaN
                ce = LN2 * log2_z1_64 + (max_s - s_y).to(tl.float64)
                tl.store(
                    CELOSS + row, tl.where(wce == 0.0, 0.0, wce.to(tl.float64) * ce).to(tl.float32)
                )
            # The gradient pass.
            if GRAD_S or GRAD_T:
                c = w * inv_t
                div32 = div.to(tl.float32)
                for i in range(0, nblk):
                    if DIV == KL or DIV == REVERSE_KL:
                        cols = (nblk - 1 - i) * BLOCK + lanes
                    else:
                        cols = i * BLOCK + lanes
                    inside = cols < V
                    s = load(s_row + cols, inside)
                    a = (s - max_s) * k
                    bb = (load(t_row + cols, inside) - max_t) * k
                    q = tl.exp2(a - ls)
                    p = tl.exp2(bb - lt)
                    if DIV == JSD:
                        q_m, p_m = _jsd_logs(((bb - a) - lr) * LN2, log_beta, log_rest)
                    if GRAD_S:
                        if DIV == KL:
                            g = q - p
                        elif DIV == REVERSE_KL:
                            g = tl.where(q == 0, 0.0, q * (((a - bb) + lr) * LN2 - div32))
                        elif DIV == TVD:
                            g = q * (half_sign(q - p) - sum_s)
                        else:
                            g = rest * tl.where(q == 0, 0.0, q * (q_m - sum_s))
                        g = g * c
                        if HAS_CE:
                            q1 = q
                            if CE_T1:
                                q1 = tl.exp2((s - max_s) * LOG2E - log2_z1)
                            g += wce * q1 - tl.where(cols == label, wce, 0.0)
                        store(gs_row + cols, g, inside)
                    if GRAD_T:
                        if DIV == KL:
                            g = tl.where(p == 0, 0.0, p * (((bb - a) - lr) * LN2 - div32))
                        elif DIV == REVERSE_KL:
                            g = p - q
                        elif DIV == TVD:
                            g = p * (half_sign(p - q) - sum_t)
                        else:
                            g = beta * tl.where(p == 0, 0.0, p * (p_m - sum_t))
                        store(gt_row + cols, g * c, inside)
