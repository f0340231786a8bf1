//! `conv2d`'s direct AVX-512 path for the VAEs' downsampling layers: 3×3 kernels, stride 2,
//! padding 1, even input sizes (so the output is exactly half the input each way). All three
//! passes; a transposed convolution runs them as its backward-data, forward and weight.
//!
//! `conv2d_avx512` lowers these layers to a product of an im2col panel and the weights, and
//! builds the panel with masked gathers: on this VAE's stride-2 layers the gathers and their
//! offsets took as long as half the products (4.9 of 13.8 ms for `32×28×28 → 64`, one
//! thread). Here nothing is packed but the weights: the register tile vectorizes over 32
//! output channels and reads the input one value at a time, broadcast to all lanes. With a
//! stride of 2 the values an output row needs sit at fixed distances (2·jj + q) from one
//! row pointer, so each is one broadcast load, with no index arithmetic and no gather.
//!
//! | pass | lanes | register tile | reduction over |
//! |---|---|---|---|
//! | forward | 32 output channels | R pixels of one output row (R = 8, 7 or 4) | c_in·3·3 |
//! | backward-weight | 32 output channels | the 9 taps of one input channel | one image's pixels |
//! | backward-data | 16 input channels | R even and R odd pixels of one input row | c_out × the row's taps |
//!
//! The forward sums over c, p, q in turn, as the im2col path's register tile does, with the
//! padding's taps left out rather than multiplied by zero. The other two round in another
//! order than that path: the weight sums each image's pixels, then adds the images in turn
//! (where it ran on through the group's pixels); backward-data sums over output channels
//! outermost (where it summed each tap's products first). Work is split by fixed groups of
//! images, so results do not depend on the thread count.

use std::arch::x86_64::*;

use rayon::prelude::*;

use super::conv2d::Conv2dDims;
use super::conv2d_avx512::{add_partials, give, groups, take};

/// Output channels per register tile: two 16-lane registers.
const OC: usize = 32;

/// Whether this CPU can run the path.
pub fn available() -> bool {
    crate::ops::widest_simd() == crate::ops::Simd::Avx512
}

/// Whether the path takes these dims: 3×3, stride 2, padding 1, even height and width (so
/// every window's right and bottom taps lie inside the image), an output row that splits
/// into tiles of 8, 7 or 4 pixels, and at least 16 output channels (a tile computes 32;
/// fewer would be mostly padding). Offsets are computed in `usize`, so no size limit beyond
/// the slices'.
pub fn suits(d: &Conv2dDims) -> bool {
    d.stride == 2
        && d.pad == 1
        && (d.kh, d.kw) == (3, 3)
        && d.h.is_multiple_of(2)
        && d.w.is_multiple_of(2)
        && row_tile(d.ow).is_some()
        && d.c_out >= 16
}

/// Pixels per forward tile: the first of 8, 7, 4 that divides the output row. (14 pixels
/// would need 28 accumulators, 2 weight and 1 broadcast register: 31 of 32, and LLVM kept
/// some accumulators in memory.)
fn row_tile(ow: usize) -> Option<usize> {
    [8, 7, 4].into_iter().find(|&r| ow.is_multiple_of(r))
}

/// y = conv2d(x, w) + b, overwriting y.
pub fn forward(x: &[f32], w: &[f32], b: Option<&[f32]>, y: &mut [f32], d: &Conv2dDims) {
    assert!(available() && suits(d), "conv2d_stride2::forward: {d:?} is not for this path or CPU");
    assert!(x.len() == d.x_len() && w.len() == d.w_len() && y.len() == d.y_len(), "conv2d_stride2: lengths");
    match row_tile(d.ow) {
        Some(8) => forward_r::<8>(x, w, b, y, d),
        Some(7) => forward_r::<7>(x, w, b, y, d),
        _ => forward_r::<4>(x, w, b, y, d),
    }
}

