//! Image folders as people have them, on small generated folders in a tempdir: CelebA as
//! torchvision and Kaggle leave it (split by its partition file), ImageFolder class
//! subfolders (labels), nested and flat folders; the decoded cache (hit, invalidation by a
//! changed folder, damage); refusing a dataset that does not fit in memory before loading it;
//! and the `vae` command training and evaluating on both layouts, and refusing nonsense flags.

use crate::cli_common;
use crate::faces;

use std::path::{Path, PathBuf};
use std::process::Output;

use vaecuda::data::folder::{self, CacheUse, Layout, Options};
use vaecuda::data::{decode_image, Source};

/// Options with the cache in `cache` (or none), no progress bar, no log, memory unchecked.
fn opts(cache: Option<&Path>) -> Options {
    Options { cache_dir: cache.map(Path::to_path_buf), mem_available: None, progress: false, log: false, crop: None }
}

/// `n` small JPEGs of varied sizes in `dir`, named `{prefix}{i:03}.jpg`.
fn jpegs(dir: &Path, prefix: &str, n: usize, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..n {
        let (w, h) = (24 + (i % 5) as u32 * 3, 30 + (i % 3) as u32 * 4);
        faces::write_jpeg(&dir.join(format!("{prefix}{i:03}.jpg")), seed + i as u64, w, h);
    }
}

/// The bytes `load` must produce for one file: decoded, center-cropped, resized, CHW.
fn expected(path: &Path, size: usize) -> Vec<u8> {
    folder::prepare_image(decode_image(&std::fs::read(path).unwrap()).unwrap(), size, None)
}

#[test]
fn celeba_layout_is_split_by_its_partition_file() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("celeba");
    faces::write_celeba(&root, 40);
    // A stray non-image file and a hidden folder are ignored.
    std::fs::write(root.join("img_align_celeba/README"), "not an image").unwrap();
    jpegs(&root.join("img_align_celeba/.thumbs"), "t", 2, 500);

    let index = folder::scan(&root).unwrap();
    assert!(matches!(index.layout, Layout::CelebA { partition: Some(_) }), "{:?}", index.layout);
    // 40 images: partitions 0 (32), 1 (4, unused), 2 (4).
    assert_eq!((index.train.len(), index.test.len(), index.unused), (32, 4, 4), "{}", index.describe());
    assert_eq!(index.train[0].rel, "000001.jpg");
    assert_eq!(index.test[0].rel, "000037.jpg");

    let l = folder::load(&index, 16, None, Some(3), &opts(None)).unwrap();
    assert_eq!((l.train.len, l.test.len, l.train.channels, l.train.height), (32, 3, 3, 16));
    assert!(l.train.labels.is_none() && l.train.classes.is_empty());
    assert_eq!(l.train_cache, CacheUse::Off);
    // Pixels are the file's, byte for byte, in file-name order.
    let images = root.join("img_align_celeba");
    assert_eq!(l.train.image_bytes(5), &expected(&images.join("000006.jpg"), 16)[..]);
    assert_eq!(l.test.image_bytes(2), &expected(&images.join("000039.jpg"), 16)[..]);
    // Faces, not flat colour: the pixels vary.
    let px = l.train.image_bytes(0);
    assert!(px.iter().max().unwrap() - px.iter().min().unwrap() > 100);

    // The CelebA tutorial's dataset: every image in file-name order (the validation and test
    // partitions too); the test set stays the evaluation set.
    let all = index.clone().train_on_all();
    assert_eq!((all.train.len(), all.test.len(), all.unused), (40, 4, 0));
    let names: Vec<&str> = all.train.iter().map(|e| e.rel.as_str()).collect();
    assert!(names.windows(2).all(|w| w[0] < w[1]) && names[33] == "000034.jpg", "{names:?}");

    // The images folder itself finds the partition file beside it.
    let inner = folder::scan(&images).unwrap();
    assert_eq!((inner.train.len(), inner.test.len()), (32, 4));

    // Kaggle's archive: one more img_align_celeba level, a CSV partition file.
    let kaggle = tmp.path().join("kaggle");
    std::fs::create_dir_all(kaggle.join("img_align_celeba")).unwrap();
    std::fs::rename(&images, kaggle.join("img_align_celeba/img_align_celeba")).unwrap();
    let csv: String = std::iter::once("image_id,partition\n".to_string())
        .chain((1..=40).map(|i| format!("{i:06}.jpg,{}\n", if i <= 30 { 0 } else { 2 })))
        .collect();
    std::fs::write(kaggle.join("list_eval_partition.csv"), csv).unwrap();
    let k = folder::scan(&kaggle).unwrap();
    assert_eq!((k.train.len(), k.test.len(), k.unused), (30, 10, 0));
    assert_eq!(k.train[0].rel, "img_align_celeba/000001.jpg");

    // A partition file that is not one is named.
    std::fs::write(kaggle.join("list_eval_partition.csv"), "000001.jpg,7\n").unwrap();
    let e = format!("{:#}", folder::scan(&kaggle).unwrap_err());
    assert!(e.contains("list_eval_partition.csv") && e.contains("not 0, 1 or 2"), "{e}");
}

