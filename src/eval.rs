//! Measuring and using a trained model: the test-set negative ELBO, the importance-weighted
//! bound on −log p(x), encoding to latent means and decoding latents to pixels. All in eval
//! mode (batch norm on running statistics), recording nothing for backward.

use anyhow::{bail, Result};

use crate::backend::{Backend, Recon};
use crate::data::DeviceData;
use crate::nn::Vae;
use crate::rng::{NoiseStream, Rng};
use crate::tape::{ParamStore, Tape};
use crate::tensor::{Float, Tensor};
use crate::train::{BatchLoss, EpochSums, LossConfig};

/// Seed of the reparameterization noise of test-set evaluations, both the per-epoch test loss
/// of `vae train` and `vae eval`'s default, so the two print the same number for a checkpoint.
pub const EVAL_SEED: u64 = 0;

/// A model ready to run: backend, architecture and weights.
pub struct Model<B: Backend> {
    /// The device it runs on.
    pub backend: B,
    /// The network (parameter ids and configuration).
    pub vae: Vae,
    /// The weights and batch-norm running statistics, usually loaded from a checkpoint.
    pub store: ParamStore<B>,
}

/// The next draw of `noise` as a tensor of `shape`, computed on the backend's device.
fn normals<B: Backend>(be: &B, noise: &mut NoiseStream, shape: &[usize]) -> Tensor<B> {
    let mut buf = be.empty(shape.iter().product());
    be.normal_noise(noise.key, noise.next_draw(), &mut buf);
    Tensor { shape: shape.to_vec(), buf }
}

impl<B: Backend> Model<B> {
    /// Mean negative ELBO per image over `data`; see [`elbo`].
    pub fn elbo(&mut self, data: &DeviceData<B>, recon: Recon, batch: usize, seed: u64) -> BatchLoss {
        elbo(&self.backend, &self.vae, &mut self.store, data, recon, batch, seed)
    }

    /// (μ, log σ²) of a batch, on the host, each [n·z].
    pub fn encode(&mut self, x: Tensor<B>) -> (Vec<f64>, Vec<f64>) {
        let mut tape = Tape::no_grad(&self.backend, &mut self.store);
        let xv = tape.input(x);
        let (mu, lv) = self.vae.encode(&mut tape, xv);
        let host = |v| tape.to_host(v).iter().map(|e| e.f64()).collect();
        (host(mu), host(lv))
    }

    /// Latent means of every image of `data`, [n·z].
    pub fn encode_all(&mut self, data: &DeviceData<B>, batch: usize) -> Vec<f64> {
        let mut out = vec![];
        for idx in data.epoch_batches(batch, None) {
            out.extend(self.encode(data.batch(&self.backend, &idx)).0);
        }
        out
    }

    /// Decoder logits of latents z [n·z] on the host.
    pub fn decode_logits(&mut self, z: &[f64]) -> Vec<f64> {
        let zd = self.vae.config.latent;
        let n = z.len() / zd;
        let zt: Vec<B::E> = z.iter().map(|&v| B::E::of(v)).collect();
        let mut tape = Tape::no_grad(&self.backend, &mut self.store);
        let zv = tape.input(Tensor::from_host(&self.backend, &[n, zd], &zt));
        let y = self.vae.decode_logits(&mut tape, zv);
        tape.to_host(y).iter().map(|e| e.f64()).collect()
    }

    /// Pixel values decoded from latents z [n·z], through the model's output activation (in
    /// (0, 1) for the default sigmoid).
    pub fn decode(&mut self, z: &[f64]) -> Vec<f32> {
        let act = self.vae.config.output;
        self.decode_logits(z).iter().map(|&l| act.apply(l) as f32).collect()
    }

