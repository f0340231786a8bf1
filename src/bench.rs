//! Kernel and training throughput, shared by the criterion benches and `vae bench`.
//!
//! Every case owns its buffers and a closure that launches one call. The buffers are held in
//! several copies (96 MiB ÷ the case's size, from 1 to 8) and each call takes the next, so a
//! case of 12 MiB or more does not run from a warm cache: its copies add up to at least 48 MiB,
//! about the H100's 50 MB L2. Smaller cases, such as `reparam_kl` at 128 × 20, still fit in
//! the cache with all eight copies.
//! Kernel times come from `Backend::time` around many launches: CUDA events on the GPU, the
//! wall clock between synchronizations on the CPU.

use std::time::Instant;

use crate::backend::{Backend, Recon};
use crate::nn::{Arch, ModelConfig};
use crate::ops::adam::AdamStep;
use crate::ops::batch_norm::BatchNormDims;
use crate::ops::conv2d::Conv2dDims;
use crate::ops::linear::LinearDims;
use crate::ops::unary::Unary;
use crate::optim::AdamConfig;
use crate::rng::Rng;
use crate::tensor::{Float, Tensor};
use crate::train::{LossConfig, Trainer};

/// One benchmarked kernel call.
pub struct KernelCase {
    /// The kernel family, one per criterion group (`gemm`, `conv2d`, `batchnorm`, ...).
    pub family: &'static str,
    /// The `Backend` method it calls.
    pub name: String,
    /// The problem size, as printed in the report.
    pub shape: String,
    /// Floating-point operations of one call (a multiply-add is 2); 0 for memory-bound cases,
    /// which are judged by bytes only.
    pub flops: f64,
    /// Bytes of one call's buffers, inputs and output, each counted once: the least traffic
    /// the call can make.
    pub bytes: f64,
    /// Launches one call on the next set of rotated buffers (it may return before the
    /// device finishes: time it with `Backend::time`).
    pub run: Box<dyn FnMut()>,
}

/// Bytes the copies of a case's inputs should add up to, to fall out of the last-level cache.
const ROTATE_BYTES: usize = 96 << 20;

struct Rotating<B: Backend> {
    sets: Vec<Vec<B::Buf>>,
    next: usize,
}

impl<B: Backend> Rotating<B> {
    /// `copies` sets of buffers with the given lengths, filled with seeded values in [−1, 1).
    fn new(be: &B, lens: &[usize], seed: u64) -> Self {
        let bytes: usize = lens.iter().sum::<usize>() * std::mem::size_of::<B::E>();
        let copies = (ROTATE_BYTES / bytes.max(1)).clamp(1, 8);
        let mut rng = Rng::new(seed);
        let sets = (0..copies)
            .map(|_| {
                lens.iter()
                    .map(|&n| {
                        let v: Vec<B::E> = (0..n).map(|_| B::E::of(rng.uniform(-1.0, 1.0))).collect();
                        be.upload(&v)
                    })
                    .collect()
            })
            .collect();
        Rotating { sets, next: 0 }
    }
    fn next(&mut self) -> &mut Vec<B::Buf> {
        self.next = (self.next + 1) % self.sets.len();
        &mut self.sets[self.next]
    }
}

fn case<B: Backend>(
    be: &B,
    family: &'static str,
    name: &str,
    shape: String,
    flops: f64,
    lens: &[usize],
    mut f: impl FnMut(&B, &mut Vec<B::Buf>) + 'static,
) -> KernelCase {
    let e = std::mem::size_of::<B::E>() as f64;
    let bytes = lens.iter().sum::<usize>() as f64 * e;
    let mut rot = Rotating::new(be, lens, name.len() as u64 + lens.len() as u64);
    let be = be.clone();
    KernelCase { family, name: name.to_string(), shape, flops, bytes, run: Box::new(move || f(&be, rot.next())) }
}

/// Splits a buffer list into (inputs.., output) borrows.
fn io<T>(v: &mut [T]) -> (&[T], &mut T) {
    let (last, rest) = v.split_last_mut().unwrap();
    (rest, last)
}

