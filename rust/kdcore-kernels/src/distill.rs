//! The fused distillation kernel: a divergence between the teacher's and the
//! student's temperature softmaxes, an optional hard-label cross-entropy on
//! the student, and their gradients, per row in one call.
//!
//! With a = (s − max s)/T, b = (t − max t)/T, Q = softmax(a) (student),
//! P = softmax(b) (teacher), log Q = a − log Z_s, log P = b − log Z_t:
//!
//! | divergence | D | ∂D/∂s · T | ∂D/∂t · T |
//! |---|---|---|---|
//! | KL(P‖Q) | Σ P (log P − log Q) | Q − P | P (log P − log Q − D) |
//! | KL(Q‖P) | Σ Q (log Q − log P) | Q (log Q − log P − D) | P − Q |
//! | TVD | ½ Σ \|P − Q\| | Q (g − Σ Q g), g = ½ sign(Q − P) | P (−g + Σ P g) |
//! | JSD(β) | β KL(P‖M) + (1−β) KL(Q‖M), M = βP + (1−β)Q | (1−β) Q (log Q − log M − KL(Q‖M)) | β P (log P − log M − KL(P‖M)) |
//!
//! log M is formed in log space (log-add-exp of log β + log P and
//! log(1−β) + log Q), so log-probabilities far below −104 stay finite. Terms
//! whose probability is 0 count 0 (0 · log 0 = 0), so −inf logits are exact.
//!
//! Hard labels: CE = log Σ_j e^{s_j} − s_y at temperature 1, with gradient
//! softmax(s) − onehot(y). Row r's loss is w_r · D_r (+ w_ce_r · CE_r,
//! reported apart); rows whose weights are all 0 are never read.
//!
//! Passes per row: maxima; exponentials and partition functions (kept in a
//! per-thread scratch row when later passes need them); for TVD and JSD a
//! pass over the probabilities; the gradient pass.

use std::cell::RefCell;

use crate::element::Element;
use crate::error::{check_len, inverse_temperature, KernelError};
use crate::rows::{
    prefetch_chunk, row_max, run_blocks, runs, shift, split_rows, wide_sum, widen_into, Blocking,
    PaddedRow, Wide,
};
use crate::simd::simd_dispatch;
use crate::simd::{exp_nonpos, exp_nonpos_lanes, softplus_shared, Arch, SimdLevel};
use crate::softmax::check_shape;

/// Which divergence between teacher P and student Q.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Divergence {
    /// KL(P ‖ Q), forward distillation KL.
    Kl,
    /// KL(Q ‖ P), reverse KL.
    ReverseKl,
    /// ½ Σ |P − Q|.
    Tvd,
    /// β KL(P‖M) + (1−β) KL(Q‖M), M = βP + (1−β)Q, 0 < β < 1 (f64: near
    /// β = 1 the f32 rounding of β is a large relative error of 1 − β).
    Jsd { beta: f64 },
}

/// Hard labels for the cross-entropy term on the student.
pub struct HardLabels<'a> {
    /// One class index per row, in [0, cols) where `weight` is not 0.
    pub labels: &'a [i64],
    /// Per-row weight of the CE term (0 skips it).
    pub weight: &'a [f32],
    /// Output: `weight_r · CE_r` per row.
    pub loss: &'a mut [f32],
}

/// Per-row constants of the divergence after the partition pass.
#[derive(Clone, Copy)]
struct RowStats {
    max_s: f32,
    max_t: f32,
    inv_zs: f32,
    inv_zt: f32,
    /// log Z_t − log Z_s: log P − log Q = (b − a) − this.
    log_ratio: f32,
}

// Scratch rows (e^a, e^b, e^{s − max s} at T = 1, log M), reused by each pool
// thread so that later passes need not compute the exponentials again (except
// where `Plan::recompute` measured faster than reading them back).
thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

struct Scratch<'a> {
    es: &'a mut [f32],
    et: &'a mut [f32],
    e1: &'a mut [f32],
    /// JSD: log Q − log M and log P − log M.
    q_m: &'a mut [f32],
    p_m: &'a mut [f32],
}

/// Scratch rows of `cols` padded to whole chunks of `L`.
fn scratch<const L: usize>(buf: &mut Vec<f32>, cols: usize) -> Scratch<'_> {
    let n = cols.div_ceil(L) * L;
    if buf.len() < 5 * n {
        buf.resize(5 * n, 0.0);
    }
    let (es, rest) = buf.split_at_mut(n);
    let (et, rest) = rest.split_at_mut(n);
    let (e1, rest) = rest.split_at_mut(n);
    let (q_m, rest) = rest.split_at_mut(n);
    Scratch {
        es,
        et,
        e1,
        q_m,
        p_m: &mut rest[..n],
    }
}

/// Chunk k of a scratch row, as a fixed-size array (lane loops over it need
/// no bounds checks).
#[inline(always)]
fn lanes<const L: usize>(buf: &[f32], k: usize) -> &[f32; L] {
    buf[k * L..(k + 1) * L]
        .try_into()
        .expect("a chunk is L long")
}