    /// Importance-weighted estimate of −log p(x) per image, in nats, with `k` samples:
    /// −mean_x log (1/k) Σ_k p(x|z_k) p(z_k) / q(z_k|x), z_k ~ q(z|x). For BCE models
    /// log p(x|z) = −BCE (log clamped at −100, as the training loss).
    /// `on_batch(images_done)` is called after each batch (for a progress bar: the work is
    /// `k` decoder passes per image).
    pub fn iw_nll(
        &mut self,
        data: &DeviceData<B>,
        recon: Recon,
        k: usize,
        batch: usize,
        seed: u64,
        on_batch: &mut dyn FnMut(usize),
    ) -> Result<f64> {
        if recon == Recon::Mse {
            bail!("--iw needs a Bernoulli decoder (a model trained with --recon bce)");
        }
        let ln2pi = (2.0 * std::f64::consts::PI).ln();
        let zd = self.vae.config.latent;
        let d: usize = data.shape.iter().product();
        let mut rng = Rng::new(seed);
        let mut total = 0.0;
        for idx in data.epoch_batches(batch, None) {
            let n = idx.len();
            let x = data.batch(&self.backend, &idx);
            let xh: Vec<f64> = x.to_host(&self.backend).iter().map(|e| e.f64()).collect();
            let (mu, lv) = self.encode(x);
            let mut logw = vec![Vec::with_capacity(k); n];
            for _ in 0..k {
                let eps: Vec<f64> = (0..n * zd).map(|_| rng.normal()).collect();
                let z: Vec<f64> = (0..n * zd).map(|i| mu[i] + eps[i] * (0.5 * lv[i]).exp()).collect();
                let logits = self.decode_logits(&z);
                for (i, w) in logw.iter_mut().enumerate() {
                    let mut lp = 0.0;
                    for j in i * d..(i + 1) * d {
                        let (l, t) = (logits[j], xh[j]);
                        // log σ(l) = −softplus(−l), log(1 − σ(l)) = −softplus(l)
                        let lp1 = (-softplus(-l)).max(-100.0);
                        let lp0 = (-softplus(l)).max(-100.0);
                        lp += t * lp1 + (1.0 - t) * lp0;
                    }
                    for j in i * zd..(i + 1) * zd {
                        lp += -0.5 * (z[j] * z[j] + ln2pi); // log p(z)
                        lp -= -0.5 * (eps[j] * eps[j] + ln2pi + lv[j]); // − log q(z|x)
                    }
                    w.push(lp);
                }
            }
            for w in &logw {
                let m = w.iter().cloned().fold(f64::MIN, f64::max);
                let lme = m + (w.iter().map(|v| (v - m).exp()).sum::<f64>() / k as f64).ln();
                total -= lme;
            }
            on_batch(n);
        }
        Ok(total / data.len.max(1) as f64)
    }
}

/// Mean negative ELBO per image over `data` (recon and KL summed over pixels and latents,
/// averaged over images), with reparameterization noise from `seed`: the number the PyTorch
/// example prints as "test set loss". `loss` is recon + KL.
pub fn elbo<B: Backend>(
    be: &B,
    vae: &Vae,
    store: &mut ParamStore<B>,
    data: &DeviceData<B>,
    recon: Recon,
    batch: usize,
    seed: u64,
) -> BatchLoss {
    let objective = LossConfig { recon, ..LossConfig::default() };
    let p = evaluate(be, vae, store, data, &objective, 1.0, batch, seed).per_image();
    BatchLoss { loss: p.elbo(), recon: p.recon, kl: p.kl }
}

/// One pass over `data` in eval mode (batch norm on running statistics), in batches of
/// `batch` in order, with reparameterization noise from `seed`: the sums of its losses under
/// `objective` with the KL weighted by `kl_weight`, as training adds them up.
#[allow(clippy::too_many_arguments)]
pub fn evaluate<B: Backend>(
    be: &B,
    vae: &Vae,
    store: &mut ParamStore<B>,
    data: &DeviceData<B>,
    objective: &LossConfig,
    kl_weight: f64,
    batch: usize,
    seed: u64,
) -> EpochSums {
    let mut sums = EpochSums::default();
    let z = vae.config.latent;
    let image_len = vae.config.image_len();
    // The noise of the whole pass in one draw, image i's at rows i: each image gets the same
    // noise whatever the batch size, so `vae eval` repeats the test loss training printed.
    let all = normals(be, &mut NoiseStream::new(seed), &[data.len, z]);
    // Every full batch after the second replays one CUDA graph (see `crate::graph`).
    let mut graphs = crate::graph::Replayer::default();
    for idx in data.epoch_batches(batch, None) {
        let x = data.batch(be, &idx);
        let mut eps = Tensor { shape: vec![idx.len(), z], buf: be.empty(idx.len() * z) };
        be.gather_rows(&all.buf, z, &idx, &mut eps.buf);
        let key = crate::graph::Key::new("evaluate", &[&x.shape, &eps.shape], &[kl_weight]);
        let packed = graphs.run(
            be,
            key,
            vec![x, eps],
            || (),
            |inputs| crate::train::evaluate_batch(be, vae, store, objective, kl_weight, inputs),
        );
        sums.add(objective, idx.len(), image_len, z, crate::train::unpack_loss::<B>(&packed));
    }
    sums
}