/// The VAE's kernels at the shapes the seed conv VAE really uses (batch 128), plus one large
/// shape per family. `large` adds GEMM 4096³ and 64M-element elementwise cases.
pub fn kernel_cases<B: Backend>(be: &B, large: bool) -> Vec<KernelCase> {
    let mut v = vec![];
    let n = 128;
    let mut gemms = vec![(n, 6272, 256), (n, 256, 6272), (n, 784, 400), (n, 400, 784)];
    if large {
        gemms.push((4096, 4096, 4096));
    }
    for (m, k, o) in gemms {
        let d = LinearDims { n: m, d_in: k, d_out: o };
        let fl = 2.0 * (m * k * o) as f64;
        let sh = format!("{m}x{k} · {o}x{k}ᵀ");
        v.push(case(be, "gemm", "linear_forward", sh.clone(), fl, &[m * k, o * k, o, m * o], move |be, b| {
            let (i, y) = io(b);
            be.linear_forward(&i[0], &i[1], Some(&i[2]), y, d)
        }));
        if m == n {
            v.push(case(be, "gemm", "linear_backward_data", sh.clone(), fl, &[m * o, o * k, m * k], move |be, b| {
                let (i, y) = io(b);
                be.linear_backward_data(&i[0], &i[1], y, d)
            }));
            v.push(case(be, "gemm", "linear_backward_weight", sh, fl, &[m * o, m * k, o * k], move |be, b| {
                let (i, y) = io(b);
                be.linear_backward_weight(&i[0], &i[1], y, d)
            }));
        }
    }
    // (c_in, h, c_out, stride): the encoder's convs; their transposes are the decoder's.
    for (ci, h, co, s) in [(1, 28, 32, 1), (32, 28, 64, 2), (64, 14, 128, 2), (32, 28, 1, 1)] {
        let d = Conv2dDims::new(n, ci, h, h, co, 3, 3, s, 1);
        let fl = 2.0 * d.macs() as f64;
        let sh = format!("{n}x{ci}x{h}x{h} → {co} s{s}");
        let (x, w, y) = (d.x_len(), d.w_len(), d.y_len());
        v.push(case(be, "conv2d", "conv2d_forward", sh.clone(), fl, &[x, w, co, y], move |be, b| {
            let (i, o) = io(b);
            be.conv2d_forward(&i[0], &i[1], Some(&i[2]), o, d)
        }));
        v.push(case(
            be,
            "conv2d",
            "conv2d_backward_data (= conv_transpose2d)",
            sh.clone(),
            fl,
            &[y, w, x],
            move |be, b| {
                let (i, o) = io(b);
                be.conv2d_backward_data(&i[0], &i[1], o, d)
            },
        ));
        v.push(case(be, "conv2d", "conv2d_backward_weight", sh, fl, &[y, x, w], move |be, b| {
            let (i, o) = io(b);
            be.conv2d_backward_weight(&i[0], &i[1], o, d)
        }));
    }
    for (c, h) in [(32, 14), (64, 7)] {
        let d = BatchNormDims { outer: n, channels: c, inner: h * h, eps: 1e-5, momentum: 0.1, act: None };
        let len = n * c * h * h;
        let sh = format!("{n}x{c}x{h}x{h}");
        v.push(case(
            be,
            "batchnorm",
            "batch_norm_forward_train",
            sh.clone(),
            0.0,
            &[len, c, c, c, c, c, c, len],
            move |be, b| {
                let (y, rest) = b.split_last_mut().unwrap();
                let (ins, st) = rest.split_at_mut(3);
                let (sm, rest) = st.split_first_mut().unwrap();
                let (si, rest) = rest.split_first_mut().unwrap();
                let (rm, rv) = rest.split_first_mut().unwrap();
                be.batch_norm_forward_train(&ins[0], &ins[1], &ins[2], y, sm, si, rm, &mut rv[0], d)
            },
        ));
        v.push(case(be, "batchnorm", "batch_norm_backward", sh, 0.0, &[len, len, c, c, c, len, c, c], move |be, b| {
            let (i, rest) = b.split_at_mut(5);
            let (dx, rest) = rest.split_first_mut().unwrap();
            let (dg, db) = rest.split_first_mut().unwrap();
            be.batch_norm_backward(&i[0], None, &i[1], &i[2], &i[3], &i[4], Some(dx), Some(dg), Some(&mut db[0]), d)
        }));
    }
    let mut sizes = vec![n * 32 * 28 * 28];
    if large {
        sizes.push(64 << 20);
    }
    for len in sizes {
        let sh = format!("{len}");
        v.push(case(be, "elementwise", "relu_forward", sh.clone(), 0.0, &[len, len], |be, b| {
            let (i, y) = io(b);
            be.unary_forward(Unary::Relu, &i[0], y)
        }));
        v.push(case(be, "elementwise", "sigmoid_backward", sh.clone(), 0.0, &[len, len, len, len], |be, b| {
            let (i, y) = io(b);
            be.unary_backward(Unary::Sigmoid, &i[0], &i[1], &i[2], y)
        }));
        v.push(case(be, "elementwise", "axpy", sh.clone(), 2.0 * len as f64, &[len, len], |be, b| {
            let (i, y) = io(b);
            be.axpy(B::E::of(0.5), &i[0], y)
        }));
        // The buffers hold values in [−1, 1): valid logits, but half are not probabilities;
        // that costs BCE on probabilities (the default objective) the same on the CPU, whose
        // branch-free `vmath::ln` replaced libm's `log`, which returned early for negatives.
        for (recon, name) in [(Recon::Mse, "mse"), (Recon::Bce, "bce"), (Recon::BceWithLogits, "bce_with_logits")] {
            v.push(case(be, "reduction", &format!("{name}_forward"), sh.clone(), 0.0, &[len, len, 1], move |be, b| {
                let (i, y) = io(b);
                be.recon_loss_forward(recon, &i[0], &i[1], y)
            }));
            v.push(case(
                be,
                "reduction",
                &format!("{name}_backward"),
                sh.clone(),
                0.0,
                &[len, len, 1, len],
                move |be, b| {
                    let (i, y) = io(b);
                    be.recon_loss_backward(recon, &i[0], &i[1], &i[2], y)
                },
            ));
        }
        let s = AdamStep::new(1e-3, 0.9, 0.999, 1e-8, 0.0, false, 3);
        v.push(case(be, "adam", "adam_step", sh, 0.0, &[len, len, len, len], move |be, b| {
            let (p, rest) = b.split_first_mut().unwrap();
            let (g, rest) = rest.split_first_mut().unwrap();
            let (m, vv) = rest.split_first_mut().unwrap();
            be.adam_step(p, g, m, &mut vv[0], s)
        }));
    }
    let z = n * 20;
    v.push(case(be, "vae_loss", "reparam_kl_forward", format!("{n}x20"), 0.0, &[z, z, z, z, 1], |be, b| {
        let (i, rest) = b.split_at_mut(3);
        let (zb, kl) = rest.split_first_mut().unwrap();
        be.reparam_kl_forward(&i[0], &i[1], &i[2], zb, &mut kl[0])
    }));
    v.push(case(be, "vae_loss", "reparam_kl_backward", format!("{n}x20"), 0.0, &[z, z, z, z, 1, z, z], |be, b| {
        let (i, rest) = b.split_at_mut(5);
        let (dmu, dlogvar) = rest.split_first_mut().unwrap();
        be.reparam_kl_backward(&i[0], &i[1], &i[2], Some(&i[3]), Some(&i[4]), Some(dmu), Some(&mut dlogvar[0]))
    }));
    v
}

