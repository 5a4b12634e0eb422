//! KL distillation from a sparse teacher: the teacher's top-k token ids and
//! log-probabilities per row (a stored cache, vLLM's prompt_logprobs), the
//! student's full logits.
//!
//! The teacher gives masses m_i = e^{lp_i} on its k ids and m_tail =
//! max(0, 1 − Σ m_i) on the rest of the vocabulary. Re-tempered from the
//! temperature T0 it was stored at to the distillation temperature T, the k+1
//! categories become p_c ∝ m_c^{T0/T} (the tail counts as one category). The
//! student is Q = softmax(s / T) over the full vocabulary; Q_tail is its mass
//! outside the k ids, summed directly (no 1 − Σ cancellation).
//!
//! | tail | loss | ∂loss/∂s_j · T |
//! |---|---|---|
//! | `Bucket` | Σ_c p_c (log p_c − log Q_c) over k ids + tail | j in ids: Q_j − p_j; else Q_j (1 − p_tail / Q_tail) |
//! | `Renormalize` | Σ_i p_i (log p_i − log Q_i), p over the k ids only | Q_j − p̃_j |
//! | `Zero` | Σ_i p_i (log p_i − log Q_i), tail mass dropped | Q_j P_k − p̃_j, P_k = Σ_i p_i |
//!
//! (p̃_j = p_i where j = id_i, else 0.) When the k ids cover the whole
//! vocabulary the tail is empty: its mass (rounding noise) is dropped. Per row: the student's max, one pass
//! for Z and the tail sum (exponentials kept in scratch), the k teacher
//! entries, the gradient pass.

use std::cell::RefCell;

use crate::element::Element;
use crate::error::{check_len, inverse_temperature, KernelError};
use crate::rows::{
    row_max, run_blocks, runs, shift, split_rows, store, wide_sum, widen_into, Blocking, PaddedRow,
    Wide,
};
use crate::simd::simd_dispatch;
use crate::simd::{exp_nonpos_lanes, Arch, SimdLevel};
use crate::softmax::check_shape;

/// How the teacher's probability mass outside its top-k is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tail {
    /// One extra category: the teacher's missing mass vs the student's mass
    /// outside the top-k.
    Bucket,
    /// Renormalize the teacher's top-k to sum to 1.
    Renormalize,
    /// Drop the missing mass (the top-k probabilities as given).
    Zero,
}

/// The sparse teacher: `k` ids and log-probabilities per row.
pub struct SparseTeacher<'a> {
    pub ids: &'a [i64],
    pub logprobs: &'a [f32],
    pub k: usize,
    /// The temperature the log-probabilities were computed at.
    pub temperature: f32,
}

