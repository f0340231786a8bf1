//! `vae train`: the epoch loop, progress, metrics.csv, checkpoints, early stopping, resume.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use vaecuda::backend::Backend;
use vaecuda::checkpoint::{load_optimizer, save_model, save_optimizer, TensorFile};
use vaecuda::data::{DeviceData, Source};
use vaecuda::eval::elbo;
use vaecuda::nn::ModelConfig;
use vaecuda::optim::AdamConfig;
use vaecuda::rng::Rng;
use vaecuda::train::{LossConfig, Trainer};

use super::{write_text, DataArgs, ModelArgs, ReconArg};

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
    /// Run directory [default: runs/<arch>-<UTC yyyymmdd-hhmmss>].
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

/// Progress that --resume restores, saved with the optimizer moments.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Progress {
    epoch: usize,
    /// f64 bits, so the comparison after a resume is exact.
    best_test_bits: u64,
    bad_epochs: usize,
    noise_rng: Vec<u64>,
    data_rng: Vec<u64>,
}

const METRICS_HEADER: &str = "epoch,train_loss,recon,kl,test_loss,seconds,images_per_s";

pub fn run<B: Backend>(be: B, a: Args) -> Result<()> {
    let (dir, settings, resumed) = if a.resume {
        let dir = a.out.clone().unwrap();
        let path = dir.join("run.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot resume: {} is missing (was the run started here?)", path.display()))?;
        let mut s: Settings =
            serde_json::from_str(&text).with_context(|| format!("{} is unreadable", path.display()))?;
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
        let shape = match &source {
            Source::Folder(_, s) => [3, *s, *s],
            src => {
                let t = src.load_test(Some(1))?;
                [t.channels, t.height, t.width]
            }
        };
        let model = a.model.config(shape);
        vaecuda::nn::vae::validate(&model)?;
        let dir = a.out.clone().unwrap_or_else(|| PathBuf::from(format!("runs/{}-{}", model.arch.name(), utc_stamp())));
        // A second `train --out DIR` would replace the first run's best checkpoint after one
        // epoch: say so instead, unless asked.
        ensure!(
            a.overwrite || !dir.join("run.json").exists(),
            "{} already holds a run; continue it with --resume, or start over with --overwrite",
            dir.display()
        );
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
    train(be, &dir, settings, resumed)
}