#[inline(always)]
fn lanes_mut<const L: usize>(buf: &mut [f32], k: usize) -> &mut [f32] {
    &mut buf[k * L..(k + 1) * L]
}

#[inline(always)]
fn copy_lanes<const L: usize>(dst: &mut [f32], v: &[f32; L]) {
    // A fixed-size copy: inlined register stores, no memcpy call.
    let dst: &mut [f32; L] = dst.try_into().expect("a chunk is L long");
    *dst = *v;
}

/// What one row needs computed.
#[derive(Clone, Copy)]
struct Plan {
    divergence: Divergence,
    inv_t: f32,
    /// Keep e^a, e^b in scratch (a later pass reads them).
    keep: bool,
    /// Hard-label CE at T ≠ 1 (needs its own partition function).
    ce_t1: bool,
    /// With `ce_t1` at T = 2 exactly: e^{s − max s} = (e^a)², one multiply
    /// instead of a third exponential (see [`square_lanes`]).
    ce_from_square: bool,
    /// Which exponentials the gradient pass computes again from the logits
    /// instead of reading them from scratch (`RECOMPUTE_*` bits).
    recompute: u8,
}

/// Gradient pass: e^a from the student logits instead of `sc.es`.
const RECOMPUTE_S: u8 = 1;
/// Gradient pass: the CE's e^{s − max s} as (e^a)² (T = 2) instead of `sc.e1`.
const SQUARE_E1: u8 = 4;

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn distill_row<A: Arch, const L: usize, S: Element, T: Element>(
    s: &[S],
    t: &[T],
    plan: Plan,
    weight: f32,
    ce: Option<(usize, f32)>,
    grad_s: Option<&mut [S]>,
    grad_t: Option<&mut [T]>,
    ahead: Ahead<'_, S, T>,
    sc: &mut Scratch<'_>,
) -> (f32, f32) {
    let inv_t = plan.inv_t;
    let ahead = if hints_fit::<S, T>(s.len()) {
        Ahead {
            grad_s: grad_s.as_deref().unwrap_or(&[]),
            grad_t: grad_t.as_deref().unwrap_or(&[]),
            ..ahead
        }
    } else {
        ahead
    };
    let (max_s, max_t) = (row_max::<S, L>(s), row_max::<T, L>(t));
    let (ps, pt) = (PaddedRow::<S, L>::new(s), PaddedRow::<T, L>::new(t));
    // One instance per cross term: with a run-time choice inside the loop the
    // compiler merges the two forms through pointers to stack copies.
    let (zs, zt, z1, cross) = match plan.divergence {
        Divergence::Kl => {
            partition_pass::<A, L, S, T, CROSS_FORWARD>(&ps, &pt, max_s, max_t, plan, &ahead, sc)
        }
        Divergence::ReverseKl => {
            partition_pass::<A, L, S, T, CROSS_REVERSE>(&ps, &pt, max_s, max_t, plan, &ahead, sc)
        }
        _ => partition_pass::<A, L, S, T, CROSS_NONE>(&ps, &pt, max_s, max_t, plan, &ahead, sc),
    };
    let (zs, zt) = (wide_sum(&zs), wide_sum(&zt));
    let (log_zs, log_zt) = (zs.ln(), zt.ln());
    let stats = RowStats {
        max_s,
        max_t,
        inv_zs: (1.0 / zs) as f32,
        inv_zt: (1.0 / zt) as f32,
        log_ratio: (log_zt - log_zs) as f32,
    };

    // The divergence, and what its gradient needs (sums over the row).
    let (div, sum_s, sum_t) = match plan.divergence {
        Divergence::Kl => (wide_sum(&cross) / zt - log_zt + log_zs, 0.0, 0.0),
        Divergence::ReverseKl => (wide_sum(&cross) / zs - log_zs + log_zt, 0.0, 0.0),
        Divergence::Tvd => tvd_sums::<L>(s.len(), &stats, sc),
        Divergence::Jsd { beta } => jsd_sums::<A, L, S, T>(s, t, inv_t, beta, &stats, sc),
    };

    // Hard-label cross-entropy at T = 1 on the student.
    let (ce_loss, ce_scale) = match ce {
        Some((label, w)) => {
            let log_z1 = if plan.ce_t1 {
                wide_sum(&z1).ln()
            } else {
                log_zs
            };
            let ce = log_z1 + max_s as f64 - s[label].to_f32() as f64;
            ((w as f64 * ce) as f32, w)
        }
        None => (0.0, 0.0),
    };
    let z1_inv = if plan.ce_t1 {
        (1.0 / wide_sum(&z1)) as f32
    } else {
        stats.inv_zs
    };
    let loss = (weight as f64 * div) as f32;
    if grad_s.is_none() && grad_t.is_none() {
        return (loss, ce_loss);
    }

    let terms = Terms {
        c: weight * inv_t,
        div: div as f32,
        sum_s: sum_s as f32,
        sum_t: sum_t as f32,
        stats,
        beta: 0.0,
        rest: 0.0,
    };
    let ce = ce.map(|(label, _)| (label, ce_scale, z1_inv));
    let (gs, gt) = (grad_s, grad_t);
    // One instance per divergence and recompute mode (`Plan::recompute`);
    // only forward KL computes e^a again.
    const BOTH: u8 = RECOMPUTE_S | SQUARE_E1;
    macro_rules! by_square {
        ($term:ty, $terms:expr) => {
            if plan.recompute & SQUARE_E1 != 0 {
                grad_pass::<A, S, T, $term, SQUARE_E1>(s, t, plan, $terms, ce, gs, gt, sc)
            } else {
                grad_pass::<A, S, T, $term, 0>(s, t, plan, $terms, ce, gs, gt, sc)
            }
        };
    }
    macro_rules! by_mode {
        ($term:ty, $terms:expr) => {
            match plan.recompute {
                0 => grad_pass::<A, S, T, $term, 0>(s, t, plan, $terms, ce, gs, gt, sc),
                RECOMPUTE_S => {
                    grad_pass::<A, S, T, $term, RECOMPUTE_S>(s, t, plan, $terms, ce, gs, gt, sc)
                }
                SQUARE_E1 => {
                    grad_pass::<A, S, T, $term, SQUARE_E1>(s, t, plan, $terms, ce, gs, gt, sc)
                }
                _ => grad_pass::<A, S, T, $term, BOTH>(s, t, plan, $terms, ce, gs, gt, sc),
            }
        };
    }
    match plan.divergence {
        Divergence::Kl => by_mode!(KlTerm, &terms),
        Divergence::ReverseKl => by_square!(ReverseKlTerm, &terms),
        Divergence::Tvd => by_square!(TvdTerm, &terms),
        Divergence::Jsd { beta } => {
            let (beta, rest) = (beta as f32, (1.0 - beta) as f32);
            let terms = Terms {
                beta,
                rest,
                ..terms
            };
            by_square!(JsdTerm, &terms)
        }
    }
    (loss, ce_loss)
}

