//! Fused KL divergence between temperature softmaxes, loss and gradients in
//! one call.
//!
//! For each row r, with P = softmax(p_logits / T) and Q = softmax(q_logits / T):
//!
//!   loss_r = w_r · KL(P ‖ Q) = w_r · Σ_j P_j (log P_j − log Q_j)
//!   ∂loss_r/∂q_logits_j = w_r · (Q_j − P_j) / T
//!   ∂loss_r/∂p_logits_j = w_r · P_j · (log P_j − log Q_j − KL) / T
//!
//! Forward distillation KL(P_teacher ‖ P_student) passes the teacher as `p`;
//! reverse KL passes the student as `p`. Terms with P_j = 0 contribute 0
//! (0 · log 0 = 0), so `-inf` logits (banned tokens) are exact.
//!
//! Passes per row: maxima of both rows; partition functions and the KL sum on
//! logits shifted by their maxima (no cancellation between large logits);
//! then, only when a gradient is asked for, the gradient pass.

use std::cell::RefCell;

use crate::element::Element;
use crate::error::{check_len, inverse_temperature, KernelError};
use crate::rows::{
    load, row_max, run_blocks, split_rows, store, wide_sum, widen_into, Blocking, Wide, RUN,
};
use crate::simd::{exp_nonpos_lanes, Arch, SimdLevel, LANES};
use crate::simd_dispatch;
use crate::softmax::{check_shape, shifted};

/// Where to write the gradients; `None` skips that gradient's work.
pub struct KlGrads<'a, P, Q> {
    /// ∂(Σ_r loss_r)/∂p_logits, `rows x cols`.
    pub p: Option<&'a mut [P]>,
    /// ∂(Σ_r loss_r)/∂q_logits, `rows x cols`.
    pub q: Option<&'a mut [Q]>,
}

