//! The fused distillation kernel (`kdcore_kernels::distill`) against float64
//! references written here from the formulas of its module docs: KL(P‖Q),
//! KL(Q‖P), TVD and JSD(β) between the teacher P = softmax(t/T) and the
//! student Q = softmax(s/T), plus the optional hard-label cross-entropy at
//! T = 1 on the student, and the gradients of Σ_r (w_r D_r + w_ce_r CE_r)
//! w.r.t. both logit tensors.
//!
//! Inputs are deterministic pseudo-random (xorshift64*), in f32 / bf16 / f16
//! storage, mixed student / teacher types too, at T = 0.5 / 1 / 2, cols 1, 7,
//! 33, 1000, 32000, on the serial and the parallel path; every reference is
//! computed on the rounded inputs. Tolerances: see `common/mod.rs` (the rules
//! of `kernels.rs`).
//!
//! The references are checked against central finite differences of the f64
//! losses (`references_match_finite_differences`), so the gradient tables of
//! the module docs are not merely copied into the test.

mod common;

use common::*;
use half::{bf16, f16};
use kdcore_kernels::{distill, distill_at, pool, Divergence, Grads, HardLabels, KernelError};

// ---------------------------------------------------------------------------
// float64 reference.

/// Reference of one row: w · D, w_ce · CE and the gradients of their sum.
struct RefRow {
    loss: f64,
    ce: f64,
    gs: RefGrad,
    gt: RefGrad,
}

/// ½ sign(x) with sign(0) = 0.
fn half_sign(x: f64) -> f64 {
    if x > 0.0 {
        0.5
    } else if x < 0.0 {
        -0.5
    } else {
        0.0
    }
}

/// One row of the reference: student logits `s`, teacher logits `t` (f64
/// values of the rounded inputs), temperature `temp`, divergence weight `w`,
/// and the hard label with its CE weight.
fn ref_distill(
    s: &[f64],
    t: &[f64],
    div: Divergence,
    temp: f64,
    w: f64,
    ce: Option<(usize, f64)>,
) -> RefRow {
    let n = s.len();
    let (a, lzs) = shifted_and_log_z(s, temp);
    let (b, lzt) = shifted_and_log_z(t, temp);
    let lq: Vec<f64> = a.iter().map(|v| v - lzs).collect();
    let lp: Vec<f64> = b.iter().map(|v| v - lzt).collect();
    let q: Vec<f64> = lq.iter().map(|v| v.exp()).collect();
    let p: Vec<f64> = lp.iter().map(|v| v.exp()).collect();
    let (c, scale) = (w / temp, w.abs() / temp);
    let (mut gs, mut gt) = (RefGrad::zeros(n), RefGrad::zeros(n));
    // The relative error of Q_j / P_j in f32: the rounding of the shifted
    // logit, amplified by exp, and a few roundings more (exp, 1/Z, product).
    let rq: Vec<f64> = a.iter().map(|&v| fin(v) + 3.0 + ACC).collect();
    let rp: Vec<f64> = b.iter().map(|&v| fin(v) + 3.0 + ACC).collect();
    // Probabilities the f32 exp flushes to 0 (a documented contract): the
    // kernel may drop terms proportional to them.
    let flush_q: Vec<f64> = (0..n)
        .map(|j| if a[j] < FLUSH_BELOW { q[j] } else { 0.0 })
        .collect();
    let flush_p: Vec<f64> = (0..n)
        .map(|j| if b[j] < FLUSH_BELOW { p[j] } else { 0.0 })
        .collect();
    let d = match div {
        Divergence::Kl => {
            let d: f64 = (0..n)
                .filter(|&j| p[j] > 0.0)
                .map(|j| p[j] * (lp[j] - lq[j]))
                .sum();
            for j in 0..n {
                gs.want[j] = c * (q[j] - p[j]);
                gs.cond[j] = scale * (q[j] * rq[j] + p[j] * rp[j]);
                gs.slack[j] = scale * (flush_q[j] + flush_p[j]);
                if p[j] > 0.0 {
                    let v = lp[j] - lq[j] - d;
                    gt.want[j] = c * p[j] * v;
                    // P_j ((b - a) - (log Z_t - log Z_s) - D) in f32.
                    let terms = 2.0 * fin(b[j]) + 2.0 * fin(a[j]) + (lzt - lzs).abs() + d.abs();
                    gt.cond[j] = scale * p[j] * (rp[j] * v.abs() + terms + 4.0);
                    gt.slack[j] = scale * flush_p[j] * v.abs();
                }
            }
            d
        }
        Divergence::ReverseKl => {
            let d: f64 = (0..n)
                .filter(|&j| q[j] > 0.0)
                .map(|j| q[j] * (lq[j] - lp[j]))
                .sum();
            for j in 0..n {
                gt.want[j] = c * (p[j] - q[j]);
                gt.cond[j] = scale * (q[j] * rq[j] + p[j] * rp[j]);
                gt.slack[j] = scale * (flush_q[j] + flush_p[j]);
                if q[j] > 0.0 {
                    let v = lq[j] - lp[j] - d;
                    gs.want[j] = c * q[j] * v;
                    let terms = 2.0 * fin(b[j]) + 2.0 * fin(a[j]) + (lzt - lzs).abs() + d.abs();
                    gs.cond[j] = scale * q[j] * (rq[j] * v.abs() + terms + 4.0);
                    gs.slack[j] = scale * flush_q[j] * v.abs();
                }
            }
            d
        }
        Divergence::Tvd => {
            let d = 0.5 * (0..n).map(|j| (p[j] - q[j]).abs()).sum::<f64>();
            let g: Vec<f64> = (0..n).map(|j| half_sign(q[j] - p[j])).collect();
            let sum_q: f64 = (0..n).map(|j| q[j] * g[j]).sum();
            let sum_p: f64 = (0..n).map(|j| -p[j] * g[j]).sum();
            // Near ties P_j ≈ Q_j (within the f32 error of either), the sign
            // the kernel sees is not determined by its inputs: g_j may move
            // by up to 1, and Σ Q g, Σ P g by up to Q_j, P_j.
            let tie: Vec<bool> = (0..n)
                .map(|j| (p[j] - q[j]).abs() <= 4.0 * EPS * (p[j] * rp[j] + q[j] * rq[j]))
                .collect();
            let tie_q: f64 = (0..n).filter(|&j| tie[j]).map(|j| q[j]).sum();
            let tie_p: f64 = (0..n).filter(|&j| tie[j]).map(|j| p[j]).sum();
            let err_q: f64 = (0..n).map(|j| q[j] * rq[j]).sum();
            let err_p: f64 = (0..n).map(|j| p[j] * rp[j]).sum();
            for j in 0..n {
                let t_j = if tie[j] { 1.0 } else { 0.0 };
                gs.want[j] = c * q[j] * (g[j] - sum_q);
                gs.cond[j] = scale * q[j] * (rq[j] + err_q + 2.0);
                gs.slack[j] = scale * (q[j] * (t_j + tie_q) + flush_q[j]);
                gt.want[j] = c * p[j] * (-g[j] - sum_p);
                gt.cond[j] = scale * p[j] * (rp[j] + err_p + 2.0);
                gt.slack[j] = scale * (p[j] * (t_j + tie_p) + flush_p[j]);
            }
            d
        }
        Divergence::Jsd { beta } => {
            let (l_beta, l_rest) = (beta.ln(), (1.0 - beta).ln());
            let lm: Vec<f64> = (0..n)
                .map(|j| log_add_exp(l_beta + lp[j], l_rest + lq[j]))
                .collect();
            let klp: f64 = (0..n)
                .filter(|&j| p[j] > 0.0)
                .map(|j| p[j] * (lp[j] - lm[j]))
                .sum();
            let klq: f64 = (0..n)
                .filter(|&j| q[j] > 0.0)
                .map(|j| q[j] * (lq[j] - lm[j]))
                .sum();
            // log Q, log P and log M in f32, and the logs of β, 1 - β.
            let logs = |j: usize| {
                2.0 * (fin(a[j]) + fin(b[j]) + fin(lq[j]) + fin(lp[j]) + fin(lm[j]))
                    + l_beta.abs()
                    + l_rest.abs()
                    + 4.0
            };
            for j in 0..n {
                if q[j] > 0.0 {
                    let v = lq[j] - lm[j] - klq;
                    gs.want[j] = c * (1.0 - beta) * q[j] * v;
                    let size = rq[j] * v.abs() + logs(j) + klq.abs();
                    gs.cond[j] = scale * (1.0 - beta) * q[j] * size;
                    gs.slack[j] = scale * (1.0 - beta) * flush_q[j] * v.abs();
                }
                if p[j] > 0.0 {
                    let v = lp[j] - lm[j] - klp;
                    gt.want[j] = c * beta * p[j] * v;
                    let size = rp[j] * v.abs() + logs(j) + klp.abs();
                    gt.cond[j] = scale * beta * p[j] * size;
                    gt.slack[j] = scale * beta * flush_p[j] * v.abs();
                }
            }
            beta * klp + (1.0 - beta) * klq
        }
    };
    let mut ce_loss = 0.0;
    if let Some((y, w_ce)) = ce {
        let (a1, lz1) = shifted_and_log_z(s, 1.0);
        ce_loss = w_ce * (lz1 - a1[y]);
        for (j, &a1j) in a1.iter().enumerate() {
            let q1 = (a1j - lz1).exp();
            let onehot = if j == y { 1.0 } else { 0.0 };
            gs.want[j] += w_ce * (q1 - onehot);
            gs.cond[j] += w_ce.abs() * (q1 * (fin(a1j) + 3.0 + ACC) + onehot);
            if a1j < FLUSH_BELOW {
                gs.slack[j] += w_ce.abs() * q1;
            }
        }
    }
    RefRow {
        loss: w * d,
        ce: ce_loss,
        gs,
        gt,
    }
}