/// Times `run` (median seconds per call over `reps` calls after `warmup`).
pub fn time_case<B: Backend>(be: &B, case: &mut KernelCase, warmup: usize, reps: usize) -> f64 {
    for _ in 0..warmup {
        (case.run)();
    }
    be.synchronize();
    let mut samples = vec![];
    // Batches of calls per sample so launch gaps average out on the GPU.
    let per = 5;
    for _ in 0..reps.div_ceil(per) {
        let took = be.time(&mut || {
            for _ in 0..per {
                (case.run)();
            }
        });
        samples.push(took.as_secs_f64() / per as f64);
    }
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Seconds per training step at batch 128 (median of `steps` after the warm-up steps) and the
/// implied seconds per 60,000-image epoch.
pub fn train_step_seconds<B: Backend>(be: &B, arch: Arch, steps: usize) -> StepTiming {
    let batch = 128;
    let mut t = Trainer::new(be.clone(), ModelConfig::mnist(arch), LossConfig::default(), AdamConfig::default(), 0);
    let mut rng = Rng::new(0);
    let data: Vec<B::E> = (0..batch * 784).map(|_| B::E::of(rng.next_f64())).collect();
    let x = Tensor::from_host(be, &[batch, 1, 28, 28], &data);
    // Sized up front: a vector growing inside the timed steps would fault pages itself.
    let mut samples = Vec::with_capacity(steps);
    let (mut faults_before, mut fresh_before) = (None, None);
    for i in 0..steps + WARM_UP_STEPS {
        if i == WARM_UP_STEPS {
            faults_before = minor_page_faults();
            fresh_before = be.fresh_buffers();
        }
        // Wall clock: a step reads its loss back to the host, and that is part of its cost.
        let start = Instant::now();
        t.step(x.duplicate(be), 1.0).expect("finite loss");
        be.synchronize();
        if i >= WARM_UP_STEPS {
            samples.push(start.elapsed().as_secs_f64());
        }
    }
    let per_step = |before: Option<u64>, after: Option<u64>| {
        before.zip(after).map(|(a, b)| b.saturating_sub(a) as f64 / steps.max(1) as f64)
    };
    let faults = per_step(faults_before, minor_page_faults());
    let fresh = per_step(fresh_before, be.fresh_buffers());
    samples.sort_by(f64::total_cmp);
    let step = samples[samples.len() / 2];
    StepTiming {
        step_s: step,
        epoch_s: step * (60_000f64 / batch as f64).ceil(),
        page_faults_per_step: faults,
        fresh_buffers_per_step: fresh,
    }
}

/// Untimed steps before [`train_step_seconds`] starts its clock and its counts: the first
/// step allocates every buffer, and by the third the backend's pool holds them all; but the
/// allocator's per-thread heaps still take fresh pages for small allocations until every
/// worker thread has run each kind of task, which depends on rayon's work stealing. On the
/// 2-core VM with both cores busy, MLP steps faulted pages up to the fourth step (8–9 faults
/// in steps 3–4 of six runs), none after it.
const WARM_UP_STEPS: usize = 4;

/// What [`train_step_seconds`] measured.
#[derive(Clone, Copy, Debug)]
pub struct StepTiming {
    /// Median wall-clock time of one step, in seconds.
    pub step_s: f64,
    /// That times the steps of a 60,000-image epoch at batch 128, in seconds.
    pub epoch_s: f64,
    /// Minor page faults of the whole process per timed step (Linux; `None` elsewhere): a
    /// step that takes every buffer from the pool touches no fresh page, so this is 0 in
    /// the steady state, and each fault is a page the kernel had to zero.
    pub page_faults_per_step: Option<f64>,
    /// Buffers per timed step the backend allocated because its pool had none
    /// ([`Backend::fresh_buffers`]; `None` where it does not count): 0 in the steady state.
    pub fresh_buffers_per_step: Option<f64>,
}

/// The process's minor page faults so far (`/proc/self/stat`, field 10), on Linux.
pub fn minor_page_faults() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    stat.rsplit_once(')')?.1.split_whitespace().nth(7)?.parse().ok()
}

