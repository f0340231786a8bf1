//! `conv2d`'s fast CPU path: f32 on x86-64 CPUs with AVX-512F. The math is the reference's
//! (im2col + GEMM, see `conv2d.rs`), and `tests` checks it against that reference; only the
//! way the work is laid out differs.
//!
//! The VAEs' 3×3 stride-2 layers now take `conv2d_stride2` instead, which needs no gathers;
//! this path serves the other layers with enough channels (stride 1, odd sizes, other
//! kernels).
//!
//! The reference builds each image's whole column matrix (k × l values, up to 450 KB) and
//! hands it to a general GEMM, which copies it once more into its own packed layout; on this
//! VAE's stride-2 layers that ran at 110–150 GFLOP/s, half of PyTorch's speed. Here the
//! column matrix is built 32 pixels at a time, straight into the layout the register kernel
//! reads (a "panel": for each reduction index, 32 consecutive values), and the kernel's
//! output tile goes straight to where it belongs: stored with the bias (forward), folded
//! back into dx (backward-data) or added into dW (backward-weight).
//!
//! One register kernel serves all three: `tile` computes an MR × 32 block of a product
//! `Σ_p A[p][r]·B[p][t]`, with the 32 columns in two 16-lane registers and MR rows broadcast,
//! so 2·MR accumulators stay in registers for the whole reduction. What A, B, rows and
//! columns are:
//!
//! | pass | rows (MR) | columns (32) | reduction over |
//! |---|---|---|---|
//! | forward | output channels | output pixels | c_in·kh·kw |
//! | backward-data | c_in·kh·kw | output pixels | output channels |
//! | backward-weight | output channels | c_in·kh·kw | output pixels |
//!
//! Pixels run across image boundaries, in fixed groups of images: the work is split by
//! group, so results do not depend on the thread count, and no two threads write the same dx.

use std::arch::x86_64::*;
use std::sync::Mutex;

use rayon::prelude::*;

use super::conv2d::Conv2dDims;

/// Columns of a register tile: two 16-lane registers.
const NR: usize = 32;
/// Images are split into this many fixed groups, one task each (as in the reference).
const GROUPS: usize = 16;

/// Buffers kept between calls. Each call needs a few hundred KB of scratch per group of
/// images; freshly allocated, that much comes from the OS as pages to be zeroed, and perf put
/// 40% of the time in the kernel's `clear_page`.
static SCRATCH: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// A scratch buffer of at least `len` floats. Its contents are left over from earlier use:
/// every caller writes what it reads, or clears it.
pub(super) fn take(len: usize) -> Vec<f32> {
    let mut v = SCRATCH.lock().unwrap_or_else(|p| p.into_inner()).pop().unwrap_or_default();
    if v.len() < len {
        v.resize(len, 0.0);
    }
    v
}

pub(super) fn give(v: Vec<f32>) {
    let mut pool = SCRATCH.lock().unwrap_or_else(|p| p.into_inner());
    if pool.len() < 4 * GROUPS {
        pool.push(v);
    }
}

/// Whether this CPU can run the fast path.
pub fn available() -> bool {
    crate::ops::widest_simd() == crate::ops::Simd::Avx512
}

/// Whether the fast path pays off for these dims, and can take them. The register tile is 8
/// or 12 rows by 32 columns, so a reduction or a side shorter than that is mostly padding: on
/// the VAE's 1-channel first and last layers the fast path was slower (forward 1.9 → 2.3 ms),
/// and they stay on the reference. Gather offsets are 32-bit, so a group of images must span
/// fewer than 2³¹ floats.
pub fn suits(d: &Conv2dDims) -> bool {
    let group_floats = groups(d).0 * (d.c_in * d.h * d.w).max(d.c_out * d.oh * d.ow);
    d.c_in * d.kh * d.kw >= NR && d.c_out >= 8 && group_floats <= i32::MAX as usize
}

/// y = conv2d(x, w) + b, overwriting y.
pub fn forward(x: &[f32], w: &[f32], b: Option<&[f32]>, y: &mut [f32], d: &Conv2dDims) {
    assert!(available(), "conv2d_avx512 called on a CPU without AVX-512F");
    assert!(x.len() == d.x_len() && w.len() == d.w_len() && y.len() == d.y_len(), "conv2d_avx512: lengths");
    match rows_per_tile(d.c_out) {
        12 => forward_mr::<12>(x, w, b, y, d),
        _ => forward_mr::<8>(x, w, b, y, d),
    }
}

