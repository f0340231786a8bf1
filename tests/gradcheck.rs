//! Every op's backward against f64 central differences (eps 1e-6, atol 1e-5, rtol 1e-3, the
//! tolerances of torch.autograd.gradcheck), over the shapes in `common::all_cases`, and the
//! three whole VAEs w.r.t. every parameter tensor.

mod common;

use vaecuda::gradcheck::{check, weighted_sum, GradCheck, Input};
use vaecuda::nn::{Arch, ModelConfig};
use vaecuda::rng::Rng;
use vaecuda::tensor::Tensor;
use vaecuda::Cpu;

#[test]
fn every_op_matches_finite_differences() {
    let be = Cpu::<f64>::default();
    let cases = common::all_cases();
    assert!(cases.len() >= 39, "op cases went missing");
    let mut failures = vec![];
    for case in &cases {
        let result = check(&be, &case.inputs, true, GradCheck::default(), |tape, vars| {
            let y = case.run(tape, vars);
            weighted_sum(tape, y, 5)
        });
        match result {
            Ok(worst) => assert!(worst.is_finite()),
            Err(e) => failures.push(format!("{}: {e}", case.name)),
        }
    }
    assert!(failures.is_empty(), "gradient check failed:\n{}", failures.join("\n"));
}

/// A wrong gradient must be caught: a deliberately broken op (forward x², backward claims x)
/// fails the check. Guards against a checker that cannot fail.
#[test]
fn the_checker_catches_a_wrong_gradient() {
    let be = Cpu::<f64>::default();
    let mut rng = Rng::new(3);
    let inputs = [Input::uniform("x", &[4], 0.5, 1.0, &mut rng)];
    let result = check(&be, &inputs, true, GradCheck::default(), |tape, v| {
        // x ⊙ x through `mul` is right; summing x ⊙ stop_grad(x) halves the gradient.
        let xc = tape.input(Tensor::from_host(&tape.backend, &[4], &tape.to_host(v[0])));
        let y = vaecuda::ops::mul(tape, v[0], xc);
        vaecuda::ops::sum(tape, y)
    });
    assert!(result.is_err(), "a halved gradient passed the check");
}

/// The whole negative ELBO of each architecture against finite differences (see
/// `common::whole_model_gradcheck`).
fn whole_model(config: ModelConfig, n: usize, entries: usize) {
    let arch = config.arch;
    common::whole_model_gradcheck(&Cpu::<f64>::default(), config, n, entries)
        .unwrap_or_else(|e| panic!("{arch:?}: {e}"));
}

#[test]
fn mlp_vae_gradients() {
    whole_model(ModelConfig::mnist(Arch::Mlp), 3, 12);
}

#[test]
fn conv_vae_gradients() {
    whole_model(ModelConfig::mnist(Arch::Conv), 2, 8);
}

#[test]
fn conv_bn_vae_gradients() {
    // Batch 3 so every batch-norm channel normalizes over more than one value.
    whole_model(ModelConfig::mnist(Arch::ConvBn), 3, 8);
}

#[test]
fn mnist_tutorial_vae_gradients() {
    // The log σ head (log σ² = 2·linear3) and the unpadded stride-2 convolutions.
    whole_model(ModelConfig::mnist(Arch::ConvBnMnist), 3, 6);
}

/// The CelebA tutorial's objective: a ReLU output, the squared error averaged over every
/// value and the KL averaged over the images, weighted 0.00025 (here 0.25, so the KL's share
/// of the gradient is not lost under the finite differences' error).
#[test]
fn celeba_objective_gradients() {
    use vaecuda::nn::{LossConfig, OutputActivation, ParamNames, TermReduction};
    let config = ModelConfig {
        channels: 3,
        height: 8,
        width: 8,
        latent: 3,
        hiddens: vec![2, 3],
        output: OutputActivation::Relu,
        names: ParamNames::Dldemos,
        ..ModelConfig::mnist(Arch::ConvBn)
    };
    let objective = LossConfig {
        recon: vaecuda::backend::Recon::Mse,
        recon_reduction: TermReduction::Mean,
        kl_reduction: TermReduction::BatchMean,
    };
    common::whole_objective_gradcheck(&Cpu::<f64>::default(), config, &objective, 0.25, 3, 8)
        .unwrap_or_else(|e| panic!("{e}"));
}
