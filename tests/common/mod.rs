//! The op cases every correctness test walks: one entry per op and shape, each a small graph
//! built over any backend. Gradient checks run them in f64; the f32-vs-f64 test runs them in
//! both precisions; the GPU tests run them on the GPU.
#![allow(dead_code)]

use vaecuda::backend::{Backend, Recon};
use vaecuda::gradcheck::{check_store, GradCheck, Input};
use vaecuda::nn::{LossConfig, ModelConfig, Vae};
use vaecuda::ops::{self, unary::Unary, Reduction};
use vaecuda::rng::Rng;
use vaecuda::tape::{ParamStore, Tape, Var};
use vaecuda::tensor::Tensor;

#[derive(Clone, Debug)]
pub enum Op {
    Linear {
        n: usize,
        d_in: usize,
        d_out: usize,
        bias: bool,
    },
    Conv2d {
        n: usize,
        c_in: usize,
        h: usize,
        w: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        pad: usize,
    },
    ConvT {
        n: usize,
        c_in: usize,
        h: usize,
        w: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        pad: usize,
        out_pad: usize,
    },
    BatchNorm2d {
        n: usize,
        c: usize,
        h: usize,
        w: usize,
    },
    BatchNorm1d {
        n: usize,
        c: usize,
    },
    /// Batch norm with the activation that follows fused into it (`ops::batch_norm_act`).
    BatchNormAct {
        n: usize,
        c: usize,
        h: usize,
        w: usize,
        act: Unary,
    },
    Relu,
    Sigmoid,
    Tanh,
    LeakyRelu,
    Add,
    Mul,
    Scale,
    Sum,
    Mean,
    Reshape,
    Flatten,
    ReparamKl {
        n: usize,
        z: usize,
    },
    Loss {
        kind: Recon,
        reduction: Reduction,
    },
}

pub struct Case {
    pub name: String,
    pub op: Op,
    pub inputs: Vec<Input>,
    /// Constant (non-differentiated) inputs: targets and noise.
    pub consts: Vec<(Vec<usize>, Vec<f64>)>,
}

fn uniform(shape: &[usize], lo: f64, hi: f64, rng: &mut Rng) -> Vec<f64> {
    (0..shape.iter().product()).map(|_| rng.uniform(lo, hi)).collect()
}

impl Case {
    fn new(name: String, op: Op, seed: u64) -> Case {
        let mut rng = Rng::new(seed);
        let r = &mut rng;
        let inp = |name: &str, shape: &[usize], r: &mut Rng| Input::uniform(name, shape, -1.0, 1.0, r);
        let (inputs, consts) = match &op {
            &Op::Linear { n, d_in, d_out, bias } => {
                let mut v = vec![inp("x", &[n, d_in], r), inp("w", &[d_out, d_in], r)];
                if bias {
                    v.push(inp("b", &[d_out], r));
                }
                (v, vec![])
            }
            &Op::Conv2d { n, c_in, h, w, c_out, k, .. } => {
                (vec![inp("x", &[n, c_in, h, w], r), inp("w", &[c_out, c_in, k, k], r), inp("b", &[c_out], r)], vec![])
            }
            &Op::ConvT { n, c_in, h, w, c_out, k, .. } => {
                (vec![inp("x", &[n, c_in, h, w], r), inp("w", &[c_in, c_out, k, k], r), inp("b", &[c_out], r)], vec![])
            }
            &Op::BatchNorm2d { n, c, h, w } | &Op::BatchNormAct { n, c, h, w, .. } => (
                vec![inp("x", &[n, c, h, w], r), Input::uniform("gamma", &[c], 0.5, 1.5, r), inp("beta", &[c], r)],
                vec![],
            ),
            &Op::BatchNorm1d { n, c } => {
                (vec![inp("x", &[n, c], r), Input::uniform("gamma", &[c], 0.5, 1.5, r), inp("beta", &[c], r)], vec![])
            }
            Op::Relu | Op::Sigmoid | Op::Tanh | Op::LeakyRelu | Op::Scale | Op::Sum | Op::Mean => {
                (vec![Input::uniform("x", &[3, 5], -2.0, 2.0, r)], vec![])
            }
            Op::Reshape | Op::Flatten => (vec![inp("x", &[2, 3, 2, 2], r)], vec![]),
            Op::Add | Op::Mul => (vec![inp("a", &[4, 3], r), inp("b", &[4, 3], r)], vec![]),
            &Op::ReparamKl { n, z } => (
                vec![inp("mu", &[n, z], r), Input::uniform("logvar", &[n, z], -1.5, 1.0, r)],
                vec![(vec![n, z], (0..n * z).map(|_| r.normal()).collect())],
            ),
            Op::Loss { kind, .. } => {
                let shape = [2, 1, 3, 5];
                let x = match kind {
                    // Probabilities away from 0 and 1, where PyTorch's BCE gradient is exact.
                    Recon::Bce => Input::uniform("p", &shape, 0.05, 0.95, r),
                    _ => Input::uniform("x", &shape, -3.0, 3.0, r),
                };
                (vec![x], vec![(shape.to_vec(), uniform(&shape, 0.0, 1.0, r))])
            }
        };
        Case { name, op, inputs, consts }
    }

