//! Reconstruction losses, with `torch.nn.functional`'s definitions:
//! - `bce(p, t)` = −Σ [t·max(log p, −100) + (1 − t)·max(log(1 − p), −100)] on probabilities
//!   p; its gradient is PyTorch's: (p − t) / max(p·(1 − p), 1e-12).
//! - `bce_with_logits(x, t)` = Σ [max(x, 0) − x·t + log(1 + e^{−|x|})] (the stable form);
//!   gradient σ(x) − t.
//! - `mse(x, t)` = Σ (x − t)²; gradient 2(x − t).
//!
//! Each is a sum over all elements; `Reduction::Mean` divides by the element count,
//! as `reduction='mean'` does.

use crate::backend::Backend;
use crate::ops::elementwise::{scale, REDUCE_CHUNK};
use crate::ops::{simd, vmath, PAR_MIN};
use crate::tape::{Tape, Var};
use crate::tensor::{numel, Float, Tensor};
use rayon::prelude::*;

pub use crate::backend::shapes::Recon;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
/// How a loss turns its per-element terms into one scalar (PyTorch's `reduction=`).
pub enum Reduction {
    /// Σ over every element: the VAE's per-batch objective, in nats.
    Sum,
    /// Σ divided by the number of elements (an extra [`scale`] on the tape).
    Mean,
}

/// PyTorch clamps each log term of BCE at −100 so p = 0 or 1 gives a finite loss.
pub const BCE_LOG_CLAMP: f64 = -100.0;
/// PyTorch's floor on p·(1 − p) in the BCE gradient.
pub const BCE_GRAD_EPS: f64 = 1e-12;

/// The loss of one element (the truth in f64; kernels repeat it). The exponentials and
/// logarithms come from [`vmath`] (within a few ulp of libm's), so that the loops over pixels
/// vectorize. (BCE on probabilities uses them only in its loss value, not in its gradient,
/// so training with it takes the same steps, to the bit, as with libm's.)
#[inline(always)]
pub fn elementwise_loss(kind: Recon, x: f64, t: f64) -> f64 {
    match kind {
        Recon::Bce => -(t * vmath::ln(x).max(BCE_LOG_CLAMP) + (1.0 - t) * vmath::ln(1.0 - x).max(BCE_LOG_CLAMP)),
        Recon::BceWithLogits => x.max(0.0) - x * t + vmath::ln_1p_unit(vmath::exp(-x.abs())),
        Recon::Mse => (x - t) * (x - t),
    }
}

/// ∂loss/∂x of one element.
#[inline(always)]
pub fn elementwise_grad(kind: Recon, x: f64, t: f64) -> f64 {
    match kind {
        Recon::Bce => (x - t) / (x * (1.0 - x)).max(BCE_GRAD_EPS),
        Recon::BceWithLogits => 1.0 / (1.0 + vmath::exp(-x)) - t,
        Recon::Mse => 2.0 * (x - t),
    }
}

// ---- CPU reference ----

/// `f(&mut out[i], x[i], t[i], kind)` for every element, in one loop per loss with `kind` a
/// constant in it (the match is outside the loops), compiled for AVX2. `f` must be
/// `#[inline(always)]` as well: it holds every loss's formula until `kind` is folded in, and
/// once BCE's own logarithms were added to it LLVM stopped inlining it and each element
/// became a call (BCE-with-logits forward 15 → 65 ms in `vae bench`).
#[inline(always)]
fn each_element<E: Float, O>(kind: Recon, x: &[E], t: &[E], out: &mut [O], f: impl Fn(&mut O, f64, f64, Recon)) {
    macro_rules! each {
        ($k:expr) => {
            simd(
                #[inline(always)]
                || {
                    for ((o, &x), &t) in out.iter_mut().zip(x).zip(t) {
                        f(o, x.f64(), t.f64(), $k);
                    }
                },
            )
        };
    }
    match kind {
        Recon::Bce => each!(Recon::Bce),
        Recon::BceWithLogits => each!(Recon::BceWithLogits),
        Recon::Mse => each!(Recon::Mse),
    }
}

/// `Σᵢ elementwise_loss(x[i], t[i])`, every term in f64, summed deterministically: in
/// chunks of [`REDUCE_CHUNK`] elements added in order, then the chunk sums in order (as
/// `elementwise::cpu_reduce` sums). A chunk's terms are computed into a buffer first, so
/// that loop vectorizes while the additions keep their order.
pub fn cpu_forward<E: Float>(kind: Recon, x: &[E], t: &[E]) -> E {
    assert_eq!(x.len(), t.len(), "{kind:?}: lengths differ");
    let chunks: Vec<f64> = x
        .par_chunks(REDUCE_CHUNK)
        .zip(t.par_chunks(REDUCE_CHUNK))
        .map(|(x, t)| {
            let mut terms = [0.0f64; REDUCE_CHUNK];
            let terms = &mut terms[..x.len()];
            each_element(
                kind,
                x,
                t,
                terms,
                #[inline(always)]
                |o, x, t, kind| *o = elementwise_loss(kind, x, t),
            );
            terms.iter().sum::<f64>()
        })
        .collect();
    E::of(chunks.into_iter().sum())
}

