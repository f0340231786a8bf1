//! `conv2d`: `torch.nn.functional.conv2d` with groups 1 and dilation 1. x [n, c_in, h, w],
//! weight `[c_out, c_in, kh, kw]`, bias `[c_out]`; cross-correlation with zero padding:
//! `y[n, o, i, j] = b[o] + Σ_{c,p,q} W[o, c, p, q] · x[n, c, i·s − pad + p, j·s − pad + q]`,
//! output size ⌊(h + 2·pad − kh) / s⌋ + 1. Backward to the input, the weight and the bias.
//!
//! The CPU reference lowers each image to columns (im2col) and calls the blocked GEMM:
//! forward y_n = W·col_n, backward-data dcol = Wᵀ·dy_n folded back (col2im),
//! backward-weight dW = Σ_n dy_n·col_nᵀ. The `cpu_*` functions the CPU backend calls run
//! f32 3×3 stride-1 layers with one input or output channel on the AVX-512 one-channel path
//! (`conv2d_one_channel.rs`) when the CPU has it, other layers with one output channel on the
//! direct path (`conv2d_direct.rs`, f32 and f64), f32 3×3 stride-2 layers on the AVX-512
//! stride-2 path (`conv2d_stride2.rs`), other f32 layers on the AVX-512 im2col path
//! (`conv2d_avx512.rs`) when the CPU has it and the layer suits it, and the reference
//! (`reference_*`) otherwise; `VAECUDA_CPU_REFERENCE=1` forces the reference everywhere.

use rayon::prelude::*;

use crate::backend::Backend;
use crate::ops::bias::bias_add;
#[cfg(target_arch = "x86_64")]
use crate::ops::conv2d_avx512;
use crate::ops::conv2d_direct;
#[cfg(target_arch = "x86_64")]
use crate::ops::conv2d_one_channel;
#[cfg(target_arch = "x86_64")]
use crate::ops::conv2d_stride2;
use crate::ops::gemm::{gemm, Threads};
use crate::tape::{Tape, Var};
use crate::tensor::{Float, Tensor};

pub use crate::backend::shapes::Conv2dDims;

impl Conv2dDims {
    /// Dims of a convolution of an [n, c_in, h, w] input with a [c_out, c_in, kh, kw] kernel.
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
    ) -> Self {
        assert!(stride >= 1, "conv2d: stride must be at least 1");
        assert!(h + 2 * pad >= kh && w + 2 * pad >= kw, "conv2d: kernel larger than the padded input");
        let oh = (h + 2 * pad - kh) / stride + 1;
        let ow = (w + 2 * pad - kw) / stride + 1;
        Conv2dDims { n, c_in, h, w, c_out, kh, kw, stride, pad, oh, ow }
    }
    /// Elements of the input x, `n·c_in·h·w`.
    pub fn x_len(&self) -> usize {
        self.n * self.c_in * self.h * self.w
    }
    /// Elements of the output y, `n·c_out·oh·ow`.
    pub fn y_len(&self) -> usize {
        self.n * self.c_out * self.oh * self.ow
    }
    /// Elements of the weight, `c_out·c_in·kh·kw`.
    pub fn w_len(&self) -> usize {
        self.c_out * self.c_in * self.kh * self.kw
    }
    /// Multiply-adds of the forward pass (each backward pass costs the same).
    pub fn macs(&self) -> usize {
        self.y_len() * self.c_in * self.kh * self.kw
    }
}

// ---- CPU reference ----

/// The output columns j whose tap q lands inside a row of width w: j0..j1.
#[inline]
pub(crate) fn valid_cols(q: usize, d: &Conv2dDims) -> (usize, usize) {
    // x index = j·s + q − pad must lie in [0, w).
    let j0 = if d.pad > q { (d.pad - q).div_ceil(d.stride) } else { 0 }.min(d.ow);
    let j1 = (d.w + d.pad).saturating_sub(q).div_ceil(d.stride).min(d.ow).max(j0);
    (j0, j1)
}

