//! `vae train`: the settings, the epoch loop, progress and early stopping. The files of a run
//! (run.json, metrics.csv, checkpoints) and resuming from them are `run_dir.rs`'s.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};
use vaecuda::backend::Backend;
use vaecuda::data::{DeviceData, Source};
use vaecuda::eval::elbo;
use vaecuda::nn::ModelConfig;
use vaecuda::optim::AdamConfig;
use vaecuda::rng::Rng;
use vaecuda::train::{LossConfig, Trainer};

use super::run_dir::{Progress, RunDir};
use super::{DataArgs, ModelArgs, ReconArg};

/// Train a VAE; writes metrics.csv and checkpoints into the run directory every epoch.
///
/// Losses are per image, in nats: reconstruction (summed over pixels) + KL (summed over
/// latents), averaged over the images of the epoch; "test" is the same on the test set with
/// a fixed noise seed. Examples:
///
///   vae train                                  # MLP on the bundled MNIST, 10 epochs
///   vae train --arch conv --epochs 20 --out runs/conv
///   vae train --data ~/fashion-mnist --latent 2 --out runs/fashion-2d
///   vae train --out runs/conv --resume --epochs 30   # continue exactly where it stopped
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Args {
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    model: ModelArgs,
    /// Reconstruction loss.
    #[arg(long, value_enum, default_value_t = ReconArg::Bce)]
    recon: ReconArg,
    /// How a batch's loss is reduced before the gradient: sum over images (the PyTorch
    /// example) or mean over images (scales the gradient by 1/batch). Reported numbers are
    /// per image either way.
    #[arg(long, value_enum, default_value_t = Reduction::Sum)]
    reduction: Reduction,
    /// Weight β of the KL term (β-VAE).
    #[arg(long, default_value_t = 1.0, value_name = "BETA")]
    kl_weight: f64,
    /// Ramp the KL weight linearly from 0 to --kl-weight over this many epochs (per step).
    #[arg(long, default_value_t = 0.0, value_name = "EPOCHS")]
    kl_warmup: f64,
    /// Adam (L2 weight decay) or AdamW (decoupled weight decay).
    #[arg(long, value_enum, default_value_t = Optimizer::Adam)]
    optimizer: Optimizer,
    /// Learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Adam's β1,β2.
    #[arg(long, default_value = "0.9,0.999", value_delimiter = ',', num_args = 1, value_name = "B1,B2")]
    betas: Vec<f64>,
    /// Adam's ε.
    #[arg(long, default_value_t = 1e-8)]
    eps: f64,
    /// Weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Images per batch (the last batch of an epoch may be smaller).
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Train until this many epochs are done in total [default: 10; with --resume: the
    /// run's].
    #[arg(long)]
    epochs: Option<usize>,
    /// Seed of the weights, batch order and noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the test loss has not improved for N epochs.
    #[arg(long, value_name = "N")]
    patience: Option<usize>,
    /// Run directory [default: runs/ARCH-yyyymmdd-hhmmss, in UTC].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Continue the run in --out from its last checkpoint, with its saved settings (only
    /// --epochs, --patience and --device may change); the result equals an uninterrupted run.
    #[arg(long, requires = "out")]
    resume: bool,
    /// Start a new run in --out even if it already holds one (its checkpoints are replaced).
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Reduction {
    Sum,
    Mean,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Optimizer {
    Adam,
    Adamw,
}

/// Everything that defines a run; saved as run.json so --resume repeats it.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Settings {
    source: Source,
    limit_train: Option<usize>,
    limit_test: Option<usize>,
    model: ModelConfig,
    recon: ReconArg,
    reduction: Reduction,
    kl_weight: f64,
    kl_warmup: f64,
    optimizer: Optimizer,
    lr: f64,
    betas: [f64; 2],
    eps: f64,
    weight_decay: f64,
    batch_size: usize,
    epochs: usize,
    seed: u64,
    patience: Option<usize>,
}

pub fn run<B: Backend>(be: B, a: Args) -> Result<()> {
    let (dir, settings, resumed) = if a.resume {
        let dir = a.out.clone().unwrap();
        let mut s: Settings = RunDir::read_settings(&dir)?;
        if let Some(e) = a.epochs {
            s.epochs = e;
        }
        if a.patience.is_some() {
            s.patience = a.patience;
        }
        (dir, s, true)
    } else {
        ensure!(a.batch_size > 0, "--batch-size must be at least 1");
        ensure!(a.betas.len() == 2, "--betas takes two numbers, like 0.9,0.999");
        ensure!(a.lr > 0.0 && a.lr.is_finite(), "--lr must be a positive number");
        let source = a.data.source()?;
        let model = a.model.config(source.image_shape()?);
        vaecuda::nn::vae::validate(&model)?;
        let dir = a.out.clone().unwrap_or_else(|| PathBuf::from(format!("runs/{}-{}", model.arch.name(), utc_stamp())));
        RunDir::ensure_free(&dir, a.overwrite)?;
        let s = Settings {
            source,
            limit_train: a.data.limit_train,
            limit_test: a.data.limit_test,
            model,
            recon: a.recon,
            reduction: a.reduction,
            kl_weight: a.kl_weight,
            kl_warmup: a.kl_warmup,
            optimizer: a.optimizer,
            lr: a.lr,
            betas: [a.betas[0], a.betas[1]],
            eps: a.eps,
            weight_decay: a.weight_decay,
            batch_size: a.batch_size,
            epochs: a.epochs.unwrap_or(10),
            seed: a.seed,
            patience: a.patience,
        };
        (dir, s, false)
    };
    train(be, RunDir::create(&dir)?, settings, resumed)
}

impl Settings {
    fn loss(&self) -> LossConfig {
        LossConfig { recon: self.recon.recon(), per_image_mean: self.reduction == Reduction::Mean }
    }
    fn adam(&self) -> AdamConfig {
        AdamConfig {
            lr: self.lr,
            beta1: self.betas[0],
            beta2: self.betas[1],
            eps: self.eps,
            weight_decay: self.weight_decay,
            decoupled: self.optimizer == Optimizer::Adamw,
        }
    }
    /// Why a resumed run has nothing left to do, if it has not.
    fn already_done(&self, p: &Progress) -> Option<String> {
        if p.epoch >= self.epochs {
            return Some(format!("this run already has {} epochs; pass a larger --epochs to continue it", p.epoch));
        }
        match self.patience {
            Some(pat) if p.bad_epochs >= pat && p.epoch > 0 => {
                Some(format!("early stopping had already ended this run (no improvement for {pat} epochs)"))
            }
            _ => None,
        }
    }
}

fn train<B: Backend>(be: B, mut run: RunDir, s: Settings, resumed: bool) -> Result<()> {
    let (train_dev, test_dev) = upload_data(&be, &s)?;
    let mut t = Trainer::new(be.clone(), s.model.clone(), s.loss(), s.adam(), s.seed);
    let mut data_rng = Rng::new(s.seed ^ 0xDA7A_5EED);
    let mut p = Progress::start();
    if resumed {
        p = run.resume(&be, &mut t)?;
        (t.noise, data_rng) = p.rngs()?;
        println!("resuming {} after epoch {} (step {})", run.path.display(), p.epoch, t.adam.step);
    } else {
        run.write_settings(&s)?;
    }
    // Only a resumed run can be over before it starts (a fresh one has done no epoch yet).
    if let Some(why) = s.already_done(&p).filter(|_| resumed) {
        println!("{why}");
        return Ok(());
    }
    println!(
        "training {} ({} parameters) on {} images, testing on {}; run directory {}",
        s.model.arch.name(),
        t.store.trainable_count(),
        train_dev.len,
        test_dev.len,
        run.path.display()
    );
    for epoch in p.epoch + 1..=s.epochs {
        let e = train_epoch(&mut t, &train_dev, &mut data_rng, &s, epoch, &run)?;
        let test =
            elbo(&be, &t.model, &mut t.store, &test_dev, s.recon.recon(), s.batch_size, vaecuda::eval::EVAL_SEED);
        println!("{}", e.report(epoch, s.epochs, test.loss));
        run.push_metrics(e.csv_row(epoch, test.loss))?;
        let improved = p.finish_epoch(epoch, test.loss, &t.noise, &data_rng);
        run.save(&t, &s.model, s.recon.name(), &p, improved)?;
        if let Some(pat) = s.patience.filter(|&pat| p.bad_epochs >= pat) {
            println!("early stop: the test loss has not improved for {pat} epochs");
            break;
        }
    }
    println!("best test loss {:.4}; checkpoints in {}", p.best_test(), run.path.display());
    Ok(())
}

/// One epoch's training numbers, per image.
struct EpochLosses {
    recon: f64,
    kl: f64,
    images: usize,
    seconds: f64,
}

impl EpochLosses {
    fn images_per_s(&self) -> f64 {
        self.images as f64 / self.seconds.max(1e-9)
    }
    /// The line printed after the epoch.
    fn report(&self, epoch: usize, epochs: usize, test_loss: f64) -> String {
        let (recon, kl, seconds, ips) = (self.recon, self.kl, self.seconds, self.images_per_s());
        format!(
            "epoch {epoch:>3}/{epochs}  train {:.4} (recon {recon:.4}, KL {kl:.4})  test {test_loss:.4}  {seconds:.1} s  {ips:.0} img/s",
            recon + kl
        )
    }
    /// The epoch's metrics.csv row, in the header's column order.
    fn csv_row(&self, epoch: usize, test_loss: f64) -> String {
        let (recon, kl, seconds, ips) = (self.recon, self.kl, self.seconds, self.images_per_s());
        format!("{epoch},{:.6},{recon:.6},{kl:.6},{test_loss:.6},{seconds:.3},{ips:.1}", recon + kl)
    }
}

/// The run's train and test sets on the device, checked against the model's image shape.
fn upload_data<B: Backend>(be: &B, s: &Settings) -> Result<(DeviceData<B>, DeviceData<B>)> {
    let (train_set, test_set) = s.source.load(s.limit_train, s.limit_test)?;
    ensure!(train_set.len > 0 && test_set.len > 0, "the training and test sets must not be empty");
    ensure!(
        [train_set.channels, train_set.height, train_set.width] == [s.model.channels, s.model.height, s.model.width],
        "the data's image shape changed since the run started"
    );
    Ok((DeviceData::upload(be, &train_set), DeviceData::upload(be, &test_set)))
}

/// One pass over the training set in `data_rng`'s order, with a progress bar on a terminal.
fn train_epoch<B: Backend>(
    t: &mut Trainer<B>,
    data: &DeviceData<B>,
    data_rng: &mut Rng,
    s: &Settings,
    epoch: usize,
    run: &RunDir,
) -> Result<EpochLosses> {
    let steps_per_epoch = data.len.div_ceil(s.batch_size);
    let warmup_steps = s.kl_warmup * steps_per_epoch as f64;
    let bar = progress_bar(steps_per_epoch as u64, epoch, s.epochs);
    let start = Instant::now();
    let (mut recon_sum, mut kl_sum, mut seen) = (0.0, 0.0, 0usize);
    for (b, idx) in data.epoch_batches(s.batch_size, Some(data_rng)).into_iter().enumerate() {
        let beta = if warmup_steps > 0.0 {
            s.kl_weight * ((t.adam.step + 1) as f64 / warmup_steps).min(1.0)
        } else {
            s.kl_weight
        };
        let n = idx.len();
        let x = data.batch(&t.backend, &idx);
        let l = match t.step(x, beta) {
            Ok(l) => l,
            Err(e) => {
                bar.abandon();
                bail!("training stopped: {e} (epoch {epoch}, batch {}); {}", b + 1, run.what_is_kept());
            }
        };
        let scale = if s.reduction == Reduction::Mean { n as f64 } else { 1.0 };
        recon_sum += l.recon * scale;
        kl_sum += l.kl * scale;
        seen += n;
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!(
            "loss {:.2}  recon {:.2}  KL {:.2}  {:.0} img/s",
            (recon_sum + kl_sum) / seen as f64,
            recon_sum / seen as f64,
            kl_sum / seen as f64,
            seen as f64 / secs
        ));
        bar.inc(1);
    }
    t.backend.synchronize();
    let seconds = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    Ok(EpochLosses { recon: recon_sum / seen as f64, kl: kl_sum / seen as f64, images: seen, seconds })
}

fn progress_bar(len: u64, epoch: usize, epochs: usize) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("epoch {epoch}/{epochs}"));
    bar
}

/// The current UTC time as yyyymmdd-hhmmss (no date crate needed).
fn utc_stamp() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}{m:02}{d:02}-{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}
