//! `vae sample`: a grid of images decoded from prior samples z ~ N(0, I).

use std::path::PathBuf;

use anyhow::{ensure, Result};
use vaecuda::backend::Backend;
use vaecuda::image_out::{image_grid, save_png};
use vaecuda::rng::Rng;

use super::{out_path, CheckpointArgs};

/// Decode prior samples z ~ N(0, I) into a grid (PNG).
///
/// Example:
///   vae sample --checkpoint runs/mlp --n 64 --cols 8 --out samples.png
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Args {
    #[command(flatten)]
    ckpt: CheckpointArgs,
    /// Number of samples.
    #[arg(long, short, default_value_t = 64)]
    n: usize,
    /// Images per row.
    #[arg(long, default_value_t = 8)]
    cols: usize,
    /// Seed of the prior samples.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output PNG [default: samples.png next to the checkpoint].
    #[arg(long, short)]
    out: Option<PathBuf>,
}

pub fn run<B: Backend>(be: B, a: Args) -> Result<()> {
    ensure!(a.n > 0, "--n must be at least 1");
    let mut l = a.ckpt.load(be)?;
    let c = l.model.vae.config.clone();
    let mut rng = Rng::new(a.seed);
    let z: Vec<f64> = (0..a.n * c.latent).map(|_| rng.normal()).collect();
    let px = l.model.decode(&z);
    let path = out_path(&a.out, &l.dir, "samples.png");
    save_png(&image_grid(&px, a.n, [c.channels, c.height, c.width], a.cols, 2), &path)?;
    println!("wrote {}", path.display());
    Ok(())
}
