//! A training run on disk: its settings (`run.json`), its metrics (`metrics.csv`), its model
//! checkpoints (`last.safetensors`, `best.safetensors`) and its training state
//! (`optim-last.safetensors`: the model, Adam's moments and the [`Progress`] below).
//!
//! # Nothing lost when the process dies
//!
//! Every file is written whole through a temporary file and a rename
//! ([`checkpoint::write_atomic`]), and an epoch ends in this order:
//!
//! 1. metrics.csv, with the epoch's row;
//! 2. the training state: **the commit point**. A resume continues from it;
//! 3. last.safetensors, then best.safetensors when the test loss improved.
//!
//! A process killed between 1 and 2 resumes from the previous epoch (whose metrics rows it
//! keeps); killed after 2, it finds the state ahead of last/best and rewrites them from the
//! state's model before going on ([`RunDir::resume`]). So a resumed run ends with the same
//! bytes in every checkpoint as a run never interrupted (`tests/kill_resume.rs` kills runs at
//! random moments and at each of these steps to prove it). A Ctrl-C mid-epoch saves a state
//! with a [`PartialEpoch`]; the resume replays the epoch's batch order and skips what was
//! done.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, Precision, Recon};
use crate::checkpoint::{self, load_training_state, save_model, save_training_state, TensorFile};
use crate::data::Source;
use crate::failpoint;
use crate::nn::{ModelConfig, OutputActivation};
use crate::optim::AdamConfig;
use crate::rng::{NoiseStream, Rng};
use crate::train::{EpochSums, LossConfig, TermReduction, Trainer};

/// The reconstruction term a run trains with (the `--recon` flag).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReconLoss {
    /// Binary cross-entropy on sigmoid outputs, summed over pixels (Bernoulli decoder).
    Bce,
    /// Squared error summed over pixels.
    Mse,
}

impl ReconLoss {
    /// The loss the backend computes for it.
    pub fn recon(self) -> Recon {
        match self {
            ReconLoss::Bce => Recon::Bce,
            ReconLoss::Mse => Recon::Mse,
        }
    }
    /// Its name on the command line and in checkpoint metadata (`vaecuda_recon`).
    pub fn name(self) -> &'static str {
        match self {
            ReconLoss::Bce => "bce",
            ReconLoss::Mse => "mse",
        }
    }
}

/// Which loss picks the best checkpoint and drives `--patience` (the `--monitor` flag).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Monitor {
    /// The objective on the evaluation set (the test set, or --holdout's images)
    #[default]
    Test,
    /// The objective on the training set, as the epoch trained it (Lightning's monitor="loss")
    Train,
}

impl Monitor {
    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Monitor::Test => "test",
            Monitor::Train => "train",
        }
    }
}

/// How a batch's loss is reduced before the gradient (the `--reduction` flag): both terms at
/// once; `--recon-reduction` and `--kl-reduction` set each alone.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reduction {
    /// Summed over the batch's images (the PyTorch example).
    Sum,
    /// Averaged over the batch's images (the gradient scaled by 1/batch).
    Mean,
}

/// The optimizer (the `--optimizer` flag).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Optimizer {
    /// Adam, weight decay added to the gradient (L2).
    Adam,
    /// AdamW, weight decay applied to the weights (decoupled).
    Adamw,
}

/// Everything that defines a run; saved as run.json so `--resume` repeats it exactly.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Settings {
    /// Where the images come from.
    pub source: Source,
    /// Only the first N training images.
    pub limit_train: Option<usize>,
    /// Only the first N test images.
    pub limit_test: Option<usize>,
    /// The architecture and its sizes.
    pub model: ModelConfig,
    /// The reconstruction term.
    pub recon: ReconLoss,
    /// Sum or mean over a batch's images.
    pub reduction: Reduction,
    /// β, the weight of the KL term.
    pub kl_weight: f64,
    /// Epochs over which β ramps up from 0 (0: no ramp).
    pub kl_warmup: f64,
    /// Adam or AdamW.
    pub optimizer: Optimizer,
    /// Learning rate.
    pub lr: f64,
    /// Adam's β1 and β2.
    pub betas: [f64; 2],
    /// Adam's ε.
    pub eps: f64,
    /// Weight decay (L2 for Adam, decoupled for AdamW).
    pub weight_decay: f64,
    /// Images per batch.
    pub batch_size: usize,
    /// Epochs the run trains for in all.
    pub epochs: usize,
    /// Seed of the weights, the batch order and the noise.
    pub seed: u64,
    /// Early stopping after this many epochs without a better monitored objective.
    pub patience: Option<usize>,
    /// How the reconstruction term is reduced over a batch (absent: as `reduction` says).
    #[serde(default)]
    pub recon_reduction: Option<TermReduction>,
    /// How the KL term is reduced over a batch (absent: as `reduction` says).
    #[serde(default)]
    pub kl_reduction: Option<TermReduction>,
    /// Which objective picks the best checkpoint and drives early stopping.
    #[serde(default)]
    pub monitor: Monitor,
    /// Training images held out, chosen by the seed, as the evaluation set in place of the
    /// test set (the MNIST tutorial's 48,000/12,000 split is `--holdout 12000`).
    #[serde(default)]
    pub holdout: Option<usize>,
    /// Draw the first evaluation images and their reconstructions after every epoch
    /// (`reconstructions-epoch-N.png`).
    #[serde(default)]
    pub epoch_reconstructions: bool,
    /// The recipe (`--recipe`) the flags were expanded from, if any.
    #[serde(default)]
    pub recipe: Option<String>,
    /// The precision of the matrix products the run trains at (`--precision`).
    #[serde(default)]
    pub precision: Precision,
}

