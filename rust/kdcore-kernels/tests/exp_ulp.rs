//! The vectorised `exp` of the kernel crate, measured in ULPs of f32 against
//! the f64 `exp` of the platform's libm, at every SIMD level this CPU runs.
//!
//! Contract (see `kdcore_kernels::simd::exp`):
//! - within 2 ULP of the correctly rounded result wherever that result is a
//!   normal f32;
//! - subnormal results are flushed: for x < -87.33655 (the f32 just below
//!   ln(f32::MIN_POSITIVE) = -87.3365447...) the result is exactly +0. The
//!   cut lies below the point where the true result becomes subnormal, so no
//!   normal result is ever flushed; the one input between the two (whose true
//!   result is subnormal) must give a value in [0, f32::MIN_POSITIVE];
//! - +inf above 88.72283 (just below ln(f32::MAX) = 88.7228391...): checked
//!   below that no input above the cut has a finite correctly rounded result;
//! - exp(-inf) = 0, exp(+inf) = +inf, exp(NaN) = NaN, exp(±0) = 1 exactly.
//!
//! Measured maximum error (x86-64 with AVX-512; exhaustive over all 2^32
//! inputs with `cargo test --release --test exp_ulp -- --ignored --nocapture`,
//! about 1 minute on 2 cores): 1 ULP from the correctly rounded result at
//! every level (avx512, avx2+fma, portable) over the 2,237,668,968 inputs
//! with a normal result; at most 1.01 ULP (FMA levels) / 0.99 ULP (portable)
//! from the exact value.
//! The dense test prints the figures it measures.

use kdcore_kernels::simd::{exp_nonpos_slice, exp_slice, SimdLevel};

/// Smallest input the kernel does not flush to 0 (the documented cut).
const EXP_LO: f32 = -87.336_55;
/// Largest input the kernel does not send to +inf (the documented cut).
const EXP_HI: f32 = 88.722_83;

/// Maps an f32 to an integer that is monotonic in its value (+0 and -0 both
/// map to 0), so that ULP distances are differences of these integers.
fn ordered(x: f32) -> i64 {
    let bits = x.to_bits();
    if bits >> 31 == 1 {
        -((bits & 0x7FFF_FFFF) as i64)
    } else {
        bits as i64
    }
}

/// Distance in f32 ULPs between two non-NaN floats (number of representable
/// values stepped over going from one to the other).
fn ulp_distance(a: f32, b: f32) -> u64 {
    assert!(!a.is_nan() && !b.is_nan(), "ulp_distance of NaN: {a} {b}");
    (ordered(a) - ordered(b)).unsigned_abs()
}

/// Error of `y` against the exact value `e` (> 0, in the normal f32 range),
/// in units of the f32 ULP at `e`.
fn ulp_error(y: f32, e: f64) -> f64 {
    let exponent = ((e.to_bits() >> 52) & 0x7FF) as i32 - 1023;
    let ulp = 2f64.powi(exponent - 23);
    (y as f64 - e).abs() / ulp
}

#[derive(Default, Debug, Clone, Copy)]
struct Stats {
    checked: u64,
    max_ulp: u64,
    max_ulp_at: f32,
    max_err: f64,
    subnormal_inputs: u64,
}

impl Stats {
    fn merge(&mut self, o: &Stats) {
        self.checked += o.checked;
        self.subnormal_inputs += o.subnormal_inputs;
        if o.max_ulp > self.max_ulp {
            self.max_ulp = o.max_ulp;
            self.max_ulp_at = o.max_ulp_at;
        }
        self.max_err = self.max_err.max(o.max_err);
    }
}

