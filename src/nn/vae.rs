//! The three VAEs. Each encodes x [n, c, h, w] to (μ, log σ²) [n, z] and decodes z back to
//! logits of the same shape as x (the loss decides whether a sigmoid follows). Parameter names
//! match the PyTorch models people already have:
//! - `mlp` (pytorch/examples): `fc1, fc21, fc22, fc3, fc4`.
//! - `conv` (the tutorials' conv VAE): `encoder.conv1..3, encoder.fc1, encoder.fc21,
//!   encoder.fc22, decoder.fc1, decoder.fc2, decoder.conv1..3`.
//! - `conv-bn` (PyTorch-VAE's VanillaVAE layout): `encoder.{i}.0` conv + `encoder.{i}.1` batch
//!   norm, `fc_mu`, `fc_var`, `decoder_input`, `decoder.{i}.{0,1}`, `final_layer.{0,1,3}`; or,
//!   with [`ParamNames::Dldemos`], the CelebA tutorial's names for the same layers:
//!   `mean_linear`, `var_linear`, `decoder_projection`, and its last block as
//!   `decoder.{L−1}.{0,1,3}` (L = the number of widths).
//! - `conv-bn-mnist` (the conv + batch-norm MNIST tutorial, `VAE_mnist.ipynb`):
//!   `encoder.conv1..3`, `encoder.batch2`, `encoder.linear1..3`, `decoder.decoder_lin.{0,2}`,
//!   `decoder.decoder_conv.{0,1,3,4,6}`. Its second head is log σ (the tutorial computes
//!   `sigma = exp(linear3(x))`), so log σ² = 2·linear3(x) here.
//!
//! # The math, as the code computes it
//!
//! **The objective.** For an image x the model maximizes the evidence lower bound
//! `ELBO(x) = E_{z ~ q(z|x)}[log p(x|z)] − KL(q(z|x) ‖ p(z))`, with the prior `p(z) = N(0, I)`
//! and the encoder's `q(z|x) = N(μ(x), diag σ²(x))`. Training minimizes `−ELBO`, summed over
//! the batch ([`Vae::loss`]); reported losses are per image, in nats.
//!
//! **The reparameterization trick.** `z = μ + ε·exp(½ log σ²)` with `ε ~ N(0, I)` drawn
//! outside the graph (`train::Trainer::draw_noise`), so z is a differentiable function of μ and
//! log σ²: `∂z/∂μ = 1`, `∂z/∂log σ² = ½ ε σ`. One sample of z per image estimates the
//! expectation. Computed by [`ops::reparam_kl()`] (`reparam_kl_fwd` in `kernels/vae_loss.cu`).
//!
//! **The KL term, in closed form.** For diagonal Gaussians against `N(0, I)`,
//! `KL = −½ Σ_j (1 + log σ²_j − μ²_j − σ²_j)`, with gradients `∂KL/∂μ = μ` and
//! `∂KL/∂log σ² = ½(σ² − 1)`. The same op computes it (its sum is a deterministic reduction,
//! `reduce_final` in `kernels/elementwise.cu`), so μ and log σ² are read once for z and KL.
//!
//! **The reconstruction term** `−log p(x|z)`, from the decoder's output ([`ops::loss`],
//! `loss_fwd`/`loss_bwd` in `kernels/vae_loss.cu`):
//! - **BCE** on `p = sigmoid(logits)`: `−Σ [x log p + (1 − x) log(1 − p)]`, the negative
//!   log-likelihood of a Bernoulli decoder (the tutorials' choice for MNIST; x in [0, 1] is
//!   treated as a probability). Logs are clamped at −100 as PyTorch does.
//! - **BCE with logits**: the same value computed from the logits in the stable form
//!   `max(l, 0) − l·x + log(1 + e^{−|l|})`, gradient `sigmoid(l) − x`.
//! - **MSE**: `Σ (x − x̂)²`. For a Gaussian decoder with fixed variance s²,
//!   `−log p(x|z) = Σ (x − x̂)² / 2s² + const`, so a summed MSE is that likelihood with the
//!   scale of the KL term changed by a factor 2s².
//!
//! **How a batch's terms are reduced** ([`LossConfig`], `--recon-reduction`,
//! `--kl-reduction`) decides what a KL weight means. The objective of a batch of n images is
//! `a(n)·R + β·c(n)·K`, R and K the terms summed over the batch, with `a(n)` = 1 (`sum`), 1/n
//! (`batch-mean`) or 1/(n·D) (`mean`, PyTorch's default `reduction='mean'`: over every one of
//! the D = c·h·w values of each image), and `c(n)` the same with the latent size z for D. The
//! CelebA tutorial minimizes `F.mse_loss(x̂, x)` (a mean over every element) plus 0.00025 × the
//! KL averaged over the images, i.e. `--recon-reduction mean --kl-reduction batch-mean
//! --kl-weight 0.00025`: per image that is `R/D + 0.00025·K`, so against the summed squared
//! error the KL weighs 0.00025·D (3.07 at 3×64×64, 0.196 on MNIST), not 0.00025. Written
//! as a Gaussian decoder, it is a decoder variance s² = D·0.00025/2 (s ≈ 1.24 at 64×64): a
//! blurry decoder, which is what the tutorial's faces look like.

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, Recon};
use crate::nn::layers::{BatchNorm, Conv2d, ConvTranspose2d, Linear};
use crate::ops::{self, unary::Unary, Reduction};
use crate::rng::Rng;
use crate::tape::{ParamStore, Tape, Var};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
/// Which of the three VAEs to build (`--arch`; stored in checkpoints as `mlp`, `conv`,
/// `conv-bn`). The layers of each are in the module doc, their math in [`Vae::loss`].
///
/// The variants' one-line docs double as the `--arch` values' help in `vae train --help`
/// (clap's `ValueEnum` reads them), so they stay one line of plain text.
#[serde(rename_all = "kebab-case")]
pub enum Arch {
    /// MLP (pytorch/examples): one hidden layer of --hidden units, any image size
    Mlp,
    /// The tutorials' conv VAE: 3x3 convolutions of 32, 64 and 128 channels, then 256 features
    Conv,
    /// PyTorch-VAE's VanillaVAE: stride-2 conv + batch norm blocks of --hiddens widths
    ConvBn,
    /// The conv + batch-norm MNIST tutorial's network: convs of 8, 16, 32 channels, 28x28 only
    ConvBnMnist,
}