impl Settings {
    /// Refuses nonsense with the flag it came from: zero counts, a learning rate that is not
    /// a positive number, betas outside [0, 1), a model that cannot be built. Runs on the
    /// command line's flags and on every run.json read back.
    pub fn validate(&self) -> Result<()> {
        fn finite(flag: &str, v: f64, ok: bool, want: &str) -> Result<()> {
            ensure!(v.is_finite() && ok, "{flag} must be {want} (got {v})");
            Ok(())
        }
        ensure!(self.epochs >= 1, "--epochs must be at least 1 (got 0)");
        ensure!(self.batch_size >= 1, "--batch-size must be at least 1 (got 0)");
        ensure!(self.patience != Some(0), "--patience must be at least 1 epoch (got 0)");
        for (flag, limit) in [("--limit-train", self.limit_train), ("--limit-test", self.limit_test)] {
            ensure!(
                limit != Some(0),
                "{flag} 0 leaves no images: give at least 1, or leave the flag out to use them all"
            );
        }
        finite("--lr", self.lr, self.lr > 0.0, "a positive number")?;
        finite("--eps", self.eps, self.eps > 0.0, "a positive number")?;
        finite("--weight-decay", self.weight_decay, self.weight_decay >= 0.0, "0 or more")?;
        finite("--kl-weight", self.kl_weight, self.kl_weight >= 0.0, "0 or more")?;
        finite("--kl-warmup", self.kl_warmup, self.kl_warmup >= 0.0, "0 or more epochs")?;
        ensure!(self.holdout != Some(0), "--holdout 0 holds nothing out: give at least 1, or leave the flag out");
        ensure!(
            self.recon == ReconLoss::Mse || self.model.output == OutputActivation::Sigmoid,
            "--recon bce reads probabilities, so it needs --output-activation sigmoid (got {}); use --recon mse",
            self.model.output.name()
        );
        for b in self.betas {
            finite("--betas", b, (0.0..1.0).contains(&b), "two numbers in [0, 1), like 0.9,0.999")?;
        }
        crate::nn::vae::validate(&self.model)
    }
    /// The loss configuration of a training step.
    pub fn loss(&self) -> LossConfig {
        let both = match self.reduction {
            Reduction::Sum => TermReduction::Sum,
            Reduction::Mean => TermReduction::BatchMean,
        };
        LossConfig {
            recon: self.recon.recon(),
            recon_reduction: self.recon_reduction.unwrap_or(both),
            kl_reduction: self.kl_reduction.unwrap_or(both),
        }
    }
    /// Whether the monitored objective is the plain −ELBO per image (sums, β = 1), so the
    /// epoch line's test loss already shows it.
    pub fn objective_is_elbo(&self) -> bool {
        let l = self.loss();
        l.recon_reduction == TermReduction::Sum && l.kl_reduction == TermReduction::Sum && self.kl_weight == 1.0
    }
    /// The optimizer configuration.
    pub fn adam(&self) -> AdamConfig {
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
    pub fn already_done(&self, p: &Progress) -> Option<String> {
        if p.partial.is_some() {
            return None;
        }
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

/// Where a run stands: what `--resume` restores. Saved (as JSON) in the training state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Epochs completed.
    pub epoch: usize,
    /// The best monitored objective so far (`--monitor`: test by default), as f64 bits, so
    /// the comparison after a resume is exact.
    pub best_test_bits: u64,
    /// The epoch that had it (0: none yet); best.safetensors holds that epoch's model.
    #[serde(default)]
    pub best_epoch: usize,
    /// Epochs since the monitored objective last improved.
    pub bad_epochs: usize,
    /// The noise stream's state now: its key and the draws made ([`NoiseStream::state`]).
    noise_rng: Vec<u64>,
    /// The data-order generator's state at the start of epoch `epoch + 1` (each epoch draws
    /// its order from it first).
    data_rng: Vec<u64>,
    /// The epoch under way when the run was stopped mid-epoch (Ctrl-C); `None` at an epoch's
    /// end.
    #[serde(default)]
    pub partial: Option<PartialEpoch>,
}

/// How far into epoch `Progress::epoch + 1` a stopped run got.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PartialEpoch {
    /// Batches of the epoch already trained on.
    pub batches_done: usize,
    /// Their summed reconstruction loss (f64 bits).
    pub recon_bits: u64,
    /// Their summed KL (f64 bits).
    pub kl_bits: u64,
    /// Images in them.
    pub images: usize,
    /// Seconds spent on them.
    pub seconds: f64,
    /// Their summed objective ([`EpochSums::objective`], f64 bits).
    #[serde(default)]
    pub objective_bits: u64,
    /// [`EpochSums::batch_terms`] (f64 bits).
    #[serde(default)]
    pub batch_terms_bits: [u64; 3],
}

impl PartialEpoch {
    /// The first `batches_done` batches of an epoch, their sums and the seconds they took.
    pub fn new(batches_done: usize, sums: &EpochSums, seconds: f64) -> Self {
        PartialEpoch {
            batches_done,
            recon_bits: sums.recon.to_bits(),
            kl_bits: sums.kl.to_bits(),
            images: sums.images,
            seconds,
            objective_bits: sums.objective.to_bits(),
            batch_terms_bits: sums.batch_terms.map(f64::to_bits),
        }
    }
    /// The sums saved, exactly.
    pub fn sums(&self) -> EpochSums {
        EpochSums {
            images: self.images,
            recon: f64::from_bits(self.recon_bits),
            kl: f64::from_bits(self.kl_bits),
            objective: f64::from_bits(self.objective_bits),
            batch_terms: self.batch_terms_bits.map(f64::from_bits),
        }
    }
    /// Nothing done yet.
    pub fn none() -> Self {
        Self::new(0, &EpochSums::default(), 0.0)
    }
}

impl Progress {
    /// A run before its first epoch.
    pub fn start() -> Self {
        Progress {
            epoch: 0,
            best_test_bits: f64::INFINITY.to_bits(),
            best_epoch: 0,
            bad_epochs: 0,
            noise_rng: vec![],
            data_rng: vec![],
            partial: None,
        }
    }
    /// The best monitored objective so far (infinite before the first epoch).
    pub fn best_test(&self) -> f64 {
        f64::from_bits(self.best_test_bits)
    }
    /// Records a finished epoch, its monitored objective and the random streams after it;
    /// says whether the objective improved (the best checkpoint is then replaced).
    pub fn finish_epoch(&mut self, epoch: usize, monitored: f64, noise: &NoiseStream, data: &Rng) -> bool {
        let improved = monitored < self.best_test();
        if improved {
            self.best_test_bits = monitored.to_bits();
            self.best_epoch = epoch;
            self.bad_epochs = 0;
        } else {
            self.bad_epochs += 1;
        }
        self.epoch = epoch;
        self.noise_rng = noise.state();
        self.data_rng = data.state();
        self.partial = None;
        improved
    }
    /// The progress of a run stopped `partial` into the epoch after `self.epoch`: the noise
    /// generator as it is now, the data order as it was at the epoch's start.
    pub fn stopped_in_epoch(&self, partial: PartialEpoch, noise: &NoiseStream, data_at_epoch_start: &Rng) -> Self {
        Progress {
            noise_rng: noise.state(),
            data_rng: data_at_epoch_start.state(),
            partial: Some(partial),
            ..self.clone()
        }
    }
    /// The noise stream and the data-order generator as they were saved. A training state
    /// from before the noise was counter-based holds a generator's state instead, which is
    /// refused: the run cannot be continued exactly.
    pub fn rngs(&self) -> Result<(NoiseStream, Rng)> {
        Ok((
            NoiseStream::from_state(&self.noise_rng)
                .context("bad noise state (a training state from before the noise was drawn on the device?)")?,
            Rng::from_state(&self.data_rng).context("bad data RNG state")?,
        ))
    }
}

/// The columns of metrics.csv, one row per epoch: the training set's −ELBO and its two terms
/// per image (nats), the evaluation set's −ELBO, time and speed; then the trained objective
/// per image on the training and evaluation sets (what `--monitor` watches); then, under the
/// names PyTorch Lightning's CSVLogger gives them (the Lightning tutorial's plotting code
/// reads them), the training batches' objective and its two terms as the loss function
/// returns them, averaged over the epoch (BCE_loss is the reconstruction term, BCE or MSE;
/// KLD_loss is unweighted).
pub const METRICS_HEADER: &str =
    "epoch,train_loss,recon,kl,test_loss,seconds,images_per_s,objective,test_objective,loss,BCE_loss,KLD_loss";

/// A run's directory and the files `vae train` keeps in it.
pub struct RunDir {
    /// The directory.
    pub path: PathBuf,
    /// metrics.csv's rows so far, without the header; the file is rewritten whole each epoch,
    /// so a resume drops the rows of epochs after the last commit.
    rows: Vec<String>,
}

impl RunDir {
    /// Whether `dir` holds a run (its run.json).
    pub fn has_run(dir: &Path) -> bool {
        dir.join("run.json").exists()
    }

