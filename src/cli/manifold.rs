//! `vae manifold`: the decoder over a grid of a 2-D latent space.

use std::path::PathBuf;

use anyhow::{ensure, Result};
use vaecuda::backend::Backend;
use vaecuda::charts::annotate_grid;
use vaecuda::eval::normal_quantile;
use vaecuda::image_out::{image_grid, save_png};

use super::{out_path, CheckpointArgs};

/// Decode an N×N grid of z placed at the standard normal's quantiles 0.05..0.95, or evenly
/// over [−R, R] with --range R (z₁ left to right, z₂ bottom to top); a model with more than
/// two latents keeps the others at 0. A caption line above and two below say so. The PNG is
/// the grid (n·W by n·H pixels) with a 26-pixel band above and a 46-pixel band below, at
/// least 480 pixels wide.
///
/// Examples:
///   vae train --latent 2 --out runs/z2 && vae manifold --checkpoint runs/z2 --n 20
///   vae manifold --checkpoint runs/mnist-conv-bn --range 2 --n 10   # the MNIST tutorial's grid
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Args {
    #[command(flatten)]
    ckpt: CheckpointArgs,
    /// Grid points per side.
    #[arg(long, short, default_value_t = 20)]
    n: usize,
    /// Place the grid evenly over [−R, R]² instead of at the normal's 5%–95% quantiles.
    #[arg(long, value_name = "R")]
    range: Option<f64>,
    /// Output PNG [default: manifold.png next to the checkpoint].
    #[arg(long, short)]
    out: Option<PathBuf>,
}

pub fn run<B: Backend>(be: B, a: Args) -> Result<()> {
    ensure!(a.n >= 2, "--n must be at least 2");
    let mut l = a.ckpt.load(be)?;
    let c = l.model.vae.config.clone();
    ensure!(
        c.latent >= 2,
        "manifold needs a model with at least 2 latent dimensions; this one has {} (train one with --latent 2)",
        c.latent
    );
    if let Some(r) = a.range {
        ensure!(r.is_finite() && r > 0.0, "--range must be a positive number (got {r})");
    }
    let at = |i: usize| i as f64 / (a.n - 1) as f64;
    let q: Vec<f64> = match a.range {
        Some(r) => (0..a.n).map(|i| -r + 2.0 * r * at(i)).collect(),
        None => (0..a.n).map(|i| normal_quantile(0.05 + 0.9 * at(i))).collect(),
    };
    let zd = c.latent;
    let mut z = vec![0.0; a.n * a.n * zd];
    for row in 0..a.n {
        for col in 0..a.n {
            let k = (row * a.n + col) * zd;
            (z[k], z[k + 1]) = (q[col], q[a.n - 1 - row]);
        }
    }
    let px = l.model.decode(&z);
    let path = out_path(&a.out, &l.dir, "manifold.png");
    let grid = image_grid(&px, a.n * a.n, [c.channels, c.height, c.width], a.n, 0);
    let above = format!("the decoder over a {0}×{0} grid of the 2-D latent space ({1})", a.n, c.arch.name());
    let (lo, hi) = (q[0], q[a.n - 1]);
    let across = format!("across: z₁ from {lo:.2} (left) to {hi:.2} (right)");
    let spacing = if a.range.is_some() { "evenly spaced" } else { "N(0, 1) quantiles 5%–95%" };
    let rest = if zd > 2 { format!("; z₃…z{zd} = 0") } else { String::new() };
    let down = format!("down: z₂ from {hi:.2} (top) to {lo:.2} (bottom); {spacing}{rest}");
    save_png(&annotate_grid(&grid, &[&above], &[&across, &down], &[])?, &path)?;
    println!("wrote {}", path.display());
    Ok(())
}
