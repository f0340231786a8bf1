//! Central-difference gradient checking in f64, like `torch.autograd.gradcheck`: for every
//! checked entry, |analytic − numeric| ≤ atol + rtol·|numeric| with numeric =
//! (f(x + ε) − f(x − ε)) / 2ε. Written over any f64 backend, so the same checks run on the CPU
//! and on the GPU.
//!
//! ```
//! use vaecuda::gradcheck::{check, GradCheck, Input};
//! use vaecuda::{ops, rng::Rng, Cpu};
//! let mut rng = Rng::new(1);
//! let inputs = [Input::uniform("x", &[2, 3], -1.0, 1.0, &mut rng)];
//! // f(x) = Σ tanh(x): the tape's gradient 1 − tanh² against central differences.
//! let worst = check(&Cpu::<f64>::default(), &inputs, true, GradCheck::default(), |tape, v| {
//!     let y = ops::tanh(tape, v[0]);
//!     ops::sum(tape, y)
//! })
//! .expect("tanh's backward is right");
//! assert!(worst <= 1.0); // the worst entry, as a fraction of the tolerance
//! ```

use crate::backend::Backend;
use crate::rng::Rng;
use crate::tape::{ParamStore, Tape, Var};
use crate::tensor::Tensor;

/// Settings of a gradient check: the step of the central difference and the tolerance.
#[derive(Clone, Copy, Debug)]
pub struct GradCheck {
    /// The finite-difference step ε added to and subtracted from one entry at a time.
    pub eps: f64,
    /// Absolute tolerance: what a gradient near 0 may be off by.
    pub atol: f64,
    /// Relative tolerance, as a fraction of the numeric gradient's magnitude.
    pub rtol: f64,
    /// Entries checked per input tensor (sampled without bias when the tensor is larger).
    pub max_entries: usize,
}

impl Default for GradCheck {
    /// torch.autograd.gradcheck's eps and tolerances.
    fn default() -> Self {
        GradCheck { eps: 1e-6, atol: 1e-5, rtol: 1e-3, max_entries: 64 }
    }
}

/// A named input of a gradient check.
pub struct Input {
    /// Named in a [`Mismatch`], so a failure says which input was wrong.
    pub name: String,
    /// The tensor's shape.
    pub shape: Vec<usize>,
    /// Its values, row-major (`shape`'s product of them).
    pub data: Vec<f64>,
}

impl Input {
    /// Values drawn uniformly from [lo, hi) with a seeded generator.
    pub fn uniform(name: &str, shape: &[usize], lo: f64, hi: f64, rng: &mut Rng) -> Self {
        let n = shape.iter().product();
        Input { name: name.into(), shape: shape.to_vec(), data: (0..n).map(|_| rng.uniform(lo, hi)).collect() }
    }
}

/// A gradient the tape got wrong: the first entry outside the tolerance.
#[derive(Clone, Debug, PartialEq)]
pub struct Mismatch {
    /// The input or parameter.
    pub name: String,
    /// The entry, as a flat row-major index into the tensor.
    pub index: usize,
    /// The gradient the tape's backward computed.
    pub tape: f64,
    /// The central-difference estimate it should have matched.
    pub finite_differences: f64,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Mismatch { name, index, tape, finite_differences } = self;
        write!(f, "d/d {name}[{index}]: tape {tape:.10e}, finite differences {finite_differences:.10e}")
    }
}

impl std::error::Error for Mismatch {}

/// Σ y ⊙ R with a fixed random R: turns any op output into a scalar whose gradient exercises
/// every output element with a different weight.
pub fn weighted_sum<B: Backend<E = f64>>(tape: &mut Tape<B>, y: Var, seed: u64) -> Var {
    let shape = tape.shape(y).to_vec();
    let mut rng = Rng::new(seed);
    let r: Vec<f64> = (0..shape.iter().product()).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let rv = tape.input(Tensor::from_host(&tape.backend, &shape, &r));
    let p = crate::ops::mul(tape, y, rv);
    crate::ops::sum(tape, p)
}

/// Checks the tape's gradient of `f(inputs)` (a scalar) w.r.t. every input against central
/// differences. `training` selects batch-norm mode. Returns the worst error ratio
/// (|a − n| / (atol + rtol·|n|), so ≤ 1 passes) or a message naming the first failure.
pub fn check<B, F>(backend: &B, inputs: &[Input], training: bool, cfg: GradCheck, f: F) -> Result<f64, Mismatch>
where
    B: Backend<E = f64>,
    F: Fn(&mut Tape<B>, &[Var]) -> Var,
{
    let mut store = ParamStore::default();
    for inp in inputs {
        store.add(&inp.name, Tensor::from_host(backend, &inp.shape, &inp.data), true);
    }
    let vars: Vec<Var> = (0..inputs.len()).map(Var::Param).collect();
    check_store(backend, &mut store, training, cfg, |tape| f(tape, &vars))
}

/// The same check over every trainable tensor of a whole parameter store (a model's).
pub fn check_store<B, F>(
    backend: &B,
    store: &mut ParamStore<B>,
    training: bool,
    cfg: GradCheck,
    f: F,
) -> Result<f64, Mismatch>
where
    B: Backend<E = f64>,
    F: Fn(&mut Tape<B>) -> Var,
{
    let eval = |store: &mut ParamStore<B>| -> f64 {
        let mut tape = Tape::new(backend, store, training);
        let out = f(&mut tape);
        tape.to_host(out)[0]
    };
    for g in store.grads.iter_mut() {
        *g = None;
    }
    {
        let mut tape = Tape::new(backend, store, training);
        let out = f(&mut tape);
        tape.backward(out);
    }
    let mut worst = 0.0f64;
    let mut rng = Rng::new(0xC0FFEE);
    let trainable: Vec<usize> = (0..store.len()).filter(|&i| store.trainable[i]).collect();
    for i in trainable {
        let (name, shape) = (store.names[i].clone(), store.values[i].shape.clone());
        let original = store.values[i].to_host(backend);
        let analytic = match &store.grads[i] {
            Some(g) => g.to_host(backend),
            None => vec![0.0; original.len()],
        };
        let n = original.len();
        let mut entries: Vec<usize> = (0..n).collect();
        if n > cfg.max_entries {
            rng.shuffle(&mut entries);
            entries.truncate(cfg.max_entries);
        }
        for &j in &entries {
            let mut data = original.clone();
            data[j] = original[j] + cfg.eps;
            store.values[i] = Tensor::from_host(backend, &shape, &data);
            let plus = eval(store);
            data[j] = original[j] - cfg.eps;
            store.values[i] = Tensor::from_host(backend, &shape, &data);
            let minus = eval(store);
            store.values[i] = Tensor::from_host(backend, &shape, &original);
            let numeric = (plus - minus) / (2.0 * cfg.eps);
            let a = analytic[j];
            let ratio = (a - numeric).abs() / (cfg.atol + cfg.rtol * numeric.abs());
            if !ratio.is_finite() || ratio > 1.0 {
                return Err(Mismatch { name: name.clone(), index: j, tape: a, finite_differences: numeric });
            }
            worst = worst.max(ratio);
        }
    }
    Ok(worst)
}
