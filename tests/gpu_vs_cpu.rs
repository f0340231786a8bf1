//! The CUDA backend against the CPU reference, on a GPU when there is one and otherwise on the
//! emulated device (the same kernels run on the CPU, see `vaecuda::backend::cuda::emu`): it runs
//! in every `cargo test`, and under CI it fails rather than skip when neither is available
//! (`common::cuda_device`). `VAECUDA_TEST_DEVICE=gpu` insists on a real GPU
//! (`scripts/gpu-check.sh` from a prebuilt `dist/` does).
//!
//! f32 tolerance, used throughout: |gpu − cpu| ≤ RTOL·√terms·(1 + |cpu|), RTOL = 2e-5, where
//! `terms` is the number of products summed into one output (1 for elementwise ops). Inputs
//! are O(1); f32 rounds each operation by ≤ 2⁻²⁴ ≈ 6e-8 and the two backends sum in different
//! orders, so their difference behaves like a random walk of √terms steps of a few ulps of
//! the running sum. 2e-5·√terms is ~300× that ulp-level walk: comfortable for rounding, yet
//! an indexing or formula bug (off by O(1) relative) fails by orders of magnitude. Reductions
//! the kernels do in double (losses, KL, sums, batch norm) are held to the same bound.

mod common;

use vaecuda::backend::cuda::{Cuda, CudaBuf};
use vaecuda::backend::{AdamTensor, Backend, Recon};
use vaecuda::gradcheck::{check, weighted_sum, GradCheck};
use vaecuda::nn::{Arch, ModelConfig};
use vaecuda::ops::adam::AdamStep;
use vaecuda::ops::batch_norm::BatchNormDims;
use vaecuda::ops::conv2d::Conv2dDims;
use vaecuda::ops::linear::LinearDims;
use vaecuda::ops::unary::Unary;
use vaecuda::optim::AdamConfig;
use vaecuda::rng::Rng;
use vaecuda::train::{LossConfig, Trainer};
use vaecuda::{Cpu, Tensor};

const RTOL: f64 = 2e-5;

/// The device under test, or None (the test returns) where neither a GPU nor the emulated
/// device is available outside CI.
fn gpu32() -> Option<Cuda<f32>> {
    common::cuda_device::<f32>()
}
fn gpu64() -> Option<Cuda<f64>> {
    common::cuda_device::<f64>()
}

/// Fresh random values in [lo, hi).
fn rnd(rng: &mut Rng, n: usize, lo: f64, hi: f64) -> Vec<f32> {
    (0..n).map(|_| rng.uniform(lo, hi) as f32).collect()
}

/// Compares one output; collects a message on failure.
fn cmp(fails: &mut Vec<String>, what: &str, gpu: &[f32], cpu: &[f32], terms: usize) {
    if gpu.len() != cpu.len() {
        fails.push(format!("{what}: lengths {} vs {}", gpu.len(), cpu.len()));
        return;
    }
    let bound = RTOL * (terms.max(1) as f64).sqrt();
    for (i, (&g, &c)) in gpu.iter().zip(cpu).enumerate() {
        let (g, c) = (g as f64, c as f64);
        let d = (g - c).abs();
        // NaN (e.g. an output the kernel never wrote over the poison) fails too.
        if d.is_nan() || d > bound * (1.0 + c.abs()) {
            fails.push(format!("{what}[{i}]: gpu {g:e}, cpu {c:e} (bound {:e})", bound * (1.0 + c.abs())));
            return;
        }
    }
}

struct Both {
    cpu: Cpu<f32>,
    gpu: Cuda<f32>,
    rng: Rng,
    fails: Vec<String>,
}

impl Both {
    /// A random input on both sides.
    fn input(&mut self, n: usize, lo: f64, hi: f64) -> (Vec<f32>, CudaBuf<f32>) {
        let v = rnd(&mut self.rng, n, lo, hi);
        let g = self.gpu.upload(&v);
        (v, g)
    }
    /// An output poisoned with NaN (for methods that overwrite).
    fn poisoned(&mut self, n: usize) -> (Vec<f32>, CudaBuf<f32>) {
        let v = vec![f32::NAN; n];
        let g = self.gpu.upload(&v);
        (v, g)
    }
    /// An output holding the same random values on both sides (for methods that add into it).
    fn preset(&mut self, n: usize) -> (Vec<f32>, CudaBuf<f32>) {
        self.input(n, -1.0, 1.0)
    }
    fn cmp(&mut self, what: &str, pair: &(Vec<f32>, CudaBuf<f32>), terms: usize) {
        let g = self.gpu.download(&pair.1);
        cmp(&mut self.fails, what, &g, &pair.0, terms);
    }
}

/// Runs `f` with the launch trace on and returns the f32 kernel symbols it launched
/// (`gemm_m16_f32`), so a test can require that its shapes reach every tile shape.
fn launched(f: impl FnOnce()) -> std::collections::BTreeSet<String> {
    use vaecuda::backend::cuda::kernels::KERNELS;
    use vaecuda::backend::cuda::trace::{record, EventKind};
    let ((), events) = record(f);
    events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Launch(l) => Some(format!("{}_f32", KERNELS[l.kernel as usize].name)),
            _ => None,
        })
        .collect()
}

/// Fails unless every kernel of `want` (base names) is in `got`.
fn require_launched(test: &str, got: &std::collections::BTreeSet<String>, want: &[&str]) {
    let missing: Vec<_> = want.iter().filter(|w| !got.contains(&format!("{w}_f32"))).collect();
    assert!(missing.is_empty(), "{test}: its shapes no longer reach {missing:?} (launched {got:?})");
}

fn both() -> Option<Both> {
    Some(Both { cpu: Cpu::default(), gpu: gpu32()?, rng: Rng::new(2024), fails: vec![] })
}

#[test]
fn linear_matches_cpu() {
    let Some(mut t) = both() else { return };
    // Tiny, ragged (not multiples of the 64 tile or the 16 k-step) and the MLP's real shapes.
    // (2000, 1030, 3) takes the split-K path (gemm_splitk + splitk_reduce) in the forward
    // without bias (2 chunks, overwriting a poisoned output) and in backward-weight (3 chunks,
    // accumulating); no other shape here reaches it.
    // The tile shapes and splits come from the shape (`split_k`): the MLP's 128 × 784 → 400
    // forward splits K with its bias (`splitk_reduce_bias`), its 20-wide heads take the
    // 64 × 16 tile and their weight gradients (M = 20) the 16 × 64 one, and a 1000 × 1000
    // output of a short K fills the GPU with 64 × 64 tiles unsplit, an 8000 × 10 one with
    // 64 × 16 tiles; the launches are traced and each required below.
    let shapes = [
        (1, 3, 2),
        (3, 5, 7),
        (130, 65, 67),
        (128, 784, 400),
        (128, 400, 20),
        (17, 1, 33),
        (2000, 1030, 3),
        (1000, 16, 1000),
        (8000, 8, 10),
    ];
    let got = launched(|| linear_cases(&mut t, &shapes));
    assert!(t.fails.is_empty(), "{}", t.fails.join("\n"));
    require_launched(
        "linear_matches_cpu",
        &got,
        &["gemm", "gemm_m16", "gemm_n16", "gemm_splitk", "splitk_reduce", "splitk_reduce_bias"],
    );
}

fn linear_cases(t: &mut Both, shapes: &[(usize, usize, usize)]) {
    for &(n, d_in, d_out) in shapes {
        let d = LinearDims { n, d_in, d_out };
        let tag = format!("n{n} {d_in}->{d_out}");
        let x = t.input(n * d_in, -1.0, 1.0);
        let w = t.input(d_out * d_in, -1.0, 1.0);
        let b = t.input(d_out, -1.0, 1.0);
        for bias in [false, true] {
            let mut y = t.poisoned(n * d_out);
            t.cpu.linear_forward(&x.0, &w.0, bias.then_some(&b.0), &mut y.0, d);
            t.gpu.linear_forward(&x.1, &w.1, bias.then_some(&b.1), &mut y.1, d);
            t.cmp(&format!("linear_forward bias={bias} {tag}"), &y, d_in);
        }
        let dy = t.input(n * d_out, -1.0, 1.0);
        let mut dx = t.preset(n * d_in);
        t.cpu.linear_backward_data(&dy.0, &w.0, &mut dx.0, d);
        t.gpu.linear_backward_data(&dy.1, &w.1, &mut dx.1, d);
        t.cmp(&format!("linear_backward_data {tag}"), &dx, d_out);
        let mut dw = t.preset(d_out * d_in);
        t.cpu.linear_backward_weight(&dy.0, &x.0, &mut dw.0, d);
        t.gpu.linear_backward_weight(&dy.1, &x.1, &mut dw.1, d);
        t.cmp(&format!("linear_backward_weight {tag}"), &dw, n);
        let mut db = t.preset(d_out);
        t.cpu.bias_backward(&dy.0, &mut db.0, n, d_out, 1);
        t.gpu.bias_backward(&dy.1, &mut db.1, n, d_out, 1);
        t.cmp(&format!("bias_backward {tag}"), &db, n);
    }
}

