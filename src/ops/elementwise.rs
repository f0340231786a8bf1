//! Small ops the models and losses are built from: `add`, `mul`, `scale`, `sum`, `mean`,
//! `reshape`/`flatten`. PyTorch semantics (same-shape tensors; no broadcasting is needed).

use rayon::prelude::*;

use crate::backend::Backend;
use crate::ops::{simd, PAR_MIN};
use crate::tape::{Tape, Var};
use crate::tensor::{numel, Float, Tensor};

// ---- CPU reference ----

/// out[i] = f(out[i], a[i], b[i]) over chunks in parallel, vectorized (see `ops::simd`).
fn zip3<E: Float>(out: &mut [E], a: &[E], b: &[E], f: impl Fn(E, E, E) -> E + Sync) {
    assert!(a.len() == out.len() && b.len() == out.len(), "elementwise: lengths differ");
    out.par_chunks_mut(PAR_MIN).zip(a.par_chunks(PAR_MIN)).zip(b.par_chunks(PAR_MIN)).for_each(|((o, a), b)| {
        simd(
            #[inline(always)]
            || o.iter_mut().zip(a).zip(b).for_each(|((o, &a), &b)| *o = f(*o, a, b)),
        )
    });
}

/// `y[i] = a[i]·b[i]`, overwriting y.
pub fn cpu_mul<E: Float>(a: &[E], b: &[E], y: &mut [E]) {
    zip3(y, a, b, |_, a, b| a * b);
}
/// `out[i] += a[i]·b[i]`: the backward of `mul` (dy ⊙ the other factor).
pub fn cpu_mul_accumulate<E: Float>(a: &[E], b: &[E], out: &mut [E]) {
    zip3(out, a, b, |o, a, b| o + a * b);
}
/// `y[i] += alpha·x[i]` (BLAS's axpy): the backward of `add`, `scale` and `reshape`.
pub fn cpu_axpy<E: Float>(alpha: E, x: &[E], y: &mut [E]) {
    zip3(y, x, x, |y, x, _| y + alpha * x);
}

/// Chunk size of every CPU reduction: partial sums of fixed chunks (in f64), then the chunk
/// sums in order, so the result never depends on the thread count.
pub const REDUCE_CHUNK: usize = 4096;

/// Σᵢ f(i) over 0..n, deterministic and parallel.
pub fn cpu_reduce(n: usize, f: impl Fn(usize) -> f64 + Sync) -> f64 {
    let chunks: Vec<f64> = (0..n.div_ceil(REDUCE_CHUNK))
        .into_par_iter()
        .map(|c| (c * REDUCE_CHUNK..((c + 1) * REDUCE_CHUNK).min(n)).map(&f).sum())
        .collect();
    chunks.into_iter().sum()
}

/// Σ x, accumulated in f64 in [`REDUCE_CHUNK`] chunks (the same bits on any thread count),
/// rounded once to `E`.
pub fn cpu_sum<E: Float>(x: &[E]) -> E {
    E::of(cpu_reduce(x.len(), |i| x[i].f64()))
}

/// The largest value of a `u8` pixel, which maps to 1.0.
pub const PIXEL_MAX: u8 = 255;

/// `dst[r, e] = src[idx[r]·row_len + e] / 255` (rows of `u8` pixels gathered as floats in
/// [0, 1]); the reference of `gather_rows_u8` in kernels/elementwise.cu. The division is
/// correctly rounded, so f32 pixels equal `b as f32 / 255.0` bit for bit.
pub fn cpu_gather_rows_u8<E: Float>(src: &[u8], row_len: usize, idx: &[u32], dst: &mut [E]) {
    assert!(dst.len() >= idx.len() * row_len, "gather_rows_u8: destination too small");
    let max = E::of(PIXEL_MAX as f64);
    dst[..idx.len() * row_len].par_chunks_mut(row_len.max(1)).zip(idx.par_iter()).for_each(|(d, &i)| {
        let s = &src[i as usize * row_len..][..row_len];
        d.iter_mut().zip(s).for_each(|(d, &b)| *d = E::of(b as f64) / max);
    });
}

// ---- on the tape ----

