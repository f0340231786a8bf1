//! Every `vae train --recipe` against a PyTorch twin of its tutorial's own code.
//!
//! `bench/pytorch/recipe_twins.py` built each tutorial's model in PyTorch, set its weights,
//! a batch and the noise from formulas, ran the tutorial's loss and one step of its optimizer,
//! and wrote what came out to `tests/fixtures/recipes/<recipe>.json`. Here the recipe is
//! expanded by the `vae` binary itself (`--dry-run` prints the settings), the model it
//! describes is built, the same formulas fill it, and the same objective and Adam step must
//! come out. So a recipe that drifts from its tutorial (a flag, a reduction, a name, a layer)
//! fails here, and CI needs no PyTorch.

use crate::cli_common;

use serde::Deserialize;
use std::collections::BTreeMap;
use vaecuda::run::Settings;
use vaecuda::tape::Tape;
use vaecuda::tensor::Tensor;
use vaecuda::train::Trainer;
use vaecuda::{Cpu, Float};

#[derive(Deserialize)]
struct Fixture {
    batch: Vec<usize>,
    hyper: Hyper,
    latent: usize,
    state_dict: Vec<(String, Vec<usize>)>,
    objective: f64,
    recon_term: f64,
    kl_term: f64,
    output_sum: f64,
    output_sq_sum: f64,
    params: BTreeMap<String, ParamAfterStep>,
    buffers_after: BTreeMap<String, BufferAfterStep>,
}

/// The optimizer's hyperparameters as PyTorch filled them in, and the tutorial's batch size
/// and epochs.
#[derive(Deserialize, Debug, PartialEq)]
struct Hyper {
    lr: f64,
    betas: [f64; 2],
    eps: f64,
    weight_decay: f64,
    batch_size: usize,
    epochs: usize,
}

#[derive(Deserialize)]
struct ParamAfterStep {
    grad_norm: f64,
    grad_max: f64,
    positions: Vec<usize>,
    grad: Vec<f64>,
    updated: Vec<f64>,
}

#[derive(Deserialize)]
struct BufferAfterStep {
    sum: f64,
}

/// sin(a·i + b) in f64, cast to f32: the twin's formulas (`wave` in recipe_twins.py).
fn wave(n: usize, a: f64, b: f64, scale: f64, offset: f64) -> Vec<f32> {
    (0..n).map(|i| (offset + scale * (a * i as f64 + b).sin()) as f32).collect()
}

/// The positions the twin sampled in a tensor of `numel` values.
fn positions(numel: usize) -> Vec<usize> {
    let mut p: Vec<usize> = (0..6u64).map(|i| ((i * 2_654_435_761 + 12_345) % numel as u64) as usize).collect();
    p.sort_unstable();
    p.dedup();
    p
}

/// The recipe's settings as `vae train --recipe NAME --dry-run` expands them.
fn settings_of(recipe: &str) -> Settings {
    let data = tempfile::tempdir().unwrap();
    let mut args = vec!["--device", "cpu", "train", "--recipe", recipe, "--dry-run"];
    let dir = data.path().to_str().unwrap().to_string();
    if recipe == "celeba" {
        // The recipe needs a folder of images; --dry-run reads nothing from it.
        args.extend(["--data", &dir]);
    }
    let out = cli_common::ok(&args);
    let json = &out[out.find('{').expect("settings JSON")..];
    vaecuda::run::parse_settings(json).unwrap()
}

/// |got − want| ≤ rel·|want| + abs, or a message naming `what`.
fn close(what: &str, got: f64, want: f64, rel: f64, abs: f64) -> Result<(), String> {
    if (got - want).abs() <= rel * want.abs() + abs {
        Ok(())
    } else {
        Err(format!("{what}: ours {got}, PyTorch's {want}"))
    }
}

