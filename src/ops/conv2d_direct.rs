//! `conv2d`'s direct CPU path for layers with one output channel (a decoder's last layer):
//! there the reference's im2col + GEMM is mostly data movement. A GEMM with one row (or a reduction of 9) cannot use its register tiles, and
//! im2col writes and reads k × l values per image (k = 288 for a 32-channel 3×3 layer, 900 KB
//! of columns per 28×28 image) to do 288 multiply-adds per pixel: `vae bench` had these
//! layers at 5 GFLOP/s, 10 ms per pass at batch 128: three passes, about a third of a conv-bn
//! step.
//!
//! Here each kernel tap is a multiply-add over a whole image plane. The input is
//! copied once per image into a zero-padded plane, split by stride into `s²` phase planes
//! (phase (a, b) holds the padded pixels at rows ≡ a and columns ≡ b mod s), so tap (p, q)
//! reads phase (p mod s, q mod s) at a fixed offset and every pass is a stride-1 loop over
//! contiguous memory: `acc[t] += w·src[offset + t]` for t over the output rows laid out at
//! the phase plane's pitch (the few columns past the output's width are computed and
//! dropped). The forward sums every tap for 32 outputs at a time in registers; the
//! backward passes scatter (data) or dot (weight) one tap at a time over the plane. For f32 and f64; compiled for AVX-512F, AVX2 or baseline x86-64, whichever
//! the CPU has (`widest!`), so laptops without AVX-512 take it too.
//!
//! Every pass is split into fixed groups of images, one task each, summed in a fixed order:
//! results do not depend on the thread count. `tests` checks each pass against the reference.

use rayon::prelude::*;

use super::conv2d::Conv2dDims;
use super::scratch;
use crate::tensor::Float;

/// Images are split into this many fixed groups, one task each (as in the reference).
const GROUPS: usize = 16;
/// Lanes of the weight gradient's dot products (4 AVX2 registers of f32): independent
/// sums, so the additions do not wait on each other, added in a fixed order at the end.
const LANES: usize = 32;

/// Whether the direct path takes these dims: one output channel. (It computes any dims, and
/// the tests check it on one input channel too, but there it did not beat the reference:
/// im2col of one channel is small and the GEMM's 32-row register tiles fit; measured side
/// by side, forward 4–10 ms against the reference's 3.7–5.2 at batch 128, on a shared
/// 2-core machine, so those layers stay on the reference.)
pub fn suits(d: &Conv2dDims) -> bool {
    d.c_out == 1
}

/// Where the phase planes put things.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    s: usize,
    /// Row pitch of a phase plane (and of the output accumulators): ⌈(w + 2·pad)/s⌉.
    pitch: usize,
    /// Elements of one phase plane, with room for the furthest tap's read of `len` values.
    plane: usize,
    /// Values each tap's loop runs over: oh rows at `pitch`, rounded up to `LANES`.
    len: usize,
}

impl Geometry {
    fn of(d: &Conv2dDims) -> Self {
        let s = d.stride;
        let rows = (d.h + 2 * d.pad).div_ceil(s);
        let pitch = (d.w + 2 * d.pad).div_ceil(s);
        let len = (d.oh * pitch).next_multiple_of(LANES);
        let plane = (rows * pitch).max(self_reach(d, pitch, len));
        Geometry { s, pitch, plane, len }
    }
    /// Where tap (p, q) reads in its channel's phase planes, `phase·plane + offset`, for every
    /// tap in (p, q) order: looked up in the inner loops, which would otherwise spend more
    /// time dividing by the stride than multiplying.
    fn taps(&self, d: &Conv2dDims) -> Vec<usize> {
        let mut v = Vec::with_capacity(d.kh * d.kw);
        for p in 0..d.kh {
            for q in 0..d.kw {
                let (phase, off) = ((p % self.s) * self.s + q % self.s, (p / self.s) * self.pitch + q / self.s);
                v.push(phase * self.plane + off);
            }
        }
        v
    }
    /// The phase plane and position of padded pixel (y', x').
    #[inline]
    fn at(&self, yp: usize, xp: usize) -> (usize, usize) {
        ((yp % self.s) * self.s + xp % self.s, (yp / self.s) * self.pitch + xp / self.s)
    }
    /// Elements of the phase planes of `channels` channels.
    fn planes(&self, channels: usize) -> usize {
        channels * self.s * self.s * self.plane
    }
}

/// The furthest element a tap reads, plus one.
fn self_reach(d: &Conv2dDims, pitch: usize, len: usize) -> usize {
    ((d.kh - 1) / d.stride) * pitch + (d.kw - 1) / d.stride + len
}

