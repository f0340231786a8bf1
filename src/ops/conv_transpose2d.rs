//! `conv_transpose2d`: `torch.nn.functional.conv_transpose2d` with groups 1, dilation 1.
//! x [n, c_in, h, w], weight [c_in, c_out, kh, kw] (PyTorch's layout for transposed
//! convolutions), bias `[c_out]`; output size (h − 1)·s − 2·pad + kh + output_padding.
//! Every input pixel scatters `x · W[c_in, :, :, :]` into an output window at (i·s − pad, j·s − pad).
//!
//! It is the adjoint of a convolution, and that is how it is computed, on the CPU and the GPU:
//! take the conv2d whose *input* has the transposed conv's output size and whose *output* has
//! its input size, with weight [c_out_conv = c_in, c_in_conv = c_out, kh, kw] (the same memory).
//! Then forward = that conv's backward-data, backward-data = that conv's forward, and
//! backward-weight = that conv's backward-weight with the roles of x and dy swapped.

use crate::backend::Backend;
use crate::ops::conv2d::Conv2dDims;
use crate::tape::{Tape, Var};
use crate::tensor::{Float, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
/// The shape of one transposed convolution, built by [`ConvTranspose2dDims::new`]. The
/// backend never sees it: [`ConvTranspose2dDims::as_conv`] turns it into the [`Conv2dDims`] of
/// the convolution whose backward-data it runs.
pub struct ConvTranspose2dDims {
    /// Batch size.
    pub n: usize,
    /// Input channels (the weight's first dimension).
    pub c_in: usize,
    /// Input height, in pixels.
    pub h: usize,
    /// Input width, in pixels.
    pub w: usize,
    /// Output channels (the weight's second dimension).
    pub c_out: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Upsampling factor: input pixels land `stride` output pixels apart.
    pub stride: usize,
    /// Output pixels cropped from every side (the padding of the adjoint convolution).
    pub pad: usize,
    /// Extra rows and columns added at the bottom and right of the output (less than
    /// `stride`), to pick between the output sizes that a stride-s convolution maps to one size.
    pub output_padding: usize,
    /// Output height: `(h − 1)·stride − 2·pad + kh + output_padding`.
    pub oh: usize,
    /// Output width: `(w − 1)·stride − 2·pad + kw + output_padding`.
    pub ow: usize,
}

impl ConvTranspose2dDims {
    /// Dims of a transposed convolution of an `[n, c_in, h, w]` input with a
    /// `[c_in, c_out, kh, kw]` weight; works out the output size. Panics on a zero stride, on
    /// `output_padding ≥ stride` (PyTorch's rule) and on padding larger than the output.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        n: usize,
        c_in: usize,
        h: usize,
        w: usize,
        c_out: usize,
        kh: usize,
        kw: usize,
        stride: usize,
        pad: usize,
        output_padding: usize,
    ) -> Self {
        assert!(stride >= 1, "conv_transpose2d: stride must be at least 1");
        assert!(
            output_padding < stride,
            "conv_transpose2d: output_padding must be smaller than stride (PyTorch's rule)"
        );
        let oh =
            ((h - 1) * stride + kh + output_padding).checked_sub(2 * pad).expect("conv_transpose2d: padding too large");
        let ow =
            ((w - 1) * stride + kw + output_padding).checked_sub(2 * pad).expect("conv_transpose2d: padding too large");
        ConvTranspose2dDims { n, c_in, h, w, c_out, kh, kw, stride, pad, output_padding, oh, ow }
    }
    /// The convolution this transposed convolution is the adjoint of.
    pub fn as_conv(&self) -> Conv2dDims {
        let c =
            Conv2dDims::new(self.n, self.c_out, self.oh, self.ow, self.c_in, self.kh, self.kw, self.stride, self.pad);
        debug_assert_eq!((c.oh, c.ow), (self.h, self.w));
        c
    }
}

// ---- CPU reference: written directly as the scatter, independent of the conv2d code ----

