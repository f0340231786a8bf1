//! The `vae` command line: one file per subcommand, plus what they share here (device choice,
//! data, model and checkpoint flags, the errors that are not failures).

mod bench;
mod eval;
mod interpolate;
mod latent;
mod manifold;
mod plot;
pub mod recipes;
mod reconstruct;
mod sample;
mod train;

use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use vaecuda::backend::cuda::{self, Cuda, GpuError};
use vaecuda::backend::{Backend, Precision, Recon};
use vaecuda::checkpoint::load_model;
use vaecuda::data::Source;
use vaecuda::eval::Model;
use vaecuda::nn::{Arch, ModelConfig, OutputActivation, ParamNames};
use vaecuda::run::ReconLoss;
use vaecuda::Cpu;

const ABOUT: &str = "Train, evaluate and look at variational autoencoders (CPU, or CUDA GPUs).";

const LONG_ABOUT: &str = "\
Train, evaluate and look at variational autoencoders (CPU, or CUDA GPUs).

Without flags, `vae train` trains the pytorch/examples MLP VAE on the MNIST copy bundled with
the sources (checked against data/mnist/SHA256SUMS) and writes runs/<arch>-<UTC time>/:
metrics.csv, last.safetensors, best.safetensors (PyTorch state_dict names, loadable with
safetensors.torch.load_file + load_state_dict), optim-last.safetensors and run.json.

Examples:
  vae train                                   # MLP VAE, 10 epochs, bundled MNIST
  vae train --recipe list                     # the tutorials' settings, one recipe each
  vae train --recipe celeba --data ~/celeba --out runs/celeba
  vae train --out runs/celeba --resume --epochs 30
  vae eval --checkpoint runs/mlp --iw 100     # −ELBO and importance-weighted −log p(x)
  vae sample --checkpoint runs/mlp            # writes runs/mlp/samples.png
  vae plot runs/mlp                           # loss curves from runs/mlp/metrics.csv
  vae bench --device cpu --json bench.json";

/// Runs `$body` with `$be` bound to the concrete backend inside `$opened`.
macro_rules! with_backend {
    ($opened:expr, $be:ident => $body:expr) => {
        match $opened {
            Opened::Cpu($be) => $body,
            Opened::Cuda($be) => $body,
        }
    };
}

#[derive(Parser, Debug)]
#[command(name = "vae", version, about = ABOUT, long_about = LONG_ABOUT)]
pub struct Cli {
    /// Where to compute: auto (the first GPU when there is one, else the CPU), cpu, cuda,
    /// cuda:N, or emu: the CUDA kernels run on the CPU by the emulated device (slow; for
    /// studying and testing the kernels without a GPU, see kernels/README.md).
    #[arg(long, global = true, default_value = "auto", value_name = "DEVICE")]
    device: DeviceChoice,
    /// Precision of the matrix products (linear layers and convolutions): f32, or tf32/bf16
    /// as tensor cores round their operands (products summed in f32). On a GPU (and the
    /// emulated device) tf32 and bf16 run the products on the tensor cores; on the CPU they
    /// are emulated, operands rounded then multiplied exactly, to measure their quality
    /// without a GPU (slower than f32). The default is f32 because it is exact: a run's
    /// numbers do not depend on the precision a device happens to offer. (PyTorch runs
    /// convolutions in TF32 by default; here TF32 stays opt-in until its quality is shown
    /// within 0.3 nats of f32, where two seeds so far gave +0.56 and -0.80 after 10 conv
    /// epochs; the modelled H200 prices a TF32 conv step 22% under f32's: bench/results/.)
    #[arg(long, global = true, value_enum, default_value_t = Precision::F32)]
    precision: Precision,
    /// Run every step eagerly, one kernel launch at a time. By default a GPU step (training or
    /// evaluation) whose batch shape repeats is captured as one CUDA graph the second time and
    /// replayed after that: one launch per step instead of about a hundred, with results equal
    /// to the bit. Turn graphs off to debug or profile kernel by kernel. (No effect on the CPU.)
    #[arg(long, global = true)]
    no_graph: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    Train(train::Args),
    Eval(eval::Args),
    Sample(sample::Args),
    Reconstruct(reconstruct::Args),
    Interpolate(interpolate::Args),
    Manifold(manifold::Args),
    Latent(latent::Args),
    Plot(plot::Args),
    Bench(bench::Args),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        // Plotting a CSV needs no device.
        Command::Plot(a) => plot::run(a),
        // The model prices the CUDA backend's launches: a GPU or the emulated device.
        Command::Bench(a) if a.model.is_some() => match open_device(cli.device, cli.precision, !cli.no_graph)? {
            Opened::Cuda(be) => {
                eprintln!("device: {}", be.describe());
                bench::run_model(be, a)
            }
            Opened::Cpu(_) => bail!(
                "--model traces the CUDA backend's launches: use --device emu (the kernels on the CPU, no GPU needed) or --device cuda"
            ),
        },
        command => {
            let opened = open_device(cli.device, cli.precision, !cli.no_graph)?;
            with_backend!(opened, be => {
                // The bench report starts with its own device line.
                if !matches!(command, Command::Bench(_)) {
                    eprintln!("device: {}", be.describe());
                }
                match command {
                    Command::Train(a) => train::run(be, a),
                    Command::Eval(a) => eval::run(be, a),
                    Command::Sample(a) => sample::run(be, a),
                    Command::Reconstruct(a) => reconstruct::run(be, a),
                    Command::Interpolate(a) => interpolate::run(be, a),
                    Command::Manifold(a) => manifold::run(be, a),
                    Command::Latent(a) => latent::run(be, a),
                    Command::Bench(a) => bench::run(be, a),
                    Command::Plot(_) => unreachable!(),
                }
            })
        }
    }
}