/// The machine's measured roofline: peak bandwidth (GB/s, from a large copy) and peak
/// arithmetic (GFLOP/s, from an FMA-bound loop).
pub trait Roofline {
    /// Copy bandwidth, reads plus writes, in GB/s (10⁹ bytes per second).
    fn peak_bandwidth_gbs(&self) -> f64;
    /// FMA throughput in GFLOP/s (an FMA is 2 FLOPs).
    fn peak_gflops(&self) -> f64;
}

impl<E: Float> Roofline for crate::Cpu<E> {
    fn peak_bandwidth_gbs(&self) -> f64 {
        use rayon::prelude::*;
        let n = 64 << 20;
        let src = vec![E::one(); n];
        let mut dst = vec![E::zero(); n];
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            // On every core, as the ops run: one core alone may not reach the memory's peak,
            // and a single-threaded copy would put memory-bound ops above 100% of it.
            dst.par_chunks_mut(1 << 16).zip(src.par_chunks(1 << 16)).for_each(|(d, s)| d.copy_from_slice(s));
            best = best.min(t.elapsed().as_secs_f64());
        }
        std::hint::black_box(&dst);
        // A copy reads and writes every byte.
        2.0 * (n * std::mem::size_of::<E>()) as f64 / best / 1e9
    }
    fn peak_gflops(&self) -> f64 {
        use rayon::prelude::*;
        let iters = 1 << 22;
        let threads = rayon::current_num_threads();
        // Best of seven: a shared machine only ever makes a run slower (seen here: 224 to
        // 477 GFLOP/s between runs on a 2-core VM).
        (0..7)
            .map(|_| {
                let t = Instant::now();
                let flops: f64 = (0..threads).into_par_iter().map(|k| fma_loop(iters, k as f32)).sum();
                flops / t.elapsed().as_secs_f64() / 1e9
            })
            .fold(0.0, f64::max)
            // The loop is f32; a vector holds half as many f64 lanes, at the same FMA rate.
            * (4.0 / std::mem::size_of::<E>() as f64)
    }
}

