//! CelebA-like pictures for the data tests and the CelebA benchmark (`benches/celeba_like.rs`
//! includes this file): a face-like arrangement of soft blobs (head, eyes, mouth, hair) whose
//! colours, positions and sizes vary with the seed, on a gradient background, plus per-pixel
//! noise, so a JPEG of one is about as hard to compress as a photo.
#![allow(dead_code)]

/// A small, fast generator (SplitMix64), so the pictures depend on the seed alone.
pub struct Mix(pub u64);

impl Mix {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Picture `seed`, `w`×`h` pixels.
pub fn face(seed: u64, w: u32, h: u32) -> image::RgbImage {
    let mut r = Mix(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0x5EED);
    let (wf, hf) = (w as f32, h as f32);
    let bg0 = [r.range(0.0, 255.0), r.range(0.0, 255.0), r.range(0.0, 255.0)];
    let bg1 = [r.range(0.0, 255.0), r.range(0.0, 255.0), r.range(0.0, 255.0)];
    let skin = [r.range(150.0, 255.0), r.range(100.0, 200.0), r.range(70.0, 160.0)];
    let hair = [r.range(0.0, 120.0), r.range(0.0, 90.0), r.range(0.0, 60.0)];
    let (cx, cy) = (wf * r.range(0.42, 0.58), hf * r.range(0.45, 0.58));
    let (rx, ry) = (wf * r.range(0.22, 0.32), hf * r.range(0.25, 0.33));
    let eye_dx = rx * r.range(0.3, 0.45);
    let eye_y = cy - ry * r.range(0.1, 0.3);
    let eye_r = rx * r.range(0.08, 0.15);
    let mouth_y = cy + ry * r.range(0.35, 0.55);
    let (mouth_w, mouth_h) = (rx * r.range(0.25, 0.5), ry * r.range(0.05, 0.12));
    let noise = r.range(8.0, 30.0);
    let mut n = Mix(r.next());
    image::RgbImage::from_fn(w, h, |x, y| {
        let (xf, yf) = (x as f32 + 0.5, y as f32 + 0.5);
        let t = yf / hf;
        let mut c = [0f32; 3];
        for k in 0..3 {
            c[k] = bg0[k] * (1.0 - t) + bg1[k] * t;
        }
        let ell = |dx: f32, dy: f32, a: f32, b: f32| (dx / a).powi(2) + (dy / b).powi(2);
        let blend = |c: &mut [f32; 3], col: [f32; 3], d: f32| {
            // Soft edge: fully inside below 0.8, fading out by 1.2.
            let a = ((1.2 - d) / 0.4).clamp(0.0, 1.0);
            for k in 0..3 {
                c[k] = c[k] * (1.0 - a) + col[k] * a;
            }
        };
        blend(&mut c, hair, ell(xf - cx, yf - (cy - ry * 0.25), rx * 1.25, ry * 1.1));
        blend(&mut c, skin, ell(xf - cx, yf - cy, rx, ry));
        for side in [-1.0, 1.0] {
            blend(&mut c, [30.0, 25.0, 20.0], ell(xf - cx - side * eye_dx, yf - eye_y, eye_r, eye_r * 0.7));
        }
        blend(&mut c, [150.0, 40.0, 50.0], ell(xf - cx, yf - mouth_y, mouth_w, mouth_h));
        let mut px = [0u8; 3];
        for k in 0..3 {
            let z = (n.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            px[k] = (c[k] + z * 2.0 * noise).clamp(0.0, 255.0) as u8;
        }
        image::Rgb(px)
    })
}

/// Writes picture `seed` as a JPEG (quality 90, as CelebA's files roughly are).
pub fn write_jpeg(path: &std::path::Path, seed: u64, w: u32, h: u32) {
    let img = face(seed, w, h);
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).expect("create image file"));
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90).encode_image(&img).expect("encode JPEG");
}

/// A CelebA folder as torchvision leaves it: `root/img_align_celeba/NNNNNN.jpg` (178×218) and
/// `root/list_eval_partition.txt`, partitions in CelebA's proportions (about 80/10/10% of
/// train/validation/test, in file-name order). Written in parallel.
pub fn write_celeba(root: &std::path::Path, n: usize) {
    use rayon::prelude::*;
    let images = root.join("img_align_celeba");
    std::fs::create_dir_all(&images).expect("create img_align_celeba");
    (1..=n).into_par_iter().for_each(|i| write_jpeg(&images.join(format!("{i:06}.jpg")), i as u64, 178, 218));
    let part = |i: usize| {
        let f = i as f64 / n as f64;
        if f <= 0.8 {
            0
        } else if f <= 0.9 {
            1
        } else {
            2
        }
    };
    let text: String = (1..=n).map(|i| format!("{i:06}.jpg {}\n", part(i))).collect();
    std::fs::write(root.join("list_eval_partition.txt"), text).expect("write list_eval_partition.txt");
}
