//! `vae bench`: kernel and training-step throughput on the chosen device.

use std::path::PathBuf;

use anyhow::{Context, Result};
use vaecuda::backend::Backend;
use vaecuda::bench::{run_report, Roofline};

/// Time every kernel family at the VAE's shapes and a training step per architecture, with
/// the device's measured roofline; prints a table, optionally JSON.
///
/// Examples:
///   vae bench --device cpu --json bench/results/cpu.json
///   vae bench --device cuda --large --reps 200
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Also write the report as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Add the large cases (GEMM 4096³, 64M-element elementwise).
    #[arg(long)]
    large: bool,
    /// Timed calls per kernel (median reported).
    #[arg(long, default_value_t = 50)]
    reps: usize,
    /// Timed training steps per architecture.
    #[arg(long, default_value_t = 10)]
    train_steps: usize,
    /// Time only the training steps, not the kernels (for repeated side-by-side runs).
    #[arg(long)]
    steps_only: bool,
}

pub fn run<B: Backend + Roofline>(be: B, a: Args) -> Result<()> {
    let reps = if a.steps_only { 0 } else { a.reps.max(1) };
    let report = run_report(&be, a.large, reps, a.train_steps.max(1));
    print!("{report}");
    if let Some(path) = a.json {
        super::write_text(&path, &serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