/// The forward written as the definition, a scatter of every input pixel times the weight
/// into the output (overwriting y, bias first): slow, and independent of the conv2d code, so
/// the tests can check the adjoint construction against it.
pub fn cpu_forward_direct<E: Float>(x: &[E], w: &[E], b: Option<&[E]>, y: &mut [E], d: ConvTranspose2dDims) {
    for n in 0..d.n {
        for co in 0..d.c_out {
            let bias = b.map_or(E::zero(), |b| b[co]);
            y[(n * d.c_out + co) * d.oh * d.ow..][..d.oh * d.ow].iter_mut().for_each(|v| *v = bias);
        }
        for ci in 0..d.c_in {
            for i in 0..d.h {
                for j in 0..d.w {
                    let xv = x[((n * d.c_in + ci) * d.h + i) * d.w + j];
                    for co in 0..d.c_out {
                        for p in 0..d.kh {
                            let oy = (i * d.stride + p) as isize - d.pad as isize;
                            if oy < 0 || oy as usize >= d.oh {
                                continue;
                            }
                            for q in 0..d.kw {
                                let ox = (j * d.stride + q) as isize - d.pad as isize;
                                if ox >= 0 && (ox as usize) < d.ow {
                                    y[((n * d.c_out + co) * d.oh + oy as usize) * d.ow + ox as usize] +=
                                        xv * w[((ci * d.c_out + co) * d.kh + p) * d.kw + q];
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

// ---- on the tape ----

/// Transposed 2-D convolution of x [n, c_in, h, w] with w [c_in, c_out, kh, kw].
pub fn conv_transpose2d<B: Backend>(
    tape: &mut Tape<B>,
    x: Var,
    w: Var,
    b: Option<Var>,
    stride: usize,
    pad: usize,
    output_padding: usize,
) -> Var {
    let (xs, ws) = (tape.shape(x).to_vec(), tape.shape(w).to_vec());
    assert!(xs.len() == 4 && ws.len() == 4 && xs[1] == ws[0], "conv_transpose2d: x {xs:?} does not fit weight {ws:?}");
    let d = ConvTranspose2dDims::new(xs[0], xs[1], xs[2], xs[3], ws[1], ws[2], ws[3], stride, pad, output_padding);
    let c = d.as_conv();
    let mut y = Tensor::zeros(&tape.backend, &[d.n, d.c_out, d.oh, d.ow]);
    tape.backend.conv2d_backward_data(&tape.value(x).buf, &tape.value(w).buf, &mut y.buf, c);
    if let Some(b) = b {
        tape.backend.bias_add(&mut y.buf, &tape.value(b).buf, d.n, d.c_out, d.oh * d.ow);
    }
    let inputs: Vec<Var> = [Some(x), Some(w), b].into_iter().flatten().collect();
    tape.record1(&inputs, y, move |ctx, dy| {
        let be = ctx.backend;
        let (xv, wv) = (ctx.value(x), ctx.value(w));
        if let Some(dx) = ctx.grad(x) {
            // dx = conv2d(dy, W): accumulate through a temporary since conv2d_forward
            // overwrites (so it needs no zeroing), handed back to the backend's pool after.
            let mut t = be.empty(d.n * d.c_in * d.h * d.w);
            be.conv2d_forward(&dy.buf, &wv.buf, None, &mut t, c);
            be.axpy(B::E::of(1.0), &t, &mut dx.buf);
            be.recycle(t);
        }
        if let Some(dw) = ctx.grad(w) {
            be.conv2d_backward_weight(&xv.buf, &dy.buf, &mut dw.buf, c);
        }
        if let Some(db) = b.and_then(|b| ctx.grad(b)) {
            be.bias_backward(&dy.buf, &mut db.buf, d.n, d.c_out, d.oh * d.ow);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tape::ParamStore;
    use crate::Cpu;

    /// Stride 2, kernel 2, no padding: every input pixel becomes a 2×2 block of x·W.
    #[test]
    fn doubles_by_hand() {
        let d = ConvTranspose2dDims::new(1, 1, 2, 2, 1, 2, 2, 2, 0, 0);
        assert_eq!((d.oh, d.ow), (4, 4));
        let mut y = [f64::NAN; 16];
        cpu_forward_direct(&[1.0, 2.0, 3.0, 4.0], &[1.0, 10.0, 100.0, 1000.0], None, &mut y, d);
        #[rustfmt::skip]
        let want = [
            1.0, 10.0, 2.0, 20.0,
            100.0, 1000.0, 200.0, 2000.0,
            3.0, 30.0, 4.0, 40.0,
            300.0, 3000.0, 400.0, 4000.0,
        ];
        assert_eq!(y, want);
    }

    /// The decoder's 7×7 → 14×14 layer (k3, s2, p1, output_padding 1), the same with one input
    /// channel (conv2d's one-output-channel backward-data path), and a stride-1 single-channel
    /// layer: the tape's version (through conv2d's backward-data) equals the direct scatter
    /// written above.
    #[test]
    fn matches_direct_scatter() {
        let be = Cpu::<f64>::default();
        let mut rng = crate::rng::Rng::new(7);
        for (n, ci, co, h, stride, pad, op) in [(2, 3, 2, 7, 2, 1, 1), (2, 1, 2, 7, 2, 1, 1), (3, 1, 3, 5, 1, 1, 0)] {
            let x: Vec<f64> = (0..n * ci * h * h).map(|_| rng.uniform(-1.0, 1.0)).collect();
            let w: Vec<f64> = (0..ci * co * 9).map(|_| rng.uniform(-1.0, 1.0)).collect();
            let b: Vec<f64> = (0..co).map(|_| rng.uniform(-1.0, 1.0)).collect();
            let d = ConvTranspose2dDims::new(n, ci, h, h, co, 3, 3, stride, pad, op);
            if (h, stride) == (7, 2) {
                assert_eq!((d.oh, d.ow), (14, 14));
            }
            let mut want = vec![f64::NAN; n * co * d.oh * d.ow];
            cpu_forward_direct(&x, &w, Some(&b), &mut want, d);

            let mut store = ParamStore::default();
            let wid = store.add("w", Tensor::from_host(&be, &[ci, co, 3, 3], &w), true);
            let bid = store.add("b", Tensor::from_host(&be, &[co], &b), true);
            let mut tape = Tape::new(&be, &mut store, true);
            let xv = tape.input(Tensor::from_host(&be, &[n, ci, h, h], &x));
            let (wv, bv) = (tape.param(wid), tape.param(bid));
            let y = conv_transpose2d(&mut tape, xv, wv, Some(bv), stride, pad, op);
            assert_eq!(tape.shape(y), [n, co, d.oh, d.ow]);
            for (a, b) in tape.to_host(y).iter().zip(&want) {
                assert!((a - b).abs() < 1e-12, "ci {ci} stride {stride}: {a} vs {b}");
            }
        }
    }
}