/// Rows to hint into cache while a row's exponentials are computed (empty
/// slices: nothing to hint).
#[derive(Clone, Copy)]
struct Ahead<'a, S, T> {
    /// The next row of the block, which the next call reads from memory.
    next_s: &'a [S],
    next_t: &'a [T],
    /// This row's gradients, which the gradient pass writes.
    grad_s: &'a [S],
    grad_t: &'a [T],
}

/// Bytes of cache the hints may fill. Hinting the next row pays while this
/// row, its scratch rows, the next row and the gradient row stay in L2
/// together (2 MiB per core where this was measured; 1-2 MiB on current
/// x86 servers). Past that (a 128k vocabulary in f32 needs 3.5 MiB) the
/// hinted lines evict the scratch rows the gradient pass is about to read,
/// and the hints were measured to cost more than they save: such rows get
/// none.
const HINT_BUDGET_BYTES: usize = 1 << 20;

/// Whether a row of `cols` fits [`HINT_BUDGET_BYTES`] with its hints.
fn hints_fit<S, T>(cols: usize) -> bool {
    let (s, t) = (std::mem::size_of::<S>(), std::mem::size_of::<T>());
    // This row and the next (s, t), two f32 scratch rows, one gradient row.
    // JSD and a hard-label CE at T != 1 keep one or two more scratch rows:
    // the budget leaves them room in a 2 MiB L2.
    let per_col = 2 * (s + t) + 2 * 4 + s.max(t);
    cols.saturating_mul(per_col) <= HINT_BUDGET_BYTES
}

/// What the gradient pass computes again instead of reading from scratch
/// (`RECOMPUTE_*`, `SQUARE_E1` bits), per call.
///
/// Forward KL on rows too wide for [`hints_fit`]: e^a from the student
/// logits. Such a row's logits, two scratch rows and gradient row do not fit
/// L2, so the gradient pass reads them from L3; with one scratch row fewer it
/// measured 10-15% faster (256x128256 f32) despite the extra exp (see
/// docs/benchmarks.md; recomputing e^b instead, or both, gained less). Hard
/// labels at T = 2: the CE's e^{s − max s} is (e^a)² ([`square_flushed`]), one
/// store and one load per element fewer than the `e1` scratch row.
fn recompute_mode<S, T>(divergence: Divergence, cols: usize, ce_from_square: bool) -> u8 {
    let mut mode = 0;
    if divergence == Divergence::Kl && !hints_fit::<S, T>(cols) {
        mode |= RECOMPUTE_S;
    }
    if ce_from_square {
        mode |= SQUARE_E1;
    }
    mode
}

/// Which cross term the partition pass sums (forward KL: Σ e^b (b − a);
/// reverse KL: Σ e^a (a − b)).
const CROSS_NONE: u8 = 0;
const CROSS_FORWARD: u8 = 1;
const CROSS_REVERSE: u8 = 2;

