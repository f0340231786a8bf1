//! `vae plot`: loss curves from runs' metrics.csv, one run or several on one chart.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use vaecuda::charts::{line_chart, Line, Panel};
use vaecuda::image_out::{save_png, PALETTE};
use vaecuda::run::Metrics;

/// Plot training curves from metrics.csv: train and test loss (−ELBO), and on their own
/// panels the two terms of the training loss, reconstruction and KL divergence (all in nats
/// per image; a KL falling toward 0 is posterior collapse). Several runs go on one chart,
/// one colour each, train solid and test dashed. The PNG is 1500×500.
///
/// Examples:
///   vae plot runs/mlp                       # writes runs/mlp/loss.png
///   vae plot runs/mlp runs/conv --log       # both runs on log axes, writes loss-compare.png
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Run directories, or their metrics.csv files.
    #[arg(value_name = "RUN|CSV", required = true, num_args = 1..)]
    metrics: Vec<PathBuf>,
    /// Log scale on the y axes.
    #[arg(long)]
    log: bool,
    /// Output PNG [default: loss.png beside metrics.csv for one run, loss-compare.png in the
    /// current directory for several].
    #[arg(long, short)]
    out: Option<PathBuf>,
}

/// Chart size, stated in the help.
pub const SIZE: (u32, u32) = (1500, 500);

/// One run's curves and what it is.
struct Run {
    name: String,
    /// "mlp, z = 20, MNIST" when run.json says so.
    what: Option<String>,
    epoch: Vec<f64>,
    train: Vec<f64>,
    test: Vec<f64>,
    recon: Vec<f64>,
    kl: Vec<f64>,
}

fn describe(run_json: &Path) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run_json).ok()?).ok()?;
    let m = v.get("model")?;
    let arch = m.get("arch")?.as_str()?;
    let z = m.get("latent")?.as_u64()?;
    // Source: {"idx": null} is the bundled MNIST, else the data directory's name.
    let data = match v.get("source") {
        Some(serde_json::Value::Object(o)) => match o.values().next() {
            Some(serde_json::Value::Null) | None => "MNIST".to_string(),
            Some(serde_json::Value::String(p)) => name_of(Path::new(p)),
            Some(serde_json::Value::Array(a)) => {
                a.first().and_then(|p| p.as_str()).map_or("images".into(), |p| name_of(Path::new(p)))
            }
            _ => "data".into(),
        },
        _ => "MNIST".to_string(),
    };
    Some(format!("{arch}, z = {z}, {data}"))
}

fn name_of(p: &Path) -> String {
    p.file_name().map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into_owned())
}

fn read_run(path: &Path) -> Result<(PathBuf, Run)> {
    let csv = if path.is_dir() { path.join("metrics.csv") } else { path.to_path_buf() };
    let m = Metrics::read(&csv)?;
    let dir = csv.parent().unwrap_or(Path::new(".")).to_path_buf();
    let col = |name: &str| m.column(name).map(<[f64]>::to_vec).with_context(|| csv.display().to_string());
    let (epoch, train, test, recon, kl) =
        (col("epoch")?, col("train_loss")?, col("test_loss")?, col("recon")?, col("kl")?);
    ensure!(m.rows > 0, "{} has no epochs yet", csv.display());
    let abs = std::fs::canonicalize(&dir).unwrap_or(dir.clone());
    let run = Run { name: name_of(&abs), what: describe(&dir.join("run.json")), epoch, train, test, recon, kl };
    Ok((dir, run))
}

pub fn run(a: Args) -> Result<()> {
    let runs: Vec<(PathBuf, Run)> = a.metrics.iter().map(|p| read_run(p)).collect::<Result<_>>()?;
    let several = runs.len() > 1;
    let xy = |r: &Run, v: &[f64]| r.epoch.iter().copied().zip(v.iter().copied()).collect::<Vec<_>>();
    let label = |r: &Run, what: &str| {
        if !several {
            return what.to_string();
        }
        let desc = r.what.as_deref().map_or(String::new(), |w| format!(" ({w})"));
        if what.is_empty() {
            format!("{}{desc}", r.name)
        } else {
            format!("{}{desc} {what}", r.name)
        }
    };
    let (mut loss, mut recon, mut kl) = (vec![], vec![], vec![]);
    for (i, (_, r)) in runs.iter().enumerate() {
        let (c_train, c_test) = if several { (PALETTE[i % 10], PALETTE[i % 10]) } else { (PALETTE[0], PALETTE[1]) };
        let line = |label: String, pts, color, dashed| Line { label, points: pts, color, dashed };
        loss.push(line(label(r, "train"), xy(r, &r.train), c_train, false));
        loss.push(line(label(r, "test"), xy(r, &r.test), c_test, true));
        recon.push(line(label(r, ""), xy(r, &r.recon), c_train, false));
        kl.push(line(label(r, ""), xy(r, &r.kl), c_train, false));
    }
    let unit = if a.log { "nats per image (log scale)" } else { "nats per image" };
    let panel = |title: &str, lines| Panel { title: title.into(), x_desc: "epoch".into(), y_desc: unit.into(), lines };
    let panels = [
        panel("loss (−ELBO): train solid, test dashed", loss),
        panel("reconstruction term (train)", recon),
        panel("KL divergence term (train)", kl),
    ];
    let title = if several {
        format!("{} runs compared, per epoch", runs.len())
    } else {
        let r = &runs[0].1;
        match &r.what {
            Some(w) => format!("{}: {w}, per epoch", r.name),
            None => format!("{}, per epoch", r.name),
        }
    };
    let img = line_chart(&title, &panels, a.log, SIZE.0, SIZE.1)?;
    let out =
        a.out.unwrap_or_else(|| if several { PathBuf::from("loss-compare.png") } else { runs[0].0.join("loss.png") });
    save_png(&img, &out)?;
    println!("wrote {}", out.display());
    Ok(())
}
