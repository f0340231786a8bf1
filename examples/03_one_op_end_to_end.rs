//! 03: one op from the tape to the kernel: conv2d.
//!
//! `ops::conv2d` records the op on the tape and calls `Backend::conv2d_forward`. On the CPU
//! that is the reference in `src/ops/conv2d.rs` (im2col + GEMM); on CUDA it is the kernel
//! `conv2d_fwd` of `kernels/conv2d.cu`, an implicit GEMM on 64×64 output tiles, launched
//! through the kernel table of `src/backend/cuda/kernels.rs`. This example runs both on the
//! same input and compares them, on a GPU or, without one, on the emulated device, which
//! runs the very same kernel source on the CPU.
//!
//! Run: `cargo run --release --example 03_one_op_end_to_end`

use vaecuda::backend::cuda::{compile, emu, kernels};
use vaecuda::ops::conv2d::Conv2dDims;
use vaecuda::rng::Rng;
use vaecuda::{Backend, Cpu, Tensor};

fn main() {
    // The conv VAE's second encoder layer at batch 8: 32 → 64 channels, 3×3, stride 2, pad 1.
    let d = Conv2dDims::new(8, 32, 28, 28, 64, 3, 3, 2, 1);
    println!(
        "conv2d: x [{}, {}, {}, {}] ⊛ W [{}, {}, {}, {}], stride {}, pad {} → y [{}, {}, {}, {}], {:.1} MFLOP",
        d.n,
        d.c_in,
        d.h,
        d.w,
        d.c_out,
        d.c_in,
        d.kh,
        d.kw,
        d.stride,
        d.pad,
        d.n,
        d.c_out,
        d.oh,
        d.ow,
        2.0 * d.macs() as f64 / 1e6
    );
    let mut rng = Rng::new(3);
    let mut draw = |n: usize| (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect::<Vec<f64>>();
    let (x, w, b) = (draw(d.x_len()), draw(d.w_len()), draw(d.c_out));

    // The reference, in f64.
    let cpu = Cpu::<f64>::default();
    let mut y_ref = Tensor::empty(&cpu, &[d.n, d.c_out, d.oh, d.ow]);
    let up = |v: &[f64]| cpu.upload(v);
    cpu.conv2d_forward(&up(&x), &up(&w), Some(&up(&b)), &mut y_ref.buf, d);
    let y_ref = y_ref.to_host(&cpu);

    // What the GPU runs: the kernel's entry in the table, its declaration and its grid.
    let spec = kernels::KERNELS.iter().find(|k| k.name == "conv2d_fwd").unwrap();
    println!("\nkernel table: {} in kernels/{}, parameters {:?}", spec.name, spec.file, spec.params);
    let decl = kernels::declarations(spec.file);
    println!("declared to NVRTC as: {}", decl.lines().find(|l| l.contains("conv2d_fwd_f32")).unwrap());
    // The tile shape is chosen from the GEMM's shape (64 × 64, or 16 × 64 / 64 × 16 for a small
    // M or N), as the backend does at f32.
    let (m, n, k) = (d.c_out, d.n * d.oh * d.ow, d.c_in * d.kh * d.kw);
    let tile = kernels::choose_tile(&kernels::TILES, m, n, k, 1);
    let cfg = kernels::cfg_tiles(tile, m, n, 1);
    println!(
        "launch: grid {:?} of {} threads: one block per {} output channels × {} output pixels (implicit GEMM M = c_out = {m}, N = n·oh·ow = {n}, K = c_in·kh·kw = {k})",
        cfg.grid_dim,
        cfg.block_dim.0,
        tile.m(),
        tile.n()
    );
    let file = compile::FILES.iter().find(|f| f.name == spec.file).unwrap();
    let text = compile::program_source(file).unwrap();
    println!(
        "program text NVRTC compiles for {}: {} lines (contract, common.cuh, declarations, the file)",
        file.name,
        text.lines().count()
    );

    match emu::gpu_or_emulated::<f32>() {
        Ok((gpu, emulated)) => {
            let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
            let mut y = Tensor::empty(&gpu, &[d.n, d.c_out, d.oh, d.ow]);
            let (xg, wg, bg) = (gpu.upload(&f32s(&x)), gpu.upload(&f32s(&w)), gpu.upload(&f32s(&b)));
            let t = gpu.time(&mut || gpu.conv2d_forward(&xg, &wg, Some(&bg), &mut y.buf, d));
            let y = y.to_host(&gpu);
            let worst = y.iter().zip(&y_ref).map(|(&a, &r)| (a as f64 - r).abs() / (1.0 + r.abs())).fold(0.0, f64::max);
            println!("\nran on {} in {:.2} ms", gpu.describe(), t.as_secs_f64() * 1e3);
            if emulated {
                println!("(the emulated device: that time is the CPU's, not a GPU's)");
            }
            // Each output sums c_in·kh·kw = 288 products of f32 values in [−1, 1): a few f32 ulps
            // of the running sum per term, growing like √288, is about 1e-6 relative.
            println!("largest difference from the f64 reference, relative: {worst:.2e} (f32 rounding: ~1e-6)");
            assert!(worst < 2e-5, "the kernel disagrees with the reference");
        }
        Err(e) => println!("\n(no CUDA backend here: {e})"),
    }
}
