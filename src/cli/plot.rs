//! `vae plot`: loss curves from a run's metrics.csv.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use vaecuda::image_out::{line_plot, save_png, PALETTE};

/// Plot train and test loss per epoch from metrics.csv (nats per image).
///
/// Example:
///   vae plot runs/mlp               # writes runs/mlp/loss.png
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// A run directory or its metrics.csv.
    #[arg(value_name = "RUN|CSV")]
    metrics: PathBuf,
    /// Output PNG [default: loss.png beside metrics.csv].
    #[arg(long, short)]
    out: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    let csv = if a.metrics.is_dir() { a.metrics.join("metrics.csv") } else { a.metrics.clone() };
    let text = std::fs::read_to_string(&csv).with_context(|| format!("cannot read {}", csv.display()))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split(',').collect();
    let col = |name: &str| {
        header.iter().position(|h| *h == name).with_context(|| format!("{} has no {name} column", csv.display()))
    };
    let (e, tr, te) = (col("epoch")?, col("train_loss")?, col("test_loss")?);
    let (mut train, mut test) = (vec![], vec![]);
    for (i, line) in lines.enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split(',').collect();
        let num = |k: usize| -> Result<f64> {
            match f.get(k).and_then(|v| v.parse().ok()) {
                Some(v) => Ok(v),
                None => bail!("{} line {}: cannot read column {}", csv.display(), i + 2, header[k]),
            }
        };
        train.push((num(e)?, num(tr)?));
        test.push((num(e)?, num(te)?));
    }
    ensure!(!train.is_empty(), "{} has no epochs yet", csv.display());
    let img = line_plot(&[("train", train, PALETTE[0]), ("test", test, PALETTE[1])], 800, 500);
    let out = a.out.unwrap_or_else(|| csv.parent().unwrap_or(Path::new(".")).join("loss.png"));
    save_png(&img, &out)?;
    println!("wrote {}", out.display());
    Ok(())
}
