//! Datasets: IDX files (MNIST, Fashion-MNIST, any directory of the four standard files, `.gz`
//! or raw), the MNIST copy bundled in `data/mnist/` (checked against its SHA256SUMS), and
//! folders of images (CelebA-style: center-cropped, resized, RGB). Pixels are bytes standing
//! for [0, 1].
//!
//! Pixels are `u8` from the file to the device: a dataset is uploaded to the backend once
//! ([`DeviceData`]) as bytes, and batches are gathered on the device by index and converted to
//! floats there, so an epoch moves only the shuffled index list and a dataset costs one byte
//! per pixel. Image folders (flat, nested, CelebA's, ImageFolder's) and their decoded cache
//! are [`folder`]'s.

pub mod folder;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use sha2::{Digest, Sha256};

use crate::backend::Backend;
use crate::ops::elementwise::PIXEL_MAX;
use crate::rng::Rng;
use crate::tensor::Tensor;

/// Images as `u8` pixels (0..=255 standing for [0, 1]), NCHW, with optional class labels.
/// Pixels stay bytes in host memory and on the device; a batch becomes floats only when it is
/// gathered ([`DeviceData::batch`]), so a dataset costs one byte per pixel.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// The pixels of every image, image after image, each `channels × height × width`. Shared
    /// (not copied) with the CPU backend when uploaded.
    pub pixels: Arc<Vec<u8>>,
    /// One class label per image, when the data has them.
    pub labels: Option<Vec<u8>>,
    /// Class names for labels 0, 1, … (an ImageFolder's subfolders); empty when unknown.
    pub classes: Vec<String>,
    /// The number of images.
    pub len: usize,
    /// Colour channels (1 for IDX, 3 for image folders).
    pub channels: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Image width in pixels.
    pub width: usize,
}

impl Dataset {
    /// Pixels per image (`channels × height × width`), also its size in bytes.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }
    /// The first `n` images (all of them when `n` is larger). Frees the rest when nothing
    /// else holds the pixels.
    pub fn truncate(mut self, n: usize) -> Self {
        let n = n.min(self.len);
        if n < self.len {
            let keep = n * self.image_len();
            let mut v = Arc::try_unwrap(self.pixels).unwrap_or_else(|shared| shared[..keep].to_vec());
            v.truncate(keep);
            v.shrink_to_fit();
            self.pixels = Arc::new(v);
        }
        if let Some(l) = &mut self.labels {
            l.truncate(n);
        }
        self.len = n;
        self
    }
    /// Image `i`'s pixels as bytes.
    pub fn image_bytes(&self, i: usize) -> &[u8] {
        let l = self.image_len();
        &self.pixels[i * l..(i + 1) * l]
    }
    /// Image `i`'s pixels in [0, 1] (`byte / 255`, as a gathered batch has them).
    pub fn image(&self, i: usize) -> Vec<f32> {
        self.image_bytes(i).iter().map(|&b| b as f32 / PIXEL_MAX as f32).collect()
    }
    /// Images at `idx`, concatenated, in [0, 1].
    pub fn gather(&self, idx: &[usize]) -> Vec<f32> {
        idx.iter().flat_map(|&i| self.image(i)).collect()
    }

    /// The images at `idx`, in that order, as a new set (labels and classes kept).
    pub fn subset(&self, idx: &[usize]) -> Dataset {
        Dataset {
            pixels: Arc::new(idx.iter().flat_map(|&i| self.image_bytes(i).iter().copied()).collect()),
            labels: self.labels.as_ref().map(|l| idx.iter().map(|&i| l[i]).collect()),
            classes: self.classes.clone(),
            len: idx.len(),
            channels: self.channels,
            height: self.height,
            width: self.width,
        }
    }

    /// Splits off `n` images chosen by `seed` (a seeded shuffle, as torch's `random_split`
    /// draws a permutation): (the rest, the held-out `n`), each in its original order.
    pub fn hold_out(&self, n: usize, seed: u64) -> Result<(Dataset, Dataset)> {
        ensure!(
            n < self.len,
            "--holdout {n} leaves no training images: the training set has {} (give fewer)",
            self.len
        );
        let mut order: Vec<usize> = (0..self.len).collect();
        crate::rng::Rng::new(seed).shuffle(&mut order);
        let (mut held, mut rest) = (order[..n].to_vec(), order[n..].to_vec());
        held.sort_unstable();
        rest.sort_unstable();
        Ok((self.subset(&rest), self.subset(&held)))
    }
}

