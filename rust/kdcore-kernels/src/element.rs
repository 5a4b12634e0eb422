//! Storage types of logits: `f32`, `bf16` and `f16`, converted to `f32` on
//! load and back with round-to-nearest-even on store.
//!
//! The conversions are written with plain integer and float operations (no
//! per-element feature detection) so that loops over them vectorise.

use half::{bf16, f16};

/// A floating-point storage type the kernels read and write.
pub trait Element: Copy + Send + Sync + 'static {
    /// Short name, as used in error messages and benchmarks.
    const NAME: &'static str;
    fn to_f32(self) -> f32;
    /// Rounds to nearest, ties to even; NaN stays NaN, overflow gives ±inf.
    fn from_f32(x: f32) -> Self;
}

impl Element for f32 {
    const NAME: &'static str = "f32";
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Element for bf16 {
    const NAME: &'static str = "bf16";
    #[inline(always)]
    fn to_f32(self) -> f32 {
        // bf16 is the upper half of an f32: widening is exact.
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_bits(bf16_bits_from_f32(x))
    }
}

impl Element for f16 {
    const NAME: &'static str = "f16";
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16_bits_to_f32(self.to_bits())
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        // Stores are one per gradient element and not on the exp-bound path;
        // `half` rounds to nearest even.
        f16::from_f32(x)
    }
}

/// f32 -> bf16 bits, round to nearest even; NaN is kept quiet with its sign.
#[inline(always)]
pub fn bf16_bits_from_f32(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = (bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16) as u16;
    let quiet_nan = ((bits >> 16) as u16) | 0x0040;
    if x.is_nan() {
        quiet_nan
    } else {
        rounded
    }
}

/// f16 bits -> f32, exact for every input (subnormals, infinities, NaN).
#[inline(always)]
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let sign = ((h & 0x8000) as u32) << 16;
    let exponent = ((h >> 10) & 0x1F) as u32;
    let mantissa = (h & 0x03FF) as u32;
    // Subnormal halves are mantissa * 2^-24, exactly representable in f32.
    let subnormal = mantissa as f32 * f32::from_bits(0x3380_0000);
    let infinite_or_nan = f32::from_bits(0x7F80_0000 | (mantissa << 13));
    let normal = f32::from_bits(((exponent + 112) << 23) | (mantissa << 13));
    let magnitude = if exponent == 0 {
        subnormal
    } else if exponent == 31 {
        infinite_or_nan
    } else {
        normal
    };
    f32::from_bits(magnitude.to_bits() | sign)
}