thread_local! {
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// The teacher's k+1 category probabilities at temperature T.
/// Returns (p over the ids, p_tail).
fn teacher_probs(logprobs: &[f32], ratio: f32, tail: Tail, p: &mut [f64]) -> f64 {
    let masses: f64 = logprobs.iter().map(|&lp| (lp as f64).exp()).sum();
    let m_tail = if tail == Tail::Renormalize {
        0.0
    } else {
        (1.0 - masses).max(0.0)
    };
    // p_c ∝ m_c^ratio = exp(ratio · log m_c), normalised in log space.
    let ratio = ratio as f64;
    let log_tail = if m_tail > 0.0 {
        ratio * m_tail.ln()
    } else {
        f64::NEG_INFINITY
    };
    let top = logprobs
        .iter()
        .map(|&lp| ratio * lp as f64)
        .fold(log_tail, f64::max);
    let mut z = if m_tail > 0.0 {
        (log_tail - top).exp()
    } else {
        0.0
    };
    for (pi, &lp) in p.iter_mut().zip(logprobs) {
        *pi = (ratio * lp as f64 - top).exp();
        z += *pi;
    }
    for pi in p.iter_mut() {
        *pi /= z;
    }
    if m_tail > 0.0 {
        (log_tail - top).exp() / z
    } else {
        0.0
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn sparse_row<A: Arch, const L: usize, S: Element>(
    s: &[S],
    ids: &[i64],
    logprobs: &[f32],
    inv_t: f32,
    ratio: f32,
    tail: Tail,
    weight: f32,
    grad: Option<&mut [S]>,
    exps: &mut Vec<f32>,
    outside: &mut Vec<f32>,
) -> f32 {
    let cols = s.len();
    let padded = cols.div_ceil(L) * L;
    if exps.len() < padded {
        exps.resize(padded, 0.0);
    }
    if outside.len() < padded {
        outside.resize(padded, 1.0);
    }
    for &id in ids {
        outside[id as usize] = 0.0;
    }
    let max = row_max::<S, L>(s);
    let (mut z, mut z_tail): (Wide<L>, Wide<L>) = ([0.0; L], [0.0; L]);
    let padded = PaddedRow::<S, L>::new(s);
    for run in runs(padded.chunks()) {
        let (mut z_run, mut tail_run) = ([0.0; L], [0.0; L]);
        for k in run {
            let at = k * L;
            let e = exp_nonpos_lanes::<A, L>(&shift(padded.chunk(k), max, inv_t));
            let out = &outside[at..at + L];
            for i in 0..L {
                z_run[i] += e[i];
                tail_run[i] += e[i] * out[i];
            }
            let dst: &mut [f32; L] = (&mut exps[at..at + L]).try_into().expect("L long");
            *dst = e;
        }
        widen_into(&mut z, &z_run);
        widen_into(&mut z_tail, &tail_run);
    }
    let (z, z_tail) = (wide_sum(&z), wide_sum(&z_tail));
    let log_z = z.ln();

    let mut p = [0.0f64; 256];
    let mut p_heap;
    let p: &mut [f64] = if ids.len() <= p.len() {
        &mut p[..ids.len()]
    } else {
        p_heap = vec![0.0f64; ids.len()];
        &mut p_heap
    };
    // With no token outside the top-k, the "missing" mass is rounding noise.
    let tail_of_teacher = if ids.len() == cols {
        Tail::Renormalize
    } else {
        tail
    };
    let p_tail = teacher_probs(logprobs, ratio, tail_of_teacher, p);
    let mut loss = 0.0f64;
    for (&pi, &id) in p.iter().zip(ids) {
        if pi > 0.0 {
            // From the logit itself: e^a may underflow where log Q is finite.
            let a = (s[id as usize].to_f32() - max) * inv_t;
            loss += pi * (pi.ln() - (a as f64 - log_z));
        }
    }
    let q_tail = z_tail / z;
    if tail == Tail::Bucket && p_tail > 0.0 {
        loss += p_tail * (p_tail.ln() - q_tail.ln());
    }

    if let Some(g) = grad {
        let scale = weight * inv_t;
        let inv_z = (1.0 / z) as f32;
        let p_sum: f64 = p.iter().sum();
        let (m_in, m_out) = match tail {
            Tail::Bucket => (1.0, 1.0 - if p_tail > 0.0 { p_tail / q_tail } else { 0.0 }),
            Tail::Renormalize => (1.0, 1.0),
            Tail::Zero => (p_sum, p_sum),
        };
        let (m_in, m_out) = (m_in as f32, m_out as f32);
        // Every token as if outside the top-k; the k ids are written below.
        let factor = inv_z * m_out * scale;
        for (k, dst) in g.chunks_mut(L).enumerate() {
            let e = &exps[k * L..(k + 1) * L];
            let mut d = [0.0; L];
            for i in 0..L {
                d[i] = e[i] * factor;
            }
            store::<S, L>(dst, &d);
        }
        for (&pi, &id) in p.iter().zip(ids) {
            // Q_j m − p_j in f64, then one rounding to the gradient's dtype.
            let j = id as usize;
            let q = exps[j] as f64 / z;
            g[j] = S::from_f32(((q * m_in as f64 - pi) * scale as f64) as f32);
        }
    }
    for &id in ids {
        outside[id as usize] = 1.0;
    }
    (weight as f64 * loss) as f32
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn sparse_block<A: Arch, const L: usize, S: Element>(
    s: &[S],
    cols: usize,
    ids: &[i64],
    logprobs: &[f32],
    k: usize,
    inv_t: f32,
    ratio: f32,
    tail: Tail,
    weight: &[f32],
    loss: &mut [f32],
    mut grad: Option<&mut [S]>,
    exps: &mut Vec<f32>,
    outside: &mut Vec<f32>,
) {
    for (r, (&w, out)) in weight.iter().zip(loss.iter_mut()).enumerate() {
        let span = r * cols..(r + 1) * cols;
        let g = grad.as_deref_mut().map(|g| &mut g[span.clone()]);
        if w == 0.0 {
            *out = 0.0;
            if let Some(g) = g {
                g.fill(S::from_f32(0.0));
            }
            continue;
        }
        let (ids, lps) = (&ids[r * k..(r + 1) * k], &logprobs[r * k..(r + 1) * k]);
        *out = sparse_row::<A, L, S>(&s[span], ids, lps, inv_t, ratio, tail, w, g, exps, outside);
    }
}

simd_dispatch!(fn sparse_block_at<S: Element>(
    s: &[S], cols: usize, ids: &[i64], logprobs: &[f32], k: usize, inv_t: f32, ratio: f32,
    tail: Tail, weight: &[f32], loss: &mut [f32], grad: Option<&mut [S]>,
    exps: &mut Vec<f32>, outside: &mut Vec<f32>,
) => sparse_block);

fn check_teacher(
    teacher: &SparseTeacher<'_>,
    weight: &[f32],
    cols: usize,
) -> Result<(), KernelError> {
    let k = teacher.k;
    let mut seen = vec![usize::MAX; cols];
    for (r, &w) in weight.iter().enumerate() {
        if w == 0.0 {
            continue;
        }
        let (ids, lps) = (
            &teacher.ids[r * k..(r + 1) * k],
            &teacher.logprobs[r * k..(r + 1) * k],
        );
        for (&id, &lp) in ids.iter().zip(lps) {
            let bad = |message: String| {
                Err(KernelError::Parameter {
                    what: "teacher",
                    message,
                })
            };
            if !(0..cols as i64).contains(&id) {
                return bad(format!("row {r}: token id {id} is outside [0, {cols})"));
            }
            if seen[id as usize] == r {
                return bad(format!("row {r}: token id {id} appears twice in the top-k"));
            }
            seen[id as usize] = r;
            if lp.is_nan() || lp > 0.0 {
                return bad(format!(
                    "row {r}: log-probability {lp} of token {id} is not <= 0"
                ));
            }
        }
        let mass: f64 = lps.iter().map(|&lp| (lp as f64).exp()).sum();
        if mass > 1.0 + 1e-3 {
            return Err(KernelError::Parameter {
                what: "teacher",
                message: format!("row {r}: top-k probabilities sum to {mass:.6} > 1"),
            });
        }
    }
    Ok(())
}

/// Per-row weighted KL from a sparse (top-k) teacher to the student's full
/// softmax(s / T) (see the module docs), and on request its gradient w.r.t.
/// the student logits. Rows with weight 0 give loss 0 and gradient 0.
#[allow(clippy::too_many_arguments)]
pub fn sparse_kl<S: Element>(
    student: &[S],
    rows: usize,
    cols: usize,
    teacher: SparseTeacher<'_>,
    temperature: f32,
    tail: Tail,
    weight: &[f32],
    loss: &mut [f32],
    grad: Option<&mut [S]>,
) -> Result<(), KernelError> {
    sparse_kl_at(
        SimdLevel::detect(),
        student,
        rows,
        cols,
        teacher,
        temperature,
        tail,
        weight,
        loss,
        grad,
    )
}

/// [`sparse_kl`] at a given SIMD level (tests run every level a CPU has).
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn sparse_kl_at<S: Element>(
    level: SimdLevel,
    student: &[S],
    rows: usize,
    cols: usize,
    teacher: SparseTeacher<'_>,
    temperature: f32,
    tail: Tail,
    weight: &[f32],
    loss: &mut [f32],
    grad: Option<&mut [S]>,
) -> Result<(), KernelError> {
    let n = check_shape(rows, cols)?;
    check_len("student", student.len(), n)?;
    if teacher.k == 0 {
        return Err(KernelError::Parameter {
            what: "k",
            message: "the sparse teacher needs k >= 1 entries per row".to_string(),
        });
    }
    check_len("teacher_ids", teacher.ids.len(), rows * teacher.k)?;
    check_len("teacher_logprobs", teacher.logprobs.len(), rows * teacher.k)?;
    check_len("weight", weight.len(), rows)?;
    check_len("loss", loss.len(), rows)?;
    if let Some(g) = grad.as_deref() {
        check_len("grad", g.len(), n)?;
    }
    let inv_t = inverse_temperature(temperature)?;
    let inv_t0 = inverse_temperature(teacher.temperature)?;
    // Read once: the kernel indexes with exactly the ids (and skips exactly
    // the rows) it validated, whatever another thread writes into the
    // caller's arrays meanwhile.
    let ids = teacher.ids.to_vec();
    let weight = weight.to_vec();
    let teacher = SparseTeacher {
        ids: &ids,
        ..teacher
    };
    check_teacher(&teacher, &weight, cols)?;
    if rows == 0 {
        return Ok(());
    }
    let ratio = inv_t / inv_t0; // T0 / T
    let blocking = Blocking::new(rows, cols);
    let (per, len, k) = (
        blocking.rows_per_block,
        blocking.rows_per_block * cols,
        teacher.k,
    );
    let items: Vec<_> = student
        .chunks(len)
        .zip(
            teacher
                .ids
                .chunks(per * k)
                .zip(teacher.logprobs.chunks(per * k)),
        )
        .zip(weight.chunks(per).zip(loss.chunks_mut(per)))
        .zip(split_rows(grad, len, blocking.blocks))
        .collect();
    run_blocks(items, |_, (((sb, (ib, lb)), (wb, ob)), gb)| {
        // Taken here, outside the SIMD-compiled body: closures inside it would
        // not inherit its target features.
        // The scratch is taken out for the block and put back only after it:
        // a panic drops it (with half-written marks) instead of leaving it
        // dirty for every later call on this thread.
        SCRATCH.with(|cell| {
            let (mut exps, mut outside) = cell.take();
            sparse_block_at(
                level,
                sb,
                cols,
                ib,
                lb,
                k,
                inv_t,
                ratio,
                tail,
                wb,
                ob,
                gb,
                &mut exps,
                &mut outside,
            );
            cell.replace((exps, outside));
        })
    });
    Ok(())
}