// ---- devices ----

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda(usize),
    /// The emulated CUDA device (`cuda::emu`).
    Emu,
}

impl FromStr for DeviceChoice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda(0)),
            "emu" => Ok(DeviceChoice::Emu),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| anyhow::anyhow!("unknown device {s:?} (expected auto, cpu, cuda, cuda:N or emu)")),
        }
    }
}

/// An opened backend. Everything below `run` is generic over `B: Backend`; this enum and
/// [`with_backend!`] are the only places that name concrete backends.
pub enum Opened {
    Cpu(Cpu<f32>),
    Cuda(Cuda<f32>),
}

fn open_device(choice: DeviceChoice, precision: Precision, graphs: bool) -> Result<Opened> {
    Ok(match open_backend(choice, precision)? {
        // TF32 and BF16 run the CUDA engine's matrix products on the tensor cores.
        Opened::Cuda(gpu) => Opened::Cuda(gpu.with_precision(precision).with_graphs(graphs)),
        cpu => cpu,
    })
}

fn open_backend(choice: DeviceChoice, precision: Precision) -> Result<Opened> {
    match choice {
        DeviceChoice::Cpu => Ok(Opened::Cpu(Cpu::with_precision(precision))),
        DeviceChoice::Cuda(n) => open_cuda(n).map_err(|e| anyhow::anyhow!("cannot use cuda:{n}: {e}")),
        DeviceChoice::Emu => cuda::emu::install()
            .and_then(|()| open_cuda(0))
            .map_err(|e| anyhow::anyhow!("cannot use the emulated device: {e}")),
        // Only a missing GPU, driver or NVRTC means "use the CPU": kernels that fail to
        // compile or a driver error are bugs to report, not reasons to run elsewhere.
        DeviceChoice::Auto => match open_cuda(0) {
            Ok(o) => Ok(o),
            Err(GpuError::Unavailable(why)) => {
                eprintln!("note: no usable GPU, using the CPU: {why}");
                Ok(Opened::Cpu(Cpu::with_precision(precision)))
            }
            Err(e) => Err(anyhow::anyhow!("the GPU could not be used: {e}")),
        },
    }
}

/// The one place that opens a GPU (or the emulated device, once installed). `probe` never
/// panics (cudarc does when libcuda or libnvrtc is missing, so it checks for them first) and
/// its error says what to install.
fn open_cuda(ordinal: usize) -> Result<Opened, GpuError> {
    // The first open on a machine compiles every kernel through NVRTC (seconds); later opens
    // load the cached CUBINs. Saying how long it took explains a slow first start.
    let start = std::time::Instant::now();
    let gpu = cuda::open::<f32>(ordinal)?;
    // All of them now, so a kernel that does not compile stops `vae` before it starts work.
    gpu.load_all_kernels()?;
    eprintln!(
        "kernels: ready in {:.2} s (NVRTC compiles on first use, then loads from the disk cache)",
        start.elapsed().as_secs_f64()
    );
    Ok(Opened::Cuda(gpu))
}

