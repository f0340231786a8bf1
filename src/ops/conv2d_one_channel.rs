//! `conv2d`'s AVX-512 path for 3×3, stride-1, padding-1 layers with **one channel on one
//! side**: an encoder's first layer (1 → 32 channels) and a decoder's last (32 → 1, as a
//! convolution or a transposed one). The reference lowers these to im2col and a GEMM whose
//! reduction (9 taps) or output (one row) is too small for a register tile, and `vae bench`
//! had every such pass at 12–37 GFLOP/s, 1.5–4.8 ms at batch 128, about 13 ms of a conv VAE
//! step. The passes are memory-bound stencils: each input value feeds 9 multiply-adds per
//! channel on the other side, so the work is to read every image once and keep the
//! arithmetic in registers.
//!
//! An image row of up to 32 pixels is two 16-lane registers; a tap's shifted row is a masked
//! load (lanes that would read the padding or past the row are masked off and read as 0, so
//! no padded copy is made). Three kernels serve all six passes:
//!
//! | kernel | computes | serves |
//! |---|---|---|
//! | `many_to_one` | out[i, j] (+)= Σ_c Σ_pq W[c, p, q]·in[c, i+p−1, j+q−1] | forward of C → 1; backward-data of 1 → M |
//! | `one_to_many` | out[o, i, j] (+)= Σ_pq W[o, p, q]·in[i+p−1, j+q−1] | forward of 1 → M; backward-data of C → 1 |
//! | `taps_of` | G[m, p, q] = Σ_n Σ_ij many[n, m, i, j]·one[n, i+p−1, j+q−1] | backward-weight of both |
//!
//! A backward-data pass is the forward of the other kernel with the taps flipped
//! (W[c, p, q] = w[c, 2−p, 2−q]); the weight gradient of C → 1 is G with flipped taps.
//! Images are independent in the first two; the weight gradient sums fixed groups of images
//! and adds the group sums in order, so every result is the same whatever the thread count.
//! `tests` checks every pass against the reference.

use std::arch::x86_64::*;

use rayon::prelude::*;

use super::conv2d::Conv2dDims;

/// Lanes of a register: a row of up to 2·16 pixels is two of them.
const LANES: usize = 16;
/// Output rows computed together, for independent accumulators (8 with two halves).
const ROWS: usize = 4;
/// Images are split into this many fixed groups for the weight gradient (as the reference).
const GROUPS: usize = 16;

/// Whether this path takes these dims (and the CPU has AVX-512F): a 3×3 kernel, stride 1,
/// padding 1, rows of at most 32 pixels, one input or one output channel.
pub fn suits(d: &Conv2dDims) -> bool {
    (d.c_in == 1 || d.c_out == 1)
        && (d.kh, d.kw, d.stride, d.pad) == (3, 3, 1, 1)
        && (1..=2 * LANES).contains(&d.w)
        && crate::ops::widest_simd() == crate::ops::Simd::Avx512
}

/// Lane masks of a row: which lanes of each half are pixels of the row (`store`), and which
/// of those read a pixel of the row at column offset q − 1 (`load[half][q]`).
#[derive(Clone, Copy)]
struct Masks {
    load: [[u16; 3]; 2],
    store: [u16; 2],
}

impl Masks {
    fn of(w: usize) -> Self {
        let mut m = Masks { load: [[0; 3]; 2], store: [0; 2] };
        for half in 0..2 {
            for t in 0..LANES {
                let j = half * LANES + t;
                if j >= w {
                    continue;
                }
                m.store[half] |= 1 << t;
                for q in 0..3 {
                    if (1..=w).contains(&(j + q)) {
                        m.load[half][q] |= 1 << t;
                    }
                }
            }
        }
        m
    }
}

/// Row `row`'s pixels j + q − 1 for the 16 output columns j of `half` (0 where masked off).
///
/// # Safety
/// AVX-512F; `row` points at a row of `w` floats with the masks of `w`. Masked-off lanes are
/// not read, so the pointer may lie one before the row or past its end (hence `wrapping`).
#[inline(always)]
unsafe fn shifted(row: *const f32, half: usize, q: usize, m: &Masks) -> __m512 {
    unsafe { _mm512_maskz_loadu_ps(m.load[half][q], row.wrapping_add(half * LANES + q).wrapping_sub(1)) }
}

