//! `vae train`: the settings, the epoch loop, progress, Ctrl-C and early stopping. The files
//! of a run (run.json, metrics.csv, checkpoints, the training state) and resuming from them
//! are `vaecuda::run`'s.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, ensure, Result};
use vaecuda::backend::{human_bytes, Backend};
use vaecuda::data::DeviceData;
use vaecuda::eval::evaluate;
use vaecuda::rng::Rng;
use vaecuda::run::{Monitor, Optimizer, PartialEpoch, Progress, ReconLoss, Reduction, RunDir, Settings};
use vaecuda::train::Trainer;
use vaecuda::train::{EpochSums, PerImage, TermReduction};

use super::{DataArgs, Interrupted, ModelArgs};

/// Train a VAE; writes metrics.csv and checkpoints into the run directory every epoch.
///
/// Losses are per image, in nats: reconstruction (summed over pixels) + KL (summed over
/// latents), averaged over the images of the epoch; "test" is the same on the test set with
/// a fixed noise seed. When the trained objective is not that −ELBO (a KL weight other than
/// 1, or mean reductions), the line also shows the objective per image on both sets: it is
/// what picks best.safetensors and drives --patience (--monitor says on which set).
/// Examples:
///
///   vae train                                  # MLP on the bundled MNIST, 10 epochs
///   vae train --arch conv --epochs 20 --out runs/conv
///   vae train --data ~/fashion-mnist --latent 2 --out runs/fashion-2d
///   vae train --out runs/conv --resume --epochs 30   # continue exactly where it stopped
///   vae train --recipe list                    # the tutorials' settings, one recipe each
///   vae train --recipe celeba --data ~/celeba --out runs/celeba
///   vae train --recipe lightning-mlp --epochs 20     # a recipe, one flag changed
///
/// Ctrl-C stops after the current step and saves how far the epoch got; --resume goes on
/// from there, to the same result as a run never stopped. A run killed any other way
/// resumes from its last finished epoch. A second Ctrl-C quits at once.
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment, args_override_self = true)]
pub struct Args {
    /// Start from a tutorial's settings (flags given besides it override them): mlp, conv,
    /// lightning-mlp, mnist-conv-bn, celeba. `--recipe list` prints each with its flags.
    #[arg(long, value_name = "NAME")]
    recipe: Option<String>,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    model: ModelArgs,
    /// Reconstruction loss.
    #[arg(long, value_enum, default_value_t = ReconLoss::Bce)]
    recon: ReconLoss,
    /// How a batch's loss is reduced before the gradient: sum over images (the PyTorch
    /// example) or mean over images (scales the gradient by 1/batch), both terms at once.
    /// Reported numbers are per image either way.
    #[arg(long, value_enum, default_value_t = Reduction::Sum)]
    reduction: Reduction,
    /// How the reconstruction term alone is reduced over a batch, as PyTorch's reduction=:
    /// sum, batch-mean (summed over each image's pixels, averaged over images) or mean (over
    /// every pixel value: F.mse_loss's default, as in the CelebA tutorial) [default: as
    /// --reduction].
    #[arg(long, value_enum, value_name = "HOW")]
    recon_reduction: Option<TermReduction>,
    /// How the KL term alone is reduced over a batch: sum, batch-mean (summed over latents,
    /// averaged over images: the CelebA tutorial's torch.mean(... .sum(1), 0)) or mean (over
    /// every latent value) [default: as --reduction]. With --kl-weight, this is what makes a
    /// tutorial's β mean what it meant there.
    #[arg(long, value_enum, value_name = "HOW")]
    kl_reduction: Option<TermReduction>,
    /// Which objective picks best.safetensors and drives --patience: on the test set (or the
    /// --holdout images), or on the training set as the epoch trained it.
    #[arg(long, value_enum, default_value_t = Monitor::Test)]
    monitor: Monitor,
    /// Hold out N training images, chosen by --seed, as the evaluation set in place of the
    /// test set (the MNIST tutorial's 48,000/12,000 split: --holdout 12000).
    #[arg(long, value_name = "N")]
    holdout: Option<usize>,
    /// Draw the first 8 evaluation images above their reconstructions after every epoch, in
    /// reconstructions-epoch-N.png in the run directory.
    #[arg(long)]
    epoch_reconstructions: bool,
    /// Weight β of the KL term (β-VAE). A weight copied from a tutorial means what it meant
    /// there only with the tutorial's reductions (--recon-reduction, --kl-reduction; the
    /// recipes set them).
    #[arg(long, default_value_t = 1.0, value_name = "BETA", allow_negative_numbers = true)]
    kl_weight: f64,
    /// Ramp the KL weight linearly from 0 to --kl-weight over this many epochs (per step).
    #[arg(long, default_value_t = 0.0, value_name = "EPOCHS", allow_negative_numbers = true)]
    kl_warmup: f64,
    /// Adam (L2 weight decay) or AdamW (decoupled weight decay).
    #[arg(long, value_enum, default_value_t = Optimizer::Adam)]
    optimizer: Optimizer,
    /// Learning rate.
    #[arg(long, default_value_t = 1e-3, allow_negative_numbers = true)]
    lr: f64,
    /// Adam's β1,β2.
    #[arg(long, default_value = "0.9,0.999", value_name = "B1,B2", allow_hyphen_values = true)]
    betas: String,
    /// Adam's ε.
    #[arg(long, default_value_t = 1e-8, allow_negative_numbers = true)]
    eps: f64,
    /// Weight decay.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    weight_decay: f64,
    /// Images per batch (the last batch of an epoch may be smaller; one larger than the
    /// training set is cut to its size).
    #[arg(long, default_value_t = 128, allow_negative_numbers = true)]
    batch_size: usize,
    /// Train until this many epochs are done in total [default: 10; with --resume: the
    /// run's].
    #[arg(long, allow_negative_numbers = true)]
    epochs: Option<usize>,
    /// Seed of the weights, batch order and noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the monitored objective (--monitor) has not improved for N epochs.
    #[arg(long, value_name = "N")]
    patience: Option<usize>,
    /// Run directory [default: runs/ARCH-yyyymmdd-hhmmss, in UTC].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Continue the run in --out from its last checkpoint, with its saved settings (only
    /// --epochs, --patience and --device may change); the result equals an uninterrupted run.
    /// Where --out holds no run yet (it was stopped before writing one), start it with these
    /// flags.
    #[arg(long, requires = "out")]
    resume: bool,
    /// Start a new run in --out even if it already holds one (its checkpoints are replaced).
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// Print the settings this command would train with, as run.json would hold them (a
    /// recipe expanded, the flags checked), and exit without reading data or writing a file.
    #[arg(long)]
    dry_run: bool,
}