#[test]
fn conv2d_matches_cpu() {
    let Some(mut t) = both() else { return };
    // (n, c_in, h, w, c_out, k, stride, pad): the common cases' shapes, 1-channel inputs and
    // outputs, and the conv VAE's real layers (whose weight gradients take the split-K path).
    // Non-square kernels (kh ≠ kw: a swapped kh/kw would pass every square case), stride 3
    // and padding 2 are here too. Tuples: (n, c_in, h, w, c_out, kh, kw, stride, pad).
    let shapes = [
        (1, 1, 5, 5, 1, 3, 3, 1, 0),
        (2, 3, 7, 6, 2, 3, 3, 2, 1),
        (1, 2, 5, 8, 4, 3, 3, 2, 0),
        (2, 2, 6, 7, 3, 2, 2, 2, 1),
        (3, 5, 9, 11, 70, 3, 3, 1, 1),
        (2, 3, 9, 7, 5, 3, 2, 2, 1),
        (1, 2, 6, 11, 3, 1, 4, 3, 2),
        (2, 2, 10, 9, 67, 5, 3, 3, 2),
        (16, 1, 28, 28, 32, 3, 3, 1, 1),
        (16, 32, 28, 28, 64, 3, 3, 2, 1),
        (16, 64, 14, 14, 128, 3, 3, 2, 1),
        (16, 32, 28, 28, 1, 3, 3, 1, 1),
        // Phases of a stride-2 backward-data with 4 × 4 taps on odd sizes (ragged phases),
        // and the conv VAE's one-channel transposed output (backward-data with c_in = 1).
        (4, 3, 9, 7, 8, 4, 4, 2, 1),
        (8, 1, 28, 28, 32, 4, 4, 2, 1),
        // 1 × 1 convolutions whose forward (M = 128 channels out) and backward-data (M = 128
        // in) have enough 64 × 64 tiles (2 × 62) to fill the GPU without small ones.
        (20, 4, 14, 14, 128, 1, 1, 1, 0),
        (20, 128, 14, 14, 4, 1, 1, 1, 0),
    ];
    let got = launched(|| conv_cases(&mut t, &shapes));
    assert!(t.fails.is_empty(), "{}", t.fails.join("\n"));
    require_launched(
        "conv2d_matches_cpu",
        &got,
        &["conv2d_fwd", "conv2d_fwd_m16", "conv2d_bwd_data", "conv2d_bwd_data_m16", "conv2d_bwd_weight"],
    );
}

type ConvShape = (usize, usize, usize, usize, usize, usize, usize, usize, usize);

fn conv_cases(t: &mut Both, shapes: &[ConvShape]) {
    for &(n, c_in, h, w, c_out, kh, kw, s, p) in shapes {
        let d = Conv2dDims::new(n, c_in, h, w, c_out, kh, kw, s, p);
        let k = kh * kw;
        let tag = format!("n{n} {c_in}x{h}x{w}->{c_out} k{kh}x{kw} s{s} p{p}");
        let x = t.input(d.x_len(), -1.0, 1.0);
        let wt = t.input(d.w_len(), -1.0, 1.0);
        let b = t.input(c_out, -1.0, 1.0);
        for bias in [false, true] {
            let mut y = t.poisoned(d.y_len());
            t.cpu.conv2d_forward(&x.0, &wt.0, bias.then_some(&b.0), &mut y.0, d);
            t.gpu.conv2d_forward(&x.1, &wt.1, bias.then_some(&b.1), &mut y.1, d);
            t.cmp(&format!("conv2d_forward bias={bias} {tag}"), &y, c_in * k);
        }
        let dy = t.input(d.y_len(), -1.0, 1.0);
        let mut dx = t.preset(d.x_len());
        t.cpu.conv2d_backward_data(&dy.0, &wt.0, &mut dx.0, d);
        t.gpu.conv2d_backward_data(&dy.1, &wt.1, &mut dx.1, d);
        t.cmp(&format!("conv2d_backward_data {tag}"), &dx, c_out * k);
        let mut dw = t.preset(d.w_len());
        t.cpu.conv2d_backward_weight(&dy.0, &x.0, &mut dw.0, d);
        t.gpu.conv2d_backward_weight(&dy.1, &x.1, &mut dw.1, d);
        t.cmp(&format!("conv2d_backward_weight {tag}"), &dw, n * d.oh * d.ow);
        let l = d.oh * d.ow;
        let mut y = t.preset(d.y_len());
        t.cpu.bias_add(&mut y.0, &b.0, n, c_out, l);
        t.gpu.bias_add(&mut y.1, &b.1, n, c_out, l);
        t.cmp(&format!("bias_add {tag}"), &y, 1);
        let mut db = t.preset(c_out);
        t.cpu.bias_backward(&dy.0, &mut db.0, n, c_out, l);
        t.gpu.bias_backward(&dy.1, &mut db.1, n, c_out, l);
        t.cmp(&format!("bias_backward {tag}"), &db, n * l);
    }
}

/// The tensor-core kernels (`--precision tf32` and `bf16`) against the CPU backend at the same
/// precision, which rounds the operands exactly as they are staged (TF32: nearest, ties away,
/// as `cvt.rna`; BF16: nearest even, as `cvt.rn`). The products of rounded operands are exact
/// in f32 on both sides (11 + 11 and 8 + 8 significant bits), so only the order and grouping
/// of the f32 sums differ (an mma adds 8 or 16 products and rounds once; on a GPU its internal
/// truncation costs a few ulps of the largest addend more): the f32 bound RTOL·√terms holds,
/// while a fragment read from the wrong element, an unrounded operand or a wrong precision
/// fails by orders of magnitude (a TF32 rounding alone is 2^-11 relative, ~50× RTOL).
#[test]
fn tensor_core_products_match_cpu_at_their_precision() {
    use vaecuda::backend::Precision;
    for (p, tag) in [(Precision::Tf32, "tf32"), (Precision::Bf16, "bf16")] {
        let Some(gpu) = gpu32() else { return };
        let mut t = Both { cpu: Cpu::with_precision(p), gpu: gpu.with_precision(p), rng: Rng::new(77), fails: vec![] };
        // Ragged shapes, a split forward with bias (64 × 512 → 64: one tile, K in chunks), a
        // 20-wide head. Small: the emulated mma is slow.
        let lin = [(3, 5, 7), (130, 65, 67), (64, 512, 64), (128, 100, 20)];
        let conv: [ConvShape; 4] = [
            (2, 3, 7, 6, 2, 3, 3, 2, 1),
            (3, 5, 9, 11, 70, 3, 3, 1, 1),
            (4, 3, 9, 7, 8, 4, 4, 2, 1),
            (4, 8, 14, 14, 1, 3, 3, 1, 1),
        ];
        let got = launched(|| {
            linear_cases(&mut t, &lin);
            conv_cases(&mut t, &conv);
        });
        assert!(t.fails.is_empty(), "{tag}:\n{}", t.fails.join("\n"));
        let want: Vec<String> = ["gemm", "gemm_splitk", "conv2d_fwd", "conv2d_bwd_data", "conv2d_bwd_weight"]
            .iter()
            .map(|k| format!("{k}_{tag}"))
            .collect();
        require_launched(tag, &got, &want.iter().map(String::as_str).collect::<Vec<_>>());
        // No FMA tile kernel runs at a tensor-core precision.
        assert!(!got.contains("gemm_f32") && !got.contains("conv2d_fwd_f32"), "{tag}: {got:?}");
    }
}

#[test]
fn batch_norm_matches_cpu() {
    let Some(mut t) = both() else { return };
    // (1, 3, 1): one element per channel (m = 1: the unbiased variance falls back to the biased).
    // Several chunks per channel (kernels.rs, channel_chunks): (128, 32, 196) cuts each channel
    // into 33 chunks (more than one warp's lanes in stage 2, the last chunk ragged, chunk
    // boundaries inside rows); (3, 2, 700) rows longer than a block; (40, 3, 33) two chunks
    // whose boundary falls inside a row shorter than a block.
    let shapes = [
        (2, 3, 6),
        (4, 1, 1),
        (5, 3, 1),
        (1, 3, 1),
        (128, 32, 196),
        (128, 64, 49),
        (7, 300, 3),
        (3, 2, 700),
        (40, 3, 33),
    ];
    for &(outer, c, inner) in &shapes {
        let len = outer * c * inner;
        // The activations fused after the affine transform: all of them at the small shapes,
        // ReLU (the conv-bn VAE's) at the large ones.
        let acts: &[Option<Unary>] = if len > 100_000 {
            &[None, Some(Unary::Relu)]
        } else {
            &[None, Some(Unary::Relu), Some(Unary::LeakyRelu(0.2)), Some(Unary::Sigmoid), Some(Unary::Tanh)]
        };
        for &act in acts {
            let d = BatchNormDims { outer, channels: c, inner, eps: 1e-5, momentum: 0.1, act };
            let tag = format!("{outer}x{c}x{inner} {act:?}");
            batch_norm_case(&mut t, d, &tag);
        }
    }
    assert!(t.fails.is_empty(), "{}", t.fails.join("\n"));
}