/// dx += the gradient of conv2d with respect to its input.
pub fn backward_data(dy: &[f32], w: &[f32], dx: &mut [f32], d: &Conv2dDims) {
    assert!(available(), "conv2d_avx512 called on a CPU without AVX-512F");
    assert!(dx.len() == d.x_len() && w.len() == d.w_len() && dy.len() == d.y_len(), "conv2d_avx512: lengths");
    match rows_per_tile(d.c_in * d.kh * d.kw) {
        12 => backward_data_mr::<12>(dy, w, dx, d),
        _ => backward_data_mr::<8>(dy, w, dx, d),
    }
}

/// dw += the gradient of conv2d with respect to its weight.
pub fn backward_weight(dy: &[f32], x: &[f32], dw: &mut [f32], d: &Conv2dDims) {
    assert!(available(), "conv2d_avx512 called on a CPU without AVX-512F");
    assert!(x.len() == d.x_len() && dw.len() == d.w_len() && dy.len() == d.y_len(), "conv2d_avx512: lengths");
    match rows_per_tile(d.c_out) {
        12 => backward_weight_mr::<12>(dy, x, dw, d),
        _ => backward_weight_mr::<8>(dy, x, dw, d),
    }
}

/// 12 or 8 rows per tile, whichever pads `m` less (12 on a tie: fewer, longer tiles).
fn rows_per_tile(m: usize) -> usize {
    if m.next_multiple_of(12) <= m.next_multiple_of(8) {
        12
    } else {
        8
    }
}

/// out[r][t] = Σ_{p < kc} a[p·MR + r] · b[p·NR + t]: one MR × 32 tile, accumulated in 2·MR
/// registers (24 of the 32 for MR = 12), each row's value broadcast from memory.
#[target_feature(enable = "avx512f")]
unsafe fn tile<const MR: usize>(kc: usize, a: &[f32], b: &[f32], out: &mut [[f32; NR]; MR]) {
    assert!(a.len() >= kc * MR && b.len() >= kc * NR);
    let (a, b) = (a.as_ptr(), b.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for p in 0..kc {
        // SAFETY: p < kc and the assert above bound every read.
        let (b0, b1) = unsafe { (_mm512_loadu_ps(b.add(p * NR)), _mm512_loadu_ps(b.add(p * NR + 16))) };
        for (r, acc) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_ps(unsafe { *a.add(p * MR + r) });
            acc[0] = _mm512_fmadd_ps(av, b0, acc[0]);
            acc[1] = _mm512_fmadd_ps(av, b1, acc[1]);
        }
    }
    for (row, acc) in out.iter_mut().zip(acc) {
        // SAFETY: each row holds 32 floats.
        unsafe {
            _mm512_storeu_ps(row.as_mut_ptr(), acc[0]);
            _mm512_storeu_ps(row.as_mut_ptr().add(16), acc[1]);
        }
    }
}

/// A piece of one output row inside a panel: image `n` of the group, output row `i`,
/// columns `j0..j1`, starting at panel column `t`.
#[derive(Clone, Copy, Debug)]
struct Run {
    n: usize,
    i: usize,
    j0: usize,
    j1: usize,
    t: usize,
}

/// The runs of the panel that covers the group's pixels `g0..g0 + len` (pixels numbered
/// image by image, row by row).
fn runs_of(g0: usize, len: usize, d: &Conv2dDims, runs: &mut Vec<Run>) {
    runs.clear();
    let l = d.oh * d.ow;
    let (mut g, end) = (g0, g0 + len);
    while g < end {
        let (n, pix) = (g / l, g % l);
        let (i, j0) = (pix / d.ow, pix % d.ow);
        let j1 = (j0 + end - g).min(d.ow);
        runs.push(Run { n, i, j0, j1, t: g - g0 });
        g += j1 - j0;
    }
}

