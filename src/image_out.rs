//! PNG output: image grids (the `image` crate) and the palette; charts and captions are in
//! `charts` (plotters).

use std::path::Path;

use anyhow::{Context, Result};
use image::{Rgb, RgbImage};

/// An 8-bit sRGB colour, `[red, green, blue]`.
pub type Color = [u8; 3];

/// Ten distinguishable colours (matplotlib's tab10), for classes and series.
pub const PALETTE: [Color; 10] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
];

/// Writes a PNG, creating its directory.
pub fn save_png(img: &RgbImage, path: &Path) -> Result<()> {
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png).with_context(|| format!("cannot encode {}", path.display()))?;
    // Whole or not at all: a picture from an earlier run is never left half-overwritten.
    crate::checkpoint::write_atomic(path, png.get_ref())
}

/// `n` images (CHW in [0, 1], 1 or 3 channels) tiled `cols` per row with a `pad`-pixel border.
pub fn image_grid(images: &[f32], n: usize, shape: [usize; 3], cols: usize, pad: usize) -> RgbImage {
    let [c, h, w] = shape;
    let cols = cols.clamp(1, n.max(1));
    let rows = n.div_ceil(cols).max(1);
    let (gw, gh) = (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad);
    let mut img = RgbImage::from_pixel(gw as u32, gh as u32, Rgb([64, 64, 64]));
    let len = c * h * w;
    for k in 0..n {
        let px = &images[k * len..(k + 1) * len];
        let (x0, y0) = (pad + (k % cols) * (w + pad), pad + (k / cols) * (h + pad));
        for y in 0..h {
            for x in 0..w {
                let at = |ch: usize| (px[ch * h * w + y * w + x].clamp(0.0, 1.0) * 255.0).round() as u8;
                let rgb = if c >= 3 { [at(0), at(1), at(2)] } else { [at(0); 3] };
                img.put_pixel((x0 + x) as u32, (y0 + y) as u32, Rgb(rgb));
            }
        }
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_has_the_expected_size_and_pixels() {
        let imgs = vec![1.0f32; 3 * 4 * 5];
        let g = image_grid(&imgs, 3, [1, 4, 5], 2, 1);
        assert_eq!((g.width(), g.height()), (2 * 5 + 3, 2 * 4 + 3));
        assert_eq!(g.get_pixel(1, 1).0, [255, 255, 255]);
    }
}