// ---- flags shared by several subcommands ----

#[derive(clap::Args, Debug, Clone)]
pub struct DataArgs {
    /// A directory with the four IDX files (train-images-idx3-ubyte[.gz], train-labels-...,
    /// t10k-images-..., t10k-labels-...; e.g. Fashion-MNIST) or a folder of images (png/jpg,
    /// searched recursively): CelebA as torchvision leaves it (img_align_celeba/ and
    /// list_eval_partition.txt), class subfolders (ImageFolder: the names become labels), or
    /// any folder (the last 10% by name are the test set). Images are decoded once and cached
    /// (~/.cache/vaecuda/data; VAECUDA_DATA_CACHE=off turns it off). Default: the bundled
    /// MNIST.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Side of the square that folder images are center-cropped and resized to (RGB), 1 to
    /// 4096.
    #[arg(long, default_value_t = 64, value_name = "PIXELS")]
    image_size: usize,
    /// Use only the first N training images.
    #[arg(long, value_name = "N")]
    limit_train: Option<usize>,
    /// Use only the first N test images.
    #[arg(long, value_name = "N")]
    limit_test: Option<usize>,
    /// Cut the centred PIXELS×PIXELS square of each folder image before resizing, as
    /// torchvision's CenterCrop (the CelebA tutorial: --crop 168) [default: the largest
    /// centred square].
    #[arg(long, value_name = "PIXELS")]
    crop: Option<usize>,
    /// Which CelebA images train: the partition file's training set, or all of them in
    /// file-name order as the CelebA tutorial does (the test set is evaluated either way).
    #[arg(long, value_enum, default_value_t = CelebaTrain::Partition)]
    celeba_train: CelebaTrain,
}

/// `--celeba-train`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CelebaTrain {
    /// The partition file's training set (162,770 images)
    Partition,
    /// Every image, in file-name order (202,599: the tutorial's dataset)
    All,
}

impl DataArgs {
    /// Whether --data names a directory (IDX files or images) rather than the bundled MNIST.
    fn is_folder(&self) -> bool {
        self.data.is_some()
    }

    /// The data source, after refusing nonsense values of the data flags.
    fn source(&self) -> Result<Source> {
        for (flag, v) in [("--limit-train", self.limit_train), ("--limit-test", self.limit_test)] {
            if v == Some(0) {
                bail!("{flag} 0 leaves no images: give at least 1, or leave the flag out to use them all");
            }
        }
        let options =
            vaecuda::data::FolderOptions { crop: self.crop, train_on_all: self.celeba_train == CelebaTrain::All };
        vaecuda::data::Source::detect(self.data.as_deref(), self.image_size, options)
    }
}

/// A command stopped on request (Ctrl-C): not a failure, but not done either. Its text says
/// how to continue; `main` prints it as it is and exits with 130, as shells expect.
#[derive(Debug)]
pub struct Interrupted(pub String);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Interrupted {}

#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Architecture: mlp (pytorch/examples), conv (the tutorials' conv VAE), conv-bn
    /// (PyTorch-VAE's VanillaVAE with batch norm) or conv-bn-mnist (the conv + batch-norm
    /// MNIST tutorial's network).
    #[arg(long, value_enum, default_value_t = Arch::Mlp)]
    arch: Arch,
    /// Latent dimensions.
    #[arg(long, default_value_t = 20, value_name = "Z")]
    latent: usize,
    /// Hidden width of the mlp.
    #[arg(long, default_value_t = 400, value_name = "H")]
    hidden: usize,
    /// Channel widths of the conv-bn blocks, comma-separated.
    // Set, not clap's default Append for lists: a --hiddens given besides a recipe replaces
    // the recipe's widths rather than adding to them.
    #[arg(long, default_value = "32,64,128", value_delimiter = ',', value_name = "C,C,..", action = clap::ArgAction::Set)]
    hiddens: Vec<usize>,
    /// What turns the decoder's last layer into pixels: sigmoid (for --recon bce), relu (the
    /// CelebA tutorial's last layer) or none; relu and none need --recon mse.
    #[arg(long, value_enum, default_value_t = OutputActivation::Sigmoid)]
    output_activation: OutputActivation,
    /// Whose parameter names a conv-bn model's tensors carry, so its checkpoints load strictly
    /// into that project's model: vanilla-vae (PyTorch-VAE) or dldemos (the CelebA tutorial).
    #[arg(long, value_enum, default_value_t = ParamNames::VanillaVae)]
    param_names: ParamNames,
}