pub fn run<B: Backend>(be: B, a: Args) -> Result<()> {
    let resuming = a.resume && a.out.as_deref().is_some_and(RunDir::has_run);
    let (dir, settings) = if resuming {
        let dir = a.out.clone().unwrap();
        let mut s = RunDir::read_settings(&dir)?;
        if let Some(e) = a.epochs {
            s.epochs = e;
        }
        if a.patience.is_some() {
            s.patience = a.patience;
        }
        ensure!(
            s.precision == be.precision(),
            "{} trained at --precision {}; resume it with --precision {} (this command asked for {})",
            dir.display(),
            s.precision.name(),
            s.precision.name(),
            be.precision().name()
        );
        s.validate()?;
        (dir, s)
    } else {
        // One value (not clap's list of two), so a --betas given besides a recipe replaces the
        // recipe's rather than adding to it.
        let betas: Vec<f64> = a
            .betas
            .split(',')
            .map(|b| b.trim().parse::<f64>())
            .collect::<Result<_, _>>()
            .map_err(|_| anyhow::anyhow!("--betas takes two numbers, like 0.9,0.999 (got {:?})", a.betas))?;
        ensure!(betas.len() == 2, "--betas takes two numbers, like 0.9,0.999 (got {:?})", a.betas);
        if a.recipe.as_deref() == Some("celeba") {
            ensure!(
                a.data.is_folder(),
                "the celeba recipe trains on CelebA: pass --data DIR, the folder torchvision's CelebA or the Kaggle archive leaves"
            );
        }
        let source = a.data.source()?;
        let model = a.model.config(source.image_shape()?);
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
            betas: [betas[0], betas[1]],
            eps: a.eps,
            weight_decay: a.weight_decay,
            batch_size: a.batch_size,
            epochs: a.epochs.unwrap_or(10),
            seed: a.seed,
            patience: a.patience,
            recon_reduction: a.recon_reduction,
            kl_reduction: a.kl_reduction,
            monitor: a.monitor,
            holdout: a.holdout,
            epoch_reconstructions: a.epoch_reconstructions,
            recipe: a.recipe.clone(),
            precision: be.precision(),
        };
        s.validate()?;
        let dir =
            a.out.clone().unwrap_or_else(|| PathBuf::from(format!("runs/{}-{}", s.model.arch.name(), utc_stamp())));
        if a.dry_run {
            // Nothing is written, so --out may hold anything.
        } else if a.resume {
            println!("{} holds no run yet: starting it", dir.display());
        } else {
            RunDir::ensure_free(&dir, a.overwrite)?;
        }
        (dir, s)
    };
    if a.dry_run {
        println!("{}", serde_json::to_string_pretty(&settings)?);
        return Ok(());
    }
    train(be, RunDir::create(&dir)?, settings, resuming)
}