/// `--crop` is torchvision's CenterCrop: the corner at round((side − c)/2) with Python's
/// rounding (half to even), and black padding where the image is smaller than the crop.
#[test]
fn crops_are_torchvisions_center_crop() {
    // Pixel (x, y) holds (x, y, 7), so a crop shows which corner it started at.
    let img = image::RgbImage::from_fn(11, 8, |x, y| image::Rgb([x as u8, y as u8, 7]));
    let img = image::DynamicImage::ImageRgb8(img);
    // 11 − 4 = 7 → corner x round(3.5) = 4; 8 − 4 = 4 → y 2. Resized 4 → 4: pixels as they are.
    let px = folder::prepare_image(img.clone(), 4, Some(4));
    let (plane, at) = (16, |c: usize, x: usize, y: usize| c * 16 + y * 4 + x);
    assert_eq!((px[at(0, 0, 0)], px[at(1, 0, 0)]), (4, 2), "{:?}", &px[..plane]);
    assert_eq!((px[at(0, 3, 3)], px[at(1, 3, 3)], px[at(2, 3, 3)]), (7, 5, 7));
    // A crop larger than the image: 12 − 11 = 1 → corner x round(−0.5) = 0 (half to even), y
    // round(−2) = −2: two black rows on top, the image below.
    let px = folder::prepare_image(img.clone(), 12, Some(12));
    let at = |c: usize, x: usize, y: usize| c * 144 + y * 12 + x;
    assert_eq!([px[at(0, 5, 0)], px[at(1, 5, 1)], px[at(2, 5, 1)]], [0, 0, 0]);
    assert_eq!([px[at(0, 5, 2)], px[at(1, 5, 2)], px[at(2, 5, 2)]], [5, 0, 7]);
    assert_eq!([px[at(0, 11, 5)], px[at(2, 11, 5)]], [0, 0], "column 11 is past the image: black");
    // Without a crop: the largest centred square (8×8 at x = 1).
    let px = folder::prepare_image(img, 8, None);
    assert_eq!(px[0], 1);
    // The crop is part of the cache key; no crop keeps the key caches already have.
    let e = folder::Entry { path: "a.jpg".into(), rel: "a.jpg".into(), label: None, bytes: 1, modified_ns: 2 };
    let keys = [None, Some(168), Some(160)].map(|c| folder::cache_key(std::slice::from_ref(&e), 64, c));
    assert!(keys[0] != keys[1] && keys[1] != keys[2]);
}

