//! Folders of images: the layouts people have, the train/test split, parallel decoding to
//! `u8` and the decoded cache.
//!
//! **Layouts** ([`scan`]), all scanned recursively (hidden entries skipped):
//! - CelebA as torchvision or Kaggle leave it: a folder holding `img_align_celeba/` (the images,
//!   possibly one level deeper) and, when present, `list_eval_partition.txt`, whose partition 0
//!   is the training set and 2 the test set (1, validation, is not used);
//! - ImageFolder: every image inside class subfolders (`root/<class>/**/*.jpg`, at least two
//!   classes, none at the top); the sorted subfolder names are the classes, their index the
//!   label;
//! - anything else: every image below the folder, no labels.
//!
//! Without a partition file the last 10% by path of each class (of all images, without
//! classes) are the test set: a fixed split by file name.
//!
//! **The cache** ([`load`]): each set is decoded once, in parallel, and written as one file of
//! bytes, `<cache>/data/<key>.u8`, where the key is a SHA-256 of the set's file list (paths,
//! sizes, modification times), the image size and the format version; later runs read it at
//! disk speed. A changed folder changes the key (the old file is simply not used again); a
//! file whose length, header or checksum is wrong is decoded afresh and rewritten, never
//! trusted. `<cache>` is `$VAECUDA_CACHE`, else `$XDG_CACHE_HOME/vaecuda`, else
//! `~/.cache/vaecuda` (the kernel cache's folder); `VAECUDA_DATA_CACHE=DIR` puts the data files
//! in DIR instead and `VAECUDA_DATA_CACHE=off` turns the cache off. Deleting the folder clears
//! it.

use std::collections::HashMap;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::{decode_image, Dataset};

/// File name extensions read as images (any case).
pub const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// CelebA's images folder, as torchvision and the Kaggle archive name it.
pub const CELEBA_IMAGES: &str = "img_align_celeba";
/// CelebA's split file: `<file name> <0|1|2>` per line (train, validation, test).
pub const CELEBA_PARTITION: &str = "list_eval_partition.txt";
/// The names the split file has: torchvision's text file, the Kaggle archive's CSV.
pub const CELEBA_PARTITION_FILES: [&str; 2] = [CELEBA_PARTITION, "list_eval_partition.csv"];

/// Folders deeper than this below the data folder are not scanned (a symlink loop ends here).
const MAX_DEPTH: usize = 16;

/// How a folder is laid out (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Every image below the folder, no labels.
    Flat,
    /// CelebA: the images under `img_align_celeba/`, split by the partition file when given.
    CelebA {
        /// `list_eval_partition.txt`, when the folder has one.
        partition: Option<PathBuf>,
    },
    /// Class subfolders; labels are the classes' indices.
    ImageFolder,
}

/// One image file of a folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The file.
    pub path: PathBuf,
    /// Its path below the images folder, with `/` separators (what the split sorts by).
    pub rel: String,
    /// Its class, for ImageFolder layouts.
    pub label: Option<u8>,
    /// Its size in bytes.
    pub bytes: u64,
    /// Its modification time, in nanoseconds since the Unix epoch (0 where unknown).
    pub modified_ns: u128,
}

/// A scanned folder: its layout and its train and test images, in order.
#[derive(Clone, Debug)]
pub struct FolderIndex {
    /// The folder the user named.
    pub root: PathBuf,
    /// Where the images are (`root` itself, or its `img_align_celeba/`).
    pub images_dir: PathBuf,
    /// The layout found.
    pub layout: Layout,
    /// Class names (ImageFolder), label k being `classes[k]`; empty otherwise.
    pub classes: Vec<String>,
    /// The training images, sorted by class then path.
    pub train: Vec<Entry>,
    /// The test images, sorted by class then path.
    pub test: Vec<Entry>,
    /// Images the partition file does not assign to train or test (CelebA's validation set
    /// and files it does not list).
    pub unused: usize,
    /// Every image of the folder, sorted by path: what [`FolderIndex::train_on_all`] trains
    /// on.
    pub all: Vec<Entry>,
}

impl FolderIndex {
    /// Trains on every image of the folder in file-name order, as the CelebA tutorial does
    /// (its dataset is `sorted(os.listdir(root))`: all 202,599 images), keeping the test set
    /// for evaluation; the two then overlap.
    pub fn train_on_all(mut self) -> Self {
        self.train = self.all.clone();
        self.unused = 0;
        self
    }