/// Set by the first Ctrl-C (or SIGTERM): the loop stops after the current step.
static STOP: AtomicBool = AtomicBool::new(false);

/// Makes Ctrl-C stop training cleanly; a second one quits at once (every file on disk is
/// whole at any moment, so that loses only the current epoch's progress).
fn install_stop_handler() {
    let handler = || {
        if STOP.swap(true, Ordering::SeqCst) {
            eprintln!("\nstopped at once; the last saved state is kept");
            std::process::exit(130);
        }
        eprintln!("\nstopping after this step (Ctrl-C again to quit at once)");
    };
    // Fails only when a handler is already set: in a second `train` in the same process.
    let _ = ctrlc::set_handler(handler);
}

fn train<B: Backend>(be: B, mut run: RunDir, mut s: Settings, resuming: bool) -> Result<()> {
    let (train_dev, test_dev) = upload_data(&be, &s)?;
    if s.batch_size > train_dev.len {
        println!(
            "note: --batch-size {} is larger than the {} training images; using {}",
            s.batch_size, train_dev.len, train_dev.len
        );
        s.batch_size = train_dev.len;
    }
    check_model_fits(&be, &s)?;
    let mut t = Trainer::new(be.clone(), s.model.clone(), s.loss(), s.adam(), s.seed);
    check_step_fits(&mut t, &train_dev, s.batch_size)?;
    let mut data_rng = Rng::new(s.seed ^ 0xDA7A_5EED);
    let mut p = Progress::start();
    if resuming {
        match run.resume(&mut t, &s)? {
            Some(saved) => {
                p = saved;
                (t.noise, data_rng) = p.rngs()?;
                let at = match &p.partial {
                    Some(part) => format!("epoch {}, batch {}", p.epoch + 1, part.batches_done),
                    None => format!("epoch {}", p.epoch),
                };
                println!("resuming {} after {at} (step {})", run.path.display(), t.adam.step);
            }
            None => println!("{} has no checkpoint yet: starting the run from the beginning", run.path.display()),
        }
    }
    // run.json again on a resume: --epochs and --patience may have changed.
    run.write_settings(&s)?;
    if let Some(why) = s.already_done(&p) {
        println!("{why}");
        return Ok(());
    }
    install_stop_handler();
    println!(
        "training {} ({} parameters) on {} images, {} on {}; run directory {}",
        s.model.arch.name(),
        t.store.trainable_count(),
        train_dev.len,
        if s.holdout.is_some() { "evaluating" } else { "testing" },
        match s.holdout {
            Some(h) => format!("{h} held-out training images"),
            None => format!("{}", test_dev.len),
        },
        run.path.display()
    );
    if let Some(r) = &s.recipe {
        println!("recipe {r}: {}", super::recipes::find(r).map_or("", |r| r.tutorial));
    }
    println!(
        "objective: {}; best checkpoint and early stopping on the {} objective",
        s.loss().describe(s.kl_weight),
        s.monitor.name()
    );
    for epoch in p.epoch + 1..=s.epochs {
        let data_at_start = data_rng.clone();
        let e = match train_epoch(&mut t, &train_dev, &mut data_rng, &s, epoch, &run, p.partial.take())? {
            EpochEnd::Done(e) => e,
            EpochEnd::Stopped(part) => {
                let (batches, images) = (part.batches_done, part.images);
                run.save_stopped(&t, &p.stopped_in_epoch(part, &t.noise, &data_at_start))?;
                bail!(Interrupted(format!(
                    "stopped in epoch {epoch} after {batches} batches ({images} images), saved in {}; continue with: vae train --out {} --resume",
                    run.state().display(),
                    run.path.display()
                )));
            }
        };
        let test = evaluate(
            &be,
            &t.model,
            &mut t.store,
            &test_dev,
            &s.loss(),
            s.kl_weight,
            s.batch_size,
            vaecuda::eval::EVAL_SEED,
        )
        .per_image();
        let monitored = match s.monitor {
            Monitor::Test => test.objective,
            Monitor::Train => e.sums.per_image().objective,
        };
        let improved = p.finish_epoch(epoch, monitored, &t.noise, &data_rng);
        println!("{}", e.report(epoch, s.epochs, &test, &s, improved));
        run.push_metrics(e.csv_row(epoch, &test))?;
        if s.epoch_reconstructions {
            let path = run.path.join(format!("reconstructions-epoch-{epoch}.png"));
            let caption = format!("epoch {epoch}: evaluation images above, reconstructions (decoded μ) below");
            let idx: Vec<usize> = (0..test_dev.len.min(8)).collect();
            super::reconstruct::draw(&t.backend, &t.model, &mut t.store, &test_dev, &idx, &caption, &path)?;
        }
        run.commit_epoch(&t, &s, &p)?;
        if let Some(pat) = s.patience.filter(|&pat| p.bad_epochs >= pat) {
            println!("early stop: the {} objective has not improved for {pat} epochs", s.monitor.name());
            break;
        }
        if STOP.load(Ordering::SeqCst) && epoch < s.epochs {
            bail!(Interrupted(format!(
                "stopped after epoch {epoch}; continue with: vae train --out {} --resume",
                run.path.display()
            )));
        }
    }
    if s.objective_is_elbo() && s.monitor == Monitor::Test {
        println!("best test loss {:.4} (epoch {}); checkpoints in {}", p.best_test(), p.best_epoch, run.path.display());
    } else {
        println!(
            "best {} objective {:.6} (epoch {}); checkpoints in {}",
            s.monitor.name(),
            p.best_test(),
            p.best_epoch,
            run.path.display()
        );
    }
    Ok(())
}

