//! `vae manifold`: the decoder over a grid of a 2-D latent space.

use std::path::PathBuf;

use anyhow::{ensure, Result};
use vaecuda::backend::Backend;
use vaecuda::charts::annotate_grid;
use vaecuda::eval::normal_quantile;
use vaecuda::image_out::{image_grid, save_png};

use super::{out_path, CheckpointArgs};

/// For a model with a 2-D latent: decode an N×N grid of z placed at the standard normal's
/// quantiles 0.05..0.95 (z₁ left to right, z₂ bottom to top); a caption line above and two
/// below say so. The PNG is the grid (n·W by n·H pixels) with a 26-pixel band above and a
/// 46-pixel band below, at least 480 pixels wide.
///
/// Example:
///   vae train --latent 2 --out runs/z2 && vae manifold --checkpoint runs/z2 --n 20
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Args {
    #[command(flatten)]
    ckpt: CheckpointArgs,
    /// Grid points per side.
    #[arg(long, short, default_value_t = 20)]
    n: usize,
    /// Output PNG [default: manifold.png next to the checkpoint].
    #[arg(long, short)]
    out: Option<PathBuf>,
}

pub fn run<B: Backend>(be: B, a: Args) -> Result<()> {
    ensure!(a.n >= 2, "--n must be at least 2");
    let mut l = a.ckpt.load(be)?;
    let c = l.model.vae.config.clone();
    ensure!(
        c.latent == 2,
        "manifold needs a model with a 2-D latent space; this one has {} dimensions (train one with --latent 2)",
        c.latent
    );
    let q: Vec<f64> = (0..a.n).map(|i| normal_quantile(0.05 + 0.9 * i as f64 / (a.n - 1) as f64)).collect();
    let z: Vec<f64> =
        (0..a.n).flat_map(|row| (0..a.n).flat_map(|col| [q[col], q[a.n - 1 - row]]).collect::<Vec<_>>()).collect();
    let px = l.model.decode(&z);
    let path = out_path(&a.out, &l.dir, "manifold.png");
    let grid = image_grid(&px, a.n * a.n, [c.channels, c.height, c.width], a.n, 0);
    let above = format!("the decoder over a {0}×{0} grid of the 2-D latent space ({1})", a.n, c.arch.name());
    let (lo, hi) = (q[0], q[a.n - 1]);
    let across = format!("across: z₁ from {lo:.2} (left) to {hi:.2} (right)");
    let down = format!("down: z₂ from {hi:.2} (top) to {lo:.2} (bottom); N(0, 1) quantiles 5%–95%");
    save_png(&annotate_grid(&grid, &[&above], &[&across, &down], &[])?, &path)?;
    println!("wrote {}", path.display());
    Ok(())
}