/// Runs the twin's check on `recipe`'s settings after `tweak` (a planted bug, or nothing).
fn check_recipe(recipe: &str, tweak: impl Fn(&mut Settings)) -> Result<(), String> {
    let path = format!("{}/tests/fixtures/recipes/{recipe}.json", env!("CARGO_MANIFEST_DIR"));
    let f: Fixture = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut s = settings_of(recipe);
    tweak(&mut s);
    // One Adam step moves every weight by about lr·sign(g), whatever the betas, ε or a small
    // weight decay: those are checked as settings (and the optimizer is Adam with L2 decay,
    // as torch.optim.Adam).
    let ours = Hyper {
        lr: s.lr,
        betas: s.betas,
        eps: s.eps,
        weight_decay: s.weight_decay,
        batch_size: s.batch_size,
        epochs: s.epochs,
    };
    if ours != f.hyper || s.optimizer != vaecuda::run::Optimizer::Adam {
        return Err(format!("settings differ: ours {ours:?} ({:?}), the tutorial's {:?} (Adam)", s.optimizer, f.hyper));
    }
    let be = Cpu::<f32>::default();
    let [n, c, h, w] = f.batch[..] else { panic!("{path}: batch is not 4-D") };
    let shape = [s.model.channels, s.model.height, s.model.width, s.model.latent];
    if shape != [c, h, w, f.latent] {
        return Err(format!("image and latent sizes differ: ours {shape:?}, the tutorial's {:?}", [c, h, w, f.latent]));
    }
    let mut t = Trainer::new(be.clone(), s.model.clone(), s.loss(), s.adam(), s.seed);

    // The state_dict: the same names and shapes, in both directions (a checkpoint loads
    // strictly into the tutorial's model and back).
    let mut ours: Vec<(String, Vec<usize>)> =
        t.store.names.iter().zip(&t.store.values).map(|(n, v)| (n.clone(), v.shape.clone())).collect();
    ours.extend(t.store.counters.keys().map(|k| (k.clone(), vec![])));
    let (mut a, mut b) = (ours.clone(), f.state_dict.clone());
    a.sort();
    b.sort();
    if a != b {
        return Err(format!("state_dict differs:\n ours    {a:?}\n PyTorch {b:?}"));
    }

    // The weights from the twin's formula, in sorted-name order over the trainable tensors.
    let mut trainable: Vec<usize> = (0..t.store.len()).filter(|&i| t.store.trainable[i]).collect();
    trainable.sort_by(|&i, &j| t.store.names[i].cmp(&t.store.names[j]));
    for (k, &i) in trainable.iter().enumerate() {
        let name = t.store.names[i].clone();
        let shape = t.store.values[i].shape.clone();
        let numel: usize = shape.iter().product();
        let scale = if shape.len() >= 2 { 1.0 / (numel as f64 / shape[0] as f64).sqrt() } else { 0.1 };
        let bn_weight = name.ends_with(".weight")
            && t.store.find(&format!("{}running_mean", &name[..name.len() - "weight".len()])).is_some();
        let v = wave(numel, 0.37, 0.11 * k as f64 + 0.3, scale, if bn_weight { 1.0 } else { 0.0 });
        t.store.values[i] = Tensor::from_host(&be, &shape, &v);
    }
    let x_host = wave(n * c * h * w, 0.0123, 0.2, 0.45, 0.5);
    let eps_host = wave(n * f.latent, 0.917, 0.4, 1.5, 0.0);
    let x = || Tensor::from_host(&be, &[n, c, h, w], &x_host);
    let eps = || Tensor::from_host(&be, &[n, f.latent], &eps_host);

    // The decoder's output in training mode, before the step (the twin's y).
    {
        let mut tape = Tape::new(&be, &mut t.store, true);
        let (xv, ev) = (tape.input(x()), tape.input(eps()));
        let (mu, logvar) = t.model.encode(&mut tape, xv);
        let (z, _) = vaecuda::ops::reparam_kl(&mut tape, mu, logvar, ev);
        let y: Vec<f64> = {
            let y = t.model.decode(&mut tape, z);
            tape.to_host(y).iter().map(|v| v.f64()).collect()
        };
        close("Σ output", y.iter().sum(), f.output_sum, 1e-4, 1e-3)?;
        close("Σ output²", y.iter().map(|v| v * v).sum(), f.output_sq_sum, 1e-4, 1e-3)?;
    }
    // Batch norm saw that forward pass: put its running statistics back as they were.
    for i in 0..t.store.len() {
        let name = &t.store.names[i];
        if name.ends_with(".running_mean") || name.ends_with(".running_var") {
            let v = if name.ends_with("mean") { 0.0 } else { 1.0 };
            let shape = t.store.values[i].shape.clone();
            t.store.values[i] = Tensor::from_host(&be, &shape, &vec![v; shape[0]]);
        }
    }
    for v in t.store.counters.values_mut() {
        *v = 0;
    }

    // The objective and one Adam step, at the recipe's KL weight.
    let l = t.step_with_noise(x(), eps(), s.kl_weight).map_err(|e| e.to_string())?;
    let loss = s.loss();
    let recon_term = l.recon * loss.recon_reduction.factor(n, c * h * w);
    let kl_term = l.kl * loss.kl_reduction.factor(n, f.latent);
    // f32 sums of a few thousand terms on each side, in different orders: 1e-5 of the value.
    close("objective", l.loss, f.objective, 1e-5, 1e-7)?;
    close("reconstruction term", recon_term, f.recon_term, 1e-5, 1e-7)?;
    close("KL term", kl_term, f.kl_term, 1e-5, 1e-7)?;
    // A conv bias that feeds a training-mode batch norm has an exactly zero gradient: both
    // sides return rounding noise there, below 1e-6 of the network's largest gradient norm
    // (the fixtures' largest such is 3e-7 of it), so that is the absolute floor of every
    // gradient comparison.
    let floor = 1e-6 * f.params.values().map(|p| p.grad_norm).fold(0.0, f64::max);
    let mut wrong = vec![];
    for (name, p) in &f.params {
        let i = t.store.find(name).ok_or(format!("no parameter {name}"))?;
        assert_eq!(p.positions, positions(t.store.values[i].shape.iter().product()), "{name}");
        let g: Vec<f64> = t.store.grads[i].as_ref().unwrap().to_host(&be).iter().map(|v| v.f64()).collect();
        let norm = g.iter().map(|v| v * v).sum::<f64>().sqrt();
        // Gradients: f32 back-propagation through the same graph: 1e-3 of the tensor's largest.
        wrong.extend(close(&format!("‖∂/∂{name}‖"), norm, p.grad_norm, 1e-3, floor).err());
        let after: Vec<f64> = t.store.values[i].to_host(&be).iter().map(|v| v.f64()).collect();
        for (k, &at) in p.positions.iter().enumerate() {
            wrong.extend(close(&format!("∂/∂{name}[{at}]"), g[at], p.grad[k], 0.0, 1e-3 * p.grad_max + floor).err());
            // Adam's first step moves a weight by lr·g/(|g| + ε): where |g| is not tiny the
            // move is ±lr to within f32, so the updated weight agrees to 1e-3 of lr.
            if p.grad[k].abs() > (1e-2 * p.grad_max).max(10.0 * floor) {
                let what = format!("{name}[{at}] after the step");
                wrong.extend(close(&what, after[at], p.updated[k], 0.0, 1e-3 * s.lr + 1e-7).err());
            }
        }
    }
    for (name, b) in &f.buffers_after {
        let i = t.store.find(name).ok_or(format!("no buffer {name}"))?;
        let sum: f64 = t.store.values[i].to_host(&be).iter().map(|v| v.f64()).sum();
        wrong.extend(close(&format!("Σ {name} after the step"), sum, b.sum, 1e-4, 1e-4).err());
    }
    match wrong.len() {
        0 => Ok(()),
        k => Err(format!("{k} values differ: {}", wrong.join("; "))),
    }
}

