//! `batch_norm`: `torch.nn.functional.batch_norm` over a [outer, channels, inner] view: 2-D
//! (x [n, c, h, w]: statistics over n, h, w per channel) and 1-D (x [n, c]: over n).
//! Training mode normalizes with the batch mean and the **biased** variance and updates
//! running_mean/var ← (1 − momentum)·running + momentum·batch, where the variance fed to the
//! running estimate is the **unbiased** one (× m/(m − 1)). Eval mode uses the running
//! statistics. y = (x − mean)/√(var + eps)·γ + β. PyTorch's defaults: eps 1e-5, momentum 0.1.
//!
//! Eval mode is for inference: it records no backward (nothing in the trainer differentiates
//! through eval-mode normalization).

use crate::backend::Backend;
use crate::tape::{ParamId, Tape, Var};
use crate::tensor::{Float, Tensor};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNormDims {
    pub outer: usize,
    pub channels: usize,
    pub inner: usize,
    pub eps: f64,
    pub momentum: f64,
}

impl BatchNormDims {
    /// Elements per channel.
    pub fn m(&self) -> usize {
        self.outer * self.inner
    }
    fn at(&self, o: usize, c: usize, i: usize) -> usize {
        (o * self.channels + c) * self.inner + i
    }
}

// ---- CPU reference (statistics accumulated in f64, one channel at a time) ----

#[allow(clippy::too_many_arguments)]
pub fn cpu_forward_train<E: Float>(
    x: &[E],
    gamma: &[E],
    beta: &[E],
    y: &mut [E],
    save_mean: &mut [E],
    save_invstd: &mut [E],
    running_mean: &mut [E],
    running_var: &mut [E],
    d: BatchNormDims,
) {
    let m = d.m() as f64;
    for c in 0..d.channels {
        let mut sum = 0.0;
        for o in 0..d.outer {
            for i in 0..d.inner {
                sum += x[d.at(o, c, i)].f64();
            }
        }
        let mean = sum / m;
        let mut sq = 0.0;
        for o in 0..d.outer {
            for i in 0..d.inner {
                let t = x[d.at(o, c, i)].f64() - mean;
                sq += t * t;
            }
        }
        let var = sq / m;
        let invstd = 1.0 / (var + d.eps).sqrt();
        let (g, b) = (gamma[c].f64(), beta[c].f64());
        for o in 0..d.outer {
            for i in 0..d.inner {
                let k = d.at(o, c, i);
                y[k] = E::of((x[k].f64() - mean) * invstd * g + b);
            }
        }
        save_mean[c] = E::of(mean);
        save_invstd[c] = E::of(invstd);
        let unbiased = if m > 1.0 { sq / (m - 1.0) } else { var };
        running_mean[c] = E::of((1.0 - d.momentum) * running_mean[c].f64() + d.momentum * mean);
        running_var[c] = E::of((1.0 - d.momentum) * running_var[c].f64() + d.momentum * unbiased);
    }
}

pub fn cpu_forward_eval<E: Float>(x: &[E], gamma: &[E], beta: &[E], rm: &[E], rv: &[E], y: &mut [E], d: BatchNormDims) {
    for c in 0..d.channels {
        let invstd = 1.0 / (rv[c].f64() + d.eps).sqrt();
        let (g, b, mean) = (gamma[c].f64(), beta[c].f64(), rm[c].f64());
        for o in 0..d.outer {
            for i in 0..d.inner {
                let k = d.at(o, c, i);
                y[k] = E::of((x[k].f64() - mean) * invstd * g + b);
            }
        }
    }
}

/// dβ = Σ dy, dγ = Σ dy·x̂, dx = γ·invstd/m · (m·dy − dβ − x̂·dγ), with x̂ = (x − mean)·invstd.
#[allow(clippy::too_many_arguments)]
pub fn cpu_backward<E: Float>(
    dy: &[E],
    x: &[E],
    gamma: &[E],
    mean: &[E],
    invstd: &[E],
    mut dx: Option<&mut [E]>,
    mut dgamma: Option<&mut [E]>,
    mut dbeta: Option<&mut [E]>,
    d: BatchNormDims,
) {
    let m = d.m() as f64;
    for c in 0..d.channels {
        let (mu, is) = (mean[c].f64(), invstd[c].f64());
        let (mut sdy, mut sdyx) = (0.0, 0.0);
        for o in 0..d.outer {
            for i in 0..d.inner {
                let k = d.at(o, c, i);
                sdy += dy[k].f64();
                sdyx += dy[k].f64() * (x[k].f64() - mu) * is;
            }
        }
        if let Some(db) = dbeta.as_deref_mut() {
            db[c] += E::of(sdy);
        }
        if let Some(dg) = dgamma.as_deref_mut() {
            dg[c] += E::of(sdyx);
        }
        if let Some(dx) = dx.as_deref_mut() {
            let scale = gamma[c].f64() * is / m;
            for o in 0..d.outer {
                for i in 0..d.inner {
                    let k = d.at(o, c, i);
                    let xhat = (x[k].f64() - mu) * is;
                    dx[k] += E::of(scale * (m * dy[k].f64() - sdy - xhat * sdyx));
                }
            }
        }
    }
}

