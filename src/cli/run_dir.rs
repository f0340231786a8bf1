//! A training run's directory and every file `vae train` keeps in it: run.json (the settings,
//! so --resume repeats them), metrics.csv (one row per epoch), last.safetensors and
//! best.safetensors (the model) and optim-last.safetensors (Adam's moments and the progress
//! below). Checkpoints are written through a temporary file and a rename (see
//! `vaecuda::checkpoint`), so a crash never leaves half a file.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use vaecuda::backend::Backend;
use vaecuda::checkpoint::{load_optimizer, save_model, save_optimizer, TensorFile};
use vaecuda::nn::ModelConfig;
use vaecuda::rng::Rng;
use vaecuda::train::Trainer;

use super::write_text;

const METRICS_HEADER: &str = "epoch,train_loss,recon,kl,test_loss,seconds,images_per_s";

/// Progress that --resume restores, saved with the optimizer moments.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Progress {
    pub epoch: usize,
    /// f64 bits, so the comparison after a resume is exact.
    pub best_test_bits: u64,
    pub bad_epochs: usize,
    noise_rng: Vec<u64>,
    data_rng: Vec<u64>,
}

impl Progress {
    /// A run before its first epoch.
    pub fn start() -> Self {
        Progress {
            epoch: 0,
            best_test_bits: f64::INFINITY.to_bits(),
            bad_epochs: 0,
            noise_rng: vec![],
            data_rng: vec![],
        }
    }
    pub fn best_test(&self) -> f64 {
        f64::from_bits(self.best_test_bits)
    }
    /// Records a finished epoch and the random streams after it; says whether the test loss
    /// improved (the best checkpoint is then replaced).
    pub fn finish_epoch(&mut self, epoch: usize, test_loss: f64, noise: &Rng, data: &Rng) -> bool {
        let improved = test_loss < self.best_test();
        if improved {
            self.best_test_bits = test_loss.to_bits();
            self.bad_epochs = 0;
        } else {
            self.bad_epochs += 1;
        }
        self.epoch = epoch;
        self.noise_rng = noise.state();
        self.data_rng = data.state();
        improved
    }
    /// The noise and data-order generators as they were after the saved epoch.
    pub fn rngs(&self) -> Result<(Rng, Rng)> {
        Ok((
            Rng::from_state(&self.noise_rng).context("bad noise RNG state")?,
            Rng::from_state(&self.data_rng).context("bad data RNG state")?,
        ))
    }
}

pub struct RunDir {
    pub path: PathBuf,
    /// metrics.csv's rows so far, without the header; the file is rewritten whole each epoch,
    /// so a resume drops the rows of epochs after the last checkpoint.
    rows: Vec<String>,
}

impl RunDir {
    /// The settings of the run in `dir`, for --resume.
    pub fn read_settings<S: DeserializeOwned>(dir: &Path) -> Result<S> {
        let path = dir.join("run.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot resume: {} is missing (was the run started here?)", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is unreadable", path.display()))
    }

    /// Refuses to start a new run in a directory that holds one, unless `overwrite`: a second
    /// `train --out DIR` would replace the first run's best checkpoint after one epoch.
    pub fn ensure_free(dir: &Path, overwrite: bool) -> Result<()> {
        ensure!(
            overwrite || !dir.join("run.json").exists(),
            "{} already holds a run; continue it with --resume, or start over with --overwrite",
            dir.display()
        );
        Ok(())
    }

    /// Creates the directory (and its parents) if needed.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create run directory {}", dir.display()))?;
        Ok(RunDir { path: dir.to_path_buf(), rows: vec![] })
    }

    fn last(&self) -> PathBuf {
        self.path.join("last.safetensors")
    }
    fn best(&self) -> PathBuf {
        self.path.join("best.safetensors")
    }
    fn optim(&self) -> PathBuf {
        self.path.join("optim-last.safetensors")
    }
    fn metrics(&self) -> PathBuf {
        self.path.join("metrics.csv")
    }

    pub fn write_settings<S: Serialize>(&self, settings: &S) -> Result<()> {
        write_text(&self.path.join("run.json"), &serde_json::to_string_pretty(settings)?)
    }

    /// Loads the last checkpoint and the optimizer state into `t`, and the metrics rows up to
    /// that epoch; returns the saved progress.
    pub fn resume<B: Backend>(&mut self, be: &B, t: &mut Trainer<B>) -> Result<Progress> {
        let (last, optim) = (self.last(), self.optim());
        TensorFile::read(&last)?.load_into(be, &mut t.store)?;
        let json = load_optimizer(&optim, be, &mut t.adam, &t.store)?;
        let p: Progress =
            serde_json::from_str(&json).with_context(|| format!("{}: unreadable progress", optim.display()))?;
        let saved_epoch = TensorFile::read(&last)?.metadata.get("epoch").and_then(|e| e.parse::<usize>().ok());
        ensure!(
            saved_epoch == Some(p.epoch),
            "{} and {} are from different epochs; cannot resume",
            last.display(),
            optim.display()
        );
        let text = std::fs::read_to_string(self.metrics()).unwrap_or_default();
        self.rows = text
            .lines()
            .skip(1)
            .filter(|l| l.split(',').next().and_then(|e| e.parse::<usize>().ok()).is_some_and(|e| e <= p.epoch))
            .map(str::to_string)
            .collect();
        Ok(p)
    }

    /// Adds an epoch's row and rewrites metrics.csv.
    pub fn push_metrics(&mut self, row: String) -> Result<()> {
        self.rows.push(row);
        write_text(&self.metrics(), &format!("{METRICS_HEADER}\n{}\n", self.rows.join("\n")))
    }

    /// Writes the epoch's checkpoints: best (when it improved), last, and the optimizer state
    /// with `p`.
    pub fn save<B: Backend>(
        &self,
        t: &Trainer<B>,
        model: &ModelConfig,
        recon: &str,
        p: &Progress,
        improved: bool,
    ) -> Result<()> {
        let meta = [("vaecuda_recon", recon.to_string()), ("epoch", p.epoch.to_string())];
        if improved {
            save_model(&self.best(), &t.backend, &t.store, model, &meta)?;
        }
        save_model(&self.last(), &t.backend, &t.store, model, &meta)?;
        save_optimizer(&self.optim(), &t.backend, &t.adam, &t.store, serde_json::to_string(p)?)
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