/// The exponentials pass of a row: lane sums of e^a, e^b, e^{s − max s} (CE
/// at T = 1) and the cross term, widened per run; e^a, e^b (and e^{s − max s})
/// kept in scratch when later passes read them.
#[inline(always)]
fn partition_pass<A: Arch, const L: usize, S: Element, T: Element, const CROSS: u8>(
    ps: &PaddedRow<'_, S, L>,
    pt: &PaddedRow<'_, T, L>,
    max_s: f32,
    max_t: f32,
    plan: Plan,
    ahead: &Ahead<'_, S, T>,
    sc: &mut Scratch<'_>,
) -> (Wide<L>, Wide<L>, Wide<L>, Wide<L>) {
    let inv_t = plan.inv_t;
    let (mut zs, mut zt, mut z1, mut cross) = ([0.0; L], [0.0; L], [0.0; L], [0.0; L]);
    for run in runs(ps.chunks()) {
        let (mut zs_run, mut zt_run) = ([0.0; L], [0.0; L]);
        let (mut z1_run, mut cross_run) = ([0.0; L], [0.0; L]);
        for k in run {
            prefetch_chunk::<S, L>(ahead.next_s, k);
            prefetch_chunk::<T, L>(ahead.next_t, k);
            prefetch_chunk::<S, L>(ahead.grad_s, k);
            prefetch_chunk::<T, L>(ahead.grad_t, k);
            let (cs, ct) = (ps.chunk(k), pt.chunk(k));
            let a = shift(cs, max_s, inv_t);
            let b = shift(ct, max_t, inv_t);
            let (es, et) = (exp_nonpos_lanes::<A, L>(&a), exp_nonpos_lanes::<A, L>(&b));
            for i in 0..L {
                zs_run[i] += es[i];
                zt_run[i] += et[i];
            }
            if CROSS == CROSS_FORWARD {
                for i in 0..L {
                    cross_run[i] += if et[i] != 0.0 {
                        et[i] * (b[i] - a[i])
                    } else {
                        0.0
                    };
                }
            } else if CROSS == CROSS_REVERSE {
                for i in 0..L {
                    cross_run[i] += if es[i] != 0.0 {
                        es[i] * (a[i] - b[i])
                    } else {
                        0.0
                    };
                }
            }
            if plan.ce_t1 {
                let e1 = if plan.ce_from_square {
                    square_lanes(&es)
                } else {
                    exp_nonpos_lanes::<A, L>(&shift(cs, max_s, 1.0))
                };
                for i in 0..L {
                    z1_run[i] += e1[i];
                }
                if plan.recompute & SQUARE_E1 == 0 {
                    copy_lanes(lanes_mut::<L>(sc.e1, k), &e1);
                }
            }
            if plan.keep && plan.recompute & RECOMPUTE_S == 0 {
                copy_lanes(lanes_mut::<L>(sc.es, k), &es);
            }
            if plan.keep {
                copy_lanes(lanes_mut::<L>(sc.et, k), &et);
            }
        }
        widen_into(&mut zs, &zs_run);
        widen_into(&mut zt, &zt_run);
        widen_into(&mut z1, &z1_run);
        widen_into(&mut cross, &cross_run);
    }
    (zs, zt, z1, cross)
}

/// e^a below which (e^a)² would be subnormal: 2^-63, (2^-63)² = 2^-126.
const SQUARE_FLUSH_BELOW: f32 = 1.0 / (1u64 << 63) as f32;

/// e^{2a} from e^a, lane-wise: at T = 2, a = (s − max s) · 0.5 is exact
/// (bf16 and f16 logits too: the shift is the same f32 arithmetic after
/// widening), so 2a is the T = 1 shifted logit itself. e^a is within 2 ulp
/// of its rounded value (< 2.5 ulp of exact), so the square is within ~5.5
/// ulp of e^{2a}, against 2.5 for a third exponential: the CE's partition
/// sum and gradient stay well inside their f32 tolerances. Squares below
/// 2^-126 are flushed to 0, as [`exp_nonpos`](crate::simd::exp_nonpos)
/// flushes them: the same contract, and no subnormal products (slow on some
/// CPUs). e^a is in [0, 1] or NaN, so the square is too: never inf, NaN
/// only from a NaN logit.
#[inline(always)]
fn square_lanes<const L: usize>(e: &[f32; L]) -> [f32; L] {
    std::array::from_fn(|i| square_flushed(e[i]))
}

/// One lane of [`square_lanes`] (the gradient pass forms the same value).
#[inline(always)]
fn square_flushed(e: f32) -> f32 {
    let x = if e < SQUARE_FLUSH_BELOW { 0.0 } else { e };
    x * x
}

/// Per-row constants of the gradient pass.
#[derive(Clone, Copy)]
struct Terms {
    /// weight / T
    c: f32,
    div: f32,
    sum_s: f32,
    sum_t: f32,
    stats: RowStats,
    /// JSD's β and 1 − β (formed in f64)
    beta: f32,
    rest: f32,
}

/// One element of the gradient pass: logits a, b (only if `LOGITS_S` /
/// `LOGITS_T` say they are read), probabilities q, p, and for JSD
/// log Q − log M and log P − log M.
struct Elem {
    a: f32,
    b: f32,
    q: f32,
    p: f32,
    q_m: f32,
    p_m: f32,
}