impl Arch {
    /// The name used on the command line, in run directories and in checkpoint metadata.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Mlp => "mlp",
            Arch::Conv => "conv",
            Arch::ConvBn => "conv-bn",
            Arch::ConvBnMnist => "conv-bn-mnist",
        }
    }
}

/// Everything needed to rebuild a model; stored in checkpoint metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Which network.
    pub arch: Arch,
    /// Image channels: 1 for greyscale, 3 for RGB.
    pub channels: usize,
    /// Image height, in pixels.
    pub height: usize,
    /// Image width, in pixels.
    pub width: usize,
    /// Dimension of z (20 in the tutorials; 2 for a manifold you can plot).
    pub latent: usize,
    /// Hidden width of the `mlp` (400 in pytorch/examples).
    pub hidden: usize,
    /// Channel widths of the `conv-bn` blocks.
    pub hiddens: Vec<usize>,
    /// What turns the decoder's last layer into pixels (absent from older checkpoints:
    /// sigmoid).
    #[serde(default)]
    pub output: OutputActivation,
    /// Which tutorial's parameter names the `conv-bn` layers carry (absent: PyTorch-VAE's).
    #[serde(default)]
    pub names: ParamNames,
}

/// The decoder's last step, from its last layer's values to pixels (`--output-activation`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OutputActivation {
    /// Pixels in (0, 1): what a Bernoulli decoder (BCE) needs; the tutorials' default
    #[default]
    Sigmoid,
    /// Pixels in [0, ∞): the CelebA tutorial's last ReLU (MSE only)
    Relu,
    /// The last layer's values as they are (MSE only)
    None,
}

impl OutputActivation {
    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            OutputActivation::Sigmoid => "sigmoid",
            OutputActivation::Relu => "relu",
            OutputActivation::None => "none",
        }
    }
    /// The activation of one value, on the host (pictures decode through it).
    pub fn apply(self, v: f64) -> f64 {
        match self {
            OutputActivation::Sigmoid => 1.0 / (1.0 + (-v).exp()),
            OutputActivation::Relu => v.max(0.0),
            OutputActivation::None => v,
        }
    }
}

/// Whose `state_dict` names a `conv-bn` model's tensors carry (`--param-names`), so a
/// checkpoint loads strictly into that tutorial's own model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ParamNames {
    /// PyTorch-VAE's VanillaVAE: fc_mu, fc_var, decoder_input, final_layer.{0,1,3}
    #[default]
    VanillaVae,
    /// The CelebA tutorial (SingleZombie/DL-Demos): mean_linear, var_linear,
    /// decoder_projection, decoder.{L-1}.{0,1,3}
    Dldemos,
}

impl ModelConfig {
    /// The tutorials' defaults for a 28×28 greyscale dataset.
    pub fn mnist(arch: Arch) -> Self {
        ModelConfig {
            arch,
            channels: 1,
            height: 28,
            width: 28,
            latent: 20,
            hidden: 400,
            hiddens: vec![32, 64, 128],
            output: OutputActivation::Sigmoid,
            names: ParamNames::VanillaVae,
        }
    }
    /// Values per image, `channels·height·width` (784 for MNIST).
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }
}