fn softplus(x: f64) -> f64 {
    if x > 0.0 {
        x + (-x).exp().ln_1p()
    } else {
        x.exp().ln_1p()
    }
}

/// Inverse of the standard normal CDF (Acklam's rational approximation, |error| < 1.2e-9).
#[allow(clippy::excessive_precision)] // Acklam's published coefficients, verbatim
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -39.696830286653757,
        220.9460984245205,
        -275.92851044696869,
        138.357751867269,
        -30.66479806614716,
        2.5066282774592392,
    ];
    const B: [f64; 5] =
        [-54.476098798224058, 161.58583685804089, -155.69897985988661, 66.80131188771972, -13.280681552885721];
    const C: [f64; 6] = [
        -0.0077848940024302926,
        -0.32239645804113648,
        -2.4007582771618381,
        -2.5497325393437338,
        4.3746641414649678,
        2.9381639826987831,
    ];
    const D: [f64; 4] = [0.0077846957090414622, 0.32246712907003983, 2.445134137142996, 3.7544086619074162];
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

/// The top two principal-component projections of `n` rows of `d` values (d ≥ 2); rows are
/// returned unchanged (first two columns) when d = 2.
pub fn pca2(x: &[f64], n: usize, d: usize) -> Vec<[f64; 2]> {
    if d == 2 {
        return (0..n).map(|i| [x[2 * i], x[2 * i + 1]]).collect();
    }
    let mean: Vec<f64> = (0..d).map(|j| (0..n).map(|i| x[i * d + j]).sum::<f64>() / n.max(1) as f64).collect();
    let mut cov = vec![0.0; d * d];
    for i in 0..n {
        for a in 0..d {
            let va = x[i * d + a] - mean[a];
            for b in 0..d {
                cov[a * d + b] += va * (x[i * d + b] - mean[b]);
            }
        }
    }
    let mut comps: Vec<Vec<f64>> = vec![];
    for c in 0..2 {
        // Power iteration with deflation against the components found so far.
        let mut v: Vec<f64> = (0..d).map(|j| if j == c { 1.0 } else { 0.1 / (1 + j) as f64 }).collect();
        for _ in 0..500 {
            let mut w: Vec<f64> = (0..d).map(|a| (0..d).map(|b| cov[a * d + b] * v[b]).sum()).collect();
            for p in &comps {
                let dot: f64 = w.iter().zip(p).map(|(a, b)| a * b).sum();
                w.iter_mut().zip(p).for_each(|(a, b)| *a -= dot * b);
            }
            let norm = w.iter().map(|a| a * a).sum::<f64>().sqrt();
            if norm == 0.0 {
                break;
            }
            v = w.iter().map(|a| a / norm).collect();
        }
        comps.push(v);
    }
    (0..n)
        .map(|i| {
            let p = |c: &Vec<f64>| (0..d).map(|j| (x[i * d + j] - mean[j]) * c[j]).sum::<f64>();
            [p(&comps[0]), p(&comps[1])]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_match_tables() {
        assert!((normal_quantile(0.5)).abs() < 1e-9);
        assert!((normal_quantile(0.95) - 1.6448536269514722).abs() < 1e-8);
        assert!((normal_quantile(0.05) + 1.6448536269514722).abs() < 1e-8);
        assert!((normal_quantile(0.01) + 2.3263478740408408).abs() < 1e-8);
    }

    #[test]
    fn pca_finds_the_dominant_direction() {
        // Points along (1, 1, 0) with a little spread on z.
        let x: Vec<f64> = (0..50).flat_map(|i| [i as f64, i as f64, (i % 3) as f64 * 0.1]).collect();
        let p = pca2(&x, 50, 3);
        let spread = p.iter().map(|q| q[0]).fold(f64::MIN, f64::max) - p.iter().map(|q| q[0]).fold(f64::MAX, f64::min);
        assert!((spread - 49.0 * 2f64.sqrt()).abs() < 1e-2, "{spread}");
    }
}