/// The gradient of one divergence, w.r.t. student and teacher logits, times T / weight.
trait GradTerm {
    /// Whether the student (teacher) term reads the logits a, b.
    const LOGITS_S: bool;
    const LOGITS_T: bool;
    fn student(x: &Elem, k: &Terms) -> f32;
    fn teacher(x: &Elem, k: &Terms) -> f32;
}

struct KlTerm;
struct ReverseKlTerm;
struct TvdTerm;
struct JsdTerm;

impl GradTerm for KlTerm {
    const LOGITS_S: bool = false;
    const LOGITS_T: bool = true;
    #[inline(always)]
    fn student(x: &Elem, _: &Terms) -> f32 {
        x.q - x.p
    }
    #[inline(always)]
    fn teacher(x: &Elem, k: &Terms) -> f32 {
        let log_ratio = (x.b - x.a) - k.stats.log_ratio - k.div;
        if x.p != 0.0 {
            x.p * log_ratio
        } else {
            0.0
        }
    }
}

impl GradTerm for ReverseKlTerm {
    const LOGITS_S: bool = true;
    const LOGITS_T: bool = false;
    #[inline(always)]
    fn student(x: &Elem, k: &Terms) -> f32 {
        let log_ratio = (x.a - x.b) + k.stats.log_ratio - k.div;
        if x.q != 0.0 {
            x.q * log_ratio
        } else {
            0.0
        }
    }
    #[inline(always)]
    fn teacher(x: &Elem, _: &Terms) -> f32 {
        x.p - x.q
    }
}

impl GradTerm for TvdTerm {
    const LOGITS_S: bool = false;
    const LOGITS_T: bool = false;
    #[inline(always)]
    fn student(x: &Elem, k: &Terms) -> f32 {
        x.q * (half_sign(x.q - x.p) - k.sum_s)
    }
    #[inline(always)]
    fn teacher(x: &Elem, k: &Terms) -> f32 {
        x.p * (half_sign(x.p - x.q) - k.sum_t)
    }
}

impl GradTerm for JsdTerm {
    const LOGITS_S: bool = false;
    const LOGITS_T: bool = false;
    #[inline(always)]
    fn student(x: &Elem, k: &Terms) -> f32 {
        let v = k.rest * (x.q_m - k.sum_s);
        if x.q != 0.0 {
            x.q * v
        } else {
            0.0
        }
    }
    #[inline(always)]
    fn teacher(x: &Elem, k: &Terms) -> f32 {
        let v = k.beta * (x.p_m - k.sum_t);
        if x.p != 0.0 {
            x.p * v
        } else {
            0.0
        }
    }
}

/// Element i of the gradient pass from its logits and scratch values; the
/// logits are only shifted when `logits` (the term reads them).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn elem<S: Element, T: Element>(
    logits: bool,
    s: S,
    t: T,
    es: f32,
    et: f32,
    q_m: f32,
    p_m: f32,
    stats: &RowStats,
    inv_t: f32,
) -> Elem {
    let (a, b) = if logits {
        (
            (s.to_f32() - stats.max_s) * inv_t,
            (t.to_f32() - stats.max_t) * inv_t,
        )
    } else {
        (0.0, 0.0)
    };
    Elem {
        a,
        b,
        q: es * stats.inv_zs,
        p: et * stats.inv_zt,
        q_m,
        p_m,
    }
}