#[test]
fn image_folder_classes_become_labels_and_flat_folders_split_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("pets");
    jpegs(&root.join("cat"), "c", 10, 100);
    jpegs(&root.join("dog/indoor"), "d", 6, 200); // nested below its class folder
    jpegs(&root.join("dog"), "e", 4, 300);
    jpegs(&root.join("emu"), "f", 1, 400); // one image: training only
                                           // A class name that another one begins with: "dog-2/…" sorts before "dog/…" as a path.
    jpegs(&root.join("dog-2"), "g", 3, 600);
    let index = folder::scan(&root).unwrap();
    assert_eq!(index.layout, Layout::ImageFolder);
    assert_eq!(index.classes, ["cat", "dog", "dog-2", "emu"]);
    // The last 10% of each class (at least one of two or more) are the test set.
    let labels = |v: &[folder::Entry]| v.iter().map(|e| e.label.unwrap()).collect::<Vec<_>>();
    assert_eq!(labels(&index.test), [0, 1, 2]);
    assert_eq!(index.test[0].rel, "cat/c009.jpg");
    assert_eq!(index.test[1].rel, "dog/indoor/d005.jpg");
    assert_eq!(index.test[2].rel, "dog-2/g002.jpg");
    assert_eq!(index.train.len(), 9 + 9 + 2 + 1);
    // Every file is labelled by its class folder.
    for e in index.train.iter().chain(&index.test) {
        assert!(e.rel.starts_with(&format!("{}/", index.classes[e.label.unwrap() as usize])), "{e:?}");
    }
    let l = folder::load(&index, 8, None, None, &opts(None)).unwrap();
    assert_eq!(l.train.labels.as_deref().unwrap(), &labels(&index.train)[..]);
    assert_eq!(l.test.labels.as_deref().unwrap(), [0, 1, 2]);
    assert_eq!(l.test.classes, ["cat", "dog", "dog-2", "emu"]);
    assert_eq!(l.test.image_bytes(1), &expected(&root.join("dog/indoor/d005.jpg"), 8)[..]);

    // Images at the top as well: a flat (recursive) folder without labels, 10% held out.
    jpegs(&root, "top", 1, 900);
    let flat = folder::scan(&root).unwrap();
    assert_eq!(flat.layout, Layout::Flat);
    assert_eq!((flat.train.len(), flat.test.len()), (23, 2));
    assert!(flat.train.iter().chain(&flat.test).all(|e| e.label.is_none()));
}

