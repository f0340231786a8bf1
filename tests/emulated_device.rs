//! The emulated CUDA device from the outside: `vae --device emu` trains through the real
//! kernels to the CPU's losses, running out of device memory is one line that says what to
//! do, and memory nobody wrote reads as NaN. (The GPU suite itself, `gpu_vs_cpu.rs`, runs on
//! the emulated device too when there is no GPU.)

use std::process::{Command, Output};

/// Whether the emulated device can be built here; under CI it must be.
fn emulator_available() -> bool {
    match vaecuda::backend::cuda::emu::install() {
        Ok(()) => true,
        Err(e) if std::env::var_os("CI").is_some() => panic!("the emulated device is unavailable under CI: {e}"),
        Err(e) => {
            eprintln!("note: emulated-device test skipped: {e}");
            false
        }
    }
}

fn vae(device: &str, extra_env: &[(&str, &str)], args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vae"))
        .args(["--device", device])
        .args(args)
        .envs(extra_env.iter().copied())
        .output()
        .expect("run vae")
}

/// The numbers of the `epoch 1/1 ...` line: train, recon, KL, test.
fn epoch_losses(o: &Output) -> Vec<f64> {
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "vae failed\nstdout:\n{out}\nstderr:\n{err}");
    let line =
        out.lines().find(|l| l.trim_start().starts_with("epoch")).unwrap_or_else(|| panic!("no epoch line:\n{out}"));
    line.split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter(|t| t.contains('.'))
        .take(4)
        .map(|t| t.parse().unwrap())
        .collect()
}

#[test]
fn vae_trains_through_the_emulated_device_to_the_cpus_losses() {
    if !emulator_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run = |device: &str| {
        let out = dir.path().join(device);
        let args = ["train", "--limit-train", "384", "--limit-test", "128", "--epochs", "1", "--out"];
        epoch_losses(&vae(device, &[], &[&args[..], &[out.to_str().unwrap()]].concat()))
    };
    let (cpu, emu) = (run("cpu"), run("emu"));
    assert_eq!(cpu.len(), 4);
    // Printed with four decimals; the two backends sum in different orders (f32), so allow a
    // few units in the last place of numbers of size ~500.
    for (c, e) in cpu.iter().zip(&emu) {
        assert!((c - e).abs() <= 2e-3 + 1e-6 * c.abs(), "cpu {cpu:?} vs emulated {emu:?}");
    }
}

/// The one `error` line of a failed run, checked for no panic or backtrace.
fn one_error_line(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "the run succeeded:\n{err}");
    assert!(!err.contains("panicked") && !err.contains("internal error") && !err.contains("backtrace"), "{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    errors[0].to_string()
}

/// Out of device memory, two ways: `train` predicts it from the model's size and a step's
/// estimate and refuses before allocating; anything else that runs out (here `eval` uploading
/// a test set larger than the memory left) gets the typed out-of-memory error. Both are one
/// line that says what to do.
#[test]
fn out_of_device_memory_is_one_line_that_says_what_to_do() {
    if !emulator_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out = out.to_str().unwrap();
    let small = ["--limit-train", "256", "--limit-test", "128", "--epochs", "1", "--out", out];
    // 6 MiB holds the MLP's weights but not with their gradients and the optimizer state.
    let o = vae("emu", &[("VAECUDA_EMU_MEMORY", "6M")], &[&["train"][..], &small].concat());
    let line = one_error_line(&o);
    assert!(line.contains("parameters, with their gradients and Adam's two moments, would need"), "{line}");
    assert!(line.contains("MiB is free"), "{line}");

    // A checkpoint from the CPU; then 8 MiB of device memory holds the model (2.5 MiB) but
    // not 2,000 test images (6 MiB) beside it.
    let o = vae("cpu", &[], &[&["train"][..], &small].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = vae("emu", &[("VAECUDA_EMU_MEMORY", "8M")], &["eval", "-c", out, "--limit-test", "2000"]);
    let line = one_error_line(&o);
    assert!(line.starts_with("error: out of GPU memory: asked for "), "{line}");
    assert!(line.contains("free of 8.0 MiB; try a smaller --batch-size"), "{line}");
}

#[test]
fn fresh_device_memory_reads_as_nan() {
    if !emulator_available() {
        return;
    }
    let ctx = cudarc::driver::CudaContext::new(0).unwrap();
    let stream = ctx.default_stream();
    for n in [1usize, 1000, 123_457] {
        // SAFETY: read back as plain bits; nothing is assumed about the contents.
        let f = unsafe { stream.alloc::<f32>(n) }.unwrap();
        assert!(stream.clone_dtoh(&f).unwrap().iter().all(|v| v.is_nan()), "f32 × {n}");
        let d = unsafe { stream.alloc::<f64>(n) }.unwrap();
        assert!(stream.clone_dtoh(&d).unwrap().iter().all(|v| v.is_nan()), "f64 × {n}");
    }
}
