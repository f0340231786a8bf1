//! `vae bench`: kernel and training-step throughput on the chosen device.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use vaecuda::backend::Backend;
use vaecuda::bench::{run_report, Roofline};
use vaecuda::image_out::save_png;
use vaecuda::model::report::{chart, model_report};
use vaecuda::model::H200;
use vaecuda::Cuda;

/// Time every kernel family at the VAE's shapes and a training step per architecture, with
/// the device's measured roofline; prints a table, optionally JSON. Each training row also
/// counts, per step after four warm-up steps, the page faults of the process and the buffers
/// the backend had to allocate afresh (both 0 when a step reuses its memory; the CPU
/// counts both, a GPU the faults only). With --model h200, price
/// instead one traced training step per architecture on an H200 (modelled, not measured).
///
/// Examples:
///   vae bench --device cpu --json bench/results/cpu.json
///   vae bench --device cuda --large --reps 200
///   vae bench --device emu --model h200 --chart h200.png   # no GPU needed
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
    /// Measure nothing: trace one training step of each architecture on the CUDA backend
    /// (--device emu needs no GPU) and price every launch on this GPU's model (h200), see
    /// src/model/. Every figure printed is modelled.
    #[arg(long, value_name = "GPU")]
    pub model: Option<String>,
    /// Images per traced step (--model).
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Where --model draws its stacked-bar chart (PNG).
    #[arg(long, value_name = "FILE", default_value = "h200-model.png")]
    chart: PathBuf,
}

/// `vae bench --model h200`: the modelled report, its chart and optionally its JSON.
pub fn run_model(be: Cuda<f32>, a: Args) -> Result<()> {
    let machine = match a.model.as_deref() {
        Some("h200") => H200,
        other => bail!("unknown --model {:?}: the model knows h200", other.unwrap_or("")),
    };
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1 (got 0)");
    }
    let report = model_report(&be, machine, a.batch_size)?;
    print!("{report}");
    save_png(&chart(&report)?, &a.chart)?;
    println!("wrote {} (modelled)", a.chart.display());
    if let Some(path) = a.json {
        super::write_text(&path, &serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
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