    /// The settings of the run in `dir`, for `--resume`, checked as the flags are.
    pub fn read_settings(dir: &Path) -> Result<Settings> {
        let path = dir.join("run.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot resume: {} is missing (was the run started here?)", path.display()))?;
        parse_settings(&text).with_context(|| format!("{} is damaged", path.display()))
    }

    /// Refuses to start a new run in a directory that holds one, unless `overwrite`: a second
    /// `train --out DIR` would replace the first run's best checkpoint after one epoch.
    pub fn ensure_free(dir: &Path, overwrite: bool) -> Result<()> {
        ensure!(
            overwrite || !Self::has_run(dir),
            "{} already holds a run; continue it with --resume, or start over with --overwrite",
            dir.display()
        );
        Ok(())
    }

    /// Opens `dir`, creating it (and its parents) if needed.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create run directory {}", dir.display()))?;
        Ok(RunDir { path: dir.to_path_buf(), rows: vec![] })
    }

    /// The newest model.
    pub fn last(&self) -> PathBuf {
        self.path.join("last.safetensors")
    }
    /// The model of the epoch with the best test loss.
    pub fn best(&self) -> PathBuf {
        self.path.join("best.safetensors")
    }
    /// The training state: the commit point.
    pub fn state(&self) -> PathBuf {
        self.path.join("optim-last.safetensors")
    }
    /// The metrics, one row per epoch.
    pub fn metrics(&self) -> PathBuf {
        self.path.join("metrics.csv")
    }

    /// Writes run.json (whole, or not at all).
    pub fn write_settings(&self, settings: &Settings) -> Result<()> {
        checkpoint::write_atomic(&self.path.join("run.json"), serde_json::to_string_pretty(settings)?.as_bytes())
    }

    /// Loads the training state into `t` and the metrics rows up to it; returns the saved
    /// progress, or `None` when the run was stopped before its first checkpoint (it then
    /// starts from the beginning). Rewrites last/best.safetensors when the process died after
    /// the state was committed but before they were written, and removes the `.tmp` files a
    /// death mid-write leaves.
    pub fn resume<B: Backend>(&mut self, t: &mut Trainer<B>, s: &Settings) -> Result<Option<Progress>> {
        self.remove_stale_temporaries();
        let state = self.state();
        if !state.exists() {
            return Ok(None);
        }
        let (json, had_model) = load_training_state(&state, &t.backend, &mut t.adam, &mut t.store)?;
        let p: Progress =
            serde_json::from_str(&json).with_context(|| format!("{}: unreadable progress", state.display()))?;
        if !had_model {
            // A state file from before the model moved into it: the model is last.safetensors.
            let last = self.last();
            TensorFile::read(&last)?.load_into(&t.backend, &mut t.store)?;
            ensure!(
                saved_epoch(&last) == Some(p.epoch),
                "{} and {} are from different epochs; cannot resume",
                last.display(),
                state.display()
            );
        }
        if p.partial.is_none() && p.epoch > 0 {
            if saved_epoch(&self.last()) != Some(p.epoch) {
                self.save_model(&self.last(), t, s, p.epoch)?;
            }
            if p.best_epoch == p.epoch && saved_epoch(&self.best()) != Some(p.epoch) {
                self.save_model(&self.best(), t, s, p.epoch)?;
            }
        }
        let text = std::fs::read_to_string(self.metrics()).unwrap_or_default();
        self.rows = text
            .lines()
            .skip(1)
            .filter(|l| l.split(',').next().and_then(|e| e.parse::<usize>().ok()).is_some_and(|e| e <= p.epoch))
            .map(str::to_string)
            .collect();
        Ok(Some(p))
    }

    fn remove_stale_temporaries(&self) {
        let Ok(entries) = std::fs::read_dir(&self.path) else { return };
        for e in entries.flatten() {
            if e.path().extension().is_some_and(|x| x == "tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Adds an epoch's row and rewrites metrics.csv.
    pub fn push_metrics(&mut self, row: String) -> Result<()> {
        self.rows.push(row);
        let text = format!("{METRICS_HEADER}\n{}\n", self.rows.join("\n"));
        checkpoint::write_atomic(&self.metrics(), text.as_bytes())
    }

    fn save_model<B: Backend>(&self, path: &Path, t: &Trainer<B>, s: &Settings, epoch: usize) -> Result<()> {
        let meta = [
            ("vaecuda_recon", s.recon.name().to_string()),
            ("vaecuda_objective", s.loss().describe(s.kl_weight)),
            ("epoch", epoch.to_string()),
        ];
        save_model(path, &t.backend, &t.store, &s.model, &meta)
    }

    /// Ends an epoch on disk (after [`RunDir::push_metrics`]): the training state (the commit
    /// point), then last.safetensors, then best.safetensors when `p` says this epoch is the
    /// best.
    pub fn commit_epoch<B: Backend>(&self, t: &Trainer<B>, s: &Settings, p: &Progress) -> Result<()> {
        failpoint::hit("metrics-written");
        save_training_state(&self.state(), &t.backend, &t.adam, &t.store, serde_json::to_string(p)?)?;
        failpoint::hit("state-written");
        self.save_model(&self.last(), t, s, p.epoch)?;
        failpoint::hit("last-written");
        if p.best_epoch == p.epoch {
            self.save_model(&self.best(), t, s, p.epoch)?;
        }
        failpoint::hit("epoch-saved");
        Ok(())
    }

    /// Saves a run stopped mid-epoch: the training state alone (`p` carries the
    /// [`PartialEpoch`]); last and best stay those of the last whole epoch.
    pub fn save_stopped<B: Backend>(&self, t: &Trainer<B>, p: &Progress) -> Result<()> {
        save_training_state(&self.state(), &t.backend, &t.adam, &t.store, serde_json::to_string(p)?)
    }

    /// What a failed run leaves behind, for its error message.
    pub fn what_is_kept(&self) -> String {
        let last = self.last();
        if last.is_file() {
            format!("the last good checkpoint is {}", last.display())
        } else {
            "no checkpoint was written yet".to_string()
        }
    }
}

/// The epoch a model checkpoint was saved at (its `epoch` metadata), if it reads.
fn saved_epoch(path: &Path) -> Option<usize> {
    TensorFile::read(path).ok()?.metadata.get("epoch")?.parse().ok()
}

/// run.json's text as [`Settings`], validated.
pub fn parse_settings(text: &str) -> Result<Settings> {
    let s: Settings = serde_json::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
    s.validate()?;
    Ok(s)
}

/// A metrics.csv read back: its columns by name.
#[derive(Clone, Debug)]
pub struct Metrics {
    columns: HashMap<String, Vec<f64>>,
    /// Rows read.
    pub rows: usize,
}

impl Metrics {
    /// Parses metrics.csv's text (`what` names it in errors): a header, then rows of numbers,
    /// as many as the header has columns; blank lines are skipped.
    pub fn parse(text: &str, what: &str) -> Result<Self> {
        let mut lines = text.lines();
        let header: Vec<String> = lines.next().unwrap_or("").split(',').map(|h| h.trim().to_string()).collect();
        let mut values: Vec<Vec<f64>> = vec![vec![]; header.len()];
        let mut rows = 0;
        for (i, line) in lines.enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let f: Vec<&str> = line.split(',').collect();
            if f.len() != header.len() {
                bail!("{what} line {}: {} fields, but the header has {}", i + 2, f.len(), header.len());
            }
            for (k, field) in f.iter().enumerate() {
                match field.trim().parse::<f64>() {
                    Ok(x) => values[k].push(x),
                    Err(_) => bail!("{what} line {}: column {} is not a number", i + 2, header[k]),
                }
            }
            rows += 1;
        }
        Ok(Metrics { columns: header.into_iter().zip(values).collect(), rows })
    }

    /// Reads and parses a metrics.csv file.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// One column's values, in row order.
    pub fn column(&self, name: &str) -> Result<&[f64]> {
        self.columns.get(name).map(Vec::as_slice).with_context(|| format!("no {name} column"))
    }
}
