//! `linear`: y = x·Wᵀ + b, exactly `torch.nn.functional.linear`: x [n, in], W [out, in]
//! (the `nn.Linear` layout), b `[out]`. Backward: dx = dy·W, dW = dyᵀ·x, db = Σₙ dy.

use crate::backend::Backend;
use crate::ops::bias::bias_add;
use crate::ops::gemm::{gemm, Threads};
use crate::tape::{Tape, Var};
use crate::tensor::{Float, Tensor};

pub use crate::backend::shapes::LinearDims;

// ---- CPU reference ----

/// `y[n, out] = x[n, in]·W[out, in]ᵀ + b[out]`, overwriting y: one GEMM with W read
/// transposed through its strides (no copy), then the bias per column.
pub fn cpu_forward<E: Float>(x: &[E], w: &[E], b: Option<&[E]>, y: &mut [E], d: LinearDims) {
    // y[n, out] = x[n, in] · Wᵀ: W read transposed through its strides.
    gemm(Threads::All, d.n, d.d_out, d.d_in, x, d.d_in, 1, w, 1, d.d_in, y, false);
    if let Some(b) = b {
        bias_add(y, b, d.n, d.d_out, 1);
    }
}

/// `dx[n, in] += dy[n, out]·W[out, in]`.
pub fn cpu_backward_data<E: Float>(dy: &[E], w: &[E], dx: &mut [E], d: LinearDims) {
    gemm(Threads::All, d.n, d.d_in, d.d_out, dy, d.d_out, 1, w, d.d_in, 1, dx, true);
}

/// `dW[out, in] += dy[n, out]ᵀ·x[n, in]`: the sum over the batch of each row's outer product.
pub fn cpu_backward_weight<E: Float>(dy: &[E], x: &[E], dw: &mut [E], d: LinearDims) {
    gemm(Threads::All, d.d_out, d.d_in, d.n, dy, 1, d.d_out, x, d.d_in, 1, dw, true);
}

// ---- on the tape ----

/// `y = x·Wᵀ + b` with x `[n, in]`, w `[out, in]`, b `[out]`; y is `[n, out]`. The backward
/// runs only the parts that are needed: `linear_backward_data` when x needs a gradient (not for
/// the first layer, whose x is the data), `linear_backward_weight` and `bias_backward` for
/// trainable w and b.
pub fn linear<B: Backend>(tape: &mut Tape<B>, x: Var, w: Var, b: Option<Var>) -> Var {
    let (xs, ws) = (tape.shape(x).to_vec(), tape.shape(w).to_vec());
    assert!(xs.len() == 2 && ws.len() == 2 && xs[1] == ws[1], "linear: x {xs:?} does not fit W {ws:?}");
    let d = LinearDims { n: xs[0], d_in: xs[1], d_out: ws[0] };
    if let Some(b) = b {
        assert_eq!(tape.shape(b), [d.d_out], "linear: bias shape");
    }
    let mut y = Tensor::empty(&tape.backend, &[d.n, d.d_out]);
    tape.backend.linear_forward(&tape.value(x).buf, &tape.value(w).buf, b.map(|b| &tape.value(b).buf), &mut y.buf, d);
    let inputs: Vec<Var> = [Some(x), Some(w), b].into_iter().flatten().collect();
    tape.record1(&inputs, y, move |ctx, dy| {
        let be = ctx.backend;
        let (xv, wv) = (ctx.value(x), ctx.value(w));
        if let Some(dx) = ctx.grad(x) {
            be.linear_backward_data(&dy.buf, &wv.buf, &mut dx.buf, d);
        }
        if let Some(dw) = ctx.grad(w) {
            be.linear_backward_weight(&dy.buf, &xv.buf, &mut dw.buf, d);
        }
        if let Some(db) = b.and_then(|b| ctx.grad(b)) {
            be.bias_backward(&dy.buf, &mut db.buf, d.n, d.d_out, 1);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_matches_hand_computation() {
        // x = [[1, 2, 3]], W = [[1, 0, -1], [2, 1, 0]], b = [0.5, -1]
        // y = [1·1 + 2·0 + 3·(−1) + 0.5, 1·2 + 2·1 + 3·0 − 1] = [−1.5, 3]
        let x = [1.0f64, 2.0, 3.0];
        let w = [1.0, 0.0, -1.0, 2.0, 1.0, 0.0];
        let b = [0.5, -1.0];
        let mut y = [f64::NAN; 2];
        cpu_forward(&x, &w, Some(&b), &mut y, LinearDims { n: 1, d_in: 3, d_out: 2 });
        assert_eq!(y, [-1.5, 3.0]);
    }
}