#[test]
fn cache_hits_is_invalidated_by_a_changed_folder_and_never_trusts_a_damaged_file() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("faces");
    jpegs(&root, "", 20, 7);
    let cache = tmp.path().join("cache");
    let o = opts(Some(&cache));
    let first = folder::load(&folder::scan(&root).unwrap(), 12, None, None, &o).unwrap();
    let CacheUse::Written(train_file) = &first.train_cache else { panic!("{:?}", first.train_cache) };
    assert!(matches!(first.test_cache, CacheUse::Written(_)), "{:?}", first.test_cache);

    // Hit: the same bytes, from the file.
    let again = folder::load(&folder::scan(&root).unwrap(), 12, None, None, &o).unwrap();
    assert_eq!(again.train_cache, CacheUse::Hit(train_file.clone()));
    assert_eq!(again.train.pixels, first.train.pixels);
    assert_eq!(again.test.pixels, first.test.pixels);
    // Another image size is another key.
    let other = folder::load(&folder::scan(&root).unwrap(), 10, None, None, &o).unwrap();
    assert!(matches!(other.train_cache, CacheUse::Written(_)), "{:?}", other.train_cache);

    // Damage: a flipped byte in the pixels, then a truncated file. Each is decoded afresh,
    // rewritten, and gives the right pixels.
    let mut bytes = std::fs::read(train_file).unwrap();
    bytes[100] ^= 0x40;
    std::fs::write(train_file, &bytes).unwrap();
    let fixed = folder::load(&folder::scan(&root).unwrap(), 12, None, None, &o).unwrap();
    match &fixed.train_cache {
        CacheUse::Rebuilt(p, why) => assert!(p == train_file && why.contains("checksum"), "{why}"),
        c => panic!("a damaged cache was used: {c:?}"),
    }
    assert_eq!(fixed.train.pixels, first.train.pixels);
    std::fs::write(train_file, &bytes[..bytes.len() / 2]).unwrap();
    let fixed = folder::load(&folder::scan(&root).unwrap(), 12, None, None, &o).unwrap();
    assert!(matches!(&fixed.train_cache, CacheUse::Rebuilt(_, why) if why.contains("long")), "{:?}", fixed.train_cache);
    assert_eq!(fixed.train.pixels, first.train.pixels);
    assert_eq!(
        folder::load(&folder::scan(&root).unwrap(), 12, None, None, &o).unwrap().train_cache,
        CacheUse::Hit(train_file.clone())
    );

    // A changed folder: one image replaced (new contents and size), then one added. Each
    // misses the old file and decodes what is there now.
    faces::write_jpeg(&root.join("003.jpg"), 12345, 40, 40);
    let changed = folder::load(&folder::scan(&root).unwrap(), 12, None, None, &o).unwrap();
    let CacheUse::Written(p) = &changed.train_cache else { panic!("{:?}", changed.train_cache) };
    assert_ne!(p, train_file);
    assert_eq!(changed.train.image_bytes(3), &expected(&root.join("003.jpg"), 12)[..]);
    assert_ne!(changed.train.pixels, first.train.pixels);
    jpegs(&root, "new", 1, 99);
    let added = folder::load(&folder::scan(&root).unwrap(), 12, None, None, &o).unwrap();
    assert!(matches!(added.train_cache, CacheUse::Written(_)), "{:?}", added.train_cache);
    assert_eq!(added.train.len + added.test.len, 21);

    // A cache folder that cannot be written is no reason to fail.
    let blocked = tmp.path().join("file");
    std::fs::write(&blocked, "a file, not a folder").unwrap();
    let l = folder::load(&folder::scan(&root).unwrap(), 12, None, None, &opts(Some(&blocked))).unwrap();
    assert!(matches!(l.train_cache, CacheUse::NotWritten(_)), "{:?}", l.train_cache);
    assert_eq!(l.train.pixels, added.train.pixels);
}

#[test]
fn a_dataset_bigger_than_memory_is_refused_before_loading() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("junk");
    std::fs::create_dir(&root).unwrap();
    // Files that do not decode: a refusal after decoding would name one of them instead.
    for i in 0..30 {
        std::fs::write(root.join(format!("{i:02}.jpg")), b"not a jpeg").unwrap();
    }
    let index = folder::scan(&root).unwrap();
    let mut o = opts(None);
    // 30 images of 3·64·64 = 12,288 bytes need 368,640 bytes.
    o.mem_available = Some(300_000);
    let e = folder::load(&index, 64, None, None, &o).unwrap_err().to_string();
    assert!(
        e.contains("needs 360.0 KiB") && e.contains("30 images of 12288 bytes") && e.contains("--limit-train"),
        "{e}"
    );
    assert!(e.contains("--image-size"), "{e}");
    // What fits goes on to decoding (and fails there, on these files).
    o.mem_available = Some(400_000);
    let e = format!("{:#}", folder::load(&index, 64, None, None, &o).unwrap_err());
    assert!(e.contains("cannot decode image"), "{e}");
    // A subset that fits is loaded as far as decoding.
    o.mem_available = Some(300_000);
    let e = format!("{:#}", folder::load(&index, 64, Some(10), None, &o).unwrap_err());
    assert!(e.contains("cannot decode image"), "{e}");

    // MemAvailable from /proc/meminfo text; none when the line is missing.
    let meminfo = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   22000000 kB\n";
    assert_eq!(vaecuda::backend::cpu::parse_meminfo(meminfo), Some(22_000_000 * 1024));
    assert_eq!(vaecuda::backend::cpu::parse_meminfo("MemTotal: 5 kB\n"), None);
    if Path::new("/proc/meminfo").exists() {
        assert!(folder::mem_available().is_some_and(|m| m > 0));
    }
}