// ---- on the tape ----

/// Batch norm of x ([n, c] or [n, c, h, w]) with affine γ, β (trainable) and running
/// statistics kept in the parameter store (non-trainable entries, updated in training mode).
#[allow(clippy::too_many_arguments)]
pub fn batch_norm<B: Backend>(
    tape: &mut Tape<B>,
    x: Var,
    gamma: Var,
    beta: Var,
    running_mean: ParamId,
    running_var: ParamId,
    momentum: f64,
    eps: f64,
) -> Var {
    let xs = tape.shape(x).to_vec();
    assert!(xs.len() == 2 || xs.len() == 4, "batch_norm: x must be [n, c] or [n, c, h, w], got {xs:?}");
    let d = BatchNormDims { outer: xs[0], channels: xs[1], inner: xs[2..].iter().product(), eps, momentum };
    let mut y = Tensor::zeros(&tape.backend, &xs);
    let be = tape.backend.clone();
    if !tape.training {
        let p = &tape.params.values;
        be.batch_norm_forward_eval(
            &tape.value(x).buf,
            &tape.value(gamma).buf,
            &tape.value(beta).buf,
            &p[running_mean].buf,
            &p[running_var].buf,
            &mut y.buf,
            d,
        );
        return tape.record1(&[], y, |_, _| {});
    }
    assert!(d.m() > 1, "batch_norm: training mode needs more than one value per channel (got shape {xs:?})");
    let mut mean = be.zeros(d.channels);
    let mut invstd = be.zeros(d.channels);
    // Running statistics are taken out of the store for the call, so the store's other
    // tensors (γ, β) can be read at the same time, and put back.
    let mut rm = std::mem::replace(&mut tape.params.values[running_mean].buf, be.zeros(0));
    let mut rv = std::mem::replace(&mut tape.params.values[running_var].buf, be.zeros(0));
    be.batch_norm_forward_train(
        &tape.value(x).buf,
        &tape.value(gamma).buf,
        &tape.value(beta).buf,
        &mut y.buf,
        &mut mean,
        &mut invstd,
        &mut rm,
        &mut rv,
        d,
    );
    tape.params.values[running_mean].buf = rm;
    tape.params.values[running_var].buf = rv;
    tape.record1(&[x, gamma, beta], y, move |ctx, dy| {
        let be = ctx.backend;
        let (xv, gv) = (ctx.value(x), ctx.value(gamma));
        // Each gradient slot is borrowed in turn; their buffers are distinct tensors.
        let mut dx = ctx.grad(x).map(|t| std::mem::replace(&mut t.buf, be.zeros(0)));
        let mut dg = ctx.grad(gamma).map(|t| std::mem::replace(&mut t.buf, be.zeros(0)));
        let mut db = ctx.grad(beta).map(|t| std::mem::replace(&mut t.buf, be.zeros(0)));
        be.batch_norm_backward(&dy.buf, &xv.buf, &gv.buf, &mean, &invstd, dx.as_mut(), dg.as_mut(), db.as_mut(), d);
        for (v, buf) in [(x, dx), (gamma, dg), (beta, db)] {
            if let Some(buf) = buf {
                ctx.grad(v).unwrap().buf = buf;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two training steps on one channel, statistics worked out by hand.
    #[test]
    fn running_statistics_after_two_steps() {
        let d = BatchNormDims { outer: 4, channels: 1, inner: 1, eps: 1e-5, momentum: 0.1 };
        let (mut rm, mut rv) = ([0.0f64], [1.0f64]);
        let (mut mean, mut invstd, mut y) = ([0.0], [0.0], [0.0; 4]);
        // Step 1: x = 1, 2, 3, 4: mean 2.5, biased var 1.25, unbiased 5/3.
        cpu_forward_train(&[1.0, 2.0, 3.0, 4.0], &[1.0], &[0.0], &mut y, &mut mean, &mut invstd, &mut rm, &mut rv, d);
        assert!((rm[0] - 0.25).abs() < 1e-15);
        assert!((rv[0] - (0.9 + 0.1 * 5.0 / 3.0)).abs() < 1e-15);
        assert!((y[0] - (1.0 - 2.5) / (1.25f64 + 1e-5).sqrt()).abs() < 1e-12);
        // Step 2: x = 0, 0, 4, 4: mean 2, biased var 4, unbiased 16/3.
        cpu_forward_train(&[0.0, 0.0, 4.0, 4.0], &[1.0], &[0.0], &mut y, &mut mean, &mut invstd, &mut rm, &mut rv, d);
        assert!((rm[0] - (0.9 * 0.25 + 0.1 * 2.0)).abs() < 1e-15);
        let rv1 = 0.9 + 0.1 * 5.0 / 3.0;
        assert!((rv[0] - (0.9 * rv1 + 0.1 * 16.0 / 3.0)).abs() < 1e-15);
        assert!((invstd[0] - 1.0 / (4.0f64 + 1e-5).sqrt()).abs() < 1e-15);
    }
}
