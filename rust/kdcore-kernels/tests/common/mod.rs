//! Helpers shared by the `kernels`, `distill` and `sparse` integration tests: the
//! xorshift64* generator, exact rounding of f64 to the storage types, ULP
//! distances, and the loss / gradient comparisons with the tolerances of
//! `kernels.rs` (the tolerances of docs/design.md, Tests):
//!
//! - f32 losses: error <= 1e-5 relative + 1e-6 absolute (times max(1, |w_r|));
//!   bf16/f16 inputs: 1e-4 relative + 1e-7 absolute.
//! - f32 gradients: error <= 5e-5 of the row's max|grad| plus 2ε times the
//!   size of the terms the f32 formula combines for that element
//!   (`RefGrad::cond`, the rounding error no f32 evaluation avoids).
//! - bf16/f16 gradients: within one ULP of the f64 reference rounded to the
//!   dtype, or else within the f32 rule above (counted). In every dtype, the
//!   correctly rounded reference itself passes (an exact value of 1e-52 must
//!   come out as 0 in f32).
//! - `RefGrad::slack` is an extra, per-element allowance used only where the
//!   exact function itself is not determined by f32 arithmetic: the
//!   subgradient of |x| at a near tie (TVD), and terms the f32 `exp` flushes to
//!   0 by contract (results below 2^-126, logits below -87.3). Elements that
//!   need it are counted and printed.
//! - NaN never passes: every comparison is written so that NaN fails it.
//!
//! `kernels.rs` uses these helpers too, but keeps its own stricter gradient
//! check (`check_grad_strict`: no slack, no rounded-reference pass).
#![allow(dead_code)]

use std::fmt::Debug;
use std::sync::OnceLock;

use half::{bf16, f16};
use kdcore_kernels::{Element, SimdLevel};

// ---------------------------------------------------------------------------
// Pseudo-random numbers: xorshift64*, Box-Muller normals.

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03 | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
    /// `k` distinct indices in [0, n), in random order.
    pub fn distinct(&mut self, n: usize, k: usize) -> Vec<usize> {
        let mut all: Vec<usize> = (0..n).collect();
        for i in 0..k {
            let j = i + self.below(n - i);
            all.swap(i, j);
        }
        all.truncate(k);
        all
    }
}

// ---------------------------------------------------------------------------
// Element types as the tests see them: exact rounding from f64 and ULP
// distances.

pub trait Dtype: Element + Debug + PartialEq {
    /// Round-to-nearest-even from f64 (the rounded reference).
    fn round(x: f64) -> Self;
    /// Monotonic integer image of the value (+0 and -0 both 0).
    fn ordered(self) -> i64;
    fn to_f64(self) -> f64 {
        self.to_f32() as f64
    }
    fn is_nan(self) -> bool {
        self.to_f32().is_nan()
    }
    fn bits(self) -> u32;
    const HALF: bool;
}

impl Dtype for f32 {
    fn round(x: f64) -> f32 {
        x as f32
    }
    fn ordered(self) -> i64 {
        let b = self.to_bits();
        if b >> 31 == 1 {
            -((b & 0x7FFF_FFFF) as i64)
        } else {
            b as i64
        }
    }
    fn bits(self) -> u32 {
        self.to_bits()
    }
    const HALF: bool = false;
}

fn ordered16(b: u16) -> i64 {
    if b >> 15 == 1 {
        -((b & 0x7FFF) as i64)
    } else {
        b as i64
    }
}

fn from_ordered16(o: i64) -> u16 {
    if o >= 0 {
        o as u16
    } else {
        0x8000 | (-o) as u16
    }
}

/// Correct RNE rounding of f64 to a 16-bit format, by checking the
/// neighbours of a first guess (the `half` crate's f64 conversions may round
/// twice).
fn round16(x: f64, guess: u16, to_f64: impl Fn(u16) -> f64, max_finite: u16, inf: u16) -> u16 {
    if x.is_nan() {
        return guess | 0x7FFF;
    }
    let max = to_f64(max_finite);
    let below_max = to_f64(max_finite - 1);
    if x.abs() >= max + (max - below_max) / 2.0 {
        return if x > 0.0 { inf } else { inf | 0x8000 };
    }
    let o = ordered16(guess).clamp(-(max_finite as i64), max_finite as i64);
    let mut best = from_ordered16(o);
    for cand in [o - 1, o + 1] {
        if cand.abs() > max_finite as i64 {
            continue;
        }
        let c = from_ordered16(cand);
        let (dc, db) = ((to_f64(c) - x).abs(), (to_f64(best) - x).abs());
        if dc < db || (dc == db && c & 1 == 0) {
            best = c;
        }
    }
    if best & 0x7FFF == 0 && x.is_sign_negative() {
        best = 0x8000; // -0 for small negative values
    }
    best
}