/// The GPU's roofline, measured the same way: a device-to-device copy of 256 MiB (best of ten)
/// and the FMA-bound `fma_peak` kernel on 8 blocks per multiprocessor (best of three), both
/// timed with `Backend::time` (CUDA events).
impl<E: crate::backend::cuda::CudaFloat> Roofline for crate::Cuda<E> {
    fn peak_bandwidth_gbs(&self) -> f64 {
        let bytes = 256usize << 20;
        let n = bytes / std::mem::size_of::<E>();
        let src = self.zeros(n);
        let mut dst = self.zeros(n);
        let best = (0..10).map(|_| self.time(&mut || self.copy(&src, &mut dst)).as_secs_f64()).fold(f64::MAX, f64::min);
        // A copy reads and writes every byte.
        2.0 * bytes as f64 / best / 1e9
    }
    fn peak_gflops(&self) -> f64 {
        let blocks = self.multiprocessors() * 8;
        let iters: i32 = if E::NAME == "f32" { 1 << 16 } else { 1 << 13 };
        self.fma_probe(blocks, iters); // warm-up
        let best =
            (0..3).map(|_| self.time(&mut || self.fma_probe(blocks, iters)).as_secs_f64()).fold(f64::MAX, f64::min);
        // 8 chains × one FMA (2 FLOPs) per iteration per thread.
        let threads = blocks as f64 * crate::backend::cuda::contract::BLOCK as f64;
        threads * iters as f64 * 16.0 / best / 1e9
    }
}

/// An FMA-bound loop on one thread, at the widest vectors the CPU has (the GEMM uses them
/// too); returns the FLOPs it did. 12 independent chains keep both FMA pipes busy through the
/// 4-cycle latency.
fn fma_loop(iters: usize, seed: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the feature was just detected.
        return unsafe { fma_loop_avx512(iters, seed) };
    }
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the features were just detected.
        return unsafe { fma_loop_avx2(iters, seed) };
    }
    let mut acc = [seed; 8];
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = *a * 0.999_999 + 1e-7;
        }
    }
    std::hint::black_box(acc);
    (iters * 8 * 2) as f64
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_loop_avx2(iters: usize, seed: f32) -> f64 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
    let mut acc = [_mm256_set1_ps(seed); 12];
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = _mm256_fmadd_ps(*v, a, b);
        }
    }
    std::hint::black_box(acc);
    (iters * 12 * 8 * 2) as f64
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_loop_avx512(iters: usize, seed: f32) -> f64 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
    let mut acc = [_mm512_set1_ps(seed); 12];
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = _mm512_fmadd_ps(*v, a, b);
        }
    }
    std::hint::black_box(acc);
    (iters * 12 * 16 * 2) as f64
}

/// One kernel case's result: a row of `vae bench`'s table (and of its JSON).
#[derive(Clone, Debug, serde::Serialize)]
pub struct KernelRow {
    /// As [`KernelCase::family`].
    pub family: String,
    /// As [`KernelCase::name`].
    pub kernel: String,
    /// As [`KernelCase::shape`].
    pub shape: String,
    /// Median time of one call, in microseconds.
    pub median_us: f64,
    /// Achieved GFLOP/s (`flops / time`); 0 for memory-bound cases.
    pub gflops: f64,
    /// Achieved GB/s (`bytes / time`).
    pub gbs: f64,
    /// Share of the roofline bound (the larger of FLOP/s ÷ peak and bytes/s ÷ peak), in %.
    pub roofline_pct: f64,
}