/// The weights as blocks of 32 output channels: `[block][c][p][q][lane] = w[block·32 + lane,
/// c, p, q]`, zero past `c_out`.
fn pack_forward_weights(w: &[f32], d: &Conv2dDims) -> Vec<f32> {
    let k = d.c_in * 9;
    let blocks = d.c_out.div_ceil(OC);
    let mut packed = take(blocks * k * OC);
    packed.truncate(blocks * k * OC);
    packed.fill(0.0);
    for (o, filter) in w.chunks_exact(k).enumerate() {
        let block = &mut packed[(o / OC) * k * OC..];
        for (t, &v) in filter.iter().enumerate() {
            block[t * OC + o % OC] = v;
        }
    }
    packed
}

fn forward_r<const R: usize>(x: &[f32], w: &[f32], b: Option<&[f32]>, y: &mut [f32], d: &Conv2dDims) {
    let (k, l, chw) = (d.c_in * 9, d.oh * d.ow, d.c_in * d.h * d.w);
    let packed = pack_forward_weights(w, d);
    let (per, _) = groups(d);
    y.par_chunks_mut(per * d.c_out * l).zip(x.par_chunks(per * chw)).for_each(|(yg, xg)| {
        let mut out = [[0.0f32; OC]; R];
        // Block outermost: its weights (k·32 floats) stay in cache across the group's rows.
        for (block, wb) in packed.chunks_exact(k * OC).enumerate() {
            let channels = OC.min(d.c_out - block * OC);
            for (n, xn) in xg.chunks_exact(chw).enumerate() {
                for i in 0..d.oh {
                    for j0 in (0..d.ow).step_by(R) {
                        // SAFETY: `available()` was asserted; `forward_tile` checks its bounds.
                        unsafe {
                            if j0 == 0 {
                                forward_tile::<R, true>(xn, wb, i, j0, d, &mut out);
                            } else {
                                forward_tile::<R, false>(xn, wb, i, j0, d, &mut out);
                            }
                        }
                        for lane in 0..channels {
                            let o = block * OC + lane;
                            let bias = b.map_or(0.0, |b| b[o]);
                            let dst = &mut yg[(n * d.c_out + o) * l + i * d.ow + j0..][..R];
                            for (v, px) in dst.iter_mut().zip(&out) {
                                *v = px[lane] + bias;
                            }
                        }
                    }
                }
            }
        }
    });
    give(packed);
}