/// Checks `ys = exp(xs)` against the contract; returns error statistics.
/// Panics with the offending input on the first violation.
fn check(level: SimdLevel, xs: &[f32], ys: &[f32]) -> Stats {
    let mut s = Stats::default();
    for (&x, &y) in xs.iter().zip(ys) {
        let name = level.name();
        if x.is_nan() {
            assert!(
                y.is_nan(),
                "{name}: exp({x:e} = {:#010x}) = {y:e}",
                x.to_bits()
            );
            continue;
        }
        if x < EXP_LO {
            assert_eq!(y.to_bits(), 0, "{name}: exp({x:e}) = {y:e}, want +0");
            continue;
        }
        if x > EXP_HI {
            assert_eq!(y, f32::INFINITY, "{name}: exp({x:e}) = {y:e}, want +inf");
            continue;
        }
        let e = (x as f64).exp();
        let rounded = e as f32; // round to nearest even
        assert!(
            rounded.is_finite(),
            "{name}: exp({x:e}) overflows f32 but the kernel cut is above it"
        );
        if rounded.is_normal() {
            let d = ulp_distance(y, rounded);
            s.checked += 1;
            if d > s.max_ulp {
                s.max_ulp = d;
                s.max_ulp_at = x;
            }
            s.max_err = s.max_err.max(ulp_error(y, e));
            assert!(
                d <= 2,
                "{name}: exp({x:e}) = {y:e}, correctly rounded {rounded:e}: {d} ULP"
            );
        } else {
            // The correctly rounded result is subnormal (or 0): the kernel may
            // flush it; it must still be a non-negative value no larger than
            // the smallest normal.
            s.subnormal_inputs += 1;
            assert!(
                (0.0..=f32::MIN_POSITIVE).contains(&y),
                "{name}: exp({x:e}) = {y:e}, true value {e:e} is subnormal"
            );
        }
    }
    s
}

fn run_level(level: SimdLevel, xs: &[f32]) -> Stats {
    let mut ys = vec![0.0f32; xs.len()];
    exp_slice(level, xs, &mut ys).expect("level listed as available");
    check(level, xs, &ys)
}

/// Every `stride`-th bit pattern in [lo_bits, hi_bits] plus the last one.
fn strided(lo_bits: u32, hi_bits: u32, stride: u32, out: &mut Vec<f32>) {
    let mut b = lo_bits;
    while b <= hi_bits {
        out.push(f32::from_bits(b));
        match b.checked_add(stride) {
            Some(n) => b = n,
            None => break,
        }
    }
    out.push(f32::from_bits(hi_bits));
}

/// Every bit pattern within `radius` patterns of `x` (same sign).
fn around(x: f32, radius: u32, out: &mut Vec<f32>) {
    let b = x.to_bits();
    let sign = b & 0x8000_0000;
    let mag = b & 0x7FFF_FFFF;
    for m in mag.saturating_sub(radius)..=mag.saturating_add(radius).min(0x7F80_0000) {
        out.push(f32::from_bits(sign | m));
    }
}

fn dense_inputs() -> Vec<f32> {
    // Stride chosen so that the test (three levels, debug build) stays within
    // a few seconds: ~4.4 million points per level. A prime stride walks
    // through all mantissa residues rather than a fixed sub-lattice.
    const STRIDE: u32 = 509;
    let mut xs = Vec::with_capacity(4_500_000 + 100_000);
    // [+0, 88.7] and [-0, -87.3] by bit pattern: every binade equally.
    strided(0, 88.7f32.to_bits(), STRIDE, &mut xs);
    strided(0x8000_0000, (-87.3f32).to_bits(), STRIDE, &mut xs);
    // Every pattern near the ends of the range and of the cuts.
    for edge in [
        EXP_LO,
        EXP_HI,
        -87.3,
        88.7,
        (f32::MIN_POSITIVE as f64).ln() as f32,
        (f32::MAX as f64).ln() as f32,
    ] {
        around(edge, 4096, &mut xs);
    }
    // Around every breakpoint of the range reduction (x = (k + 1/2) ln 2) and
    // the integers n ln 2, where r is largest / 2^n switches.
    for k in -127..=128 {
        let x = (k as f64 + 0.5) * std::f64::consts::LN_2;
        around(x as f32, 16, &mut xs);
        around((k as f64 * std::f64::consts::LN_2) as f32, 16, &mut xs);
    }
    // Tiny magnitudes around 0 (where 1 + r must round to exactly 1).
    around(f32::MIN_POSITIVE, 64, &mut xs);
    around(-f32::MIN_POSITIVE, 64, &mut xs);
    around(f32::EPSILON, 64, &mut xs);
    around(-f32::EPSILON, 64, &mut xs);
    // Beyond the range: flushed to 0 / +inf, plus NaNs of every kind.
    strided((-87.34f32).to_bits(), 0xFF80_0000, 4093, &mut xs);
    strided(88.73f32.to_bits(), 0x7F80_0000, 4093, &mut xs);
    strided(0x7F80_0001, 0x7FFF_FFFF, 65_521, &mut xs);
    strided(0xFF80_0001, 0xFFFF_FFFF, 65_521, &mut xs);
    xs
}