/// col[(c, p, q), (i, j)] = x[c, i·s − pad + p, j·s − pad + q] (0 outside), for one image.
fn im2col<E: Float>(x: &[E], col: &mut [E], d: &Conv2dDims) {
    let l = d.oh * d.ow;
    for c in 0..d.c_in {
        for p in 0..d.kh {
            for q in 0..d.kw {
                let row = &mut col[((c * d.kh + p) * d.kw + q) * l..][..l];
                let (j0, j1) = valid_cols(q, d);
                for i in 0..d.oh {
                    let out = &mut row[i * d.ow..][..d.ow];
                    let yy = (i * d.stride + p) as isize - d.pad as isize;
                    if yy < 0 || yy as usize >= d.h {
                        out.fill(E::zero());
                        continue;
                    }
                    let xrow = &x[(c * d.h + yy as usize) * d.w..][..d.w];
                    out[..j0].fill(E::zero());
                    out[j1..].fill(E::zero());
                    let first = j0 * d.stride + q - d.pad;
                    if d.stride == 1 {
                        out[j0..j1].copy_from_slice(&xrow[first..first + (j1 - j0)]);
                    } else {
                        for (o, xi) in out[j0..j1].iter_mut().zip((first..).step_by(d.stride)) {
                            *o = xrow[xi];
                        }
                    }
                }
            }
        }
    }
}

/// The adjoint of `im2col`: dx[c, y, x] += every column entry that was read from there.
fn col2im_add<E: Float>(col: &[E], dx: &mut [E], d: &Conv2dDims) {
    let l = d.oh * d.ow;
    for c in 0..d.c_in {
        for p in 0..d.kh {
            for q in 0..d.kw {
                let row = &col[((c * d.kh + p) * d.kw + q) * l..][..l];
                let (j0, j1) = valid_cols(q, d);
                for i in 0..d.oh {
                    let yy = (i * d.stride + p) as isize - d.pad as isize;
                    if yy < 0 || yy as usize >= d.h {
                        continue;
                    }
                    let xrow = &mut dx[(c * d.h + yy as usize) * d.w..][..d.w];
                    let first = j0 * d.stride + q - d.pad;
                    for (v, xi) in row[i * d.ow + j0..i * d.ow + j1].iter().zip((first..).step_by(d.stride)) {
                        xrow[xi] += *v;
                    }
                }
            }
        }
    }
}

/// y = conv2d(x, w) + b, overwriting y: for each image (in parallel), im2col into a
/// `[c_in·kh·kw, oh·ow]` column matrix, then `y_n = W·col_n` as one GEMM; the bias last.
pub fn reference_forward<E: Float>(x: &[E], w: &[E], b: Option<&[E]>, y: &mut [E], d: Conv2dDims) {
    let (k, l) = (d.c_in * d.kh * d.kw, d.oh * d.ow);
    y.par_chunks_mut(d.c_out * l).zip(x.par_chunks(d.c_in * d.h * d.w)).for_each_init(
        || vec![E::zero(); k * l],
        |col, (yn, xn)| {
            im2col(xn, col, &d);
            gemm(Threads::Caller, d.c_out, l, k, w, k, 1, col, l, 1, yn, false);
        },
    );
    if let Some(b) = b {
        bias_add(y, b, d.n, d.c_out, l);
    }
}

/// dx += the gradient of conv2d with respect to its input: per image, `dcol = Wᵀ·dy_n`,
/// folded back onto the pixels each column entry was read from (col2im). A layer with one
/// output channel takes a direct loop instead (same result, bit for bit).
pub fn reference_backward_data<E: Float>(dy: &[E], w: &[E], dx: &mut [E], d: Conv2dDims) {
    if d.c_out == 1 {
        return cpu_backward_data_one_output_channel(dy, w, dx, d);
    }
    let (k, l) = (d.c_in * d.kh * d.kw, d.oh * d.ow);
    dx.par_chunks_mut(d.c_in * d.h * d.w).zip(dy.par_chunks(d.c_out * l)).for_each_init(
        || vec![E::zero(); k * l],
        |col, (dxn, dyn_)| {
            // dcol[k, l] = Wᵀ[k, c_out] · dy_n[c_out, l]
            gemm(Threads::Caller, k, l, d.c_out, w, 1, k, dyn_, l, 1, col, false);
            col2im_add(col, dxn, &d);
        },
    );
}