    /// One line describing the layout and split, for logs.
    pub fn describe(&self) -> String {
        let what = match &self.layout {
            Layout::Flat => "images".to_string(),
            Layout::CelebA { partition: Some(p) } => format!("CelebA images (split by {})", p.display()),
            Layout::CelebA { partition: None } => {
                format!("CelebA images (no {CELEBA_PARTITION}: last 10% by name test)")
            }
            Layout::ImageFolder => format!("images in {} classes", self.classes.len()),
        };
        let unused = if self.unused > 0 { format!(", {} unused", self.unused) } else { String::new() };
        // After train_on_all the test images are among the training ones: count each once.
        format!(
            "{}: {} {what}, {} train / {} test{unused}",
            self.images_dir.display(),
            self.all.len(),
            self.train.len(),
            self.test.len()
        )
    }
}

fn is_image(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_lowercase().as_str()))
}

fn is_hidden(p: &Path) -> bool {
    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'))
}

/// Every image file below `dir` (following symlinks, at most [`MAX_DEPTH`] levels), with its
/// size and modification time.
fn walk(dir: &Path, depth: usize, out: &mut Vec<(PathBuf, std::fs::Metadata)>) -> Result<()> {
    let list = std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    for e in list {
        let e = e.with_context(|| format!("cannot list {}", dir.display()))?;
        let p = e.path();
        if is_hidden(&p) {
            continue;
        }
        // Follows symlinks; a dangling one is skipped.
        let Ok(meta) = std::fs::metadata(&p) else { continue };
        if meta.is_dir() {
            if depth < MAX_DEPTH {
                walk(&p, depth + 1, out)?;
            }
        } else if meta.is_file() && is_image(&p) {
            out.push((p, meta));
        }
    }
    Ok(())
}

/// The path of `p` below `base`, `/`-separated.
fn relative(p: &Path, base: &Path) -> String {
    let r = p.strip_prefix(base).unwrap_or(p);
    r.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/")
}

/// Parses `list_eval_partition.txt` (`<file name> <0|1|2>` lines) or the Kaggle archive's
/// `list_eval_partition.csv` (`image_id,partition` header, then `<file name>,<0|1|2>`): file
/// name → partition (0 train, 1 validation, 2 test).
pub fn parse_partition(text: &str) -> Result<HashMap<String, u8>> {
    let mut map = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let mut it = line.split(|c: char| c == ',' || c.is_whitespace()).filter(|w| !w.is_empty());
        let (Some(name), Some(part)) = (it.next(), it.next()) else {
            if line.trim().is_empty() {
                continue;
            }
            bail!("line {}: expected `<file name> <0|1|2>`, found {line:?}", i + 1);
        };
        if i == 0 && part == "partition" {
            continue;
        }
        let part: u8 = part.parse().ok().filter(|p| *p <= 2).with_context(|| {
            format!("line {}: partition {part:?} of {name} is not 0, 1 or 2 (train, validation, test)", i + 1)
        })?;
        map.insert(name.to_string(), part);
    }
    Ok(map)
}

