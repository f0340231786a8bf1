//! `vae eval`: test-set negative ELBO, optionally the importance-weighted −log p(x).

use anyhow::{ensure, Result};
use vaecuda::backend::Backend;
use vaecuda::data::DeviceData;

use super::CheckpointArgs;

/// Test-set negative ELBO (recon + KL, nats per image) and, with --iw K, the
/// importance-weighted estimate of −log p(x) from K samples per image (tighter as K grows).
///
/// Examples:
///   vae eval --checkpoint runs/mlp
///   vae eval --checkpoint runs/mlp/best.safetensors --iw 100 --limit-test 1000
///   vae eval --checkpoint torch_vae.safetensors --arch mlp --latent 20 --hidden 400
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct Args {
    #[command(flatten)]
    ckpt: CheckpointArgs,
    /// Also estimate −log p(x) with K importance samples per image (K decoder passes per
    /// image: K = 100 on MNIST's 10,000 test images takes minutes on a CPU).
    #[arg(long, value_name = "K", allow_negative_numbers = true)]
    iw: Option<usize>,
    /// Images per batch.
    #[arg(long, default_value_t = 128, allow_negative_numbers = true)]
    batch_size: usize,
    /// Seed of the sampling noise (the default matches the test loss `vae train` reports).
    #[arg(long, default_value_t = vaecuda::eval::EVAL_SEED)]
    seed: u64,
}

pub fn run<B: Backend>(be: B, a: Args) -> Result<()> {
    ensure!(a.batch_size > 0, "--batch-size must be at least 1 (got 0)");
    ensure!(a.iw != Some(0), "--iw must be at least 1 sample per image (got 0); leave it out to skip the estimate");
    let mut l = a.ckpt.load(be)?;
    let test = a.ckpt.test_data(&l.model.vae.config)?;
    let dev = DeviceData::upload(&l.model.backend, &test);
    let e = l.model.elbo(&dev, l.recon, a.batch_size, a.seed);
    println!("test images: {}", test.len);
    println!("negative ELBO: {:.4} nats/image (recon {:.4} + KL {:.4})", e.loss, e.recon, e.kl);
    if let Some(k) = a.iw {
        let bar = super::progress_bar(dev.len as u64, &format!("importance sampling, K={k}"), "images");
        let nll = l.model.iw_nll(&dev, l.recon, k, a.batch_size, a.seed, &mut |n| bar.inc(n as u64))?;
        bar.finish_and_clear();
        println!("importance-weighted -log p(x), K={k}: {nll:.4} nats/image");
    }
    Ok(())
}