/// One batch-norm shape (and fused activation) through every method, CPU against GPU.
fn batch_norm_case(t: &mut Both, d: BatchNormDims, tag: &str) {
    let (c, len, m) = (d.channels, d.outer * d.channels * d.inner, d.outer * d.inner);
    // Offset data: a mean far from 0 tests the one-pass variance.
    let x = t.input(len, 2.0, 4.0);
    let g = t.input(c, 0.5, 1.5);
    let be = t.input(c, -1.0, 1.0);
    let mut y = t.poisoned(len);
    let (mut sm, mut si) = (t.poisoned(c), t.poisoned(c));
    let (mut rm, mut rv) = (t.preset(c), t.input(c, 0.5, 1.5));
    t.cpu.batch_norm_forward_train(&x.0, &g.0, &be.0, &mut y.0, &mut sm.0, &mut si.0, &mut rm.0, &mut rv.0, d);
    t.gpu.batch_norm_forward_train(&x.1, &g.1, &be.1, &mut y.1, &mut sm.1, &mut si.1, &mut rm.1, &mut rv.1, d);
    for (name, pair) in
        [("y", &y), ("save_mean", &sm), ("save_invstd", &si), ("running_mean", &rm), ("running_var", &rv)]
    {
        let gv = t.gpu.download(&pair.1);
        cmp(&mut t.fails, &format!("bn_forward_train {name} {tag}"), &gv, &pair.0, m);
    }
    let mut ye = t.poisoned(len);
    t.cpu.batch_norm_forward_eval(&x.0, &g.0, &be.0, &rm.0, &rv.0, &mut ye.0, d);
    t.gpu.batch_norm_forward_eval(&x.1, &g.1, &be.1, &rm.1, &rv.1, &mut ye.1, d);
    t.cmp(&format!("bn_forward_eval {tag}"), &ye, 1);
    let dy = t.input(len, -1.0, 1.0);
    // With an activation, both sides differentiate it at the same output (the CPU's y), so a
    // ReLU output within rounding of 0 cannot flip its derivative on one side only.
    let y_in = d.act.map(|_| (y.0.clone(), t.gpu.upload(&y.0)));
    // Every subset of the optional outputs (with an activation, or at the large shapes, whose
    // point is the chunks: all of them, and without dx).
    let masks: &[u32] = if d.act.is_none() && len <= 100_000 { &[1, 2, 3, 4, 5, 6, 7] } else { &[7, 6] };
    for &mask in masks {
        let (mut dx, mut dg, mut db) = (t.preset(len), t.preset(c), t.preset(c));
        let (want_dx, want_dg, want_db) = (mask & 1 != 0, mask & 2 != 0, mask & 4 != 0);
        t.cpu.batch_norm_backward(
            &dy.0,
            y_in.as_ref().map(|y| &y.0),
            &x.0,
            &g.0,
            &sm.0,
            &si.0,
            want_dx.then_some(&mut dx.0),
            want_dg.then_some(&mut dg.0),
            want_db.then_some(&mut db.0),
            d,
        );
        t.gpu.batch_norm_backward(
            &dy.1,
            y_in.as_ref().map(|y| &y.1),
            &x.1,
            &g.1,
            &sm.1,
            &si.1,
            want_dx.then_some(&mut dx.1),
            want_dg.then_some(&mut dg.1),
            want_db.then_some(&mut db.1),
            d,
        );
        t.cmp(&format!("bn_backward dx mask{mask} {tag}"), &dx, m);
        t.cmp(&format!("bn_backward dgamma mask{mask} {tag}"), &dg, m);
        t.cmp(&format!("bn_backward dbeta mask{mask} {tag}"), &db, m);
    }
}

#[test]
fn elementwise_and_reductions_match_cpu() {
    let Some(mut t) = both() else { return };
    // 2_500_001 > 8192·256 (the 1-D launch's grid cap): the grid-stride loops take a second lap.
    // Every variant of an op (activation, which gradients flow, weight decay) at the small
    // sizes; at the two large ones, whose point is the grid-stride loops (shared by every
    // variant of a kernel), one variant each: on the emulated device these sizes cost most.
    for &n in &[1usize, 5, 257, 100_003, 1 << 20, 2_500_001] {
        let large = n > 100_003;
        let x = t.input(n, -3.0, 3.0);
        let a = t.input(n, -1.0, 1.0);
        let activations = [Unary::Relu, Unary::Sigmoid, Unary::Tanh, Unary::LeakyRelu(0.2)];
        for op in if large { &activations[1..2] } else { &activations[..] } {
            let op = *op;
            let mut y = t.poisoned(n);
            t.cpu.unary_forward(op, &x.0, &mut y.0);
            t.gpu.unary_forward(op, &x.1, &mut y.1);
            t.cmp(&format!("{op:?} forward n{n}"), &y, 1);
            let mut dx = t.preset(n);
            t.cpu.unary_backward(op, &x.0, &y.0, &a.0, &mut dx.0);
            t.gpu.unary_backward(op, &x.1, &y.1, &a.1, &mut dx.1);
            t.cmp(&format!("{op:?} backward n{n}"), &dx, 1);
        }
        let mut y = t.poisoned(n);
        t.cpu.mul(&x.0, &a.0, &mut y.0);
        t.gpu.mul(&x.1, &a.1, &mut y.1);
        t.cmp(&format!("mul n{n}"), &y, 1);
        let mut y = t.preset(n);
        t.cpu.mul_accumulate(&x.0, &a.0, &mut y.0);
        t.gpu.mul_accumulate(&x.1, &a.1, &mut y.1);
        t.cmp(&format!("mul_accumulate n{n}"), &y, 1);
        let mut y = t.preset(n);
        t.cpu.axpy(-0.75, &x.0, &mut y.0);
        t.gpu.axpy(-0.75, &x.1, &mut y.1);
        t.cmp(&format!("axpy n{n}"), &y, 1);
        let mut y = t.poisoned(n);
        t.cpu.fill(&mut y.0, 1.25);
        t.gpu.fill(&mut y.1, 1.25);
        t.cmp(&format!("fill n{n}"), &y, 1);
        let mut y = t.poisoned(n);
        t.cpu.copy(&x.0, &mut y.0);
        t.gpu.copy(&x.1, &mut y.1);
        t.cmp(&format!("copy n{n}"), &y, 1);
        let mut s = t.poisoned(1);
        t.cpu.sum(&x.0, &mut s.0);
        t.gpu.sum(&x.1, &mut s.1);
        t.cmp(&format!("sum n{n}"), &s, n);
        let dout = t.input(1, -2.0, 2.0);
        let mut dx = t.preset(n);
        t.cpu.broadcast_scalar_accumulate(&dout.0, 0.5, &mut dx.0);
        t.gpu.broadcast_scalar_accumulate(&dout.1, 0.5, &mut dx.1);
        t.cmp(&format!("broadcast_scalar_accumulate n{n}"), &dx, 1);
        // Losses on probabilities in (0, 1) (and exact 0/1 for BCE's clamp), targets in [0, 1].
        let mut p = t.input(n, 0.001, 0.999);
        if n > 2 {
            p.0[0] = 0.0;
            p.0[1] = 1.0;
            p.1 = t.gpu.upload(&p.0);
        }
        let tg = t.input(n, 0.0, 1.0);
        for kind in [Recon::Bce, Recon::BceWithLogits, Recon::Mse] {
            let input = if kind == Recon::BceWithLogits { &x } else { &p };
            let mut l = t.poisoned(1);
            t.cpu.recon_loss_forward(kind, &input.0, &tg.0, &mut l.0);
            t.gpu.recon_loss_forward(kind, &input.1, &tg.1, &mut l.1);
            t.cmp(&format!("{kind:?} forward n{n}"), &l, n);
            if kind == Recon::Bce && n > 2 {
                continue; // the gradient at p = 0 or 1 is PyTorch's huge 1e12-scaled value
            }
            let mut dx = t.preset(n);
            t.cpu.recon_loss_backward(kind, &input.0, &tg.0, &dout.0, &mut dx.0);
            t.gpu.recon_loss_backward(kind, &input.1, &tg.1, &dout.1, &mut dx.1);
            t.cmp(&format!("{kind:?} backward n{n}"), &dx, 1);
        }
        // Reparameterization + KL, with every combination of incoming gradients (small sizes).
        let lv = t.input(n, -2.0, 1.0);
        let eps = t.input(n, -2.0, 2.0);
        let (mut z, mut kl) = (t.poisoned(n), t.poisoned(1));
        t.cpu.reparam_kl_forward(&a.0, &lv.0, &eps.0, &mut z.0, &mut kl.0);
        t.gpu.reparam_kl_forward(&a.1, &lv.1, &eps.1, &mut z.1, &mut kl.1);
        t.cmp(&format!("reparam z n{n}"), &z, 1);
        t.cmp(&format!("reparam kl n{n}"), &kl, n);
        let dz = t.input(n, -1.0, 1.0);
        // Bits 0, 1: dz, dkl present; bits 2, 3: dmu, dlogvar absent (an absent output's
        // buffer must stay as preset).
        for mask in if large { 3..4 } else { 0..16u32 } {
            let (hz, hk, wmu, wlv) = (mask & 1 != 0, mask & 2 != 0, mask & 4 == 0, mask & 8 == 0);
            let (mut dmu, mut dlv) = (t.preset(n), t.preset(n));
            t.cpu.reparam_kl_backward(
                &a.0,
                &lv.0,
                &eps.0,
                hz.then_some(&dz.0),
                hk.then_some(&dout.0),
                wmu.then_some(&mut dmu.0),
                wlv.then_some(&mut dlv.0),
            );
            t.gpu.reparam_kl_backward(
                &a.1,
                &lv.1,
                &eps.1,
                hz.then_some(&dz.1),
                hk.then_some(&dout.1),
                wmu.then_some(&mut dmu.1),
                wlv.then_some(&mut dlv.1),
            );
            t.cmp(&format!("reparam dmu mask{mask} n{n}"), &dmu, 1);
            t.cmp(&format!("reparam dlogvar mask{mask} n{n}"), &dlv, 1);
        }
        // Adam: plain, L2 and decoupled decay, at step 3.
        let decays = [(0.01, true), (0.0, false), (0.01, false)];
        for &(wd, dec) in if large { &decays[..1] } else { &decays[..] } {
            let s = AdamStep::new(1e-3, 0.9, 0.999, 1e-8, wd, dec, 3);
            let (mut p, mut m, mut v) = (t.preset(n), t.preset(n), t.input(n, 0.0, 1.0));
            t.cpu.adam_step(&mut p.0, &a.0, &mut m.0, &mut v.0, s);
            t.gpu.adam_step(&mut p.1, &a.1, &mut m.1, &mut v.1, s);
            for (name, pair) in [("param", &p), ("m", &m), ("v", &v)] {
                let g = t.gpu.download(&pair.1);
                cmp(&mut t.fails, &format!("adam {name} wd{wd} decoupled={dec} n{n}"), &g, &pair.0, 1);
            }
        }
    }
    // gather_rows: rows picked out of order, with repeats; then more rows than the device
    // index buffer holds (it is regrown) and fewer (reused while the earlier gathers may still
    // be queued), all checked only after the last one.
    let (rows, row_len) = (50, 784);
    let src = t.input(rows * row_len, 0.0, 1.0);
    let mut gathered = vec![];
    for (count, mul) in [(37usize, 7usize), (100, 13), (5, 3)] {
        let idx: Vec<u32> = (0..count).map(|r| ((r * mul + 3) % rows) as u32).collect();
        let mut dst = t.poisoned(idx.len() * row_len);
        t.cpu.gather_rows(&src.0, row_len, &idx, &mut dst.0);
        t.gpu.gather_rows(&src.1, row_len, &idx, &mut dst.1);
        gathered.push((count, dst));
    }
    for (count, dst) in &gathered {
        t.cmp(&format!("gather_rows {count} rows"), dst, 1);
    }
    assert!(t.fails.is_empty(), "{}", t.fails.join("\n"));
}