    /// Runs the op on `vars` (one per input) and returns its (first) output; ops with two
    /// outputs (reparam_kl) fold both into it.
    pub fn run<B: Backend>(&self, tape: &mut Tape<B>, vars: &[Var]) -> Var {
        let consts: Vec<Var> = self
            .consts
            .iter()
            .map(|(s, d)| {
                let d: Vec<B::E> = d.iter().map(|&v| <B::E as vaecuda::Float>::of(v)).collect();
                let t = Tensor::from_host(&tape.backend, s, &d);
                tape.input(t)
            })
            .collect();
        match self.op {
            Op::Linear { bias, .. } => ops::linear(tape, vars[0], vars[1], bias.then(|| vars[2])),
            Op::Conv2d { stride, pad, .. } => ops::conv2d(tape, vars[0], vars[1], Some(vars[2]), stride, pad),
            Op::ConvT { stride, pad, out_pad, .. } => {
                ops::conv_transpose2d(tape, vars[0], vars[1], Some(vars[2]), stride, pad, out_pad)
            }
            Op::BatchNorm2d { c, .. } | Op::BatchNorm1d { c, .. } | Op::BatchNormAct { c, .. } => {
                let be = tape.backend.clone();
                // Running statistics live in the store; repeated evaluations reuse them.
                let rm = match tape.params.find("rm") {
                    Some(id) => id,
                    None => tape.params.add("rm", Tensor::zeros(&be, &[c]), false),
                };
                let rv = match tape.params.find("rv") {
                    Some(id) => id,
                    None => {
                        let one = vec![<B::E as vaecuda::Float>::of(1.0); c];
                        tape.params.add("rv", Tensor::from_host(&be, &[c], &one), false)
                    }
                };
                let act = match self.op {
                    Op::BatchNormAct { act, .. } => Some(act),
                    _ => None,
                };
                ops::batch_norm_act(tape, vars[0], vars[1], vars[2], rm, rv, 0.1, 1e-5, act)
            }
            Op::Relu => ops::relu(tape, vars[0]),
            Op::Sigmoid => ops::sigmoid(tape, vars[0]),
            Op::Tanh => ops::tanh(tape, vars[0]),
            Op::LeakyRelu => ops::leaky_relu(tape, vars[0], 0.2),
            Op::Add => ops::add(tape, vars[0], vars[1]),
            Op::Mul => ops::mul(tape, vars[0], vars[1]),
            Op::Scale => ops::scale(tape, vars[0], -2.5),
            Op::Sum => ops::sum(tape, vars[0]),
            Op::Mean => ops::mean(tape, vars[0]),
            Op::Reshape => ops::reshape(tape, vars[0], &[4, 6]),
            Op::Flatten => ops::flatten(tape, vars[0]),
            Op::ReparamKl { .. } => {
                let (z, kl) = ops::reparam_kl(tape, vars[0], vars[1], consts[0]);
                // Both outputs feed the result, so the backward sees dz and dkl together.
                let s = ops::sum(tape, z);
                let s = ops::scale(tape, s, 0.3);
                ops::add(tape, s, kl)
            }
            Op::Loss { kind, reduction } => ops::recon_loss(tape, kind, vars[0], consts[0], reduction),
        }
    }
}