/// An IDX array: its dimensions and unsigned-byte payload.
#[derive(Clone, Debug)]
pub struct Idx {
    /// The dimensions, outermost first (e.g. [n, rows, cols]).
    pub dims: Vec<usize>,
    /// The bytes, row-major.
    pub data: Vec<u8>,
}

/// How much larger than its file a decoded file may be. DEFLATE (gzip, PNG) cannot expand
/// data by more than about 1032:1, so a real file stays under this; a "zip bomb" is refused
/// before it fills memory.
pub const MAX_EXPANSION: u64 = 1100;

/// Reads a whole file, decompressing it when its name ends in `.gz` (to at most
/// [`MAX_EXPANSION`] times the file's size).
pub fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "gz") {
        gunzip(&raw).with_context(|| format!("{} is not a valid gzip file", path.display()))
    } else {
        Ok(raw)
    }
}

/// Decompresses gzip bytes, refusing output beyond [`MAX_EXPANSION`] times the input.
pub fn gunzip(raw: &[u8]) -> Result<Vec<u8>> {
    let limit = raw.len() as u64 * MAX_EXPANSION;
    // The gzip trailer ends with ISIZE, the uncompressed size mod 2³² (RFC 1952). Sized from
    // it, the output is written once, where `read_to_end` growing an empty vector would copy
    // it at every doubling and fault its pages in twice (MNIST's 47 MB of training images).
    // The field is untrusted: only a hint, and one claiming more than 16 times the file
    // (MNIST's images expand 4.8 times) is ignored, so a damaged header reserves nothing big.
    let isize_field = raw.len().checked_sub(4).map_or(0, |at| u32::from_le_bytes(raw[at..].try_into().unwrap()));
    let hint = if u64::from(isize_field) <= 16 * raw.len() as u64 { isize_field as usize } else { 0 };
    let mut out = Vec::with_capacity(hint);
    flate2::read::GzDecoder::new(raw).take(limit + 1).read_to_end(&mut out)?;
    ensure!(out.len() as u64 <= limit, "it decompresses to more than {MAX_EXPANSION} times its size");
    Ok(out)
}

/// Decodes an image file, refusing (before decoding) one whose header claims more pixels than
/// [`MAX_EXPANSION`] times the file's size could hold, with a floor of 4 MiB.
pub fn decode_image(bytes: &[u8]) -> Result<image::DynamicImage> {
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format()?;
    let mut limits = image::Limits::default();
    limits.max_alloc = Some((bytes.len() as u64 * MAX_EXPANSION).max(4 << 20));
    reader.limits(limits);
    Ok(reader.decode()?)
}

/// Parses IDX bytes (magic 0x00 0x00 0x08 ndim, big-endian u32 dims, then the bytes).
pub fn parse_idx(bytes: &[u8]) -> Result<Idx> {
    let dims = parse_idx_header(bytes)?;
    let header = 4 + 4 * dims.len();
    Ok(Idx { dims, data: bytes[header..].to_vec() })
}

/// [`parse_idx`] of bytes it may keep: the payload is moved to the front of the same
/// allocation instead of copied, so a file is in memory once.
pub fn parse_idx_owned(mut bytes: Vec<u8>) -> Result<Idx> {
    let dims = parse_idx_header(&bytes)?;
    bytes.drain(..4 + 4 * dims.len());
    Ok(Idx { dims, data: bytes })
}