#[test]
fn exp_dense_all_levels() {
    let xs = dense_inputs();
    let levels = SimdLevel::available();
    assert_eq!(*levels.last().unwrap(), SimdLevel::portable());
    if std::env::var_os("KDCORE_SIMD").is_none() {
        assert_eq!(levels[0], SimdLevel::detect());
    }
    for level in levels {
        let s = run_level(level, &xs);
        assert!(s.checked > 4_000_000, "too few points checked: {s:?}");
        println!(
            "exp {:>9}: {} inputs, {} with a normal result: max {} ULP (at x = {:e}), \
             max {:.3} ULP from the exact value; {} inputs with a subnormal true result",
            level.name(),
            xs.len(),
            s.checked,
            s.max_ulp,
            s.max_ulp_at,
            s.max_err,
            s.subnormal_inputs
        );
    }
}

#[test]
fn exp_special_values() {
    let specials = [
        (f32::NEG_INFINITY, 0.0f32),
        (f32::INFINITY, f32::INFINITY),
        (0.0, 1.0),
        (-0.0, 1.0),
        (f32::MIN, 0.0),
        (f32::MAX, f32::INFINITY),
        (-87.34, 0.0),
        (-100.0, 0.0),
        (-1e30, 0.0),
        (88.73, f32::INFINITY),
        (100.0, f32::INFINITY),
        (1e30, f32::INFINITY),
        (1.0, std::f32::consts::E),
    ];
    let nans = [
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7F80_0001), // signalling
        f32::from_bits(0xFF80_0001),
        f32::from_bits(0x7FFF_FFFF),
        f32::from_bits(0xFFFF_FFFF),
    ];
    for level in SimdLevel::available() {
        // Odd lengths exercise the non-multiple-of-lanes tail.
        for len in [1usize, 3, 31, 32, 33, 100] {
            let mut xs = Vec::new();
            let mut want = Vec::new();
            for i in 0..len {
                let (x, w) = specials[i % specials.len()];
                xs.push(x);
                want.push(w);
            }
            let mut ys = vec![f32::NAN; len];
            exp_slice(level, &xs, &mut ys).unwrap();
            for ((x, w), y) in xs.iter().zip(&want).zip(&ys) {
                assert_eq!(
                    y.to_bits(),
                    w.to_bits(),
                    "{}: exp({x:e}) = {y:e}, want {w:e}",
                    level.name()
                );
            }
            let xs: Vec<f32> = (0..len).map(|i| nans[i % nans.len()]).collect();
            exp_slice(level, &xs, &mut ys).unwrap();
            assert!(ys.iter().all(|y| y.is_nan()), "{}: {ys:?}", level.name());
        }
        // Length mismatch is refused, not a panic.
        let mut out = [0.0f32; 2];
        assert!(exp_slice(level, &[1.0, 2.0, 3.0], &mut out).is_none());
        assert!(exp_slice(level, &[], &mut []).is_some());
    }
}

#[test]
fn exp_cuts_are_where_documented() {
    // No input above the +inf cut has a finite correctly rounded result, and
    // no input below the 0 cut has a normal one (so flushing loses nothing
    // but subnormals).
    let above = EXP_HI.next_up();
    assert!((above as f64).exp() as f32 == f32::INFINITY);
    assert!(((EXP_HI as f64).exp() as f32).is_finite());
    let below = EXP_LO.next_down();
    assert!(!((below as f64).exp() as f32).is_normal());
    // The cuts straddle ln(f32::MIN_POSITIVE) and ln(f32::MAX) as documented.
    let (ln_min, ln_max) = ((f32::MIN_POSITIVE as f64).ln(), (f32::MAX as f64).ln());
    assert!(
        (EXP_LO as f64) < ln_min && EXP_LO > -87.34,
        "{EXP_LO} vs {ln_min}"
    );
    assert!(
        (EXP_HI as f64) < ln_max && EXP_HI < 88.73,
        "{EXP_HI} vs {ln_max}"
    );
}

