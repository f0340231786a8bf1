//! The precision of the matrix products (`--precision`; [`super::Backend::precision`]): what a GEMM or convolution's
//! operands are rounded to before they are multiplied, as a GPU's tensor cores round them,
//! with products accumulated in f32 either way.
//!
//! - **TF32** keeps 10 of f32's 23 mantissa bits (8 exponent bits, so the range is f32's).
//!   NVIDIA's conversion, `cvt.rna.tf32.f32` (PTX ISA, "cvt"), rounds to nearest with ties
//!   *away from zero*; that is what [`round_tf32`] does. (Hardware that is fed plain f32
//!   truncates instead; kernels here convert explicitly, so rna is the one to model.)
//! - **BF16** keeps 7 mantissa bits; `__float2bfloat16` (`cvt.rn.bf16.f32`) rounds to nearest,
//!   ties to even: [`round_bf16`].
//!
//! On the CPU the operands are rounded and then multiplied exactly as in f32, so a CPU run at
//! `--precision tf32` trains what a tensor-core run would, up to the order of the sums: the
//! way to measure a precision's quality on a machine with no GPU.

use serde::{Deserialize, Serialize};

/// The precision of matrix-product operands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    /// f32 operands: exact products, the reference
    #[default]
    F32,
    /// TF32 operands (10 mantissa bits, rounded to nearest, ties away): tensor cores at f32's range
    Tf32,
    /// BF16 operands (7 mantissa bits, rounded to nearest even); weights and Adam stay f32
    Bf16,
}

impl Precision {
    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
        }
    }
    /// `x` as an operand of this precision sees it.
    #[inline]
    pub fn round(self, x: f32) -> f32 {
        match self {
            Precision::F32 => x,
            Precision::Tf32 => round_tf32(x),
            Precision::Bf16 => round_bf16(x),
        }
    }
}

/// f32 → TF32 (kept in an f32 with the 13 low mantissa bits zero), nearest, ties away from
/// zero, as `cvt.rna.tf32.f32`. NaN and infinities pass through; a value that rounds past the
/// largest finite TF32 becomes infinite, as on the GPU.
#[inline]
pub fn round_tf32(x: f32) -> f32 {
    if !x.is_finite() {
        return x;
    }
    // Adding half of the dropped part's range to the magnitude bits, then truncating, rounds
    // ties away from zero (the sign bit is untouched; a carry into the exponent is correct).
    let bits = x.to_bits();
    f32::from_bits((bits + (1 << 12)) & !((1 << 13) - 1))
}

/// f32 → BF16 (kept in an f32 with the 16 low bits zero), nearest, ties to even, as
/// `__float2bfloat16`. NaN stays NaN (quiet); infinities pass through.
#[inline]
pub fn round_bf16(x: f32) -> f32 {
    if x.is_nan() {
        return f32::NAN;
    }
    let bits = x.to_bits();
    let lsb = (bits >> 16) & 1;
    f32::from_bits((bits + 0x7FFF + lsb) & 0xFFFF_0000)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference rounding, from the definition: the representable neighbours of x with
    /// `keep` mantissa bits, and the tie rule.
    fn by_definition(x: f32, keep: u32, ties_away: bool) -> f32 {
        let drop = 23 - keep;
        let bits = x.to_bits();
        let low = bits & ((1 << drop) - 1);
        let down = bits & !((1u32 << drop) - 1);
        let up = down + (1 << drop);
        let half = 1u32 << (drop - 1);
        let pick_up = match low.cmp(&half) {
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Equal => ties_away || (down >> drop) & 1 == 1,
        };
        f32::from_bits(if pick_up { up } else { down })
    }

    #[test]
    fn roundings_match_their_definitions() {
        let mut rng = crate::rng::Rng::new(9);
        let mut cases: Vec<f32> = (0..20_000).map(|_| f32::from_bits(rng.next_u64() as u32)).collect();
        // Exact ties and their neighbours, both signs.
        for m in [1.0f32, 1.5, 3.25, -2.0, 1e-30, -7e20] {
            let b = m.to_bits();
            cases.extend([b | 0x1000, b | 0x0FFF, b | 0x1001, b | 0x3000, b | 0x8000, b | 0x18000].map(f32::from_bits));
        }
        for x in cases.into_iter().filter(|x| x.is_finite()) {
            assert_eq!(round_tf32(x).to_bits(), by_definition(x, 10, true).to_bits(), "tf32 of {x:e}");
            assert_eq!(round_bf16(x).to_bits(), by_definition(x, 7, false).to_bits(), "bf16 of {x:e}");
        }
        // A tie: 1 + 2^-11 lies halfway between 1 and 1 + 2^-10 in TF32 (away: up), and
        // 1 + 2^-8 between 1 and 1 + 2^-7 in BF16 (even: down, 1 is even).
        assert_eq!(round_tf32(1.0 + 2f32.powi(-11)), 1.0 + 2f32.powi(-10));
        assert_eq!(round_tf32(-(1.0 + 2f32.powi(-11))), -(1.0 + 2f32.powi(-10)));
        assert_eq!(round_bf16(1.0 + 2f32.powi(-8)), 1.0);
        assert_eq!(round_bf16(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2f32.powi(-6));
        assert!(round_tf32(f32::NAN).is_nan() && round_bf16(f32::NAN).is_nan());
        assert_eq!(round_bf16(f32::INFINITY), f32::INFINITY);
        assert_eq!(round_tf32(f32::MAX), f32::INFINITY, "rounds past the largest TF32");
    }
}