/// Scans a folder of images: finds its layout ([`Layout`]), every image below it, and splits
/// them into train and test (see the module documentation).
pub fn scan(root: &Path) -> Result<FolderIndex> {
    // Absolute, so that the cache key does not depend on the working directory.
    let root = &root.canonicalize().with_context(|| format!("cannot open {}", root.display()))?;
    let partition_in = |d: &Path| CELEBA_PARTITION_FILES.iter().map(|n| d.join(n)).find(|p| p.is_file());
    let named_celeba = root.file_name().is_some_and(|n| n == CELEBA_IMAGES);
    let (images_dir, partition) = if root.join(CELEBA_IMAGES).is_dir() {
        (root.join(CELEBA_IMAGES), partition_in(root))
    } else if named_celeba {
        // The images folder itself, with the partition file beside it.
        (root.clone(), partition_in(root).or_else(|| root.parent().and_then(partition_in)))
    } else {
        (root.clone(), partition_in(root))
    };
    let is_celeba = images_dir != *root || named_celeba || partition.is_some();
    let mut files = vec![];
    walk(&images_dir, 0, &mut files)?;
    ensure!(
        !files.is_empty(),
        "{} has no IDX files and no images ({}, searched recursively)",
        root.display(),
        IMAGE_EXTENSIONS.join(", ")
    );
    let mut entries: Vec<Entry> = files
        .into_iter()
        .map(|(path, meta)| Entry {
            rel: relative(&path, &images_dir),
            label: None,
            bytes: meta.len(),
            modified_ns: meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos()),
            path,
        })
        .collect();
    entries.sort_by(|a, b| a.rel.cmp(&b.rel));

    // ImageFolder: no image at the top, at least two class folders.
    let mut classes: Vec<String> = vec![];
    let layout = if is_celeba {
        Layout::CelebA { partition: partition.clone() }
    } else {
        let class_of = |e: &Entry| e.rel.split_once('/').map(|(c, _)| c.to_string());
        if entries.iter().all(|e| class_of(e).is_some()) {
            classes = entries.iter().filter_map(class_of).collect();
            // Sorted by name ("dog" before "dog-2", although "dog-2/x" sorts before "dog/x").
            classes.sort();
            classes.dedup();
        }
        if classes.len() >= 2 {
            ensure!(
                classes.len() <= 256,
                "{} has {} class folders; labels are bytes, so at most 256 classes (put the images in one folder to train without labels)",
                root.display(),
                classes.len()
            );
            for e in &mut entries {
                let c = class_of(e).expect("every entry has a class");
                e.label = Some(classes.binary_search(&c).expect("class listed") as u8);
            }
            entries.sort_by(|a, b| (a.label, &a.rel).cmp(&(b.label, &b.rel)));
            Layout::ImageFolder
        } else {
            classes.clear();
            Layout::Flat
        }
    };

    let mut all = entries.clone();
    all.sort_by(|a, b| a.rel.cmp(&b.rel));
    let (mut train, mut test, mut unused) = (vec![], vec![], 0);
    if let Some(p) = &partition {
        let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
        let parts =
            parse_partition(&text).with_context(|| format!("{} is not a CelebA partition file", p.display()))?;
        for e in entries {
            let name = e.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            match parts.get(&name) {
                Some(0) => train.push(e),
                Some(2) => test.push(e),
                _ => unused += 1,
            }
        }
    } else {
        // The last 10% of each class by path (entries are sorted by class, then path).
        let mut start = 0;
        while start < entries.len() {
            let label = entries[start].label;
            let end = start + entries[start..].iter().take_while(|e| e.label == label).count();
            let n = end - start;
            let n_test = if n >= 2 { (n / 10).max(1) } else { 0 };
            train.extend_from_slice(&entries[start..end - n_test]);
            test.extend_from_slice(&entries[end - n_test..end]);
            start = end;
        }
    }
    ensure!(
        !train.is_empty() && !test.is_empty(),
        "{} needs at least one training and one test image; it has {} and {}",
        root.display(),
        train.len(),
        test.len()
    );
    Ok(FolderIndex { root: root.to_path_buf(), images_dir, layout, classes, train, test, unused, all })
}

// ---- memory ----

/// The memory the system can give: [`crate::backend::cpu::available_memory`] (what
/// training's estimates are checked against too).
pub fn mem_available() -> Option<u64> {
    crate::backend::cpu::available_memory()
}

/// Refuses, before anything is loaded, a dataset of `images` images of `image_bytes` bytes
/// each when it needs more than `available` bytes (`None`: unknown, accepted).
pub fn ensure_fits(images: usize, image_bytes: usize, available: Option<u64>, size: usize) -> Result<()> {
    let needed = images as u64 * image_bytes as u64;
    if let Some(avail) = available {
        ensure!(
            needed <= avail,
            "the dataset needs {} of memory ({images} images of {image_bytes} bytes at --image-size {size}) but only {} \
             is available; train on a subset (--limit-train N, --limit-test N) or at a smaller --image-size",
            crate::backend::human_bytes(needed),
            crate::backend::human_bytes(avail)
        );
    }
    Ok(())
}

// ---- decoding ----