/// Values of all 2^16 bit patterns, from the `half` crate (a table keeps the
/// debug-build tests fast).
fn table16(to_f64: fn(u16) -> f64) -> Vec<f64> {
    (0..=u16::MAX).map(to_f64).collect()
}

fn bf16_table() -> &'static [f64] {
    static T: OnceLock<Vec<f64>> = OnceLock::new();
    T.get_or_init(|| table16(|b| bf16::from_bits(b).to_f64()))
}

fn f16_table() -> &'static [f64] {
    static T: OnceLock<Vec<f64>> = OnceLock::new();
    T.get_or_init(|| table16(|b| f16::from_bits(b).to_f64()))
}

impl Dtype for bf16 {
    fn round(x: f64) -> bf16 {
        let t = bf16_table();
        let guess = bf16::from_f64(x).to_bits();
        bf16::from_bits(round16(x, guess, |b| t[b as usize], 0x7F7F, 0x7F80))
    }
    fn ordered(self) -> i64 {
        ordered16(self.to_bits())
    }
    fn to_f64(self) -> f64 {
        bf16_table()[self.to_bits() as usize]
    }
    fn bits(self) -> u32 {
        self.to_bits() as u32
    }
    const HALF: bool = true;
}

impl Dtype for f16 {
    fn round(x: f64) -> f16 {
        let t = f16_table();
        let guess = f16::from_f64(x).to_bits();
        f16::from_bits(round16(x, guess, |b| t[b as usize], 0x7BFF, 0x7C00))
    }
    fn ordered(self) -> i64 {
        ordered16(self.to_bits())
    }
    fn to_f64(self) -> f64 {
        f16_table()[self.to_bits() as usize]
    }
    fn bits(self) -> u32 {
        self.to_bits() as u32
    }
    const HALF: bool = true;
}

pub fn ulp_distance<E: Dtype>(a: E, b: E) -> u64 {
    if a.is_nan() || b.is_nan() {
        return u64::MAX;
    }
    (a.ordered() - b.ordered()).unsigned_abs()
}

pub fn rounded<E: Dtype>(xs: &[f64]) -> Vec<E> {
    xs.iter().map(|&x| E::round(x)).collect()
}

pub fn widened<E: Dtype>(xs: &[E]) -> Vec<f64> {
    xs.iter().map(|x| x.to_f64()).collect()
}

pub fn bits_of<E: Dtype>(xs: &[E]) -> Vec<u32> {
    xs.iter().map(|x| x.bits()).collect()
}

pub fn name2<P: Element, Q: Element>() -> String {
    format!("student={} teacher={}", P::NAME, Q::NAME)
}

// ---------------------------------------------------------------------------
// float64 helpers.

