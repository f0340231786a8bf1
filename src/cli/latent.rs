//! `vae latent`: test-set latent means as a labelled scatter plot (PCA or t-SNE when z > 2)
//! and a CSV.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Result};
use vaecuda::backend::Backend;
use vaecuda::charts::scatter_chart;
use vaecuda::data::DeviceData;
use vaecuda::eval::pca2;
use vaecuda::image_out::{save_png, Color, PALETTE};
use vaecuda::tsne::{tsne2, TsneOptions};

use super::{out_path, write_text, CheckpointArgs};

/// How latents of more than 2 dimensions are brought to the plane.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// The latent itself when z = 2, else PCA.
    Auto,
    /// The top two principal components (linear, fast; distances mean something).
    Pca,
    /// t-SNE (Barnes-Hut): neighbourhoods kept, clusters visible; distances between
    /// clusters and their sizes mean little. About 11 s for 10,000 points on a 2-core VM.
    Tsne,
}

/// Encode the test set and plot the latent means, coloured by label with a legend naming
/// each colour (digits for MNIST, class names for Fashion-MNIST, an image folder's class subfolders, or
/// from a classes.txt in the data directory, one name per line; one colour when the data has no labels). Latents of
/// more than 2 dimensions are projected with PCA or t-SNE (--method). The PNG is 1000×820.
/// Also writes a CSV beside it: index,label,z1..zZ,x,y (x, y: the plotted coordinates).
///
/// Examples:
///   vae latent --checkpoint runs/mlp --limit-test 5000
///   vae latent --checkpoint runs/mlp --method tsne --perplexity 30 --seed 1
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Args {
    #[command(flatten)]
    ckpt: CheckpointArgs,
    /// Projection to 2-D for latents with more than 2 dimensions.
    #[arg(long, value_enum, default_value_t = Method::Auto)]
    method: Method,
    /// t-SNE perplexity: the effective number of neighbours each point keeps (5–50).
    #[arg(long, default_value_t = 30.0)]
    perplexity: f64,
    /// t-SNE gradient-descent iterations.
    #[arg(long, default_value_t = 1000)]
    iterations: usize,
    /// t-SNE seed (the initial layout).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output PNG [default: latent.png next to the checkpoint]; the CSV goes beside it
    /// (same name, .csv).
    #[arg(long, short)]
    out: Option<PathBuf>,
}

/// Chart size, stated in the help.
pub const SIZE: (u32, u32) = (1000, 820);

const FASHION: [&str; 10] =
    ["T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"];

/// The data's name, its legend title and class names for labels 0..n.
fn classes(data: Option<&Path>, n: usize) -> (String, &'static str, Vec<String>) {
    let Some(dir) = data else {
        return ("MNIST".into(), "digit", (0..n).map(|k| k.to_string()).collect());
    };
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|d| d.file_name().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| dir.display().to_string());
    if let Ok(text) = std::fs::read_to_string(dir.join("classes.txt")) {
        let names: Vec<String> = text.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect();
        let names = (0..n).map(|k| names.get(k).cloned().unwrap_or_else(|| format!("class {k}"))).collect();
        return (name, "class", names);
    }
    let lower = name.to_lowercase();
    if lower.contains("fashion") {
        return (
            name,
            "class",
            (0..n).map(|k| FASHION.get(k).map_or(format!("class {k}"), |s| s.to_string())).collect(),
        );
    }
    if lower.contains("mnist") && !lower.contains("kmnist") {
        return (name, "digit", (0..n).map(|k| k.to_string()).collect());
    }
    (name, "class", (0..n).map(|k| format!("class {k}")).collect())
}

