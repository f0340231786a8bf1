//! Writes a CelebA-like folder for the CelebA benchmark (`bench/celeba.sh`): `DIR/img_align_celeba/`
//! with N 178×218 JPEGs of generated faces (blobs plus noise, so they compress like photos,
//! see `tests/faces/mod.rs`) and `DIR/list_eval_partition.txt` in CelebA's proportions,
//! written in parallel. Not a timing bench: `cargo bench --bench celeba_like -- DIR [N]`
//! (N defaults to 20,000); the release profile makes generating fast.

#[path = "../tests/faces/mod.rs"]
mod faces;

fn main() {
    // cargo passes `--bench` to harness-less benches; flags are not ours.
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let Some(dir) = args.first() else {
        eprintln!("usage: cargo bench --bench celeba_like -- DIR [N]   (N: images, default 20000)");
        std::process::exit(2);
    };
    let n: usize = match args.get(1).map(|s| s.parse()) {
        None => 20_000,
        Some(Ok(n)) if n >= 10 => n,
        _ => {
            eprintln!("error: N must be a whole number of images, at least 10");
            std::process::exit(2);
        }
    };
    let start = std::time::Instant::now();
    faces::write_celeba(std::path::Path::new(dir), n);
    let secs = start.elapsed().as_secs_f64();
    println!("wrote {n} CelebA-like JPEGs (178×218) to {dir} in {secs:.1} s ({:.0} images/s)", n as f64 / secs);
}