/// One architecture's training speed at batch 128 (see [`train_step_seconds`]).
#[derive(Clone, Debug, serde::Serialize)]
pub struct TrainRow {
    /// `mlp`, `conv` or `conv-bn`.
    pub arch: String,
    /// Median wall-clock time of one step (forward, backward, Adam, loss read back), in ms.
    pub step_ms: f64,
    /// That times the steps of a 60,000-image epoch (469), in seconds.
    pub epoch_s: f64,
    /// 128 images divided by the step time.
    pub images_per_s: f64,
    /// Minor page faults per step in the steady state ([`StepTiming::page_faults_per_step`]).
    pub page_faults_per_step: Option<f64>,
    /// Buffers allocated afresh per step ([`StepTiming::fresh_buffers_per_step`]).
    pub fresh_buffers_per_step: Option<f64>,
}

/// What `vae bench` measures and prints (its `Display` is the report's text).
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchReport {
    /// [`Backend::describe`] of the device measured.
    pub device: String,
    /// The measured copy bandwidth, GB/s ([`Roofline::peak_bandwidth_gbs`]).
    pub peak_bandwidth_gbs: f64,
    /// The measured FMA peak, GFLOP/s ([`Roofline::peak_gflops`]).
    pub peak_gflops: f64,
    /// One row per kernel case.
    pub kernels: Vec<KernelRow>,
    /// One row per architecture.
    pub training: Vec<TrainRow>,
}

/// Measures the roofline, every kernel case (none when `reps` is 0) and a training step of
/// each architecture.
pub fn run_report<B: Backend + Roofline>(be: &B, large: bool, reps: usize, train_steps: usize) -> BenchReport {
    let (bw, fl) = (be.peak_bandwidth_gbs(), be.peak_gflops());
    let mut kernels = vec![];
    let cases = if reps == 0 { vec![] } else { kernel_cases(be, large) };
    for mut case in cases {
        let t = time_case(be, &mut case, 3, reps);
        let (gflops, gbs) = (case.flops / t / 1e9, case.bytes / t / 1e9);
        kernels.push(KernelRow {
            family: case.family.into(),
            kernel: case.name.clone(),
            shape: case.shape.clone(),
            median_us: t * 1e6,
            gflops,
            gbs,
            roofline_pct: 100.0 * (gflops / fl).max(gbs / bw),
        });
    }
    let training = [Arch::Mlp, Arch::Conv, Arch::ConvBn]
        .into_iter()
        .map(|arch| {
            let t = train_step_seconds(be, arch, train_steps);
            TrainRow {
                arch: arch.name().into(),
                step_ms: t.step_s * 1e3,
                epoch_s: t.epoch_s,
                images_per_s: 128.0 / t.step_s,
                page_faults_per_step: t.page_faults_per_step,
                fresh_buffers_per_step: t.fresh_buffers_per_step,
            }
        })
        .collect();
    BenchReport { device: be.describe(), peak_bandwidth_gbs: bw, peak_gflops: fl, kernels, training }
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "device: {}", self.device)?;
        writeln!(
            f,
            "measured roofline: {:.1} GB/s copy bandwidth, {:.1} GFLOP/s FMA peak",
            self.peak_bandwidth_gbs, self.peak_gflops
        )?;
        writeln!(
            f,
            "{:<44} {:<26} {:>11} {:>10} {:>9} {:>9}",
            "kernel", "shape", "median µs", "GFLOP/s", "GB/s", "% roof"
        )?;
        for r in &self.kernels {
            let g = if r.gflops > 0.0 { format!("{:.1}", r.gflops) } else { "-".into() };
            writeln!(
                f,
                "{:<44} {:<26} {:>11.1} {:>10} {:>9.1} {:>8.1}%",
                r.kernel, r.shape, r.median_us, g, r.gbs, r.roofline_pct
            )?;
        }
        writeln!(
            f,
            "{:<10} {:>12} {:>18} {:>12} {:>17} {:>17}",
            "arch", "step ms", "epoch s (60k img)", "images/s", "page faults/step", "new buffers/step"
        )?;
        let or_dash = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
        for r in &self.training {
            writeln!(
                f,
                "{:<10} {:>12.2} {:>18.2} {:>12.0} {:>17} {:>17}",
                r.arch,
                r.step_ms,
                r.epoch_s,
                r.images_per_s,
                or_dash(r.page_faults_per_step),
                or_dash(r.fresh_buffers_per_step)
            )?;
        }
        Ok(())
    }
}