/// `gather_rows_u8` (a batch of u8 pixels gathered as floats in [0, 1]) equals the CPU twin
/// bit for bit, in f32 and f64: random bytes (0 and 255 included), rows out of order with
/// repeats, ragged row lengths and a 64×64 RGB row, outputs poisoned first; and f32 pixels
/// equal `b as f32 / 255.0`, what the host conversion gave before pixels stayed bytes.
#[test]
fn gather_rows_u8_matches_cpu() {
    fn run<E: vaecuda::backend::cuda::CudaFloat>(gpu: Cuda<E>, rng: &mut Rng, fails: &mut Vec<String>) {
        let cpu = Cpu::<E>::default();
        for &(rows, row_len) in &[(1usize, 1usize), (9, 7), (50, 784), (40, 3 * 64 * 64)] {
            let mut bytes: Vec<u8> = (0..rows * row_len).map(|_| (rng.next_u64() & 0xff) as u8).collect();
            bytes[0] = 255;
            if bytes.len() > 1 {
                bytes[1] = 0;
            }
            let bytes = std::sync::Arc::new(bytes);
            let (src_cpu, src_gpu) = (cpu.upload_bytes(&bytes), gpu.upload_bytes(&bytes));
            assert_eq!(gpu.bytes_len(&src_gpu), bytes.len());
            for count in [1usize, 3, 2 * rows + 1] {
                let idx: Vec<u32> = (0..count).map(|_| (rng.next_u64() % rows as u64) as u32).collect();
                let n = count * row_len;
                let mut want = vec![E::nan(); n];
                let mut got = gpu.upload(&vec![E::nan(); n]);
                cpu.gather_rows_u8(&src_cpu, row_len, &idx, &mut want);
                gpu.gather_rows_u8(&src_gpu, row_len, &idx, &mut got);
                let got = gpu.download(&got);
                let what = format!("gather_rows_u8_{} {count} rows of {row_len}", E::NAME);
                if let Some(i) = (0..n).find(|&i| got[i].f64().to_bits() != want[i].f64().to_bits()) {
                    fails.push(format!("{what}[{i}]: gpu {:e}, cpu {:e}", got[i].f64(), want[i].f64()));
                }
                // The reference itself: byte / 255 at the element type's precision.
                let r = (idx[0] as usize) * row_len;
                if want[0].f64() != E::of(bytes[r] as f64 / 255.0).f64() && E::NAME == "f64" {
                    fails.push(format!("{what}: cpu {:e} is not {} / 255", want[0].f64(), bytes[r]));
                }
            }
        }
    }
    let mut rng = Rng::new(77);
    let mut fails = vec![];
    let Some(g32) = gpu32() else { return };
    run(g32, &mut rng, &mut fails);
    // f32 pixels are what the host computed before (b as f32 / 255.0), bit for bit.
    let bytes = std::sync::Arc::new((0..=255u8).collect::<Vec<u8>>());
    let mut out = vec![f32::NAN; 256];
    Cpu::<f32>::default().gather_rows_u8(&bytes, 256, &[0], &mut out);
    for (b, v) in out.iter().enumerate() {
        if v.to_bits() != (b as f32 / 255.0).to_bits() {
            fails.push(format!("cpu gather_rows_u8 of {b} gave {v:e}, not {:e}", b as f32 / 255.0));
        }
    }
    if let Some(g64) = gpu64() {
        run(g64, &mut rng, &mut fails);
    }
    assert!(fails.is_empty(), "{}", fails.join("\n"));
}

/// `zeros` really zeroes a buffer the pool hands out again (one that held NaN), and `upload`
/// overwrites one; the second round makes no new device allocation (the buffers were reused).
#[test]
fn pool_reuse_zeros_and_overwrites() {
    let Some(gpu) = gpu32() else { return };
    let mut fails = vec![];
    for &n in &[1usize, 1000, 3_000_001] {
        drop(gpu.upload(&vec![f32::NAN; n]));
        let before = gpu.device_allocations();
        let z = gpu.zeros(n);
        cmp(&mut fails, &format!("zeros({n}) on a reused buffer"), &gpu.download(&z), &vec![0.0; n], 1);
        let fresh: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
        drop(z);
        let u = gpu.upload(&fresh);
        cmp(&mut fails, &format!("upload({n}) into a reused buffer"), &gpu.download(&u), &fresh, 1);
        if gpu.device_allocations() != before {
            fails.push(format!("n{n}: the pool allocated instead of reusing a freed buffer"));
        }
    }
    assert!(fails.is_empty(), "{}", fails.join("\n"));
}

/// Every op case of `tests/common` through the tape (forward and every input's gradient).
#[test]
fn every_op_case_on_the_tape_matches_cpu() {
    let Some(gpu) = gpu32() else { return };
    let cpu = Cpu::<f32>::default();
    let mut fails = vec![];
    for case in common::all_cases() {
        let (yc, gc) = common::forward_backward(&cpu, &case);
        let (yg, gg) = common::forward_backward(&gpu, &case);
        let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        // The cases are small: at most a few hundred terms per output.
        cmp(&mut fails, &format!("{} forward", case.name), &f(&yg), &f(&yc), 400);
        for (i, (a, b)) in gg.iter().zip(&gc).enumerate() {
            cmp(&mut fails, &format!("{} grad of input {i}", case.name), &f(a), &f(b), 400);
        }
    }
    assert!(fails.is_empty(), "{}", fails.join("\n"));
}

/// f64 central differences of every op, computed entirely on the GPU.
#[test]
fn every_op_gradient_checks_in_f64_on_gpu() {
    let Some(be) = gpu64() else { return };
    let mut failures = vec![];
    for case in &common::all_cases() {
        let result = check(&be, &case.inputs, true, GradCheck::default(), |tape, vars| {
            let y = case.run(tape, vars);
            weighted_sum(tape, y, 5)
        });
        if let Err(e) = result {
            failures.push(format!("{}: {e}", case.name));
        }
    }
    assert!(failures.is_empty(), "gradient check on the GPU failed:\n{}", failures.join("\n"));
}

