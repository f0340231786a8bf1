//! `batch_norm`: `torch.nn.functional.batch_norm` over a [outer, channels, inner] view: 2-D
//! (x [n, c, h, w]: statistics over n, h, w per channel) and 1-D (x [n, c]: over n).
//! Training mode normalizes with the batch mean and the **biased** variance and updates
//! running_mean/var ← (1 − momentum)·running + momentum·batch, where the variance fed to the
//! running estimate is the **unbiased** one (× m/(m − 1)). Eval mode uses the running
//! statistics. y = (x − mean)/√(var + eps)·γ + β. PyTorch's defaults: eps 1e-5, momentum 0.1.
//! [`batch_norm_act`] fuses the activation that follows (y = act(…)) into the same passes,
//! forward and backward: no pre-activation tensor, one pass fewer each way.
//!
//! Eval mode is for inference: it records no backward (nothing in the trainer differentiates
//! through eval-mode normalization).

use rayon::prelude::*;

use crate::backend::Backend;
use crate::ops::unary::Unary;
use crate::tape::{ParamId, Tape, Var};
use crate::tensor::{Float, Tensor};

pub use crate::backend::shapes::BatchNormDims;

impl BatchNormDims {
    /// Elements per channel.
    pub fn m(&self) -> usize {
        self.outer * self.inner
    }
    fn at(&self, o: usize, c: usize, i: usize) -> usize {
        (o * self.channels + c) * self.inner + i
    }
}

// ---- CPU reference (statistics accumulated in f64) ----
//
// Per-channel sums run one task per channel, each over its elements in (sample, position)
// order, so the result does not depend on the thread count; the elementwise passes run one
// task per block of samples. Both are parallel and read contiguous rows of `inner` values.
//
// Every hot loop is an `#[inline(always)]` function called from a one-line closure given to
// `ops::simd`, so the loop itself is compiled in the AVX2 frame: a loop inside a larger
// closure was left out of line there and ran scalar, SSE2 code (perf: batch norm was a
// quarter of a conv-bn training step). The activation is matched once per row, outside the
// loop (`with_act`), not once per element.

/// Lanes of a channel sum: element j of each row goes to lane j mod 8 and the lanes are
/// added at the end. One running sum would be a chain of dependent additions (4 cycles
/// each) and made batch norm latency-bound.
const LANES: usize = 8;

/// Binds `$f` to `act`'s forward (`y = f(x)`) or, after `df`, to its backward from the
/// output (`g = f(y, dy)`), then runs `$body`: one copy of the loop per activation, so the
/// loop does not branch on the activation per element.
macro_rules! with_act {
    ($act:expr, $f:ident => $body:expr) => {
        match $act {
            None => {
                let $f = |v| v;
                $body
            }
            Some(Unary::Relu) => {
                let $f = |v| Unary::Relu.f(v);
                $body
            }
            Some(Unary::LeakyRelu(s)) => {
                let $f = move |v| Unary::LeakyRelu(s).f(v);
                $body
            }
            Some(op) => {
                let $f = move |v| op.f(v);
                $body
            }
        }
    };
    (df $act:expr, $f:ident => $body:expr) => {
        match $act {
            None => {
                let $f = |_, dy| dy;
                $body
            }
            Some(Unary::Relu) => {
                let $f = |y, dy| Unary::Relu.df(y, y, dy);
                $body
            }
            Some(Unary::LeakyRelu(s)) => {
                let $f = move |y, dy| Unary::LeakyRelu(s).df(y, y, dy);
                $body
            }
            Some(op) => {
                let $f = move |y, dy| op.df(y, y, dy);
                $body
            }
        }
    };
}

/// Two sums over channel c's elements k in one pass, Σ f(x[k]).0 and .1, in f64 and in a
/// fixed order (rows in sample order, each into [`LANES`] lanes, the lanes added last).
#[inline(always)]
fn channel_sums<E: Float>(d: &BatchNormDims, c: usize, x: &[E], f: impl Fn(E) -> (f64, f64) + Copy) -> (f64, f64) {
    let (mut first, mut second) = ([0.0f64; LANES], [0.0f64; LANES]);
    for o in 0..d.outer {
        let row = &x[d.at(o, c, 0)..][..d.inner];
        sums_of_row(row, row, row, &mut first, &mut second, |v, _, _| f(v));
    }
    (first.iter().sum(), second.iter().sum())
}

/// Σ x and then Σ (x − mean)² over channel c (two passes, as the textbook, for accuracy).
fn mean_and_squares<E: Float>(d: &BatchNormDims, c: usize, x: &[E]) -> (f64, f64) {
    let m = d.m() as f64;
    let mean = crate::ops::simd(
        #[inline(always)]
        || channel_sums(d, c, x, |v| (v.f64(), 0.0)),
    )
    .0 / m;
    let squares = crate::ops::simd(
        #[inline(always)]
        || {
            channel_sums(d, c, x, |v| {
                let dev = v.f64() - mean;
                (dev * dev, 0.0)
            })
        },
    );
    (mean, squares.0)
}