/// The gradient pass of one row, monomorphised per divergence (no dispatch
/// inside the loop). `ce` is (label, CE weight, 1 / Z at T = 1).
///
/// Plain element loops over zipped slices (no bounds checks): the loop
/// vectoriser turns them into full-width vector code (the lane-array form of
/// the other passes came out split into 16 + 8 + 4 + 2 + 1 + 1 lanes here).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn grad_pass<A: Arch, S: Element, T: Element, G: GradTerm, const MODE: u8>(
    s: &[S],
    t: &[T],
    plan: Plan,
    k: &Terms,
    ce: Option<(usize, f32, f32)>,
    grad_s: Option<&mut [S]>,
    grad_t: Option<&mut [T]>,
    sc: &Scratch<'_>,
) {
    let (stats, inv_t, n) = (k.stats, plan.inv_t, s.len());
    let (es, et) = (&sc.es[..n], &sc.et[..n]);
    let (q_m, p_m) = (&sc.q_m[..n], &sc.p_m[..n]);
    let e1 = if plan.ce_t1 { &sc.e1[..n] } else { es };
    let (ce_w, z1_inv) = ce.map_or((0.0, 0.0), |(_, w, z)| (w, z));
    // The exponentials of one element: from scratch, or computed again from
    // the logits by the partition pass's own arithmetic (the same bits). A
    // scratch value that is not used is not loaded.
    let exps = |s: S, es: f32, et: f32, e1: f32| {
        let es = if MODE & RECOMPUTE_S != 0 {
            exp_nonpos::<A>((s.to_f32() - stats.max_s) * inv_t)
        } else {
            es
        };
        let e1 = if MODE & SQUARE_E1 != 0 {
            square_flushed(es)
        } else if plan.ce_t1 {
            e1
        } else {
            es
        };
        (es, et, e1)
    };
    let student = |s: S, t: T, es: f32, et: f32, e1: f32, q_m: f32, p_m: f32| {
        let (es, et, e1) = exps(s, es, et, e1);
        let x = elem(G::LOGITS_S, s, t, es, et, q_m, p_m, &stats, inv_t);
        let d = G::student(&x, k) * k.c;
        if ce.is_some() {
            d + e1 * z1_inv * ce_w
        } else {
            d
        }
    };
    if let Some(g) = grad_s {
        let g = &mut g[..n];
        let inputs = s.iter().zip(t).zip(es.iter().zip(et)).zip(e1);
        for ((out, (((&s, &t), (&es, &et)), &e1)), (&qm, &pm)) in
            g.iter_mut().zip(inputs).zip(q_m.iter().zip(p_m))
        {
            *out = S::from_f32(student(s, t, es, et, e1, qm, pm));
        }
        // The one-hot part of the CE gradient, on the element computed again
        // (the same arithmetic, so the same value before its rounding).
        if let Some((y, w, _)) = ce {
            let d = student(s[y], t[y], es[y], et[y], e1[y], q_m[y], p_m[y]);
            g[y] = S::from_f32(d - w);
        }
    }
    if let Some(g) = grad_t {
        let g = &mut g[..n];
        let inputs = s.iter().zip(t).zip(es.iter().zip(et));
        for ((out, ((&s, &t), (&es, &et))), (&qm, &pm)) in
            g.iter_mut().zip(inputs).zip(q_m.iter().zip(p_m))
        {
            let (es, et, _) = exps(s, es, et, 0.0);
            let x = elem(G::LOGITS_T, s, t, es, et, qm, pm, &stats, inv_t);
            *out = T::from_f32(G::teacher(&x, k) * k.c);
        }
    }
}

/// ½ sign(x), with sign(0) = 0 (the subgradient autograd uses for |x|).
#[inline(always)]
fn half_sign(x: f32) -> f32 {
    if x > 0.0 {
        0.5
    } else if x < 0.0 {
        -0.5
    } else {
        x * 0.0 // 0 for ±0; NaN stays NaN (a NaN row's gradient is NaN)
    }
}

/// TVD and the sums its gradients need: (½ Σ|P−Q|, Σ Q g, Σ P (−g)).
#[inline(always)]
fn tvd_sums<const L: usize>(cols: usize, stats: &RowStats, sc: &Scratch<'_>) -> (f64, f64, f64) {
    let (mut abs, mut qg, mut pg): (Wide<L>, Wide<L>, Wide<L>) = ([0.0; L], [0.0; L], [0.0; L]);
    for run in runs(cols.div_ceil(L)) {
        let (mut abs_run, mut qg_run, mut pg_run) = ([0.0; L], [0.0; L], [0.0; L]);
        for k in run {
            let (es, et) = (lanes::<L>(sc.es, k), lanes::<L>(sc.et, k));
            for i in 0..L {
                let (q, p) = (es[i] * stats.inv_zs, et[i] * stats.inv_zt);
                abs_run[i] += (p - q).abs();
                qg_run[i] += q * half_sign(q - p);
                pg_run[i] += p * half_sign(p - q);
            }
        }
        widen_into(&mut abs, &abs_run);
        widen_into(&mut qg, &qg_run);
        widen_into(&mut pg, &pg_run);
    }
    (0.5 * wide_sum(&abs), wide_sum(&qg), wide_sum(&pg))
}