/// The whole conv-BN VAE's gradients against finite differences, on the GPU in f64: 4 entries
/// of every parameter tensor at batch 2 (tests/gradcheck.rs checks the MNIST model on the CPU
/// at batch 3 with 8 entries). On the emulated device the model's widths are a quarter of
/// MNIST's (8, 16, 32 channels: the same layers, ops and shapes but for the channel counts):
/// each entry costs two forward passes, and there a batch-norm block of 256 threads switches
/// all of them at every warp-level call of its reductions, one block per channel at this
/// batch, so the full widths took over a minute of the suite's 4.
#[test]
fn whole_conv_bn_model_gradient_checks_on_gpu() {
    let Some(be) = gpu64() else { return };
    let mut config = ModelConfig::mnist(Arch::ConvBn);
    if common::on_emulator() {
        config.hiddens = config.hiddens.iter().map(|w| w / 4).collect();
    }
    common::whole_model_gradcheck(&be, config, 2, 4).unwrap_or_else(|e| panic!("{e}"));
}

fn batch<B: Backend<E = f32>>(be: &B, seed: u64, n: usize) -> Tensor<B> {
    let mut rng = Rng::new(seed);
    let d: Vec<f32> = (0..n * 784).map(|_| rng.next_f64() as f32).collect();
    Tensor::from_host(be, &[n, 1, 28, 28], &d)
}

/// One training step from the same weights, data and noise on both backends: the losses, every
/// gradient and every updated weight agree.
fn training_step_matches(arch: Arch) {
    let Some(gpu) = gpu32() else { return };
    let cpu = Cpu::<f32>::default();
    let cfg = ModelConfig::mnist(arch);
    let mut tc = Trainer::new(cpu.clone(), cfg.clone(), LossConfig::default(), AdamConfig::default(), 5);
    let mut tg = Trainer::new(gpu.clone(), cfg, LossConfig::default(), AdamConfig::default(), 5);
    let n = 16;
    // The noise of the stream's second draw. With the first, the conv VAE's gradients upstream
    // of its decoder's first transposed convolution differ between the f32 backends by up to
    // 0.5% of their largest value, and those downstream by 2e-7: a ReLU there sits within f32
    // rounding of its kink for one unit and the two backends' sums (in different orders) fall
    // on either side. Rounding, not a bug: the same step in f64 agrees between the backends
    // to 1e-15 relative, and the f32 CPU differs from the f64 CPU exactly as from the f32
    // device (the device's f32 fell on the f64 side). Draw 1's encoder gradients agree to 5e-7.
    tc.noise.draws = 1;
    tg.noise.draws = 1;
    let lc = tc.step(batch(&cpu, 9, n), 1.0).expect("finite CPU loss");
    let lg = tg.step(batch(&gpu, 9, n), 1.0).expect("finite GPU loss");
    let mut fails = vec![];
    // The loss sums n·784 BCE terms.
    for (name, g, c) in [("loss", lg.loss, lc.loss), ("recon", lg.recon, lc.recon), ("kl", lg.kl, lc.kl)] {
        cmp(&mut fails, &format!("{arch:?} {name}"), &[g as f32], &[c as f32], n * 784);
    }
    // The largest gradient anywhere in the network.
    let global = (0..tc.store.len())
        .filter_map(|i| tc.store.grads[i].as_ref())
        .flat_map(|g| g.to_host(&cpu))
        .fold(0f32, |m, v| m.max(v.abs()));
    for i in 0..tc.store.len() {
        let name = &tc.store.names[i];
        if let (Some(gc), Some(gg)) = (&tc.store.grads[i], &tg.store.grads[i]) {
            // Gradients are sums over the batch and the whole network: compare relative to the
            // tensor's largest gradient (a tiny entry may be pure cancellation noise), but never
            // to less than 1e-3 of the network's largest. A conv bias right before a
            // training-mode batch norm has a gradient of exactly zero in exact arithmetic (the
            // normalization subtracts it out again); both backends return rounding noise of
            // ~1e-7 there, which must not be compared with itself. (Found by the emulated device.)
            let (c, g) = (gc.to_host(&cpu), gg.to_host(&gpu));
            let scale = c.iter().fold(0f32, |m, v| m.max(v.abs())).max(global * 1e-3).max(1e-30);
            let (c, g): (Vec<f32>, Vec<f32>) = c.iter().zip(&g).map(|(a, b)| (a / scale, b / scale)).unzip();
            cmp(&mut fails, &format!("{arch:?} grad {name} (÷{scale:e})"), &g, &c, 2500);
        }
        // After one Adam step every weight moved by about lr·sign(g): where a gradient is
        // cancellation noise its sign may differ, so weights agree within 2·lr.
        let (c, g) = (tc.store.values[i].to_host(&cpu), tg.store.values[i].to_host(&gpu));
        if let Some((j, (a, b))) = c.iter().zip(&g).enumerate().find(|(_, (a, b))| (*a - *b).abs() > 2.1e-3) {
            fails.push(format!("{arch:?} weight {name}[{j}]: cpu {a}, gpu {b}"));
        }
    }
    assert!(fails.is_empty(), "{}", fails.join("\n"));
}

#[test]
fn mlp_training_step_matches_cpu() {
    training_step_matches(Arch::Mlp);
}

#[test]
fn conv_training_step_matches_cpu() {
    training_step_matches(Arch::Conv);
}

#[test]
fn conv_bn_training_step_matches_cpu() {
    training_step_matches(Arch::ConvBn);
}

/// Steps captured as CUDA graphs and replayed give the same bits as eager steps: losses,
/// weights, Adam moments and batch-norm running statistics, through a capture, replays with new
/// batches and noise (copied into the graph's inputs) and new Adam constants (staged before
/// each replay), a batch of another size and a step with another KL weight (both eager) and a
/// return to the captured shape; and evaluation batches likewise.
#[test]
fn graph_steps_equal_eager_steps() {
    use vaecuda::backend::cuda::trace::{record, EventKind};
    let Some(gpu) = gpu32() else { return };
    // Conv-bn covers every kind of step kernel (convolutions, batch norm and its running
    // statistics, split-K, reductions); at a quarter of its width the emulated device runs it
    // fast, and graphs do not depend on widths.
    let mut config = ModelConfig::mnist(Arch::ConvBn);
    config.hiddens = config.hiddens.iter().map(|w| w / 4).collect();
    // (batch, KL weight) of each step: 1 eager, 2 captured, 3-4 replayed, 5 and 7 eager.
    let steps = [(8, 1.0), (8, 1.0), (8, 1.0), (8, 1.0), (5, 1.0), (8, 1.0), (8, 0.5)];
    let run = |graphs: bool| {
        let be = gpu.with_graphs(graphs);
        let mut t = Trainer::new(be.clone(), config.clone(), LossConfig::default(), AdamConfig::default(), 11);
        let (mut losses, mut evals) = (vec![], vec![]);
        let ((), events) = record(|| {
            for (i, &(n, kl)) in steps.iter().enumerate() {
                let l = t.step(batch(&be, 40 + i as u64, n), kl).expect("a finite loss");
                losses.push([l.loss, l.recon, l.kl].map(f64::to_bits));
            }
            for i in 0..3 {
                let l = t.evaluate(batch(&be, 60 + i, 8), 1.0);
                evals.push([l.loss, l.recon, l.kl].map(f64::to_bits));
            }
        });
        let replays = events.iter().filter(|e| e.kind == EventKind::GraphLaunch).count();
        let bits = |b: &CudaBuf<f32>| be.download(b).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let mut state: Vec<Vec<u32>> = t.store.values.iter().map(|v| bits(&v.buf)).collect();
        state.extend(t.adam.m.iter().chain(&t.adam.v).flatten().map(bits));
        (losses, evals, state, replays)
    };
    let (eager, graph) = (run(false), run(true));
    assert_eq!(eager.3, 0, "graphs were replayed with graphs off");
    // Training: the capture (run once after it) and 3 replays; evaluation: the same, 1 replay.
    assert_eq!(graph.3, 6, "replays of captured graphs");
    for (i, (e, g)) in eager.0.iter().zip(&graph.0).enumerate() {
        assert_eq!(e, g, "step {}: losses (loss, recon, kl bits) differ, eager vs graph", i + 1);
    }
    assert_eq!(eager.1, graph.1, "evaluation losses differ, eager vs graph");
    for (i, (e, g)) in eager.2.iter().zip(&graph.2).enumerate() {
        assert!(e == g, "weights, moments or running statistics differ after the run, tensor {i}");
    }
}