/// Checks what [`Vae::new`] would otherwise assert, so a bad flag or checkpoint is an error
/// message rather than a panic.
pub fn validate(c: &ModelConfig) -> anyhow::Result<()> {
    use anyhow::ensure;
    ensure!(
        c.channels > 0 && c.height > 0 && c.width > 0,
        "image shape {}×{}×{} is empty",
        c.channels,
        c.height,
        c.width
    );
    ensure!(c.latent > 0, "the latent size must be at least 1");
    // Bounds that no real model comes near, so that the sizes below cannot overflow and a
    // damaged run.json cannot ask for an absurd model.
    ensure!(
        c.channels.max(c.height).max(c.width) <= MAX_SIDE,
        "image shape {}×{}×{} is larger than {MAX_SIDE} in some dimension",
        c.channels,
        c.height,
        c.width
    );
    ensure!(
        c.latent.max(c.hidden).max(c.hiddens.iter().copied().max().unwrap_or(0)) <= MAX_WIDTH,
        "layer widths (--latent, --hidden, --hiddens) must be at most {MAX_WIDTH}"
    );
    ensure!(c.hiddens.len() <= 16, "--hiddens lists {} blocks; at most 16 fit any image", c.hiddens.len());
    match c.arch {
        Arch::Mlp => ensure!(c.hidden > 0, "--hidden must be at least 1"),
        Arch::Conv => {
            let (h2, w2) = (down(c.height), down(c.width));
            ensure!(
                output_padding(down(h2), h2) == output_padding(down(w2), w2)
                    && output_padding(h2, c.height) == output_padding(w2, c.width),
                "conv needs height and width of the same parity at every stage (got {}×{})",
                c.height,
                c.width
            );
        }
        Arch::ConvBn => {
            ensure!(!c.hiddens.is_empty(), "conv-bn needs at least one width in --hiddens");
            ensure!(c.hiddens.iter().all(|&h| h > 0), "--hiddens widths must be at least 1");
            ensure!(c.height == c.width, "conv-bn expects square images, got {}×{}", c.height, c.width);
        }
        Arch::ConvBnMnist => ensure!(
            c.height == 28 && c.width == 28,
            "conv-bn-mnist is the MNIST tutorial's network, sized for 28×28 images (got {}×{})",
            c.height,
            c.width
        ),
    }
    ensure!(
        c.names == ParamNames::VanillaVae || c.arch == Arch::ConvBn,
        "--param-names {} names conv-bn's layers; {} has names of its own",
        if c.names == ParamNames::Dldemos { "dldemos" } else { "vanilla-vae" },
        c.arch.name()
    );
    // Last: the count assumes the checks above passed.
    let params = parameter_count(c);
    ensure!(
        params <= MAX_PARAMETERS,
        "the model would have {params} parameters, more than the {MAX_PARAMETERS} this trainer allows"
    );
    Ok(())
}

/// The largest image side or channel count [`validate`] accepts.
pub const MAX_SIDE: usize = 1 << 16;
/// The largest parameter count [`validate`] accepts (4G parameters: 16 GiB in f32 before the
/// optimizer's moments); beyond it a setting is a typo, and refusing it early keeps a damaged
/// run.json or checkpoint header from asking for terabytes.
pub const MAX_PARAMETERS: u64 = 1 << 32;
/// The largest layer width (latent, hidden, conv channels) [`validate`] accepts.
pub const MAX_WIDTH: usize = 1 << 24;

/// The number of trainable parameters `config` builds (as [`ParamStore::trainable_count`]
/// will count them), computed from the sizes alone, so a model can be refused before any of
/// it is allocated. Saturates rather than overflows. Expects a config [`validate`] accepted.
pub fn parameter_count(config: &ModelConfig) -> u64 {
    let u = |v: usize| v as u64;
    let linear = |i: usize, o: usize| u(i).saturating_mul(u(o)).saturating_add(u(o));
    // Conv2d [o, i, 3, 3] and ConvTranspose2d [i, o, 3, 3], with a bias of o.
    let conv = |i: usize, o: usize| u(i).saturating_mul(u(o)).saturating_mul(9).saturating_add(u(o));
    let batch_norm = |c: usize| 2 * u(c);
    let (c, z) = (config.channels, config.latent);
    let parts: Vec<u64> = match config.arch {
        Arch::Mlp => {
            let (d, h) = (config.image_len(), config.hidden);
            vec![linear(d, h), linear(h, z), linear(h, z), linear(z, h), linear(h, d)]
        }
        Arch::Conv => {
            let flat = 128 * down(down(config.height)) * down(down(config.width));
            vec![
                conv(c, 32),
                conv(32, 64),
                conv(64, 128),
                linear(flat, 256),
                linear(256, z),
                linear(256, z),
                linear(z, 256),
                linear(256, flat),
                conv(128, 64),
                conv(64, 32),
                conv(32, c),
            ]
        }
        Arch::ConvBn => {
            let hs = &config.hiddens;
            let side = hs.iter().fold(config.height, |s, _| down(s));
            let flat = hs[hs.len() - 1].saturating_mul(side * side);
            let mut parts = vec![linear(flat, z), linear(flat, z), linear(z, flat)];
            let mut c_in = c;
            for &h in hs {
                parts.extend([conv(c_in, h), batch_norm(h)]);
                c_in = h;
            }
            for w in hs.windows(2) {
                parts.extend([conv(w[1], w[0]), batch_norm(w[0])]);
            }
            parts.extend([conv(hs[0], hs[0]), batch_norm(hs[0]), conv(hs[0], c)]);
            parts
        }
        Arch::ConvBnMnist => vec![
            conv(c, 8),
            conv(8, 16),
            batch_norm(16),
            conv(16, 32),
            linear(MNIST_TUTORIAL_FLAT, 128),
            linear(128, z),
            linear(128, z),
            linear(z, 128),
            linear(128, MNIST_TUTORIAL_FLAT),
            conv(32, 16),
            batch_norm(16),
            conv(16, 8),
            batch_norm(8),
            conv(8, c),
        ],
    };
    parts.into_iter().fold(0u64, u64::saturating_add)
}

