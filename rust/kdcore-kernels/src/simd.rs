//! Run-time SIMD selection and the vectorised math the kernels share.
//!
//! The kernels are written once, over fixed-size lane arrays ([`Lanes`]) whose
//! width is a const generic, and compiled several times: inside
//! `#[target_feature]` wrappers for AVX-512 and AVX2+FMA, and once for the
//! portable baseline (SSE2 on x86-64, NEON on aarch64), each at the width that
//! suits its registers ([`SimdLevel::lanes`]). LLVM vectorises the lane loops
//! for each feature set; the level is detected once at run time, so a wheel
//! built anywhere runs anywhere.

use std::sync::OnceLock;

/// Lanes processed together at each level: four vector registers per lane
/// array, independent work that hides the latency of the `exp` polynomial (a
/// dependency chain). AVX-512 has 32 zmm registers of 16 lanes. AVX2 has 16
/// ymm registers of 8: at 64 lanes (eight per array) some kernels measured
/// faster and others slower, so it keeps 32 (docs/benchmarks.md).
pub(crate) const AVX512_LANES: usize = 64;
pub(crate) const AVX2_LANES: usize = 32;
/// SSE2 / NEON (16 registers of 4 lanes): 16 and 32 lanes measured the same.
pub(crate) const PORTABLE_LANES: usize = 32;

/// One chunk of a row, widened to f32 (`L`: the level's lane count).
pub type Lanes<const L: usize> = [f32; L];

/// An instruction set this CPU runs, as a token: only run-time detection
/// ([`SimdLevel::detect`], [`SimdLevel::available`]) and the always-safe
/// [`SimdLevel::portable`] make one, so safe code cannot select AVX-512 on a
/// CPU without it.
///
/// Neither naming a level nor dispatching by hand compiles outside the crate:
///
/// ```compile_fail
/// let _forged = kdcore_kernels::SimdLevel::Avx512;
/// ```
///
/// ```compile_fail
/// fn body<A: kdcore_kernels::simd::Arch>(_x: &[f32]) {}
/// kdcore_kernels::simd_dispatch!(fn forged<>(x: &[f32]) => body);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimdLevel(Isa);

/// The instruction sets a kernel can be compiled for (private: see [`SimdLevel`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    Avx512,
    Avx2Fma,
    Portable,
}

impl SimdLevel {
    /// The best level this CPU supports (detected once), or the lower level
    /// that the environment variable `KDCORE_SIMD` names (`avx512`,
    /// `avx2+fma`, `portable`; `neon` on aarch64) when this CPU runs it.
    /// The variable is read once, at the first call; a name this CPU cannot
    /// run (or an unknown one) is ignored. It lets benchmarks time the lower
    /// levels on a machine that has the higher ones.
    pub fn detect() -> SimdLevel {
        static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
        *LEVEL.get_or_init(detect_uncached)
    }