/// Two seeded runs of a few steps are bitwise identical (no atomics, fixed reduction orders),
/// and once three steps have run (the second captures a graph, which keeps its own memory),
/// the memory pool makes no new device allocation.
#[test]
fn seeded_gpu_runs_are_bitwise_identical() {
    let Some(gpu) = gpu32() else { return };
    for arch in [Arch::Mlp, Arch::ConvBn] {
        let run = || {
            let mut t =
                Trainer::new(gpu.clone(), ModelConfig::mnist(arch), LossConfig::default(), AdamConfig::default(), 3);
            let mut losses = vec![];
            let mut allocs = vec![];
            for s in 0..4 {
                // Batches of 8: the property is the same at any size, and on the emulated
                // device the conv-bn steps cost in proportion to it.
                losses.push(t.step(batch(&gpu, 100 + s, 8), 1.0).expect("finite loss").loss.to_bits());
                allocs.push(gpu.device_allocations());
            }
            let weights: Vec<Vec<u32>> =
                t.store.values.iter().map(|v| v.to_host(&gpu).iter().map(|x| x.to_bits()).collect()).collect();
            (losses, weights, allocs)
        };
        let (l1, w1, a1) = run();
        let (l2, w2, _) = run();
        assert_eq!(l1, l2, "{arch:?}: losses differ between seeded runs");
        assert!(w1 == w2, "{arch:?}: weights differ between seeded runs");
        assert_eq!(a1[2], a1[3], "{arch:?}: device allocations after the third step: {a1:?}");
    }
}

/// On the emulated device a block's threads run in a chosen order between two barriers. The
/// kernels are race-free, so every op's output and gradients must be the same to the bit in
/// every order: a missing `__syncthreads` lets one thread read what another has not written
/// yet (or has already overwritten) in some order, and shows here.
#[test]
fn results_do_not_depend_on_the_order_of_threads() {
    use vaecuda::backend::cuda::emu::{set_thread_order, ThreadOrder};
    let Some(gpu) = gpu32() else { return };
    if !common::on_emulator() {
        eprintln!("note: thread orders can only be chosen on the emulated device");
        return;
    }
    let cases = common::all_cases();
    let run = |order: ThreadOrder| {
        set_thread_order(order).unwrap();
        let bits: Vec<Vec<u64>> = cases
            .iter()
            .map(|case| {
                let (y, g) = common::forward_backward(&gpu, case);
                y.iter().chain(g.iter().flatten()).map(|v| v.to_bits()).collect()
            })
            .collect();
        bits
    };
    let orders = [ThreadOrder::Forward, ThreadOrder::Reverse, ThreadOrder::Shuffled(1), ThreadOrder::Shuffled(2)];
    let results: Vec<_> = orders.iter().map(|&o| run(o)).collect();
    set_thread_order(ThreadOrder::Shuffled(0x5EED)).unwrap();
    for (o, r) in orders.iter().zip(&results).skip(1) {
        for (case, (a, b)) in cases.iter().zip(results[0].iter().zip(r)) {
            assert!(a == b, "{}: results under {o:?} differ from those under {:?}", case.name, orders[0]);
        }
    }
}

/// The device's counter-based noise equals the CPU's bit for bit (the same Philox integers;
/// Box–Muller in double on both, rounded once to f32 or kept in f64), at odd and even
/// lengths, for draws whose counter uses both 32-bit halves, outputs poisoned first.
#[test]
fn device_noise_equals_the_cpus() {
    use vaecuda::rng::NoiseStream;
    fn run<E: vaecuda::backend::cuda::CudaFloat>(gpu: Cuda<E>, fails: &mut Vec<String>) {
        let cpu = Cpu::<E>::default();
        let key = NoiseStream::new(11).key;
        for (n, draw) in [(1usize, 0u64), (2, 1), (3, 7), (320, 5), (100_001, (3u64 << 32) + 9)] {
            let mut c = cpu.upload(&vec![E::of(f64::NAN); n]);
            let mut g = gpu.upload(&vec![E::of(f64::NAN); n]);
            cpu.normal_noise(key, draw, &mut c);
            gpu.normal_noise(key, draw, &mut g);
            let g = gpu.download(&g);
            if let Some(i) = (0..n).find(|&i| g[i].f64().to_bits() != c[i].f64().to_bits()) {
                fails.push(format!("normal_noise {} n{n} draw {draw}: [{i}] gpu {:?}, cpu {:?}", E::NAME, g[i], c[i]));
            }
        }
    }
    let mut fails = vec![];
    let (Some(g32), Some(g64)) = (gpu32(), gpu64()) else { return };
    run(g32, &mut fails);
    run(g64, &mut fails);
    assert!(fails.is_empty(), "{}", fails.join("\n"));
}

/// Adam's operands of one tensor: parameter, gradient, first and second moment.
fn adam_operands(rng: &mut Rng, n: usize) -> [Vec<f32>; 4] {
    [rnd(rng, n, -1.0, 1.0), rnd(rng, n, -1.0, 1.0), rnd(rng, n, -1.0, 1.0), rnd(rng, n, 0.0, 1.0)]
}

/// Every tensor's operands in one list for `adam_step_all`.
fn adam_list<B: Backend>(ops: &mut [[B::Buf; 4]]) -> Vec<AdamTensor<'_, B>> {
    ops.iter_mut().map(|[p, g, m, v]| AdamTensor { param: p, grad: &*g, m, v }).collect()
}

/// One Adam launch for every tensor (`adam_step_all`) gives bit for bit what one `adam_step`
/// per tensor gives, on tensors of ragged lengths around the kernel's chunk (an empty one
/// among them) and with every weight decay mode; the CPU's agrees too. With a NaN or infinite
/// loss as its guard it changes nothing. `zero_all` and `pack_scalars` against the CPU, their
/// outputs poisoned first.
#[test]
fn multi_tensor_adam_zero_and_pack_match() {
    use vaecuda::backend::cuda::contract::MULTI_CHUNK;
    let Some(mut t) = both() else { return };
    let c = MULTI_CHUNK;
    let sizes = [1usize, 5, 0, c - 1, c, c + 1, 3 * c + 7, 70_001];
    let bits = |gpu: &Cuda<f32>, b: &CudaBuf<f32>| gpu.download(b).iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let finite = (vec![2.5f32], t.gpu.upload(&[2.5f32]));
    for (wd, dec) in [(0.0, false), (0.01, false), (0.01, true)] {
        let s = AdamStep::new(1e-3, 0.9, 0.999, 1e-8, wd, dec, 3);
        let host: Vec<[Vec<f32>; 4]> = sizes.iter().map(|&n| adam_operands(&mut t.rng, n)).collect();
        let up = |gpu: &Cuda<f32>| host.iter().map(|h| h.clone().map(|v| gpu.upload(&v))).collect::<Vec<_>>();
        let (mut one, mut all, mut cpu) = (up(&t.gpu), up(&t.gpu), host.clone());
        for [p, g, m, v] in one.iter_mut() {
            t.gpu.adam_step(p, g, m, v, s);
        }
        t.gpu.adam_step_all(&mut adam_list::<Cuda<f32>>(&mut all), s, &finite.1);
        t.cpu.adam_step_all(&mut adam_list::<Cpu<f32>>(&mut cpu), s, &finite.0);
        for (i, n) in sizes.iter().enumerate() {
            for (k, name) in [(0, "param"), (2, "m"), (3, "v")] {
                let what = format!("adam_step_all {name} of tensor {i} (n{n}) wd{wd} decoupled={dec}");
                if bits(&t.gpu, &one[i][k]) != bits(&t.gpu, &all[i][k]) {
                    t.fails.push(format!("{what}: differs from adam_step's bits"));
                }
                cmp(&mut t.fails, &format!("{what} against the CPU"), &t.gpu.download(&all[i][k]), &cpu[i][k], 1);
            }
        }
    }
    // A non-finite loss: nothing moves, on either backend.
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let s = AdamStep::new(1e-3, 0.9, 0.999, 1e-8, 0.01, true, 3);
        let host: Vec<[Vec<f32>; 4]> = sizes.iter().map(|&n| adam_operands(&mut t.rng, n)).collect();
        let mut all: Vec<[CudaBuf<f32>; 4]> = host.iter().map(|h| h.clone().map(|v| t.gpu.upload(&v))).collect();
        let mut cpu = host.clone();
        t.gpu.adam_step_all(&mut adam_list::<Cuda<f32>>(&mut all), s, &t.gpu.upload(&[bad]));
        t.cpu.adam_step_all(&mut adam_list::<Cpu<f32>>(&mut cpu), s, &vec![bad]);
        for (i, h) in host.iter().enumerate() {
            for k in [0, 2, 3] {
                let want: Vec<u32> = h[k].iter().map(|x| x.to_bits()).collect();
                if bits(&t.gpu, &all[i][k]) != want || cpu[i][k] != h[k] {
                    t.fails.push(format!("adam_step_all with a loss of {bad}: operand {k} of tensor {i} changed"));
                }
            }
        }
    }
    // zero_all over ragged buffers (an empty one among them), poisoned first.
    let mut bufs: Vec<(Vec<f32>, CudaBuf<f32>)> = sizes.iter().map(|&n| t.poisoned(n)).collect();
    t.cpu.zero_all(&mut bufs.iter_mut().map(|b| &mut b.0).collect::<Vec<_>>());
    t.gpu.zero_all(&mut bufs.iter_mut().map(|b| &mut b.1).collect::<Vec<_>>());
    for (i, b) in bufs.iter().enumerate() {
        t.cmp(&format!("zero_all buffer {i} (n{})", sizes[i]), b, 1);
    }
    // pack_scalars: three parts (one kernel) and two (copies), from the first element of each.
    for parts in [3usize, 2] {
        let ins: Vec<(Vec<f32>, CudaBuf<f32>)> = (0..parts).map(|i| t.input(1 + 2 * i, -5.0, 5.0)).collect();
        let mut out = t.poisoned(parts);
        t.cpu.pack_scalars(&ins.iter().map(|p| &p.0).collect::<Vec<_>>(), &mut out.0);
        t.gpu.pack_scalars(&ins.iter().map(|p| &p.1).collect::<Vec<_>>(), &mut out.1);
        t.cmp(&format!("pack_scalars of {parts}"), &out, 1);
    }
    assert!(t.fails.is_empty(), "{}", t.fails.join("\n"));
}