/// Every op at several shapes: batch 1 and > 1, odd sizes, non-square images, stride 1 and 2,
/// padding 0 and 1, output_padding 0 and 1, channels 1 and > 1.
pub fn all_cases() -> Vec<Case> {
    let mut ops: Vec<(String, Op)> = vec![];
    for &(n, d_in, d_out, bias) in &[(1, 3, 2, true), (4, 7, 5, true), (3, 5, 1, false)] {
        ops.push((format!("linear n{n} {d_in}->{d_out} bias={bias}"), Op::Linear { n, d_in, d_out, bias }));
    }
    for &(n, c_in, h, w, c_out, k, stride, pad) in &[
        (1, 1, 5, 5, 1, 3, 1, 0),
        (2, 1, 6, 5, 3, 3, 1, 1),
        (2, 3, 7, 6, 2, 3, 2, 1),
        (1, 2, 5, 8, 4, 3, 2, 0),
        (3, 2, 4, 4, 2, 1, 1, 0),
        (2, 2, 6, 7, 3, 2, 2, 1),
        // One output channel, several inputs, stride 2: conv2d's direct backward-data path.
        (2, 3, 7, 6, 1, 3, 2, 1),
        // 36 taps, 8 output channels: in f32 on an AVX-512 CPU, conv2d's fast path
        // (`ops::conv2d_avx512`), so f32_vs_f64 checks it against the f64 reference.
        (2, 4, 7, 6, 8, 3, 2, 1),
    ] {
        ops.push((
            format!("conv2d n{n} {c_in}x{h}x{w}->{c_out} k{k} s{stride} p{pad}"),
            Op::Conv2d { n, c_in, h, w, c_out, k, stride, pad },
        ));
    }
    for &(n, c_in, h, w, c_out, k, stride, pad, out_pad) in &[
        (1, 1, 3, 3, 1, 3, 1, 1, 0),
        (2, 2, 3, 4, 1, 3, 2, 1, 1),
        (2, 3, 4, 3, 2, 3, 2, 1, 0),
        (1, 2, 3, 3, 3, 3, 2, 0, 1),
        (3, 1, 2, 5, 2, 2, 2, 0, 0),
        (2, 2, 4, 4, 2, 3, 1, 0, 0),
        // One input channel, stride 2, output_padding 1: the forward takes that path too.
        (2, 1, 4, 3, 3, 3, 2, 1, 1),
        // The adjoint conv has 36 taps and 8 output channels: conv2d's fast path, as above.
        (2, 8, 3, 4, 4, 3, 2, 1, 1),
    ] {
        ops.push((
            format!("conv_transpose2d n{n} {c_in}x{h}x{w}->{c_out} k{k} s{stride} p{pad} op{out_pad}"),
            Op::ConvT { n, c_in, h, w, c_out, k, stride, pad, out_pad },
        ));
    }
    for &(n, c, h, w) in &[(2, 3, 3, 2), (1, 2, 4, 5), (4, 1, 1, 1)] {
        ops.push((format!("batch_norm2d n{n} c{c} {h}x{w}"), Op::BatchNorm2d { n, c, h, w }));
    }
    for &(n, c) in &[(5, 3), (2, 1)] {
        ops.push((format!("batch_norm1d n{n} c{c}"), Op::BatchNorm1d { n, c }));
    }
    for (name, op) in [
        ("relu", Op::Relu),
        ("sigmoid", Op::Sigmoid),
        ("tanh", Op::Tanh),
        ("leaky_relu", Op::LeakyRelu),
        ("add", Op::Add),
        ("mul", Op::Mul),
        ("scale", Op::Scale),
        ("sum", Op::Sum),
        ("mean", Op::Mean),
        ("reshape", Op::Reshape),
        ("flatten", Op::Flatten),
    ] {
        ops.push((name.to_string(), op));
    }
    for &(n, z) in &[(1, 2), (3, 5)] {
        ops.push((format!("reparam_kl n{n} z{z}"), Op::ReparamKl { n, z }));
    }
    for kind in [Recon::Bce, Recon::BceWithLogits, Recon::Mse] {
        for reduction in [Reduction::Sum, Reduction::Mean] {
            ops.push((format!("{kind:?} {reduction:?}"), Op::Loss { kind, reduction }));
        }
    }
    // Last, so the cases above keep their seeds.
    for (n, c, h, w, act) in [
        (2, 3, 3, 2, Unary::Relu),
        (1, 2, 4, 5, Unary::Sigmoid),
        (2, 2, 2, 3, Unary::Tanh),
        (3, 2, 2, 2, Unary::LeakyRelu(0.2)),
    ] {
        ops.push((format!("batch_norm_act n{n} c{c} {h}x{w} {act:?}"), Op::BatchNormAct { n, c, h, w, act }));
    }
    ops.into_iter().enumerate().map(|(i, (name, op))| Case::new(name, op, 1000 + i as u64)).collect()
}