/// Just the loss w · D + w_ce · CE of one row (finite differences).
fn ref_total(
    s: &[f64],
    t: &[f64],
    div: Divergence,
    temp: f64,
    w: f64,
    ce: Option<(usize, f64)>,
) -> f64 {
    let r = ref_distill(s, t, div, temp, w, ce);
    r.loss + r.ce
}

// ---------------------------------------------------------------------------
// Inputs.

const DIVERGENCES: [Divergence; 6] = [
    Divergence::Kl,
    Divergence::ReverseKl,
    Divergence::Tvd,
    Divergence::Jsd { beta: 0.1 },
    Divergence::Jsd { beta: 0.5 },
    Divergence::Jsd { beta: 0.9 },
];

const TEMPERATURES: [f32; 3] = [0.5, 1.0, 2.0];

/// Small shapes every case runs (cheap), one of each required narrow `cols`.
const SMALL_SHAPES: [(usize, usize); 3] = [(3, 1), (7, 7), (4, 33)];

/// Larger shapes, one per case in turn (debug-build time): serial 1000 and
/// 32000 wide, and three parallel shapes.
const BIG_SHAPES: [(usize, usize); 5] = [(6, 1000), (1, 32000), (33, 1000), (2, 32000), (1000, 33)];

/// Teacher and student logits: a mix of scales, peaked rows, and students
/// either independent of the teacher or close to it (small divergence,
/// cancellation-prone gradients).
fn logits_pair(rng: &mut Rng, rows: usize, cols: usize) -> (Vec<f64>, Vec<f64>) {
    let mut s = Vec::with_capacity(rows * cols);
    let mut t = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let sigma = [0.5, 1.0, 3.0, 6.0][r % 4];
        let close = r % 3 == 1;
        let shift = rng.range(-20.0, 20.0);
        for _ in 0..cols {
            let x = sigma * rng.normal() + shift;
            let y = if close {
                x + 0.2 * rng.normal()
            } else {
                sigma * rng.normal() - shift
            };
            t.push(x);
            s.push(y);
        }
        if r % 5 == 2 {
            // A peaked teacher: one dominant logit.
            let j = rng.below(cols);
            t[r * cols + j] += 12.0;
        }
        if r % 7 == 4 {
            // A peaked student.
            let j = rng.below(cols);
            s[r * cols + j] += 10.0;
        }
    }
    (s, t)
}

