//! A small seeded generator (SplitMix64 seeding a xoshiro256**), so a seed means the same
//! weights, noise and batch order on every machine and on both backends.

/// The generator: 256 bits of xoshiro256** state, plus the second value of the last
/// Box–Muller pair waiting to be returned by [`Rng::normal`]. Every random number in the
/// engine (initial weights, reparameterization noise, batch order, t-SNE's start) comes from
/// one of these.
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
    spare_normal: Option<f64>,
}

impl Rng {
    /// The generator for `seed`: the four state words are the next four outputs of SplitMix64
    /// started at `seed`, so nearby seeds still give unrelated streams.
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Rng { s: [next(), next(), next(), next()], spare_normal: None }
    }
    /// The next 64 random bits (one xoshiro256** step).
    pub fn next_u64(&mut self) -> u64 {
        let r = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        r
    }
    /// The full generator state as integers (4 words, plus the bits of a cached normal), so a
    /// checkpoint can restore it exactly.
    pub fn state(&self) -> Vec<u64> {
        let mut v = self.s.to_vec();
        v.extend(self.spare_normal.map(f64::to_bits));
        v
    }
    /// The inverse of [`Rng::state`]; `None` for a malformed state.
    pub fn from_state(v: &[u64]) -> Option<Self> {
        match v.len() {
            4 | 5 => Some(Rng { s: v[..4].try_into().ok()?, spare_normal: v.get(4).map(|&b| f64::from_bits(b)) }),
            _ => None,
        }
    }
    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
    /// Uniform in [lo, hi): how layers draw their initial weights.
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.next_f64()
    }
    /// Standard normal (Box–Muller, both values used).
    pub fn normal(&mut self) -> f64 {
        if let Some(v) = self.spare_normal.take() {
            return v;
        }
        let u1 = 1.0 - self.next_f64(); // (0, 1]
        let u2 = self.next_f64();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = 2.0 * std::f64::consts::PI * u2;
        self.spare_normal = Some(r * t.sin());
        r * t.cos()
    }
    /// Uniform integer in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_f64() * n as f64) as usize % n.max(1)
    }
    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_has_unit_moments() {
        let mut r = Rng::new(1);
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|_| r.normal()).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "var {var}");
    }

    #[test]
    fn state_round_trips() {
        let mut r = Rng::new(9);
        r.normal();
        let mut copy = Rng::from_state(&r.state()).unwrap();
        assert_eq!(copy.normal(), r.normal());
        assert_eq!(copy.next_u64(), r.next_u64());
    }

    #[test]
    fn seeds_differ_and_repeat() {
        assert_eq!(Rng::new(3).next_u64(), Rng::new(3).next_u64());
        assert_ne!(Rng::new(3).next_u64(), Rng::new(4).next_u64());
    }
}