/// Center-crops to a square (the largest, or `crop`×`crop` as torchvision's `CenterCrop`:
/// padded with black where the image is smaller), resizes to `size`×`size` and writes RGB
/// bytes, CHW, into `out` (`3·size·size` long).
pub fn prepare_image_into(img: image::DynamicImage, size: usize, crop: Option<usize>, out: &mut [u8]) {
    let (w, h) = (img.width(), img.height());
    let img = match crop {
        None => {
            let s = w.min(h);
            img.crop_imm((w - s) / 2, (h - s) / 2, s, s)
        }
        Some(c) => center_crop(&img, c as u32),
    };
    let img = img.resize_exact(size as u32, size as u32, image::imageops::FilterType::Triangle).to_rgb8();
    let plane = size * size;
    for (x, y, p) in img.enumerate_pixels() {
        for c in 0..3 {
            out[c * plane + y as usize * size + x as usize] = p[c];
        }
    }
}

/// torchvision's `CenterCrop(c)`: the c×c square at the centre, its top-left corner at
/// `round((side − c) / 2)` each way; where the image is smaller, it is first padded with
/// zeros, as torchvision pads.
fn center_crop(img: &image::DynamicImage, c: u32) -> image::DynamicImage {
    let (w, h) = (img.width(), img.height());
    // torchvision: int(round((side - c) / 2.0)), Python rounding half to even.
    let corner = |side: u32| -> i64 {
        let d = side as f64 - c as f64;
        (d / 2.0).round_ties_even() as i64
    };
    let (x0, y0) = (corner(w), corner(h));
    if x0 >= 0 && y0 >= 0 {
        return img.crop_imm(x0 as u32, y0 as u32, c, c);
    }
    let src = img.to_rgb8();
    let mut out = image::RgbImage::new(c, c);
    for (x, y, p) in out.enumerate_pixels_mut() {
        let (sx, sy) = (x as i64 + x0, y as i64 + y0);
        if (0..w as i64).contains(&sx) && (0..h as i64).contains(&sy) {
            *p = *src.get_pixel(sx as u32, sy as u32);
        }
    }
    image::DynamicImage::ImageRgb8(out)
}

/// [`prepare_image_into`] a new buffer.
pub fn prepare_image(img: image::DynamicImage, size: usize, crop: Option<usize>) -> Vec<u8> {
    let mut out = vec![0; 3 * size * size];
    prepare_image_into(img, size, crop, &mut out);
    out
}

fn progress_bar(len: usize, what: &str, show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("decoding {what}"));
    bar
}

/// Decodes `entries` in parallel into one buffer of `3·size·size` bytes per image, in order.
pub fn decode_all(
    entries: &[Entry],
    size: usize,
    crop: Option<usize>,
    bar: &indicatif::ProgressBar,
) -> Result<Vec<u8>> {
    let l = 3 * size * size;
    let mut out = vec![0u8; entries.len() * l];
    out.par_chunks_mut(l.max(1)).zip(entries.par_iter()).try_for_each(|(chunk, e)| -> Result<()> {
        let bytes = std::fs::read(&e.path).with_context(|| format!("cannot read image {}", e.path.display()))?;
        let img = decode_image(&bytes).with_context(|| format!("cannot decode image {}", e.path.display()))?;
        prepare_image_into(img, size, crop, chunk);
        bar.inc(1);
        Ok(())
    })?;
    Ok(out)
}

// ---- the cache ----

/// The first bytes of a cache file; the last byte is the format version.
const CACHE_MAGIC: &[u8; 16] = b"vaecuda-u8cache1";
/// Header: magic, key (32 bytes), image count and image length (u64 little-endian each).
const CACHE_HEADER: usize = 16 + 32 + 16;

/// Where decoded datasets are cached: `VAECUDA_DATA_CACHE` when set (`off`: nowhere), else
/// `data/` in the kernel cache's folder.
pub fn default_cache_dir() -> Option<PathBuf> {
    match std::env::var_os("VAECUDA_DATA_CACHE").filter(|v| !v.is_empty()) {
        Some(v) if v == "off" => None,
        Some(v) => Some(PathBuf::from(v)),
        None => crate::backend::cuda::compile::cache_dir().map(|d| d.join("data")),
    }
}

/// The cache key of one set: the format, the image size, the crop and every file's path,
/// label, size and modification time. Without a crop the key is what it was before crops
/// existed, so those caches stay valid.
pub fn cache_key(entries: &[Entry], size: usize, crop: Option<usize>) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(CACHE_MAGIC);
    h.update((size as u64).to_le_bytes());
    if let Some(c) = crop {
        h.update(b"crop");
        h.update((c as u64).to_le_bytes());
    }
    h.update((entries.len() as u64).to_le_bytes());
    for e in entries {
        let p = e.path.to_string_lossy();
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
        h.update([e.label.is_some() as u8, e.label.unwrap_or(0)]);
        h.update(e.bytes.to_le_bytes());
        h.update(e.modified_ns.to_le_bytes());
    }
    h.finalize().into()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// The cache file of a key in `dir`.
