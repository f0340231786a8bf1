//! The work of one recorded launch, from its kernel and its arguments alone: the FLOPs the op
//! needs, the FLOPs the kernel's tiles execute, the double-precision operations and the fewest
//! bytes it must move through device memory (each input read once, each output written once;
//! an output the kernel adds into is read and written).
//!
//! Tile kernels (`gemm`, `gemm_splitk`, `conv2d_*`, each in the tile shapes of
//! [`Tile`]: 64 × 64, 16 × 64, 64 × 16, by K steps of 16) run the engine of
//! `kernels/common.cuh` over an implicit GEMM of M × N × K: they execute every multiply-add of
//! M, N and each K chunk rounded up to whole tiles (tile padding). The backward-data
//! convolution runs one GEMM per output phase (stride² of them), each over its own pixels
//! and taps, so it multiplies no zero tap except where the kernel's taps do not divide evenly
//! among the phases (its rows and taps of each phase are rounded up to tiles separately). Element-wise and reduction kernels are counted per
//! element from their source; a transcendental function (`exp`, `log`, `tanh`) counts as
//! [`TRANSCENDENTAL_FLOPS`] operations. These kernels are memory-bound at any such count.

use crate::backend::cuda::contract::{ConvArgs, TILE_K};
use crate::backend::cuda::kernels::{conv_phases, Kernel, Tile};
use crate::backend::cuda::trace::{Arg, Launch};

/// Operations one transcendental function is counted as: a modelling choice (libdevice's
/// `exp`/`log` are some tens of instructions), not a measurement; it moves no kernel of a
/// training step off the memory roofline.
pub const TRANSCENDENTAL_FLOPS: f64 = 20.0;

/// What one launch must do and what it does.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Work {
    /// FLOPs the op needs in the element type (a multiply-add is 2).
    pub useful_flops: f64,
    /// FLOPs the kernel executes in the element type: `useful_flops` plus tile padding and
    /// zero taps.
    pub executed_flops: f64,
    /// Double-precision operations (statistics and reductions accumulate in double).
    pub fp64_flops: f64,
    /// The fewest bytes the launch moves through device memory.
    pub bytes: f64,
    /// Whether it runs the tile GEMM engine (its rate is the FFMA share of its loop).
    pub tiled: bool,
}

fn int(l: &Launch, i: usize) -> f64 {
    match l.args.get(i) {
        Some(Arg::Int(v)) => *v as f64,
        other => panic!("{:?}: argument {i} is {other:?}, not an int", l.kernel),
    }
}
fn present(l: &Launch, i: usize) -> bool {
    matches!(l.args.get(i), Some(Arg::Buf { .. }))
}

/// FLOPs a product tiled by `tile` executes: M and N rounded up to tiles, and each of
/// `splits` chunks of `kc` along K (the last one ragged) rounded up to TILE_K.
fn tiled_flops(tile: Tile, m: f64, n: f64, k: f64, kc: f64, splits: f64) -> f64 {
    let up = |v: f64, t: usize| (v / t as f64).ceil() * t as f64;
    let last = k - (splits - 1.0) * kc;
    let k_exec = (splits - 1.0) * up(kc, TILE_K) + up(last.max(0.0), TILE_K);
    2.0 * up(m, tile.m()) * up(n, tile.n()) * k_exec
}

/// The kernel a tile-shape or precision variant is of (`gemm_m16` → `gemm`), the others
/// unchanged.
fn base_kernel(k: Kernel) -> Kernel {
    crate::backend::cuda::kernels::tile_family(k).unwrap_or(k)
}

fn conv_dims(a: &ConvArgs) -> [f64; 11] {
    [a.n, a.c_in, a.h, a.w, a.c_out, a.kh, a.kw, a.stride, a.oh, a.ow, a.kc].map(|v| v as f64)
}

