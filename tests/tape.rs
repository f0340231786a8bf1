//! The tape's own rules: gradients accumulate when a value feeds several ops, no-grad
//! evaluation records nothing, a training step reuses its buffers, and the ops that take an
//! unzeroed (`empty`) output really write all of it.

use crate::common;

use vaecuda::backend::Recon;
use vaecuda::nn::{Arch, ModelConfig};
use vaecuda::ops;
use vaecuda::optim::AdamConfig;
use vaecuda::rng::Rng;
use vaecuda::tape::{ParamStore, Tape};
use vaecuda::train::{LossConfig, Trainer};
use vaecuda::{Cpu, Tensor};

#[test]
fn gradient_accumulates_over_uses() {
    // y = Σ (x·x + 3x) → dy/dx = 2x + 3, with x used three times.
    let be = Cpu::<f64>::default();
    let mut store = ParamStore::default();
    let id = store.add("x", Tensor::from_host(&be, &[3], &[1.0, -2.0, 0.5]), true);
    let mut tape = Tape::new(&be, &mut store, true);
    let x = tape.param(id);
    let sq = ops::mul(&mut tape, x, x);
    let lin = ops::scale(&mut tape, x, 3.0);
    let s = ops::add(&mut tape, sq, lin);
    let y = ops::sum(&mut tape, s);
    tape.backward(y);
    drop(tape);
    assert_eq!(store.grads[id].as_ref().unwrap().to_host(&be), vec![5.0, -1.0, 4.0]);
}

#[test]
fn no_grad_records_nothing_and_leaves_no_gradients() {
    let be = Cpu::<f32>::default();
    let mut t =
        Trainer::new(be.clone(), ModelConfig::mnist(Arch::Conv), LossConfig::default(), AdamConfig::default(), 0);
    let x = Tensor::from_host(&be, &[2, 1, 28, 28], &vec![0.5f32; 2 * 784]);
    let mut tape = Tape::no_grad(&be, &mut t.store);
    let xv = tape.input(x);
    let (mu, _) = t.model.encode(&mut tape, xv);
    assert_eq!(tape.shape(mu), [2, 20]);
    assert_eq!(tape.recorded(), 0);
    drop(tape);
    // The trainer made every gradient (zeroed) up front; a no-grad pass leaves them zero.
    assert!(t.store.grads.iter().flatten().all(|g| g.to_host(&be).iter().all(|&v| v == 0.0)));
}

#[test]
fn steps_reuse_gradient_buffers() {
    let be = Cpu::<f32>::default();
    let loss = LossConfig { recon: Recon::Bce, ..LossConfig::default() };
    let mut t = Trainer::new(be.clone(), ModelConfig::mnist(Arch::Mlp), loss, AdamConfig::default(), 0);
    let mut rng = Rng::new(1);
    let batch = |rng: &mut Rng| {
        let d: Vec<f32> = (0..4 * 784).map(|_| rng.next_f64() as f32).collect();
        Tensor::from_host(&be, &[4, 1, 28, 28], &d)
    };
    t.step(batch(&mut rng), 1.0).unwrap();
    let ptrs: Vec<*const f32> = t.store.grads.iter().map(|g| g.as_ref().unwrap().buf.as_ptr()).collect();
    let first = t.step(batch(&mut rng), 1.0).unwrap();
    for _ in 0..3 {
        t.step(batch(&mut rng), 1.0).unwrap();
    }
    let after: Vec<*const f32> = t.store.grads.iter().map(|g| g.as_ref().unwrap().buf.as_ptr()).collect();
    assert_eq!(ptrs, after, "gradient buffers were reallocated");
    assert!(first.loss.is_finite() && first.loss > 0.0);
}

#[test]
fn training_lowers_the_loss_on_a_fixed_batch() {
    let be = Cpu::<f32>::default();
    let mut t =
        Trainer::new(be.clone(), ModelConfig::mnist(Arch::Mlp), LossConfig::default(), AdamConfig::default(), 0);
    let mut rng = Rng::new(2);
    let d: Vec<f32> = (0..8 * 784).map(|_| if rng.next_f64() < 0.2 { 1.0 } else { 0.0 }).collect();
    let x = Tensor::from_host(&be, &[8, 1, 28, 28], &d);
    let first = t.step(x.duplicate(&be), 1.0).unwrap().loss;
    let mut last = first;
    for _ in 0..30 {
        last = t.step(x.duplicate(&be), 1.0).unwrap().loss;
    }
    assert!(last < 0.8 * first, "loss went from {first} to {last}");
}

/// Every op, forward and backward, gives the same numbers when its `empty` outputs start as
/// NaN: no op reads or leaves unwritten what it did not zero. Then whole training steps of the
/// three models, whose large buffers go through the recycling pool, match as well.
#[test]
fn empty_outputs_are_fully_written() {
    let (clean, poisoned) = (Cpu::<f64>::default(), Cpu::<f64>::with_poisoned_empty());
    for case in common::all_cases() {
        let want = common::forward_backward(&clean, &case);
        let got = common::forward_backward(&poisoned, &case);
        assert_eq!(got, want, "{}", case.name);
    }
    for arch in [Arch::Mlp, Arch::Conv, Arch::ConvBn] {
        let run = |be: Cpu<f32>| {
            let mut t =
                Trainer::new(be.clone(), ModelConfig::mnist(arch), LossConfig::default(), AdamConfig::default(), 3);
            let mut rng = Rng::new(4);
            let losses: Vec<f64> = (0..3)
                .map(|_| {
                    let data: Vec<f32> = (0..16 * 784).map(|_| rng.next_f64() as f32).collect();
                    t.step(Tensor::from_host(&be, &[16, 1, 28, 28], &data), 1.0).unwrap().loss
                })
                .collect();
            (losses, t.store.values.iter().map(|v| v.to_host(&be)).collect::<Vec<_>>())
        };
        assert!(run(Cpu::with_poisoned_empty()) == run(Cpu::default()), "{}", arch.name());
    }
}