/// Images per group and the number of groups.
fn groups(d: &Conv2dDims) -> (usize, usize) {
    let per = d.n.div_ceil(GROUPS).max(1);
    (per, d.n.div_ceil(per))
}

/// One image's channels as zero-padded phase planes: `ph[(c·s² + phase)·plane + pos]`.
#[inline(always)]
fn split_phases<E: Float>(x: &[E], channels: usize, d: &Conv2dDims, g: &Geometry, ph: &mut [E]) {
    let ph = &mut ph[..g.planes(channels)];
    ph.fill(E::zero());
    let per_channel = g.s * g.s * g.plane;
    for c in 0..channels {
        let planes = &mut ph[c * per_channel..][..per_channel];
        for y in 0..d.h {
            let row = &x[(c * d.h + y) * d.w..][..d.w];
            if g.s == 1 {
                let (_, at) = g.at(y + d.pad, d.pad);
                planes[at..at + d.w].copy_from_slice(row);
            } else {
                for (xx, &v) in row.iter().enumerate() {
                    let (phase, at) = g.at(y + d.pad, xx + d.pad);
                    planes[phase * g.plane + at] = v;
                }
            }
        }
    }
}

/// One image's gradient planes laid out at the phase pitch, zero past each row and after
/// the last: `out[o·len + i·pitch + j] = dy[o, i, j]`.
#[inline(always)]
fn spread_rows<E: Float>(dy: &[E], channels: usize, d: &Conv2dDims, g: &Geometry, out: &mut [E]) {
    let out = &mut out[..channels * g.len];
    out.fill(E::zero());
    for o in 0..channels {
        for i in 0..d.oh {
            out[o * g.len + i * g.pitch..][..d.ow].copy_from_slice(&dy[(o * d.oh + i) * d.ow..][..d.ow]);
        }
    }
}

/// acc += w·src over equal lengths (one kernel tap over a plane).
#[inline(always)]
fn axpy<E: Float>(acc: &mut [E], w: E, src: &[E]) {
    for (a, &v) in acc.iter_mut().zip(src) {
        *a += w * v;
    }
}

/// lanes[l] += Σ_t a[t·LANES + l]·b[t·LANES + l] (lengths a multiple of `LANES`), the
/// lanes held in registers for the whole pass.
#[inline(always)]
fn dot_lanes<E: Float>(lanes: &mut [E; LANES], a: &[E], b: &[E]) {
    let mut acc = *lanes;
    for (ca, cb) in a.as_chunks::<LANES>().0.iter().zip(b.as_chunks::<LANES>().0) {
        for l in 0..LANES {
            acc[l] += ca[l] * cb[l];
        }
    }
    *lanes = acc;
}

#[inline(always)]
fn weight_at(d: &Conv2dDims, o: usize, c: usize, p: usize, q: usize) -> usize {
    ((o * d.c_in + c) * d.kh + p) * d.kw + q
}

/// Runs `$body` (a call of an `#[inline(always)]` function) compiled for AVX-512F when the
/// CPU has it and AVX-512 is not switched off, else for AVX2 when it has that, else for
/// baseline x86-64. The body is inlined into each feature-enabled frame, so its loops are
/// compiled 16, 8 or 4 wide. No FMA is enabled: a·b + c is never contracted, so results are
/// the same bits on every machine.
macro_rules! widest {
    ($body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2,avx512f")]
            unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            #[target_feature(enable = "avx2")]
            unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            match crate::ops::widest_simd() {
                // SAFETY: the CPU was checked to support each feature set.
                crate::ops::Simd::Avx512 => unsafe { avx512(|| $body) },
                crate::ops::Simd::Avx2 => unsafe { avx2(|| $body) },
                crate::ops::Simd::Baseline => $body,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $body
        }
    }};
}