/// For every (sample, channel) row of `out`, in parallel over blocks of samples:
/// f(c, k0, row) with k0 the row's offset in the [outer, channels, inner] layout.
fn per_row<E: Float>(out: &mut [E], d: &BatchNormDims, f: impl Fn(usize, usize, &mut [E]) + Sync) {
    let block = (d.channels * d.inner).max(1);
    let min = (crate::ops::PAR_MIN / block).max(1);
    out.par_chunks_mut(block).with_min_len(min).enumerate().for_each(|(o, sample)| {
        for (c, row) in sample.chunks_mut(d.inner.max(1)).enumerate() {
            f(c, d.at(o, c, 0), row);
        }
    });
}

/// y = act((x − mean)·invstd·γ + β) over one row of one channel, the affine part in f64 and
/// rounded to E before the activation (as the unfused ops round their intermediate tensor).
#[inline(always)]
fn normalize_row<E: Float>(x: &[E], y: &mut [E], mean: f64, invstd: f64, gamma: f64, beta: f64, act: Option<Unary>) {
    with_act!(act, f => crate::ops::simd(#[inline(always)] || {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = f(E::of((x.f64() - mean) * invstd * gamma + beta));
        }
    }))
}

/// Training mode: per channel, the batch mean and biased variance (two passes, in f64), then
/// y overwritten with the normalized, scaled and shifted x; `save_mean`/`save_invstd` get the
/// mean and `1/√(var + eps)` for the backward; the running mean and (unbiased) variance move
/// toward the batch's by `momentum`.
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
    let stats: Vec<(f64, f64)> = (0..d.channels).into_par_iter().map(|c| mean_and_squares(&d, c, x)).collect();
    let invstd: Vec<f64> = stats.iter().map(|&(_, sq)| 1.0 / (sq / m + d.eps).sqrt()).collect();
    per_row(y, &d, |c, k0, row| {
        normalize_row(&x[k0..][..row.len()], row, stats[c].0, invstd[c], gamma[c].f64(), beta[c].f64(), d.act)
    });
    for (c, &(mean, sq)) in stats.iter().enumerate() {
        save_mean[c] = E::of(mean);
        save_invstd[c] = E::of(invstd[c]);
        let unbiased = if m > 1.0 { sq / (m - 1.0) } else { sq / m };
        running_mean[c] = E::of((1.0 - d.momentum) * running_mean[c].f64() + d.momentum * mean);
        running_var[c] = E::of((1.0 - d.momentum) * running_var[c].f64() + d.momentum * unbiased);
    }
}

/// Eval mode: y = (x − rm)/√(rv + eps)·γ + β with the running mean `rm` and variance `rv`,
/// overwriting y.
pub fn cpu_forward_eval<E: Float>(x: &[E], gamma: &[E], beta: &[E], rm: &[E], rv: &[E], y: &mut [E], d: BatchNormDims) {
    let invstd: Vec<f64> = rv.iter().map(|v| 1.0 / (v.f64() + d.eps).sqrt()).collect();
    per_row(y, &d, |c, k0, row| {
        normalize_row(&x[k0..][..row.len()], row, rm[c].f64(), invstd[c], gamma[c].f64(), beta[c].f64(), d.act)
    });
}

/// dβ = Σ dy, dγ = Σ dy·x̂, dx = γ·invstd/m · (m·dy − dβ − x̂·dγ), with x̂ = (x − mean)·invstd.
/// With an activation fused (`d.act`, whose output `y` is given), dy is first taken through
/// it: g = act'·dy from y, rounded to E as the unfused activation's backward stores it, and
/// g stands for dy above. g is formed where it is read, in both passes, not stored.
#[allow(clippy::too_many_arguments)]
pub fn cpu_backward<E: Float>(
    dy: &[E],
    y: Option<&[E]>,
    x: &[E],
    gamma: &[E],
    mean: &[E],
    invstd: &[E],
    dx: Option<&mut [E]>,
    dgamma: Option<&mut [E]>,
    dbeta: Option<&mut [E]>,
    d: BatchNormDims,
) {
    let y = match (d.act, y) {
        (Some(op), Some(y)) => {
            assert!(op.reads_output() && y.len() == dy.len(), "batch_norm backward: cannot fuse {op:?}");
            y
        }
        // Without an activation `y` is not read: dy stands in for it.
        (None, None) => dy,
        _ => panic!("batch_norm backward: the activation's output y is given exactly when one is fused"),
    };
    let m = d.m() as f64;
    let sums: Vec<(f64, f64)> = (0..d.channels)
        .into_par_iter()
        .map(|c| {
            let (mu, is) = (mean[c].f64(), invstd[c].f64());
            let (mut sdy, mut sdyx) = ([0.0f64; LANES], [0.0f64; LANES]);
            for o in 0..d.outer {
                let row = d.at(o, c, 0);
                let (dyr, yr, xr) = (&dy[row..][..d.inner], &y[row..][..d.inner], &x[row..][..d.inner]);
                with_act!(df d.act, g => crate::ops::simd(#[inline(always)] || {
                    sums_of_row(dyr, yr, xr, &mut sdy, &mut sdyx, |dy: E, y: E, x: E| {
                        let g = g(y, dy).f64();
                        (g, g * (x.f64() - mu) * is)
                    })
                }));
            }
            (sdy.iter().sum(), sdyx.iter().sum())
        })
        .collect();
    if let Some(db) = dbeta {
        db.iter_mut().zip(&sums).for_each(|(v, s)| *v += E::of(s.0));
    }
    if let Some(dg) = dgamma {
        dg.iter_mut().zip(&sums).for_each(|(v, s)| *v += E::of(s.1));
    }
    if let Some(dx) = dx {
        per_row(dx, &d, |c, k0, row| {
            let (mu, is) = (mean[c].f64(), invstd[c].f64());
            let (sdy, sdyx) = sums[c];
            let scale = gamma[c].f64() * is / m;
            let n = row.len();
            let (xr, dyr, yr) = (&x[k0..][..n], &dy[k0..][..n], &y[k0..][..n]);
            with_act!(df d.act, g => crate::ops::simd(#[inline(always)] || {
                for (((d, &x), &dy), &y) in row.iter_mut().zip(xr).zip(dyr).zip(yr) {
                    let xhat = (x.f64() - mu) * is;
                    *d += E::of(scale * (m * g(y, dy).f64() - sdy - xhat * sdyx));
                }
            }));
        });
    }
}