pub fn cache_path(dir: &Path, key: &[u8; 32]) -> PathBuf {
    dir.join(format!("{}.u8", hex(key)))
}

fn header(key: &[u8; 32], images: usize, image_len: usize) -> Vec<u8> {
    let mut h = Vec::with_capacity(CACHE_HEADER);
    h.extend_from_slice(CACHE_MAGIC);
    h.extend_from_slice(key);
    h.extend_from_slice(&(images as u64).to_le_bytes());
    h.extend_from_slice(&(image_len as u64).to_le_bytes());
    h
}

/// Reads a cache file: `Ok(None)` when there is none, `Err` (why) when it is damaged (wrong
/// length, header or checksum). Reads straight into the returned buffer, hashing as it goes.
pub fn read_cache(path: &Path, key: &[u8; 32], images: usize, image_len: usize) -> Result<Option<Vec<u8>>> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => bail!("cannot open it: {e}"),
    };
    let payload = images * image_len;
    let want_len = (CACHE_HEADER + payload + 32) as u64;
    let len = f.metadata()?.len();
    ensure!(len == want_len, "it is {len} bytes long, not {want_len}");
    let mut head = [0u8; CACHE_HEADER];
    f.read_exact(&mut head)?;
    ensure!(head[..] == header(key, images, image_len)[..], "its header does not match");
    let mut h = Sha256::new();
    h.update(head);
    let mut out = vec![0u8; payload];
    for chunk in out.chunks_mut(16 << 20) {
        f.read_exact(chunk)?;
        h.update(&*chunk);
    }
    let mut sum = [0u8; 32];
    f.read_exact(&mut sum)?;
    ensure!(sum[..] == h.finalize()[..], "its checksum does not match its contents");
    Ok(Some(out))
}