macro_rules! recipe_tests {
    ($($test:ident => $name:literal),* $(,)?) => {$(
        #[test]
        fn $test() {
            check_recipe($name, |_| ()).unwrap_or_else(|e| panic!("recipe {}: {e}", $name));
        }
    )*};
}

recipe_tests! {
    mlp_recipe_matches_its_pytorch_twin => "mlp",
    conv_recipe_matches_its_pytorch_twin => "conv",
    lightning_mlp_recipe_matches_its_pytorch_twin => "lightning-mlp",
    mnist_conv_bn_recipe_matches_its_pytorch_twin => "mnist-conv-bn",
    celeba_recipe_matches_its_pytorch_twin => "celeba",
}

/// The twin test must be able to fail: the CelebA recipe with both terms averaged over the
/// images (`--reduction mean`, the closest this project came before it had reductions per
/// term) trains an objective thousands of times off the tutorial's, and the same with a
/// sigmoid for the ReLU output or PyTorch-VAE's names fails too.
#[test]
fn recipes_with_planted_differences_fail_their_twins() {
    use vaecuda::nn::{OutputActivation, ParamNames, TermReduction};
    let e = check_recipe("celeba", |s| s.recon_reduction = Some(TermReduction::BatchMean)).unwrap_err();
    assert!(e.starts_with("objective"), "{e}");
    let e = check_recipe("celeba", |s| s.model.output = OutputActivation::Sigmoid).unwrap_err();
    assert!(e.starts_with("Σ output"), "{e}");
    let e = check_recipe("celeba", |s| s.model.names = ParamNames::VanillaVae).unwrap_err();
    assert!(e.starts_with("state_dict differs"), "{e}");
    let e = check_recipe("lightning-mlp", |s| s.betas = [0.9, 0.999]).unwrap_err();
    assert!(e.starts_with("settings differ"), "{e}");
    let e = check_recipe("mnist-conv-bn", |s| s.model.latent = 3).unwrap_err();
    assert!(e.starts_with("image and latent sizes differ"), "{e}");
}