/// `reference_backward_data` when there is one output channel (a decoder's last layer): the column
/// matrix Wᵀ·dy would be an outer product, k × l values written and read back per image, which
/// made this 3× slower than the whole forward pass. Each column value w[c, p, q]·dy[i, j] is
/// formed where it is added instead, in col2im's order, so the result is the same to the bit.
fn cpu_backward_data_one_output_channel<E: Float>(dy: &[E], w: &[E], dx: &mut [E], d: Conv2dDims) {
    let l = d.oh * d.ow;
    dx.par_chunks_mut(d.c_in * d.h * d.w).zip(dy.par_chunks(l)).for_each(|(dxn, dyn_)| {
        for c in 0..d.c_in {
            for p in 0..d.kh {
                for q in 0..d.kw {
                    let wv = w[(c * d.kh + p) * d.kw + q];
                    let (j0, j1) = valid_cols(q, &d);
                    for i in 0..d.oh {
                        let yy = (i * d.stride + p) as isize - d.pad as isize;
                        if yy < 0 || yy as usize >= d.h {
                            continue;
                        }
                        let xrow = &mut dxn[(c * d.h + yy as usize) * d.w..][..d.w];
                        let first = j0 * d.stride + q - d.pad;
                        let dyr = &dyn_[i * d.ow + j0..i * d.ow + j1];
                        if d.stride == 1 {
                            xrow[first..first + dyr.len()].iter_mut().zip(dyr).for_each(|(x, &g)| *x += wv * g);
                        } else {
                            for (&g, xi) in dyr.iter().zip((first..).step_by(d.stride)) {
                                xrow[xi] += wv * g;
                            }
                        }
                    }
                }
            }
        }
    });
}

/// Images are split into a fixed number of groups, each summed in order, and the group sums
/// added in order: the result does not depend on how many threads ran.
const WEIGHT_GRAD_GROUPS: usize = 16;

/// dw += the gradient of conv2d with respect to its weight, `Σ_n dy_n·col_nᵀ`: images are
/// summed in a fixed number of groups, in order, so the result does not depend on the thread
/// count.
pub fn reference_backward_weight<E: Float>(dy: &[E], x: &[E], dw: &mut [E], d: Conv2dDims) {
    let (k, l) = (d.c_in * d.kh * d.kw, d.oh * d.ow);
    let per_group = d.n.div_ceil(WEIGHT_GRAD_GROUPS).max(1);
    let partials: Vec<Vec<E>> = (0..d.n.div_ceil(per_group))
        .into_par_iter()
        .map(|g| {
            let mut part = vec![E::zero(); d.c_out * k];
            let mut col = vec![E::zero(); k * l];
            for n in g * per_group..((g + 1) * per_group).min(d.n) {
                im2col(&x[n * d.c_in * d.h * d.w..][..d.c_in * d.h * d.w], &mut col, &d);
                // part[c_out, k] += dy_n[c_out, l] · colᵀ[l, k]
                gemm(Threads::Caller, d.c_out, k, l, &dy[n * d.c_out * l..], l, 1, &col, 1, l, &mut part, true);
            }
            part
        })
        .collect();
    for part in partials {
        for (a, b) in dw.iter_mut().zip(part) {
            *a += b;
        }
    }
}

// ---- CPU: the fast path where it applies, else the reference ----

/// Whether the fast paths may run: `VAECUDA_CPU_REFERENCE=1` forces the reference
/// everywhere, to compare the two.
fn fast_paths_allowed() -> bool {
    static ALLOWED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ALLOWED.get_or_init(|| std::env::var_os("VAECUDA_CPU_REFERENCE").is_none())
}