/// The MNIST tutorial's feature map between encoder and decoder: 32 channels of 3×3
/// (28 → 14 → 7 → 3 through its three stride-2 convolutions, the last unpadded).
const MNIST_TUTORIAL_FEATURE: [usize; 3] = [32, 3, 3];
const MNIST_TUTORIAL_FLAT: usize = 32 * 3 * 3;

/// Output size of a 3×3, stride-2, pad-1 convolution.
fn down(s: usize) -> usize {
    (s + 2 - 3) / 2 + 1
}
/// The output_padding that makes a 3×3, stride-2, pad-1 transposed conv map `from` to `to`.
fn output_padding(from: usize, to: usize) -> usize {
    let base = (from - 1) * 2 + 3 - 2;
    assert!(to >= base && to - base < 2, "cannot mirror {from} → {to} with a stride-2 transposed conv");
    to - base
}

#[derive(Clone, Debug)]
enum Net {
    Mlp {
        fc1: Linear,
        fc21: Linear,
        fc22: Linear,
        fc3: Linear,
        fc4: Linear,
    },
    Conv {
        convs: Vec<Conv2d>,
        fc1: Linear,
        fc21: Linear,
        fc22: Linear,
        dec_fc1: Linear,
        dec_fc2: Linear,
        deconvs: Vec<ConvTranspose2d>,
        feature: [usize; 3],
    },
    ConvBn {
        enc: Vec<(Conv2d, BatchNorm)>,
        fc_mu: Linear,
        fc_var: Linear,
        decoder_input: Linear,
        dec: Vec<(ConvTranspose2d, BatchNorm)>,
        final_deconv: ConvTranspose2d,
        final_bn: BatchNorm,
        final_conv: Conv2d,
        feature: [usize; 3],
    },
    /// Boxed: its fourteen layers would make every `Net` as large.
    ConvBnMnist(Box<MnistTutorialNet>),
}

/// The conv + batch-norm MNIST tutorial's layers, named after its modules.
#[derive(Clone, Debug)]
struct MnistTutorialNet {
    conv1: Conv2d,
    conv2: Conv2d,
    batch2: BatchNorm,
    conv3: Conv2d,
    linear1: Linear,
    linear2: Linear,
    /// The log σ head.
    linear3: Linear,
    lin0: Linear,
    lin2: Linear,
    deconv0: ConvTranspose2d,
    bn1: BatchNorm,
    deconv3: ConvTranspose2d,
    bn4: BatchNorm,
    deconv6: ConvTranspose2d,
}

/// A VAE: parameter ids into a [`ParamStore`] plus its configuration.
#[derive(Clone, Debug)]
pub struct Vae {
    /// The architecture and sizes it was built from.
    pub config: ModelConfig,
    net: Net,
}

/// The three scalars of one objective evaluation.
#[derive(Clone, Copy, Debug)]
pub struct VaeLoss {
    /// The objective, `a(n)·recon + β·c(n)·KL` as [`LossConfig`] reduces each term: what
    /// training minimizes.
    pub loss: Var,
    /// The reconstruction term `−log p(x|z)` (`[1]`), summed over pixels and the batch.
    pub recon: Var,
    /// The KL term (`[1]`), summed over latents and the batch, before any weighting.
    pub kl: Var,
}

