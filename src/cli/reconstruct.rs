//! `vae reconstruct`: test images above their reconstructions.

use std::path::PathBuf;

use anyhow::{ensure, Result};
use vaecuda::backend::Backend;
use vaecuda::data::DeviceData;
use vaecuda::image_out::{image_grid, save_png};

use super::{out_path, CheckpointArgs};

/// Test images (top row) above their reconstructions (decoded latent means, bottom row).
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
    save_png(&image_grid(&px, 2 * a.n, [c.channels, c.height, c.width], a.n, 2), &path)?;
    println!("wrote {}", path.display());
    Ok(())
}
