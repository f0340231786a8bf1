//! One training step and one evaluation batch, device-agnostic: what the CLI, the benches and
//! the tests all drive. Epoch loops, progress bars and checkpoints live in the CLI.

use crate::backend::Backend;
use crate::graph::{Key, Replayer};
use crate::nn::{ModelConfig, Vae};
use crate::optim::{Adam, AdamConfig};
use crate::rng::NoiseStream;
use crate::tape::{ParamStore, Tape};
use crate::tensor::{Float, Tensor};
use serde::{Deserialize, Serialize};

pub use crate::nn::vae::{LossConfig, TermReduction};

/// Losses of one batch, as host numbers.
#[derive(Clone, Copy, Debug, Default)]
pub struct BatchLoss {
    /// The objective as [`LossConfig`] reduces it (recon + β·KL summed over the batch, by
    /// default): the number training minimizes.
    pub loss: f64,
    /// The reconstruction term summed over the batch, in nats.
    pub recon: f64,
    /// The KL term summed over the batch, before weighting, in nats.
    pub kl: f64,
}

/// Batches' losses added up over a pass (an epoch, or the test set), in f64, in batch
/// order; [`EpochSums::per_image`] turns them into what is reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EpochSums {
    /// Images seen.
    pub images: usize,
    /// Σ of the batches' summed reconstruction terms.
    pub recon: f64,
    /// Σ of the batches' summed KL terms.
    pub kl: f64,
    /// Σ of the batches' objectives, each weighted by [`LossConfig::images_weight`].
    pub objective: f64,
    /// Σ over batches of n·(the batch's objective), and of its two reduced terms (the KL
    /// unweighted): what PyTorch Lightning logs as an epoch's `loss`, `BCE_loss`, `KLD_loss`.
    pub batch_terms: [f64; 3],
}

/// What a pass reports, per image.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PerImage {
    /// Reconstruction, nats per image.
    pub recon: f64,
    /// KL, nats per image.
    pub kl: f64,
    /// The trained objective per image (see [`LossConfig::images_weight`]).
    pub objective: f64,
    /// The tutorials' per-batch logging: the batch objective, its reconstruction term and
    /// its KL term as the loss function returns them, averaged over the batches weighted by
    /// their images.
    pub batch_terms: [f64; 3],
}

impl PerImage {
    /// The negative ELBO per image (reconstruction + unweighted KL), in nats.
    pub fn elbo(&self) -> f64 {
        self.recon + self.kl
    }
}

impl EpochSums {
    /// Adds a batch of `n` images, `image_len` values and `latent` latents each, trained
    /// with `objective`.
    pub fn add(&mut self, objective: &LossConfig, n: usize, image_len: usize, latent: usize, l: BatchLoss) {
        let nf = n as f64;
        self.images += n;
        self.recon += l.recon;
        self.kl += l.kl;
        self.objective += l.loss * objective.images_weight(n);
        self.batch_terms[0] += nf * l.loss;
        self.batch_terms[1] += nf * l.recon * objective.recon_reduction.factor(n, image_len);
        self.batch_terms[2] += nf * l.kl * objective.kl_reduction.factor(n, latent);
    }
    /// Everything divided by the images seen.
    pub fn per_image(&self) -> PerImage {
        let n = self.images.max(1) as f64;
        PerImage {
            recon: self.recon / n,
            kl: self.kl / n,
            objective: self.objective / n,
            batch_terms: self.batch_terms.map(|v| v / n),
        }
    }
}

/// The loss became NaN or infinite; the step was not applied.
#[derive(Debug)]
pub struct NonFiniteLoss {
    /// The Adam step (from 1) that would have been applied.
    pub step: u64,
    /// The loss it saw: NaN or ±∞.
    pub loss: f64,
}

impl std::fmt::Display for NonFiniteLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the loss became {} at step {}; weights were left as they were before that step",
            self.loss, self.step
        )
    }
}
impl std::error::Error for NonFiniteLoss {}