impl Vae {
    /// Builds the model's parameters into `store`, initialized from `seed` as PyTorch would.
    pub fn new<B: Backend>(config: ModelConfig, store: &mut ParamStore<B>, backend: &B, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let r = &mut rng;
        let (c, z) = (config.channels, config.latent);
        let net = match config.arch {
            Arch::Mlp => {
                let (d, h) = (config.image_len(), config.hidden);
                Net::Mlp {
                    fc1: Linear::new(store, backend, "fc1", d, h, r),
                    fc21: Linear::new(store, backend, "fc21", h, z, r),
                    fc22: Linear::new(store, backend, "fc22", h, z, r),
                    fc3: Linear::new(store, backend, "fc3", z, h, r),
                    fc4: Linear::new(store, backend, "fc4", h, d, r),
                }
            }
            Arch::Conv => {
                let (h1, w1) = (config.height, config.width);
                let (h2, w2) = (down(h1), down(w1));
                let (h3, w3) = (down(h2), down(w2));
                let flat = 128 * h3 * w3;
                let convs = vec![
                    Conv2d::new(store, backend, "encoder.conv1", c, 32, 3, 1, 1, r),
                    Conv2d::new(store, backend, "encoder.conv2", 32, 64, 3, 2, 1, r),
                    Conv2d::new(store, backend, "encoder.conv3", 64, 128, 3, 2, 1, r),
                ];
                let fc1 = Linear::new(store, backend, "encoder.fc1", flat, 256, r);
                let fc21 = Linear::new(store, backend, "encoder.fc21", 256, z, r);
                let fc22 = Linear::new(store, backend, "encoder.fc22", 256, z, r);
                let dec_fc1 = Linear::new(store, backend, "decoder.fc1", z, 256, r);
                let dec_fc2 = Linear::new(store, backend, "decoder.fc2", 256, flat, r);
                assert_eq!(output_padding(h3, h2), output_padding(w3, w2), "non-square padding is not supported");
                assert_eq!(output_padding(h2, h1), output_padding(w2, w1), "non-square padding is not supported");
                let deconvs = vec![
                    ConvTranspose2d::new(store, backend, "decoder.conv1", 128, 64, 3, 2, 1, output_padding(h3, h2), r),
                    ConvTranspose2d::new(store, backend, "decoder.conv2", 64, 32, 3, 2, 1, output_padding(h2, h1), r),
                    ConvTranspose2d::new(store, backend, "decoder.conv3", 32, c, 3, 1, 1, 0, r),
                ];
                Net::Conv { convs, fc1, fc21, fc22, dec_fc1, dec_fc2, deconvs, feature: [128, h3, w3] }
            }
            Arch::ConvBn => {
                assert!(!config.hiddens.is_empty(), "conv-bn needs at least one hidden width");
                assert_eq!(config.height, config.width, "conv-bn expects square images");
                let mut sizes = vec![config.height];
                let mut enc = vec![];
                let mut c_in = c;
                for (i, &hdim) in config.hiddens.iter().enumerate() {
                    let conv = Conv2d::new(store, backend, &format!("encoder.{i}.0"), c_in, hdim, 3, 2, 1, r);
                    let bn = BatchNorm::new(store, backend, &format!("encoder.{i}.1"), hdim);
                    enc.push((conv, bn));
                    sizes.push(down(*sizes.last().unwrap()));
                    c_in = hdim;
                }
                let s = *sizes.last().unwrap();
                let last = *config.hiddens.last().unwrap();
                let flat = last * s * s;
                let dldemos = config.names == ParamNames::Dldemos;
                let (mu_name, var_name, input_name) = if dldemos {
                    ("mean_linear", "var_linear", "decoder_projection")
                } else {
                    ("fc_mu", "fc_var", "decoder_input")
                };
                let fc_mu = Linear::new(store, backend, mu_name, flat, z, r);
                let fc_var = Linear::new(store, backend, var_name, flat, z, r);
                let decoder_input = Linear::new(store, backend, input_name, z, flat, r);
                let mut dec = vec![];
                let rev: Vec<usize> = config.hiddens.iter().rev().copied().collect();
                let k = sizes.len() - 1;
                for i in 0..rev.len() - 1 {
                    let op = output_padding(sizes[k - i], sizes[k - i - 1]);
                    let ct = ConvTranspose2d::new(
                        store,
                        backend,
                        &format!("decoder.{i}.0"),
                        rev[i],
                        rev[i + 1],
                        3,
                        2,
                        1,
                        op,
                        r,
                    );
                    let bn = BatchNorm::new(store, backend, &format!("decoder.{i}.1"), rev[i + 1]);
                    dec.push((ct, bn));
                }
                let h0 = rev[rev.len() - 1];
                let op = output_padding(sizes[1], sizes[0]);
                let last_block =
                    if dldemos { format!("decoder.{}", config.hiddens.len() - 1) } else { "final_layer".to_string() };
                let final_deconv =
                    ConvTranspose2d::new(store, backend, &format!("{last_block}.0"), h0, h0, 3, 2, 1, op, r);
                let final_bn = BatchNorm::new(store, backend, &format!("{last_block}.1"), h0);
                let final_conv = Conv2d::new(store, backend, &format!("{last_block}.3"), h0, c, 3, 1, 1, r);
                Net::ConvBn {
                    enc,
                    fc_mu,
                    fc_var,
                    decoder_input,
                    dec,
                    final_deconv,
                    final_bn,
                    final_conv,
                    feature: [last, s, s],
                }
            }
            Arch::ConvBnMnist => {
                // The notebook's modules, in its order: encoder then decoder.
                let conv1 = Conv2d::new(store, backend, "encoder.conv1", c, 8, 3, 2, 1, r);
                let conv2 = Conv2d::new(store, backend, "encoder.conv2", 8, 16, 3, 2, 1, r);
                let batch2 = BatchNorm::new(store, backend, "encoder.batch2", 16);
                let conv3 = Conv2d::new(store, backend, "encoder.conv3", 16, 32, 3, 2, 0, r);
                let linear1 = Linear::new(store, backend, "encoder.linear1", MNIST_TUTORIAL_FLAT, 128, r);
                let linear2 = Linear::new(store, backend, "encoder.linear2", 128, z, r);
                let linear3 = Linear::new(store, backend, "encoder.linear3", 128, z, r);
                let lin0 = Linear::new(store, backend, "decoder.decoder_lin.0", z, 128, r);
                let lin2 = Linear::new(store, backend, "decoder.decoder_lin.2", 128, MNIST_TUTORIAL_FLAT, r);
                // 3 → 7 (no padding), 7 → 14 → 28 (padding 1, output_padding 1).
                let deconv0 = ConvTranspose2d::new(store, backend, "decoder.decoder_conv.0", 32, 16, 3, 2, 0, 0, r);
                let bn1 = BatchNorm::new(store, backend, "decoder.decoder_conv.1", 16);
                let deconv3 = ConvTranspose2d::new(store, backend, "decoder.decoder_conv.3", 16, 8, 3, 2, 1, 1, r);
                let bn4 = BatchNorm::new(store, backend, "decoder.decoder_conv.4", 8);
                let deconv6 = ConvTranspose2d::new(store, backend, "decoder.decoder_conv.6", 8, c, 3, 2, 1, 1, r);
                Net::ConvBnMnist(Box::new(MnistTutorialNet {
                    conv1,
                    conv2,
                    batch2,
                    conv3,
                    linear1,
                    linear2,
                    linear3,
                    lin0,
                    lin2,
                    deconv0,
                    bn1,
                    deconv3,
                    bn4,
                    deconv6,
                }))
            }
        };
        Vae { config, net }
    }