/// Adds f(a[k], b[k], c[k]) over three rows into two sets of lanes (see [`LANES`]).
#[inline(always)]
fn sums_of_row<E: Float>(
    a: &[E],
    b: &[E],
    c: &[E],
    first: &mut [f64; LANES],
    second: &mut [f64; LANES],
    f: impl Fn(E, E, E) -> (f64, f64),
) {
    let (cd, cy, cx) = (a.chunks_exact(LANES), b.chunks_exact(LANES), c.chunks_exact(LANES));
    let (td, ty, tx) = (cd.remainder(), cy.remainder(), cx.remainder());
    for ((a, b), c) in cd.zip(cy).zip(cx) {
        for l in 0..LANES {
            let (u, v) = f(a[l], b[l], c[l]);
            first[l] += u;
            second[l] += v;
        }
    }
    for (l, ((&a, &b), &c)) in td.iter().zip(ty).zip(tx).enumerate() {
        let (u, v) = f(a, b, c);
        first[l] += u;
        second[l] += v;
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
    batch_norm_act(tape, x, gamma, beta, running_mean, running_var, momentum, eps, None)
}

/// [`batch_norm`] followed by the activation `act` in the same op: act(batch_norm(x)), the
/// same values and gradients as the two ops recorded one after the other (the affine result
/// is rounded to the element type before the activation, as the separate ops round it), with
/// no pre-activation tensor and one pass over the data fewer each way. The backward reads
/// the activation's derivative from its output, so `act` must satisfy [`Unary::reads_output`]
/// (a leaky ReLU of negative slope does not: record the two ops).
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_act<B: Backend>(
    tape: &mut Tape<B>,
    x: Var,
    gamma: Var,
    beta: Var,
    running_mean: ParamId,
    running_var: ParamId,
    momentum: f64,
    eps: f64,
    act: Option<Unary>,
) -> Var {
    let xs = tape.shape(x).to_vec();
    assert!(xs.len() == 2 || xs.len() == 4, "batch_norm: x must be [n, c] or [n, c, h, w], got {xs:?}");
    if let Some(op) = act {
        assert!(op.reads_output(), "batch_norm_act: {op:?}'s derivative does not follow from its output");
    }
    let d = BatchNormDims { outer: xs[0], channels: xs[1], inner: xs[2..].iter().product(), eps, momentum, act };
    let mut y = Tensor::empty(&tape.backend, &xs);
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
    let ([xv, gv, bv], [rm, rv]) = tape.values_and_params_mut([x, gamma, beta], [running_mean, running_var]);
    be.batch_norm_forward_train(
        &xv.buf,
        &gv.buf,
        &bv.buf,
        &mut y.buf,
        &mut mean,
        &mut invstd,
        &mut rm.buf,
        &mut rv.buf,
        d,
    );
    // The backward of a fused activation reads the op's own output.
    let yv = tape.next_var();
    tape.record1(&[x, gamma, beta], y, move |ctx, dy| {
        let be = ctx.backend;
        let (xv, gv) = (ctx.value(x), ctx.value(gamma));
        let yt = act.map(|_| ctx.value(yv));
        let [dx, dg, db] = ctx.grads([x, gamma, beta]);
        be.batch_norm_backward(
            &dy.buf,
            yt.map(|t| &t.buf),
            &xv.buf,
            &gv.buf,
            &mean,
            &invstd,
            dx.map(|t| &mut t.buf),
            dg.map(|t| &mut t.buf),
            db.map(|t| &mut t.buf),
            d,
        );
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two training steps on one channel, statistics worked out by hand.
    #[test]
    fn running_statistics_after_two_steps() {
        let d = BatchNormDims { outer: 4, channels: 1, inner: 1, eps: 1e-5, momentum: 0.1, act: None };
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