/// A model with its weights, optimizer state and noise source: everything one training step
/// needs. [`Trainer::step`] is the path a batch takes through the whole engine.
pub struct Trainer<B: Backend> {
    /// Where every tensor lives and every op runs.
    pub backend: B,
    /// The network: parameter ids and configuration.
    pub model: Vae,
    /// The weights, gradients and batch-norm state the model's ids point into.
    pub store: ParamStore<B>,
    /// The optimizer and its moments (its `step` counts the updates applied so far).
    pub adam: Adam<B>,
    /// The objective.
    pub loss: LossConfig,
    /// The reparameterization noise: a counter-based stream the backend draws from in place.
    pub noise: NoiseStream,
    /// Steps captured as graphs, replayed while their shape and KL weight repeat (CUDA).
    graphs: Replayer<B>,
}

impl<B: Backend> Trainer<B> {
    /// Builds the model's parameters from `seed` (PyTorch's initialization) and zeroed Adam
    /// moments; the noise generator is seeded from `seed` too, so one seed fixes the run.
    pub fn new(backend: B, config: ModelConfig, loss: LossConfig, adam: AdamConfig, seed: u64) -> Self {
        let mut store = ParamStore::default();
        let model = Vae::new(config, &mut store, &backend, seed);
        store.create_grads(&backend);
        let adam = Adam::new(adam, &backend, &store);
        let noise = NoiseStream::new(seed ^ 0x05EE_D0FA_015E);
        Trainer { backend, model, store, adam, loss, noise, graphs: Replayer::default() }
    }

    /// Standard-normal noise [n, z] for the reparameterization: the stream's next draw,
    /// computed where the tensors live (on the device, nothing copied).
    pub fn draw_noise(&mut self, n: usize) -> Tensor<B> {
        let z = self.model.config.latent;
        let mut buf = self.backend.empty(n * z);
        self.backend.normal_noise(self.noise.key, self.noise.next_draw(), &mut buf);
        Tensor { shape: vec![n, z], buf }
    }

    /// Forward, backward and one Adam update on a batch x [n, c, h, w].
    pub fn step(&mut self, x: Tensor<B>, kl_weight: f64) -> Result<BatchLoss, NonFiniteLoss> {
        let eps = self.draw_noise(x.shape[0]);
        self.step_with_noise(x, eps, kl_weight)
    }

    /// [`Trainer::step`] with the reparameterization noise eps [n, z] given (a test that
    /// compares a step with another framework's feeds both the same noise).
    pub fn step_with_noise(
        &mut self,
        x: Tensor<B>,
        eps: Tensor<B>,
        kl_weight: f64,
    ) -> Result<BatchLoss, NonFiniteLoss> {
        let key = Key::new("train", &[&x.shape, &eps.shape], &[kl_weight]);
        let s = self.adam.advance();
        let Trainer { backend, model, store, adam, loss, graphs, .. } = self;
        let stage = || backend.stage_adam(s);
        let packed = graphs.run(backend, key, vec![x, eps], stage, |inputs| {
            let [x, eps] = <[Tensor<B>; 2]>::try_from(inputs).ok().expect("x and eps");
            store.zero_grads(backend);
            // The loss is not looked at inside the step: Adam skips a non-finite one on the
            // device, and the host reads the three scalars once, after the step.
            let (losses, inputs) = {
                let mut tape = Tape::new(backend, store, true);
                let (xv, ev) = (tape.input(x), tape.input(eps));
                let l = model.loss(&mut tape, xv, ev, loss, kl_weight);
                let losses = pack_loss(&tape, l);
                tape.backward(l.loss);
                (losses, vec![tape.take_value(xv), tape.take_value(ev)])
            };
            adam.apply(backend, store, &losses, s);
            (losses, inputs)
        });
        let stats = unpack_loss::<B>(&packed);
        if !stats.loss.is_finite() {
            // Not applied (see `Adam::step`): the count goes back to the last applied step.
            self.adam.step -= 1;
            return Err(NonFiniteLoss { step: self.adam.step + 1, loss: stats.loss });
        }
        Ok(stats)
    }

