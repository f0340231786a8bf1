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

/// Philox4x32-10 (Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as easy as 1, 2,
/// 3", SC 2011): 128 random bits as a pure function of a 128-bit counter and a 64-bit key, so
/// any element of a stream is computed without the ones before it, on any thread. Integer
/// arithmetic only: the CUDA kernel (`kernels/rng.cu`) computes the same bits.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    const M0: u64 = 0xD251_1F53;
    const M1: u64 = 0xCD9E_8D57;
    const W0: u32 = 0x9E37_79B9;
    const W1: u32 = 0xBB67_AE85;
    let (mut c, mut k) = (counter, key);
    for round in 0..10 {
        if round > 0 {
            k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        }
        let p0 = M0 * c[0] as u64;
        let p1 = M1 * c[2] as u64;
        c = [(p1 >> 32) as u32 ^ c[1] ^ k[0], p1 as u32, (p0 >> 32) as u32 ^ c[3] ^ k[1], p0 as u32];
    }
    c
}

/// Two standard normals from 128 random bits (Box–Muller in f64): two 53-bit uniforms
/// `u1` in (0, 1] and `u2` in [0, 1), then `√(−2 ln u1)·(cos 2πu2, sin 2πu2)`. The kernel does
/// the same operations in the same order in double (sin and cos through `sincospi(2·u2)`,
/// whose argument `π·2u2` is this `2π·u2` exactly: doubling is exact); a GPU's `log`,
/// `sincospi` may differ from the host's `ln`, `sin`, `cos` in the last bit of the double,
/// which changes an f32 result only when the double lies within that bit of a rounding
/// boundary (about once in 2²⁹ values). The emulated device computes what the CPU does.
pub fn box_muller(bits: [u32; 4]) -> [f64; 2] {
    let unit = |hi: u32, lo: u32| (((hi as u64) << 32 | lo as u64) >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
    let u1 = 1.0 - unit(bits[0], bits[1]);
    let u2 = unit(bits[2], bits[3]);
    let r = (-2.0 * u1.ln()).sqrt();
    let t = 2.0 * std::f64::consts::PI * u2;
    [r * t.cos(), r * t.sin()]
}

/// The reparameterization noise: a counter-based stream, so the device draws it in place
/// (no host generator, no upload) and the CPU computes the same numbers. Draw `d` (one per
/// batch) of `len` values has value `e` equal to output `e mod 2` of
/// [`box_muller`]`(`[`philox4x32_10`]`([e/2 low, e/2 high, d low, d high], key))`. Its whole
/// state is the key and the number of draws made, which checkpoints keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoiseStream {
    /// Philox's key, from the seed.
    pub key: [u32; 2],
    /// Draws made so far: the next draw's counter.
    pub draws: u64,
}

impl NoiseStream {
    /// The stream of `seed` (the key is SplitMix64 of the seed, so nearby seeds give unrelated
    /// streams), before its first draw.
    pub fn new(seed: u64) -> Self {
        let k = Rng::new(seed).next_u64();
        NoiseStream { key: [k as u32, (k >> 32) as u32], draws: 0 }
    }
    /// The counter of the next draw, and the stream moved past it.
    pub fn next_draw(&mut self) -> u64 {
        self.draws += 1;
        self.draws - 1
    }
    /// Value `e` of draw `draw`, in f64 (the backends round it to their element type).
    pub fn value(key: [u32; 2], draw: u64, e: u64) -> f64 {
        let pair = e / 2;
        let c = [pair as u32, (pair >> 32) as u32, draw as u32, (draw >> 32) as u32];
        box_muller(philox4x32_10(c, key))[(e % 2) as usize]
    }
    /// The state as integers for a checkpoint: `[key, draws]`.
    pub fn state(&self) -> Vec<u64> {
        vec![self.key[0] as u64 | (self.key[1] as u64) << 32, self.draws]
    }
    /// The inverse of [`NoiseStream::state`]; `None` for a malformed state (such as the
    /// xoshiro state that checkpoints held before the noise was counter-based).
    pub fn from_state(v: &[u64]) -> Option<Self> {
        match *v {
            [k, draws] => Some(NoiseStream { key: [k as u32, (k >> 32) as u32], draws }),
            _ => None,
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

    /// The known-answer vectors of Random123 (`kat_vectors`, philox4x32_10): zero, all ones
    /// and the digits of π.
    #[test]
    fn philox_matches_the_known_answers() {
        assert_eq!(philox4x32_10([0; 4], [0; 2]), [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]);
        assert_eq!(philox4x32_10([u32::MAX; 4], [u32::MAX; 2]), [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]);
        assert_eq!(
            philox4x32_10([0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344], [0xa409_3822, 0x299f_31d0]),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
    }

    #[test]
    fn counter_noise_has_unit_moments_and_round_trips() {
        let s = NoiseStream::new(7);
        let n = 200_000u64;
        let xs: Vec<f64> = (0..n).map(|e| NoiseStream::value(s.key, 3, e)).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01 && (var - 1.0).abs() < 0.01, "mean {mean}, var {var}");
        // Draws and seeds give different numbers; the state round-trips.
        assert_ne!(NoiseStream::value(s.key, 3, 0), NoiseStream::value(s.key, 4, 0));
        assert_ne!(s.key, NoiseStream::new(8).key);
        let mut t = s;
        t.next_draw();
        assert_eq!(NoiseStream::from_state(&t.state()), Some(t));
        assert_eq!(NoiseStream::from_state(&Rng::new(1).state()), None);
    }
}