/// JSD(β) and its two KL terms: (D, KL(Q‖M), KL(P‖M)).
///
/// Per token, with d = log P − log Q (from the shifted logits, so no absolute
/// log-probability enters) and x = d + log(β/(1−β)):
/// log Q − log M = −log(1−β + β e^d) = −log(1−β) − softplus(x) and
/// log P − log M = −log(β + (1−β) e^{−d}) = −log β − softplus(−x), both from
/// one shared ln(1 + e^{−|x|}) (one exp and one `log1p_unit` per token). Both go to
/// scratch for the gradient pass. (Forming log M itself and subtracting would
/// carry an f32 rounding of each |log Q|: ~1e-6 on a 32k-wide row.)
#[inline(always)]
fn jsd_sums<A: Arch, const L: usize, S: Element, T: Element>(
    s: &[S],
    t: &[T],
    inv_t: f32,
    beta: f64,
    stats: &RowStats,
    sc: &mut Scratch<'_>,
) -> (f64, f64, f64) {
    // In f64: 1 − β rounds to 1 in f32 for β < 6e-8, and the log of it is β-sized.
    let (log_beta, log_rest) = (beta.ln() as f32, (-beta).ln_1p() as f32);
    let odds = log_beta - log_rest;
    let (mut klq, mut klp): (Wide<L>, Wide<L>) = ([0.0; L], [0.0; L]);
    let (ps, pt) = (PaddedRow::<S, L>::new(s), PaddedRow::<T, L>::new(t));
    for run in runs(ps.chunks()) {
        let (mut klq_run, mut klp_run) = ([0.0; L], [0.0; L]);
        for k in run {
            let a = shift(ps.chunk(k), stats.max_s, inv_t);
            let b = shift(pt.chunk(k), stats.max_t, inv_t);
            let (es, et) = (lanes::<L>(sc.es, k), lanes::<L>(sc.et, k));
            let (mut q_m, mut p_m) = ([0.0; L], [0.0; L]);
            for i in 0..L {
                let x = (b[i] - a[i]) - stats.log_ratio + odds;
                let shared = softplus_shared::<A>(x);
                // max(±x, 0) as selects: a NaN x (both probabilities 0) stays
                // NaN through `shared`, and those lanes are never summed.
                let (pos, neg) = (
                    if x > 0.0 { x } else { 0.0 },
                    if x < 0.0 { -x } else { 0.0 },
                );
                q_m[i] = -log_rest - (pos + shared);
                p_m[i] = -log_beta - (neg + shared);
                let (q, p) = (es[i] * stats.inv_zs, et[i] * stats.inv_zt);
                klq_run[i] += if q != 0.0 { q * q_m[i] } else { 0.0 };
                klp_run[i] += if p != 0.0 { p * p_m[i] } else { 0.0 };
            }
            copy_lanes(lanes_mut::<L>(sc.q_m, k), &q_m);
            copy_lanes(lanes_mut::<L>(sc.p_m, k), &p_m);
        }
        widen_into(&mut klq, &klq_run);
        widen_into(&mut klp, &klp_run);
    }
    let (klq, klp) = (wide_sum(&klq), wide_sum(&klp));
    (beta * klp + (1.0 - beta) * klq, klq, klp)
}

/// The hard labels, CE weights and CE losses of one block of rows.
type HardBlock<'a> = Option<(&'a [i64], &'a [f32], &'a mut [f32])>;

/// One block of rows.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn distill_block<A: Arch, const L: usize, S: Element, T: Element>(
    s: &[S],
    t: &[T],
    cols: usize,
    plan: Plan,
    weight: &[f32],
    loss: &mut [f32],
    mut ce: HardBlock<'_>,
    mut grad_s: Option<&mut [S]>,
    mut grad_t: Option<&mut [T]>,
    buf: &mut Vec<f32>,
) {
    let mut sc = scratch::<L>(buf, cols);
    let hint_rows = hints_fit::<S, T>(cols);
    for (r, (&w, out)) in weight.iter().zip(loss.iter_mut()).enumerate() {
        let span = r * cols..(r + 1) * cols;
        let gs = grad_s.as_deref_mut().map(|g| &mut g[span.clone()]);
        let gt = grad_t.as_deref_mut().map(|g| &mut g[span.clone()]);
        let ce_row = ce
            .as_ref()
            .map(|(labels, w_ce, _)| (labels[r], w_ce[r]))
            .filter(|&(_, w_ce)| w_ce != 0.0);
        if w == 0.0 && ce_row.is_none() {
            // Masked row: no loss, no gradient, and its logits are never read
            // (a masked row of NaN or -inf stays harmless).
            *out = 0.0;
            if let Some((_, _, ce_loss)) = ce.as_mut() {
                ce_loss[r] = 0.0;
            }
            if let Some(g) = gs {
                g.fill(S::from_f32(0.0));
            }
            if let Some(g) = gt {
                g.fill(T::from_f32(0.0));
            }
            continue;
        }
        // Labels were range-checked by `distill` for rows with a CE weight.
        let ce_arg = ce_row.map(|(label, w_ce)| (label as usize, w_ce));
        let next = if hint_rows {
            (r + 1) * cols..((r + 2) * cols).min(s.len())
        } else {
            0..0
        };
        let ahead = Ahead {
            next_s: &s[next.clone()],
            next_t: &t[next],
            grad_s: &[],
            grad_t: &[],
        };
        let (row_s, row_t) = (&s[span.clone()], &t[span]);
        let (div, ce_loss) =
            distill_row::<A, L, S, T>(row_s, row_t, plan, w, ce_arg, gs, gt, ahead, &mut sc);
        *out = if w == 0.0 { 0.0 } else { div };
        if let Some((_, _, ce_out)) = ce.as_mut() {
            ce_out[r] = ce_loss;
        }
    }
}

simd_dispatch!(fn distill_block_at<S: Element, T: Element>(
    s: &[S], t: &[T], cols: usize, plan: Plan, weight: &[f32], loss: &mut [f32],
    ce: HardBlock<'_>, grad_s: Option<&mut [S]>, grad_t: Option<&mut [T]>,
    buf: &mut Vec<f32>,
) => distill_block);

/// Where to write the gradients of Σ_r (loss_r + ce_loss_r); `None` skips that work.
pub struct Grads<'a, S, T> {
    /// ∂/∂student logits, `rows x cols`.
    pub student: Option<&'a mut [S]>,
    /// ∂/∂teacher logits, `rows x cols`.
    pub teacher: Option<&'a mut [T]>,
}