/// A NaN loss (a NaN KL weight), on both backends: the step reports it after the fact with the
/// step it would have been, and Adam, which decided on the device, left every weight and
/// moment as it was; the step count is unchanged and the next step trains normally (its
/// gradients zeroed again despite the NaN ones left by the failed step).
#[test]
fn a_non_finite_loss_leaves_weights_and_moments_alone() {
    fn run<B: Backend<E = f32>>(be: B) {
        let cfg = ModelConfig::mnist(Arch::Mlp);
        let mut t = Trainer::new(be.clone(), cfg, LossConfig::default(), AdamConfig::default(), 5);
        t.step(batch(&be, 1, 4), 1.0).expect("a finite first step");
        let state = |t: &Trainer<B>| -> Vec<Vec<u32>> {
            let moments = t.adam.m.iter().chain(&t.adam.v).flatten();
            let bufs = t.store.values.iter().map(|v| &v.buf).chain(moments);
            bufs.map(|b| be.download(b).iter().map(|x| x.to_bits()).collect()).collect()
        };
        let before = state(&t);
        let e = t.step(batch(&be, 2, 4), f64::NAN).expect_err("a NaN loss");
        assert!(e.loss.is_nan() && e.step == 2, "{}: {e}", be.describe());
        assert_eq!(t.adam.step, 1, "{}: the failed step was counted", be.describe());
        assert!(state(&t) == before, "{}: a NaN step changed weights or moments", be.describe());
        let l = t.step(batch(&be, 3, 4), 1.0).expect("a finite step after the failed one");
        assert!(l.loss.is_finite() && t.adam.step == 2, "{}", be.describe());
        assert!(state(&t) != before, "{}: the step after did not train", be.describe());
    }
    run(Cpu::<f32>::default());
    if let Some(gpu) = gpu32() {
        run(gpu);
    }
}

/// Runs one test of this file in a child process on the emulated device with one thing broken
/// on purpose, and returns (whether it passed, what it printed).
fn run_broken(test: &str, env: &[(&str, &str)]) -> (bool, String) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--test-threads=1", "--nocapture"])
        .env("VAECUDA_TEST_DEVICE", "emu")
        .env_remove("RUST_BACKTRACE")
        .envs(env.iter().copied())
        .output()
        .expect("cannot run the test binary");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success() && text.contains("1 passed"), text)
}

/// The kernel sources with one replacement made in `file`, written to a fresh folder for
/// `VAECUDA_KERNEL_SOURCES`.
fn broken_sources(tag: &str, file: &str, from: &str, to: &str) -> std::path::PathBuf {
    use vaecuda::backend::cuda::compile::{COMMON, FILES};
    let dir = std::env::temp_dir().join(format!("vaecuda-broken-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sources = FILES.iter().map(|f| (f.name, f.source)).chain([("common.cuh", COMMON)]);
    for (name, text) in sources {
        let text = if name == file {
            assert_eq!(text.matches(from).count(), 1, "{from:?} must occur once in {file}");
            text.replacen(from, to, 1)
        } else {
            text.to_string()
        };
        std::fs::write(dir.join(name), text).unwrap();
    }
    dir
}

/// The planted-bug tests' bookkeeping: each plant runs one test in a child process
/// ([`run_broken`]) and must make it fail with every expected text in its output. Plants are
/// collected, then run two at a time by [`Plants::finish`]: a child spends most of its time
/// compiling the edited kernel files (NVRTC and the host build, one file at a time), so a
/// planted-bug test run one child after another would finish long after the rest of the suite.
struct Plants {
    jobs: Vec<Plant>,
}

/// One planted bug: what it is, the test it must fail, the environment that plants it, and
/// the texts the failure must show.
struct Plant {
    what: String,
    test: String,
    env: Vec<(String, String)>,
    expect: Vec<String>,
}

impl Plants {
    /// None in a child (a plant is already in place) or off the emulated device.
    fn start() -> Option<Plants> {
        if std::env::var_os("VAECUDA_KERNEL_SOURCES").is_some() || std::env::var_os("VAECUDA_EMU_MUTATE").is_some() {
            return None; // already a child
        }
        if gpu32().is_none() || !common::on_emulator() {
            eprintln!("note: the planted-bug checks run on the emulated device only");
            return None;
        }
        Some(Plants { jobs: vec![] })
    }

    /// Plants a bug by running `test` with `env`: it counts as missed unless the test fails
    /// with every text of `expect` in its output.
    fn check(&mut self, what: &str, test: &str, env: &[(&str, &str)], expect: &[&str]) {
        self.jobs.push(Plant {
            what: what.into(),
            test: test.into(),
            env: env.iter().map(|&(k, v)| (k.into(), v.into())).collect(),
            expect: expect.iter().map(|&e| e.into()).collect(),
        });
    }

    /// [`Plants::check`] with the kernel sources edited: `(tag, file, from, to)` as
    /// [`broken_sources`] takes them. The broken sources are built fast (`FAST_BUILD_ENV`):
    /// each child builds them afresh, and would otherwise spend most of its time on NVRTC
    /// optimizing device code that the emulated device does not run (it runs host builds).
    fn source(&mut self, (tag, file, from, to): (&str, &str, &str, &str), what: &str, test: &str, expect: &[&str]) {
        use vaecuda::backend::cuda::compile::{FAST_BUILD_ENV, SOURCES_ENV};
        let dir = broken_sources(tag, file, from, to);
        self.check(what, test, &[(SOURCES_ENV, &dir.to_string_lossy()), (FAST_BUILD_ENV, "1")], expect);
    }

    /// Runs every plant, two children at a time, and fails with each one the suite missed.
    fn finish(self) {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let missed = std::sync::Mutex::new(vec![]);
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    while let Some(p) = self.jobs.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) {
                        let env: Vec<(&str, &str)> = p.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                        let (passed, text) = run_broken(&p.test, &env);
                        if passed || !p.expect.iter().all(|e| text.contains(e.as_str())) {
                            let (what, test, expect) = (&p.what, &p.test, &p.expect);
                            let line = format!("{what}: {test} passed={passed}, expected {expect:?} in:\n{text}");
                            missed.lock().unwrap().push(line);
                        } else {
                            eprintln!("caught: {} ({} failed as it should)", p.what, p.test);
                        }
                    }
                });
            }
        });
        let missed = missed.into_inner().unwrap();
        assert!(missed.is_empty(), "the suite missed planted bugs:\n{}", missed.join("\n\n"));
    }
}