/// Writes a cache file through a temporary file renamed into place, so a crash or a second
/// process never leaves a half-written file under the real name.
pub fn write_cache(path: &Path, key: &[u8; 32], image_len: usize, pixels: &[u8]) -> Result<()> {
    let dir = path.parent().context("cache path has no folder")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let write = || -> Result<()> {
        let mut f = std::io::BufWriter::with_capacity(4 << 20, std::fs::File::create(&tmp)?);
        let head = header(key, pixels.len() / image_len.max(1), image_len);
        let mut h = Sha256::new();
        h.update(&head);
        f.write_all(&head)?;
        for chunk in pixels.chunks(16 << 20) {
            h.update(chunk);
            f.write_all(chunk)?;
        }
        f.write_all(&h.finalize())?;
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// How a set was loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheUse {
    /// Read from this cache file.
    Hit(PathBuf),
    /// Decoded, and the cache file written.
    Written(PathBuf),
    /// The cache file was damaged (why): decoded afresh and rewritten.
    Rebuilt(PathBuf, String),
    /// Decoded; the cache could not be written (why).
    NotWritten(String),
    /// Decoded; the cache is off.
    Off,
    /// Nothing to load (an empty set).
    Empty,
}

/// What [`load`] reads with.
#[derive(Clone, Debug)]
pub struct Options {
    /// The cache folder (`None`: no cache).
    pub cache_dir: Option<PathBuf>,
    /// Memory available for the dataset, in bytes (`None`: unknown, not checked).
    pub mem_available: Option<u64>,
    /// Show a progress bar while decoding.
    pub progress: bool,
    /// Print what was loaded, from where and how fast, on stderr.
    pub log: bool,
    /// Center-crop every image to this square before resizing (`--crop`); `None`: the
    /// largest centred square.
    pub crop: Option<usize>,
}

impl Default for Options {
    /// The cache in [`default_cache_dir`], `MemAvailable`, a progress bar when stderr is a
    /// terminal, and the log.
    fn default() -> Self {
        Options {
            cache_dir: default_cache_dir(),
            mem_available: mem_available(),
            progress: std::io::stderr().is_terminal(),
            log: true,
            crop: None,
        }
    }
}

/// The two sets of a folder and how each was loaded.
#[derive(Debug)]
pub struct Loaded {
    /// The training set.
    pub train: Dataset,
    /// The test set.
    pub test: Dataset,
    /// How the training set was loaded.
    pub train_cache: CacheUse,
    /// How the test set was loaded.
    pub test_cache: CacheUse,
}

/// Loads the first `limit_train` training and `limit_test` test images of a scanned folder
/// (all when `None`) as RGB `size`×`size` bytes, each set from its cache file or decoded (and
/// then cached). Refuses, before reading any image, sets that need more memory than is
/// available.
pub fn load(
    index: &FolderIndex,
    size: usize,
    limit_train: Option<usize>,
    limit_test: Option<usize>,
    opts: &Options,
) -> Result<Loaded> {
    let pick = |v: &[Entry], l: Option<usize>| v[..l.unwrap_or(v.len()).min(v.len())].to_vec();
    let (train, test) = (pick(&index.train, limit_train), pick(&index.test, limit_test));
    let image_len = 3 * size * size;
    ensure_fits(train.len() + test.len(), image_len, opts.mem_available, size)?;
    if opts.log {
        eprintln!("data: {}", index.describe());
    }
    let (train_px, train_cache) = load_set(&train, size, "train", opts)?;
    let (test_px, test_cache) = load_set(&test, size, "test", opts)?;
    let dataset = |px: Vec<u8>, entries: &[Entry]| Dataset {
        pixels: Arc::new(px),
        labels: (index.layout == Layout::ImageFolder).then(|| entries.iter().map(|e| e.label.unwrap_or(0)).collect()),
        classes: index.classes.clone(),
        len: entries.len(),
        channels: 3,
        height: size,
        width: size,
    };
    Ok(Loaded { train: dataset(train_px, &train), test: dataset(test_px, &test), train_cache, test_cache })
}

/// One set's pixels: from its cache file, else decoded (and cached).
fn load_set(entries: &[Entry], size: usize, what: &str, opts: &Options) -> Result<(Vec<u8>, CacheUse)> {
    if entries.is_empty() {
        return Ok((vec![], CacheUse::Empty));
    }
    let image_len = 3 * size * size;
    let key = cache_key(entries, size, opts.crop);
    let path = opts.cache_dir.as_deref().map(|d| cache_path(d, &key));
    let mut damaged = None;
    if let Some(p) = &path {
        let start = Instant::now();
        match read_cache(p, &key, entries.len(), image_len) {
            Ok(Some(px)) => {
                if opts.log {
                    let s = start.elapsed().as_secs_f64();
                    eprintln!(
                        "data: {what}: {} images from the cache {} in {s:.2} s ({}/s)",
                        entries.len(),
                        p.display(),
                        crate::backend::human_bytes((px.len() as f64 / s.max(1e-9)) as u64)
                    );
                }
                return Ok((px, CacheUse::Hit(p.clone())));
            }
            Ok(None) => {}
            Err(e) => {
                let why = format!("{e:#}");
                if opts.log {
                    eprintln!("note: the cache file {} is damaged ({why}); decoding the images again", p.display());
                }
                damaged = Some(why);
            }
        }
    }
    let bar = progress_bar(entries.len(), what, opts.progress);
    let start = Instant::now();
    let px = decode_all(entries, size, opts.crop, &bar);
    bar.finish_and_clear();
    let px = px?;
    let secs = start.elapsed().as_secs_f64();
    let outcome = match &path {
        None => CacheUse::Off,
        Some(p) => match write_cache(p, &key, image_len, &px) {
            Ok(()) => match damaged {
                Some(why) => CacheUse::Rebuilt(p.clone(), why),
                None => CacheUse::Written(p.clone()),
            },
            Err(e) => CacheUse::NotWritten(format!("cannot write the cache file {}: {e:#}", p.display())),
        },
    };
    if opts.log {
        let cached = match &outcome {
            CacheUse::Written(p) | CacheUse::Rebuilt(p, _) => {
                format!(
                    "; cached in {} ({}; delete it to clear the cache)",
                    p.display(),
                    crate::backend::human_bytes(px.len() as u64)
                )
            }
            CacheUse::NotWritten(why) => format!("; not cached: {why}"),
            _ => String::new(),
        };
        eprintln!(
            "data: {what}: decoded {} images in {secs:.1} s ({:.0} images/s){cached}",
            entries.len(),
            entries.len() as f64 / secs.max(1e-9)
        );
    }
    Ok((px, outcome))
}