/// Forward output and the gradient of Σ y·R w.r.t. every input, on backend `B`.
pub fn forward_backward<B: Backend>(be: &B, case: &Case) -> (Vec<f64>, Vec<Vec<f64>>) {
    use vaecuda::Float;
    let mut store = ParamStore::default();
    for inp in &case.inputs {
        let d: Vec<B::E> = inp.data.iter().map(|&v| B::E::of(v)).collect();
        store.add(&inp.name, Tensor::from_host(be, &inp.shape, &d), true);
    }
    let vars: Vec<Var> = (0..case.inputs.len()).map(Var::Param).collect();
    let mut tape = Tape::new(be, &mut store, true);
    let y = case.run(&mut tape, &vars);
    let out: Vec<f64> = tape.to_host(y).iter().map(|v| v.f64()).collect();
    let shape = tape.shape(y).to_vec();
    let mut rng = Rng::new(77);
    let r: Vec<B::E> = (0..out.len()).map(|_| B::E::of(rng.uniform(-1.0, 1.0))).collect();
    let rv = tape.input(Tensor::from_host(be, &shape, &r));
    let p = ops::mul(&mut tape, y, rv);
    let l = ops::sum(&mut tape, p);
    tape.backward(l);
    drop(tape);
    let grads = (0..case.inputs.len())
        .map(|i| {
            store.grads[i].as_ref().expect("every input gets a gradient").to_host(be).iter().map(|v| v.f64()).collect()
        })
        .collect();
    (out, grads)
}

/// The whole negative ELBO of a model, differentiated by the tape, against finite differences
/// w.r.t. `entries` sampled entries of every parameter tensor, at fixed data and noise; on any
/// f64 backend (the CPU here, the GPU in `gpu_vs_cpu`).
pub fn whole_model_gradcheck<B: Backend<E = f64>>(
    be: &B,
    config: ModelConfig,
    n: usize,
    entries: usize,
) -> Result<f64, vaecuda::gradcheck::Mismatch> {
    whole_objective_gradcheck(be, config, &LossConfig::default(), 1.0, n, entries)
}

/// [`whole_model_gradcheck`] of any objective: its reconstruction term and reductions, and the
/// KL weighted by `kl_weight`.
pub fn whole_objective_gradcheck<B: Backend<E = f64>>(
    be: &B,
    config: ModelConfig,
    objective: &LossConfig,
    kl_weight: f64,
    n: usize,
    entries: usize,
) -> Result<f64, vaecuda::gradcheck::Mismatch> {
    let mut store = ParamStore::default();
    let model = Vae::new(config.clone(), &mut store, be, 11);
    let mut rng = Rng::new(12);
    let x: Vec<f64> = (0..n * config.image_len()).map(|_| rng.next_f64()).collect();
    let eps: Vec<f64> = (0..n * config.latent).map(|_| rng.normal()).collect();
    let img = [n, config.channels, config.height, config.width];
    let cfg = GradCheck { max_entries: entries, ..GradCheck::default() };
    check_store(be, &mut store, true, cfg, |tape| {
        let xv = tape.input(Tensor::from_host(&tape.backend, &img, &x));
        let ev = tape.input(Tensor::from_host(&tape.backend, &[n, config.latent], &eps));
        model.loss(tape, xv, ev, objective, kl_weight).loss
    })
}

/// Which CUDA device the GPU tests of this process run on, decided once: a real GPU when one
/// opens, else the emulated device (`cuda::emu`, the kernels on the CPU); the environment
/// variable `VAECUDA_TEST_DEVICE=gpu` or `=emu` insists on one. Without either, a test says so
/// and returns, except under CI (`CI` set), where that is a failure: CI must never pass a GPU
/// test that did not run.
pub fn cuda_device<E: vaecuda::backend::cuda::CudaFloat>() -> Option<vaecuda::Cuda<E>> {
    use std::sync::OnceLock;
    use vaecuda::backend::cuda::{self, emu, GpuError};
    static CHOICE: OnceLock<Result<&'static str, String>> = OnceLock::new();
    let choice = CHOICE.get_or_init(|| {
        let forced = std::env::var("VAECUDA_TEST_DEVICE").unwrap_or_default();
        let real = || {
            cuda::probe().map_err(|e| e.to_string()).and_then(|g| {
                if g.is_empty() {
                    Err("no GPU".into())
                } else {
                    Ok("gpu")
                }
            })
        };
        let emulated = || emu::install().map(|()| "emu").map_err(|e| e.to_string());
        match forced.as_str() {
            "gpu" => real(),
            "emu" => emulated(),
            _ => match cuda::probe() {
                Ok(g) if !g.is_empty() => Ok("gpu"),
                Ok(_) | Err(GpuError::Unavailable(_)) => emulated(),
                Err(e) => Err(e.to_string()),
            },
        }
    });
    match choice {
        Ok(_) => Some(vaecuda::Cuda::<E>::new(0).unwrap_or_else(|e| panic!("the CUDA device did not open: {e}"))),
        Err(e) if std::env::var_os("CI").is_some() => panic!("no GPU and no emulated device under CI: {e}"),
        Err(e) => {
            eprintln!("note: GPU test skipped, neither a GPU nor the emulated device is available: {e}");
            None
        }
    }
}

/// Whether the GPU tests run on the emulated device.
pub fn on_emulator() -> bool {
    vaecuda::backend::cuda::emu::is_installed()
}