/// All 2^32 inputs at every level. Run with
/// `cargo test --release --test exp_ulp -- --ignored --nocapture`.
#[test]
#[ignore = "exhaustive over 2^32 inputs: run in release with --ignored"]
fn exp_exhaustive_all_levels() {
    let levels = SimdLevel::available();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    const CHUNK: u64 = 1 << 20;
    let chunks = (1u64 << 32) / CHUNK;
    let next = std::sync::atomic::AtomicU64::new(0);
    let totals: Vec<Vec<Stats>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut stats = vec![Stats::default(); levels.len()];
                    let mut xs = vec![0.0f32; CHUNK as usize];
                    let mut ys = vec![0.0f32; CHUNK as usize];
                    loop {
                        let c = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if c >= chunks {
                            break stats;
                        }
                        for (i, x) in xs.iter_mut().enumerate() {
                            *x = f32::from_bits((c * CHUNK + i as u64) as u32);
                        }
                        for (level, st) in levels.iter().zip(stats.iter_mut()) {
                            exp_slice(*level, &xs, &mut ys).unwrap();
                            st.merge(&check(*level, &xs, &ys));
                        }
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, level) in levels.iter().enumerate() {
        let mut s = Stats::default();
        totals.iter().for_each(|t| s.merge(&t[i]));
        println!(
            "exp {:>9} exhaustive: {} normal results, max {} ULP (at x = {:e}), \
             max {:.4} ULP from exact; {} subnormal true results",
            level.name(),
            s.checked,
            s.max_ulp,
            s.max_ulp_at,
            s.max_err,
            s.subnormal_inputs
        );
        assert!(s.max_ulp <= 2);
    }
}

/// `exp_nonpos`, the kernels' exp for max-shifted logits, keeps the `exp`
/// contract on its domain x <= 0 (dense over the negative floats, the flush
/// cut, -0, -inf and NaN).
#[test]
fn exp_nonpos_matches_exp_contract_on_nonpositive_inputs() {
    let mut xs = Vec::new();
    // Every 97th negative pattern from -0 down to below the flush cut.
    strided(0x8000_0000, (-90.0f32).to_bits(), 97, &mut xs);
    around(EXP_LO, 64, &mut xs);
    around(-1.0, 64, &mut xs);
    xs.extend([-0.0, 0.0, f32::NEG_INFINITY, -f32::MIN_POSITIVE, -1e-30]);
    for level in SimdLevel::available() {
        let mut ys = vec![0.0f32; xs.len()];
        exp_nonpos_slice(level, &xs, &mut ys).expect("level listed as available");
        let stats = check(level, &xs, &ys);
        println!("exp_nonpos {}: {stats:?}", level.name());
        let mut nan = [0.0f32];
        exp_nonpos_slice(level, &[f32::NAN], &mut nan).unwrap();
        assert!(
            nan[0].is_nan(),
            "{}: exp_nonpos(NaN) = {}",
            level.name(),
            nan[0]
        );
    }
}

/// `log1p_unit` (ln(1 + e) for e in [0, 1], the JSD kernel's softplus): within
/// 2 ULP of the correctly rounded ln_1p over a dense sample of [0, 1] (tiny e
/// included, where ln of a rounded 1 + e would be far off), exact specials.
#[test]
fn log1p_unit_is_within_two_ulp_on_zero_to_one() {
    use kdcore_kernels::simd::log1p_unit_slice;
    let mut xs = Vec::new();
    strided(f32::MIN_POSITIVE.to_bits(), 1.0f32.to_bits(), 37, &mut xs);
    around(1e-4, 256, &mut xs);
    around(6e-8, 256, &mut xs);
    for level in SimdLevel::available() {
        let mut ys = vec![0.0f32; xs.len()];
        log1p_unit_slice(level, &xs, &mut ys).expect("level listed as available");
        let mut worst = (0u64, 0.0f32);
        for (&x, &y) in xs.iter().zip(&ys) {
            let exact = (x as f64).ln_1p() as f32;
            let d = ulp_distance(y, exact);
            if d > worst.0 {
                worst = (d, x);
            }
        }
        println!(
            "log1p_unit {}: max {} ULP at {:e} over {} inputs",
            level.name(),
            worst.0,
            worst.1,
            xs.len()
        );
        assert!(
            worst.0 <= 2,
            "{}: log1p_unit({:e}) off by {} ULP",
            level.name(),
            worst.1,
            worst.0
        );
        let specials = [0.0, 1.0, f32::NAN];
        let mut out = [0.0f32; 3];
        log1p_unit_slice(level, &specials, &mut out).unwrap();
        assert_eq!(out[0], 0.0);
        assert_eq!(out[1], std::f64::consts::LN_2 as f32);
        assert!(out[2].is_nan());
    }
}
