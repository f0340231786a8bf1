//! Every parser that reads a user's file, fed 10,000 damaged versions of a valid file each
//! (seeded, so a failure reproduces): bit flips, truncations, spliced garbage and headers that
//! claim huge sizes. None may panic; each must answer with an error that names the file, or
//! with a value; and no single allocation may exceed a small multiple of the file's size
//! (compressed formats: what DEFLATE can legitimately expand to, `data::MAX_EXPANSION`), so a
//! header that claims huge dimensions is refused before anything is allocated.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write;
use std::path::Path;

use vaecuda::checkpoint::TensorFile;
use vaecuda::data::{decode_image, gunzip, parse_idx, read_maybe_gz, MAX_EXPANSION};
use vaecuda::rng::Rng;

/// Prints a count past the test harness's capture (which holds back `println!`), so CI's log
/// shows it for passing tests too.
macro_rules! report {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// Records the largest single allocation made by the current thread while `tracking` is set.
struct Tracking;
thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if TRACKING.with(Cell::get) {
            LARGEST.with(|l| l.set(l.get().max(layout.size())));
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if TRACKING.with(Cell::get) {
            LARGEST.with(|l| l.set(l.get().max(new_size)));
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}
#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// Runs `f` and returns its result with the largest allocation it made.
fn largest_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.with(|l| l.set(0));
    TRACKING.with(|t| t.set(true));
    let r = f();
    TRACKING.with(|t| t.set(false));
    (r, LARGEST.with(Cell::get))
}

const INPUTS: usize = 10_000;

/// A damaged copy of `valid`: a few bit flips, a truncation, a run of garbage, or a 4-byte
/// field set to a huge or random value.
fn mutate(valid: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut v = valid.to_vec();
    let pick = |rng: &mut Rng, n: usize| (rng.next_f64() * n as f64) as usize % n.max(1);
    for _ in 0..1 + pick(rng, 3) {
        match pick(rng, 5) {
            0 if !v.is_empty() => {
                let i = pick(rng, v.len());
                v[i] ^= 1 << pick(rng, 8);
            }
            1 => v.truncate(pick(rng, v.len() + 1)),
            2 if !v.is_empty() => {
                let at = pick(rng, v.len());
                for k in at..(at + 1 + pick(rng, 16)).min(v.len()) {
                    v[k] = pick(rng, 256) as u8;
                }
            }
            3 if v.len() >= 8 => {
                let at = pick(rng, v.len() - 3);
                let value: u32 =
                    if rng.next_f64() < 0.5 { u32::MAX - pick(rng, 1000) as u32 } else { pick(rng, 1 << 30) as u32 };
                v[at..at + 4].copy_from_slice(&value.to_be_bytes());
            }
            _ => v.extend((0..pick(rng, 64)).map(|_| pick(rng, 256) as u8)),
        }
    }
    v
}

/// Runs `parse` on INPUTS damaged versions of `valid` written to `path`; checks no panic, that
/// errors name the file and are one line, and the allocation bound. Returns (ok, rejected).
fn fuzz(
    name: &str,
    valid: &[u8],
    path: &Path,
    bound: impl Fn(usize) -> usize,
    parse: impl Fn(&Path) -> Result<(), String>,
) {
    let mut rng = Rng::new(name.len() as u64 * 7919);
    fuzz_with(name, valid, path, bound, |v, i| if i == 0 { v.to_vec() } else { mutate(v, &mut rng) }, parse)
}

/// [`fuzz`] with its own mutator (`damage(valid, i)`; input 0 is always the valid file).
fn fuzz_with(
    name: &str,
    valid: &[u8],
    path: &Path,
    bound: impl Fn(usize) -> usize,
    mut damage: impl FnMut(&[u8], usize) -> Vec<u8>,
    parse: impl Fn(&Path) -> Result<(), String>,
) {
    let (mut accepted, mut rejected) = (0, 0);
    for i in 0..INPUTS {
        let bytes = if i == 0 { valid.to_vec() } else { damage(valid, i) };
        std::fs::write(path, &bytes).unwrap();
        let (result, largest) =
            largest_allocation(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| parse(path))));
        let result = result.unwrap_or_else(|_| panic!("{name}: input {i} ({} bytes) panicked: {bytes:?}", bytes.len()));
        assert!(
            largest <= bound(bytes.len()),
            "{name}: input {i} of {} bytes allocated {largest} bytes at once (bound {})",
            bytes.len(),
            bound(bytes.len())
        );
        match result {
            Ok(()) => accepted += 1,
            Err(e) => {
                assert!(e.contains(&path.display().to_string()) && !e.contains('\n'), "{name}: input {i}: {e}");
                rejected += 1;
            }
        }
    }
    assert!(rejected > 0, "{name}: no damaged input was refused");
    report!("{name}: {INPUTS} inputs tried, {accepted} parsed, {rejected} refused with a message naming the file");
}

