//! `vae reconstruct`: test images above their reconstructions.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Result};
use vaecuda::backend::Backend;
use vaecuda::charts::annotate_grid;
use vaecuda::data::DeviceData;
use vaecuda::image_out::{image_grid, save_png};
use vaecuda::nn::Vae;
use vaecuda::tape::{ParamStore, Tape};
use vaecuda::Float;

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
    let dev = DeviceData::upload(&l.model.backend, &test);
    let path = out_path(&a.out, &l.dir, "reconstructions.png");
    let caption =
        format!("test images {}–{}: input above, reconstruction (decoded μ) below", a.first, a.first + a.n - 1);
    let m = &mut l.model;
    draw(&m.backend, &m.vae, &mut m.store, &dev, &idx, &caption, &path)?;
    println!("wrote {}", path.display());
    Ok(())
}

/// Draws the images `idx` of `data` (top row, "input") above their reconstructions (decoded
/// latent means through the model's output activation, bottom row, "output"), under
/// `caption`, into the PNG `path`. In eval mode; records nothing. `vae train
/// --epoch-reconstructions` draws one after every epoch.
pub fn draw<B: Backend>(
    be: &B,
    vae: &Vae,
    store: &mut ParamStore<B>,
    data: &DeviceData<B>,
    idx: &[usize],
    caption: &str,
    path: &Path,
) -> Result<()> {
    let c = &vae.config;
    let idx32: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
    let x = data.batch(be, &idx32);
    let mut px: Vec<f32> = x.to_host(be).iter().map(|v| v.f64() as f32).collect();
    let mut tape = Tape::no_grad(be, store);
    let xv = tape.input(x);
    let (mu, _) = vae.encode(&mut tape, xv);
    let y = vae.decode(&mut tape, mu);
    px.extend(tape.to_host(y).iter().map(|v| v.f64() as f32));
    let n = idx.len();
    let grid = image_grid(&px, 2 * n, [c.channels, c.height, c.width], n, 2);
    let row = |r: usize| (2 + r * (c.height + 2) + c.height / 2) as u32;
    save_png(&annotate_grid(&grid, &[caption], &[], &[("input", row(0)), ("output", row(1))])?, path)
}
