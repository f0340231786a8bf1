//! 01: one op, three backends.
//!
//! `Backend` is the one interface every op goes through: buffers (`Buf`), uploads and
//! downloads, and one method per kernel (`linear_forward`, `conv2d_forward`, ...). The CPU
//! backend (`Cpu<f32>`, `Cpu<f64>`) is the reference; the CUDA backend (`Cuda<f32>`) runs the
//! hand-written kernels of `kernels/` on a GPU, or on the emulated device when there is none.
//! A model is written once, generic over `B: Backend`, so the same code trains on the CPU,
//! checks gradients in f64, and runs on a GPU.
//!
//! Run: `cargo run --release --example 01_tensors_and_backends`

use vaecuda::backend::cuda::emu;
use vaecuda::ops::linear::LinearDims;
use vaecuda::{Backend, Cpu, Float, Tensor};

/// y = x·Wᵀ + b for a 3-image batch of 4 features into 2 outputs, on any backend: the numbers
/// go up as host f64, become the backend's element type, and come back.
fn linear_on<B: Backend>(be: &B) -> Vec<f64> {
    let d = LinearDims { n: 3, d_in: 4, d_out: 2 };
    let host = |v: &[f64]| v.iter().map(|&x| B::E::of(x)).collect::<Vec<B::E>>();
    let x = Tensor::from_host(be, &[3, 4], &host(&[1.0, 2.0, 3.0, 4.0, 0.5, -1.0, 0.0, 2.0, -3.0, 1.0, 1.0, 0.1]));
    let w = Tensor::from_host(be, &[2, 4], &host(&[0.1, 0.2, 0.3, 0.4, -1.0, 0.0, 1.0, 0.5]));
    let b = Tensor::from_host(be, &[2], &host(&[0.5, -0.5]));
    // An output the op overwrites entirely, so its contents need not be zeroed first.
    let mut y = Tensor::empty(be, &[3, 2]);
    be.linear_forward(&x.buf, &w.buf, Some(&b.buf), &mut y.buf, d);
    y.to_host(be).iter().map(|v| v.f64()).collect()
}

fn show(name: &str, y: &[f64]) {
    let row = |r: &[f64]| r.iter().map(|v| format!("{v:>10.6}")).collect::<Vec<_>>().join(" ");
    println!("{name:<34} {}", y.chunks(2).map(row).collect::<Vec<_>>().join(" | "));
}

fn main() {
    println!("y = x·Wᵀ + b, three rows of two outputs, on every backend this machine has:\n");
    let cpu32 = Cpu::<f32>::default();
    let cpu64 = Cpu::<f64>::default();
    let (y32, y64) = (linear_on(&cpu32), linear_on(&cpu64));
    show(&cpu32.describe(), &y32);
    show(&cpu64.describe(), &y64);
    // By hand, row 1: 1·0.1 + 2·0.2 + 3·0.3 + 4·0.4 + 0.5 = 3.5 and −1 + 3 + 2 − 0.5 = 3.5.
    assert!((y64[0] - 3.5).abs() < 1e-12 && (y64[1] - 3.5).abs() < 1e-12);

    match emu::gpu_or_emulated::<f32>() {
        Ok((gpu, emulated)) => {
            let y = linear_on(&gpu);
            show(&gpu.describe(), &y);
            let diff = y.iter().zip(&y64).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            println!(
                "\nThe CUDA result ran kernels/gemm.cu ({}); largest difference from the f64 reference: {diff:.2e}",
                if emulated { "on the emulated device: the real kernel, compiled for the CPU" } else { "on the GPU" }
            );
            assert!(diff < 1e-5, "the CUDA backend disagrees with the reference");
        }
        Err(e) => println!("\n(no CUDA backend here: {e})"),
    }
    println!("\nf32 and f64 differ in the last digits only: f32 keeps ~7 significant digits, which is why");
    println!("training runs in f32 while every gradient is checked in f64 (example 02).");
}
