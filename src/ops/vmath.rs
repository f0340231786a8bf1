//! `exp`, `ln` and `ln_1p` in f64, written so that a loop calling them vectorizes: no calls
//! into libm (which LLVM cannot vectorize: BCE-with-logits ran one scalar `exp` and `log1p`
//! per pixel, at 2.5% of its memory roofline in `vae bench`, and BCE's two `log`s per pixel
//! were a tenth of a default MLP training step), no branches, only arithmetic, comparisons
//! that become selects, and integer bit moves.
//!
//! All three agree with the correctly rounded result to within a few units in the last place
//! (measured against libm in the tests below), not to the bit: the CPU reference's loss
//! values are f64 sums of such terms, so the difference is far below what rounding the loss
//! to f32 keeps.

/// ln 2 split in a high part with trailing zero bits (so k·LN2_HI is exact for |k| < 2¹¹)
/// and the rest (fdlibm's constants).
const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
/// 1.5·2⁵²: adding it to an integer-valued f64 of magnitude below 2⁵¹ leaves the integer in
/// the low bits of the sum's mantissa.
const INTEGER_MAGIC: f64 = 6_755_399_441_055_744.0;

/// eˣ for x in [−708, 709] (within a few ulp); 0 below −708 (where eˣ < 3.4·10⁻³⁰⁸, under
/// f64's smallest normal number) and +∞ above 709; NaN stays NaN.
#[inline(always)]
pub fn exp(x: f64) -> f64 {
    let xc = x.clamp(-708.0, 709.0);
    // x = k·ln 2 + r with |r| ≤ ln 2 / 2 (Cody–Waite: k·LN2_HI is exact).
    // Rounded to the nearest integer by adding and subtracting 1.5·2⁵² (`round_ties_even`
    // compiles to a scalar instruction per element and kept the loop from vectorizing).
    let shifted = xc * std::f64::consts::LOG2_E + INTEGER_MAGIC;
    let k = shifted - INTEGER_MAGIC;
    let r = (xc - k * LN2_HI) - k * LN2_LO;
    // eʳ by its Taylor series to r¹³ (the next term is below 2·10⁻¹⁷ for |r| ≤ 0.347).
    let mut p = 1.0 / 6_227_020_800.0;
    for n in (1..=12).rev() {
        p = p * r + INVERSE_FACTORIALS[n];
    }
    let p = p * r + 1.0;
    // 2ᵏ built from its exponent bits: k + 1023 lies in [2, 2046], k ∈ [−1021, 1023].
    let two_k = f64::from_bits((shifted + 1023.0).to_bits() << 52);
    let e = p * two_k;
    if x < -708.0 {
        0.0
    } else if x > 709.0 {
        f64::INFINITY
    } else {
        e
    }
}

/// 1/n! for n = 0..=12.
const INVERSE_FACTORIALS: [f64; 13] = [
    1.0,
    1.0,
    1.0 / 2.0,
    1.0 / 6.0,
    1.0 / 24.0,
    1.0 / 120.0,
    1.0 / 720.0,
    1.0 / 5_040.0,
    1.0 / 40_320.0,
    1.0 / 362_880.0,
    1.0 / 3_628_800.0,
    1.0 / 39_916_800.0,
    1.0 / 479_001_600.0,
];

/// k·ln 2 + ln m for m in [√½, √2] (so the sum is ln(2ᵏ·m)): ln m = 2·atanh(s) with
/// s = (m − 1)/(m + 1), |s| ≤ 0.1716, by the odd series to s²¹ (the next term is below 10⁻¹⁷
/// of the result); k·LN2_HI is exact and added last.
#[inline(always)]
fn ln_scaled(m: f64, k: f64) -> f64 {
    let s = (m - 1.0) / (m + 1.0);
    let z = s * s;
    let mut q = 1.0 / 21.0;
    for n in (0..10).rev() {
        q = q * z + 1.0 / (2 * n + 1) as f64;
    }
    k * LN2_HI + (2.0 * s * q + k * LN2_LO)
}

/// Natural logarithm, within a few ulp for positive normal x; +∞ for +∞; −∞ for ±0 and
/// also for subnormal x (where the true value lies in [−745, −708]: every caller here clamps
/// logarithms at −100 first); NaN for x < 0 and for NaN.
#[inline(always)]
pub fn ln(x: f64) -> f64 {
    const MANTISSA: u64 = (1 << 52) - 1;
    let bits = x.to_bits();
    // x = 2ᵉ·m with m in [1, 2); the biased exponent becomes a float through the same
    // magic-number addition `exp` uses (an i64-to-f64 conversion would not vectorize on
    // AVX2). The sign bit is masked off: negative x is answered below.
    let biased = f64::from_bits(((bits >> 52) & 0x7ff) | INTEGER_MAGIC.to_bits()) - INTEGER_MAGIC;
    let m = f64::from_bits((bits & MANTISSA) | 1.0f64.to_bits());
    // Move m into [√½, √2] so the series converges fast.
    let high = m > std::f64::consts::SQRT_2;
    let (m, k) = if high { (m * 0.5, biased - 1022.0) } else { (m, biased - 1023.0) };
    let ln_x = ln_scaled(m, k);
    if x.is_nan() || x < 0.0 {
        f64::NAN
    } else if x < f64::MIN_POSITIVE {
        f64::NEG_INFINITY
    } else if x == f64::INFINITY {
        f64::INFINITY
    } else {
        ln_x
    }
}