/// Bugs planted on purpose, each of which the suite must catch on the emulated device (and
/// each a bug that on a GPU would show only as wrong numbers, if at all).
#[test]
fn the_suite_catches_broken_kernels() {
    let Some(mut plants) = Plants::start() else { return };
    // A tile loader off by one: the A tile reads row M, one row past the operand.
    plants.source(
        ("loader", "common.cuh", "(gm < M && gk < k_end)", "(gm <= M && gk < k_end)"),
        "tile loader off by one",
        "linear_matches_cpu",
        // Whichever tile shape the first shape takes reads past the end first.
        &["illegal memory access", "kernel gemm", "past the end of"],
    );
    // The barrier between staging a tile and reading it, removed.
    let barrier = "        if (t + 2 < tiles) describe(k_begin + (t + 2) * TILE_K, t & 1);\n        __syncthreads();\n";
    plants.source(
        ("barrier", "common.cuh", barrier, &barrier.replace("        __syncthreads();\n", "")),
        "a barrier removed from the tile GEMM",
        "linear_matches_cpu",
        &["linear_forward"],
    );
    // The register prefetch fetching the tile being computed again instead of the next one.
    plants.source(
        (
            "prefetch",
            "common.cuh",
            "fetch(k_begin + (t + 1) * TILE_K, buf ^ 1);",
            "fetch(k_begin + t * TILE_K, buf ^ 1);",
        ),
        "the tile GEMM prefetching the wrong K-tile",
        "linear_matches_cpu",
        &["linear_forward"],
    );
    // The next tile staged into the buffer this step reads (double buffering undone).
    plants.source(
        ("buffer", "common.cuh", "if (more) stage(buf ^ 1);", "if (more) stage(buf);"),
        "the tile GEMM staging into the buffer it reads",
        "conv2d_matches_cpu",
        &["conv2d_forward"],
    );
    // The k table of the tile after next written over the next tile's (one tile early): a
    // convolution's gather then reads the wrong taps.
    plants.source(
        (
            "k-table",
            "common.cuh",
            "describe(k_begin + (t + 2) * TILE_K, t & 1);",
            "describe(k_begin + (t + 1) * TILE_K, t & 1);",
        ),
        "the tile GEMM's k table filled for the wrong tile",
        "conv2d_matches_cpu",
        &["conv2d_forward"],
    );
    // The mn table of a k-fast operand one entry off: the weight gradient's columns shift.
    plants.source(
        (
            "mn-table",
            "common.cuh",
            "Mb[i] = lb.mdesc(min(n0 + i, N - 1));",
            "Mb[i] = lb.mdesc(min(n0 + i + 1, N - 1));",
        ),
        "the tile GEMM's mn table one entry off",
        "conv2d_matches_cpu",
        &["conv2d_backward_weight"],
    );
    // The micro-tile's vector load at a column offset of one element per thread, not four:
    // a float4 at a 4-byte boundary, which a GPU faults on.
    plants.source(
        ("lds128", "common.cuh", "lds4(&Bs[buf][kk][4 * tx], b);", "lds4(&Bs[buf][kk][tx], b);"),
        "a vectorised shared load at a misaligned offset",
        "linear_matches_cpu",
        &["misaligned", "kernel gemm"],
    );
    // A grid-stride loop that runs to i <= n.
    plants.source(
        ("stride", "common.cuh", "i < (long long)(n);", "i <= (long long)(n);"),
        "grid-stride bound < turned into <=",
        "elementwise_and_reductions_match_cpu",
        &["illegal memory access", "past the end"],
    );
    // A gather whose row is found for the next element: a row's last element is taken from
    // the next row's start (the FastDiv row index of the u8 gather).
    let u8_row = "const int r = rows.div((int)i), e = (int)i - r * row_len;\n        dst[i] = T(src[";
    plants.source(
        ("gather-row", "elementwise.cu", u8_row, &u8_row.replace("rows.div((int)i)", "rows.div((int)i + 1)")),
        "a gather's row index one element ahead",
        "gather_rows_u8_matches_cpu",
        &["gather_rows_u8_f32"],
    );
    // A launch one block short (the emulated driver drops the grid's last column of blocks).
    plants.check(
        "a GEMM launch one block short",
        "linear_matches_cpu",
        &[("VAECUDA_EMU_MUTATE", "short-grid:gemm_f32")],
        &["linear_forward", "NaN"],
    );
    // Phase-split backward-data with the taps of a phase at the wrong offset: p = φ + u
    // instead of φ + s·u (the same at stride 1, so only the strided cases can catch it).
    plants.source(
        (
            "phase",
            "conv2d.cu",
            "const int p = ph.y.f + a.stride * u, q = ph.x.f + a.stride * v;",
            "const int p = ph.y.f + u, q = ph.x.f + a.stride * v;",
        ),
        "a wrong tap offset in a backward-data phase",
        "conv2d_matches_cpu",
        &["conv2d_backward_data", "s2"],
    );
    // Split-K with a bias that adds the bias once per chunk instead of once.
    plants.source(
        (
            "bias-per-chunk",
            "gemm.cu",
            "s += (acc_t)part[z * len + i];\n            c[i] = (T)((T)s + bias[col]);",
            "s += (acc_t)part[z * len + i] + bias[col];\n            c[i] = (T)s;",
        ),
        "split-K adding the bias once per chunk",
        "linear_matches_cpu",
        &["linear_forward bias=true"],
    );
    // A small-tile launch one block short.
    plants.check(
        "a 64 x 16 GEMM launch one block short",
        "linear_matches_cpu",
        &[("VAECUDA_EMU_MUTATE", "short-grid:gemm_n16_f32")],
        &["NaN"],
    );
    plants.finish();
}

/// Bugs planted in the tensor-core tiles (`--precision tf32|bf16`), each of which the suite
/// must catch. (Each planted-bug test is its own test, so the harness runs them side by side.)
#[test]
fn the_suite_catches_broken_tensor_cores() {
    let Some(mut plants) = Plants::start() else { return };
    // A TF32 fragment staged in the wrong register order: a1 (A[g+8][t]) and a2 (A[g][t+4])
    // trade places.
    plants.source(
        (
            "tf32-fragment",
            "common.cuh",
            "const int lane = (mr & 7) * 4 + (kr & 3), reg = (mr >> 3) + 2 * (kr >> 2);",
            "const int lane = (mr & 7) * 4 + (kr & 3), reg = 2 * (mr >> 3) + (kr >> 2);",
        ),
        "a TF32 fragment staged in the wrong register order",
        "tensor_core_products_match_cpu_at_their_precision",
        &["tf32:"],
    );
    // A BF16 pair packed the wrong way round (the lower-numbered element in the high half).
    plants.source(
        (
            "bf16-pack",
            "common.cuh",
            "return ((j * 32 + lane) * 2 + reg) * 2 + (kk & 1);",
            "return ((j * 32 + lane) * 2 + reg) * 2 + 1 - (kk & 1);",
        ),
        "a BF16 pair packed the wrong way round",
        "tensor_core_products_match_cpu_at_their_precision",
        &["bf16:"],
    );
    plants.finish();
}

/// Bugs planted in the kernels of the step as one unit (multi-tensor Adam and zeroing, the
/// device noise), each of which the suite must catch.
#[test]
fn the_suite_catches_broken_step_kernels() {
    let Some(mut plants) = Plants::start() else { return };
    // The multi-tensor kernels: a block that finds its tensor one entry too early (the first
    // block of each tensor works on the one before), a chunk whose last element is left out,
    // and the non-finite guard removed from Adam.
    let planted = [
        ("adam.cu", "table[(long long)(e + 1) * words] <= b", "table[(long long)(e + 1) * words] < b", "adam_step_all"),
        ("adam.cu", "*begin + MULTI_CHUNK : n;", "*begin + MULTI_CHUNK : n - 1;", "zero_all buffer"),
        ("adam.cu", "if (!(loss - loss == T(0))) return;", "", "with a loss of NaN"),
    ];
    // Philox with one round fewer: the noise no longer equals the CPU's.
    let planted =
        planted.into_iter().chain([("rng.cu", "round < 10; ++round", "round < 9; ++round", "normal_noise f32")]);
    for (i, (file, from, to, expect)) in planted.enumerate() {
        plants.source(
            (&format!("multi{i}"), file, from, to),
            &format!("{file}: {from:?} → {to:?}"),
            if file == "rng.cu" { "device_noise_equals_the_cpus" } else { "multi_tensor_adam_zero_and_pack_match" },
            &[expect],
        );
    }
    // A graph replay that leaves out its last node (the step's Adam launch).
    plants.check(
        "a CUDA graph replayed without its last node",
        "graph_steps_equal_eager_steps",
        &[("VAECUDA_EMU_MUTATE", "graph-drop-last")],
        &["eager vs graph"],
    );
    plants.finish();
}

/// Bugs planted in the whole-GPU reductions (warp shuffles, chunks over a channel, the
/// fixed-order combination of chunk partials), each of which the suite must catch.
#[test]
fn the_suite_catches_broken_reductions() {
    let Some(mut plants) = Plants::start() else { return };
    // A warp reduction reading one lane too far: lanes past the warp get their own value back.
    plants.source(
        (
            "elementwise_and_reductions_match_cpu",
            "common.cuh",
            "v += __shfl_down_sync(0xffffffffu, v, o);",
            "v += __shfl_down_sync(0xffffffffu, v, o + 1);",
        ),
        "a warp sum with a wrong shuffle offset",
        "elementwise_and_reductions_match_cpu",
        &["sum"],
    );
    // A chunk that runs one value into the next chunk: that value is counted twice.
    plants.source(
        (
            "conv2d_matches_cpu",
            "common.cuh",
            "end = min((long long)outer * inner, begin + chunk);",
            "end = min((long long)outer * inner, begin + chunk + 1);",
        ),
        "a chunk boundary off by one",
        "conv2d_matches_cpu",
        &["bias_backward"],
    );
    // Stage 2 of the statistics merging only the first warp's worth of chunks.
    plants.source(
        (
            "batch_norm_matches_cpu",
            "batchnorm.cu",
            "for (int k = threadIdx.x; k < chunks; k += WARP) {",
            "for (int k = threadIdx.x; k < min(chunks, WARP); k += WARP) {",
        ),
        "chunk partials past the 32nd dropped",
        "batch_norm_matches_cpu",
        &["bn_forward_train", "128x32x196"],
    );
    // The moments of two sets merged without the between-set term of the variance.
    plants.source(
        ("batch_norm_matches_cpu", "common.cuh", "a.m2 + b.m2 + d * d * (a.n * (b.n / n))", "a.m2 + b.m2"),
        "merged moments missing the spread between the sets",
        "batch_norm_matches_cpu",
        &["bn_forward_train"],
    );
    plants.finish();
}