/// The dimensions of IDX bytes, checked against the payload's length.
fn parse_idx_header(bytes: &[u8]) -> Result<Vec<usize>> {
    ensure!(bytes.len() >= 4, "too short for an IDX header ({} bytes)", bytes.len());
    ensure!(
        bytes[0] == 0 && bytes[1] == 0,
        "bad IDX magic number {:02x}{:02x}{:02x}{:02x}",
        bytes[0],
        bytes[1],
        bytes[2],
        bytes[3]
    );
    ensure!(bytes[2] == 0x08, "IDX element type 0x{:02x} is not unsigned byte (0x08)", bytes[2]);
    let ndim = bytes[3] as usize;
    ensure!((1..=4).contains(&ndim), "IDX file has {ndim} dimensions");
    let header = 4 + 4 * ndim;
    ensure!(bytes.len() >= header, "IDX header truncated");
    let dims: Vec<usize> =
        (0..ndim).map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize).collect();
    // Checked: four u32 dimensions can overflow a usize product.
    let n = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    let n = n.with_context(|| format!("IDX dimensions {dims:?} are impossibly large"))?;
    ensure!(
        bytes.len() - header == n,
        "IDX dimensions {dims:?} need {n} bytes of data but the file has {}",
        bytes.len() - header
    );
    Ok(dims)
}

/// The bytes of `<dir>/<name>` or `<dir>/<name>.gz`, decompressed, and the path used.
fn read_named(dir: &Path, name: &str) -> Result<(Vec<u8>, PathBuf)> {
    for candidate in [dir.join(name), dir.join(format!("{name}.gz"))] {
        if candidate.is_file() {
            return Ok((read_maybe_gz(&candidate)?, candidate));
        }
    }
    bail!("{} has no {name} (or {name}.gz)", dir.display())
}

/// Expected SHA-256 of decompressed files, from a `SHA256SUMS` file (`<hex>  <name>` lines).
fn read_sums(dir: &Path) -> Result<Option<Vec<(String, String)>>> {
    let path = dir.join("SHA256SUMS");
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Some(
        text.lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                Some((it.next()?.to_lowercase(), it.next()?.trim_start_matches('*').to_string()))
            })
            .collect(),
    ))
}

/// Loads one split (`train` or `t10k`) of an IDX directory, checking that images and labels
/// agree and, when the directory has a SHA256SUMS, that the decompressed bytes match it.
pub fn load_idx_split(dir: &Path, split: &str) -> Result<Dataset> {
    let sums = read_sums(dir)?;
    let read = |name: String| -> Result<Idx> {
        let (bytes, path) = read_named(dir, &name)?;
        if let Some(sums) = &sums {
            if let Some((want, _)) = sums.iter().find(|(_, n)| *n == name) {
                let got: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
                ensure!(
                    &got == want,
                    "{} is corrupt: SHA-256 of its contents is {got}, SHA256SUMS says {want}",
                    path.display()
                );
            }
        }
        parse_idx_owned(bytes).with_context(|| format!("{} is not a valid IDX file", path.display()))
    };
    let images_name = format!("{split}-images-idx3-ubyte");
    let labels_name = format!("{split}-labels-idx1-ubyte");
    let images = read(images_name.clone())?;
    let labels = read(labels_name.clone())?;
    ensure!(
        images.dims.len() == 3,
        "{}/{images_name}: expected 3 dimensions [n, rows, cols], found {:?}",
        dir.display(),
        images.dims
    );
    ensure!(
        labels.dims.len() == 1,
        "{}/{labels_name}: expected 1 dimension [n], found {:?}",
        dir.display(),
        labels.dims
    );
    ensure!(
        images.dims[0] == labels.dims[0],
        "{}: {images_name} has {} images but {labels_name} has {} labels",
        dir.display(),
        images.dims[0],
        labels.dims[0]
    );
    let (n, h, w) = (images.dims[0], images.dims[1], images.dims[2]);
    Ok(Dataset {
        pixels: Arc::new(images.data),
        labels: Some(labels.data),
        classes: vec![],
        len: n,
        channels: 1,
        height: h,
        width: w,
    })
}

/// Where the bundled MNIST lives: next to the sources this binary was built from, else
/// `data/mnist` under the working directory, else next to the executable (and two levels up,
/// for `target/<profile>/vae`).
pub fn bundled_mnist_dir() -> Result<PathBuf> {
    let mut tried = vec![PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/mnist"), PathBuf::from("data/mnist")];
    if let Some(exe_dir) = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf)) {
        tried.push(exe_dir.join("data/mnist"));
        tried.push(exe_dir.join("../../data/mnist"));
    }
    for dir in &tried {
        if dir.join("SHA256SUMS").is_file() {
            return Ok(dir.clone());
        }
    }
    let list: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
    bail!("the bundled MNIST was not found (looked in {}); pass --data DIR", list.join(", "))
}