/// Refuses a model whose parameters, gradients and Adam moments cannot fit in the device's
/// free memory, before building it.
fn check_model_fits<B: Backend>(be: &B, s: &Settings) -> Result<()> {
    let Some(free) = be.free_memory() else { return Ok(()) };
    let params = vaecuda::nn::vae::parameter_count(&s.model);
    let need = params.saturating_mul(4 * std::mem::size_of::<B::E>() as u64);
    ensure!(
        need <= free,
        "the model's {params} parameters, with their gradients and Adam's two moments, would need {} but {} is free; choose smaller layers",
        human_bytes(need),
        human_bytes(free)
    );
    Ok(())
}

/// Refuses a batch whose step cannot fit in the device's free memory, before allocating it.
fn check_step_fits<B: Backend>(t: &mut Trainer<B>, data: &DeviceData<B>, batch: usize) -> Result<()> {
    let Some(free) = t.backend.free_memory() else { return Ok(()) };
    let one = data.batch(&t.backend, &[0]);
    let m = t.step_memory(one);
    let need = m.for_batch(batch);
    if need > free {
        bail!(
            "a training step on batches of {batch} would need about {} ({} per image) but {} is free; use --batch-size {} or less",
            human_bytes(need),
            human_bytes(m.bytes_per_image),
            human_bytes(free),
            m.largest_batch(free).max(1)
        );
    }
    eprintln!(
        "memory: a step on {batch} images takes about {} (estimated); {} is free",
        human_bytes(need),
        human_bytes(free)
    );
    Ok(())
}

/// One epoch's training numbers.
struct EpochLosses {
    sums: EpochSums,
    seconds: f64,
}