/// Weights as tiles of MR rows: `[tile][p][r] = w[(tile·MR + r)·k + p]` for the forward
/// (rows = output channels, reduction over k), or `w[p·k + tile·MR + r]` transposed for
/// backward-data (rows = k, reduction over output channels). Rows past the end are zero.
fn pack_weight<const MR: usize>(w: &[f32], c_out: usize, k: usize, transposed: bool) -> Vec<f32> {
    let (rows, red) = if transposed { (k, c_out) } else { (c_out, k) };
    let tiles = rows.div_ceil(MR);
    let mut a = take(tiles * red * MR);
    a.truncate(tiles * red * MR);
    a.fill(0.0);
    for row in 0..rows {
        for p in 0..red {
            let v = if transposed { w[p * k + row] } else { w[row * k + p] };
            a[((row / MR) * red + p) * MR + row % MR] = v;
        }
    }
    a
}

/// Images per group and the number of groups.
pub(super) fn groups(d: &Conv2dDims) -> (usize, usize) {
    let per = d.n.div_ceil(GROUPS).max(1);
    (per, d.n.div_ceil(per))
}

fn forward_mr<const MR: usize>(x: &[f32], w: &[f32], b: Option<&[f32]>, y: &mut [f32], d: &Conv2dDims) {
    let (k, l, chw) = (d.c_in * d.kh * d.kw, d.oh * d.ow, d.c_in * d.h * d.w);
    let a = pack_weight::<MR>(w, d.c_out, k, false);
    let (per, _) = groups(d);
    y.par_chunks_mut(per * d.c_out * l).zip(x.par_chunks(per * chw)).for_each(|(yg, xg)| {
        let pixels = yg.len() / d.c_out;
        let mut panel = take(k * NR);
        let (mut runs, mut taps) = (Vec::new(), Vec::new());
        let mut out = [[0.0f32; NR]; MR];
        for g0 in (0..pixels).step_by(NR) {
            runs_of(g0, NR.min(pixels - g0), d, &mut runs);
            tap_offsets(g0, NR.min(pixels - g0), d, &mut taps);
            // SAFETY: `available()` was asserted.
            unsafe { pack_columns(xg, &taps, d, &mut panel) };
            for (tile_i, a) in a.chunks_exact(k * MR).enumerate() {
                // SAFETY: `available()` was asserted; `a` and `panel` hold k rows each.
                unsafe { tile::<MR>(k, a, &panel, &mut out) };
                for (r, row) in out.iter().enumerate().take(d.c_out.saturating_sub(tile_i * MR)) {
                    let o = tile_i * MR + r;
                    let bias = b.map_or(0.0, |b| b[o]);
                    for run in &runs {
                        let dst = &mut yg[(run.n * d.c_out + o) * l + run.i * d.ow..][run.j0..run.j1];
                        for (v, &acc) in dst.iter_mut().zip(&row[run.t..]) {
                            *v = acc + bias;
                        }
                    }
                }
            }
        }
        give(panel);
    });
    give(a);
}

/// Where each of a panel's 32 pixels reads at one kernel tap (p, q): its offset in the
/// group's first channel plane (n·c_in·h·w + yy·w + xx), and a bit mask of the pixels whose
/// tap lands inside the image (the rest read the zero padding, or are past the panel's end).
/// The same offsets serve every input channel, c·h·w further on.
#[derive(Clone, Copy)]
struct TapOffsets {
    offset: [i32; NR],
    inside: u32,
}

/// The `TapOffsets` of every kernel tap, for the group's pixels `g0..g0 + len`.
fn tap_offsets(g0: usize, len: usize, d: &Conv2dDims, taps: &mut Vec<TapOffsets>) {
    let (l, chw) = (d.oh * d.ow, d.c_in * d.h * d.w);
    taps.clear();
    taps.resize(d.kh * d.kw, TapOffsets { offset: [0; NR], inside: 0 });
    for t in 0..len {
        let (n, pix) = ((g0 + t) / l, (g0 + t) % l);
        // The window's top-left corner, possibly in the padding.
        let (y0, x0) =
            ((pix / d.ow * d.stride) as isize - d.pad as isize, (pix % d.ow * d.stride) as isize - d.pad as isize);
        for p in 0..d.kh {
            let yy = y0 + p as isize;
            if yy < 0 || yy >= d.h as isize {
                continue;
            }
            for q in 0..d.kw {
                let xx = x0 + q as isize;
                if xx >= 0 && xx < d.w as isize {
                    let tap = &mut taps[p * d.kw + q];
                    tap.offset[t] = (n * chw) as i32 + (yy * d.w as isize + xx) as i32;
                    tap.inside |= 1 << t;
                }
            }
        }
    }
}

