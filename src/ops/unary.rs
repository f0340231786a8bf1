//! Activations, PyTorch's definitions:
//! - `relu`: y = x if x > 0 else 0; dx = dy where y > 0.
//! - `sigmoid`: y = 1/(1 + e^{−x}); dx = dy·y·(1 − y).
//! - `tanh`: dx = dy·(1 − y²).
//! - `leaky_relu(slope)`: y = x if x > 0 else slope·x; dx = dy if x > 0 else slope·dy.
//!
//! The math is written once here as `f`/`df`; `kernels/elementwise.cu` repeats it for CUDA.

use rayon::prelude::*;

use crate::backend::Backend;
use crate::ops::{simd, PAR_MIN};
use crate::tape::{Tape, Var};
use crate::tensor::{Float, Tensor};

pub use crate::backend::shapes::Unary;

impl Unary {
    /// The activation of one element, y = f(x).
    #[inline(always)]
    pub fn f<E: Float>(self, x: E) -> E {
        match self {
            Unary::Relu => {
                if x > E::zero() {
                    x
                } else {
                    E::zero()
                }
            }
            Unary::Sigmoid => E::one() / (E::one() + (-x).exp()),
            Unary::Tanh => x.tanh(),
            Unary::LeakyRelu(s) => {
                if x > E::zero() {
                    x
                } else {
                    x * E::of(s)
                }
            }
        }
    }
    /// dy·f'(x), from x and y = f(x).
    #[inline(always)]
    pub fn df<E: Float>(self, x: E, y: E, dy: E) -> E {
        match self {
            Unary::Relu => {
                if y > E::zero() {
                    dy
                } else {
                    E::zero()
                }
            }
            Unary::Sigmoid => dy * y * (E::one() - y),
            Unary::Tanh => dy * (E::one() - y * y),
            Unary::LeakyRelu(s) => {
                if x > E::zero() {
                    dy
                } else {
                    dy * E::of(s)
                }
            }
        }
    }
}

/// `y[i] = op.f(x[i])`, overwriting y; parallel over chunks and vectorized.
pub fn cpu_forward<E: Float>(op: Unary, x: &[E], y: &mut [E]) {
    assert_eq!(x.len(), y.len());
    y.par_chunks_mut(PAR_MIN).zip(x.par_chunks(PAR_MIN)).for_each(|(y, x)| {
        simd(
            #[inline(always)]
            || y.iter_mut().zip(x).for_each(|(y, &x)| *y = op.f(x)),
        )
    });
}

/// `dx[i] += op.df(x[i], y[i], dy[i])`, with y the forward's output.
pub fn cpu_backward<E: Float>(op: Unary, x: &[E], y: &[E], dy: &[E], dx: &mut [E]) {
    assert!(x.len() == dx.len() && y.len() == dx.len() && dy.len() == dx.len());
    let chunks =
        dx.par_chunks_mut(PAR_MIN).zip(x.par_chunks(PAR_MIN)).zip(y.par_chunks(PAR_MIN)).zip(dy.par_chunks(PAR_MIN));
    chunks.for_each(|(((dx, x), y), dy)| {
        simd(
            #[inline(always)]
            || {
                for (((dx, &x), &y), &dy) in dx.iter_mut().zip(x).zip(y).zip(dy) {
                    *dx += op.df(x, y, dy);
                }
            },
        )
    });
}

/// Applies `op` elementwise. The backward reads both x and the output y (whose [`Var`] it
/// learns in advance from [`Tape::next_var`]), since sigmoid's and tanh's derivatives are
/// cheapest written in y.
pub fn unary<B: Backend>(tape: &mut Tape<B>, op: Unary, x: Var) -> Var {
    let mut y = Tensor::empty(&tape.backend, tape.shape(x));
    tape.backend.unary_forward(op, &tape.value(x).buf, &mut y.buf);
    let yv = tape.next_var();
    tape.record1(&[x], y, move |ctx, dy| {
        let be = ctx.backend;
        let (xt, yt) = (ctx.value(x), ctx.value(yv));
        if let Some(dx) = ctx.grad(x) {
            be.unary_backward(op, &xt.buf, &yt.buf, &dy.buf, &mut dx.buf);
        }
    })
}

/// [`unary`] with [`Unary::Relu`]: the hidden activation of every VAE here.
pub fn relu<B: Backend>(tape: &mut Tape<B>, x: Var) -> Var {
    unary(tape, Unary::Relu, x)
}
/// [`unary`] with [`Unary::Sigmoid`]: logits to probabilities (its backward reads y, not x).
pub fn sigmoid<B: Backend>(tape: &mut Tape<B>, x: Var) -> Var {
    unary(tape, Unary::Sigmoid, x)
}
/// [`unary`] with [`Unary::Tanh`].
pub fn tanh<B: Backend>(tape: &mut Tape<B>, x: Var) -> Var {
    unary(tape, Unary::Tanh, x)
}
/// [`unary`] with [`Unary::LeakyRelu`] of the given negative `slope`.
pub fn leaky_relu<B: Backend>(tape: &mut Tape<B>, x: Var, slope: f64) -> Var {
    unary(tape, Unary::LeakyRelu(slope), x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_by_hand() {
        assert_eq!(Unary::Relu.f(-2.0f64), 0.0);
        assert_eq!(Unary::Relu.f(3.0f64), 3.0);
        assert_eq!(Unary::Sigmoid.f(0.0f64), 0.5);
        assert!((Unary::Sigmoid.f(2.0f64) - 0.8807970779778823).abs() < 1e-15);
        assert!((Unary::Tanh.f(0.5f64) - 0.46211715726000974).abs() < 1e-15);
        assert_eq!(Unary::LeakyRelu(0.2).f(-5.0f64), -1.0);
    }
}