impl EpochLosses {
    fn images_per_s(&self) -> f64 {
        self.sums.images as f64 / self.seconds.max(1e-9)
    }
    /// The line printed after the epoch: the −ELBO per image of both sets, and the trained
    /// objective (with a `*` where it improved) when it is not that −ELBO.
    fn report(&self, epoch: usize, epochs: usize, test: &PerImage, s: &Settings, improved: bool) -> String {
        let train = self.sums.per_image();
        let (recon, kl, seconds, ips) = (train.recon, train.kl, self.seconds, self.images_per_s());
        let mut line = format!(
            "epoch {epoch:>3}/{epochs}  train {:.4} (recon {recon:.4}, KL {kl:.4})  test {:.4}  {seconds:.1} s  {ips:.0} img/s",
            train.elbo(),
            test.elbo()
        );
        if !s.objective_is_elbo() || s.monitor != Monitor::Test {
            let mark = if improved { " *" } else { "" };
            line += &format!(
                "  objective train {:.6} test {:.6} ({} monitored{mark})",
                train.objective,
                test.objective,
                s.monitor.name()
            );
        }
        line
    }
    /// The epoch's metrics.csv row, in the header's column order.
    fn csv_row(&self, epoch: usize, test: &PerImage) -> String {
        let train = self.sums.per_image();
        let (seconds, ips) = (self.seconds, self.images_per_s());
        let [loss, recon_term, kl_term] = train.batch_terms;
        format!(
            "{epoch},{:.6},{:.6},{:.6},{:.6},{seconds:.3},{ips:.1},{:.6},{:.6},{loss:.6},{recon_term:.6},{kl_term:.6}",
            train.elbo(),
            train.recon,
            train.kl,
            test.elbo(),
            train.objective,
            test.objective
        )
    }
}

/// The run's train and test sets on the device, checked against the model's image shape.
/// With `--holdout N`, the second is N training images (chosen by the seed) instead.
fn upload_data<B: Backend>(be: &B, s: &Settings) -> Result<(DeviceData<B>, DeviceData<B>)> {
    let (mut train_set, mut test_set) = s.source.load(s.limit_train, s.limit_test)?;
    if let Some(n) = s.holdout {
        (train_set, test_set) = train_set.hold_out(n, s.seed ^ HOLDOUT_SEED)?;
    }
    ensure!(train_set.len > 0 && test_set.len > 0, "the training and test sets must not be empty");
    ensure!(
        [train_set.channels, train_set.height, train_set.width] == [s.model.channels, s.model.height, s.model.width],
        "the data's image shape changed since the run started"
    );
    Ok((DeviceData::upload(be, &train_set), DeviceData::upload(be, &test_set)))
}

/// Mixed into `--seed` for the choice of held-out images, so it is not the data order's.
const HOLDOUT_SEED: u64 = 0x401D_0075;

/// How an epoch's pass over the training set ended.
enum EpochEnd {
    Done(EpochLosses),
    /// Ctrl-C: the batches done so far.
    Stopped(PartialEpoch),
}

/// One pass over the training set in `data_rng`'s order, with a progress bar on a terminal;
/// `resume` skips the batches a stopped run already did.
fn train_epoch<B: Backend>(
    t: &mut Trainer<B>,
    data: &DeviceData<B>,
    data_rng: &mut Rng,
    s: &Settings,
    epoch: usize,
    run: &RunDir,
    resume: Option<PartialEpoch>,
) -> Result<EpochEnd> {
    let steps_per_epoch = data.len.div_ceil(s.batch_size);
    let warmup_steps = s.kl_warmup * steps_per_epoch as f64;
    let bar = super::progress_bar(steps_per_epoch as u64, &format!("epoch {epoch}/{}", s.epochs), "batches");
    let start = Instant::now();
    let done = resume.unwrap_or_else(PartialEpoch::none);
    let mut sums = done.sums();
    let seconds = |start: Instant| done.seconds + start.elapsed().as_secs_f64();
    bar.inc(done.batches_done as u64);
    let objective = s.loss();
    let (image_len, latent) = (s.model.image_len(), s.model.latent);
    let batches = data.epoch_batches(s.batch_size, Some(data_rng));
    for (b, idx) in batches.into_iter().enumerate().skip(done.batches_done) {
        if STOP.load(Ordering::SeqCst) {
            bar.abandon();
            return Ok(EpochEnd::Stopped(PartialEpoch::new(b, &sums, seconds(start))));
        }
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
        sums.add(&objective, n, image_len, latent, l);
        let (p, secs) = (sums.per_image(), seconds(start).max(1e-9));
        bar.set_message(format!(
            "loss {:.2}  recon {:.2}  KL {:.2}  {:.0} img/s",
            p.elbo(),
            p.recon,
            p.kl,
            sums.images as f64 / secs
        ));
        bar.inc(1);
    }
    t.backend.synchronize();
    let seconds = seconds(start);
    bar.finish_and_clear();
    Ok(EpochEnd::Done(EpochLosses { sums, seconds }))
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