    /// x [n, c, h, w] → (μ, log σ²), each [n, z].
    pub fn encode<B: Backend>(&self, tape: &mut Tape<B>, x: Var) -> (Var, Var) {
        match &self.net {
            Net::Mlp { fc1, fc21, fc22, .. } => {
                let x = ops::flatten(tape, x);
                let h = fc1.forward(tape, x);
                let h = ops::relu(tape, h);
                (fc21.forward(tape, h), fc22.forward(tape, h))
            }
            Net::Conv { convs, fc1, fc21, fc22, .. } => {
                let mut h = x;
                for conv in convs {
                    h = conv.forward(tape, h);
                    h = ops::relu(tape, h);
                }
                let h = ops::flatten(tape, h);
                let h = fc1.forward(tape, h);
                let h = ops::relu(tape, h);
                (fc21.forward(tape, h), fc22.forward(tape, h))
            }
            Net::ConvBn { enc, fc_mu, fc_var, .. } => {
                let mut h = x;
                for (conv, bn) in enc {
                    h = conv.forward(tape, h);
                    h = bn.forward_act(tape, h, Some(Unary::Relu));
                }
                let h = ops::flatten(tape, h);
                (fc_mu.forward(tape, h), fc_var.forward(tape, h))
            }
            Net::ConvBnMnist(m) => {
                let MnistTutorialNet { conv1, conv2, batch2, conv3, linear1, linear2, linear3, .. } = &**m;
                let h = conv1.forward(tape, x);
                let h = ops::relu(tape, h);
                let h = conv2.forward(tape, h);
                let h = batch2.forward_act(tape, h, Some(Unary::Relu));
                let h = conv3.forward(tape, h);
                let h = ops::relu(tape, h);
                let h = ops::flatten(tape, h);
                let h = linear1.forward(tape, h);
                let h = ops::relu(tape, h);
                let log_sigma = linear3.forward(tape, h);
                (linear2.forward(tape, h), ops::scale(tape, log_sigma, 2.0))
            }
        }
    }

    /// z [n, z] → logits [n, c, h, w].
    pub fn decode_logits<B: Backend>(&self, tape: &mut Tape<B>, z: Var) -> Var {
        let n = tape.shape(z)[0];
        let cfg = &self.config;
        match &self.net {
            Net::Mlp { fc3, fc4, .. } => {
                let h = fc3.forward(tape, z);
                let h = ops::relu(tape, h);
                let y = fc4.forward(tape, h);
                ops::reshape(tape, y, &[n, cfg.channels, cfg.height, cfg.width])
            }
            Net::Conv { dec_fc1, dec_fc2, deconvs, feature, .. } => {
                let h = dec_fc1.forward(tape, z);
                let h = ops::relu(tape, h);
                let h = dec_fc2.forward(tape, h);
                let h = ops::relu(tape, h);
                let mut h = ops::reshape(tape, h, &[n, feature[0], feature[1], feature[2]]);
                for (i, d) in deconvs.iter().enumerate() {
                    h = d.forward(tape, h);
                    if i + 1 < deconvs.len() {
                        h = ops::relu(tape, h);
                    }
                }
                h
            }
            Net::ConvBn { decoder_input, dec, final_deconv, final_bn, final_conv, feature, .. } => {
                let h = decoder_input.forward(tape, z);
                let mut h = ops::reshape(tape, h, &[n, feature[0], feature[1], feature[2]]);
                for (ct, bn) in dec {
                    h = ct.forward(tape, h);
                    h = bn.forward_act(tape, h, Some(Unary::Relu));
                }
                let h = final_deconv.forward(tape, h);
                let h = final_bn.forward_act(tape, h, Some(Unary::Relu));
                final_conv.forward(tape, h)
            }
            Net::ConvBnMnist(m) => {
                let MnistTutorialNet { lin0, lin2, deconv0, bn1, deconv3, bn4, deconv6, .. } = &**m;
                let h = lin0.forward(tape, z);
                let h = ops::relu(tape, h);
                let h = lin2.forward(tape, h);
                let h = ops::relu(tape, h);
                let [c, hh, ww] = MNIST_TUTORIAL_FEATURE;
                let h = ops::reshape(tape, h, &[n, c, hh, ww]);
                let h = deconv0.forward(tape, h);
                let h = bn1.forward_act(tape, h, Some(Unary::Relu));
                let h = deconv3.forward(tape, h);
                let h = bn4.forward_act(tape, h, Some(Unary::Relu));
                deconv6.forward(tape, h)
            }
        }
    }