/// Stores (or adds, with `accumulate`) a row's two halves at `dst`.
///
/// # Safety
/// AVX-512F; `dst` points at a row of `w` floats with the masks of `w`.
#[inline(always)]
unsafe fn store_row(dst: *mut f32, v: [__m512; 2], accumulate: bool, m: &Masks) {
    for (half, v) in v.into_iter().enumerate() {
        let at = dst.wrapping_add(half * LANES);
        unsafe {
            let v = if accumulate { _mm512_add_ps(v, _mm512_maskz_loadu_ps(m.store[half], at)) } else { v };
            _mm512_mask_storeu_ps(at, m.store[half], v);
        }
    }
}

/// W[c, p, q] = w[c, 2 − p, 2 − q]: the taps of a backward-data pass.
fn flipped(w: &[f32]) -> Vec<f32> {
    w.chunks_exact(9).flat_map(|taps| taps.iter().rev().copied()).collect()
}

/// y = conv2d(x, w) + b, overwriting y.
pub fn forward(x: &[f32], w: &[f32], b: Option<&[f32]>, y: &mut [f32], d: &Conv2dDims) {
    check(d, x.len() == d.x_len() && w.len() == d.w_len() && y.len() == d.y_len());
    if d.c_in == 1 {
        one_to_many(x, w, b, y, d.c_out, d, false);
    } else {
        many_to_one(x, w, b.map_or(0.0, |b| b[0]), y, d.c_in, d, false);
    }
}

/// dx += the gradient of conv2d with respect to its input.
pub fn backward_data(dy: &[f32], w: &[f32], dx: &mut [f32], d: &Conv2dDims) {
    check(d, dx.len() == d.x_len() && w.len() == d.w_len() && dy.len() == d.y_len());
    let w = flipped(w);
    if d.c_in == 1 {
        many_to_one(dy, &w, 0.0, dx, d.c_out, d, true);
    } else {
        one_to_many(dy, &w, None, dx, d.c_in, d, true);
    }
}

/// dw += the gradient of conv2d with respect to its weight.
pub fn backward_weight(dy: &[f32], x: &[f32], dw: &mut [f32], d: &Conv2dDims) {
    check(d, x.len() == d.x_len() && dw.len() == d.w_len() && dy.len() == d.y_len());
    if d.c_in == 1 {
        // dw[o, p, q] = Σ dy[n, o, i, j]·x[n, i+p−1, j+q−1]
        let g = taps_of(dy, x, d.c_out, d);
        dw.iter_mut().zip(&g).for_each(|(v, g)| *v += g);
    } else {
        // dw[c, p, q] = Σ dy[n, i, j]·x[n, c, i+p−1, j+q−1] = G[c, 2−p, 2−q] with x as the
        // many channels and dy as the one (substitute i' = i + p − 1).
        let g = flipped(&taps_of(x, dy, d.c_in, d));
        dw.iter_mut().zip(&g).for_each(|(v, g)| *v += g);
    }
}

fn check(d: &Conv2dDims, lengths: bool) {
    assert!(suits(d), "conv2d_one_channel: cannot take {d:?}");
    assert!(lengths, "conv2d_one_channel: lengths do not fit {d:?}");
}