/// panel[(c, p, q)·32 + t] = x[n, c, i·s − pad + p, j·s − pad + q] for the panel's pixels
/// (0 in the padding): 32 columns of the group's im2col matrix, each row two masked gathers.
#[target_feature(enable = "avx512f")]
unsafe fn pack_columns(xg: &[f32], taps: &[TapOffsets], d: &Conv2dDims, panel: &mut [f32]) {
    let hw = d.h * d.w;
    assert!(panel.len() >= d.c_in * taps.len() * NR && xg.len() <= i32::MAX as usize);
    for c in 0..d.c_in {
        // SAFETY: every unmasked offset was computed inside image n of the group, so c·hw +
        // offset < xg.len(); the panel holds c_in·kh·kw rows of 32 (asserted).
        unsafe {
            let plane = xg.as_ptr().add(c * hw);
            for (tap_i, tap) in taps.iter().enumerate() {
                let dst = panel.as_mut_ptr().add((c * taps.len() + tap_i) * NR);
                for half in 0..2 {
                    let offsets = _mm512_loadu_epi32(tap.offset.as_ptr().add(16 * half));
                    let mask = (tap.inside >> (16 * half)) as u16;
                    let v = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, offsets, plane);
                    _mm512_storeu_ps(dst.add(16 * half), v);
                }
            }
        }
    }
}

/// dx[n, c, i·s − pad + p, j·s − pad + q] += col for one row (c, p, q) of the tile: the
/// adjoint of `pack_columns` (col2im). Within a row every pixel hits a different dx element,
/// so a gather-add-scatter of 16 lanes has no collisions.
#[target_feature(enable = "avx512f")]
unsafe fn fold_row(row: &[f32; NR], c: usize, tap: &TapOffsets, d: &Conv2dDims, dxg: &mut [f32]) {
    assert!(c < d.c_in && dxg.len() <= i32::MAX as usize);
    // SAFETY: as in `pack_columns`, every unmasked offset lies inside the group's dx.
    unsafe {
        let plane = dxg.as_mut_ptr().add(c * d.h * d.w);
        for half in 0..2 {
            let offsets = _mm512_loadu_epi32(tap.offset.as_ptr().add(16 * half));
            let mask = (tap.inside >> (16 * half)) as u16;
            let old = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, offsets, plane);
            let new = _mm512_add_ps(old, _mm512_loadu_ps(row.as_ptr().add(16 * half)));
            _mm512_mask_i32scatter_ps::<4>(plane, mask, offsets, new);
        }
    }
}

fn backward_data_mr<const MR: usize>(dy: &[f32], w: &[f32], dx: &mut [f32], d: &Conv2dDims) {
    let (k, l, chw) = (d.c_in * d.kh * d.kw, d.oh * d.ow, d.c_in * d.h * d.w);
    let a = pack_weight::<MR>(w, d.c_out, k, true);
    let (per, _) = groups(d);
    dx.par_chunks_mut(per * chw).zip(dy.par_chunks(per * d.c_out * l)).for_each(|(dxg, dyg)| {
        let pixels = dyg.len() / d.c_out;
        let mut panel = take(d.c_out * NR);
        let (mut runs, mut taps) = (Vec::new(), Vec::new());
        let mut out = [[0.0f32; NR]; MR];
        for g0 in (0..pixels).step_by(NR) {
            runs_of(g0, NR.min(pixels - g0), d, &mut runs);
            tap_offsets(g0, NR.min(pixels - g0), d, &mut taps);
            // panel[o·32 + t] = dy[n, o, pixel t of the panel]
            for o in 0..d.c_out {
                for run in &runs {
                    let src = &dyg[(run.n * d.c_out + o) * l + run.i * d.ow..][run.j0..run.j1];
                    panel[o * NR + run.t..][..src.len()].copy_from_slice(src);
                }
            }
            for (tile_i, a) in a.chunks_exact(d.c_out * MR).enumerate() {
                // SAFETY: `available()` was asserted; `a` and `panel` hold c_out rows each.
                unsafe { tile::<MR>(d.c_out, a, &panel, &mut out) };
                // Fold the tile's column values back to the pixels they were read from (col2im).
                for (r, row) in out.iter().enumerate().take(k.saturating_sub(tile_i * MR)) {
                    let kk = tile_i * MR + r;
                    let (c, tap) = (kk / (d.kh * d.kw), kk % (d.kh * d.kw));
                    // SAFETY: `available()` was asserted.
                    unsafe { fold_row(row, c, &taps[tap], d, dxg) };
                }
            }
        }
        give(panel);
    });
    give(a);
}