/// The work of launch `l`.
pub fn work_of(l: &Launch) -> Work {
    let e = l.elem_bytes as f64;
    let z = l.grid[2] as f64;
    // Element-wise: (n, reads + writes per element in elements, FP32 ops, FP64 ops per element).
    let ew = |n: f64, moved: f64, flops: f64, fp64: f64| Work {
        useful_flops: n * flops,
        executed_flops: n * flops,
        fp64_flops: n * fp64,
        bytes: n * moved * e,
        tiled: false,
    };
    let t = TRANSCENDENTAL_FLOPS;
    let tile = Tile::of(l.kernel).unwrap_or(Tile::Square);
    match (base_kernel(l.kernel), l.args.first()) {
        (Kernel::Gemm, Some(Arg::Gemm(g))) => {
            let (m, n, k) = (g.m as f64, g.n as f64, g.k as f64);
            let useful = 2.0 * m * n * k;
            let bias = if present(l, 4) { n.max(m) } else { 0.0 };
            Work {
                useful_flops: useful,
                executed_flops: tiled_flops(tile, m, n, k, k, 1.0),
                fp64_flops: 0.0,
                bytes: e * (m * k + k * n + m * n * (1.0 + g.accumulate as f64) + bias),
                tiled: true,
            }
        }
        (Kernel::GemmSplitK, Some(Arg::Gemm(g))) => {
            let (m, n, k) = (g.m as f64, g.n as f64, g.k as f64);
            Work {
                useful_flops: 2.0 * m * n * k,
                executed_flops: tiled_flops(tile, m, n, k, g.kc as f64, z),
                fp64_flops: 0.0,
                bytes: e * (m * k + k * n + z * m * n),
                tiled: true,
            }
        }
        (Kernel::SplitKReduce, _) => {
            let (splits, len, acc) = (int(l, 1), int(l, 2), int(l, 4));
            Work { fp64_flops: splits * len, bytes: e * (splits * len + len * (1.0 + acc)), ..Work::default() }
        }
        (Kernel::SplitKReduceBias, _) => {
            let (splits, len, cols) = (int(l, 1), int(l, 2) * int(l, 3), int(l, 3));
            Work { fp64_flops: splits * len, bytes: e * (splits * len + len + cols), ..Work::default() }
        }
        (Kernel::ConvFwd, Some(Arg::Conv(a))) => {
            let [n, ci, h, w, co, kh, kw, _, oh, ow, _] = conv_dims(a);
            let (mm, nn, kk) = (co, n * oh * ow, ci * kh * kw);
            let bias = if present(l, 3) { co } else { 0.0 };
            Work {
                useful_flops: 2.0 * mm * nn * kk,
                executed_flops: tiled_flops(tile, mm, nn, kk, kk, 1.0),
                fp64_flops: 0.0,
                bytes: e * (n * ci * h * w + co * kk + n * co * oh * ow + bias),
                tiled: true,
            }
        }
        (Kernel::ConvBwdData, Some(Arg::Conv(a))) => {
            let [n, ci, h, w, co, kh, kw, _, oh, ow, _] = conv_dims(a);
            // The op's multiply-adds are the forward's; each phase's GEMM multiplies its own
            // pixels by its own taps (c_in × n·pixels × c_out·taps), padded to tiles.
            let executed: f64 = conv_phases(a)
                .iter()
                .map(|&(pix, taps)| {
                    let (nn, kk) = (n * pix as f64, co * taps as f64);
                    tiled_flops(tile, ci, nn, kk, kk, 1.0)
                })
                .sum();
            Work {
                useful_flops: 2.0 * co * (n * oh * ow) * (ci * kh * kw),
                executed_flops: executed,
                fp64_flops: 0.0,
                bytes: e * (n * co * oh * ow + co * ci * kh * kw + 2.0 * n * ci * h * w),
                tiled: true,
            }
        }
        (Kernel::ConvBwdWeight, Some(Arg::Conv(a))) => {
            let [n, ci, h, w, co, kh, kw, _, oh, ow, kc] = conv_dims(a);
            let (mm, nn, kk) = (co, ci * kh * kw, n * oh * ow);
            Work {
                useful_flops: 2.0 * mm * nn * kk,
                executed_flops: tiled_flops(tile, mm, nn, kk, kc, z),
                fp64_flops: 0.0,
                bytes: e * (n * co * oh * ow + n * ci * h * w + z * mm * nn),
                tiled: true,
            }
        }
        (Kernel::BnStatsPartial, Some(Arg::Bn(a))) => {
            // Shifted sums per element (a subtraction, an add, a multiply-add) read once.
            let n = a.outer as f64 * a.channels as f64 * a.inner as f64;
            ew(n, 1.0, 0.0, 4.0)
        }
        (Kernel::BnFwdApply, Some(Arg::Bn(a))) => {
            let n = a.outer as f64 * a.channels as f64 * a.inner as f64;
            ew(n, 2.0, 0.0, 4.0)
        }
        (Kernel::BnFwdEval, Some(Arg::Bn(a))) => {
            let n = a.outer as f64 * a.channels as f64 * a.inner as f64;
            ew(n, 2.0, 0.0, 4.0 + t)
        }
        (Kernel::BnBwdPartial, Some(Arg::Bn(a))) => {
            // dy and x read, and the activation's output y when one is fused.
            let n = a.outer as f64 * a.channels as f64 * a.inner as f64;
            ew(n, 2.0 + present(l, 4) as u8 as f64, 0.0, 5.0)
        }
        (Kernel::BnBwdApply, Some(Arg::Bn(a))) => {
            // With dx: dy, x (and y when an activation is fused) and dx read, dx written;
            // without, only the partials are read.
            let parts = 2.0 * a.chunks as f64 * a.channels as f64;
            if present(l, 10) {
                let n = a.outer as f64 * a.channels as f64 * a.inner as f64;
                ew(n, 4.0 + present(l, 4) as u8 as f64, 0.0, 6.0)
            } else {
                Work { fp64_flops: parts, bytes: 8.0 * parts + 4.0 * e * a.channels as f64, ..Work::default() }
            }
        }
        (Kernel::UnaryFwd, _) => ew(int(l, 4), 2.0, t, 0.0),
        (Kernel::UnaryBwd, _) => ew(int(l, 6), 5.0, 3.0, 0.0),
        (Kernel::Mul, _) => ew(int(l, 3), 3.0, 1.0, 0.0),
        (Kernel::MulAcc, _) => ew(int(l, 3), 4.0, 2.0, 0.0),
        (Kernel::Axpy, _) => ew(int(l, 3), 3.0, 2.0, 0.0),
        (Kernel::Fill, _) => ew(int(l, 2), 1.0, 0.0, 0.0),
        (Kernel::BroadcastAcc, _) => ew(int(l, 3), 2.0, 1.0, 0.0),
        (Kernel::GatherRows, _) => ew(int(l, 4), 2.0, 0.0, 0.0),
        (Kernel::GatherRowsU8, _) => ew(int(l, 4), 1.0 + 1.0 / e, 1.0, 0.0),
        (Kernel::BiasAdd, _) => ew(int(l, 4), 2.0, 1.0, 0.0),
        (Kernel::BiasBwd, _) => ew(int(l, 3) * int(l, 4) * int(l, 5), 1.0, 0.0, 1.0),
        (Kernel::ChunkSum, _) => {
            let parts = int(l, 1) * int(l, 2);
            Work { fp64_flops: parts, bytes: 8.0 * parts + 2.0 * e * int(l, 2), ..Work::default() }
        }
        (Kernel::SumPartial, _) => ew(int(l, 1), 1.0, 0.0, 1.0),
        (Kernel::ReduceFinal, _) => Work { fp64_flops: int(l, 1), bytes: 8.0 * int(l, 1) + e, ..Work::default() },
        (Kernel::FmaPeak, _) => Work::default(),
        (Kernel::ReparamKlFwd, _) => ew(int(l, 4), 4.0, 2.0 + t, 4.0 + t),
        (Kernel::ReparamBwdMu, _) => ew(int(l, 4), 2.0 + 2.0 * present(l, 1) as u8 as f64, 3.0, 0.0),
        (Kernel::ReparamBwdLogvar, _) => ew(int(l, 5), 4.0 + present(l, 2) as u8 as f64, 6.0 + 2.0 * t, 0.0),
        (Kernel::LossFwd, _) => ew(int(l, 3), 2.0, 0.0, 6.0 + 2.0 * t),
        (Kernel::LossBwd, _) => ew(int(l, 5), 4.0, 0.0, 6.0),
        (Kernel::Adam, Some(Arg::Adam { n })) => ew(*n as f64, 7.0, 12.0 + t, 0.0),
        // All tensors' elements as for `adam`; the table and the constants are a few hundred
        // bytes, left out.
        (Kernel::AdamMulti, _) => ew(int(l, 3), 7.0, 12.0 + t, 0.0),
        (Kernel::ZeroMulti, _) => ew(int(l, 2), 1.0, 0.0, 0.0),
        (Kernel::Pack3, _) => ew(1.0, 6.0, 0.0, 0.0),
        // Per value: half a Philox call (ten rounds of two 32-bit multiplies and a few logic
        // ops, counted as 8 integer ops each) and half of Box–Muller's log, sqrt, cos and sin
        // in double.
        (Kernel::PhiloxNormal, _) => ew(int(l, 1), 1.0, 40.0, 2.0 * t),
        (k, a) => panic!("a {k:?} launch whose first argument is {a:?}: the kernel table and the model disagree"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::contract::GemmArgs;

    fn launch(kernel: Kernel, grid: [u32; 3], args: Vec<Arg>) -> Launch {
        Launch { kernel, grid, block: [256, 1, 1], dynamic_shared_bytes: 0, elem_bytes: 4, args }
    }

    /// Hand-worked: a 128 × 400 × 784 GEMM pads M to 128, N to 448, K to 784 (a multiple of 16).
    #[test]
    fn tile_padding_of_a_gemm() {
        let g = GemmArgs { m: 128, n: 400, k: 784, ..Default::default() };
        let w =
            work_of(&launch(Kernel::Gemm, [7, 2, 1], vec![Arg::Gemm(g), Arg::Null, Arg::Null, Arg::Null, Arg::Null]));
        assert_eq!(w.useful_flops, 2.0 * 128.0 * 400.0 * 784.0);
        assert_eq!(w.executed_flops, 2.0 * 128.0 * 448.0 * 784.0);
        assert_eq!(w.bytes, 4.0 * (128.0 * 784.0 + 784.0 * 400.0 + 128.0 * 400.0));
    }

    /// A stride-2 backward-data convolution with a 4 × 4 kernel runs four phases of 2 × 2 taps
    /// each over 14² of the 28² input pixels: exactly the forward's multiply-adds, no zero tap
    /// (16 images, so each phase's 16·196 pixels are whole tiles).
    /// A one-channel output pads M from 1 to 64 on the 64 × 64 tile (64× the work), to 16 on
    /// the 16 × 64 one.
    #[test]
    fn zero_taps_and_a_one_channel_tile() {
        let a = ConvArgs {
            n: 16,
            c_in: 64,
            h: 28,
            w: 28,
            c_out: 64,
            kh: 4,
            kw: 4,
            stride: 2,
            pad: 1,
            oh: 14,
            ow: 14,
            kc: 0,
        };
        let w = work_of(&launch(Kernel::ConvBwdData, [1, 1, 4], vec![Arg::Conv(a)]));
        let pixels = 16.0 * 28.0 * 28.0;
        assert_eq!(w.useful_flops, w.executed_flops);
        assert_eq!(w.executed_flops, 2.0 * 64.0 * pixels * 64.0 * 4.0);
        // A 3 × 3 kernel at stride 2: phase (0, 0) has 2 × 2 taps, (0, 1) 2 × 1, (1, 1) 1 × 1,
        // 9 taps over the four phases of 16·196 pixels each, K = 64·taps whole tiles.
        let odd = ConvArgs { kh: 3, kw: 3, ..a };
        let w = work_of(&launch(Kernel::ConvBwdData, [1, 1, 4], vec![Arg::Conv(odd)]));
        assert_eq!(w.executed_flops, 2.0 * 64.0 * (16.0 * 196.0) * 64.0 * 9.0);
        let one = ConvArgs { c_out: 1, stride: 1, oh: 28, ow: 28, kh: 3, kw: 3, ..a };
        let fwd = |k| work_of(&launch(k, [1, 1, 1], vec![Arg::Conv(one), Arg::Null, Arg::Null, Arg::Null]));
        // M: 1 → 64; N = 16·784 and K = 64·9 are whole tiles.
        assert_eq!(fwd(Kernel::ConvFwd).executed_flops / fwd(Kernel::ConvFwd).useful_flops, 64.0);
        assert_eq!(fwd(Kernel::ConvFwdM16).executed_flops / fwd(Kernel::ConvFwdM16).useful_flops, 16.0);
    }

    /// Split-K: 3 chunks of 512 over K = 1100 execute 512 + 512 + 80 (76 rounded up).
    #[test]
    fn split_k_chunks_round_up_separately() {
        assert_eq!(tiled_flops(Tile::Square, 64.0, 64.0, 1100.0, 512.0, 3.0), 2.0 * 64.0 * 64.0 * (1024.0 + 80.0));
    }
}