/// out[jj][lane] = Σ_{c,p,q} wb[c][p][q][lane] · x[c, 2i − 1 + p, 2(j0 + jj) − 1 + q] over the
/// taps inside the image, for the R pixels j0.. of output row i: 2·R accumulators, one
/// broadcast per input value. `LEFT` is `j0 == 0`, where the first pixel's q = 0 tap lies in
/// the padding; rows in the padding are skipped whole; the right and bottom taps are always
/// inside (even sizes, see `suits`).
#[target_feature(enable = "avx512f")]
unsafe fn forward_tile<const R: usize, const LEFT: bool>(
    xn: &[f32],
    wb: &[f32],
    i: usize,
    j0: usize,
    d: &Conv2dDims,
    out: &mut [[f32; OC]; R],
) {
    let (h, w) = (d.h, d.w);
    assert!(xn.len() == d.c_in * h * w && wb.len() == d.c_in * 9 * OC);
    assert!(i < d.oh && j0 + R <= d.ow && 2 * d.oh == h && 2 * d.ow == w && LEFT == (j0 == 0));
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for c in 0..d.c_in {
        for p in 0..3 {
            let Some(yy) = (2 * i + p).checked_sub(1).filter(|&yy| yy < h) else { continue };
            // x[c, yy, 2·j0 − 1 + m] is row[m]; m = 0 is read only when j0 > 0 (`LEFT`).
            let row = &xn[c * h * w + yy * w..][..w];
            for q in 0..3 {
                // SAFETY: the block holds c_in·9 rows of 32 (asserted).
                let (w0, w1) = unsafe {
                    let wk = wb.as_ptr().add(((c * 3 + p) * 3 + q) * OC);
                    (_mm512_loadu_ps(wk), _mm512_loadu_ps(wk.add(16)))
                };
                for (jj, acc) in acc.iter_mut().enumerate() {
                    if LEFT && q == 0 && jj == 0 {
                        continue;
                    }
                    // 2(j0 + jj) − 1 + q ≤ 2·ow − 1 < w, and ≥ 0 unless skipped above.
                    // SAFETY: that index lies inside the row.
                    let xv = _mm512_set1_ps(unsafe { *row.get_unchecked(2 * (j0 + jj) + q - 1) });
                    acc[0] = _mm512_fmadd_ps(xv, w0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(xv, w1, acc[1]);
                }
            }
        }
    }
    for (px, acc) in out.iter_mut().zip(acc) {
        // SAFETY: each pixel's row holds 32 floats.
        unsafe {
            _mm512_storeu_ps(px.as_mut_ptr(), acc[0]);
            _mm512_storeu_ps(px.as_mut_ptr().add(16), acc[1]);
        }
    }
}

/// Whether backward-data takes these dims: those of `suits`, with at least 16 input
/// channels (its tile computes 16).
pub fn suits_backward_data(d: &Conv2dDims) -> bool {
    suits(d) && d.c_in >= 16
}

/// dx += the gradient of conv2d with respect to its input.
pub fn backward_data(dy: &[f32], w: &[f32], dx: &mut [f32], d: &Conv2dDims) {
    assert!(available() && suits_backward_data(d), "conv2d_stride2::backward_data: {d:?} is not for this path or CPU");
    assert!(dx.len() == d.x_len() && w.len() == d.w_len() && dy.len() == d.y_len(), "conv2d_stride2: lengths");
    match row_tile(d.ow) {
        Some(8) => backward_data_r::<8>(dy, w, dx, d),
        Some(7) => backward_data_r::<7>(dy, w, dx, d),
        _ => backward_data_r::<4>(dy, w, dx, d),
    }
}

/// Input channels per backward-data tile: one 16-lane register.
const IC: usize = 16;

/// The weights as blocks of 16 input channels: `[block][o][p][q][lane] = w[o, block·16 +
/// lane, p, q]`, zero past `c_in`.
fn pack_backward_data_weights(w: &[f32], d: &Conv2dDims) -> Vec<f32> {
    let blocks = d.c_in.div_ceil(IC);
    let block_len = d.c_out * 9 * IC;
    let mut packed = take(blocks * block_len);
    packed.truncate(blocks * block_len);
    packed.fill(0.0);
    for (o, filter) in w.chunks_exact(d.c_in * 9).enumerate() {
        for (c, taps) in filter.chunks_exact(9).enumerate() {
            let dst = &mut packed[(c / IC) * block_len + o * 9 * IC + c % IC..];
            for (t, &v) in taps.iter().enumerate() {
                dst[t * IC] = v;
            }
        }
    }
    packed
}

fn backward_data_r<const R: usize>(dy: &[f32], w: &[f32], dx: &mut [f32], d: &Conv2dDims) {
    let (l, chw, hw) = (d.oh * d.ow, d.c_in * d.h * d.w, d.h * d.w);
    let packed = pack_backward_data_weights(w, d);
    let (per, _) = groups(d);
    dx.par_chunks_mut(per * chw).zip(dy.par_chunks(per * d.c_out * l)).for_each(|(dxg, dyg)| {
        let mut out = [[0.0f32; 16]; IC];
        for (block, wb) in packed.chunks_exact(d.c_out * 9 * IC).enumerate() {
            let channels = IC.min(d.c_in - block * IC);
            for (dxn, dyn_) in dxg.chunks_exact_mut(chw).zip(dyg.chunks_exact(d.c_out * l)) {
                for y in 0..d.h {
                    for b0 in (0..d.ow).step_by(R) {
                        // SAFETY: `available()` was asserted; `data_tile` checks its bounds.
                        unsafe {
                            if b0 + R == d.ow {
                                data_tile::<R, true>(dyn_, wb, y, b0, d, &mut out);
                            } else {
                                data_tile::<R, false>(dyn_, wb, y, b0, d, &mut out);
                            }
                        }
                        for (lane, px) in out.iter().enumerate().take(channels) {
                            let c = block * IC + lane;
                            let dst = &mut dxn[c * hw + y * d.w + 2 * b0..][..2 * R];
                            dst.iter_mut().zip(px).for_each(|(v, &g)| *v += g);
                        }
                    }
                }
            }
        }
    });
    give(packed);
}

/// out[lane][xx] = Σ_{o,p,q} wb[o][p][q][lane] · dy[o, i, j] over the (p, q, i, j) with
/// 2i − 1 + p = y and 2j − 1 + q = 2·b0 + xx inside the output, for the 2·R input pixels
/// 2·b0.. of input row y (the input gradient of 16 channels). The stride splits the pixels
/// by parity: an even row takes tap p = 1 from output row y/2, an odd row p = 0 from row
/// (y + 1)/2 (when there is one) and p = 2 from row (y − 1)/2; likewise columns with q. The
/// even and odd pixels of the tile are 2·R accumulators; each dy value is broadcast once for
/// the up to three taps that read it. `RIGHT` is `b0 + R == ow`, where the last odd pixel's
/// q = 0 tap falls past the output.
#[target_feature(enable = "avx512f")]
unsafe fn data_tile<const R: usize, const RIGHT: bool>(
    dyn_: &[f32],
    wb: &[f32],
    y: usize,
    b0: usize,
    d: &Conv2dDims,
    out: &mut [[f32; 16]; IC],
) {
    let (oh, ow) = (d.oh, d.ow);
    assert!(dyn_.len() == d.c_out * oh * ow && wb.len() == d.c_out * 9 * IC && 2 * R <= 16);
    assert!(y < d.h && b0 + R <= ow && 2 * oh == d.h && 2 * ow == d.w && RIGHT == (b0 + R == ow));
    // (p, output row i) of the row's taps: one for an even row, two for an odd one.
    let row_taps = if y.is_multiple_of(2) {
        [Some((1, y / 2)), None]
    } else {
        [Some((0, y.div_ceil(2))).filter(|&(_, i)| i < oh), Some((2, y / 2))]
    };
    let mut even = [_mm512_setzero_ps(); R];
    let mut odd = [_mm512_setzero_ps(); R];
    for o in 0..d.c_out {
        for &(p, i) in row_taps.iter().flatten() {
            let row = &dyn_[(o * oh + i) * ow..][..ow];
            // SAFETY: the block holds c_out·9 rows of 16 (asserted).
            let [w0, w1, w2] = unsafe {
                let wk = wb.as_ptr().add((o * 9 + p * 3) * IC);
                [_mm512_loadu_ps(wk), _mm512_loadu_ps(wk.add(IC)), _mm512_loadu_ps(wk.add(2 * IC))]
            };
            for bb in 0..R {
                // SAFETY: b0 + bb < ow.
                let v = _mm512_set1_ps(unsafe { *row.get_unchecked(b0 + bb) });
                // x = 2b: q = 1, j = b. x = 2b + 1: q = 2, j = b; and q = 0, j = b + 1 (below).
                even[bb] = _mm512_fmadd_ps(v, w1, even[bb]);
                odd[bb] = _mm512_fmadd_ps(v, w2, odd[bb]);
                if !(RIGHT && bb + 1 == R) {
                    // SAFETY: b0 + bb + 1 < ow unless this is the right edge's last pixel.
                    let next = _mm512_set1_ps(unsafe { *row.get_unchecked(b0 + bb + 1) });
                    odd[bb] = _mm512_fmadd_ps(next, w0, odd[bb]);
                }
            }
        }
    }
    // Pixels in x order (rows past 2·R zero), turned to channels: out[lane] is 16 pixels.
    let mut pixels = [_mm512_setzero_ps(); 16];
    for (bb, (e, od)) in even.into_iter().zip(odd).enumerate() {
        (pixels[2 * bb], pixels[2 * bb + 1]) = (e, od);
    }
    // SAFETY: AVX-512F is enabled here.
    let channels = unsafe { transpose_16x16(pixels) };
    for (lane, v) in out.iter_mut().zip(channels) {
        // SAFETY: each lane's row holds 16 floats.
        unsafe { _mm512_storeu_ps(lane.as_mut_ptr(), v) };
    }
}

/// The transpose of a 16 × 16 block of floats held as 16 registers (rows in, columns out):
/// 32-bit then 64-bit interleaves within 128-bit lanes, then two rounds of 128-bit lane
/// shuffles, 64 shuffles in all. It replaced backward-data's scalar transposing add, a
/// quarter of that pass.
///
/// # Safety
/// The CPU has AVX-512F (inlined into an AVX-512 caller).
#[inline(always)]
unsafe fn transpose_16x16(r: [__m512; 16]) -> [__m512; 16] {
    // SAFETY: as the caller promises.
    unsafe {
        // t[2k], t[2k+1]: rows 2k and 2k+1 interleaved; per 128-bit lane L, columns 4L, 4L+1
        // and 4L+2, 4L+3.
        let mut t = [_mm512_setzero_ps(); 16];
        for k in 0..8 {
            t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
            t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
        }
        // u[4k + c]: per 128-bit lane L, column 4L + c of rows 4k..4k + 3.
        let mut u = [_mm512_setzero_ps(); 16];
        for k in 0..4 {
            let pd = |v: __m512| _mm512_castps_pd(v);
            let (a, b, c, d) = (pd(t[4 * k]), pd(t[4 * k + 1]), pd(t[4 * k + 2]), pd(t[4 * k + 3]));
            u[4 * k] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
            u[4 * k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
            u[4 * k + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
            u[4 * k + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
        }
        // Column 4L + c is lane L of u[c], u[4 + c], u[8 + c], u[12 + c]: a 4 × 4 transpose
        // of 128-bit lanes.
        let mut out = [_mm512_setzero_ps(); 16];
        for c in 0..4 {
            let s0 = _mm512_shuffle_f32x4::<0x44>(u[c], u[4 + c]); // A0 A1 B0 B1
            let s1 = _mm512_shuffle_f32x4::<0xEE>(u[c], u[4 + c]); // A2 A3 B2 B3
            let s2 = _mm512_shuffle_f32x4::<0x44>(u[8 + c], u[12 + c]); // C0 C1 D0 D1
            let s3 = _mm512_shuffle_f32x4::<0xEE>(u[8 + c], u[12 + c]); // C2 C3 D2 D3
            out[c] = _mm512_shuffle_f32x4::<0x88>(s0, s2); // A0 B0 C0 D0
            out[4 + c] = _mm512_shuffle_f32x4::<0xDD>(s0, s2); // A1 B1 C1 D1
            out[8 + c] = _mm512_shuffle_f32x4::<0x88>(s1, s3);
            out[12 + c] = _mm512_shuffle_f32x4::<0xDD>(s1, s3);
        }
        out
    }
}

/// dw += the gradient of conv2d with respect to its weight.
pub fn backward_weight(dy: &[f32], x: &[f32], dw: &mut [f32], d: &Conv2dDims) {
    assert!(available() && suits(d), "conv2d_stride2::backward_weight: {d:?} is not for this path or CPU");
    assert!(x.len() == d.x_len() && dw.len() == d.w_len() && dy.len() == d.y_len(), "conv2d_stride2: lengths");
    let (k, l, chw) = (d.c_in * 9, d.oh * d.ow, d.c_in * d.h * d.w);
    let (per, count) = groups(d);
    let blocks = d.c_out.div_ceil(OC);
    let partials: Vec<Vec<f32>> = (0..count)
        .into_par_iter()
        .map(|gi| {
            let images = per.min(d.n - gi * per);
            let (xg, dyg) =
                (&x[gi * per * chw..][..images * chw], &dy[gi * per * d.c_out * l..][..images * d.c_out * l]);
            // dyt[n][block][pixel][lane] = dy[n, block·32 + lane, pixel]: the group's dy
            // with channels innermost, zero past c_out.
            let mut dyt = take(images * blocks * l * OC);
            dyt.truncate(images * blocks * l * OC);
            if !d.c_out.is_multiple_of(OC) {
                dyt.fill(0.0);
            }
            for n in 0..images {
                for o in 0..d.c_out {
                    let src = &dyg[(n * d.c_out + o) * l..][..l];
                    let dst = &mut dyt[((n * blocks + o / OC) * l) * OC + o % OC..];
                    for (pix, &v) in src.iter().enumerate() {
                        dst[pix * OC] = v;
                    }
                }
            }
            // A zero row stands in for the rows of the padding above the image.
            let mut zeros = take(d.w);
            zeros[..d.w].fill(0.0);
            // sums[c][block][tap][lane], summed image by image: one image's dy (l·32 floats a
            // block) stays in L1 while every input channel reads it. (Summing the whole group
            // in registers re-read the group's dy from L2 for every channel: 30% slower on
            // the 7×7 layer.)
            let mut sums = take(d.c_in * blocks * 9 * OC);
            sums.truncate(d.c_in * blocks * 9 * OC);
            sums.fill(0.0);
            for (xn, dyn_) in xg.chunks_exact(chw).zip(dyt.chunks_exact(blocks * l * OC)) {
                for (c, sums_c) in sums.chunks_exact_mut(blocks * 9 * OC).enumerate() {
                    for (dyb, taps) in dyn_.chunks_exact(l * OC).zip(sums_c.chunks_exact_mut(9 * OC)) {
                        // SAFETY: `available()` was asserted; `weight_taps` checks its bounds.
                        unsafe { weight_taps(xn, dyb, c, d, &zeros[..d.w], taps) };
                    }
                }
            }
            let mut part = take(d.c_out * k);
            part.truncate(d.c_out * k);
            for (c, sums_c) in sums.chunks_exact(blocks * 9 * OC).enumerate() {
                for (block, taps) in sums_c.chunks_exact(9 * OC).enumerate() {
                    for lane in 0..OC.min(d.c_out - block * OC) {
                        let dst = &mut part[(block * OC + lane) * k + c * 9..][..9];
                        for (t, v) in dst.iter_mut().enumerate() {
                            *v = taps[t * OC + lane];
                        }
                    }
                }
            }
            give(dyt);
            give(zeros);
            give(sums);
            part
        })
        .collect();
    add_partials(dw, partials);
}

/// taps[(p·3 + q)·32 + lane] += Σ_{i, j} dyb[(i, j)][lane] · x[c, 2i − 1 + p, 2j − 1 + q]
/// over one image: one input channel's 9 weight gradients for 32 output channels, summed in
/// 18 accumulators, then added to `taps`. Rows above the image read `zeros`; the left
/// padding's taps (j = 0, q = 0) are left out; the right and bottom taps are always inside
/// (see `suits`).
#[target_feature(enable = "avx512f")]
unsafe fn weight_taps(xn: &[f32], dyb: &[f32], c: usize, d: &Conv2dDims, zeros: &[f32], taps: &mut [f32]) {
    let (h, w, ow) = (d.h, d.w, d.ow);
    assert!(xn.len() == d.c_in * h * w && dyb.len() == d.oh * ow * OC && zeros.len() == w);
    assert!(c < d.c_in && 2 * d.oh == h && 2 * ow == w && ow > 0 && taps.len() == 9 * OC);
    let mut acc = [[_mm512_setzero_ps(); 2]; 9];
    let plane = &xn[c * h * w..][..h * w];
    for i in 0..d.oh {
        // Input rows 2i − 1, 2i, 2i + 1 (the first is the padding when i = 0). No closure
        // here: an out-of-line call would spill the 18 accumulators on every row.
        let rows = [
            if i == 0 { zeros } else { &plane[(2 * i - 1) * w..][..w] },
            &plane[2 * i * w..][..w],
            &plane[(2 * i + 1) * w..][..w],
        ];
        let dy_row = &dyb[i * ow * OC..][..ow * OC];
        // SAFETY: `available()` was asserted; j < ow and the rows hold w = 2·ow floats.
        unsafe {
            weight_pixel::<true>(&rows, dy_row, 0, &mut acc);
            for j in 1..ow {
                weight_pixel::<false>(&rows, dy_row, j, &mut acc);
            }
        }
    }
    for (tap, acc) in taps.chunks_exact_mut(OC).zip(acc) {
        // SAFETY: each tap's row holds 32 floats.
        unsafe {
            let (lo, hi) = (tap.as_mut_ptr(), tap.as_mut_ptr().add(16));
            _mm512_storeu_ps(lo, _mm512_add_ps(_mm512_loadu_ps(lo), acc[0]));
            _mm512_storeu_ps(hi, _mm512_add_ps(_mm512_loadu_ps(hi), acc[1]));
        }
    }
}

/// One pixel j of `weight_taps`: acc[p·3 + q] += x[row p][2j − 1 + q] · dy[j], for the taps
/// inside the image (`LEFT`: j = 0, whose q = 0 taps are the padding). Inlined into its
/// AVX-512 caller, so the accumulators stay in registers.
///
/// # Safety
/// The caller has AVX-512F, j < ow, `dy_row` holds ow·32 floats and each row 2·ow.
#[inline(always)]
unsafe fn weight_pixel<const LEFT: bool>(rows: &[&[f32]; 3], dy_row: &[f32], j: usize, acc: &mut [[__m512; 2]; 9]) {
    // SAFETY: as the caller promises.
    unsafe {
        let dy = dy_row.as_ptr().add(j * OC);
        let dyv = [_mm512_loadu_ps(dy), _mm512_loadu_ps(dy.add(16))];
        for (p, row) in rows.iter().enumerate() {
            for q in 0..3 {
                if LEFT && q == 0 {
                    continue;
                }
                // 2j − 1 + q ≤ 2·ow − 1, and ≥ 0 unless skipped above.
                let xv = _mm512_set1_ps(*row.get_unchecked(2 * j + q - 1));
                let acc = &mut acc[p * 3 + q];
                acc[0] = _mm512_fmadd_ps(xv, dyv[0], acc[0]);
                acc[1] = _mm512_fmadd_ps(xv, dyv[1], acc[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::conv2d::{check_passes_against_reference, check_thread_count_independence, FastPath};

    /// Backward-data on this path where it takes the shape (16 input channels or more), else
    /// the reference, so the shared check runs every pass on every shape.
    fn backward_data_or_reference(dy: &[f32], w: &[f32], dx: &mut [f32], d: &Conv2dDims) {
        if suits_backward_data(d) {
            backward_data(dy, w, dx, d)
        } else {
            crate::ops::conv2d::reference_backward_data(dy, w, dx, *d)
        }
    }

    /// The shapes: the conv VAE's two stride-2 layers (tiles of 7 pixels), conv-bn's first
    /// (one input channel: backward-data on the reference), channels that leave a partial
    /// block (16 and 40 out, 17 in), several tiles per row with the left and right edges in
    /// only the first and last (ow 28 and 16), rows of 4 pixels, non-square images, one
    /// image, and more images than groups.
    fn shapes() -> Vec<Conv2dDims> {
        vec![
            Conv2dDims::new(3, 32, 28, 28, 64, 3, 3, 2, 1),
            Conv2dDims::new(2, 64, 14, 14, 128, 3, 3, 2, 1),
            Conv2dDims::new(2, 1, 28, 28, 32, 3, 3, 2, 1),
            Conv2dDims::new(1, 3, 56, 8, 40, 3, 3, 2, 1),
            Conv2dDims::new(2, 5, 32, 32, 16, 3, 3, 2, 1),
            Conv2dDims::new(19, 2, 8, 14, 33, 3, 3, 2, 1),
            Conv2dDims::new(3, 17, 12, 56, 32, 3, 3, 2, 1),
        ]
    }

    #[test]
    fn transpose_16x16_transposes() {
        if !crate::ops::avx512_tests_can_run("conv2d_stride2") {
            return;
        }
        let rows: [[f32; 16]; 16] = std::array::from_fn(|i| std::array::from_fn(|j| (i * 16 + j) as f32));
        #[target_feature(enable = "avx512f")]
        unsafe fn run(rows: &[[f32; 16]; 16]) -> [[f32; 16]; 16] {
            let r = std::array::from_fn(|i| unsafe { _mm512_loadu_ps(rows[i].as_ptr()) });
            let t = unsafe { transpose_16x16(r) };
            let mut out = [[0.0f32; 16]; 16];
            for (o, v) in out.iter_mut().zip(t) {
                unsafe { _mm512_storeu_ps(o.as_mut_ptr(), v) };
            }
            out
        }
        // SAFETY: AVX-512F was checked above.
        let cols = unsafe { run(&rows) };
        for (j, col) in cols.iter().enumerate() {
            for (i, &v) in col.iter().enumerate() {
                assert_eq!(v, rows[i][j], "column {j}, row {i}");
            }
        }
    }

    #[test]
    fn suits_only_its_layers() {
        let ok = Conv2dDims::new(1, 8, 28, 28, 32, 3, 3, 2, 1);
        assert!(suits(&ok));
        assert!(!suits(&Conv2dDims::new(1, 8, 28, 28, 32, 3, 3, 1, 1)), "stride 1");
        assert!(!suits(&Conv2dDims::new(1, 8, 27, 28, 32, 3, 3, 2, 1)), "odd height");
        assert!(!suits(&Conv2dDims::new(1, 8, 28, 28, 32, 4, 4, 2, 1)), "4x4 kernel");
        assert!(!suits(&Conv2dDims::new(1, 8, 28, 28, 8, 3, 3, 2, 1)), "8 output channels");
        assert!(!suits(&Conv2dDims::new(1, 8, 22, 22, 32, 3, 3, 2, 1)), "rows of 11 pixels");
        assert!(!suits_backward_data(&ok), "8 input channels");
        assert!(suits_backward_data(&Conv2dDims::new(1, 16, 28, 28, 32, 3, 3, 2, 1)));
    }

    /// Every pass against the reference (see `check_passes_against_reference` for the
    /// tolerance).
    #[test]
    fn every_pass_matches_the_reference() {
        if !crate::ops::avx512_tests_can_run("conv2d_stride2") {
            return;
        }
        let path = FastPath { forward, backward_data: backward_data_or_reference, backward_weight };
        check_passes_against_reference(path, &shapes(), 2e-6, 11);
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        if !crate::ops::avx512_tests_can_run("conv2d_stride2") {
            return;
        }
        let path = FastPath { forward, backward_data: backward_data_or_reference, backward_weight };
        check_thread_count_independence(path, Conv2dDims::new(19, 20, 14, 14, 40, 3, 3, 2, 1));
    }
}
