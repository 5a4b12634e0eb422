//! The sparse-teacher KL kernel (`kdcore_kernels::sparse_kl`) against a
//! float64 reference written here from the math of its module docs:
//!
//! - teacher masses m_i = e^{lp_i} on its k ids, m_tail = max(0, 1 − Σ m_i)
//!   (dropped for `Renormalize`, and when the k ids cover the vocabulary);
//! - re-tempered from T0 to T: p_c ∝ m_c^{T0/T} over the k ids and the tail;
//! - the student Q = softmax(s / T) over the full vocabulary, Q_tail = Σ Q_j
//!   over the tokens outside the ids;
//! - loss and gradient per tail mode from the table in the module docs, each
//!   row weighted by w_r.
//!
//! Inputs are deterministic pseudo-random (xorshift64*), students in f32 /
//! bf16 / f16, at T = 0.5 / 1 / 2 with T0 equal to T or not, k from 1 to
//! cols, cols 1, 7, 33, 1000, 32000, serial and parallel. Tolerances: see
//! `common/mod.rs` (the rules of `kernels.rs`; the teacher's log-probabilities
//! are f32, so 16-bit rules apply when the student is 16-bit). The reference
//! is checked against finite differences of its own loss, and, with k = cols
//! and T0 = T, the kernel against the dense KL of `distill`.

mod common;

use common::*;
use half::{bf16, f16};
use kdcore_kernels::{
    distill, pool, sparse_kl, sparse_kl_at, Divergence, Grads, KernelError, SparseTeacher, Tail,
};

const TAILS: [Tail; 3] = [Tail::Bucket, Tail::Renormalize, Tail::Zero];

// ---------------------------------------------------------------------------
// float64 reference.

struct RefSparse {
    loss: f64,
    grad: RefGrad,
}

/// One row: student logits `s` (f64 values of the rounded inputs), the
/// teacher's ids and log-probabilities (f64 values of the f32 inputs), the
/// teacher's temperature `t0`, the distillation temperature `temp`.
fn ref_sparse(
    s: &[f64],
    ids: &[usize],
    lps: &[f64],
    t0: f64,
    temp: f64,
    tail: Tail,
    w: f64,
) -> RefSparse {
    let (cols, k) = (s.len(), ids.len());
    let ratio = t0 / temp;
    let mass: f64 = lps.iter().map(|lp| lp.exp()).sum();
    let m_tail = if tail == Tail::Renormalize || k == cols {
        0.0
    } else {
        (1.0 - mass).max(0.0)
    };
    // p_c ∝ m_c^ratio over the ids and the tail, in log space.
    let mut logits: Vec<f64> = lps.iter().map(|lp| ratio * lp).collect();
    if m_tail > 0.0 {
        logits.push(ratio * m_tail.ln());
    }
    let top = max64(&logits);
    let lse = top + logits.iter().map(|v| (v - top).exp()).sum::<f64>().ln();
    let lp_c: Vec<f64> = logits.iter().map(|v| v - lse).collect();
    let p: Vec<f64> = lp_c[..k].iter().map(|v| v.exp()).collect();
    let p_tail = if m_tail > 0.0 { lp_c[k].exp() } else { 0.0 };
    let p_sum: f64 = p.iter().sum();

    let (a, lz) = shifted_and_log_z(s, temp);
    let lq: Vec<f64> = a.iter().map(|v| v - lz).collect();
    let q: Vec<f64> = lq.iter().map(|v| v.exp()).collect();
    let mut inside = vec![false; cols];
    for &id in ids {
        inside[id] = true;
    }
    let q_tail: f64 = (0..cols).filter(|&j| !inside[j]).map(|j| q[j]).sum();

    let mut loss = 0.0;
    for (i, &id) in ids.iter().enumerate() {
        if p[i] > 0.0 {
            loss += p[i] * (lp_c[i] - lq[id]);
        }
    }
    if tail == Tail::Bucket && p_tail > 0.0 {
        loss += p_tail * (p_tail.ln() - q_tail.ln());
    }

    // ∂loss/∂s_j · T = Q_j m_in − p_j on the ids, Q_j m_out elsewhere.
    let (m_in, m_out) = match tail {
        Tail::Bucket => (1.0, 1.0 - if p_tail > 0.0 { p_tail / q_tail } else { 0.0 }),
        Tail::Renormalize => (1.0, 1.0),
        Tail::Zero => (p_sum, p_sum),
    };
    let (c, scale) = (w / temp, w.abs() / temp);
    let rq: Vec<f64> = a.iter().map(|&v| fin(v) + 3.0 + ACC).collect();
    // Relative errors of Z and of the tail sum (f32 exponentials, f32 runs).
    let err_z: f64 = (0..cols).map(|j| q[j] * rq[j]).sum();
    let err_tail: f64 = if q_tail > 0.0 {
        (0..cols)
            .filter(|&j| !inside[j])
            .map(|j| q[j] * rq[j])
            .sum::<f64>()
            / q_tail
    } else {
        0.0
    };
    let tail_ratio = if p_tail > 0.0 { p_tail / q_tail } else { 0.0 };
    // The f32 ratio T0/T (three roundings) moves every log p by 3ε|ratio lp|.
    let spread: f64 = p.iter().zip(lps).map(|(pi, lp)| pi * fin(ratio * lp)).sum();
    let mut g = RefGrad::zeros(cols);
    for j in 0..cols {
        if !inside[j] {
            g.want[j] = c * q[j] * m_out;
            g.cond[j] = scale
                * q[j]
                * (rq[j] * m_out.abs() + tail_ratio * (err_tail + err_z + ACC + 3.0) + 3.0);
        }
        if a[j] < FLUSH_BELOW {
            g.slack[j] = scale * q[j] * if inside[j] { m_in } else { m_out.abs() };
        }
    }
    for (i, &id) in ids.iter().enumerate() {
        let v = q[id] * m_in - p[i];
        g.want[id] = c * v;
        let p_err = p[i] * 3.0 * (fin(ratio * lps[i]) + spread + 2.0);
        g.cond[id] = scale * (q[id] * (rq[id] + err_z) * m_in + p_err + 3.0 * v.abs());
    }
    RefSparse {
        loss: w * loss,
        grad: g,
    }
}