/// y = conv2d(x, w) + b, overwriting y.
pub fn forward<E: Float>(x: &[E], w: &[E], b: Option<&[E]>, y: &mut [E], d: &Conv2dDims) {
    assert!(x.len() == d.x_len() && w.len() == d.w_len() && y.len() == d.y_len(), "conv2d_direct: lengths");
    let g = Geometry::of(d);
    let taps = g.taps(d);
    let (per, _) = groups(d);
    let (chw, l) = (d.c_in * d.h * d.w, d.oh * d.ow);
    y.par_chunks_mut(per * d.c_out * l).zip(x.par_chunks(per * chw)).for_each(|(yg, xg)| {
        scratch::with(g.planes(d.c_in) + g.len, |buf: &mut [E]| widest!(forward_group(xg, w, b, yg, d, &g, &taps, buf)))
    });
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward_group<E: Float>(
    xg: &[E],
    w: &[E],
    b: Option<&[E]>,
    yg: &mut [E],
    d: &Conv2dDims,
    g: &Geometry,
    taps: &[usize],
    buf: &mut [E],
) {
    let (chw, l) = (d.c_in * d.h * d.w, d.oh * d.ow);
    let (ph, acc) = buf.split_at_mut(g.planes(d.c_in));
    for (yn, xn) in yg.chunks_exact_mut(d.c_out * l).zip(xg.chunks_exact(chw)) {
        split_phases(xn, d.c_in, d, g, ph);
        for o in 0..d.c_out {
            // `LANES` outputs at a time, summed over every tap in registers and stored once.
            for (t0, out) in acc.as_chunks_mut::<LANES>().0.iter_mut().enumerate() {
                let mut sum = [E::zero(); LANES];
                for c in 0..d.c_in {
                    for p in 0..d.kh {
                        for q in 0..d.kw {
                            let at = c * g.s * g.s * g.plane + taps[p * d.kw + q] + t0 * LANES;
                            let src: &[E; LANES] = ph[at..at + LANES].try_into().expect("LANES values");
                            let wv = w[weight_at(d, o, c, p, q)];
                            for u in 0..LANES {
                                sum[u] += wv * src[u];
                            }
                        }
                    }
                }
                *out = sum;
            }
            for i in 0..d.oh {
                let dst = &mut yn[(o * d.oh + i) * d.ow..][..d.ow];
                match b {
                    Some(b) => {
                        for (v, &a) in dst.iter_mut().zip(&acc[i * g.pitch..]) {
                            *v = a + b[o];
                        }
                    }
                    None => dst.copy_from_slice(&acc[i * g.pitch..][..d.ow]),
                }
            }
        }
    }
}

/// dx += the gradient of conv2d with respect to its input: each tap of dy scattered into
/// the input's phase planes, then the planes' inner pixels added into dx.
pub fn backward_data<E: Float>(dy: &[E], w: &[E], dx: &mut [E], d: &Conv2dDims) {
    assert!(dx.len() == d.x_len() && w.len() == d.w_len() && dy.len() == d.y_len(), "conv2d_direct: lengths");
    let g = Geometry::of(d);
    let taps = g.taps(d);
    let (per, _) = groups(d);
    let (chw, l) = (d.c_in * d.h * d.w, d.oh * d.ow);
    dx.par_chunks_mut(per * chw).zip(dy.par_chunks(per * d.c_out * l)).for_each(|(dxg, dyg)| {
        scratch::with(g.planes(1) + d.c_out * g.len, |buf: &mut [E]| {
            widest!(backward_data_group(dyg, w, dxg, d, &g, &taps, buf))
        })
    });
}

#[inline(always)]
fn backward_data_group<E: Float>(
    dyg: &[E],
    w: &[E],
    dxg: &mut [E],
    d: &Conv2dDims,
    g: &Geometry,
    taps: &[usize],
    buf: &mut [E],
) {
    let (chw, l) = (d.c_in * d.h * d.w, d.oh * d.ow);
    let (ph, rows) = buf.split_at_mut(g.planes(1));
    for (dxn, dyn_) in dxg.chunks_exact_mut(chw).zip(dyg.chunks_exact(d.c_out * l)) {
        spread_rows(dyn_, d.c_out, d, g, rows);
        for c in 0..d.c_in {
            ph.fill(E::zero());
            for o in 0..d.c_out {
                let src = &rows[o * g.len..][..g.len];
                for p in 0..d.kh {
                    for q in 0..d.kw {
                        axpy(&mut ph[taps[p * d.kw + q]..][..g.len], w[weight_at(d, o, c, p, q)], src);
                    }
                }
            }
            for yy in 0..d.h {
                let dst = &mut dxn[(c * d.h + yy) * d.w..][..d.w];
                if g.s == 1 {
                    let (_, at) = g.at(yy + d.pad, d.pad);
                    for (v, &a) in dst.iter_mut().zip(&ph[at..]) {
                        *v += a;
                    }
                } else {
                    for (xx, v) in dst.iter_mut().enumerate() {
                        let (phase, at) = g.at(yy + d.pad, xx + d.pad);
                        *v += ph[phase * g.plane + at];
                    }
                }
            }
        }
    }
}

/// dw += the gradient of conv2d with respect to its weight: per tap, the dot product of
/// dy's plane with the input's shifted phase plane, in `LANES` lanes summed over the group's
/// images; groups added in order.
pub fn backward_weight<E: Float>(dy: &[E], x: &[E], dw: &mut [E], d: &Conv2dDims) {
    assert!(x.len() == d.x_len() && dw.len() == d.w_len() && dy.len() == d.y_len(), "conv2d_direct: lengths");
    let g = Geometry::of(d);
    let taps = g.taps(d);
    let (per, count) = groups(d);
    let (chw, l) = (d.c_in * d.h * d.w, d.oh * d.ow);
    let partials: Vec<Vec<E>> = (0..count)
        .into_par_iter()
        .map(|gi| {
            let images = per.min(d.n - gi * per);
            let (xg, dyg) =
                (&x[gi * per * chw..][..images * chw], &dy[gi * per * d.c_out * l..][..images * d.c_out * l]);
            let mut lanes = vec![[E::zero(); LANES]; d.w_len()];
            scratch::with(g.planes(d.c_in) + d.c_out * g.len, |buf: &mut [E]| {
                widest!(backward_weight_group(dyg, xg, &mut lanes, d, &g, &taps, buf))
            });
            lanes.iter().map(|l| l.iter().fold(E::zero(), |s, &v| s + v)).collect()
        })
        .collect();
    for part in partials {
        dw.iter_mut().zip(&part).for_each(|(v, &p)| *v += p);
    }
}

#[inline(always)]
fn backward_weight_group<E: Float>(
    dyg: &[E],
    xg: &[E],
    lanes: &mut [[E; LANES]],
    d: &Conv2dDims,
    g: &Geometry,
    taps: &[usize],
    buf: &mut [E],
) {
    let (chw, l) = (d.c_in * d.h * d.w, d.oh * d.ow);
    let (ph, rows) = buf.split_at_mut(g.planes(d.c_in));
    for (xn, dyn_) in xg.chunks_exact(chw).zip(dyg.chunks_exact(d.c_out * l)) {
        split_phases(xn, d.c_in, d, g, ph);
        spread_rows(dyn_, d.c_out, d, g, rows);
        for o in 0..d.c_out {
            let a = &rows[o * g.len..][..g.len];
            for c in 0..d.c_in {
                for p in 0..d.kh {
                    for q in 0..d.kw {
                        let b = &ph[c * g.s * g.s * g.plane + taps[p * d.kw + q]..][..g.len];
                        dot_lanes(&mut lanes[weight_at(d, o, c, p, q)], a, b);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::conv2d::{check_passes_against_reference, check_thread_count_independence, FastPath};

    fn path<E: Float>() -> FastPath<E> {
        FastPath { forward: forward::<E>, backward_data: backward_data::<E>, backward_weight: backward_weight::<E> }
    }

    /// The VAE's one-channel layers (the last, and the first that stays on the reference but
    /// that this path computes as well; stride 1 and 2) at small batches, and
    /// odd shapes: non-square images and kernels, padding 0 to 2, stride 1 to 3, batches
    /// that leave groups uneven.
    fn shapes() -> Vec<Conv2dDims> {
        vec![
            Conv2dDims::new(3, 1, 28, 28, 32, 3, 3, 1, 1),
            Conv2dDims::new(3, 1, 28, 28, 32, 3, 3, 2, 1),
            Conv2dDims::new(2, 32, 28, 28, 1, 3, 3, 1, 1),
            Conv2dDims::new(17, 1, 9, 7, 5, 3, 2, 2, 0),
            Conv2dDims::new(5, 6, 11, 13, 1, 4, 4, 3, 2),
            Conv2dDims::new(1, 1, 5, 5, 1, 5, 5, 1, 2),
            Conv2dDims::new(33, 3, 6, 5, 1, 2, 3, 2, 1),
        ]
    }

    /// Each pass against the reference (see `check_passes_against_reference` for the
    /// tolerances).
    #[test]
    fn every_pass_matches_the_reference_f32() {
        check_passes_against_reference(path::<f32>(), &shapes(), 2e-6, 9);
    }

    #[test]
    fn every_pass_matches_the_reference_f64() {
        check_passes_against_reference(path::<f64>(), &shapes(), 1e-14, 9);
    }

    /// The same bits whatever the number of threads.
    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        check_thread_count_independence(path::<f32>(), Conv2dDims::new(37, 8, 12, 12, 1, 3, 3, 1, 1));
    }
}
