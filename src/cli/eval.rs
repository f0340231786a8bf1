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
    /// Importance samples per image for the −log p(x) estimate (0: skip).
    #[arg(long, default_value_t = 0, value_name = "K")]
    iw: usize,
    /// Images per batch.
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Seed of the sampling noise (the default matches the test loss `vae train` reports).
    #[arg(long, default_value_t = vaecuda::eval::EVAL_SEED)]
    seed: u64,
}

pub fn run<B: Backend>(be: B, a: Args) -> Result<()> {
    ensure!(a.batch_size > 0, "--batch-size must be at least 1");
    let mut l = a.ckpt.load(be)?;
    let test = a.ckpt.test_data(&l.model.vae.config)?;
    let dev = DeviceData::upload(&l.model.backend, &test);
    let e = l.model.elbo(&dev, l.recon, a.batch_size, a.seed);
    println!("test images: {}", test.len);
    println!("negative ELBO: {:.4} nats/image (recon {:.4} + KL {:.4})", e.loss, e.recon, e.kl);
    if a.iw > 0 {
        let nll = l.model.iw_nll(&dev, l.recon, a.iw, a.batch_size, a.seed)?;
        println!("importance-weighted -log p(x), K={}: {nll:.4} nats/image", a.iw);
    }
    Ok(())
}
