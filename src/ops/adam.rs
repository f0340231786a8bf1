//! One step of `torch.optim.Adam` (L2 weight decay added to the gradient) or `torch.optim.AdamW`
//! (decoupled decay: p ← p·(1 − lr·wd) first). With t the step number (from 1):
//!   m ← β₁m + (1 − β₁)g,  v ← β₂v + (1 − β₂)g²,
//!   p ← p − lr/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + eps)
//! which is PyTorch's formula, operation for operation.

use rayon::prelude::*;

use crate::ops::{simd, PAR_MIN};
use crate::tensor::Float;

pub use crate::backend::shapes::AdamStep;

impl AdamStep {
    /// The step for update number `step` (counting from 1, as PyTorch's `state['step']`
    /// after its increment): works out the bias corrections `1 − β₁ᵗ` and `√(1 − β₂ᵗ)`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(lr: f64, beta1: f64, beta2: f64, eps: f64, weight_decay: f64, decoupled: bool, step: u64) -> Self {
        AdamStep {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
            decoupled,
            bias_correction1: 1.0 - beta1.powi(step as i32),
            bias_correction2_sqrt: (1.0 - beta2.powi(step as i32)).sqrt(),
        }
    }
    /// The update of one element: returns (p, m, v).
    #[inline(always)]
    pub fn apply<E: Float>(&self, p: E, g: E, m: E, v: E) -> (E, E, E) {
        let c = AdamCoefficients::of(self);
        match (self.weight_decay != 0.0, self.decoupled) {
            (false, _) => c.update::<false, false>(p, g, m, v),
            (true, false) => c.update::<true, false>(p, g, m, v),
            (true, true) => c.update::<false, true>(p, g, m, v),
        }
    }
}

/// The step's constants in the element type, worked out once per step so the per-element
/// loop holds no conversions, divisions of constants or branches (it then vectorizes).
#[derive(Clone, Copy, Debug)]
struct AdamCoefficients<E> {
    beta1: E,
    beta2: E,
    one_minus_beta1: E,
    one_minus_beta2: E,
    bias_correction2_sqrt: E,
    eps: E,
    /// lr / (1 − β₁ᵗ)
    step_size: E,
    weight_decay: E,
    /// 1 − lr·wd (AdamW)
    decay: E,
}

impl<E: Float> AdamCoefficients<E> {
    fn of(s: &AdamStep) -> Self {
        let (beta1, beta2) = (E::of(s.beta1), E::of(s.beta2));
        AdamCoefficients {
            beta1,
            beta2,
            one_minus_beta1: E::one() - beta1,
            one_minus_beta2: E::one() - beta2,
            bias_correction2_sqrt: E::of(s.bias_correction2_sqrt),
            eps: E::of(s.eps),
            step_size: E::of(s.lr / s.bias_correction1),
            weight_decay: E::of(s.weight_decay),
            decay: E::one() - E::of(s.lr * s.weight_decay),
        }
    }
    /// PyTorch's update, operation for operation; `L2` adds wd·p to the gradient (Adam),
    /// `DECOUPLED` scales p by 1 − lr·wd first (AdamW).
    #[inline(always)]
    fn update<const L2: bool, const DECOUPLED: bool>(&self, p: E, g: E, m: E, v: E) -> (E, E, E) {
        let p = if DECOUPLED { p * self.decay } else { p };
        let g = if L2 { g + p * self.weight_decay } else { g };
        let m = self.beta1 * m + self.one_minus_beta1 * g;
        let v = self.beta2 * v + self.one_minus_beta2 * g * g;
        let denom = v.sqrt() / self.bias_correction2_sqrt + self.eps;
        (p - self.step_size * (m / denom), m, v)
    }
}

/// One update of a whole parameter tensor in place: p, m and v updated elementwise from g
/// with [`AdamStep::apply`]'s formula, in parallel chunks, bit for bit the same as it.
pub fn cpu_step<E: Float>(p: &mut [E], g: &[E], m: &mut [E], v: &mut [E], s: AdamStep) {
    match (s.weight_decay != 0.0, s.decoupled) {
        (false, _) => cpu_step_with::<E, false, false>(p, g, m, v, AdamCoefficients::of(&s)),
        (true, false) => cpu_step_with::<E, true, false>(p, g, m, v, AdamCoefficients::of(&s)),
        (true, true) => cpu_step_with::<E, false, true>(p, g, m, v, AdamCoefficients::of(&s)),
    }
}

fn cpu_step_with<E: Float, const L2: bool, const DECOUPLED: bool>(
    p: &mut [E],
    g: &[E],
    m: &mut [E],
    v: &mut [E],
    c: AdamCoefficients<E>,
) {
    assert!(g.len() == p.len() && m.len() == p.len() && v.len() == p.len(), "adam: lengths differ");
    let chunks = p.par_chunks_mut(PAR_MIN).zip(m.par_chunks_mut(PAR_MIN)).zip(v.par_chunks_mut(PAR_MIN));
    chunks.zip(g.par_chunks(PAR_MIN)).for_each(move |(((p, m), v), g)| {
        simd(
            #[inline(always)]
            move || {
                for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
                    (*p, *m, *v) = c.update::<L2, DECOUPLED>(*p, g, *m, *v);
                }
            },
        )
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first Adam step moves every weight by lr·sign(g) (m̂ = g, v̂ = g²), up to eps.
    #[test]
    fn first_step_moves_by_lr() {
        let s = AdamStep::new(0.1, 0.9, 0.999, 1e-8, 0.0, false, 1);
        let (p, m, v) = s.apply(1.0f64, -3.0, 0.0, 0.0);
        assert!((p - 1.1).abs() < 1e-8);
        assert!((m + 0.3).abs() < 1e-15 && (v - 0.009).abs() < 1e-15);
    }

    /// AdamW with g = 0 only decays: p·(1 − lr·wd).
    #[test]
    fn adamw_decoupled_decay() {
        let s = AdamStep::new(0.1, 0.9, 0.999, 1e-8, 0.5, true, 1);
        let (p, _, _) = s.apply(2.0f64, 0.0, 0.0, 0.0);
        assert!((p - 2.0 * 0.95).abs() < 1e-15);
        // Adam's L2 form with g = 0: the decay enters the gradient, so it moves by lr.
        let s = AdamStep::new(0.1, 0.9, 0.999, 1e-8, 0.5, false, 1);
        let (p, _, _) = s.apply(2.0f64, 0.0, 0.0, 0.0);
        assert!((p - 1.9).abs() < 1e-7);
    }

    /// The chunked, vectorized update is the per-element formula, bit for bit, in all three
    /// modes, over a length that leaves a ragged last chunk.
    #[test]
    fn cpu_step_matches_the_formula_elementwise() {
        let mut rng = crate::rng::Rng::new(7);
        let n = 2 * PAR_MIN + 13;
        let mut draw = || (0..n).map(|_| rng.normal() as f32).collect::<Vec<f32>>();
        let (p0, g, m0) = (draw(), draw(), draw());
        let v0: Vec<f32> = draw().iter().map(|x| x * x).collect();
        for (wd, decoupled) in [(0.0, false), (0.01, false), (0.01, true)] {
            let s = AdamStep::new(1e-3, 0.9, 0.999, 1e-8, wd, decoupled, 3);
            let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
            cpu_step(&mut p, &g, &mut m, &mut v, s);
            for i in 0..n {
                let want = s.apply(p0[i], g[i], m0[i], v0[i]);
                assert_eq!((p[i], m[i], v[i]), want, "element {i}, wd {wd}, decoupled {decoupled}");
            }
            assert_ne!(p, p0);
        }
    }
}