/// Whether conv2d runs on its AVX-512 path (`ops::conv2d_avx512`): an f32 CPU with AVX-512F
/// and a layer big enough for its register tiles.
#[cfg(target_arch = "x86_64")]
fn takes_avx512_path(d: &Conv2dDims) -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(conv2d_avx512::available) && conv2d_avx512::suits(d)
}

/// Whether conv2d runs on the direct stride-2 path (`ops::conv2d_stride2`): an f32 CPU with
/// AVX-512F and a 3×3 stride-2 layer it takes (backward-data also asks `suits_backward_data`).
#[cfg(target_arch = "x86_64")]
fn takes_stride2_path(d: &Conv2dDims) -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(conv2d_stride2::available) && conv2d_stride2::suits(d)
}

/// y = conv2d(x, w) + b, overwriting y.
pub fn cpu_forward<E: Float>(x: &[E], w: &[E], b: Option<&[E]>, y: &mut [E], d: Conv2dDims) {
    if fast_paths_allowed() {
        #[cfg(target_arch = "x86_64")]
        if let (Some(x), Some(w), Some(y)) = (E::as_f32_slice(x), E::as_f32_slice(w), E::as_f32_slice_mut(y)) {
            if conv2d_one_channel::suits(&d) {
                return conv2d_one_channel::forward(x, w, b.and_then(E::as_f32_slice), y, &d);
            }
        }
        if conv2d_direct::suits(&d) {
            return conv2d_direct::forward(x, w, b, y, &d);
        }
        #[cfg(target_arch = "x86_64")]
        if let (Some(x), Some(w), Some(y)) = (E::as_f32_slice(x), E::as_f32_slice(w), E::as_f32_slice_mut(y)) {
            if takes_stride2_path(&d) {
                return conv2d_stride2::forward(x, w, b.and_then(E::as_f32_slice), y, &d);
            }
            if takes_avx512_path(&d) {
                return conv2d_avx512::forward(x, w, b.and_then(E::as_f32_slice), y, &d);
            }
        }
    }
    reference_forward(x, w, b, y, d)
}

/// dx += the gradient of conv2d with respect to its input.
pub fn cpu_backward_data<E: Float>(dy: &[E], w: &[E], dx: &mut [E], d: Conv2dDims) {
    if fast_paths_allowed() {
        #[cfg(target_arch = "x86_64")]
        if let (Some(dy), Some(w), Some(dx)) = (E::as_f32_slice(dy), E::as_f32_slice(w), E::as_f32_slice_mut(dx)) {
            if conv2d_one_channel::suits(&d) {
                return conv2d_one_channel::backward_data(dy, w, dx, &d);
            }
        }
        if conv2d_direct::suits(&d) {
            return conv2d_direct::backward_data(dy, w, dx, &d);
        }
        #[cfg(target_arch = "x86_64")]
        if let (Some(dy), Some(w), Some(dx)) = (E::as_f32_slice(dy), E::as_f32_slice(w), E::as_f32_slice_mut(dx)) {
            if takes_stride2_path(&d) && conv2d_stride2::suits_backward_data(&d) {
                return conv2d_stride2::backward_data(dy, w, dx, &d);
            }
            if takes_avx512_path(&d) {
                return conv2d_avx512::backward_data(dy, w, dx, &d);
            }
        }
    }
    reference_backward_data(dy, w, dx, d)
}

/// dw += the gradient of conv2d with respect to its weight.
pub fn cpu_backward_weight<E: Float>(dy: &[E], x: &[E], dw: &mut [E], d: Conv2dDims) {
    if fast_paths_allowed() {
        #[cfg(target_arch = "x86_64")]
        if let (Some(dy), Some(x), Some(dw)) = (E::as_f32_slice(dy), E::as_f32_slice(x), E::as_f32_slice_mut(dw)) {
            if conv2d_one_channel::suits(&d) {
                return conv2d_one_channel::backward_weight(dy, x, dw, &d);
            }
        }
        if conv2d_direct::suits(&d) {
            return conv2d_direct::backward_weight(dy, x, dw, &d);
        }
        #[cfg(target_arch = "x86_64")]
        if let (Some(dy), Some(x), Some(dw)) = (E::as_f32_slice(dy), E::as_f32_slice(x), E::as_f32_slice_mut(dw)) {
            if takes_stride2_path(&d) {
                return conv2d_stride2::backward_weight(dy, x, dw, &d);
            }
            if takes_avx512_path(&d) {
                return conv2d_avx512::backward_weight(dy, x, dw, &d);
            }
        }
    }
    reference_backward_weight(dy, x, dw, d)
}