/// ln(1 + e) for e in [0, 1] (within a few ulp), the range BCE-with-logits needs
/// (e = e^{−|x|}).
#[inline(always)]
pub fn ln_1p_unit(e: f64) -> f64 {
    let u = 1.0 + e;
    // u = 2ᵏ·m with m in [√½, √2]: k is 0 or 1 here.
    let high = u > std::f64::consts::SQRT_2;
    let (m, k) = if high { (u * 0.5, 1.0) } else { (u, 0.0) };
    let ln_u = ln_scaled(m, k);
    // u − 1 is exact; ln(u)·e/(u − 1) corrects for the rounding of 1 + e (Goldberg's
    // log1p), and for e so small that 1 + e rounds to 1, ln(1 + e) = e.
    let w = u - 1.0;
    if w == 0.0 {
        e
    } else {
        ln_u * (e / w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Advances a xorshift64 generator: a deterministic spread of test points.
    fn xorshift(state: &mut u64) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
    }

    /// Relative error in units of f64's epsilon.
    fn ulps(got: f64, want: f64) -> f64 {
        if got == want {
            0.0
        } else {
            ((got - want) / want).abs() / f64::EPSILON
        }
    }

    /// Against libm across the whole range, on a deterministic spread of points plus the
    /// edges: within 4 ulp (measured: 1).
    #[test]
    fn exp_matches_libm_within_a_few_ulp() {
        let mut worst: f64 = 0.0;
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for i in 0..200_000 {
            xorshift(&mut state);
            let unit = (state >> 11) as f64 / (1u64 << 53) as f64;
            // Half the points in [−40, 40], where BCE lives; half over the whole range.
            let x = if i % 2 == 0 { 80.0 * unit - 40.0 } else { 1417.0 * unit - 708.0 };
            worst = worst.max(ulps(exp(x), x.exp()));
        }
        for x in [-708.0, -1.0, -0.5, 0.0, 1e-300, 0.5, 1.0, 709.0] {
            worst = worst.max(ulps(exp(x), f64::exp(x)));
        }
        assert!(worst <= 4.0, "exp: worst error {worst} ulp");
        assert_eq!(exp(-710.0), 0.0);
        assert_eq!(exp(710.0), f64::INFINITY);
        assert!(exp(f64::NAN).is_nan());
        assert_eq!(exp(0.0), 1.0);
    }

    /// ln against libm: every binade of the normal range (a deterministic spread of points in
    /// each), the points near 1 where cancellation would show, and the special values:
    /// within 4 ulp (measured: 2.0).
    #[test]
    fn ln_matches_libm_within_a_few_ulp() {
        let mut worst: f64 = 0.0;
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..200_000 {
            xorshift(&mut state);
            // Any positive normal number: a random exponent field in [1, 2046].
            let x = f64::from_bits((state >> 12) | ((1 + (state % 2046)) << 52));
            worst = worst.max(ulps(ln(x), x.ln()));
            // Within 2⁻²⁰ of 1, on both sides.
            let near_one = 1.0 + ((state >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 2e-6;
            worst = worst.max(ulps(ln(near_one), near_one.ln()));
        }
        for x in [f64::MIN_POSITIVE, 0.5, std::f64::consts::SQRT_2, 1.5, 2.0, std::f64::consts::E, f64::MAX] {
            worst = worst.max(ulps(ln(x), x.ln()));
        }
        assert!(worst <= 4.0, "ln: worst error {worst} ulp");
        assert_eq!(ln(1.0), 0.0);
        assert_eq!(ln(0.0), f64::NEG_INFINITY);
        assert_eq!(ln(-0.0), f64::NEG_INFINITY);
        assert_eq!(ln(1e-310), f64::NEG_INFINITY);
        assert_eq!(ln(f64::INFINITY), f64::INFINITY);
        assert!(ln(-1.0).is_nan() && ln(f64::NEG_INFINITY).is_nan() && ln(f64::NAN).is_nan());
    }

    /// The same for ln(1 + e) on [0, 1], down to arguments where 1 + e rounds to 1: within
    /// 4 ulp (measured: 2.7).
    #[test]
    fn ln_1p_unit_matches_libm_within_a_few_ulp() {
        let mut worst: f64 = 0.0;
        for i in 0..=200_000 {
            let e = i as f64 / 200_000.0;
            worst = worst.max(ulps(ln_1p_unit(e), e.ln_1p()));
            let tiny = (-(i as f64) / 4_000.0).exp();
            worst = worst.max(ulps(ln_1p_unit(tiny), tiny.ln_1p()));
        }
        assert!(worst <= 4.0, "ln_1p: worst error {worst} ulp");
        assert_eq!(ln_1p_unit(0.0), 0.0);
        assert_eq!(ln_1p_unit(1e-300), 1e-300);
    }
}