/// Per-row weighted divergence between softmax(teacher / T) and
/// softmax(student / T) (see the module docs), an optional hard-label CE on
/// the student, and, on request, the gradients of their sum.
#[allow(clippy::too_many_arguments)]
pub fn distill<S: Element, T: Element>(
    student: &[S],
    teacher: &[T],
    rows: usize,
    cols: usize,
    divergence: Divergence,
    temperature: f32,
    weight: &[f32],
    loss: &mut [f32],
    hard: Option<HardLabels<'_>>,
    grads: Grads<'_, S, T>,
) -> Result<(), KernelError> {
    distill_at(
        SimdLevel::detect(),
        student,
        teacher,
        rows,
        cols,
        divergence,
        temperature,
        weight,
        loss,
        hard,
        grads,
    )
}

/// [`distill`] at a given SIMD level (tests run every level a CPU has).
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn distill_at<S: Element, T: Element>(
    level: SimdLevel,
    student: &[S],
    teacher: &[T],
    rows: usize,
    cols: usize,
    divergence: Divergence,
    temperature: f32,
    weight: &[f32],
    loss: &mut [f32],
    hard: Option<HardLabels<'_>>,
    grads: Grads<'_, S, T>,
) -> Result<(), KernelError> {
    let n = check_shape(rows, cols)?;
    check_len("student", student.len(), n)?;
    check_len("teacher", teacher.len(), n)?;
    check_len("weight", weight.len(), rows)?;
    check_len("loss", loss.len(), rows)?;
    if let Some(g) = grads.student.as_deref() {
        check_len("grad_student", g.len(), n)?;
    }
    if let Some(g) = grads.teacher.as_deref() {
        check_len("grad_teacher", g.len(), n)?;
    }
    if let Divergence::Jsd { beta } = divergence {
        if !(beta > 0.0 && beta < 1.0) {
            return Err(KernelError::Parameter {
                what: "beta",
                message: format!("JSD needs 0 < beta < 1 (0 and 1 are the KLs), got {beta}"),
            });
        }
    }
    // Read once: rows are skipped and classes indexed by exactly the labels
    // and CE weights validated below, whatever another thread writes into
    // the caller's arrays meanwhile.
    let owned = hard
        .as_ref()
        .map(|h| (h.labels.to_vec(), h.weight.to_vec()));
    let hard = match (hard, owned.as_ref()) {
        (Some(h), Some((labels, weight))) => Some(HardLabels {
            labels,
            weight,
            loss: h.loss,
        }),
        _ => None,
    };
    if let Some(h) = hard.as_ref() {
        check_len("labels", h.labels.len(), rows)?;
        check_len("ce_weight", h.weight.len(), rows)?;
        check_len("ce_loss", h.loss.len(), rows)?;
        let bad = h
            .labels
            .iter()
            .zip(h.weight)
            .position(|(&y, &w)| w != 0.0 && !(0..cols as i64).contains(&y));
        if let Some(r) = bad {
            return Err(KernelError::Parameter {
                what: "labels",
                message: format!("label {} of row {r} is outside [0, {cols})", h.labels[r]),
            });
        }
    }
    let inv_t = inverse_temperature(temperature)?;
    if rows == 0 {
        return Ok(());
    }
    let wants_grad = grads.student.is_some() || grads.teacher.is_some();
    // 1/T = 0.5 only for T = 2 exactly; then (s − max s) · 0.5 is exact.
    let ce_from_square = hard.is_some() && inv_t == 0.5;
    let plan = Plan {
        divergence,
        inv_t,
        keep: wants_grad || matches!(divergence, Divergence::Tvd | Divergence::Jsd { .. }),
        ce_t1: hard.is_some() && inv_t != 1.0,
        ce_from_square,
        recompute: recompute_mode::<S, T>(divergence, cols, ce_from_square),
    };
    let blocking = Blocking::new(rows, cols);
    let (per, len) = (blocking.rows_per_block, blocking.rows_per_block * cols);
    let hard_blocks: Vec<HardBlock<'_>> = match hard {
        Some(h) => h
            .labels
            .chunks(per)
            .zip(h.weight.chunks(per))
            .zip(h.loss.chunks_mut(per))
            .map(|((l, w), o)| Some((l, w, o)))
            .collect(),
        None => (0..blocking.blocks).map(|_| None).collect(),
    };
    let items: Vec<_> = student
        .chunks(len)
        .zip(teacher.chunks(len))
        .zip(weight.chunks(per).zip(loss.chunks_mut(per)))
        .zip(hard_blocks)
        .zip(split_rows(grads.student, len, blocking.blocks))
        .zip(split_rows(grads.teacher, len, blocking.blocks))
        .collect();
    run_blocks(items, |_, (((((sb, tb), (wb, lb)), hb), gs), gt)| {
        // Taken here, outside the SIMD-compiled body: closures inside it would
        // not inherit its target features.
        // Taken out for the block, put back after it: a panic drops it.
        SCRATCH.with(|cell| {
            let mut buf = cell.take();
            distill_block_at(level, sb, tb, cols, plan, wb, lb, hb, gs, gt, &mut buf);
            cell.replace(buf);
        })
    });
    Ok(())
}