/// A fast path's forward: (x, w, bias, y, dims).
#[cfg(test)]
pub(crate) type ForwardPass<E> = fn(&[E], &[E], Option<&[E]>, &mut [E], &Conv2dDims);
/// A fast path's backward pass: (dy, w or x, dx or dw, dims).
#[cfg(test)]
pub(crate) type BackwardPass<E> = fn(&[E], &[E], &mut [E], &Conv2dDims);

/// The three passes of one of conv2d's fast paths, for [`check_passes_against_reference`].
#[cfg(test)]
pub(crate) struct FastPath<E> {
    pub forward: ForwardPass<E>,
    pub backward_data: BackwardPass<E>,
    pub backward_weight: BackwardPass<E>,
}

/// For the fast paths' tests: each pass of `path` against the reference on fresh unit
/// normals (never zeros), outputs poisoned with NaN where the pass overwrites and random
/// where it adds, forward with and without a bias. Both sum the same products of unit
/// normals in different orders (and the AVX-512 paths with fused multiply-adds): such a sum
/// of `terms` products is ~√terms in size and each order's rounding a random walk of ~√terms
/// half-ulps of it, so `tol`·√terms·(1 + |value|) (2·10⁻⁶ for f32, 10⁻¹⁴ for f64) leaves a
/// wide margin, while a wrong index, tap or mask gives errors of order 1. Terms: c_in·kh·kw
/// (forward), c_out·kh·kw (backward-data), n·oh·ow (backward-weight).
#[cfg(test)]
pub(crate) fn check_passes_against_reference<E: Float>(path: FastPath<E>, shapes: &[Conv2dDims], tol: f64, seed: u64) {
    let mut rng = crate::rng::Rng::new(seed);
    let mut draw = |len: usize| -> Vec<E> { (0..len).map(|_| E::of(rng.normal())).collect() };
    for &d in shapes {
        let (x, w, b, dy) = (draw(d.x_len()), draw(d.w_len()), draw(d.c_out), draw(d.y_len()));
        let close = |got: &[E], want: &[E], terms: usize, what: &str| {
            for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
                let (g, w) = (g.f64(), w.f64());
                let bound = tol * (terms as f64).sqrt() * (1.0 + w.abs());
                assert!((g - w).abs() <= bound, "{what} {d:?} [{i}]: {g} vs {w}");
            }
        };
        for bias in [Some(&b[..]), None] {
            let (mut got, mut want) = (vec![E::nan(); d.y_len()], vec![E::nan(); d.y_len()]);
            (path.forward)(&x, &w, bias, &mut got, &d);
            reference_forward(&x, &w, bias, &mut want, d);
            close(&got, &want, d.c_in * d.kh * d.kw, "forward");
        }
        let dx0 = draw(d.x_len());
        let (mut got, mut want) = (dx0.clone(), dx0);
        (path.backward_data)(&dy, &w, &mut got, &d);
        reference_backward_data(&dy, &w, &mut want, d);
        close(&got, &want, d.c_out * d.kh * d.kw, "backward_data");

        let dw0 = draw(d.w_len());
        let (mut got, mut want) = (dw0.clone(), dw0);
        (path.backward_weight)(&dy, &x, &mut got, &d);
        reference_backward_weight(&dy, &x, &mut want, d);
        close(&got, &want, d.n * d.oh * d.ow, "backward_weight");
    }
}