    /// Every level this CPU can run, best first (benchmarks and tests use it).
    pub fn available() -> Vec<SimdLevel> {
        let mut levels = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if avx512_supported() {
                levels.push(SimdLevel(Isa::Avx512));
            }
            if avx2_supported() {
                levels.push(SimdLevel(Isa::Avx2Fma));
            }
        }
        levels.push(SimdLevel::portable());
        levels
    }

    /// The baseline every CPU of the target runs (SSE2 on x86-64, NEON on aarch64).
    pub fn portable() -> SimdLevel {
        SimdLevel(Isa::Portable)
    }

    /// The instruction set (what `simd_dispatch!` matches on).
    pub(crate) fn isa(self) -> Isa {
        self.0
    }

    /// f32 lanes a row chunk holds at this level (the kernels' unit of work).
    pub fn lanes(self) -> usize {
        match self.0 {
            Isa::Avx512 => AVX512_LANES,
            Isa::Avx2Fma => AVX2_LANES,
            Isa::Portable => PORTABLE_LANES,
        }
    }

    pub fn name(self) -> &'static str {
        match self.0 {
            Isa::Avx512 => "avx512",
            Isa::Avx2Fma => "avx2+fma",
            Isa::Portable => {
                if cfg!(target_arch = "aarch64") {
                    "neon"
                } else {
                    "portable"
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn avx512_supported() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && avx2_supported()
}

#[cfg(target_arch = "x86_64")]
fn avx2_supported() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// The best available level, or the one `KDCORE_SIMD` names (see
/// [`SimdLevel::detect`]).
fn detect_uncached() -> SimdLevel {
    let wanted = std::env::var("KDCORE_SIMD").unwrap_or_default();
    level_named(&SimdLevel::available(), &wanted)
}

/// The level of `levels` (best first) called `wanted`, else the best.
fn level_named(levels: &[SimdLevel], wanted: &str) -> SimdLevel {
    levels
        .iter()
        .copied()
        .find(|level| level.name() == wanted.trim())
        .unwrap_or(levels[0])
}

/// Whether the code being compiled may use fused multiply-add.
pub trait Arch {
    const FMA: bool;
}
/// Feature sets with FMA (AVX2+FMA, AVX-512, aarch64).
pub struct Fused;
/// The x86-64 baseline: no FMA (a software `fmaf` would be slow).
pub struct Plain;
impl Arch for Fused {
    const FMA: bool = true;
}
impl Arch for Plain {
    const FMA: bool = false;
}
/// The `Arch` of the portable build: aarch64 always has FMA.
#[cfg(target_arch = "aarch64")]
pub type Baseline = Fused;
#[cfg(not(target_arch = "aarch64"))]
pub type Baseline = Plain;

/// a * b + c, fused where the target has FMA.
#[inline(always)]
pub fn madd<A: Arch>(a: f32, b: f32, c: f32) -> f32 {
    if A::FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

const EXP_LO: f32 = -87.336_55; // below: the result is subnormal; flushed to 0
const EXP_HI: f32 = 88.722_83; // above: +inf
const LOG2E: f32 = std::f32::consts::LOG2_E;
// ln 2 split so that n * LN2_HI is exact for the n that occur (Cody-Waite).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
// 1.5 * 2^23: adding it rounds to the nearest integer (ties to even).
const ROUND_MAGIC: f32 = 12_582_912.0;
// Minimax polynomial for (e^r - 1 - r) / r^2 on [-ln2/2, ln2/2] (Cephes).
const P0: f32 = 1.987_569_1e-4;
const P1: f32 = 1.398_199_9e-3;
const P2: f32 = 8.333_452e-3;
const P3: f32 = 4.166_579_6e-2;
const P4: f32 = 1.666_666_5e-1;
const P5: f32 = 0.5; // Cephes: 5.0000001e-1, which is 0.5 in f32

/// e^x in f32, branch-free so that loops over it vectorise.
///
/// Within 2 ULP of the correctly rounded result where that result is a
/// normal float; 0 where it would be subnormal (x < -87.34); +inf above
/// 88.72; NaN for NaN; exp(-inf) = 0.
#[inline(always)]
pub fn exp<A: Arch>(x: f32) -> f32 {
    let xc = if x < EXP_LO { EXP_LO } else { x };
    let xc = if xc > EXP_HI { EXP_HI } else { xc };
    let (y, ni) = exp_reduced::<A>(xc);
    // 2^n as two normal factors: n reaches 128 near the top of the range.
    let n1 = ni >> 1;
    let n2 = ni - n1;
    let s1 = f32::from_bits(((n1 + 127) as u32) << 23);
    let s2 = f32::from_bits(((n2 + 127) as u32) << 23);
    // NaN needs no select of its own: the clamps keep it and every step after
    // propagates it.
    let result = y * s1 * s2;
    if x < EXP_LO {
        0.0
    } else if x > EXP_HI {
        f32::INFINITY
    } else {
        result
    }
}

/// e^x = y · 2^n for a clamped x: n = round(x / ln 2), y = e^r on
/// r = x − n ln 2 in [−ln2/2, ln2/2] (Cody-Waite reduction, Cephes polynomial).
#[inline(always)]
fn exp_reduced<A: Arch>(xc: f32) -> (f32, i32) {
    let shifted = madd::<A>(xc, LOG2E, ROUND_MAGIC);
    let n = shifted - ROUND_MAGIC;
    let ni = (shifted.to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32);
    let r = madd::<A>(n, -LN2_HI, xc);
    let r = madd::<A>(n, -LN2_LO, r);
    let mut p = madd::<A>(P0, r, P1);
    p = madd::<A>(p, r, P2);
    p = madd::<A>(p, r, P3);
    p = madd::<A>(p, r, P4);
    p = madd::<A>(p, r, P5);
    (madd::<A>(p, r * r, r) + 1.0, ni)
}

/// e^x for x <= 0, the max-shifted logits of a softmax: [`exp`] without the
/// upper clamp and the split power of two (2^n is one normal factor for
/// n in [-126, 0]). Same accuracy as [`exp`] on x <= 0, 0 for x < -87.34 and
/// -inf, NaN for NaN; results for x > 0 are unspecified.
#[inline(always)]
pub fn exp_nonpos<A: Arch>(x: f32) -> f32 {
    let xc = if x < EXP_LO { EXP_LO } else { x };
    let (y, ni) = exp_reduced::<A>(xc);
    // wrapping: a NaN input gives a meaningless n, and NaN * anything is NaN.
    let scale = f32::from_bits((ni.wrapping_add(127) as u32) << 23);
    let result = y * scale;
    if x < EXP_LO {
        0.0
    } else {
        result
    }
}

/// Lane-wise [`exp_nonpos`].
#[inline(always)]
pub fn exp_nonpos_lanes<A: Arch, const L: usize>(x: &Lanes<L>) -> Lanes<L> {
    let mut out = [0.0; L];
    for i in 0..L {
        out[i] = exp_nonpos::<A>(x[i]);
    }
    out
}

/// ln(1 + e^{−|x|}), the part softplus(x) = ln(1 + e^x) and softplus(−x)
/// share: softplus(±x) = max(±x, 0) + this. One exp and [`log1p_unit`]
/// give both, with no cancellation for large |x|; 0 for x = ±inf, NaN for NaN.
#[inline(always)]
pub fn softplus_shared<A: Arch>(x: f32) -> f32 {
    log1p_unit::<A>(exp_nonpos::<A>(-x.abs()))
}

/// ln(1 + e) for e in [0, 1], to a few ulps relative to the result at every e
/// (ln(1 + e) itself loses e's low digits to the rounding of 1 + e: a
/// relative error of ~6e-8 / e, which JSD at small β feels):
/// 2 atanh(s) = 2 (s + s³/3 + … + s¹⁵/15) with s = e / (2 + e) ≤ 1/3
/// (truncation < 2e-9 relative). NaN stays NaN.
#[inline(always)]
pub fn log1p_unit<A: Arch>(e: f32) -> f32 {
    let s = e / (2.0 + e);
    let s2 = s * s;
    let mut p: f32 = 1.0 / 15.0;
    for c in [
        1.0 / 13.0,
        1.0 / 11.0,
        1.0 / 9.0,
        1.0 / 7.0,
        1.0 / 5.0,
        1.0 / 3.0,
    ] {
        p = madd::<A>(p, s2, c);
    }
    2.0 * madd::<A>(s * s2, p, s)
}

/// Lane-wise [`exp`].
#[inline(always)]
pub fn exp_lanes<A: Arch, const L: usize>(x: &Lanes<L>) -> Lanes<L> {
    let mut out = [0.0; L];
    for i in 0..L {
        out[i] = exp::<A>(x[i]);
    }
    out
}

/// Compiles a generic `#[inline(always)]` kernel body for every SIMD level and
/// picks one at run time.
///
/// `simd_dispatch!(pub(crate) fn name<G: Bound, ..>(args..) -> Ret => body_fn);`
/// defines `name(level, args..)`, which calls `body_fn::<Arch, L, G..>(args..)`
/// with `L` the level's lane count ([`SimdLevel::lanes`]): the one place
/// where a level's chunk width is chosen.
///
/// Private to the crate: the `unsafe` calls below are sound only because a
/// [`SimdLevel`] comes from detection, which code outside cannot bypass.
macro_rules! simd_dispatch {
    ($vis:vis fn $name:ident<$($gen:ident: $bound:path),*>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? => $body:ident) => {
        #[allow(clippy::too_many_arguments)]
        $vis fn $name<$($gen: $bound),*>(level: $crate::simd::SimdLevel, $($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx512<$($gen: $bound),*>($($arg: $ty),*) $(-> $ret)? {
                $body::<$crate::simd::Fused, { $crate::simd::AVX512_LANES }, $($gen),*>($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma,f16c")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx2<$($gen: $bound),*>($($arg: $ty),*) $(-> $ret)? {
                $body::<$crate::simd::Fused, { $crate::simd::AVX2_LANES }, $($gen),*>($($arg),*)
            }
            match level.isa() {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: a `SimdLevel` holding `Isa::Avx512` is only made by
                // `SimdLevel::available` after run-time detection of
                // avx512f/bw/vl, avx2, fma and f16c (its field is private).
                $crate::simd::Isa::Avx512 => unsafe { avx512::<$($gen),*>($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: likewise, `Isa::Avx2Fma` only after detection of
                // avx2, fma and f16c.
                $crate::simd::Isa::Avx2Fma => unsafe { avx2::<$($gen),*>($($arg),*) },
                _ => $body::<$crate::simd::Baseline, { $crate::simd::PORTABLE_LANES }, $($gen),*>($($arg),*),
            }
        }
    };
}
pub(crate) use simd_dispatch;

// Element loops: the lane count that `simd_dispatch!` passes is unused.
#[inline(always)]
fn exp_slice_body<A: Arch, const _L: usize>(xs: &[f32], out: &mut [f32]) {
    for (o, x) in out.iter_mut().zip(xs) {
        *o = exp::<A>(*x);
    }
}

simd_dispatch!(fn exp_slice_at<>(xs: &[f32], out: &mut [f32]) => exp_slice_body);

#[inline(always)]
fn exp_nonpos_slice_body<A: Arch, const _L: usize>(xs: &[f32], out: &mut [f32]) {
    for (o, x) in out.iter_mut().zip(xs) {
        *o = exp_nonpos::<A>(*x);
    }
}

simd_dispatch!(fn exp_nonpos_slice_at<>(xs: &[f32], out: &mut [f32]) => exp_nonpos_slice_body);

#[inline(always)]
fn log1p_unit_slice_body<A: Arch, const _L: usize>(xs: &[f32], out: &mut [f32]) {
    for (o, x) in out.iter_mut().zip(xs) {
        *o = log1p_unit::<A>(*x);
    }
}

simd_dispatch!(fn log1p_unit_slice_at<>(xs: &[f32], out: &mut [f32]) => log1p_unit_slice_body);

/// Element-wise [`log1p_unit`] at a given SIMD level (for ULP tests).
///
/// Returns `None` when this CPU cannot run `level`.
pub fn log1p_unit_slice(level: SimdLevel, xs: &[f32], out: &mut [f32]) -> Option<()> {
    if !SimdLevel::available().contains(&level) || xs.len() != out.len() {
        return None;
    }
    log1p_unit_slice_at(level, xs, out);
    Some(())
}

/// Element-wise [`exp_nonpos`] at a given SIMD level (for ULP tests).
///
/// Returns `None` when this CPU cannot run `level`.
pub fn exp_nonpos_slice(level: SimdLevel, xs: &[f32], out: &mut [f32]) -> Option<()> {
    if !SimdLevel::available().contains(&level) || xs.len() != out.len() {
        return None;
    }
    exp_nonpos_slice_at(level, xs, out);
    Some(())
}

/// Element-wise e^x at a given SIMD level (exposed for ULP tests and benches).
///
/// Returns `None` when this CPU cannot run `level`.
pub fn exp_slice(level: SimdLevel, xs: &[f32], out: &mut [f32]) -> Option<()> {
    if !SimdLevel::available().contains(&level) || xs.len() != out.len() {
        return None;
    }
    exp_slice_at(level, xs, out);
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kdcore_simd_names_a_lower_level() {
        let levels = SimdLevel::available();
        assert_eq!(level_named(&levels, ""), levels[0]);
        assert_eq!(level_named(&levels, "no-such-level"), levels[0]);
        for &level in &levels {
            assert_eq!(level_named(&levels, level.name()), level);
            assert_eq!(level_named(&levels, &format!(" {} ", level.name())), level);
        }
        // A level this CPU lacks: the best one instead.
        let without_best = &levels[1..];
        if let Some(&next) = without_best.first() {
            assert_eq!(level_named(without_best, levels[0].name()), next);
        }
    }
}
