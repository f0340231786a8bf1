//! What the tests that run the `vae` binary share: running it, checking its one-line errors,
//! and writing a tiny IDX dataset.
#![allow(dead_code)] // each test file uses a part

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};

/// Runs `vae ARGS --device cpu`.
pub fn vae(args: &[&str]) -> Output {
    vae_command(args).output().expect("run vae")
}

/// The command `vae ARGS --device cpu`, with no decoded-image cache: the tests' folders are
/// temporary (tests/data_folders.rs tests the cache).
pub fn vae_command(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vae"));
    c.args(args).args(["--device", "cpu"]).env("VAECUDA_DATA_CACHE", "off");
    c
}

/// Runs `vae ARGS`, expecting success; its stdout.
pub fn ok(args: &[&str]) -> String {
    succeeded(&vae(args), args).0
}

/// Fails, with exactly one `error:` line on stderr and no panic.
pub fn fails(args: &[&str]) -> String {
    one_error_line(&vae(args), args)
}

/// A run's (stdout, stderr), checked that it succeeded.
pub fn succeeded(o: &Output, args: &[&str]) -> (String, String) {
    let (out, err) = (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned());
    assert!(o.status.success(), "vae {args:?} failed\nstdout:\n{out}\nstderr:\n{err}");
    (out, err)
}

/// A failed run's one `error:` line, checked: non-zero exit, no panic, nothing else on
/// stderr but the device, note and memory lines.
pub fn one_error_line(o: &Output, args: &[&str]) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "vae {args:?} should fail");
    assert!(!err.contains("panicked") && !err.contains("internal error"), "{err}");
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.starts_with("device:") && !l.starts_with("note:") && !l.starts_with("memory:"))
        .collect();
    assert_eq!(lines.len(), 1, "expected one error line, got:\n{err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    lines[0].to_string()
}

pub fn write_idx(path: &Path, dims: &[u32], data: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&[0, 0, 8, dims.len() as u8]).unwrap();
    for d in dims {
        f.write_all(&d.to_be_bytes()).unwrap();
    }
    f.write_all(data).unwrap();
}

/// A tiny 12×12 IDX dataset: blobs whose position depends on the label.
pub fn tiny_dataset(dir: &Path, n_train: usize, n_test: usize) {
    let mut seed = 1u64;
    let mut split = |name: &str, n: usize| {
        let mut px = vec![];
        let mut labels = vec![];
        for _ in 0..n {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let label = (seed >> 33) as usize % 4;
            labels.push(label as u8);
            let (cx, cy) = (3 + 6 * (label % 2), 3 + 6 * (label / 2));
            for y in 0..12usize {
                for x in 0..12usize {
                    let d2 = (x as i64 - cx as i64).pow(2) + (y as i64 - cy as i64).pow(2);
                    let noise = (seed >> (x + y)) & 31;
                    px.push(if d2 <= 5 { 224 + noise as u8 } else { noise as u8 });
                }
            }
        }
        write_idx(&dir.join(format!("{name}-images-idx3-ubyte")), &[n as u32, 12, 12], &px);
        write_idx(&dir.join(format!("{name}-labels-idx1-ubyte")), &[n as u32], &labels);
    };
    split("train", n_train);
    split("t10k", n_test);
}

/// Runs `vae ARGS --device cpu` with extra environment variables; (success, stderr), and
/// fails on a panic.
pub fn vae_with_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let o = vae_command(args).envs(env.iter().copied()).output().expect("run vae");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!err.contains("panicked") && !err.contains("internal error"), "{err}");
    (o.status.success(), err)
}
