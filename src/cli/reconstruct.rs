//! `vae reconstruct`: test images above their reconstructions.

use std::path::PathBuf;

use anyhow::{ensure, Result};
use vaecuda::backend::Backend;
use vaecuda::charts::annotate_grid;
use vaecuda::data::DeviceData;
use vaecuda::image_out::{image_grid, save_png};

use super::{out_path, CheckpointArgs};

/// Test images (top row, labelled "input") above their reconstructions (decoded latent
/// means, bottom row, "output"), under a caption line. The PNG is the image grid
/// (n·(W+2)+2 by 2·(H+2)+2 pixels) with a 70-pixel label column at its left and a 26-pixel
/// caption band above, at least 480 pixels wide.
///
/// Example:
///   vae reconstruct --checkpoint runs/mlp --n 10
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Args {
    #[command(flatten)]
    ckpt: CheckpointArgs,
    /// Number of test images (the first ones, from --first).
    #[arg(long, short, default_value_t = 8)]
    n: usize,
    /// Index of the first test image.
    #[arg(long, default_value_t = 0)]
    first: usize,
    /// Output PNG [default: reconstructions.png next to the checkpoint].
    #[arg(long, short)]
    out: Option<PathBuf>,
}

pub fn run<B: Backend>(be: B, a: Args) -> Result<()> {
    ensure!(a.n > 0, "--n must be at least 1");
    let mut l = a.ckpt.load(be)?;
    let c = l.model.vae.config.clone();
    let test = a.ckpt.test_data(&c)?;
    ensure!(
        a.first + a.n <= test.len,
        "--first {} --n {} needs {} test images; there are {}",
        a.first,
        a.n,
        a.first + a.n,
        test.len
    );
    let idx: Vec<usize> = (a.first..a.first + a.n).collect();
    let originals = test.gather(&idx);
    let dev = DeviceData::upload(&l.model.backend, &test);
    let idx32: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
    let (mu, _) = l.model.encode(dev.batch(&l.model.backend, &idx32));
    let mut px = originals;
    px.extend(l.model.decode(&mu));
    let path = out_path(&a.out, &l.dir, "reconstructions.png");
    let grid = image_grid(&px, 2 * a.n, [c.channels, c.height, c.width], a.n, 2);
    let caption =
        format!("test images {}–{}: input above, reconstruction (decoded μ) below", a.first, a.first + a.n - 1);
    let row = |r: usize| (2 + r * (c.height + 2) + c.height / 2) as u32;
    save_png(&annotate_grid(&grid, &[&caption], &[], &[("input", row(0)), ("output", row(1))])?, &path)?;
    println!("wrote {}", path.display());
    Ok(())
}