#[test]
fn nonsense_image_sizes_are_refused_by_the_library() {
    for bad in [0, vaecuda::data::MAX_IMAGE_SIZE + 1] {
        let e = Source::detect(None, bad, Default::default()).unwrap_err().to_string();
        assert!(e.contains(&format!("--image-size {bad}")) && e.contains("1 to 4096"), "{e}");
    }
    assert!(Source::detect(None, 1, Default::default()).is_ok());
}

// ---- the `vae` command ----

/// `vae ARGS --device cpu` with its decoded-image cache in `cache`.
fn vae(cache: &Path, args: &[&str]) -> Output {
    cli_common::vae_command(args).env("VAECUDA_DATA_CACHE", cache).output().expect("run vae")
}

fn ok(cache: &Path, args: &[&str]) -> (String, String) {
    cli_common::succeeded(&vae(cache, args), args)
}

/// Fails, with exactly one `error:` line on stderr and no panic.
fn fails(cache: &Path, args: &[&str]) -> String {
    cli_common::one_error_line(&vae(cache, args), args)
}

/// The test loss of the last epoch line of `vae train`'s output.
fn test_loss(train_out: &str) -> String {
    let line = train_out.lines().rfind(|l| l.starts_with("epoch")).expect("an epoch line");
    line.split("  test ").nth(1).and_then(|t| t.split_whitespace().next()).expect("a test loss").to_string()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn vae_trains_and_evaluates_on_celeba_and_image_folder_layouts() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let celeba = tmp.path().join("celeba");
    faces::write_celeba(&celeba, 40);
    // The CelebA recipe (all 40 images in name order, the centred 24×24 cut, a ReLU output,
    // the tutorial's objective and names), at 16×16 and small widths.
    let run = tmp.path().join("run-celeba");
    let mut args = vec!["train", "--recipe", "celeba", "--data", s(&celeba), "--image-size", "16", "--crop", "24"];
    args.extend(["--hiddens", "8,16", "--latent", "4", "--epochs", "1", "--batch-size", "8", "--out", s(&run)]);
    let (out, err) = ok(&cache, &args);
    assert!(out.contains("on 40 images, testing on 4"), "{out}");
    assert!(out.contains("objective: mse (mean over values) + 0.00025 × KL (mean over images)"), "{out}");
    assert!(err.contains("decoded 40 images") && err.contains("cached in"), "{err}");
    let best = vaecuda::checkpoint::TensorFile::read(&run.join("best.safetensors")).unwrap();
    for name in ["mean_linear.weight", "var_linear.bias", "decoder_projection.weight", "decoder.1.3.weight"] {
        assert!(best.tensors.contains_key(name), "{name} missing from the CelebA tutorial's names");
    }
    // Evaluation reads the test set from the cache, and gets the test loss training printed.
    let eval_args = ["eval", "-c", s(&run), "--data", s(&celeba), "--image-size", "16", "--crop", "24"];
    let (eval, err) = ok(&cache, &eval_args);
    assert!(err.contains("4 images from the cache"), "{err}");
    assert!(eval.contains(&format!("negative ELBO: {} nats/image", test_loss(&out))), "{out}\n{eval}");
    let again = tmp.path().join("run-celeba-2");
    args.pop();
    args.push(s(&again));
    let (_, err) = ok(&cache, &args);
    assert!(err.contains("40 images from the cache") && !err.contains("decoded"), "{err}");
    // Another crop is another cache file.
    let third = tmp.path().join("run-celeba-3");
    args.pop();
    args.extend([s(&third), "--crop", "20"]);
    let (_, err) = ok(&cache, &args);
    assert!(err.contains("decoded 40 images"), "{err}");

    // ImageFolder: trains, evaluates, and `latent` colours by the class names.
    let pets = tmp.path().join("pets");
    jpegs(&pets.join("cat"), "c", 12, 1);
    jpegs(&pets.join("dog"), "d", 12, 50);
    let run = tmp.path().join("run-pets");
    let (out, _) = ok(
        &cache,
        &[
            "train",
            "--data",
            s(&pets),
            "--image-size",
            "8",
            "--hidden",
            "16",
            "--latent",
            "2",
            "--epochs",
            "1",
            "--out",
            s(&run),
        ],
    );
    assert!(out.contains("on 22 images, testing on 2"), "{out}");
    let (eval, _) = ok(&cache, &["eval", "-c", s(&run), "--data", s(&pets), "--image-size", "8"]);
    assert!(eval.contains(&format!("negative ELBO: {} nats/image", test_loss(&out))), "{out}\n{eval}");
    ok(&cache, &["latent", "-c", s(&run), "--data", s(&pets), "--image-size", "8"]);
    let csv = std::fs::read_to_string(run.join("latent.csv")).unwrap();
    let labels: Vec<&str> = csv.lines().skip(1).map(|l| l.split(',').nth(1).unwrap()).collect();
    assert_eq!(labels, ["0", "1"], "{csv}");
}