/// a ⊙ b (same shapes). Backward: `da += dy ⊙ b`, `db += dy ⊙ a`, so both inputs stay on the
/// tape until backward.
pub fn mul<B: Backend>(tape: &mut Tape<B>, a: Var, b: Var) -> Var {
    assert_eq!(tape.shape(a), tape.shape(b), "mul: shapes differ");
    let mut y = Tensor::empty(&tape.backend, tape.shape(a));
    tape.backend.mul(&tape.value(a).buf, &tape.value(b).buf, &mut y.buf);
    tape.record1(&[a, b], y, move |ctx, dy| {
        let be = ctx.backend;
        let (at, bt) = (ctx.value(a), ctx.value(b));
        if let Some(da) = ctx.grad(a) {
            be.mul_accumulate(&dy.buf, &bt.buf, &mut da.buf);
        }
        if let Some(db) = ctx.grad(b) {
            be.mul_accumulate(&dy.buf, &at.buf, &mut db.buf);
        }
    })
}

/// a + b (same shapes): a's buffer copied, then b added in. Backward passes dy unchanged to
/// both (`axpy` with α = 1).
pub fn add<B: Backend>(tape: &mut Tape<B>, a: Var, b: Var) -> Var {
    assert_eq!(tape.shape(a), tape.shape(b), "add: shapes differ");
    let mut y = tape.value(a).duplicate(&tape.backend);
    tape.backend.axpy(B::E::of(1.0), &tape.value(b).buf, &mut y.buf);
    tape.record1(&[a, b], y, move |ctx, dy| {
        let be = ctx.backend;
        for v in [a, b] {
            if let Some(dv) = ctx.grad(v) {
                be.axpy(B::E::of(1.0), &dy.buf, &mut dv.buf);
            }
        }
    })
}

/// alpha · x, with alpha a host constant (no gradient flows to it): how the VAE divides its
/// terms by the batch size and weights the KL by β.
pub fn scale<B: Backend>(tape: &mut Tape<B>, x: Var, alpha: f64) -> Var {
    let mut y = Tensor::zeros(&tape.backend, tape.shape(x));
    tape.backend.axpy(B::E::of(alpha), &tape.value(x).buf, &mut y.buf);
    tape.record1(&[x], y, move |ctx, dy| {
        let be = ctx.backend;
        if let Some(dx) = ctx.grad(x) {
            be.axpy(B::E::of(alpha), &dy.buf, &mut dx.buf);
        }
    })
}

/// Σ of all elements, as a `[1]` tensor.
pub fn sum<B: Backend>(tape: &mut Tape<B>, x: Var) -> Var {
    sum_scaled(tape, x, 1.0)
}

/// Mean of all elements, as a `[1]` tensor.
pub fn mean<B: Backend>(tape: &mut Tape<B>, x: Var) -> Var {
    let n = numel(tape.shape(x));
    sum_scaled(tape, x, 1.0 / n as f64)
}

fn sum_scaled<B: Backend>(tape: &mut Tape<B>, x: Var, alpha: f64) -> Var {
    let mut y = Tensor::zeros(&tape.backend, &[1]);
    tape.backend.sum(&tape.value(x).buf, &mut y.buf);
    if alpha != 1.0 {
        let mut t = tape.backend.zeros(1);
        tape.backend.axpy(B::E::of(alpha), &y.buf, &mut t);
        y.buf = t;
    }
    tape.record1(&[x], y, move |ctx, dy| {
        let be = ctx.backend;
        if let Some(dx) = ctx.grad(x) {
            be.broadcast_scalar_accumulate(&dy.buf, B::E::of(alpha), &mut dx.buf);
        }
    })
}

/// The same elements under a new shape (`view`/`reshape` of a contiguous tensor). Unlike
/// PyTorch's `view`, the result is a copy: every value on the tape owns its buffer. Backward
/// adds dy into dx unchanged, since the row-major order is the same.
pub fn reshape<B: Backend>(tape: &mut Tape<B>, x: Var, shape: &[usize]) -> Var {
    assert_eq!(numel(shape), numel(tape.shape(x)), "reshape: {:?} has a different size than {shape:?}", tape.shape(x));
    let mut y = tape.value(x).duplicate(&tape.backend);
    y.shape = shape.to_vec();
    tape.record1(&[x], y, move |ctx, dy| {
        let be = ctx.backend;
        if let Some(dx) = ctx.grad(x) {
            be.axpy(B::E::of(1.0), &dy.buf, &mut dx.buf);
        }
    })
}

/// `[n, ...]` → `[n, rest]`: one row per image, as a linear layer wants (a [`reshape`]).
pub fn flatten<B: Backend>(tape: &mut Tape<B>, x: Var) -> Var {
    let s = tape.shape(x);
    let shape = [s[0], s[1..].iter().product()];
    reshape(tape, x, &shape)
}