impl ModelArgs {
    fn config(&self, shape: [usize; 3]) -> ModelConfig {
        ModelConfig {
            arch: self.arch,
            channels: shape[0],
            height: shape[1],
            width: shape[2],
            latent: self.latent,
            hidden: self.hidden,
            hiddens: self.hiddens.clone(),
            output: self.output_activation,
            names: self.param_names,
        }
    }
}

/// Flags of the commands that read a trained model.
#[derive(clap::Args, Debug, Clone)]
pub struct CheckpointArgs {
    /// A model file (.safetensors), or a run directory (its best.safetensors).
    #[arg(long, short = 'c', value_name = "FILE|DIR")]
    checkpoint: PathBuf,
    /// For checkpoints without vaecuda metadata (saved by PyTorch): the architecture and
    /// sizes; the image shape comes from --data.
    #[command(flatten)]
    model: ModelArgs,
    /// Reconstruction loss the model was trained with [default: the checkpoint's, else bce].
    #[arg(long, value_enum)]
    recon: Option<ReconLoss>,
    #[command(flatten)]
    data: DataArgs,
}

/// A loaded checkpoint and what the commands need around it.
pub struct Loaded<B: Backend> {
    model: Model<B>,
    recon: Recon,
    /// Where outputs go by default: the checkpoint's directory.
    dir: PathBuf,
}

impl CheckpointArgs {
    fn file(&self) -> Result<PathBuf> {
        let p = &self.checkpoint;
        if p.is_dir() {
            for name in ["best.safetensors", "last.safetensors"] {
                if p.join(name).is_file() {
                    return Ok(p.join(name));
                }
            }
            bail!("{} has no best.safetensors or last.safetensors", p.display());
        }
        if !p.exists() {
            bail!("checkpoint {} does not exist", p.display());
        }
        Ok(p.clone())
    }

    fn load<B: Backend>(&self, be: B) -> Result<Loaded<B>> {
        let file = self.file()?;
        let fallback = match vaecuda::checkpoint::TensorFile::read(&file)?.config()? {
            Some(_) => None,
            None => Some(self.model.config(self.data.source()?.image_shape()?)),
        };
        let m = load_model(&file, &be, fallback)?;
        let recon = match (self.recon, m.file.metadata.get("vaecuda_recon")) {
            (Some(r), _) => r.recon(),
            (None, Some(s)) if s == "mse" => Recon::Mse,
            _ => Recon::Bce,
        };
        let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(Loaded { model: Model { backend: be, vae: m.vae, store: m.store }, recon, dir })
    }

    /// The test set, checked against the model's image shape.
    fn test_data(&self, config: &ModelConfig) -> Result<vaecuda::data::Dataset> {
        let t = self.data.source()?.load_test(self.data.limit_test)?;
        let want = [config.channels, config.height, config.width];
        if [t.channels, t.height, t.width] != want {
            bail!(
                "the data has {}×{}×{} images but the model expects {}×{}×{}",
                t.channels,
                t.height,
                t.width,
                want[0],
                want[1],
                want[2]
            );
        }
        Ok(t)
    }
}

/// A progress bar on stderr for work of `len` `unit`s, drawn only when stderr is a terminal
/// (so logs and pipes get the result lines alone).
pub fn progress_bar(len: u64, prefix: &str, unit: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let template = format!("{{prefix}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{msg}} (eta {{eta}})");
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(indicatif::ProgressStyle::with_template(&template).expect("valid template").progress_chars("=> "));
    bar.set_prefix(prefix.to_string());
    bar
}

/// `path` when given, else `dir/name`.
fn out_path(path: &Option<PathBuf>, dir: &Path, name: &str) -> PathBuf {
    path.clone().unwrap_or_else(|| dir.join(name))
}

/// Writes a text file, creating its directory; whole or not at all (through a temporary file).
fn write_text(path: &Path, text: &str) -> Result<()> {
    vaecuda::checkpoint::write_atomic(path, text.as_bytes())
}