fn train<B: Backend>(be: B, dir: &Path, s: Settings, resumed: bool) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create run directory {}", dir.display()))?;
    let (train_set, test_set) = s.source.load(s.limit_train, s.limit_test)?;
    ensure!(train_set.len > 0 && test_set.len > 0, "the training and test sets must not be empty");
    ensure!(
        [train_set.channels, train_set.height, train_set.width] == [s.model.channels, s.model.height, s.model.width],
        "the data's image shape changed since the run started"
    );
    let train_dev = DeviceData::upload(&be, &train_set);
    let test_dev = DeviceData::upload(&be, &test_set);
    let loss = LossConfig { recon: s.recon.recon(), per_image_mean: s.reduction == Reduction::Mean };
    let adam = AdamConfig {
        lr: s.lr,
        beta1: s.betas[0],
        beta2: s.betas[1],
        eps: s.eps,
        weight_decay: s.weight_decay,
        decoupled: s.optimizer == Optimizer::Adamw,
    };
    let mut t = Trainer::new(be.clone(), s.model.clone(), loss, adam, s.seed);
    let mut data_rng = Rng::new(s.seed ^ 0xDA7A_5EED);
    let (last, best, optim) =
        (dir.join("last.safetensors"), dir.join("best.safetensors"), dir.join("optim-last.safetensors"));
    let metrics_path = dir.join("metrics.csv");
    let mut rows: Vec<String> = vec![];
    let mut p = Progress {
        epoch: 0,
        best_test_bits: f64::INFINITY.to_bits(),
        bad_epochs: 0,
        noise_rng: vec![],
        data_rng: vec![],
    };
    if resumed {
        TensorFile::read(&last)?.load_into(&be, &mut t.store)?;
        let json = load_optimizer(&optim, &be, &mut t.adam, &t.store)?;
        p = serde_json::from_str(&json).with_context(|| format!("{}: unreadable progress", optim.display()))?;
        let saved_epoch = TensorFile::read(&last)?.metadata.get("epoch").and_then(|e| e.parse::<usize>().ok());
        ensure!(
            saved_epoch == Some(p.epoch),
            "{} and {} are from different epochs; cannot resume",
            last.display(),
            optim.display()
        );
        t.noise = Rng::from_state(&p.noise_rng).context("bad noise RNG state")?;
        data_rng = Rng::from_state(&p.data_rng).context("bad data RNG state")?;
        let text = std::fs::read_to_string(&metrics_path).unwrap_or_default();
        rows = text
            .lines()
            .skip(1)
            .filter(|l| l.split(',').next().and_then(|e| e.parse::<usize>().ok()).is_some_and(|e| e <= p.epoch))
            .map(str::to_string)
            .collect();
        println!("resuming {} after epoch {} (step {})", dir.display(), p.epoch, t.adam.step);
    } else {
        write_text(&dir.join("run.json"), &serde_json::to_string_pretty(&s)?)?;
    }
    if resumed && p.epoch >= s.epochs {
        println!("this run already has {} epochs; pass a larger --epochs to continue it", p.epoch);
        return Ok(());
    }
    if let Some(pat) = s.patience {
        if p.bad_epochs >= pat && p.epoch > 0 {
            println!("early stopping had already ended this run (no improvement for {pat} epochs)");
            return Ok(());
        }
    }
    println!(
        "training {} ({} parameters) on {} images, testing on {}; run directory {}",
        s.model.arch.name(),
        t.store.trainable_count(),
        train_set.len,
        test_set.len,
        dir.display()
    );
    let steps_per_epoch = train_set.len.div_ceil(s.batch_size);
    let warmup_steps = s.kl_warmup * steps_per_epoch as f64;
    let eval_seed = vaecuda::eval::EVAL_SEED;
    let per_mean = s.reduction == Reduction::Mean;
    let meta_recon = s.recon.name().to_string();
    for epoch in p.epoch + 1..=s.epochs {
        let bar = progress_bar(steps_per_epoch as u64, epoch, s.epochs);
        let start = Instant::now();
        let (mut recon_sum, mut kl_sum, mut seen) = (0.0, 0.0, 0usize);
        for (b, idx) in train_dev.epoch_batches(s.batch_size, Some(&mut data_rng)).into_iter().enumerate() {
            let beta = if warmup_steps > 0.0 {
                s.kl_weight * ((t.adam.step + 1) as f64 / warmup_steps).min(1.0)
            } else {
                s.kl_weight
            };
            let n = idx.len();
            let x = train_dev.batch(&be, &idx);
            let l = match t.step(x, beta) {
                Ok(l) => l,
                Err(e) => {
                    bar.abandon();
                    let keep = if last.is_file() {
                        format!("the last good checkpoint is {}", last.display())
                    } else {
                        "no checkpoint was written yet".to_string()
                    };
                    bail!("training stopped: {e} (epoch {epoch}, batch {}); {keep}", b + 1);
                }
            };
            let scale = if per_mean { n as f64 } else { 1.0 };
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
        be.synchronize();
        let seconds = start.elapsed().as_secs_f64();
        bar.finish_and_clear();
        let ips = seen as f64 / seconds.max(1e-9);
        let (recon, kl) = (recon_sum / seen as f64, kl_sum / seen as f64);
        let test = elbo(&be, &t.model, &mut t.store, &test_dev, s.recon.recon(), s.batch_size, eval_seed);
        println!(
            "epoch {epoch:>3}/{}  train {:.4} (recon {recon:.4}, KL {kl:.4})  test {:.4}  {seconds:.1} s  {ips:.0} img/s",
            s.epochs,
            recon + kl,
            test.loss
        );
        rows.push(format!("{epoch},{:.6},{recon:.6},{kl:.6},{:.6},{seconds:.3},{ips:.1}", recon + kl, test.loss));
        write_text(&metrics_path, &format!("{METRICS_HEADER}\n{}\n", rows.join("\n")))?;

        let improved = test.loss < f64::from_bits(p.best_test_bits);
        if improved {
            p.best_test_bits = test.loss.to_bits();
            p.bad_epochs = 0;
        } else {
            p.bad_epochs += 1;
        }
        p.epoch = epoch;
        p.noise_rng = t.noise.state();
        p.data_rng = data_rng.state();
        let meta = [("vaecuda_recon", meta_recon.clone()), ("epoch", epoch.to_string())];
        if improved {
            save_model(&best, &be, &t.store, &s.model, &meta)?;
        }
        save_model(&last, &be, &t.store, &s.model, &meta)?;
        save_optimizer(&optim, &be, &t.adam, &t.store, serde_json::to_string(&p)?)?;
        if let Some(pat) = s.patience {
            if p.bad_epochs >= pat {
                println!("early stop: the test loss has not improved for {pat} epochs");
                break;
            }
        }
    }
    println!("best test loss {:.4}; checkpoints in {}", f64::from_bits(p.best_test_bits), dir.display());
    Ok(())
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