pub fn run<B: Backend>(be: B, a: Args) -> Result<()> {
    let mut l = a.ckpt.load(be)?;
    let c = l.model.vae.config.clone();
    ensure!(c.latent >= 2, "latent needs at least 2 latent dimensions; this model has {}", c.latent);
    ensure!(a.perplexity > 0.0, "--perplexity must be positive");
    ensure!(a.iterations >= 1, "--iterations must be at least 1");
    let test = a.ckpt.test_data(&c)?;
    let dev = DeviceData::upload(&l.model.backend, &test);
    let mu = l.model.encode_all(&dev, 256);
    let (xy, axes, how) = match a.method {
        Method::Auto | Method::Pca if c.latent == 2 => {
            (pca2(&mu, test.len, 2), ("z₁", "z₂"), "latent means".to_string())
        }
        Method::Auto | Method::Pca => (
            pca2(&mu, test.len, c.latent),
            ("principal component 1", "principal component 2"),
            format!("PCA of {}-D latent means", c.latent),
        ),
        Method::Tsne => {
            let bar = super::progress_bar(a.iterations as u64, "t-SNE", "iterations");
            let o =
                TsneOptions { perplexity: a.perplexity, iterations: a.iterations, seed: a.seed, ..Default::default() };
            let most = (test.len.max(1) - 1) as f64 / 3.0;
            if a.perplexity > most {
                eprintln!("note: --perplexity {} is too large for {} points; using {most:.1}", a.perplexity, test.len);
            }
            let start = std::time::Instant::now();
            let y = tsne2(&mu, test.len, c.latent, o, |i| bar.set_position(i as u64));
            bar.finish_and_clear();
            eprintln!(
                "t-SNE: {} points, {} iterations in {:.1} s",
                test.len,
                a.iterations,
                start.elapsed().as_secs_f64()
            );
            let how = format!("t-SNE of {}-D latent means (perplexity {}, seed {})", c.latent, a.perplexity, a.seed);
            (y, ("t-SNE 1", "t-SNE 2"), how)
        }
    };
    let (data_name, legend_title, mut names) = classes(a.ckpt.data.data.as_deref(), 10);
    // An ImageFolder's labels are its subfolders: their names name the colours.
    if !test.classes.is_empty() {
        names.clone_from(&test.classes);
    }
    let labels: Option<Vec<usize>> = test.labels.as_ref().map(|l| l.iter().map(|&v| v as usize).collect());
    let n_classes = labels.as_ref().map_or(1, |l| l.iter().max().map_or(1, |m| m + 1));
    let class_list: Vec<(String, Color)> = match &labels {
        Some(_) => (0..n_classes)
            .map(|k| {
                let name = names.get(k).cloned().unwrap_or_else(|| format!("{legend_title} {k}"));
                (name, PALETTE[k % PALETTE.len()])
            })
            .collect(),
        None => vec![("test image".into(), PALETTE[0])],
    };
    let pts: Vec<(f64, f64, usize)> =
        xy.iter().enumerate().map(|(i, p)| (p[0], p[1], labels.as_ref().map_or(0, |l| l[i]))).collect();
    let title = format!("{how}: {} test images, {}, z = {}, {data_name}", test.len, c.arch.name(), c.latent);
    let png = out_path(&a.out, &l.dir, "latent.png");
    let img = scatter_chart(&title, axes.0, axes.1, &pts, &class_list, legend_title, SIZE.0, SIZE.1)?;
    save_png(&img, &png)?;
    let mut csv = String::from("index,label");
    for j in 1..=c.latent {
        csv += &format!(",z{j}");
    }
    csv += ",x,y\n";
    for (i, p) in xy.iter().enumerate() {
        csv += &format!("{i},{}", labels.as_ref().map_or(String::new(), |l| l[i].to_string()));
        for v in &mu[i * c.latent..(i + 1) * c.latent] {
            csv += &format!(",{v:.6}");
        }
        csv += &format!(",{:.6},{:.6}\n", p[0], p[1]);
    }
    let csv_path = png.with_extension("csv");
    write_text(&csv_path, &csv)?;
    println!("wrote {} ({how}) and {}", png.display(), csv_path.display());
    Ok(())
}