    /// z → pixels: the decoder's last layer through the model's output activation (a
    /// sigmoid's (0, 1) unless the configuration says otherwise).
    pub fn decode<B: Backend>(&self, tape: &mut Tape<B>, z: Var) -> Var {
        let logits = self.decode_logits(tape, z);
        self.activate(tape, logits)
    }

    fn activate<B: Backend>(&self, tape: &mut Tape<B>, logits: Var) -> Var {
        match self.config.output {
            OutputActivation::Sigmoid => ops::sigmoid(tape, logits),
            OutputActivation::Relu => ops::relu(tape, logits),
            OutputActivation::None => logits,
        }
    }

    /// The objective of a batch x with noise eps [n, z]: `a(n)·R + β·c(n)·K` as
    /// [`LossConfig`] reduces each term (sums, as the tutorials, by default; then it is the
    /// batch's negative ELBO at β = 1).
    pub fn loss<B: Backend>(
        &self,
        tape: &mut Tape<B>,
        x: Var,
        eps: Var,
        objective: &LossConfig,
        kl_weight: f64,
    ) -> VaeLoss {
        let shape = tape.shape(x).to_vec();
        let (n, image_len) = (shape[0], shape[1..].iter().product::<usize>());
        let (mu, logvar) = self.encode(tape, x);
        let (z, kl) = ops::reparam_kl(tape, mu, logvar, eps);
        let logits = self.decode_logits(tape, z);
        let rec = match objective.recon {
            // The stable form straight from the logits (sigmoid models only; validated).
            Recon::BceWithLogits => ops::bce_with_logits(tape, logits, x, Reduction::Sum),
            kind => {
                let p = self.activate(tape, logits);
                ops::recon_loss(tape, kind, p, x, Reduction::Sum)
            }
        };
        // Scales of exactly 1 are left off the tape, so the default objective records the
        // same ops (and gives the same bits) as before reductions were configurable.
        let scaled = |tape: &mut Tape<B>, v: Var, f: f64| if f == 1.0 { v } else { ops::scale(tape, v, f) };
        let rec_term = scaled(tape, rec, objective.recon_reduction.factor(n, image_len));
        let kl_term = scaled(tape, kl, kl_weight * objective.kl_reduction.factor(n, self.config.latent));
        let loss = ops::add(tape, rec_term, kl_term);
        VaeLoss { loss, recon: rec, kl }
    }
}

/// How one term of the objective is reduced over a batch: PyTorch's `reduction=`, which
/// decides what a KL weight copied from a tutorial means (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum TermReduction {
    /// Summed over the batch's images and each image's values (reduction='sum')
    Sum,
    /// Summed over each image's values, averaged over the batch's images
    BatchMean,
    /// Averaged over every value of the batch (reduction='mean', F.mse_loss's default)
    Mean,
}

impl TermReduction {
    /// What a term summed over a batch of `n` images, `per_image` values each (pixels for
    /// the reconstruction, latents for the KL), is multiplied by.
    pub fn factor(self, n: usize, per_image: usize) -> f64 {
        match self {
            TermReduction::Sum => 1.0,
            TermReduction::BatchMean => 1.0 / n as f64,
            TermReduction::Mean => 1.0 / (n * per_image) as f64,
        }
    }
    /// How it reads in the objective's description.
    pub fn describe(self) -> &'static str {
        match self {
            TermReduction::Sum => "summed",
            TermReduction::BatchMean => "mean over images",
            TermReduction::Mean => "mean over values",
        }
    }
    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            TermReduction::Sum => "sum",
            TermReduction::BatchMean => "batch-mean",
            TermReduction::Mean => "mean",
        }
    }
}

/// Which objective a training step minimizes (the β of β-VAE is per step:
/// [`crate::train::Trainer::step`]'s `kl_weight`).
#[derive(Clone, Debug)]
pub struct LossConfig {
    /// The reconstruction loss: BCE for a Bernoulli decoder (MNIST), MSE for colour images.
    pub recon: Recon,
    /// How the reconstruction term is reduced over a batch.
    pub recon_reduction: TermReduction,
    /// How the KL term is reduced over a batch.
    pub kl_reduction: TermReduction,
}

impl Default for LossConfig {
    /// The tutorials' objective: BCE summed over pixels and images, plus the summed KL.
    fn default() -> Self {
        LossConfig { recon: Recon::Bce, recon_reduction: TermReduction::Sum, kl_reduction: TermReduction::Sum }
    }
}