// ---------------------------------------------------------------------------
// Inputs.

/// A sparse teacher and a student for `rows x cols`: per row, teacher logits
/// of varying scale (some peaked), the teacher's log-probabilities at T0, and
/// k ids: the true top-k for two rows in three (small tail mass), random ids
/// for the others (large tail mass). Students are independent of the teacher
/// or close to it.
struct Inputs {
    student: Vec<f64>,
    ids: Vec<i64>,
    lps: Vec<f32>,
}

fn inputs(rng: &mut Rng, rows: usize, cols: usize, k: usize, t0: f64) -> Inputs {
    let mut out = Inputs {
        student: Vec::with_capacity(rows * cols),
        ids: Vec::with_capacity(rows * k),
        lps: Vec::with_capacity(rows * k),
    };
    for r in 0..rows {
        let sigma = [0.5, 1.0, 3.0, 6.0][r % 4];
        let shift = rng.range(-20.0, 20.0);
        let mut tl: Vec<f64> = (0..cols).map(|_| sigma * rng.normal() + shift).collect();
        if r % 5 == 2 {
            let j = rng.below(cols);
            tl[j] += 12.0;
        }
        let lp = ref_log_softmax(&tl, t0);
        let ids: Vec<usize> = if r % 3 == 0 {
            rng.distinct(cols, k)
        } else {
            let mut order: Vec<usize> = (0..cols).collect();
            order.sort_by(|&x, &y| lp[y].total_cmp(&lp[x]));
            order.truncate(k);
            // Not in sorted order.
            let shuffle = rng.distinct(k, k);
            shuffle.into_iter().map(|i| order[i]).collect()
        };
        out.ids.extend(ids.iter().map(|&j| j as i64));
        out.lps.extend(ids.iter().map(|&j| lp[j] as f32));
        let close = r % 3 == 1;
        for &x in &tl {
            out.student.push(if close {
                x + 0.5 * rng.normal()
            } else {
                sigma * rng.normal() - shift
            });
        }
    }
    out
}