/// True when `dir` holds IDX training files.
pub fn is_idx_dir(dir: &Path) -> bool {
    ["train-images-idx3-ubyte", "train-images-idx3-ubyte.gz"].iter().any(|n| dir.join(n).is_file())
}

/// The largest `--image-size` accepted: larger squares are no image size a VAE here trains at
/// (and a folder at that size would need gigabytes per thousand images).
pub const MAX_IMAGE_SIZE: usize = 4096;

/// Where images come from.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Source {
    /// A directory of IDX files (`None`: the bundled MNIST).
    Idx(Option<PathBuf>),
    /// A folder of images, resized to the given square size (see [`folder`] for the layouts),
    /// and how its images are chosen and cropped (absent from older run.json files: the
    /// defaults).
    Folder(PathBuf, usize, #[serde(default)] FolderOptions),
}

/// How a folder's images are chosen and cut (`--crop`, `--celeba-train`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FolderOptions {
    /// Center-crop to this square before resizing (torchvision's `CenterCrop`); `None`: the
    /// largest centred square.
    #[serde(default)]
    pub crop: Option<usize>,
    /// Train on every image in file-name order (the CelebA tutorial's 202,599), not only the
    /// partition's training set; the test set stays the evaluation set.
    #[serde(default)]
    pub train_on_all: bool,
}

impl Source {
    /// Chooses by contents: IDX files win, otherwise a folder of images. Refuses an image size
    /// of 0 or above [`MAX_IMAGE_SIZE`].
    pub fn detect(dir: Option<&Path>, image_size: usize, options: FolderOptions) -> Result<Self> {
        ensure!(
            (1..=MAX_IMAGE_SIZE).contains(&image_size),
            "--image-size {image_size} is not a usable image size: give the side of the square images are \
             resized to, 1 to {MAX_IMAGE_SIZE} (e.g. 64)"
        );
        if let Some(c) = options.crop {
            ensure!(
                (1..=MAX_IMAGE_SIZE).contains(&c),
                "--crop {c} is not a usable crop: give the side of the centred square to cut, 1 to {MAX_IMAGE_SIZE} (e.g. 168)"
            );
        }
        let folder_only = |what: &str| format!("{what} applies to folders of images, not to IDX files");
        match dir {
            None => {
                ensure!(options.crop.is_none(), folder_only("--crop"));
                ensure!(!options.train_on_all, folder_only("--celeba-train all"));
                Ok(Source::Idx(None))
            }
            Some(d) => {
                ensure!(d.is_dir(), "data directory {} does not exist", d.display());
                if is_idx_dir(d) {
                    ensure!(options.crop.is_none(), folder_only("--crop"));
                    ensure!(!options.train_on_all, folder_only("--celeba-train all"));
                    Ok(Source::Idx(Some(d.to_path_buf())))
                } else {
                    Ok(Source::Folder(d.to_path_buf(), image_size, options))
                }
            }
        }
    }

    /// The train and test sets, each cut to its limit. Image folders are split by their
    /// layout ([`folder::scan`]): CelebA's list_eval_partition.txt when present, otherwise the
    /// last 10% by file name (of each class) are the test set; the limits take the first
    /// images of each set, and only those are decoded (or read from the cache).
    pub fn load(&self, limit_train: Option<usize>, limit_test: Option<usize>) -> Result<(Dataset, Dataset)> {
        let cut = |d: Dataset, l: Option<usize>| match l {
            Some(l) => d.truncate(l),
            None => d,
        };
        match self {
            Source::Idx(dir) => {
                let dir = match dir {
                    Some(d) => d.clone(),
                    None => bundled_mnist_dir()?,
                };
                let train = load_idx_split(&dir, "train")?;
                let test = load_idx_split(&dir, "t10k")?;
                ensure!(
                    (train.height, train.width) == (test.height, test.width),
                    "{}: train images are {}×{} but test images are {}×{}",
                    dir.display(),
                    train.height,
                    train.width,
                    test.height,
                    test.width
                );
                Ok((cut(train, limit_train), cut(test, limit_test)))
            }
            Source::Folder(dir, size, options) => {
                let mut index = folder::scan(dir)?;
                if options.train_on_all {
                    ensure!(
                        matches!(index.layout, folder::Layout::CelebA { .. }),
                        "--celeba-train all needs a CelebA folder, but {} is laid out as {}",
                        dir.display(),
                        index.describe()
                    );
                    index = index.train_on_all();
                }
                let opts = folder::Options { crop: options.crop, ..folder::Options::default() };
                let l = folder::load(&index, *size, limit_train, limit_test, &opts)?;
                Ok((l.train, l.test))
            }
        }
    }