impl LossConfig {
    /// The weight of a batch of `n` images' objective in the epoch's objective per image
    /// ([`crate::train::EpochSums`]): a summed reconstruction makes the batch's objective
    /// n times an image's, so it counts once; a mean one is already per image (or per value)
    /// and counts n times. At β = 1 with sums this makes the epoch's objective exactly the
    /// mean −ELBO per image.
    pub fn images_weight(&self, n: usize) -> f64 {
        match self.recon_reduction {
            TermReduction::Sum => 1.0,
            TermReduction::BatchMean | TermReduction::Mean => n as f64,
        }
    }
    /// The objective in words, e.g. `mse (mean over values) + 0.00025 × KL (mean over images)`.
    pub fn describe(&self, kl_weight: f64) -> String {
        let recon = match self.recon {
            Recon::Bce | Recon::BceWithLogits => "bce",
            Recon::Mse => "mse",
        };
        format!("{recon} ({}) + {kl_weight} × KL ({})", self.recon_reduction.describe(), self.kl_reduction.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu;

    #[test]
    fn parameter_names_and_counts_match_pytorch() {
        let be = Cpu::<f32>::default();
        let mut store = ParamStore::default();
        Vae::new(ModelConfig::mnist(Arch::Mlp), &mut store, &be, 0);
        assert_eq!(
            store.names,
            [
                "fc1.weight",
                "fc1.bias",
                "fc21.weight",
                "fc21.bias",
                "fc22.weight",
                "fc22.bias",
                "fc3.weight",
                "fc3.bias",
                "fc4.weight",
                "fc4.bias"
            ]
        );
        // sum(p.numel() for p in VAE().parameters()) in pytorch/examples
        assert_eq!(store.trainable_count(), 652_824);

        let mut store = ParamStore::default();
        Vae::new(ModelConfig::mnist(Arch::Conv), &mut store, &be, 0);
        assert!(store.find("encoder.fc1.weight").is_some() && store.find("decoder.conv3.bias").is_some());
        // The seed conv VAE, layer by layer: convs 320 + 18,496 + 73,856; fc1 1,605,888;
        // heads 2·5,140; decoder fc 5,376 + 1,611,904; transposed convs 73,792 + 18,464 + 289.
        assert_eq!(store.trainable_count(), 3_418_665);

        let mut store = ParamStore::default();
        Vae::new(ModelConfig::mnist(Arch::ConvBn), &mut store, &be, 0);
        for name in ["encoder.2.1.running_var", "fc_var.bias", "decoder.1.0.weight", "final_layer.3.weight"] {
            assert!(store.find(name).is_some(), "{name} missing");
        }
        assert!(store.counters.contains_key("final_layer.1.num_batches_tracked"));
    }

    #[test]
    fn conv_bn_handles_64x64_rgb() {
        let be = Cpu::<f32>::default();
        let mut store = ParamStore::default();
        let cfg = ModelConfig { channels: 3, height: 64, width: 64, latent: 8, ..ModelConfig::mnist(Arch::ConvBn) };
        validate(&cfg).unwrap();
        let vae = Vae::new(cfg, &mut store, &be, 0);
        // PyTorch-VAE's layout at 64×64: 64 → 32 → 16 → 8, so fc_mu reads 128·8·8 features.
        assert_eq!(store.values[store.find("fc_mu.weight").unwrap()].shape, [8, 128 * 8 * 8]);
        let mut tape = Tape::new(&be, &mut store, true);
        let x = tape.input(crate::tensor::Tensor::zeros(&be, &[2, 3, 64, 64]));
        let (mu, _) = vae.encode(&mut tape, x);
        let y = vae.decode_logits(&mut tape, mu);
        assert_eq!(tape.shape(y), [2, 3, 64, 64]);
    }

    #[test]
    fn parameter_count_is_what_new_builds() {
        let be = crate::Cpu::<f32>::default();
        let mut configs = vec![ModelConfig::mnist(Arch::Mlp), ModelConfig::mnist(Arch::Conv)];
        let mut bn = ModelConfig::mnist(Arch::ConvBn);
        bn.hiddens = vec![3, 5, 7];
        configs.push(bn.clone());
        bn.hiddens = vec![4];
        (bn.channels, bn.height, bn.width, bn.latent) = (3, 17, 17, 6);
        configs.push(bn);
        let mut conv = ModelConfig::mnist(Arch::Conv);
        (conv.channels, conv.height, conv.width, conv.latent) = (3, 33, 21, 7);
        configs.push(conv);
        for c in configs {
            validate(&c).unwrap();
            let mut store = crate::tape::ParamStore::default();
            Vae::new(c.clone(), &mut store, &be, 0);
            assert_eq!(parameter_count(&c), store.trainable_count() as u64, "{c:?}");
        }
    }

    #[test]
    fn validate_rejects_what_new_would_assert() {
        let mut c = ModelConfig::mnist(Arch::ConvBn);
        c.width = 30;
        assert!(validate(&c).is_err());
        c = ModelConfig::mnist(Arch::Conv);
        c.width = 27;
        assert!(validate(&c).is_err());
        c.latent = 0;
        assert!(validate(&c).is_err());
    }
}
