//! One criterion group per kernel family at the VAE's shapes (batch 128) and one large shape
//! each (GEMM 4096³, 64M-element elementwise), reported as FLOP/s or bytes/s. The cases are
//! `vaecuda::bench::kernel_cases`, the same ones `vae bench` prints.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use vaecuda::bench::kernel_cases;
use vaecuda::{Backend, Cpu};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn bench_backend<B: Backend>(c: &mut Criterion, be: B, label: &str) {
    for mut case in kernel_cases(&be, true) {
        let mut group = c.benchmark_group(format!("{label}/{}", case.family));
        group.throughput(if case.flops > 0.0 {
            Throughput::Elements(case.flops as u64) // read "elem/s" as FLOP/s
        } else {
            Throughput::Bytes(case.bytes as u64)
        });
        group.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
        group.bench_function(format!("{} {}", case.name, case.shape), |b| {
            // Custom timing: the backend's device clock (CUDA events on the GPU) around n
            // launches; each launch takes the next of several input sets, so the L2 cache
            // does not hold the last call's operands.
            b.iter_custom(|n| {
                be.time(&mut || {
                    for _ in 0..n {
                        (case.run)();
                    }
                })
            })
        });
        group.finish();
    }
}

fn benches(c: &mut Criterion) {
    match vaecuda::backend::cuda::open::<f32>(0) {
        Ok(gpu) => bench_backend(c, gpu, "cuda"),
        Err(e) => eprintln!("no GPU benches: {e}"),
    }
    bench_backend(c, Cpu::<f32>::default(), "cpu");
}

criterion_group!(kernels, benches);
criterion_main!(kernels);