#[test]
fn vae_refuses_nonsense_data_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let faces_dir = tmp.path().join("faces");
    jpegs(&faces_dir, "", 4, 3);
    let d = s(&faces_dir);
    for (args, says) in [
        (vec!["train", "--data", d, "--image-size", "0"], "--image-size 0"),
        (vec!["train", "--image-size", "0"], "--image-size 0"),
        (vec!["train", "--data", d, "--image-size", "5000"], "1 to 4096"),
        (vec!["train", "--data", d, "--limit-train", "0"], "--limit-train 0"),
        (vec!["train", "--data", d, "--limit-test", "0"], "--limit-test 0"),
    ] {
        let msg = fails(&cache, &args);
        assert!(msg.contains(says), "{args:?}: {msg}");
    }
    // Values that are not numbers at all are the flag parser's to refuse, naming them.
    for (flag, v) in [("--image-size", "-3"), ("--limit-train", "many"), ("--image-size", "1e9")] {
        let o = vae(&cache, &["train", "--data", d, flag, v]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(v) && !err.contains("panicked"), "{flag} {v}: {err}");
    }
    // A folder with nothing to train on says so.
    let empty: PathBuf = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert!(fails(&cache, &["train", "--data", s(&empty)]).contains("no images"));
}

/// End to end, with the memory capped at 1 GiB (VAECUDA_CPU_MEMORY, so any machine runs the
/// test the same way): enough (undecodable) files that at the largest image size they need
/// more memory than that. The refusal must come before any file is read, so it names the
/// size, not a file that does not decode.
#[test]
fn vae_refuses_a_dataset_bigger_than_memory() {
    let cap = 1u64 << 30;
    let per_image = 3 * (vaecuda::data::MAX_IMAGE_SIZE as u64).pow(2);
    let n = cap / per_image + 10;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("many");
    std::fs::create_dir(&dir).unwrap();
    for i in 0..n {
        std::fs::write(dir.join(format!("{i:05}.jpg")), b"not a jpeg").unwrap();
    }
    let size = vaecuda::data::MAX_IMAGE_SIZE.to_string();
    // A model small enough at that size (the default MLP would be refused for its size first).
    let args = ["train", "--data", s(&dir), "--image-size", &size, "--arch", "conv-bn", "--hiddens", "8,8,8,8,8,8,8,8"];
    let o = cli_common::vae_command(&args)
        .env("VAECUDA_DATA_CACHE", tmp.path().join("cache"))
        .env(vaecuda::backend::cpu::MEMORY_CAP_ENV, cap.to_string())
        .output()
        .unwrap();
    let msg = cli_common::one_error_line(&o, &args);
    assert!(msg.contains("the dataset needs") && msg.contains(&format!("{n} images")), "{msg}");
    assert!(msg.contains("is available") && msg.contains("--limit-train") && !msg.contains("decode"), "{msg}");
}