// Scratch for one row's exponentials, reused by each pool thread (so the
// gradient pass needs no exp and no fresh allocation).
thread_local! {
    static EXPS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

#[inline(always)]
fn kl_row<A: Arch, P: Element, Q: Element>(
    p: &[P],
    q: &[Q],
    inv_t: f32,
    weight: f32,
    mut grad_p: Option<&mut [P]>,
    mut grad_q: Option<&mut [Q]>,
    exps: &mut Vec<f32>,
) -> f32 {
    let (max_p, max_q) = (row_max(p), row_max(q));
    // The usual case, only ∂/∂q wanted: keep e^sp and e^sq of each chunk for
    // the gradient pass instead of computing them twice.
    let keep = grad_q.is_some() && grad_p.is_none();
    if keep {
        exps.resize(p.len().div_ceil(LANES) * 2 * LANES, 0.0);
    }
    let (mut zp, mut zq, mut cross): (Wide, Wide, Wide) = Default::default();
    for (r, (run_p, run_q)) in p.chunks(RUN).zip(q.chunks(RUN)).enumerate() {
        let (mut zp_run, mut zq_run, mut cross_run) = ([0.0; LANES], [0.0; LANES], [0.0; LANES]);
        for (k, (cp, cq)) in run_p.chunks(LANES).zip(run_q.chunks(LANES)).enumerate() {
            let sp = shifted(&load(cp, f32::NEG_INFINITY), max_p, inv_t);
            let sq = shifted(&load(cq, f32::NEG_INFINITY), max_q, inv_t);
            let (ep, eq) = (exp_nonpos_lanes::<A>(&sp), exp_nonpos_lanes::<A>(&sq));
            for i in 0..LANES {
                zp_run[i] += ep[i];
                zq_run[i] += eq[i];
                // P_j = 0 contributes nothing, even where log Q_j = -inf too.
                cross_run[i] += if ep[i] > 0.0 {
                    ep[i] * (sp[i] - sq[i])
                } else {
                    0.0
                };
            }
            if keep {
                let at = 2 * (r * RUN + k * LANES);
                let slot = &mut exps[at..at + 2 * LANES];
                slot[..LANES].copy_from_slice(&ep);
                slot[LANES..].copy_from_slice(&eq);
            }
        }
        widen_into(&mut zp, &zp_run);
        widen_into(&mut zq, &zq_run);
        widen_into(&mut cross, &cross_run);
    }
    let (zp, zq) = (wide_sum(&zp), wide_sum(&zq));
    let (log_zp, log_zq) = (zp.ln(), zq.ln());
    let kl = wide_sum(&cross) / zp - log_zp + log_zq;
    let loss = (weight as f64 * kl) as f32;
    if grad_p.is_none() && grad_q.is_none() {
        return loss;
    }
    let scale = weight * inv_t;
    let (inv_zp, inv_zq) = ((1.0 / zp) as f32, (1.0 / zq) as f32);
    if let (true, Some(g)) = (keep, grad_q.as_deref_mut()) {
        for (k, dst) in g.chunks_mut(LANES).enumerate() {
            let slot = &exps[2 * k * LANES..2 * (k + 1) * LANES];
            let mut d = [0.0; LANES];
            for i in 0..LANES {
                d[i] = (slot[LANES + i] * inv_zq - slot[i] * inv_zp) * scale;
            }
            store(dst, &d);
        }
        return loss;
    }
    // log P_j - log Q_j - KL = (sp_j - sq_j) - offset
    let offset = (log_zp - log_zq + kl) as f32;
    for (k, (cp, cq)) in p.chunks(LANES).zip(q.chunks(LANES)).enumerate() {
        let sp = shifted(&load(cp, f32::NEG_INFINITY), max_p, inv_t);
        let sq = shifted(&load(cq, f32::NEG_INFINITY), max_q, inv_t);
        let (ep, eq) = (exp_nonpos_lanes::<A>(&sp), exp_nonpos_lanes::<A>(&sq));
        let span = k * LANES..k * LANES + cp.len();
        if let Some(g) = grad_q.as_deref_mut() {
            let mut d = [0.0; LANES];
            for i in 0..LANES {
                d[i] = (eq[i] * inv_zq - ep[i] * inv_zp) * scale;
            }
            store(&mut g[span.clone()], &d);
        }
        if let Some(g) = grad_p.as_deref_mut() {
            let mut d = [0.0; LANES];
            for i in 0..LANES {
                let pj = ep[i] * inv_zp;
                d[i] = if pj > 0.0 {
                    pj * ((sp[i] - sq[i]) - offset) * scale
                } else {
                    0.0
                };
            }
            store(&mut g[span], &d);
        }
    }
    loss
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn kl_block<A: Arch, P: Element, Q: Element>(
    p: &[P],
    q: &[Q],
    cols: usize,
    inv_t: f32,
    weight: &[f32],
    loss: &mut [f32],
    mut grad_p: Option<&mut [P]>,
    mut grad_q: Option<&mut [Q]>,
    exps: &mut Vec<f32>,
) {
    for (r, (&w, out)) in weight.iter().zip(loss.iter_mut()).enumerate() {
        let span = r * cols..(r + 1) * cols;
        let gp = grad_p.as_deref_mut().map(|g| &mut g[span.clone()]);
        let gq = grad_q.as_deref_mut().map(|g| &mut g[span.clone()]);
        if w == 0.0 {
            // Masked row: no loss, no gradient, and its logits are never read
            // (a masked row of NaN or -inf stays harmless).
            *out = 0.0;
            gp.into_iter().for_each(|g| g.fill(P::from_f32(0.0)));
            gq.into_iter().for_each(|g| g.fill(Q::from_f32(0.0)));
            continue;
        }
        *out = kl_row::<A, P, Q>(&p[span.clone()], &q[span], inv_t, w, gp, gq, exps);
    }
}

simd_dispatch!(fn kl_block_at<P: Element, Q: Element>(
    p: &[P], q: &[Q], cols: usize, inv_t: f32, weight: &[f32], loss: &mut [f32],
    grad_p: Option<&mut [P]>, grad_q: Option<&mut [Q]>, exps: &mut Vec<f32>,
) => kl_block);

/// Per-row weighted KL(softmax(p/T) ‖ softmax(q/T)) and, on request, the
/// gradients of Σ_r loss_r. Rows with weight 0 give loss 0 and gradient 0.
#[allow(clippy::too_many_arguments)]
pub fn kl_div<P: Element, Q: Element>(
    p_logits: &[P],
    q_logits: &[Q],
    rows: usize,
    cols: usize,
    temperature: f32,
    row_weight: &[f32],
    row_loss: &mut [f32],
    grads: KlGrads<'_, P, Q>,
) -> Result<(), KernelError> {
    let n = check_shape(rows, cols)?;
    check_len("p_logits", p_logits.len(), n)?;
    check_len("q_logits", q_logits.len(), n)?;
    check_len("row_weight", row_weight.len(), rows)?;
    check_len("row_loss", row_loss.len(), rows)?;
    if let Some(g) = grads.p.as_deref() {
        check_len("grad_p", g.len(), n)?;
    }
    if let Some(g) = grads.q.as_deref() {
        check_len("grad_q", g.len(), n)?;
    }
    let inv_t = inverse_temperature(temperature)?;
    if rows == 0 {
        return Ok(());
    }
    let level = SimdLevel::detect();
    let blocking = Blocking::new(rows, cols);
    let (per, len) = (blocking.rows_per_block, blocking.rows_per_block * cols);
    let items: Vec<_> = p_logits
        .chunks(len)
        .zip(q_logits.chunks(len))
        .zip(row_weight.chunks(per).zip(row_loss.chunks_mut(per)))
        .zip(split_rows(grads.p, len, blocking.blocks))
        .zip(split_rows(grads.q, len, blocking.blocks))
        .collect();
    run_blocks(items, |_, ((((pb, qb), (wb, lb)), gp), gq)| {
        // Taken here, outside the SIMD-compiled body: closures inside it would
        // not inherit its target features.
        EXPS.with(|cell| {
            let exps = &mut cell.borrow_mut();
            kl_block_at(level, pb, qb, cols, inv_t, wb, lb, gp, gq, exps)
        })
    });
    Ok(())
}