    /// The [channels, height, width] of its images, read cheaply: a folder's comes from its
    /// resize size, IDX files' from the first test image.
    pub fn image_shape(&self) -> Result<[usize; 3]> {
        Ok(match self {
            Source::Folder(_, s, _) => [3, *s, *s],
            src => {
                let t = src.load_test(Some(1))?;
                [t.channels, t.height, t.width]
            }
        })
    }

    /// Only the test set (a folder decodes, or reads from the cache, only its test images).
    pub fn load_test(&self, limit: Option<usize>) -> Result<Dataset> {
        match self {
            Source::Idx(dir) => {
                let dir = match dir {
                    Some(d) => d.clone(),
                    None => bundled_mnist_dir()?,
                };
                let test = load_idx_split(&dir, "t10k")?;
                Ok(match limit {
                    Some(l) => test.truncate(l),
                    None => test,
                })
            }
            Source::Folder(..) => Ok(self.load(Some(0), limit)?.1),
        }
    }
}

/// A dataset on the backend: its `u8` pixels uploaded once (on the CPU, shared with the host
/// copy), batches gathered and converted to floats on the device.
pub struct DeviceData<B: Backend> {
    /// Every image's pixels, as bytes.
    pub pixels: B::Bytes,
    /// The number of images.
    pub len: usize,
    /// [channels, height, width] of one image.
    pub shape: [usize; 3],
}

impl<B: Backend> DeviceData<B> {
    /// Uploads a dataset's pixels (the CPU backend keeps a reference: no copy).
    pub fn upload(backend: &B, d: &Dataset) -> Self {
        DeviceData { pixels: backend.upload_bytes(&d.pixels), len: d.len, shape: [d.channels, d.height, d.width] }
    }
    /// The images at `idx` as a [idx.len(), c, h, w] tensor in [0, 1], gathered on the device.
    pub fn batch(&self, backend: &B, idx: &[u32]) -> Tensor<B> {
        let row: usize = self.shape.iter().product();
        let mut out = Tensor::empty(backend, &[idx.len(), self.shape[0], self.shape[1], self.shape[2]]);
        backend.gather_rows_u8(&self.pixels, row, idx, &mut out.buf);
        out
    }
    /// Index batches of one epoch: shuffled with `rng` when given, the last batch partial.
    pub fn epoch_batches(&self, batch: usize, rng: Option<&mut Rng>) -> Vec<Vec<u32>> {
        let mut order: Vec<u32> = (0..self.len as u32).collect();
        if let Some(r) = rng {
            r.shuffle(&mut order);
        }
        order.chunks(batch.max(1)).map(<[u32]>::to_vec).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            v.extend(d.to_be_bytes());
        }
        v.extend(data);
        v
    }

    #[test]
    fn parses_and_validates_idx() {
        let ok = parse_idx(&idx_bytes(&[2, 2, 1], &[1, 2, 3, 4])).unwrap();
        assert_eq!(ok.dims, [2, 2, 1]);
        assert!(parse_idx(&idx_bytes(&[2, 2, 2], &[1, 2, 3, 4])).is_err());
        let mut bad = idx_bytes(&[1], &[0]);
        bad[0] = 7;
        assert!(parse_idx(&bad).unwrap_err().to_string().contains("magic"));
    }

    #[test]
    fn bundled_mnist_matches_its_sums() {
        let test = Source::Idx(None).load_test(Some(10)).unwrap();
        assert_eq!((test.len, test.channels, test.height, test.width), (10, 1, 28, 28));
        assert_eq!(test.labels.as_ref().unwrap()[..3], [7, 2, 1]);
        assert_eq!(test.pixels.len(), 10 * 28 * 28);
        assert!(test.image(0).iter().all(|&p| (0.0..=1.0).contains(&p)));
    }
}