fn weights(rng: &mut Rng, rows: usize) -> Vec<f32> {
    (0..rows)
        .map(|r| {
            if r % 5 == 3 {
                0.0
            } else {
                rng.range(0.25, 2.0) as f32
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------
// One case.

#[allow(clippy::too_many_arguments)]
fn call<S: Dtype>(
    s: &[S],
    rows: usize,
    cols: usize,
    ids: &[i64],
    lps: &[f32],
    t0: f32,
    temp: f32,
    tail: Tail,
    w: &[f32],
    with_grad: bool,
) -> (Vec<f32>, Vec<S>) {
    let mut loss = vec![f32::NAN; rows];
    let mut grad = vec![S::from_f32(f32::NAN); if with_grad { rows * cols } else { 0 }];
    let teacher = SparseTeacher {
        ids,
        logprobs: lps,
        k: ids.len() / rows.max(1),
        temperature: t0,
    };
    let g = with_grad.then_some(&mut grad[..]);
    sparse_kl_at(level(), s, rows, cols, teacher, temp, tail, w, &mut loss, g).unwrap();
    (loss, grad)
}

/// Runs `sparse_kl` on `inp` (student rounded to S; rows of weight 0 hold NaN
/// and ±inf), checks loss and gradient against the reference, and that the
/// forward-only loss has the same bits. Returns the stats and the outputs.
#[allow(clippy::too_many_arguments)]
fn sparse_case<S: Dtype>(
    inp: &Inputs,
    rows: usize,
    cols: usize,
    k: usize,
    t0: f32,
    temp: f32,
    tail: Tail,
    w: &[f32],
) -> (Stats, Vec<f32>, Vec<S>) {
    let mut s: Vec<S> = rounded(&inp.student);
    let poison = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
    for r in (0..rows).filter(|&r| w[r] == 0.0) {
        for j in (0..cols).step_by(2) {
            s[r * cols + j] = S::from_f32(poison[(r + j) % 3]);
        }
    }
    let (loss, grad) = call(&s, rows, cols, &inp.ids, &inp.lps, t0, temp, tail, w, true);
    let (fwd, _) = call(&s, rows, cols, &inp.ids, &inp.lps, t0, temp, tail, w, false);
    let ctx0 = || format!("{tail:?} {} {rows}x{cols} k={k} T0={t0} T={temp}", S::NAME);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&loss), bits(&fwd), "{}: forward-only loss", ctx0());

    let sf = widened(&s);
    let refs: Vec<Option<RefSparse>> = (0..rows)
        .map(|r| {
            (w[r] != 0.0).then(|| {
                let ids: Vec<usize> = inp.ids[r * k..(r + 1) * k]
                    .iter()
                    .map(|&i| i as usize)
                    .collect();
                let lps: Vec<f64> = inp.lps[r * k..(r + 1) * k]
                    .iter()
                    .map(|&v| v as f64)
                    .collect();
                let span = r * cols..(r + 1) * cols;
                ref_sparse(
                    &sf[span],
                    &ids,
                    &lps,
                    t0 as f64,
                    temp as f64,
                    tail,
                    w[r] as f64,
                )
            })
        })
        .collect();
    let tensor_max = refs
        .iter()
        .flatten()
        .map(|r| max_abs(&r.grad.want))
        .fold(0.0, f64::max);
    let mut st = Stats::default();
    for (r, rr) in refs.iter().enumerate() {
        let span = r * cols..(r + 1) * cols;
        let ctx = || format!("{} row {r} w={}", ctx0(), w[r]);
        let Some(rr) = rr else {
            assert_eq!(loss[r].to_bits(), 0, "{}", ctx());
            assert!(grad[span].iter().all(|g| g.to_f64() == 0.0), "{}", ctx());
            continue;
        };
        let ratio = check_loss(loss[r], rr.loss, w[r], S::HALF, &ctx);
        st.max_loss_ratio = st.max_loss_ratio.max(ratio);
        st.add(check_grad(&grad[span], &rr.grad, tensor_max, &ctx));
    }
    (st, loss, grad)
}

/// (rows, cols, k): small shapes every case runs.
const SMALL: [(usize, usize, usize); 6] = [
    (3, 1, 1),
    (4, 7, 1),
    (4, 7, 3),
    (3, 7, 7),
    (4, 33, 5),
    (3, 33, 33),
];

/// Larger shapes, one per case in turn: k beyond the 256 entries kept on the
/// stack, k = cols at 1000, 32000 wide, and two parallel shapes.
const BIG: [(usize, usize, usize); 6] = [
    (5, 1000, 20),
    (33, 1000, 20),
    (3, 1000, 300),
    (1, 32000, 20),
    (2, 1000, 1000),
    (2, 32000, 64),
];

const TEMPERATURES: [f32; 3] = [0.5, 1.0, 2.0];

fn sparse_sweep<S: Dtype>(seed: u64) {
    let mut rng = Rng::new(seed);
    let mut case = seed as usize;
    for tail in TAILS {
        let mut st = Stats::default();
        for (k_t, &temp) in TEMPERATURES.iter().enumerate() {
            // T0 = T for one temperature in three, T0 != T for the others.
            let t0 = [temp, 0.7, 1.7][(k_t + seed as usize) % 3];
            let mut shapes = SMALL.to_vec();
            shapes.push(BIG[case % BIG.len()]);
            case += 1;
            for (rows, cols, k) in shapes {
                let inp = inputs(&mut rng, rows, cols, k, t0 as f64);
                let w = weights(&mut rng, rows);
                st.add(sparse_case::<S>(&inp, rows, cols, k, t0, temp, tail, &w).0);
            }
        }
        println!("sparse {} {tail:?}: {}", S::NAME, grad_summary(&st));
    }
}

/// Every SIMD level this CPU has (each its own chunk width), every tail,
/// on shapes around the widths (16, 32, 64 lanes) and their runs of 32
/// chunks, against the f64 reference.
#[test]
fn sparse_every_level() {
    const WIDTH_SHAPES: [(usize, usize, usize); 7] = [
        (3, 15, 4),
        (2, 16, 16),
        (3, 63, 5),
        (2, 64, 8),
        (3, 65, 64),
        (2, 2049, 20),
        (1, 4160, 100),
    ];
    at_every_level(|level| {
        let mut rng = Rng::new(31);
        for tail in TAILS {
            let mut st = Stats::default();
            for (k, &(rows, cols, top)) in WIDTH_SHAPES.iter().chain(&BIG).enumerate() {
                let temp = TEMPERATURES[k % TEMPERATURES.len()];
                let t0 = [temp, 0.7, 1.7][k % 3];
                let inp = inputs(&mut rng, rows, cols, top, t0 as f64);
                let w = weights(&mut rng, rows);
                st.add(sparse_case::<f32>(&inp, rows, cols, top, t0, temp, tail, &w).0);
            }
            println!(
                "sparse f32 {tail:?} at {}: {}",
                level.name(),
                grad_summary(&st)
            );
        }
    });
}

#[test]
fn sparse_f32() {
    assert!(BIG.iter().any(|&(r, c, _)| is_parallel(r, c)));
    sparse_sweep::<f32>(1);
}

#[test]
fn sparse_bf16() {
    sparse_sweep::<bf16>(2);
}

#[test]
fn sparse_f16() {
    sparse_sweep::<f16>(3);
}

// ---------------------------------------------------------------------------
// The reference itself: central finite differences of its loss.

#[test]
fn reference_matches_finite_differences() {
    let mut rng = Rng::new(100);
    let cols = 9;
    for tail in TAILS {
        for (t0, temp) in [(1.0, 1.0), (1.0, 2.0), (1.5, 0.7)] {
            for k in [1, 4, 9] {
                let inp = inputs(&mut rng, 3, cols, k, t0);
                for r in 0..3 {
                    let s = &inp.student[r * cols..(r + 1) * cols];
                    let ids: Vec<usize> = inp.ids[r * k..(r + 1) * k]
                        .iter()
                        .map(|&i| i as usize)
                        .collect();
                    let lps: Vec<f64> = inp.lps[r * k..(r + 1) * k]
                        .iter()
                        .map(|&v| v as f64)
                        .collect();
                    let w = 1.3;
                    let rr = ref_sparse(s, &ids, &lps, t0, temp, tail, w);
                    let scale = max_abs(&rr.grad.want).max(1e-3);
                    for j in 0..cols {
                        let h = 1e-5;
                        let (mut up, mut down) = (s.to_vec(), s.to_vec());
                        up[j] += h;
                        down[j] -= h;
                        let lu = ref_sparse(&up, &ids, &lps, t0, temp, tail, w).loss;
                        let ld = ref_sparse(&down, &ids, &lps, t0, temp, tail, w).loss;
                        let fd = (lu - ld) / (2.0 * h);
                        assert!(
                            (fd - rr.grad.want[j]).abs() <= 1e-6 * scale + 1e-8,
                            "{tail:?} T0={t0} T={temp} k={k} row {r} col {j}: analytic {:e} \
                             finite difference {fd:e}",
                            rr.grad.want[j]
                        );
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// k = cols: the dense KL.

/// With k = cols and T0 = T, every tail mode is the dense KL(P‖Q) of
/// `distill` with the teacher's full logits (here T · lp, exact in f32 for
/// these T, so that softmax(t / T) = softmax(lp) is the same teacher).
#[test]
fn sparse_full_vocabulary_equals_dense_kl() {
    fn run_all<S: Dtype>(seed: u64) {
        let mut rng = Rng::new(seed);
        for &(rows, cols) in &[(3, 1), (4, 7), (3, 33), (2, 1000), (1, 32000), (33, 1000)] {
            for (k_t, &temp) in TEMPERATURES.iter().enumerate() {
                if cols >= 1000 && k_t as u64 != (seed + cols as u64) % 3 {
                    continue; // the wide shapes at one temperature (debug-build time)
                }
                let inp = inputs(&mut rng, rows, cols, cols, temp as f64);
                let w = weights(&mut rng, rows);
                let s: Vec<S> = rounded(&inp.student);
                // The dense teacher: row r, column ids[i] holds T · lp_i.
                let mut teacher = vec![0.0f32; rows * cols];
                for r in 0..rows {
                    for i in 0..cols {
                        let (id, lp) = (inp.ids[r * cols + i] as usize, inp.lps[r * cols + i]);
                        teacher[r * cols + id] = lp * temp;
                        assert_eq!(teacher[r * cols + id] / temp, lp);
                    }
                }
                let mut dense_loss = vec![f32::NAN; rows];
                let mut dense_grad = vec![S::from_f32(f32::NAN); rows * cols];
                let grads = Grads::<S, f32> {
                    student: Some(&mut dense_grad[..]),
                    teacher: None,
                };
                distill(
                    &s,
                    &teacher,
                    rows,
                    cols,
                    Divergence::Kl,
                    temp,
                    &w,
                    &mut dense_loss,
                    None,
                    grads,
                )
                .unwrap();
                let sf = widened(&s);
                for tail in TAILS {
                    let (_, loss, grad) =
                        sparse_case::<S>(&inp, rows, cols, cols, temp, temp, tail, &w);
                    for r in 0..rows {
                        let span = r * cols..(r + 1) * cols;
                        let ctx = || {
                            format!(
                                "dense vs {tail:?} {} {rows}x{cols} T={temp} row {r}",
                                S::NAME
                            )
                        };
                        if w[r] == 0.0 {
                            assert_eq!(dense_loss[r].to_bits(), 0);
                            continue;
                        }
                        // The dense kernel meets the same reference (the
                        // sparse one, with all k = cols ids).
                        let ids: Vec<usize> = inp.ids[r * cols..(r + 1) * cols]
                            .iter()
                            .map(|&i| i as usize)
                            .collect();
                        let lps: Vec<f64> = inp.lps[r * cols..(r + 1) * cols]
                            .iter()
                            .map(|&v| v as f64)
                            .collect();
                        let rr = ref_sparse(
                            &sf[span.clone()],
                            &ids,
                            &lps,
                            temp as f64,
                            temp as f64,
                            tail,
                            w[r] as f64,
                        );
                        check_loss(dense_loss[r], rr.loss, w[r], S::HALF, &ctx);
                        let row_max = max_abs(&rr.grad.want);
                        check_grad(&dense_grad[span.clone()], &rr.grad, row_max, &ctx);
                        // And the two kernels agree with each other within
                        // one loss tolerance and the f32 gradient rule.
                        let (err, tol) = loss_error(loss[r], dense_loss[r] as f64, w[r], S::HALF);
                        assert!(
                            err <= tol,
                            "{}: sparse {:e} dense {:e}",
                            ctx(),
                            loss[r],
                            dense_loss[r]
                        );
                        for j in span.clone() {
                            let d = (grad[j].to_f64() - dense_grad[j].to_f64()).abs();
                            let i = j - r * cols;
                            let tol = 5e-5 * row_max + 4.0 * EPS * rr.grad.cond[i];
                            let ulp = ulp_distance(grad[j], dense_grad[j]);
                            assert!(
                                d <= tol || (S::HALF && ulp <= 2),
                                "{}: col {i}: sparse {:?} dense {:?}",
                                ctx(),
                                grad[j],
                                dense_grad[j]
                            );
                        }
                    }
                }
            }
        }
    }
    run_all::<f32>(10);
    run_all::<bf16>(11);
    run_all::<f16>(12);
}

// ---------------------------------------------------------------------------
// Edge cases.

/// Teachers at the edges of the domain: zero-mass entries (lp = -inf), masses
/// summing to 1.0005 (accepted; the tail is empty), a single id with all the
/// mass (lp = 0), tiny masses (tail ≈ 1), and k = 1.
#[test]
fn sparse_edge_teachers() {
    fn run_all<S: Dtype>() {
        let mut rng = Rng::new(200);
        let (rows, cols, k) = (5, 40, 4);
        let mut inp = inputs(&mut rng, rows, cols, k, 1.0);
        // Row 0: two zero-mass entries.
        inp.lps[1] = f32::NEG_INFINITY;
        inp.lps[3] = f32::NEG_INFINITY;
        // Row 1: masses summing to 1.0005.
        let row1: Vec<f64> = [0.5, 0.3, 0.2, 0.0005].to_vec();
        for (i, m) in row1.iter().enumerate() {
            inp.lps[k + i] = m.ln() as f32;
        }
        // Row 2: one id with all the mass, the rest none.
        for i in 0..k {
            inp.lps[2 * k + i] = if i == 2 { 0.0 } else { f32::NEG_INFINITY };
        }
        // Row 3: tiny masses (the tail is nearly everything).
        for i in 0..k {
            inp.lps[3 * k + i] = -30.0 - i as f32;
        }
        let w = vec![1.0f32; rows];
        for tail in TAILS {
            for (t0, temp) in [(1.0, 1.0), (1.0, 2.0), (2.0, 0.5)] {
                let (_, loss, grad) = sparse_case::<S>(&inp, rows, cols, k, t0, temp, tail, &w);
                assert!(loss.iter().all(|l| l.is_finite()), "{tail:?}: {loss:?}");
                assert!(grad.iter().all(|g| g.to_f32().is_finite()));
            }
        }
        // k = 1 with the single id holding all the mass: Q_id = 1 would be a
        // zero loss; here the loss is -log Q_id for every tail mode.
        let inp = Inputs {
            student: (0..3 * 7).map(|_| rng.normal()).collect(),
            ids: vec![4, 0, 6],
            lps: vec![0.0, 0.0, 0.0],
        };
        for tail in TAILS {
            sparse_case::<S>(&inp, 3, 7, 1, 1.0, 1.0, tail, &[1.0, 0.5, 2.0]);
        }
    }
    run_all::<f32>();
    run_all::<bf16>();
    run_all::<f16>();
}

/// Rows of weight 0 are never read: NaN / inf logits there (already in every
/// case above), and teacher entries that would be refused on a weighted row
/// (ids out of range or repeated, positive or NaN log-probabilities, masses
/// above 1) are accepted, with loss 0 and gradient exactly 0 (the rule
/// `distill` documents for hard labels; `sparse_kl` checks only weighted rows).
#[test]
fn sparse_masked_rows() {
    let (rows, cols, k) = (4, 10, 3);
    let s = vec![0.25f32; rows * cols];
    let ids = vec![0, 1, 2, 99, -1, 99, 3, 4, 5, 5, 5, 5];
    let lps = vec![
        -1.0,
        -2.0,
        -3.0,
        f32::NAN,
        0.5,
        -0.1,
        -0.5,
        -1.5,
        -2.5,
        -0.01,
        -0.01,
        -0.01,
    ];
    let w = vec![1.0, 0.0, 2.0, 0.0];
    for tail in TAILS {
        let mut loss = vec![f32::NAN; rows];
        let mut grad = vec![f32::NAN; rows * cols];
        let teacher = SparseTeacher {
            ids: &ids,
            logprobs: &lps,
            k,
            temperature: 1.0,
        };
        sparse_kl(
            &s,
            rows,
            cols,
            teacher,
            1.0,
            tail,
            &w,
            &mut loss,
            Some(&mut grad),
        )
        .unwrap();
        for r in [1, 3] {
            assert_eq!(loss[r].to_bits(), 0);
            assert!(grad[r * cols..(r + 1) * cols].iter().all(|&g| g == 0.0));
        }
        assert!(loss[0].is_finite() && loss[0] > 0.0 && loss[2].is_finite());
    }
}

// ---------------------------------------------------------------------------
// Argument errors: never a panic, nothing written.

#[test]
fn sparse_bad_arguments() {
    let (rows, cols, k) = (2, 6, 2);
    let s = vec![0.5f32; rows * cols];
    let ids = vec![0i64, 1, 2, 3];
    let lps = vec![-1.0f32, -2.0, -1.5, -0.5];
    let w = vec![1.0f32; rows];
    let is_len = |e: KernelError| matches!(e, KernelError::Length { .. });
    let is_param = |e: KernelError| matches!(e, KernelError::Parameter { .. });
    let mut loss = vec![f32::NAN; rows];
    let mut grad = vec![f32::NAN; rows * cols];
    #[allow(clippy::too_many_arguments)]
    fn go(
        s: &[f32],
        rows: usize,
        cols: usize,
        ids: &[i64],
        lps: &[f32],
        k: usize,
        t0: f32,
        temp: f32,
        w: &[f32],
        loss: &mut [f32],
        grad: Option<&mut [f32]>,
    ) -> Result<(), KernelError> {
        let teacher = SparseTeacher {
            ids,
            logprobs: lps,
            k,
            temperature: t0,
        };
        sparse_kl(s, rows, cols, teacher, temp, Tail::Bucket, w, loss, grad)
    }
    // The valid call works.
    go(&s, rows, cols, &ids, &lps, k, 1.0, 1.0, &w, &mut loss, None).unwrap();
    loss.fill(f32::NAN);

    // k = 0.
    let e = go(&s, rows, cols, &[], &[], 0, 1.0, 1.0, &w, &mut loss, None).unwrap_err();
    assert!(is_param(e.clone()), "{e:?}");
    // Ids out of range, a repeated id in a row.
    for bad in [-1i64, cols as i64, cols as i64 + 7, i64::MIN] {
        let mut b = ids.clone();
        b[3] = bad;
        let e = go(
            &s,
            rows,
            cols,
            &b,
            &lps,
            k,
            1.0,
            1.0,
            &w,
            &mut loss,
            Some(&mut grad),
        );
        assert!(is_param(e.unwrap_err()), "id {bad}");
    }
    let dup = vec![0i64, 1, 3, 3];
    let e = go(
        &s,
        rows,
        cols,
        &dup,
        &lps,
        k,
        1.0,
        1.0,
        &w,
        &mut loss,
        Some(&mut grad),
    );
    let e = e.unwrap_err();
    assert!(
        is_param(e.clone()) && e.to_string().contains("twice"),
        "{e}"
    );
    // The same id in different rows is fine.
    let shared = vec![0i64, 1, 0, 1];
    go(
        &s, rows, cols, &shared, &lps, k, 1.0, 1.0, &w, &mut loss, None,
    )
    .unwrap();
    loss.fill(f32::NAN);
    // Log-probabilities: positive, +inf, NaN.
    for bad in [0.1f32, f32::MIN_POSITIVE, f32::INFINITY, f32::NAN] {
        let mut b = lps.clone();
        b[2] = bad;
        let e = go(
            &s,
            rows,
            cols,
            &ids,
            &b,
            k,
            1.0,
            1.0,
            &w,
            &mut loss,
            Some(&mut grad),
        );
        assert!(is_param(e.unwrap_err()), "lp {bad}");
    }
    // Masses above 1 + 1e-3: refused; 1.0005 is accepted.
    for (m, ok) in [(1.2f64, false), (1.0015, false), (1.0005, true)] {
        let b = vec![-1.0f32, -2.0, (m * 0.5).ln() as f32, (m * 0.5).ln() as f32];
        let e = go(&s, rows, cols, &ids, &b, k, 1.0, 1.0, &w, &mut loss, None);
        if ok {
            e.unwrap();
            loss.fill(f32::NAN);
        } else {
            let e = e.unwrap_err();
            assert!(
                is_param(e.clone()) && e.to_string().contains("sum"),
                "{m}: {e}"
            );
        }
    }
    // Temperatures (the distillation one and the teacher's).
    for t in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let e = go(&s, rows, cols, &ids, &lps, k, 1.0, t, &w, &mut loss, None);
        assert!(is_param(e.unwrap_err()));
        let e = go(&s, rows, cols, &ids, &lps, k, t, 1.0, &w, &mut loss, None);
        assert!(is_param(e.unwrap_err()));
    }
    // Lengths.
    let e = go(
        &s[..11],
        rows,
        cols,
        &ids,
        &lps,
        k,
        1.0,
        1.0,
        &w,
        &mut loss,
        None,
    );
    assert!(is_len(e.unwrap_err()));
    let e = go(
        &s,
        rows,
        cols,
        &ids[..3],
        &lps,
        k,
        1.0,
        1.0,
        &w,
        &mut loss,
        None,
    );
    assert!(is_len(e.unwrap_err()));
    let e = go(
        &s,
        rows,
        cols,
        &ids,
        &lps[..3],
        k,
        1.0,
        1.0,
        &w,
        &mut loss,
        None,
    );
    assert!(is_len(e.unwrap_err()));
    let e = go(
        &s,
        rows,
        cols,
        &ids,
        &lps,
        k,
        1.0,
        1.0,
        &w[..1],
        &mut loss,
        None,
    );
    assert!(is_len(e.unwrap_err()));
    let e = go(
        &s,
        rows,
        cols,
        &ids,
        &lps,
        k,
        1.0,
        1.0,
        &w,
        &mut loss[..1],
        None,
    );
    assert!(is_len(e.unwrap_err()));
    let e = go(
        &s,
        rows,
        cols,
        &ids,
        &lps,
        k,
        1.0,
        1.0,
        &w,
        &mut loss,
        Some(&mut grad[..11]),
    );
    assert!(is_len(e.unwrap_err()));
    // k larger than the ids given (k = 3 with 4 ids for 2 rows).
    let e = go(&s, rows, cols, &ids, &lps, 3, 1.0, 1.0, &w, &mut loss, None);
    assert!(is_len(e.unwrap_err()));
    // cols = 0.
    let e = go(&[], rows, 0, &ids, &lps, k, 1.0, 1.0, &w, &mut loss, None);
    assert!(is_param(e.unwrap_err()));

    // Nothing was written by the refused calls.
    assert!(loss.iter().all(|v| v.is_nan()));
    assert!(grad.iter().all(|v| v.is_nan()));

    // rows = 0 is an empty, valid call.
    go(&[], 0, cols, &[], &[], k, 1.0, 1.0, &[], &mut [], None).unwrap();
}

// ---------------------------------------------------------------------------
// Thread pool.

#[test]
fn sparse_identical_across_thread_counts() {
    let (rows, cols, k) = (67, 1000, 20);
    assert!(is_parallel(rows, cols));
    let mut rng = Rng::new(300);
    let inp = inputs(&mut rng, rows, cols, k, 1.0);
    let s: Vec<bf16> = rounded(&inp.student);
    let w = weights(&mut rng, rows);
    let all = || -> Vec<u32> {
        let mut v = Vec::new();
        for (i, tail) in TAILS.into_iter().enumerate() {
            let temp = TEMPERATURES[i];
            let (loss, grad) = call(
                &s, rows, cols, &inp.ids, &inp.lps, 1.0, temp, tail, &w, true,
            );
            v.extend(loss.iter().map(|x| x.to_bits()));
            v.extend(bits_of(&grad));
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
