//! 02: the tape, a backward, and the check that proves a backward right (or wrong).
//!
//! Every op records its output and a closure that, given the output's gradient, *adds* into
//! its inputs' gradients; `Tape::backward` runs the closures once, in reverse. Nothing proves
//! a hand-written closure right except comparing it with finite differences in f64:
//! ∂f/∂x ≈ (f(x + ε) − f(x − ε)) / 2ε, which is what `gradcheck::check` does for every input
//! entry (the same tolerances as `torch.autograd.gradcheck`).
//!
//! Run: `cargo run --release --example 02_tape_and_gradcheck`

use vaecuda::gradcheck::{check, weighted_sum, GradCheck, Input};
use vaecuda::rng::Rng;
use vaecuda::{ops, Backend, Cpu, ParamStore, Tape, Tensor, Var};

type B = Cpu<f64>;

/// y = x³ elementwise, as a new op: the forward from two backend multiplications, and a
/// backward that adds dy·x² to dx `times` times. The right derivative is 3x², so `times` = 3
/// is correct and anything else is the kind of slip a backward can hide.
fn cube(tape: &mut Tape<B>, x: Var, times: usize) -> Var {
    let be = tape.backend.clone();
    let shape = tape.shape(x).to_vec();
    let mut x2 = Tensor::empty(&be, &shape);
    be.mul(&tape.value(x).buf, &tape.value(x).buf, &mut x2.buf);
    let mut y = Tensor::empty(&be, &shape);
    be.mul(&x2.buf, &tape.value(x).buf, &mut y.buf);
    tape.record1(&[x], y, move |ctx, dy| {
        let be = ctx.backend;
        if let Some(dx) = ctx.grad(x) {
            for _ in 0..times {
                be.mul_accumulate(&dy.buf, &x2.buf, &mut dx.buf); // dx += dy·x²
            }
        }
    })
}

/// f(x, w) = Σ sigmoid(x·Wᵀ)³ ⊙ R: a linear layer, an activation, the new op.
fn f(tape: &mut Tape<B>, v: &[Var], times: usize) -> Var {
    let h = ops::linear(tape, v[0], v[1], None);
    let s = ops::sigmoid(tape, h);
    let c = cube(tape, s, times);
    weighted_sum(tape, c, 7)
}

fn main() {
    let be = B::default();
    let mut rng = Rng::new(1);
    let inputs = [Input::uniform("x", &[2, 3], -1.0, 1.0, &mut rng), Input::uniform("w", &[4, 3], -1.0, 1.0, &mut rng)];

    // One forward and backward by hand: parameters live in a store the tape borrows.
    let mut store = ParamStore::default();
    for inp in &inputs {
        store.add(&inp.name, Tensor::from_host(&be, &inp.shape, &inp.data), true);
    }
    let mut tape = Tape::new(&be, &mut store, true);
    let vars = [tape.param(0), tape.param(1)];
    let loss = f(&mut tape, &vars, 3);
    println!("f(x, w) = {:.6}, {} backward closures recorded", tape.to_host(loss)[0], tape.recorded());
    tape.backward(loss);
    drop(tape);
    for (i, inp) in inputs.iter().enumerate() {
        let g = store.grads[i].as_ref().unwrap().to_host(&be);
        println!("∂f/∂{} = {:?}", inp.name, g.iter().map(|v| (v * 1e4).round() / 1e4).collect::<Vec<_>>());
    }

    // The same function, checked against central differences: the right backward passes...
    let right = check(&be, &inputs, true, GradCheck::default(), |tape, v| f(tape, v, 3));
    match &right {
        Ok(worst) => println!("\nbackward 3·x²: passes (worst entry: {worst:.1e} of the tolerance)"),
        Err(e) => println!("\nbackward 3·x²: FAILS: {e}"),
    }
    // ...and a wrong one (2·x²) fails, naming the entry and both numbers.
    let wrong = check(&be, &inputs, true, GradCheck::default(), |tape, v| f(tape, v, 2));
    match &wrong {
        Ok(_) => println!("backward 2·x²: passes (it should not)"),
        Err(e) => println!("backward 2·x²: fails as it should: {e}"),
    }
    assert!(right.is_ok() && wrong.is_err());
}
