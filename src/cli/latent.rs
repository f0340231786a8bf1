//! `vae latent`: test-set latent means as a scatter plot (PCA when z > 2) and a CSV.

use std::path::PathBuf;

use anyhow::{ensure, Result};
use vaecuda::backend::Backend;
use vaecuda::data::DeviceData;
use vaecuda::eval::pca2;
use vaecuda::image_out::{save_png, scatter_plot, PALETTE};

use super::{out_path, write_text, CheckpointArgs};

/// Encode the test set and plot the latent means, coloured by label (projected on the top
/// two principal components when the latent has more than 2 dimensions). Also writes a CSV:
/// index,label,z1..zZ,x,y (x, y: the plotted coordinates).
///
/// Example:
///   vae latent --checkpoint runs/mlp --limit-test 5000
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Args {
    #[command(flatten)]
    ckpt: CheckpointArgs,
    /// Output PNG [default: latent.png next to the checkpoint]; the CSV goes beside it
    /// (same name, .csv).
    #[arg(long, short)]
    out: Option<PathBuf>,
}

pub fn run<B: Backend>(be: B, a: Args) -> Result<()> {
    let mut l = a.ckpt.load(be)?;
    let c = l.model.vae.config.clone();
    ensure!(c.latent >= 2, "latent needs at least 2 latent dimensions; this model has {}", c.latent);
    let test = a.ckpt.test_data(&c)?;
    let dev = DeviceData::upload(&l.model.backend, &test);
    let mu = l.model.encode_all(&dev, 256);
    let xy = pca2(&mu, test.len, c.latent);
    let labels = test.labels.clone();
    let label = |i: usize| labels.as_ref().map(|l| l[i] as usize);
    let pts: Vec<(f64, f64, [u8; 3])> =
        xy.iter().enumerate().map(|(i, p)| (p[0], p[1], PALETTE[label(i).unwrap_or(0) % PALETTE.len()])).collect();
    let png = out_path(&a.out, &l.dir, "latent.png");
    save_png(&scatter_plot(&pts, 800, 800), &png)?;
    let mut csv = String::from("index,label");
    for j in 1..=c.latent {
        csv += &format!(",z{j}");
    }
    csv += ",x,y\n";
    for (i, p) in xy.iter().enumerate() {
        csv += &format!("{i},{}", label(i).map_or(String::new(), |l| l.to_string()));
        for v in &mu[i * c.latent..(i + 1) * c.latent] {
            csv += &format!(",{v:.6}");
        }
        csv += &format!(",{:.6},{:.6}\n", p[0], p[1]);
    }
    let csv_path = png.with_extension("csv");
    write_text(&csv_path, &csv)?;
    let how = if c.latent == 2 { "latent means" } else { "top two principal components of the latent means" };
    println!("wrote {} ({how}) and {}", png.display(), csv_path.display());
    Ok(())
}