pub fn max64(xs: &[f64]) -> f64 {
    xs.iter()
        .fold(f64::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

pub fn max_abs(xs: &[f64]) -> f64 {
    xs.iter().fold(0.0f64, |m, w| m.max(w.abs()))
}

/// |x| where finite, else 0 (the size of a term that is not -inf).
pub fn fin(x: f64) -> f64 {
    if x.is_finite() {
        x.abs()
    } else {
        0.0
    }
}

/// Shifted logits (x - max) / T and log Σ exp of them (-inf entries stay -inf).
pub fn shifted_and_log_z(x: &[f64], t: f64) -> (Vec<f64>, f64) {
    let m = max64(x);
    let s: Vec<f64> = x.iter().map(|v| (v - m) / t).collect();
    let z: f64 = s.iter().map(|v| v.exp()).sum();
    (s, z.ln())
}

/// log softmax(x / T) of one row.
pub fn ref_log_softmax(x: &[f64], t: f64) -> Vec<f64> {
    let (s, lz) = shifted_and_log_z(x, t);
    s.iter().map(|v| v - lz).collect()
}

/// ln(e^x + e^y), -inf when both are -inf.
pub fn log_add_exp(x: f64, y: f64) -> f64 {
    let (hi, lo) = if x > y { (x, y) } else { (y, x) };
    if hi == f64::NEG_INFINITY {
        f64::NEG_INFINITY
    } else {
        hi + (lo - hi).exp().ln_1p()
    }
}

/// The f32 `exp` flushes results below 2^-126 (inputs below -87.34) to 0; a
/// little margin above the cut, for the rounding of the shifted logit.
pub const FLUSH_BELOW: f64 = -87.0;

/// ε of f32.
pub const EPS: f64 = f32::EPSILON as f64;

/// Error of the f32 lane sums of a row, in units of ε times the sum of the
/// magnitudes: each lane adds at most 32 terms in f32 before widening to f64.
pub const ACC: f64 = 7.0;

// ---------------------------------------------------------------------------
// Comparisons.

/// A reference gradient row: the exact values, per element the size of the
/// terms the kernel's f32 formula combines to get it (ε times this bounds the
/// rounding error of any f32 evaluation), and an extra allowance where the
/// exact value is not determined by the f32 inputs (see the module docs).
pub struct RefGrad {
    pub want: Vec<f64>,
    pub cond: Vec<f64>,
    pub slack: Vec<f64>,
}

impl RefGrad {
    pub fn zeros(n: usize) -> RefGrad {
        RefGrad {
            want: vec![0.0; n],
            cond: vec![0.0; n],
            slack: vec![0.0; n],
        }
    }
}

/// Error statistics of one group of checks.
#[derive(Default, Debug)]
pub struct Stats {
    pub elements: usize,
    /// Half-precision elements outside one ULP (accepted by the f32 rule).
    pub beyond_one_ulp: usize,
    /// f32 elements whose error exceeds 5e-5 of the tensor's max|grad|,
    /// accepted by the rounding-error rule.
    pub beyond_spec: usize,
    /// Elements accepted only thanks to `RefGrad::slack`.
    pub slack_used: usize,
    /// max |got - want| / (5e-5 · max_tensor |want|).
    pub max_spec_ratio: f64,
    /// max |got - want| / tolerance used.
    pub max_tol_ratio: f64,
    /// max |got - want| / tolerance of losses.
    pub max_loss_ratio: f64,
    /// max relative error of f32 (log-)softmax outputs (`kernels.rs`).
    pub max_value_rel: f64,
}

impl Stats {
    pub fn add(&mut self, o: Stats) {
        self.elements += o.elements;
        self.beyond_one_ulp += o.beyond_one_ulp;
        self.beyond_spec += o.beyond_spec;
        self.slack_used += o.slack_used;
        self.max_spec_ratio = self.max_spec_ratio.max(o.max_spec_ratio);
        self.max_tol_ratio = self.max_tol_ratio.max(o.max_tol_ratio);
        self.max_loss_ratio = self.max_loss_ratio.max(o.max_loss_ratio);
        self.max_value_rel = self.max_value_rel.max(o.max_value_rel);
    }
}

pub fn grad_summary(st: &Stats) -> String {
    format!(
        "max loss err {:.2} x tolerance; {} grad elements; max err {:.2} x (5e-5 max|grad| of \
         the tensor), {} elements above it; {} half elements beyond 1 ULP; {} need the \
         tie/flush allowance; max err {:.2} x tolerance",
        st.max_loss_ratio,
        st.elements,
        st.max_spec_ratio,
        st.beyond_spec,
        st.beyond_one_ulp,
        st.slack_used,
        st.max_tol_ratio
    )
}

/// One row of a gradient against its f64 reference (rules in the module docs).
pub fn check_grad<E: Dtype>(
    got: &[E],
    r: &RefGrad,
    tensor_max: f64,
    ctx: &dyn Fn() -> String,
) -> Stats {
    assert_eq!(got.len(), r.want.len());
    let row_max = max_abs(&r.want);
    let mut st = Stats {
        elements: got.len(),
        ..Stats::default()
    };
    for (j, &g) in got.iter().enumerate() {
        let (w, c, slack) = (r.want[j], r.cond[j], r.slack[j]);
        let err = (g.to_f64() - w).abs();
        let strict = 5e-5 * row_max + 2.0 * EPS * c;
        let tol = strict + slack;
        // The correctly rounded reference itself always passes (it matters
        // for exact values below the f32 range, 1e-52 say, which round to 0).
        let within_f32 = err <= tol || (!g.is_nan() && g == E::round(w));
        let spec_ratio = err / (5e-5 * tensor_max);
        if E::HALF {
            let d = ulp_distance(g, E::round(w));
            if d > 1 {
                assert!(
                    within_f32,
                    "{}: col {j}: got {g:?} want {w:e} (rounded {:?}): {d} ULP, error {err:e}, \
                     tolerance {tol:e} (slack {slack:e})",
                    ctx(),
                    E::round(w)
                );
                st.beyond_one_ulp += 1;
                st.max_tol_ratio = st.max_tol_ratio.max(err / tol);
                if err > strict {
                    st.slack_used += 1;
                }
            }
        } else {
            assert!(
                within_f32,
                "{}: col {j}: got {g:?} want {w:e}: error {err:e}, tolerance {tol:e} (slack \
                 {slack:e}; max|grad| row {row_max:e}, tensor {tensor_max:e})",
                ctx()
            );
            if err > 5e-5 * tensor_max {
                st.beyond_spec += 1;
            }
            if err > strict {
                st.slack_used += 1;
            }
            if err > 0.0 {
                st.max_spec_ratio = st.max_spec_ratio.max(spec_ratio);
                st.max_tol_ratio = st.max_tol_ratio.max(err / tol);
            }
        }
    }
    st
}

/// (|got - want|, tolerance) of a loss under the rule of `check_loss`; the
/// error is NaN (and fails any comparison) when `got` is NaN.
pub fn loss_error(got: f32, want: f64, weight: f32, half: bool) -> (f64, f64) {
    let (rel, abs) = if half { (1e-4, 1e-7) } else { (1e-5, 1e-6) };
    let err = (got as f64 - want).abs();
    (err, rel * want.abs() + abs * (weight.abs() as f64).max(1.0))
}

/// A row's loss: f32 inputs within 1e-5 relative + 1e-6 absolute (times
/// max(1, |w|)); half inputs within 1e-4 relative + 1e-7 absolute. Returns
/// the error / tolerance.
pub fn check_loss(got: f32, want: f64, weight: f32, half: bool, ctx: &dyn Fn() -> String) -> f64 {
    if want.is_infinite() {
        assert_eq!(got as f64, want, "{}: loss", ctx());
        return 0.0;
    }
    let (err, tol) = loss_error(got, want, weight, half);
    assert!(
        err <= tol,
        "{}: loss got {got:e} want {want:e} (error {err:e}, relative {:e}, tolerance {tol:e})",
        ctx(),
        err / want.abs()
    );
    err / tol
}

/// Whether a call of `rows x cols` takes the parallel path (more than one
/// block: at least 2^15 elements and more than one row).
pub fn is_parallel(rows: usize, cols: usize) -> bool {
    rows * cols >= 1 << 15 && rows > 1
}

// ---------------------------------------------------------------------------
// SIMD level under test.

std::thread_local! {
    /// The level the kernel calls of this test thread run at (None: detected).
    static LEVEL: std::cell::Cell<Option<SimdLevel>> = const { std::cell::Cell::new(None) };
}

/// The SIMD level a test's kernel calls use: the detected one, or the one
/// [`at_every_level`] is running.
pub fn level() -> SimdLevel {
    LEVEL.with(|l| l.get()).unwrap_or_else(SimdLevel::detect)
}

/// Runs `body` once at each SIMD level this CPU has (each compiled with its
/// own chunk width), the kernel calls of this thread pinned to it.
pub fn at_every_level(body: impl Fn(SimdLevel)) {
    let levels = SimdLevel::available();
    assert!(levels.contains(&SimdLevel::portable()));
    for level in levels {
        println!("SIMD level {} ({} lanes)", level.name(), level.lanes());
        LEVEL.with(|l| l.set(Some(level)));
        body(level);
    }
    LEVEL.with(|l| l.set(None));
}