/// Per-row weights, CE weights and labels. Rows cycle through: both terms;
/// divergence only (CE weight 0, label out of range: never checked); CE only
/// (divergence weight 0); nothing (both 0: masked, never read); both.
fn row_weights(rng: &mut Rng, rows: usize, cols: usize) -> (Vec<f32>, Vec<f32>, Vec<i64>) {
    let (mut w, mut w_ce, mut labels) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rows {
        let (use_div, use_ce) = match r % 6 {
            1 => (true, false),
            2 => (false, true),
            3 => (false, false),
            _ => (true, true),
        };
        w.push(if use_div {
            rng.range(0.25, 2.0) as f32
        } else {
            0.0
        });
        w_ce.push(if use_ce {
            rng.range(0.25, 2.0) as f32
        } else {
            0.0
        });
        labels.push(if use_ce {
            rng.below(cols) as i64
        } else if r % 2 == 0 {
            -7
        } else {
            cols as i64 + 3
        });
    }
    (w, w_ce, labels)
}

/// Overwrites rows `masked` of rounded logits with NaN / ±inf (never read).
fn poison<E: Dtype>(x: &mut [E], cols: usize, masked: &[bool], phase: usize) {
    let vals = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
    for (r, _) in masked.iter().enumerate().filter(|(_, &m)| m) {
        for j in 0..cols {
            if (j + phase) % 2 == 0 {
                x[r * cols + j] = E::from_f32(vals[(j + r + phase) % 3]);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// One case: the kernel against the reference.

/// Outputs of one `distill` call.
struct Out<S, T> {
    loss: Vec<f32>,
    ce: Vec<f32>,
    gs: Vec<S>,
    gt: Vec<T>,
}

/// Calls `distill`, with the student / teacher gradients as asked; outputs
/// start as NaN so that anything not written shows.
#[allow(clippy::too_many_arguments)]
fn run<S: Dtype, T: Dtype>(
    s: &[S],
    t: &[T],
    rows: usize,
    cols: usize,
    div: Divergence,
    temp: f32,
    w: &[f32],
    hard: Option<(&[i64], &[f32])>,
    want_s: bool,
    want_t: bool,
) -> Out<S, T> {
    let n = rows * cols;
    let mut out = Out {
        loss: vec![f32::NAN; rows],
        ce: vec![f32::NAN; rows],
        gs: vec![S::from_f32(f32::NAN); if want_s { n } else { 0 }],
        gt: vec![T::from_f32(f32::NAN); if want_t { n } else { 0 }],
    };
    let hard = hard.map(|(labels, weight)| HardLabels {
        labels,
        weight,
        loss: &mut out.ce[..],
    });
    let grads = Grads {
        student: want_s.then_some(&mut out.gs[..]),
        teacher: want_t.then_some(&mut out.gt[..]),
    };
    let loss = &mut out.loss;
    distill_at(level(), s, t, rows, cols, div, temp, w, loss, hard, grads).unwrap();
    out
}

fn f32_bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Runs `distill` on `s64`/`t64` rounded to S/T (rows whose weights are all 0
/// poisoned with NaN / inf), checks losses and gradients against the f64
/// reference, and that forward-only and single-gradient calls give the same
/// bits as the full call.
#[allow(clippy::too_many_arguments)]
fn distill_case<S: Dtype, T: Dtype>(
    s64: &[f64],
    t64: &[f64],
    rows: usize,
    cols: usize,
    div: Divergence,
    temp: f32,
    w: &[f32],
    hard: Option<(&[i64], &[f32])>,
) -> Stats {
    let (mut s, mut t): (Vec<S>, Vec<T>) = (rounded(s64), rounded(t64));
    let masked: Vec<bool> = (0..rows)
        .map(|r| w[r] == 0.0 && hard.map_or(true, |(_, wc)| wc[r] == 0.0))
        .collect();
    poison(&mut s, cols, &masked, 0);
    poison(&mut t, cols, &masked, 1);
    let full = run(&s, &t, rows, cols, div, temp, w, hard, true, true);
    let ctx0 = || {
        format!(
            "{div:?} {} {rows}x{cols} T={temp} ce={}",
            name2::<S, T>(),
            hard.is_some()
        )
    };

    // Forward only: the same bits (loss and CE loss).
    let fwd = run(&s, &t, rows, cols, div, temp, w, hard, false, false);
    assert_eq!(
        f32_bits(&full.loss),
        f32_bits(&fwd.loss),
        "{}: forward-only loss",
        ctx0()
    );
    if hard.is_some() {
        assert_eq!(
            f32_bits(&full.ce),
            f32_bits(&fwd.ce),
            "{}: forward-only CE",
            ctx0()
        );
    }
    // One gradient at a time: the same bits too (small shapes only,
    // debug-build time).
    if rows * cols < 10_000 {
        let only_s = run(&s, &t, rows, cols, div, temp, w, hard, true, false);
        let only_t = run(&s, &t, rows, cols, div, temp, w, hard, false, true);
        for o in [&only_s.loss, &only_t.loss] {
            assert_eq!(f32_bits(&full.loss), f32_bits(o), "{}", ctx0());
        }
        assert!(
            bits_of(&full.gs) == bits_of(&only_s.gs),
            "{}: grad_student alone",
            ctx0()
        );
        assert!(
            bits_of(&full.gt) == bits_of(&only_t.gt),
            "{}: grad_teacher alone",
            ctx0()
        );
    }

    let (sf, tf) = (widened(&s), widened(&t));
    let half = S::HALF || T::HALF;
    let refs: Vec<Option<RefRow>> = (0..rows)
        .map(|r| {
            if masked[r] {
                return None;
            }
            let span = r * cols..(r + 1) * cols;
            let ce = hard
                .map(|(labels, wc)| (labels[r], wc[r]))
                .filter(|&(_, wc)| wc != 0.0)
                .map(|(y, wc)| (y as usize, wc as f64));
            Some(ref_distill(
                &sf[span.clone()],
                &tf[span],
                div,
                temp as f64,
                w[r] as f64,
                ce,
            ))
        })
        .collect();
    let tensor_max = |f: fn(&RefRow) -> &RefGrad| {
        refs.iter()
            .flatten()
            .map(|r| max_abs(&f(r).want))
            .fold(0.0, f64::max)
    };
    let (max_s, max_t) = (tensor_max(|r| &r.gs), tensor_max(|r| &r.gt));
    let mut st = Stats::default();
    for (r, rr) in refs.iter().enumerate() {
        let span = r * cols..(r + 1) * cols;
        let ctx = || {
            format!(
                "{} row {r} w={} ce_w={:?}",
                ctx0(),
                w[r],
                hard.map(|h| h.1[r])
            )
        };
        let Some(rr) = rr else {
            // Masked: exactly 0 everywhere, whatever the row holds.
            assert_eq!(full.loss[r].to_bits(), 0, "{}", ctx());
            if hard.is_some() {
                assert_eq!(full.ce[r].to_bits(), 0, "{}: CE", ctx());
            }
            assert!(
                full.gs[span.clone()].iter().all(|g| g.to_f64() == 0.0),
                "{}",
                ctx()
            );
            assert!(full.gt[span].iter().all(|g| g.to_f64() == 0.0), "{}", ctx());
            continue;
        };
        if w[r] == 0.0 {
            // CE only: the divergence term reports exactly 0.
            assert_eq!(full.loss[r].to_bits(), 0, "{}", ctx());
        } else {
            let ratio = check_loss(full.loss[r], rr.loss, w[r], half, &ctx);
            st.max_loss_ratio = st.max_loss_ratio.max(ratio);
        }
        if let Some((_, wc)) = hard {
            if wc[r] == 0.0 {
                assert_eq!(full.ce[r].to_bits(), 0, "{}: CE", ctx());
            } else {
                let ctx_ce = || format!("{} CE", ctx());
                let ratio = check_loss(full.ce[r], rr.ce, wc[r], S::HALF, &ctx_ce);
                st.max_loss_ratio = st.max_loss_ratio.max(ratio);
            }
        }
        st.add(check_grad(&full.gs[span.clone()], &rr.gs, max_s, &|| {
            format!("{} grad_student", ctx())
        }));
        st.add(check_grad(&full.gt[span], &rr.gt, max_t, &|| {
            format!("{} grad_teacher", ctx())
        }));
    }
    st
}

/// A sweep over every divergence and temperature: the small shapes each time,
/// one big shape in turn for two temperatures in three (a light sweep runs
/// one temperature per divergence, always with a big shape); CE on for half
/// of the (divergence, temperature) pairs, so that each temperature runs with
/// and without it.
fn distill_sweep<S: Dtype, T: Dtype>(seed: u64, light: bool) {
    let mut rng = Rng::new(seed);
    let mut case = seed as usize;
    for (d, &div) in DIVERGENCES.iter().enumerate() {
        let mut st = Stats::default();
        for (k, &temp) in TEMPERATURES.iter().enumerate() {
            if light && (d + k + seed as usize) % 3 != 0 {
                continue;
            }
            let with_ce = (d + k) % 2 == 0;
            let mut shapes = SMALL_SHAPES.to_vec();
            if light || (d + k) % 3 != 2 {
                shapes.push(BIG_SHAPES[case % BIG_SHAPES.len()]);
                case += 1;
            }
            for (rows, cols) in shapes {
                let (s, t) = logits_pair(&mut rng, rows, cols);
                let (w, w_ce, labels) = row_weights(&mut rng, rows, cols);
                let hard = with_ce.then_some((&labels[..], &w_ce[..]));
                // Without CE, rows 2 mod 6 have no term at all: masked.
                st.add(distill_case::<S, T>(
                    &s, &t, rows, cols, div, temp, &w, hard,
                ));
            }
        }
        println!("distill {} {div:?}: {}", name2::<S, T>(), grad_summary(&st));
    }
}

/// Shapes around the chunk widths of the levels (16, 32, 64 lanes) and
/// their runs of 32 chunks (512, 1024, 2048 elements), partial chunks and
/// runs included.
const WIDTH_SHAPES: [(usize, usize); 8] = [
    (3, 15),
    (2, 16),
    (3, 63),
    (2, 64),
    (3, 65),
    (2, 1023),
    (2, 2049),
    (1, 4160),
];

/// Every SIMD level this CPU has (AVX-512, AVX2+FMA and the portable build,
/// each at its own chunk width), every divergence, with and without CE,
/// against the f64 reference.
fn distill_every_level<S: Dtype, T: Dtype>(seed: u64) {
    at_every_level(|level| {
        let mut rng = Rng::new(seed);
        for (d, &div) in DIVERGENCES.iter().enumerate() {
            let mut st = Stats::default();
            for (k, &(rows, cols)) in WIDTH_SHAPES.iter().chain(&BIG_SHAPES).enumerate() {
                let temp = TEMPERATURES[(d + k) % TEMPERATURES.len()];
                let (s, t) = logits_pair(&mut rng, rows, cols);
                let (w, w_ce, labels) = row_weights(&mut rng, rows, cols);
                let hard = ((d + k) % 2 == 0).then_some((&labels[..], &w_ce[..]));
                st.add(distill_case::<S, T>(
                    &s, &t, rows, cols, div, temp, &w, hard,
                ));
            }
            println!(
                "distill {} {div:?} at {}: {}",
                name2::<S, T>(),
                level.name(),
                grad_summary(&st)
            );
        }
    });
}

/// Rows wider than the kernel's hint budget (more than 37449 f32 or 58254
/// 16-bit columns), where forward KL computes e^a again in the gradient pass
/// instead of keeping it in scratch; T = 2 with hard labels also forms the CE's
/// e^{s − max s} as (e^a)² there. Every level, every divergence.
fn distill_wide_rows<S: Dtype, T: Dtype>(seed: u64, cols: usize) {
    at_every_level(|level| {
        let mut rng = Rng::new(seed);
        for (d, &div) in DIVERGENCES.iter().enumerate() {
            let mut st = Stats::default();
            for (k, &temp) in TEMPERATURES.iter().enumerate() {
                let (s, t) = logits_pair(&mut rng, 2, cols);
                let (w, w_ce, labels) = row_weights(&mut rng, 2, cols);
                // Forward KL and T = 2 always with CE; the others in turn.
                let with_ce = d == 0 || temp == 2.0 || (d + k) % 2 == 0;
                let hard = with_ce.then_some((&labels[..], &w_ce[..]));
                st.add(distill_case::<S, T>(&s, &t, 2, cols, div, temp, &w, hard));
            }
            println!(
                "wide distill {} {div:?} at {}: {}",
                name2::<S, T>(),
                level.name(),
                grad_summary(&st)
            );
        }
    });
}

#[test]
fn distill_wide_rows_f32() {
    distill_wide_rows::<f32, f32>(21, 40_000);
}

#[test]
fn distill_wide_rows_bf16() {
    distill_wide_rows::<bf16, bf16>(22, 60_000);
}

#[test]
fn distill_f32_every_level() {
    distill_every_level::<f32, f32>(11);
}

#[test]
fn distill_bf16_every_level() {
    distill_every_level::<bf16, bf16>(12);
}

#[test]
fn distill_f32() {
    distill_sweep::<f32, f32>(1, false);
}

#[test]
fn distill_bf16() {
    distill_sweep::<bf16, bf16>(2, false);
}

#[test]
fn distill_f16() {
    distill_sweep::<f16, f16>(3, false);
}

/// Mixed storage types (a lighter sweep: a third of the pairs each).
#[test]
fn distill_mixed_f32_half() {
    distill_sweep::<f32, bf16>(4, true);
    distill_sweep::<f32, f16>(5, true);
}

#[test]
fn distill_mixed_half_f32() {
    distill_sweep::<bf16, f32>(6, true);
    distill_sweep::<f16, f32>(7, true);
}

#[test]
fn distill_mixed_half_half() {
    distill_sweep::<bf16, f16>(8, true);
    distill_sweep::<f16, bf16>(9, true);
}

// ---------------------------------------------------------------------------
// The references themselves: central finite differences of the f64 loss.

#[test]
fn references_match_finite_differences() {
    let mut rng = Rng::new(100);
    let cols = 7;
    for (d, &div) in DIVERGENCES.iter().enumerate() {
        for &temp in &TEMPERATURES {
            for ce in [None, Some((d % cols, 0.7))] {
                let (s, t) = logits_pair(&mut rng, 1, cols);
                let w = 1.3;
                let r = ref_distill(&s, &t, div, temp as f64, w, ce);
                for (which, g) in [(0, &r.gs), (1, &r.gt)] {
                    for j in 0..cols {
                        let h = 1e-5;
                        let (mut sp, mut sm, mut tp, mut tm) =
                            (s.clone(), s.clone(), t.clone(), t.clone());
                        if which == 0 {
                            sp[j] += h;
                            sm[j] -= h;
                        } else {
                            tp[j] += h;
                            tm[j] -= h;
                        }
                        let up = ref_total(&sp, &tp, div, temp as f64, w, ce);
                        let down = ref_total(&sm, &tm, div, temp as f64, w, ce);
                        let fd = (up - down) / (2.0 * h);
                        let scale = max_abs(&g.want).max(1e-3);
                        assert!(
                            (fd - g.want[j]).abs() <= 1e-6 * scale + 1e-8,
                            "{div:?} T={temp} ce={ce:?} {} col {j}: analytic {:e} \
                             finite difference {fd:e}",
                            ["student", "teacher"][which],
                            g.want[j]
                        );
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Edge cases.

/// Rows with weight 0 / CE weight 0 in every combination, with NaN and inf in
/// the rows that are never read; rows with divergence weight 0 but a CE
/// weight get only the CE gradient and report a divergence loss of exactly 0.
#[test]
fn distill_masked_rows() {
    fn run_all<S: Dtype, T: Dtype>(rows: usize, cols: usize) {
        let mut rng = Rng::new(200 + cols as u64);
        for (d, &div) in DIVERGENCES.iter().enumerate() {
            // T = 1 and T != 1 (the CE has its own partition pass there);
            // one of them for the parallel shape (debug-build time).
            for (k, temp) in [[1.0, 2.0][d % 2], [0.5, 1.0][d % 2]]
                .into_iter()
                .enumerate()
            {
                if is_parallel(rows, cols) && k == 1 {
                    continue;
                }
                let (s, t) = logits_pair(&mut rng, rows, cols);
                let (w, w_ce, labels) = row_weights(&mut rng, rows, cols);
                // With CE: rows 3 mod 6 masked, rows 2 mod 6 CE only.
                distill_case::<S, T>(&s, &t, rows, cols, div, temp, &w, Some((&labels, &w_ce)));
                // All weights 0: everything exactly 0.
                let zeros = vec![0.0f32; rows];
                distill_case::<S, T>(
                    &s,
                    &t,
                    rows,
                    cols,
                    div,
                    temp,
                    &zeros,
                    Some((&labels, &zeros)),
                );
                distill_case::<S, T>(&s, &t, rows, cols, div, temp, &zeros, None);
            }
        }
    }
    for (rows, cols) in [(12, 33), (33, 1000)] {
        assert_eq!(is_parallel(rows, cols), rows == 33);
        run_all::<f32, f32>(rows, cols);
        run_all::<bf16, f16>(rows, cols);
    }
}

/// -inf logits at the same places in student and teacher (banned tokens):
/// finite losses and gradients that match the reference; and -inf on one side
/// only where the divergence stays finite: the teacher's for KL(P‖Q) (terms
/// with P_j = 0 count 0), the student's for KL(Q‖P), either for TVD and JSD.
#[test]
fn distill_negative_infinity() {
    fn run_all<S: Dtype, T: Dtype>() {
        let ninf = f64::NEG_INFINITY;
        let mut rng = Rng::new(300);
        for &(rows, cols) in &[(4, 7), (4, 1000), (33, 1000)] {
            for (d, &div) in DIVERGENCES.iter().enumerate() {
                for (k, &temp) in TEMPERATURES.iter().enumerate() {
                    // The wider shapes less often (debug-build time).
                    let every = [1, 3, 6][(cols > 7) as usize + is_parallel(rows, cols) as usize];
                    if (d + k) % every != 0 {
                        continue;
                    }
                    let (mut s, mut t) = logits_pair(&mut rng, rows, cols);
                    let student_only = matches!(
                        div,
                        Divergence::ReverseKl | Divergence::Tvd | Divergence::Jsd { .. }
                    );
                    let teacher_only = !matches!(div, Divergence::ReverseKl);
                    for r in 0..rows {
                        for j in 0..cols {
                            let x = r * cols + j;
                            // Shared: every row, a third of the columns
                            // (never column 0: a row keeps finite entries).
                            if j % 3 == 1 {
                                s[x] = ninf;
                                t[x] = ninf;
                            }
                            if r % 2 == 1 && j % 5 == 2 {
                                if teacher_only && j % 2 == 0 {
                                    t[x] = ninf;
                                } else if student_only {
                                    s[x] = ninf;
                                }
                            }
                        }
                    }
                    // CE labels on finite student logits.
                    let labels: Vec<i64> = (0..rows)
                        .map(|r| {
                            (0..cols)
                                .rev()
                                .find(|&j| s[r * cols + j].is_finite())
                                .unwrap() as i64
                        })
                        .collect();
                    let w = vec![1.0f32; rows];
                    let w_ce = vec![0.5f32; rows];
                    let hard = (k % 2 == 0).then_some((&labels[..], &w_ce[..]));
                    let st = distill_case::<S, T>(&s, &t, rows, cols, div, temp, &w, hard);
                    assert!(st.elements > 0);
                    let (sr, tr): (Vec<S>, Vec<T>) = (rounded(&s), rounded(&t));
                    let out = run(&sr, &tr, rows, cols, div, temp, &w, hard, true, true);
                    assert!(
                        out.loss.iter().all(|l| l.is_finite()),
                        "{div:?}: {:?}",
                        out.loss
                    );
                    assert!(out.gs.iter().all(|g| g.to_f32().is_finite()));
                    assert!(out.gt.iter().all(|g| g.to_f32().is_finite()));
                }
            }
        }
    }
    run_all::<f32, f32>();
    run_all::<bf16, bf16>();
    run_all::<f16, f32>();
}

/// JSD with logits spread at scale 400: most log-probabilities are far below
/// -104 (their probabilities are 0 even as f32 subnormals), yet log M, the
/// loss and the gradients stay finite and match the reference. A few columns
/// near each row's top share the mass, so the gradients are not all 0.
#[test]
fn distill_jsd_far_tails() {
    fn run_all<S: Dtype, T: Dtype>() {
        let mut rng = Rng::new(400);
        for &(rows, cols) in &[(6, 33), (5, 1000), (33, 1000)] {
            for (k, &temp) in TEMPERATURES.iter().enumerate() {
                for (d, beta) in [0.1f64, 0.5, 0.9].into_iter().enumerate() {
                    // The wider shapes less often (debug-build time).
                    let every = [1, 3, 9][(cols > 33) as usize + is_parallel(rows, cols) as usize];
                    if (d + k) % every != 0 {
                        continue;
                    }
                    let mut s = Vec::with_capacity(rows * cols);
                    let mut t = Vec::with_capacity(rows * cols);
                    for r in 0..rows {
                        for j in 0..cols {
                            let (x, y) = if j % 11 == 3 && r % 3 != 2 {
                                // Near the top: spread of a few units.
                                let x = 1600.0 + 2.0 * rng.normal();
                                (
                                    x,
                                    if r % 2 == 0 {
                                        x + rng.normal()
                                    } else {
                                        1600.0 + 2.0 * rng.normal()
                                    },
                                )
                            } else {
                                (400.0 * rng.normal(), 400.0 * rng.normal())
                            };
                            t.push(x);
                            s.push(y);
                        }
                    }
                    let (w, w_ce, labels) = row_weights(&mut rng, rows, cols);
                    let hard = (k == 1).then_some((&labels[..], &w_ce[..]));
                    let div = Divergence::Jsd { beta };
                    distill_case::<S, T>(&s, &t, rows, cols, div, temp, &w, hard);
                    // Well below -104 somewhere (the point of the test).
                    let lq = ref_log_softmax(&widened(&rounded::<S>(&s[..cols])), temp as f64);
                    assert!(lq.iter().any(|&v| v < -1000.0));
                    let (sr, tr): (Vec<S>, Vec<T>) = (rounded(&s), rounded(&t));
                    let out = run(&sr, &tr, rows, cols, div, temp, &w, hard, true, true);
                    assert!(out.loss.iter().all(|l| l.is_finite()));
                    assert!(out.gs.iter().all(|g| g.to_f32().is_finite()));
                    assert!(out.gt.iter().all(|g| g.to_f32().is_finite()));
                }
            }
        }
    }
    run_all::<f32, f32>();
    run_all::<bf16, bf16>();
    run_all::<f16, f16>();
}

/// T = 2 with hard labels: the CE's e^{s − max s} is (e^{(s − max s)/2})²
/// there (one multiply, not a third exp). Student rows hold logits at
/// max − 95 (the square would be a subnormal ~1e-41: flushed to 0, as the
/// exp flushes), at max − 87.6 .. −86.6 (around that cut), at max − 200
/// (e^a itself is 0) and −inf shared with the teacher; some labels sit on
/// such logits. Loss, CE and gradients against the f64 reference at every
/// SIMD level, f32, bf16 and f16.
#[test]
fn distill_t2_hard_labels_far_tails() {
    fn run_all<S: Dtype, T: Dtype>(level: kdcore_kernels::SimdLevel) {
        let mut rng = Rng::new(800);
        let shapes = [(3, 15), (4, 64), (3, 65), (6, 1023), (2, 4160), (2, 32000)];
        for (d, &div) in DIVERGENCES.iter().enumerate() {
            let mut st = Stats::default();
            for (k, &(rows, cols)) in shapes.iter().enumerate() {
                // The widest shape for two divergences (debug-build time).
                if cols == 32000 && d % 3 != 0 {
                    continue;
                }
                let (mut s, mut t) = logits_pair(&mut rng, rows, cols);
                let mut labels = Vec::with_capacity(rows);
                for r in 0..rows {
                    let row = &mut s[r * cols..(r + 1) * cols];
                    let max = max64(row);
                    for (j, x) in row.iter_mut().enumerate().skip(1) {
                        match j % 7 {
                            2 => *x = max - 200.0,
                            4 => *x = max - 95.0,
                            5 => *x = max - rng.range(86.6, 87.6),
                            _ => {}
                        }
                    }
                    for j in (1..cols).filter(|j| j % 11 == 3) {
                        s[r * cols + j] = f64::NEG_INFINITY;
                        t[r * cols + j] = f64::NEG_INFINITY;
                    }
                    // Labels on a far logit, a near-cut one, or anywhere finite.
                    let finite = |j: &usize| s[r * cols + j].is_finite();
                    let pick = |m: usize| (0..cols).rev().filter(finite).find(|j| j % 7 == m);
                    let y = match (r + k) % 4 {
                        0 => pick(2),
                        1 => pick(4),
                        2 => pick(5),
                        _ => None,
                    };
                    labels.push(y.unwrap_or_else(|| rng.below(cols)) as i64);
                    if !finite(&(labels[r] as usize)) {
                        labels[r] = 0;
                    }
                }
                // Every row has a CE term; every other one a divergence term.
                let w: Vec<f32> = (0..rows).map(|r| [1.3, 0.0][r % 2]).collect();
                let w_ce: Vec<f32> = (0..rows).map(|r| [0.5, 1.0][r % 2]).collect();
                let hard = Some((&labels[..], &w_ce[..]));
                st.add(distill_case::<S, T>(&s, &t, rows, cols, div, 2.0, &w, hard));
                // The far logits are there after rounding: below the cut.
                let sr = widened(&rounded::<S>(&s[..cols]));
                let a1 = shifted_and_log_z(&sr, 1.0).0;
                assert!(a1.iter().any(|&v| v < -90.0 && v > -100.0));
            }
            println!(
                "distill T=2 far tails {} {div:?} at {}: {}",
                name2::<S, T>(),
                level.name(),
                grad_summary(&st)
            );
        }
    }
    at_every_level(|level| {
        run_all::<f32, f32>(level);
        run_all::<bf16, bf16>(level);
        run_all::<f16, f16>(level);
    });
}

/// Identical student and teacher: KL, reverse KL and TVD are exactly 0 with
/// exactly-zero gradients (TVD: sign(0) = 0), JSD 0 up to rounding; cols = 1:
/// P = Q = 1 whatever the logits, every gradient exactly 0.
#[test]
fn distill_identical_and_single_column() {
    fn run_all<E: Dtype>() {
        let mut rng = Rng::new(500);
        for &(rows, cols) in &[(3, 1), (4, 33), (2, 1000)] {
            let x: Vec<f64> = (0..rows * cols).map(|_| 3.0 * rng.normal()).collect();
            let y: Vec<f64> = if cols == 1 {
                (0..rows).map(|_| rng.normal()).collect()
            } else {
                x.clone()
            };
            let w = vec![1.5f32; rows];
            for &div in &DIVERGENCES {
                for temp in TEMPERATURES {
                    distill_case::<E, E>(&x, &y, rows, cols, div, temp, &w, None);
                    let (xr, yr): (Vec<E>, Vec<E>) = (rounded(&x), rounded(&y));
                    let out = run(&xr, &yr, rows, cols, div, temp, &w, None, true, true);
                    let jsd = matches!(div, Divergence::Jsd { .. });
                    let ctx = || format!("{div:?} {} {rows}x{cols} T={temp}", E::NAME);
                    if !jsd {
                        assert!(
                            out.loss.iter().all(|&l| l == 0.0),
                            "{}: {:?}",
                            ctx(),
                            out.loss
                        );
                    }
                    if !jsd || cols == 1 {
                        assert!(out.gs.iter().all(|g| g.to_f32() == 0.0), "{}", ctx());
                        assert!(out.gt.iter().all(|g| g.to_f32() == 0.0), "{}", ctx());
                    }
                }
            }
        }
    }
    run_all::<f32>();
    run_all::<bf16>();
    run_all::<f16>();
}

/// The strict 16-bit loss rule for JSD on wide rows: identical bf16 rows
/// (JSD = 0) and close rows (JSD ~ 1e-3), 32000 wide, T = 1 and 2. (It
/// caught log M formed in absolute log space: errors ~ε·H(Q), up to 8e-7.)
#[test]
fn distill_jsd_loss_16bit_strict() {
    let (rows, cols) = (2, 32000);
    let mut rng = Rng::new(700);
    let x: Vec<f64> = (0..rows * cols).map(|_| 3.0 * rng.normal()).collect();
    let y: Vec<f64> = x.iter().map(|v| v + 0.2 * rng.normal()).collect();
    let w = vec![1.0f32; rows];
    let mut worst = 0.0f64;
    for (s64, t64) in [(&x, &x), (&x, &y)] {
        let (s, t): (Vec<bf16>, Vec<bf16>) = (rounded(s64), rounded(t64));
        let (sf, tf) = (widened(&s), widened(&t));
        for temp in [1.0f32, 2.0] {
            for beta in [0.1f64, 0.5, 0.9] {
                let div = Divergence::Jsd { beta };
                let out = run(&s, &t, rows, cols, div, temp, &w, None, false, false);
                for r in 0..rows {
                    let span = r * cols..(r + 1) * cols;
                    let want =
                        ref_distill(&sf[span.clone()], &tf[span], div, temp as f64, 1.0, None).loss;
                    let (err, tol) = loss_error(out.loss[r], want, 1.0, true);
                    println!(
                        "JSD({beta}) T={temp} row {r}: got {:e} want {want:e} error {err:.2e} \
                         = {:.2} x tolerance",
                        out.loss[r],
                        err / tol
                    );
                    worst = worst.max(err / tol);
                }
            }
        }
    }
    assert!(
        worst <= 1.0,
        "JSD loss error up to {worst:.2} x the 16-bit tolerance"
    );
}

// ---------------------------------------------------------------------------
// Argument errors: never a panic, nothing written.

#[test]
fn distill_bad_arguments() {
    let (rows, cols) = (3, 4);
    let x = vec![0.5f32; rows * cols];
    let w = vec![1.0f32; rows];
    let is_len = |e: KernelError| matches!(e, KernelError::Length { .. });
    let is_param = |e: KernelError| matches!(e, KernelError::Parameter { .. });
    let kl = Divergence::Kl;
    let none = || Grads::<f32, f32> {
        student: None,
        teacher: None,
    };
    let call = |s: &[f32],
                t: &[f32],
                div: Divergence,
                temp: f32,
                w: &[f32],
                loss: &mut [f32],
                hard: Option<HardLabels<'_>>,
                grads: Grads<'_, f32, f32>| {
        distill(s, t, rows, cols, div, temp, w, loss, hard, grads)
    };
    let mut loss = vec![f32::NAN; rows];

    // JSD's beta: 0 and 1 are the KLs (refused), NaN and outside (0, 1) too.
    for beta in [0.0, 1.0, -0.0, f64::NAN, -0.5, 1.5, f64::INFINITY] {
        let e = call(
            &x,
            &x,
            Divergence::Jsd { beta },
            1.0,
            &w,
            &mut loss,
            None,
            none(),
        )
        .unwrap_err();
        assert!(is_param(e.clone()), "beta {beta}: {e:?}");
        assert!(e.to_string().contains("beta"), "{e}");
    }
    // Temperatures.
    for temp in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        assert!(is_param(
            call(&x, &x, kl, temp, &w, &mut loss, None, none()).unwrap_err()
        ));
    }
    // Lengths.
    assert!(is_len(
        call(&x[..11], &x, kl, 1.0, &w, &mut loss, None, none()).unwrap_err()
    ));
    assert!(is_len(
        call(&x, &x[..11], kl, 1.0, &w, &mut loss, None, none()).unwrap_err()
    ));
    assert!(is_len(
        call(&x, &x, kl, 1.0, &w[..2], &mut loss, None, none()).unwrap_err()
    ));
    assert!(is_len(
        call(&x, &x, kl, 1.0, &w, &mut loss[..2], None, none()).unwrap_err()
    ));
    let mut short = vec![f32::NAN; rows * cols - 1];
    let mut good = vec![f32::NAN; rows * cols];
    let g = Grads {
        student: Some(&mut short[..]),
        teacher: None,
    };
    assert!(is_len(
        call(&x, &x, kl, 1.0, &w, &mut loss, None, g).unwrap_err()
    ));
    let g = Grads {
        student: Some(&mut good[..]),
        teacher: Some(&mut short[..]),
    };
    assert!(is_len(
        call(&x, &x, kl, 1.0, &w, &mut loss, None, g).unwrap_err()
    ));
    // cols = 0.
    let e = distill::<f32, f32>(&[], &[], 3, 0, kl, 1.0, &w, &mut loss, None, none());
    assert!(is_param(e.unwrap_err()));

    // Hard labels: lengths, and labels outside [0, cols) on rows with a CE
    // weight (on rows without one they are ignored).
    let labels = [0i64, 1, 3];
    let w_ce = vec![1.0f32; rows];
    let mut ce = vec![f32::NAN; rows];
    for (l, wc, cl) in [(2usize, 3usize, 3usize), (3, 2, 3), (3, 3, 2)] {
        let h = HardLabels {
            labels: &labels[..l],
            weight: &w_ce[..wc],
            loss: &mut ce[..cl],
        };
        assert!(is_len(
            call(&x, &x, kl, 1.0, &w, &mut loss, Some(h), none()).unwrap_err()
        ));
    }
    for bad in [-1i64, cols as i64, cols as i64 + 100, i64::MIN, i64::MAX] {
        for temp in [1.0, 2.0] {
            let labels = vec![0, bad, 2];
            let h = HardLabels {
                labels: &labels,
                weight: &w_ce,
                loss: &mut ce,
            };
            let e = call(&x, &x, kl, temp, &w, &mut loss, Some(h), none()).unwrap_err();
            assert!(is_param(e.clone()), "{e:?}");
            assert!(e.to_string().contains("label"), "{e}");
        }
    }
    // Nothing was written by the refused calls.
    assert!(loss.iter().all(|v| v.is_nan()));
    assert!(ce.iter().all(|v| v.is_nan()));
    assert!(good.iter().chain(&short).all(|v| v.is_nan()));

    // The same bad label on a row whose CE weight is 0 is fine.
    let labels = vec![0, -1, 2];
    let w_ce0 = vec![1.0, 0.0, 1.0];
    let h = HardLabels {
        labels: &labels,
        weight: &w_ce0,
        loss: &mut ce,
    };
    call(&x, &x, kl, 1.0, &w, &mut loss, Some(h), none()).unwrap();
    assert_eq!(ce[1].to_bits(), 0);
    assert!(loss.iter().all(|v| v.is_finite()));

    // rows = 0 is an empty, valid call.
    distill::<f32, f32>(
        &[],
        &[],
        0,
        5,
        Divergence::Jsd { beta: 0.5 },
        1.0,
        &[],
        &mut [],
        None,
        none(),
    )
    .unwrap();
}

// ---------------------------------------------------------------------------
// Thread pool.

#[test]
fn distill_identical_across_thread_counts() {
    let (rows, cols) = (67, 1000);
    assert!(is_parallel(rows, cols));
    let mut rng = Rng::new(600);
    let (s64, t64) = logits_pair(&mut rng, rows, cols);
    let (s, t): (Vec<bf16>, Vec<f32>) = (rounded(&s64), rounded(&t64));
    let (w, w_ce, labels) = row_weights(&mut rng, rows, cols);
    let all = || -> Vec<u32> {
        let mut v = Vec::new();
        for (d, &div) in DIVERGENCES.iter().enumerate() {
            let temp = TEMPERATURES[d % 3];
            let hard = (d % 2 == 0).then_some((&labels[..], &w_ce[..]));
            let o = run(&s, &t, rows, cols, div, temp, &w, hard, true, true);
            v.extend(f32_bits(&o.loss));
            v.extend(f32_bits(&o.ce));
            v.extend(bits_of(&o.gs));
            v.extend(bits_of(&o.gt));
        }
        v
    };
    pool::set_num_threads(1).unwrap();
    let reference = all();
    for threads in [2, 3, 1] {
        pool::set_num_threads(threads).unwrap();
        assert_eq!(pool::num_threads(), threads);
        assert!(all() == reference, "differs with {threads} threads");
    }
    pool::set_num_threads(pool::default_num_threads()).unwrap();
}