fn backward_weight_mr<const MR: usize>(dy: &[f32], x: &[f32], dw: &mut [f32], d: &Conv2dDims) {
    let (k, l, chw) = (d.c_in * d.kh * d.kw, d.oh * d.ow, d.c_in * d.h * d.w);
    let (per, count) = groups(d);
    let tiles = d.c_out.div_ceil(MR);
    let partials: Vec<Vec<f32>> = (0..count)
        .into_par_iter()
        .map(|gi| {
            let images = per.min(d.n - gi * per);
            let (xg, dyg) =
                (&x[gi * per * chw..][..images * chw], &dy[gi * per * d.c_out * l..][..images * d.c_out * l]);
            let pixels = images * l;
            // a[tile][g][r] = dy[n, tile·MR + r, pixel g]: the group's dy, pixel-major.
            // (Rows past c_out in the last tile keep stale values: they only feed discarded rows.)
            let mut a = take(tiles * pixels * MR);
            for n in 0..images {
                for o in 0..d.c_out {
                    let src = &dyg[(n * d.c_out + o) * l..][..l];
                    let dst = &mut a[((o / MR) * pixels + n * l) * MR + o % MR..];
                    for (pix, &v) in src.iter().enumerate() {
                        dst[pix * MR] = v;
                    }
                }
            }
            let mut part = take(d.c_out * k);
            part[..d.c_out * k].fill(0.0);
            let mut panel = take(pixels * NR);
            let mut out = [[0.0f32; NR]; MR];
            for k0 in (0..k).step_by(NR) {
                // SAFETY: `available()` was asserted.
                unsafe { pack_columns_transposed(xg, k0, images, d, &mut panel) };
                for (tile_i, a) in a.chunks_exact(pixels * MR).take(tiles).enumerate() {
                    // SAFETY: `available()` was asserted; `a` and `panel` hold `pixels` rows each.
                    unsafe { tile::<MR>(pixels, a, &panel, &mut out) };
                    for (r, row) in out.iter().enumerate().take(d.c_out.saturating_sub(tile_i * MR)) {
                        let dst = &mut part[(tile_i * MR + r) * k + k0..][..NR.min(k - k0)];
                        dst.iter_mut().zip(row).for_each(|(v, &acc)| *v += acc);
                    }
                }
            }
            give(a);
            give(panel);
            part
        })
        .collect();
    add_partials(dw, partials);
}

/// dw += each group's partial weight gradient, in group order (as the reference adds its
/// images), whatever order the threads finished in; the buffers go back to the pool.
pub(super) fn add_partials(dw: &mut [f32], partials: Vec<Vec<f32>>) {
    for part in partials {
        dw.iter_mut().zip(&part).for_each(|(v, p)| *v += p);
        give(part);
    }
}

