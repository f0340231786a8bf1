//! 05: checkpoints that move between PyTorch and vaecuda.
//!
//! A checkpoint is a safetensors file whose tensor names are the PyTorch `state_dict`'s
//! (`fc1.weight`, `fc1.bias`, ...), in PyTorch's layouts (`nn.Linear` weights are
//! [out, in], transposed-convolution weights [in, out, kh, kw]). In PyTorch:
//!
//! ```python
//! from safetensors.torch import save_file, load_file
//! save_file(model.state_dict(), "pytorch_vae.safetensors")        # PyTorch → vaecuda
//! model.load_state_dict(load_file("runs/mlp/best.safetensors"))   # vaecuda → PyTorch, strict
//! ```
//!
//! This example makes a file exactly as `save_file` writes it (names, shapes and f32 data, no
//! vaecuda metadata; here from a freshly initialized model, since PyTorch may not be
//! installed), loads it (the architecture must then be given, as `--arch` does on the command
//! line), evaluates it on test images and writes it back as a vaecuda checkpoint, whose
//! metadata records the configuration. `bench/pytorch/check_checkpoint.py` does the round trip
//! with a real PyTorch.
//!
//! Run: `cargo run --release --example 05_pytorch_interop -- [test images]`

use std::collections::HashMap;

use vaecuda::backend::Recon;
use vaecuda::checkpoint::{load_model, model_tensors, save_model, write_tensors, TensorFile};
use vaecuda::data::{DeviceData, Source};
use vaecuda::eval::{elbo, EVAL_SEED};
use vaecuda::nn::{Arch, ModelConfig, Vae};
use vaecuda::{Cpu, ParamStore};

fn main() -> anyhow::Result<()> {
    let n_test = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let be = Cpu::<f32>::default();
    let dir = tempfile_dir()?;
    let config = ModelConfig::mnist(Arch::Mlp);

    // 1. A state_dict file as PyTorch writes it: no metadata.
    let pytorch_file = dir.join("pytorch_vae.safetensors");
    let mut stand_in = ParamStore::default();
    Vae::new(config.clone(), &mut stand_in, &be, 42);
    write_tensors(&pytorch_file, &model_tensors(&be, &stand_in), HashMap::new())?;
    let raw = TensorFile::read(&pytorch_file)?;
    println!("{}: {} tensors, metadata {:?}", pytorch_file.display(), raw.tensors.len(), raw.metadata);
    for (name, t) in &raw.tensors {
        println!("  {name:<12} {:?} {:?}", t.dtype, t.shape);
    }

    // 2. Loaded without metadata: the configuration comes from us (as --arch would give it);
    //    a file that does not fit the configuration is an error naming the tensor.
    assert!(load_model(&pytorch_file, &be, None).is_err(), "a file without metadata needs the architecture");
    let mut m = load_model(&pytorch_file, &be, Some(config.clone()))?;
    let test = DeviceData::upload(&be, &Source::detect(None, 64, Default::default())?.load_test(Some(n_test))?);
    let loss = elbo(&be, &m.vae, &mut m.store, &test, Recon::Bce, 128, EVAL_SEED);
    println!(
        "\nloaded into vaecuda and evaluated on {} test images: −ELBO {:.2} nats/image (recon {:.2}, KL {:.2})",
        test.len, loss.loss, loss.recon, loss.kl
    );
    println!("(an untrained model: about 544 nats, −784·ln ½ for pixels predicted at p ≈ ½)");

    // 3. Written back as a vaecuda checkpoint: the same tensors, plus the configuration.
    let ours = dir.join("vaecuda_vae.safetensors");
    save_model(&ours, &be, &m.store, &config, &[("vaecuda_recon", "bce".to_string())])?;
    let back = TensorFile::read(&ours)?;
    let same = back.tensors.keys().eq(raw.tensors.keys())
        && back.tensors.iter().all(|(k, t)| t.bytes == raw.tensors[k].bytes && t.shape == raw.tensors[k].shape);
    println!("\n{}: metadata keys {:?}", ours.display(), back.metadata.keys().collect::<Vec<_>>());
    println!("same names, shapes and bytes as the PyTorch file: {same} (so load_state_dict(strict=True) takes it)");
    assert!(same);
    // 4. With metadata, no configuration is needed to load it.
    let again = load_model(&ours, &be, None)?;
    println!("reloaded from its own metadata: {:?} with {} latents", again.config.arch, again.config.latent);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("vaecuda-example-05-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