/// out[n, i, j] = bias + Σ_c Σ_pq wt[c, p, q]·input[n, c, i+p−1, j+q−1], or added to out
/// with `accumulate`; one task per image.
fn many_to_one(input: &[f32], wt: &[f32], bias: f32, out: &mut [f32], c: usize, d: &Conv2dDims, accumulate: bool) {
    let (hw, m) = (d.h * d.w, Masks::of(d.w));
    out.par_chunks_mut(hw).zip(input.par_chunks(c * hw)).for_each(|(out, input)| {
        // SAFETY: `suits` (asserted by every caller) checked AVX-512F; the slices hold one
        // image: c planes in, one plane out.
        unsafe { many_to_one_image(input, wt, bias, out, c, d, accumulate, &m) }
    });
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn many_to_one_image(
    input: &[f32],
    wt: &[f32],
    bias: f32,
    out: &mut [f32],
    c: usize,
    d: &Conv2dDims,
    accumulate: bool,
    m: &Masks,
) {
    let (h, w) = (d.h, d.w);
    assert!(input.len() == c * h * w && out.len() == h * w && wt.len() == c * 9);
    for i0 in (0..h).step_by(ROWS) {
        let mut acc = [[_mm512_set1_ps(bias); 2]; ROWS];
        for (plane, taps) in input.chunks_exact(h * w).zip(wt.chunks_exact(9)) {
            let taps: [__m512; 9] = std::array::from_fn(|k| _mm512_set1_ps(taps[k]));
            // Input rows i0 − 1 ..= i0 + ROWS; input row i0 + r − 1 feeds output row
            // i0 + r − p through tap row p.
            for r in 0..ROWS + 2 {
                let Some(y) = (i0 + r).checked_sub(1).filter(|&y| y < h) else { continue };
                let row = plane[y * w..].as_ptr();
                for q in 0..3 {
                    // SAFETY: AVX-512F is enabled; `row` is a row of w floats.
                    let v = unsafe { [shifted(row, 0, q, m), shifted(row, 1, q, m)] };
                    for p in 0..3 {
                        if r >= p && r - p < ROWS {
                            for half in 0..2 {
                                acc[r - p][half] = _mm512_fmadd_ps(taps[p * 3 + q], v[half], acc[r - p][half]);
                            }
                        }
                    }
                }
            }
        }
        for (k, acc) in acc.into_iter().enumerate().take(h - i0) {
            // SAFETY: row i0 + k < h of the output plane.
            unsafe { store_row(out[(i0 + k) * w..].as_mut_ptr(), acc, accumulate, m) };
        }
    }
}

/// out[n, o, i, j] = bias[o] + Σ_pq wt[o, p, q]·input[n, i+p−1, j+q−1], or added to out with
/// `accumulate`; one task per image.
fn one_to_many(
    input: &[f32],
    wt: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
    many: usize,
    d: &Conv2dDims,
    accumulate: bool,
) {
    let (hw, m) = (d.h * d.w, Masks::of(d.w));
    out.par_chunks_mut(many * hw).zip(input.par_chunks(hw)).for_each(|(out, input)| {
        // SAFETY: as in `many_to_one`.
        unsafe { one_to_many_image(input, wt, bias, out, many, d, accumulate, &m) }
    });
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn one_to_many_image(
    input: &[f32],
    wt: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
    many: usize,
    d: &Conv2dDims,
    accumulate: bool,
    m: &Masks,
) {
    let (h, w) = (d.h, d.w);
    assert!(input.len() == h * w && out.len() == many * h * w && wt.len() == many * 9);
    for i0 in (0..h).step_by(ROWS) {
        // The shifted input rows i0 − 1 ..= i0 + ROWS that every output channel reads
        // (zero outside the image), loaded once for all of them.
        let mut rows = [[[_mm512_setzero_ps(); 2]; 3]; ROWS + 2];
        for (r, shifts) in rows.iter_mut().enumerate() {
            let Some(y) = (i0 + r).checked_sub(1).filter(|&y| y < h) else { continue };
            let row = input[y * w..].as_ptr();
            for (q, v) in shifts.iter_mut().enumerate() {
                // SAFETY: AVX-512F is enabled; `row` is a row of w floats.
                *v = unsafe { [shifted(row, 0, q, m), shifted(row, 1, q, m)] };
            }
        }
        for (o, taps) in wt.chunks_exact(9).enumerate() {
            let b = bias.map_or(0.0, |b| b[o]);
            let mut acc = [[_mm512_set1_ps(b); 2]; ROWS];
            for p in 0..3 {
                for q in 0..3 {
                    let tap = _mm512_set1_ps(taps[p * 3 + q]);
                    for (k, acc) in acc.iter_mut().enumerate() {
                        for half in 0..2 {
                            acc[half] = _mm512_fmadd_ps(tap, rows[k + p][q][half], acc[half]);
                        }
                    }
                }
            }
            for (k, acc) in acc.into_iter().enumerate().take(h - i0) {
                // SAFETY: row i0 + k < h of output plane o.
                unsafe { store_row(out[(o * h + i0 + k) * w..].as_mut_ptr(), acc, accumulate, m) };
            }
        }
    }
}

/// G[m, p, q] = Σ_n Σ_ij many[n, m, i, j]·one[n, i+p−1, j+q−1] for m < `channels`: images in
/// fixed groups, one task each, the group sums added in group order.
fn taps_of(many: &[f32], one: &[f32], channels: usize, d: &Conv2dDims) -> Vec<f32> {
    let (hw, m) = (d.h * d.w, Masks::of(d.w));
    let per = d.n.div_ceil(GROUPS).max(1);
    let partials: Vec<Vec<f32>> = many
        .par_chunks(per * channels * hw)
        .zip(one.par_chunks(per * hw))
        .map(|(many, one)| {
            let mut g = vec![0.0f32; channels * 9];
            // SAFETY: as in `many_to_one`; the slices hold the same images.
            unsafe { taps_of_group(many, one, channels, d, &m, &mut g) };
            g
        })
        .collect();
    let mut g = vec![0.0f32; channels * 9];
    for part in partials {
        g.iter_mut().zip(&part).for_each(|(v, p)| *v += p);
    }
    g
}

#[target_feature(enable = "avx512f")]
unsafe fn taps_of_group(many: &[f32], one: &[f32], channels: usize, d: &Conv2dDims, m: &Masks, g: &mut [f32]) {
    let (h, w, hw) = (d.h, d.w, d.h * d.w);
    let images = one.len() / hw;
    assert!(many.len() == images * channels * hw && one.len() == images * hw && g.len() == channels * 9);
    for (c, g) in g.chunks_exact_mut(9).enumerate() {
        // One accumulator per tap and half, over every pixel of the group's images.
        let mut acc = [[_mm512_setzero_ps(); 2]; 9];
        for n in 0..images {
            let (plane, image) = (&many[(n * channels + c) * hw..][..hw], &one[n * hw..][..hw]);
            for i in 0..h {
                // SAFETY (all loads): AVX-512F is enabled; each pointer is a row of w floats.
                let row = plane[i * w..].as_ptr();
                let gv = unsafe {
                    [_mm512_maskz_loadu_ps(m.store[0], row), _mm512_maskz_loadu_ps(m.store[1], row.wrapping_add(LANES))]
                };
                for p in 0..3 {
                    let Some(y) = (i + p).checked_sub(1).filter(|&y| y < h) else { continue };
                    let src = image[y * w..].as_ptr();
                    for q in 0..3 {
                        for half in 0..2 {
                            let v = unsafe { shifted(src, half, q, m) };
                            acc[p * 3 + q][half] = _mm512_fmadd_ps(gv[half], v, acc[p * 3 + q][half]);
                        }
                    }
                }
            }
        }
        for (v, acc) in g.iter_mut().zip(acc) {
            *v = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::conv2d::{check_passes_against_reference, check_thread_count_independence, FastPath};

    const PATH: FastPath<f32> = FastPath { forward, backward_data, backward_weight };

    /// The VAE's layers at small batches (the conv VAE's first and last, conv-bn's last),
    /// and odd shapes: rows of 1, 13, 16, 17 and 32 pixels, heights not a multiple of the
    /// row block, one channel on both sides, batches that leave groups uneven.
    #[test]
    fn every_pass_matches_the_reference() {
        if !crate::ops::avx512_tests_can_run("conv2d_one_channel") {
            return;
        }
        let shapes = [
            Conv2dDims::new(3, 1, 28, 28, 32, 3, 3, 1, 1),
            Conv2dDims::new(2, 32, 28, 28, 1, 3, 3, 1, 1),
            Conv2dDims::new(17, 1, 7, 13, 5, 3, 3, 1, 1),
            Conv2dDims::new(5, 6, 9, 17, 1, 3, 3, 1, 1),
            Conv2dDims::new(2, 3, 5, 32, 1, 3, 3, 1, 1),
            Conv2dDims::new(33, 1, 6, 16, 2, 3, 3, 1, 1),
            Conv2dDims::new(4, 1, 3, 1, 1, 3, 3, 1, 1),
        ];
        assert!(shapes.iter().all(suits));
        check_passes_against_reference(PATH, &shapes, 2e-6, 11);
    }

    /// The same bits whatever the number of threads.
    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        if !crate::ops::avx512_tests_can_run("conv2d_one_channel") {
            return;
        }
        check_thread_count_independence(PATH, Conv2dDims::new(37, 1, 12, 12, 8, 3, 3, 1, 1));
        check_thread_count_independence(PATH, Conv2dDims::new(37, 8, 12, 12, 1, 3, 3, 1, 1));
    }
}
