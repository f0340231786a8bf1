//! `vae interpolate`: a row of decodes along the line between two test images' latent means.

use std::path::PathBuf;

use anyhow::{ensure, Result};
use vaecuda::backend::Backend;
use vaecuda::charts::annotate_grid;
use vaecuda::data::DeviceData;
use vaecuda::image_out::{image_grid, save_png};

use super::{out_path, CheckpointArgs};

/// Walk in latent space between two test images: the first original, decodes of
/// (1−t)·μ_a + t·μ_b for t = 0..1, then the second original; a caption line above and one
/// below say so. The PNG is the image row ((steps+2)·(W+2)+2 by H+4 pixels) with 26-pixel
/// caption bands above and below, at least 480 pixels wide.
///
/// Example:
///   vae interpolate --checkpoint runs/mlp --from 0 --to 1 --steps 10
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Args {
    #[command(flatten)]
    ckpt: CheckpointArgs,
    /// Index of the start test image.
    #[arg(long, default_value_t = 0)]
    from: usize,
    /// Index of the end test image.
    #[arg(long, default_value_t = 1)]
    to: usize,
    /// Decoded points along the line (both ends included).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Output PNG [default: interpolation.png next to the checkpoint].
    #[arg(long, short)]
    out: Option<PathBuf>,
}

pub fn run<B: Backend>(be: B, a: Args) -> Result<()> {
    ensure!(a.steps >= 2, "--steps must be at least 2");
    let mut l = a.ckpt.load(be)?;
    let c = l.model.vae.config.clone();
    let test = a.ckpt.test_data(&c)?;
    ensure!(a.from.max(a.to) < test.len, "test image {} does not exist ({} test images)", a.from.max(a.to), test.len);
    let dev = DeviceData::upload(&l.model.backend, &test);
    let (mu, _) = l.model.encode(dev.batch(&l.model.backend, &[a.from as u32, a.to as u32]));
    let (za, zb) = mu.split_at(c.latent);
    let z: Vec<f64> = (0..a.steps)
        .flat_map(|s| {
            let t = s as f64 / (a.steps - 1) as f64;
            za.iter().zip(zb).map(move |(p, q)| (1.0 - t) * p + t * q)
        })
        .collect();
    let mut px = test.image(a.from);
    px.extend(l.model.decode(&z));
    px.extend_from_slice(&test.image(a.to));
    let n = a.steps + 2;
    let path = out_path(&a.out, &l.dir, "interpolation.png");
    let grid = image_grid(&px, n, [c.channels, c.height, c.width], n, 2);
    let above = format!("a walk in latent space: test image {} (left) to test image {} (right)", a.from, a.to);
    let below = format!("between them: decodes of (1−t)·μ₁ + t·μ₂, t = 0 … 1 in {} steps", a.steps);
    save_png(&annotate_grid(&grid, &[&above], &[&below], &[])?, &path)?;
    println!("wrote {}", path.display());
    Ok(())
}