/// panel[g·32 + u] = x[n, c, i·s − pad + p, j·s − pad + q] for kernel taps (c, p, q) =
/// k0 + u and every pixel g of the group: 32 rows of the group's im2col matrix, transposed
/// (0 in the padding and past the last tap). Each pixel's row is two masked gathers: the
/// taps' offsets from the window's corner are fixed, the mask says which lie in the image.
#[target_feature(enable = "avx512f")]
unsafe fn pack_columns_transposed(xg: &[f32], k0: usize, images: usize, d: &Conv2dDims, panel: &mut [f32]) {
    let (k, hw, chw) = (d.c_in * d.kh * d.kw, d.h * d.w, d.c_in * d.h * d.w);
    assert!(panel.len() >= images * d.oh * d.ow * NR && xg.len() >= images * chw && chw <= i32::MAX as usize);
    // Per lane u (tap k0 + u): its kernel row p, column q and offset c·hw + p·w + q.
    let (mut p_of, mut q_of, mut offset) = ([0i32; NR], [0i32; NR], [0i32; NR]);
    let mut taps = 0u32;
    for u in 0..NR.min(k - k0) {
        let kk = k0 + u;
        let (c, p, q) = (kk / (d.kh * d.kw), kk / d.kw % d.kh, kk % d.kw);
        (p_of[u], q_of[u], offset[u]) = (p as i32, q as i32, (c * hw + p * d.w + q) as i32);
        taps |= 1 << u;
    }
    let (h, w) = (_mm512_set1_epi32(d.h as i32), _mm512_set1_epi32(d.w as i32));
    let mut rows = panel.chunks_exact_mut(NR);
    for n in 0..images {
        let xn = xg[n * chw..][..chw].as_ptr();
        for i in 0..d.oh {
            for j in 0..d.ow {
                let row = rows.next().expect("the panel holds every pixel");
                // The window's top-left corner, possibly in the padding.
                let (y0, x0) = ((i * d.stride) as i32 - d.pad as i32, (j * d.stride) as i32 - d.pad as i32);
                for half in 0..2 {
                    // SAFETY: a lane is gathered only when its (yy, xx) lies inside image n,
                    // where c·hw + yy·w + xx < chw; the row holds 32 floats.
                    unsafe {
                        let yy =
                            _mm512_add_epi32(_mm512_loadu_epi32(p_of.as_ptr().add(16 * half)), _mm512_set1_epi32(y0));
                        let xx =
                            _mm512_add_epi32(_mm512_loadu_epi32(q_of.as_ptr().add(16 * half)), _mm512_set1_epi32(x0));
                        let zero = _mm512_setzero_si512();
                        let mask = (taps >> (16 * half)) as u16
                            & _mm512_cmpge_epi32_mask(yy, zero)
                            & _mm512_cmplt_epi32_mask(yy, h)
                            & _mm512_cmpge_epi32_mask(xx, zero)
                            & _mm512_cmplt_epi32_mask(xx, w);
                        let at = _mm512_add_epi32(
                            _mm512_loadu_epi32(offset.as_ptr().add(16 * half)),
                            _mm512_set1_epi32(y0 * d.w as i32 + x0),
                        );
                        let v = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, at, xn);
                        _mm512_storeu_ps(row.as_mut_ptr().add(16 * half), v);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::conv2d::{check_passes_against_reference, FastPath};

    /// The shapes the fast path must get right: the VAE's stride-2 layers, odd sizes that
    /// leave partial panels and partial tiles, one image, groups that straddle panels,
    /// non-square images and kernels, padding 0 and 1, stride 1 to 3.
    fn shapes() -> Vec<Conv2dDims> {
        vec![
            Conv2dDims::new(3, 32, 28, 28, 64, 3, 3, 2, 1),
            Conv2dDims::new(2, 64, 14, 14, 128, 3, 3, 2, 1),
            Conv2dDims::new(1, 5, 9, 7, 13, 3, 3, 1, 1),
            Conv2dDims::new(17, 4, 6, 5, 9, 2, 3, 2, 0),
            Conv2dDims::new(5, 8, 11, 13, 24, 4, 4, 3, 1),
            Conv2dDims::new(33, 7, 5, 5, 8, 3, 3, 1, 0),
        ]
    }

    /// Each pass against the reference (see `check_passes_against_reference` for the
    /// tolerance).
    #[test]
    fn every_pass_matches_the_reference() {
        if !crate::ops::avx512_tests_can_run("conv2d_avx512") {
            return;
        }
        let path = FastPath { forward, backward_data, backward_weight };
        check_passes_against_reference(path, &shapes(), 2e-6, 5);
    }

    #[test]
    fn tile_rows_pad_least() {
        assert_eq!(rows_per_tile(64), 8);
        assert_eq!(rows_per_tile(288), 12);
        assert_eq!(rows_per_tile(13), 8); // 16 rows vs 24
        assert_eq!(rows_per_tile(20), 12); // 24 rows vs 24: the tie goes to 12
    }
}