    /// The loss of a batch in eval mode (batch norm on running statistics), recording
    /// nothing, with the KL weighted by `kl_weight`.
    pub fn evaluate(&mut self, x: Tensor<B>, kl_weight: f64) -> BatchLoss {
        let eps = self.draw_noise(x.shape[0]);
        let key = Key::new("evaluate", &[&x.shape, &eps.shape], &[kl_weight]);
        let Trainer { backend, model, store, loss, graphs, .. } = self;
        let packed = graphs.run(
            backend,
            key,
            vec![x, eps],
            || (),
            |inputs| evaluate_batch(backend, model, store, loss, kl_weight, inputs),
        );
        unpack_loss::<B>(&packed)
    }
}

/// The loss of one batch, `inputs` = [x, eps], in eval mode, packed as [`pack_loss`]; the
/// inputs handed back (the work of a [`Replayer::run`]).
pub(crate) fn evaluate_batch<B: Backend>(
    be: &B,
    model: &Vae,
    store: &mut ParamStore<B>,
    objective: &LossConfig,
    kl_weight: f64,
    inputs: Vec<Tensor<B>>,
) -> crate::graph::Ran<B> {
    let [x, eps] = <[Tensor<B>; 2]>::try_from(inputs).ok().expect("x and eps");
    let mut tape = Tape::no_grad(be, store);
    let (xv, ev) = (tape.input(x), tape.input(eps));
    let l = model.loss(&mut tape, xv, ev, objective, kl_weight);
    let packed = pack_loss(&tape, l);
    (packed, vec![tape.take_value(xv), tape.take_value(ev)])
}

/// What a training step at some batch size will take, measured on one image.
#[derive(Clone, Copy, Debug)]
pub struct StepMemory {
    /// Bytes per image of a step: the forward's activations, held until the backward, times
    /// [`StepMemory::FACTOR`] for their gradients and the ops' scratch buffers.
    pub bytes_per_image: u64,
}

impl StepMemory {
    /// Peak bytes of a step per byte of forward activations. A step holds the activations
    /// and their gradients (as many again), plus scratch space (im2col, transposes) that
    /// gradients freed early make room for: on the CPU conv and conv-bn steps took 1.2–1.6×
    /// their activations at the peak (bench/results/2026-12-01-cpu-step-memory.md), so 2
    /// keeps the estimate on the safe side without refusing batches that fit.
    pub const FACTOR: u64 = 2;

    /// The estimated extra bytes a step on `batch` images takes.
    pub fn for_batch(&self, batch: usize) -> u64 {
        self.bytes_per_image.saturating_mul(batch as u64)
    }
    /// The largest batch that fits in `bytes`.
    pub fn largest_batch(&self, bytes: u64) -> u64 {
        bytes / self.bytes_per_image.max(1)
    }
}

impl<B: Backend> Trainer<B> {
    /// Measures what a step takes per image by running the forward pass on `one_image`
    /// ([1, c, h, w]) in eval mode: no gradient, no batch-norm statistics touched and no
    /// training noise drawn, so training goes on exactly as if this had not run.
    pub fn step_memory(&mut self, one_image: Tensor<B>) -> StepMemory {
        let z = self.model.config.latent;
        let eps = Tensor::from_host(&self.backend, &[1, z], &vec![B::E::of(0.0); z]);
        let mut tape = Tape::no_grad(&self.backend, &mut self.store);
        let (xv, ev) = (tape.input(one_image), tape.input(eps));
        self.model.loss(&mut tape, xv, ev, &self.loss, 1.0);
        let bytes = (tape.value_elements() * std::mem::size_of::<B::E>()) as u64;
        StepMemory { bytes_per_image: bytes * StepMemory::FACTOR }
    }
}

/// The three scalars of a loss side by side in one device buffer: `[loss, recon, kl]`.
pub(crate) fn pack_loss<B: Backend>(tape: &Tape<B>, l: crate::nn::VaeLoss) -> B::Buf {
    let be = &tape.backend;
    let mut out = be.empty(3);
    be.pack_scalars(&[&tape.value(l.loss).buf, &tape.value(l.recon).buf, &tape.value(l.kl).buf], &mut out);
    out
}

/// [`pack_loss`]'s three scalars, read back.
pub(crate) fn unpack_loss<B: Backend>(v: &[B::E]) -> BatchLoss {
    BatchLoss { loss: v[0].f64(), recon: v[1].f64(), kl: v[2].f64() }
}