fn idx_file() -> Vec<u8> {
    let mut v = vec![0, 0, 8, 3];
    for d in [5u32, 6, 7] {
        v.extend(d.to_be_bytes());
    }
    v.extend((0..5 * 6 * 7).map(|i| (i * 37 % 256) as u8));
    v
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(vec![], flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// What the data loader does with an IDX file: read (decompress), parse, say which file.
fn load_idx(path: &Path) -> Result<(), String> {
    read_maybe_gz(path)
        .and_then(|b| parse_idx(&b).map_err(|e| anyhow::anyhow!("{}: {e}", path.display())))
        .map(|_| ())
        .map_err(|e| format!("{e:#}").replace('\n', " "))
}

#[test]
fn idx_files_raw_and_gzipped() {
    let dir = tempfile::tempdir().unwrap();
    let valid = idx_file();
    // Uncompressed: nothing larger than the file itself (plus small bookkeeping).
    fuzz("IDX", &valid, &dir.path().join("images-idx3-ubyte"), |n| 2 * n + 4096, load_idx);
    fuzz(
        "IDX (gzip)",
        &gz(&valid),
        &dir.path().join("images-idx3-ubyte.gz"),
        |n| 2 * n * MAX_EXPANSION as usize + 65536,
        load_idx,
    );
    // A gzip bomb: 64 MiB of zeros squeezed into ~64 KiB decompresses to at most
    // MAX_EXPANSION times the file (DEFLATE's own limit is about 1032:1), and the IDX header
    // check then refuses it.
    let bomb = gz(&vec![0u8; 64 << 20]);
    let (out, largest) = largest_allocation(|| gunzip(&bomb));
    assert!(largest <= bomb.len() * MAX_EXPANSION as usize * 2, "{largest} bytes for a {}-byte file", bomb.len());
    assert!(out.map_or(true, |b| parse_idx(&b).is_err()));
}

#[test]
fn safetensors_checkpoints_and_their_metadata() {
    use std::collections::{BTreeMap, HashMap};
    use vaecuda::checkpoint::{write_tensors, RawTensor};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let tensors = BTreeMap::from([
        ("fc1.weight".to_string(), RawTensor::from_floats::<f32>(&[3, 4], &[0.5; 12])),
        ("fc1.bias".to_string(), RawTensor::from_floats::<f32>(&[3], &[0.25; 3])),
    ]);
    let config = r#"{"arch":"Mlp","channels":1,"height":2,"width":2,"latent":2,"hidden":3,"hiddens":[]}"#;
    let meta = HashMap::from([("vaecuda_config".to_string(), config.to_string())]);
    write_tensors(&path, &tensors, meta).unwrap();
    let valid = std::fs::read(&path).unwrap();
    fuzz(
        "safetensors",
        &valid,
        &path,
        |n| 4 * n + 65536,
        |p| {
            let one_line = |e: anyhow::Error| format!("{e:#}").replace('\n', " ");
            let f = TensorFile::read(p).map_err(one_line)?;
            // The metadata a checkpoint carries is parsed too (the model configuration).
            f.config().map_err(one_line)?;
            Ok(())
        },
    );
}

#[test]
fn image_files() {
    let dir = tempfile::tempdir().unwrap();
    let img = image::RgbImage::from_fn(9, 7, |x, y| image::Rgb([x as u8 * 20, y as u8 * 30, 100]));
    for (ext, format) in [("png", image::ImageFormat::Png), ("jpg", image::ImageFormat::Jpeg)] {
        let mut bytes = std::io::Cursor::new(vec![]);
        img.write_to(&mut bytes, format).unwrap();
        let bound = |n: usize| (n * MAX_EXPANSION as usize).max(4 << 20) + 65536;
        fuzz(&format!("image ({ext})"), &bytes.into_inner(), &dir.path().join(format!("x.{ext}")), bound, |p| {
            let bytes = std::fs::read(p).map_err(|e| e.to_string())?;
            // As vae prints errors: one line (decoders' messages may hold a newline).
            decode_image(&bytes)
                .map(|_| ())
                .map_err(|e| format!("cannot decode image {}: {e:#}", p.display()).replace('\n', " "))
        });
    }
}

/// A damaged copy of a JSON document: half the time bytes (as [`mutate`]), half the time one
/// value replaced by another of any type or an extreme number, so that damage also reaches
/// the checks behind the parser (a zero batch size, a model of 10^15 parameters).
fn mutate_json(valid: &[u8], rng: &mut Rng) -> Vec<u8> {
    use serde_json::{json, Value};
    if rng.next_f64() < 0.5 {
        return mutate(valid, rng);
    }
    let mut doc: Value = serde_json::from_slice(valid).unwrap();
    let mut leaves = vec![];
    fn walk(v: &Value, at: String, out: &mut Vec<String>) {
        match v {
            Value::Object(o) => o.iter().for_each(|(k, v)| walk(v, format!("{at}/{k}"), out)),
            Value::Array(a) => a.iter().enumerate().for_each(|(i, v)| walk(v, format!("{at}/{i}"), out)),
            _ => {}
        }
        out.push(at);
    }
    walk(&doc, String::new(), &mut leaves);
    let pick = |rng: &mut Rng, n: usize| (rng.next_f64() * n as f64) as usize % n.max(1);
    let replacements = [
        json!(0),
        json!(-1),
        json!(1u64 << 40),
        json!(u64::MAX),
        json!(1e308),
        json!(-1e-300),
        json!(0.5),
        json!("mlp"),
        json!(null),
        json!([]),
        json!({}),
        json!([1u64 << 30, 1u64 << 30]),
    ];
    for _ in 0..1 + pick(rng, 2) {
        let at = &leaves[pick(rng, leaves.len())];
        if let Some(slot) = doc.pointer_mut(at) {
            *slot = replacements[pick(rng, replacements.len())].clone();
        }
    }
    serde_json::to_vec_pretty(&doc).unwrap()
}

/// run.json, as `--resume` reads it: parsed and validated, or refused naming the file.
#[test]
fn run_settings() {
    use vaecuda::run::{ReconLoss, Reduction, RunDir, Settings};
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings {
        source: vaecuda::data::Source::Idx(None),
        limit_train: Some(1000),
        limit_test: None,
        model: vaecuda::nn::ModelConfig::mnist(vaecuda::nn::Arch::ConvBn),
        recon: ReconLoss::Bce,
        reduction: Reduction::Sum,
        kl_weight: 1.0,
        kl_warmup: 0.0,
        optimizer: vaecuda::run::Optimizer::Adam,
        lr: 1e-3,
        betas: [0.9, 0.999],
        eps: 1e-8,
        weight_decay: 0.0,
        batch_size: 128,
        epochs: 10,
        seed: 0,
        patience: Some(3),
        recon_reduction: Some(vaecuda::nn::TermReduction::BatchMean),
        kl_reduction: None,
        monitor: vaecuda::run::Monitor::Train,
        holdout: Some(500),
        epoch_reconstructions: true,
        recipe: Some("conv".into()),
        precision: vaecuda::backend::Precision::Tf32,
    };
    let valid = serde_json::to_vec_pretty(&settings).unwrap();
    let mut rng = Rng::new(0x5E77);
    fuzz_with(
        "run.json",
        &valid,
        &dir.path().join("run.json"),
        |n| 4 * n + 65536,
        |v, _| mutate_json(v, &mut rng),
        |p| {
            let s = RunDir::read_settings(p.parent().unwrap()).map_err(|e| format!("{e:#}").replace('\n', " "))?;
            // What --resume builds from it must be buildable.
            assert!(vaecuda::nn::vae::parameter_count(&s.model) <= vaecuda::nn::vae::MAX_PARAMETERS);
            Ok(())
        },
    );
}

/// metrics.csv, as `vae plot` reads it.
#[test]
fn metrics_csv() {
    let dir = tempfile::tempdir().unwrap();
    let rows: String = (1..=6)
        .map(|e| format!("{e},{:.6},120.5,30.25,{:.6},1.250,1000.0\n", 150.0 / e as f64, 151.5 - e as f64))
        .collect();
    let valid = format!("{}\n{rows}", vaecuda::run::METRICS_HEADER).into_bytes();
    let mut rng = Rng::new(0xC5F);
    fuzz_with(
        "metrics.csv",
        &valid,
        &dir.path().join("metrics.csv"),
        |n| 8 * n + 65536,
        |v, _| mutate(v, &mut rng),
        |p| {
            let m = vaecuda::run::Metrics::read(p).map_err(|e| format!("{e:#}").replace('\n', " "))?;
            for c in ["epoch", "train_loss", "test_loss", "recon", "kl"] {
                m.column(c).map_err(|e| format!("{}: {e}", p.display()))?;
            }
            Ok(())
        },
    );
}
