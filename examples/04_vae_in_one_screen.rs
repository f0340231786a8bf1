//! 04: the MLP VAE of pytorch/examples, one epoch on MNIST through the library, no CLI.
//!
//! Per image x (784 pixels in [0, 1]) the loss is the negative ELBO:
//!   encoder   h = relu(fc1 x),  μ = fc21 h,  log σ² = fc22 h                 (20 latents)
//!   sample    z = μ + ε·exp(log σ² / 2),  ε ~ N(0, I)        (reparameterization: ∂z/∂μ = 1)
//!   KL        −½ Σ (1 + log σ² − μ² − σ²)                    (closed form, KL(q(z|x) ‖ N(0, I)))
//!   decoder   p = sigmoid(fc4 relu(fc3 z))
//!   recon     −Σ [x log p + (1 − x) log(1 − p)]              (BCE: a Bernoulli likelihood)
//! summed over the batch, differentiated by the tape, one Adam step per batch. The parameters
//! are made by `nn::Vae::new` (PyTorch's initialization and names), the noise and batch order
//! come from the same seeds as `vae train`, so this prints what
//! `vae train --epochs 1 --limit-train N --limit-test M --device cpu` prints for the same N, M.
//!
//! Run: `cargo run --release --example 04_vae_in_one_screen -- [train images] [test images]`

use vaecuda::data::{DeviceData, Source};
use vaecuda::eval::{elbo, EVAL_SEED};
use vaecuda::nn::{Arch, ModelConfig, Vae};
use vaecuda::ops::{self, Reduction};
use vaecuda::optim::{Adam, AdamConfig};
use vaecuda::rng::{NoiseStream, Rng};
use vaecuda::{Cpu, Float, ParamStore, Tape, Tensor};

fn main() -> anyhow::Result<()> {
    let arg = |i: usize, default: usize| std::env::args().nth(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let (n_train, n_test, batch, seed) = (arg(1, 60_000), arg(2, 10_000), 128, 0u64);
    let be = Cpu::<f32>::default();
    let (train, test) = Source::detect(None, 64, Default::default())?.load(Some(n_train), Some(n_test))?;
    let (train, test) = (DeviceData::upload(&be, &train), DeviceData::upload(&be, &test));
    println!("MNIST: {} training and {} test images of {:?}", train.len, test.len, train.shape);

    let config = ModelConfig::mnist(Arch::Mlp);
    let mut store = ParamStore::default();
    let vae = Vae::new(config.clone(), &mut store, &be, seed);
    let p = |name: &str| store.find(name).unwrap();
    let [fc1w, fc1b, fc21w, fc21b, fc22w, fc22b, fc3w, fc3b, fc4w, fc4b] = ["fc1", "fc21", "fc22", "fc3", "fc4"]
        .map(|l| [p(&format!("{l}.weight")), p(&format!("{l}.bias"))])
        .concat()[..]
    else {
        unreachable!()
    };
    println!("{} parameters: {:?}", store.trainable_count(), store.names);
    let mut adam = Adam::new(AdamConfig::default(), &be, &store);
    let (mut noise, mut order) = (NoiseStream::new(seed ^ 0x05EE_D0FA_015E), Rng::new(seed ^ 0xDA7A_5EED));

    let (mut recon_sum, mut kl_sum) = (0.0, 0.0);
    let start = std::time::Instant::now();
    for idx in train.epoch_batches(batch, Some(&mut order)) {
        let n = idx.len();
        let x = train.batch(&be, &idx);
        // The batch's draw of the counter-based noise (what `vae train` draws on the device).
        let draw = noise.next_draw();
        let eps: Vec<f32> =
            (0..n * config.latent).map(|e| NoiseStream::value(noise.key, draw, e as u64) as f32).collect();
        store.zero_grads(&be);
        let mut tape = Tape::new(&be, &mut store, true);
        let (x, eps) = (tape.input(x), tape.input(Tensor::from_host(&be, &[n, config.latent], &eps)));
        let linear = |t: &mut Tape<Cpu<f32>>, h, w, b| {
            let (w, b) = (t.param(w), t.param(b));
            ops::linear(t, h, w, Some(b))
        };
        // Encoder.
        let h = ops::flatten(&mut tape, x);
        let h = linear(&mut tape, h, fc1w, fc1b);
        let h = ops::relu(&mut tape, h);
        let mu = linear(&mut tape, h, fc21w, fc21b);
        let logvar = linear(&mut tape, h, fc22w, fc22b);
        // z and the KL term in one fused op (one kernel on the GPU).
        let (z, kl) = ops::reparam_kl(&mut tape, mu, logvar, eps);
        // Decoder and the Bernoulli likelihood.
        let h = linear(&mut tape, z, fc3w, fc3b);
        let h = ops::relu(&mut tape, h);
        let logits = linear(&mut tape, h, fc4w, fc4b);
        let logits = ops::reshape(&mut tape, logits, &[n, 1, 28, 28]);
        let p = ops::sigmoid(&mut tape, logits);
        let recon = ops::bce(&mut tape, p, x, Reduction::Sum);
        let loss = ops::add(&mut tape, recon, kl);
        recon_sum += tape.to_host(recon)[0].f64();
        kl_sum += tape.to_host(kl)[0].f64();
        tape.backward(loss); // every parameter's gradient, summed over the batch
        let guard = tape.value(loss).buf.clone(); // Adam skips the step if the loss is not finite
        drop(tape);
        adam.step(&be, &mut store, &guard);
    }
    let seconds = start.elapsed().as_secs_f64();
    let (recon, kl) = (recon_sum / train.len as f64, kl_sum / train.len as f64);
    // The test loss with fixed noise, as `vae train` reports it (the same graph, through
    // `Vae::loss`, without recording a backward).
    let test_loss = elbo(&be, &vae, &mut store, &test, vaecuda::backend::Recon::Bce, batch, EVAL_SEED).loss;
    println!(
        "epoch   1/1  train {:.4} (recon {recon:.4}, KL {kl:.4})  test {test_loss:.4}  {seconds:.1} s",
        recon + kl
    );
    println!("(nats per image; `vae train --epochs 1 --limit-train {n_train} --limit-test {n_test} --device cpu` prints the same)");
    Ok(())
}
