//! One training step (forward, backward, Adam) at batch 128 for each architecture.
//! CPU always; the GPU too when one is usable. Compare with PyTorch's step on the same machine
//! (`scripts/bench-cpu.sh` runs both).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

// The same allocator as the `vae` binary: it keeps freed activations for the next step
// instead of returning them to the kernel (glibc unmaps large blocks, and page faults
// then cost a quarter of a CPU step).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use vaecuda::nn::{Arch, ModelConfig};
use vaecuda::optim::AdamConfig;
use vaecuda::rng::Rng;
use vaecuda::train::{LossConfig, Trainer};
use vaecuda::{Backend, Cpu, Float, Tensor};

const BATCH: usize = 128;

fn bench_backend<B: Backend + Send + Sync>(c: &mut Criterion, backend: B, label: &str)
where
    B::Buf: Send + Sync,
    B::Graph: Send,
{
    let mut group = c.benchmark_group(format!("train_step/{label}"));
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(10);
    // Each step runs on a rayon worker, as `vae` runs (see main.rs): from this thread, every
    // parallel op would pay a hand-off to the pool.
    let pool = rayon::ThreadPoolBuilder::new().build().expect("a rayon thread pool");
    for arch in [Arch::Mlp, Arch::Conv, Arch::ConvBn] {
        let mut t =
            Trainer::new(backend.clone(), ModelConfig::mnist(arch), LossConfig::default(), AdamConfig::default(), 0);
        let mut rng = Rng::new(0);
        let data: Vec<B::E> = (0..BATCH * 784).map(|_| B::E::of(rng.next_f64())).collect();
        let x = Tensor::from_host(&backend, &[BATCH, 1, 28, 28], &data);
        group.bench_function(arch.name(), |b| {
            b.iter(|| {
                pool.install(|| t.step(x.duplicate(&backend), 1.0).unwrap());
                backend.synchronize();
            })
        });
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    match vaecuda::backend::cuda::open::<f32>(0) {
        Ok(gpu) => bench_backend(c, gpu, "cuda"),
        Err(e) => eprintln!("no GPU benches: {e}"),
    }
    bench_backend(c, Cpu::<f32>::default(), "cpu");
}

criterion_group!(train_step, benches);
criterion_main!(train_step);