/// For the fast paths' tests: every pass of `path` gives the same bits on 1 and 3 threads.
#[cfg(test)]
pub(crate) fn check_thread_count_independence(path: FastPath<f32>, d: Conv2dDims) {
    let mut rng = crate::rng::Rng::new(3);
    let mut draw = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.normal() as f32).collect() };
    let (x, w, dy) = (draw(d.x_len()), draw(d.w_len()), draw(d.y_len()));
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let (mut y, mut dx, mut dw) = (vec![0.0; d.y_len()], vec![0.0; d.x_len()], vec![0.0; d.w_len()]);
            (path.forward)(&x, &w, None, &mut y, &d);
            (path.backward_data)(&dy, &w, &mut dx, &d);
            (path.backward_weight)(&dy, &x, &mut dw, &d);
            (y, dx, dw)
        })
    };
    assert_eq!(run(1), run(3), "{d:?}");
}

// ---- on the tape ----

/// 2-D convolution of x `[n, c_in, h, w]` with w `[c_out, c_in, kh, kw]` and optional bias `[c_out]`.
pub fn conv2d<B: Backend>(tape: &mut Tape<B>, x: Var, w: Var, b: Option<Var>, stride: usize, pad: usize) -> Var {
    let (xs, ws) = (tape.shape(x).to_vec(), tape.shape(w).to_vec());
    assert!(xs.len() == 4 && ws.len() == 4 && xs[1] == ws[1], "conv2d: x {xs:?} does not fit weight {ws:?}");
    let d = Conv2dDims::new(xs[0], xs[1], xs[2], xs[3], ws[0], ws[2], ws[3], stride, pad);
    let mut y = Tensor::empty(&tape.backend, &[d.n, d.c_out, d.oh, d.ow]);
    tape.backend.conv2d_forward(&tape.value(x).buf, &tape.value(w).buf, b.map(|b| &tape.value(b).buf), &mut y.buf, d);
    let inputs: Vec<Var> = [Some(x), Some(w), b].into_iter().flatten().collect();
    tape.record1(&inputs, y, move |ctx, dy| {
        let be = ctx.backend;
        let (xv, wv) = (ctx.value(x), ctx.value(w));
        if let Some(dx) = ctx.grad(x) {
            be.conv2d_backward_data(&dy.buf, &wv.buf, &mut dx.buf, d);
        }
        if let Some(dw) = ctx.grad(w) {
            be.conv2d_backward_weight(&dy.buf, &xv.buf, &mut dw.buf, d);
        }
        if let Some(db) = b.and_then(|b| ctx.grad(b)) {
            be.bias_backward(&dy.buf, &mut db.buf, d.n, d.c_out, d.oh * d.ow);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 3×3 kernel on a 4×4 image, stride 1, no padding: each output is the sum of a 3×3
    /// window times the kernel, written out by hand.
    #[test]
    fn forward_3x3_on_4x4_by_hand() {
        let x: Vec<f64> = (1..=16).map(|v| v as f64).collect(); // rows 1-4, 5-8, 9-12, 13-16
        let w = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]; // the diagonal: x[i,j]+x[i+1,j+1]+x[i+2,j+2]
        let mut y = [f64::NAN; 4];
        reference_forward(&x, &w, Some(&[0.5]), &mut y, Conv2dDims::new(1, 1, 4, 4, 1, 3, 3, 1, 0));
        // y[0,0] = 1 + 6 + 11, y[0,1] = 2 + 7 + 12, y[1,0] = 5 + 10 + 15, y[1,1] = 6 + 11 + 16
        assert_eq!(y, [18.5, 21.5, 30.5, 33.5]);
    }

    /// Padding 1, stride 2 on a 3×3 image of ones with a kernel of ones: the output counts the
    /// in-bounds taps of each window (corners of a 3×3 image see 4 taps, etc.).
    #[test]
    fn forward_counts_taps_with_padding_and_stride() {
        let d = Conv2dDims::new(1, 1, 3, 3, 1, 3, 3, 2, 1);
        assert_eq!((d.oh, d.ow), (2, 2));
        let mut y = [f64::NAN; 4];
        reference_forward(&[1.0; 9], &[1.0; 9], None, &mut y, d);
        assert_eq!(y, [4.0, 4.0, 4.0, 4.0]);
    }
}