/// `dx[i] += dout·elementwise_grad(x[i], t[i])`, with dout the gradient of the summed loss.
pub fn cpu_backward<E: Float>(kind: Recon, x: &[E], t: &[E], dout: E, dx: &mut [E]) {
    assert!(x.len() == dx.len() && t.len() == dx.len(), "{kind:?}: lengths differ");
    let g = dout.f64();
    dx.par_chunks_mut(PAR_MIN).zip(x.par_chunks(PAR_MIN)).zip(t.par_chunks(PAR_MIN)).for_each(|((dx, x), t)| {
        each_element(
            kind,
            x,
            t,
            dx,
            #[inline(always)]
            |d, x, t, kind| *d += E::of(g * elementwise_grad(kind, x, t)),
        );
    });
}

// ---- on the tape ----

/// The chosen reconstruction loss of x against a target (no gradient flows to the target).
pub fn recon_loss<B: Backend>(tape: &mut Tape<B>, kind: Recon, x: Var, target: Var, reduction: Reduction) -> Var {
    assert_eq!(tape.shape(x), tape.shape(target), "{kind:?}: input and target shapes differ");
    let mut out = Tensor::zeros(&tape.backend, &[1]);
    tape.backend.recon_loss_forward(kind, &tape.value(x).buf, &tape.value(target).buf, &mut out.buf);
    let total = tape.record1(&[x], out, move |ctx, dout| {
        let be = ctx.backend;
        let tt = ctx.value(target);
        let xt = ctx.value(x);
        if let Some(dx) = ctx.grad(x) {
            be.recon_loss_backward(kind, &xt.buf, &tt.buf, &dout.buf, &mut dx.buf);
        }
    });
    match reduction {
        Reduction::Sum => total,
        Reduction::Mean => {
            let n = numel(tape.shape(x));
            scale(tape, total, 1.0 / n as f64)
        }
    }
}

/// Binary cross-entropy of probabilities `p` (in [0, 1]) against targets in [0, 1]:
/// `F.binary_cross_entropy`. See [`Recon::Bce`].
pub fn bce<B: Backend>(tape: &mut Tape<B>, p: Var, target: Var, reduction: Reduction) -> Var {
    recon_loss(tape, Recon::Bce, p, target, reduction)
}
/// Binary cross-entropy of logits `x` (`sigmoid(x)` is the probability), in the stable form:
/// `F.binary_cross_entropy_with_logits`. See [`Recon::BceWithLogits`].
pub fn bce_with_logits<B: Backend>(tape: &mut Tape<B>, x: Var, target: Var, reduction: Reduction) -> Var {
    recon_loss(tape, Recon::BceWithLogits, x, target, reduction)
}
/// Squared error of x against the target: `F.mse_loss`. See [`Recon::Mse`].
pub fn mse<B: Backend>(tape: &mut Tape<B>, x: Var, target: Var, reduction: Reduction) -> Var {
    recon_loss(tape, Recon::Mse, x, target, reduction)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bce_clamps_log_at_minus_100() {
        // p = 0 with target 1: −log 0 = ∞ in exact math, 100 in PyTorch.
        assert_eq!(elementwise_loss(Recon::Bce, 0.0, 1.0), 100.0);
        assert_eq!(elementwise_loss(Recon::Bce, 1.0, 0.0), 100.0);
        // p = 1, t = 1: exactly 0 (the clamped (1 − t)·log(0) term is multiplied by 0).
        assert_eq!(elementwise_loss(Recon::Bce, 1.0, 1.0), 0.0);
        // p = 0.25, t = 1: −ln 0.25 = 2 ln 2.
        assert!((elementwise_loss(Recon::Bce, 0.25, 1.0) - 2.0 * 2f64.ln()).abs() < 1e-15);
    }

    #[test]
    fn bce_with_logits_agrees_with_bce_of_sigmoid_and_is_stable() {
        for &(x, t) in &[(0.3f64, 0.2f64), (-2.0, 0.9), (4.0, 0.0)] {
            let p: f64 = 1.0 / (1.0 + (-x).exp());
            assert!((elementwise_loss(Recon::BceWithLogits, x, t) - elementwise_loss(Recon::Bce, p, t)).abs() < 1e-12);
        }
        // Large logits: the naive form overflows, the stable one gives the exact linear tail.
        assert_eq!(elementwise_loss(Recon::BceWithLogits, 1000.0, 0.0), 1000.0);
        assert_eq!(elementwise_loss(Recon::BceWithLogits, -1000.0, 1.0), 1000.0);
    }

    #[test]
    fn mse_by_hand() {
        assert_eq!(cpu_forward(Recon::Mse, &[1.0f64, 2.0], &[0.0, 4.0]), 5.0);
    }
}
