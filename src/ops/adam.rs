//! One step of `torch.optim.Adam` (L2 weight decay added to the gradient) or `torch.optim.AdamW`
//! (decoupled decay: p ← p·(1 − lr·wd) first). With t the step number (from 1):
//!   m ← β₁m + (1 − β₁)g,  v ← β₂v + (1 − β₂)g²,
//!   p ← p − lr/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + eps)
//! which is PyTorch's formula, operation for operation.

use rayon::prelude::*;

use crate::ops::PAR_MIN;
use crate::tensor::Float;

/// Everything one update needs, bias corrections already worked out on the host.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// AdamW's decoupled decay instead of Adam's L2 term.
    pub decoupled: bool,
    /// 1 − β₁ᵗ
    pub bias_correction1: f64,
    /// √(1 − β₂ᵗ)
    pub bias_correction2_sqrt: f64,
}

impl AdamStep {
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
    #[inline]
    pub fn apply<E: Float>(&self, p: E, g: E, m: E, v: E) -> (E, E, E) {
        let (b1, b2) = (E::of(self.beta1), E::of(self.beta2));
        let mut p = p;
        let mut g = g;
        if self.weight_decay != 0.0 {
            if self.decoupled {
                p *= E::one() - E::of(self.lr * self.weight_decay);
            } else {
                g += p * E::of(self.weight_decay);
            }
        }
        let m = b1 * m + (E::one() - b1) * g;
        let v = b2 * v + (E::one() - b2) * g * g;
        let denom = v.sqrt() / E::of(self.bias_correction2_sqrt) + E::of(self.eps);
        let p = p - E::of(self.lr / self.bias_correction1) * (m / denom);
        (p, m, v)
    }
}

pub fn cpu_step<E: Float>(p: &mut [E], g: &[E], m: &mut [E], v: &mut [E], s: AdamStep) {
    p.par_iter_mut().with_min_len(PAR_MIN).zip(m.par_iter_mut().zip(v.par_iter_mut())).zip(g).for_each(
        |((p, (m, v)), &g)| {
            let (np, nm, nv) = s.apply(*p, g, *m, *v);
            (*p, *m, *v) = (np, nm, nv);
        },
    );
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
}
