//! PNG output: image grids and simple plots (axes, tick numbers in a built-in 3×5 bitmap font,
//! lines, dots), drawn pixel by pixel on an RGB canvas; no plotting crate.

use std::path::Path;

use anyhow::{Context, Result};
use image::{Rgb, RgbImage};

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
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    img.save_with_format(path, image::ImageFormat::Png).with_context(|| format!("cannot write {}", path.display()))
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

/// 3×5 glyphs, one row per number, bit 2 is the left column.
fn glyph(ch: char) -> Option<[u8; 5]> {
    Some(match ch.to_ascii_uppercase() {
        '0' | 'O' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 7, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' | 'S' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        '+' => [0, 2, 7, 2, 0],
        ' ' => [0, 0, 0, 0, 0],
        'A' => [2, 5, 7, 5, 5],
        'B' => [6, 5, 6, 5, 6],
        'C' => [7, 4, 4, 4, 7],
        'E' => [7, 4, 6, 4, 7],
        'H' => [5, 5, 7, 5, 5],
        'I' => [7, 2, 2, 2, 7],
        'K' => [5, 5, 6, 5, 5],
        'L' => [4, 4, 4, 4, 7],
        'N' => [6, 5, 5, 5, 5],
        'P' => [7, 5, 7, 4, 4],
        'R' => [6, 5, 6, 5, 5],
        'T' => [7, 2, 2, 2, 2],
        'Z' => [7, 1, 2, 4, 7],
        _ => return None,
    })
}

/// An RGB canvas with a few drawing primitives.
pub struct Canvas {
    pub img: RgbImage,
}

impl Canvas {
    pub fn new(w: u32, h: u32) -> Self {
        Canvas { img: RgbImage::from_pixel(w, h, Rgb([255, 255, 255])) }
    }
    pub fn put(&mut self, x: i64, y: i64, c: Color) {
        if x >= 0 && y >= 0 && (x as u32) < self.img.width() && (y as u32) < self.img.height() {
            self.img.put_pixel(x as u32, y as u32, Rgb(c));
        }
    }
    /// Bresenham line, `thick` pixels wide.
    pub fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: Color, thick: i64) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            for t in 0..thick {
                for u in 0..thick {
                    self.put(x + t - thick / 2, y + u - thick / 2, c);
                }
            }
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }
    /// A filled disc.
    pub fn dot(&mut self, x: i64, y: i64, r: i64, c: Color) {
        for v in -r..=r {
            for u in -r..=r {
                if u * u + v * v <= r * r {
                    self.put(x + u, y + v, c);
                }
            }
        }
    }
    /// Text in the 3×5 font scaled by `s`, top-left at (x, y); unknown characters are skipped.
    pub fn text(&mut self, x: i64, y: i64, text: &str, s: i64, c: Color) {
        for (k, ch) in text.chars().enumerate() {
            let Some(g) = glyph(ch) else { continue };
            for (row, bits) in g.iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) != 0 {
                        for v in 0..s {
                            for u in 0..s {
                                self.put(x + (k as i64 * 4 + col) * s + u, y + row as i64 * s + v, c);
                            }
                        }
                    }
                }
            }
        }
    }
    pub fn text_width(text: &str, s: i64) -> i64 {
        text.chars().count() as i64 * 4 * s - s
    }
}

/// "Nice" tick positions covering [lo, hi] (steps of 1, 2 or 5 × 10^k).
pub fn ticks(lo: f64, hi: f64, target: usize) -> (Vec<f64>, f64) {
    let span = (hi - lo).max(1e-12);
    let raw = span / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag);
    let mut v = vec![];
    let mut t = (lo / step).ceil() * step;
    while t <= hi + step * 1e-9 {
        v.push(if t.abs() < step * 1e-9 { 0.0 } else { t });
        t += step;
    }
    (v, step)
}

fn tick_label(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 { 0 } else { (-step.log10().floor()) as usize };
    format!("{v:.decimals$}")
}

/// A plotting area with data ranges mapped to pixels, axes and tick labels already drawn.
pub struct Axes {
    pub canvas: Canvas,
    x: (f64, f64),
    y: (f64, f64),
    left: i64,
    top: i64,
    right: i64,
    bottom: i64,
}

impl Axes {
    /// A `w`×`h` figure for data in x∈[x.0, x.1], y∈[y.0, y.1] (padded by 5% when `pad`).
    pub fn new(w: u32, h: u32, mut x: (f64, f64), mut y: (f64, f64), pad: bool) -> Self {
        for r in [&mut x, &mut y] {
            if r.1.partial_cmp(&r.0) != Some(std::cmp::Ordering::Greater) {
                *r = (r.0 - 0.5, r.0 + 0.5);
            }
            if pad {
                let m = 0.05 * (r.1 - r.0);
                *r = (r.0 - m, r.1 + m);
            }
        }
        let mut a =
            Axes { canvas: Canvas::new(w, h), x, y, left: 70, top: 20, right: w as i64 - 20, bottom: h as i64 - 40 };
        a.draw_frame();
        a
    }
    pub fn px(&self, x: f64, y: f64) -> (i64, i64) {
        let fx = (x - self.x.0) / (self.x.1 - self.x.0);
        let fy = (y - self.y.0) / (self.y.1 - self.y.0);
        (
            self.left + (fx * (self.right - self.left) as f64).round() as i64,
            self.bottom - (fy * (self.bottom - self.top) as f64).round() as i64,
        )
    }
    fn draw_frame(&mut self) {
        let (black, grid) = ([0, 0, 0], [225, 225, 225]);
        let (xt, xs) = ticks(self.x.0, self.x.1, 6);
        let (yt, ys) = ticks(self.y.0, self.y.1, 6);
        for &t in &xt {
            let (px, _) = self.px(t, self.y.0);
            self.canvas.line((px, self.top), (px, self.bottom), grid, 1);
            self.canvas.line((px, self.bottom), (px, self.bottom + 5), black, 1);
            let s = tick_label(t, xs);
            self.canvas.text(px - Canvas::text_width(&s, 2) / 2, self.bottom + 10, &s, 2, black);
        }
        for &t in &yt {
            let (_, py) = self.px(self.x.0, t);
            self.canvas.line((self.left, py), (self.right, py), grid, 1);
            self.canvas.line((self.left - 5, py), (self.left, py), black, 1);
            let s = tick_label(t, ys);
            self.canvas.text(self.left - 10 - Canvas::text_width(&s, 2), py - 5, &s, 2, black);
        }
        self.canvas.line((self.left, self.top), (self.left, self.bottom), black, 1);
        self.canvas.line((self.left, self.bottom), (self.right, self.bottom), black, 1);
    }
    /// A polyline through the points, with a dot at each.
    pub fn series(&mut self, pts: &[(f64, f64)], c: Color) {
        let px: Vec<(i64, i64)> = pts.iter().map(|&(x, y)| self.px(x, y)).collect();
        for w in px.windows(2) {
            self.canvas.line(w[0], w[1], c, 2);
        }
        for &(x, y) in &px {
            self.canvas.dot(x, y, 3, c);
        }
    }
    /// Legend entries in the top-right corner.
    pub fn legend(&mut self, entries: &[(&str, Color)]) {
        for (i, (label, c)) in entries.iter().enumerate() {
            let y = self.top + 10 + 18 * i as i64;
            let x = self.right - 10 - Canvas::text_width(label, 2) - 20;
            self.canvas.line((x, y + 5), (x + 12, y + 5), *c, 3);
            self.canvas.text(x + 18, y, label, 2, [0, 0, 0]);
        }
    }
}

/// A named series of (x, y) points and its colour.
pub type Series<'a> = (&'a str, Vec<(f64, f64)>, Color);

/// Line plot of named series.
pub fn line_plot(series: &[Series<'_>], w: u32, h: u32) -> RgbImage {
    let all: Vec<(f64, f64)> = series.iter().flat_map(|s| s.1.iter().copied()).filter(|p| p.1.is_finite()).collect();
    let xr = all.iter().fold((f64::MAX, f64::MIN), |r, p| (r.0.min(p.0), r.1.max(p.0)));
    let yr = all.iter().fold((f64::MAX, f64::MIN), |r, p| (r.0.min(p.1), r.1.max(p.1)));
    let (xr, yr) = if all.is_empty() { ((0.0, 1.0), (0.0, 1.0)) } else { (xr, yr) };
    let mut ax = Axes::new(w, h, xr, yr, true);
    for (_, pts, c) in series {
        let pts: Vec<(f64, f64)> = pts.iter().copied().filter(|p| p.1.is_finite()).collect();
        ax.series(&pts, *c);
    }
    let entries: Vec<(&str, Color)> = series.iter().map(|s| (s.0, s.2)).collect();
    ax.legend(&entries);
    ax.canvas.img
}

/// Scatter plot of coloured points.
pub fn scatter_plot(points: &[(f64, f64, Color)], w: u32, h: u32) -> RgbImage {
    let xr = points.iter().fold((f64::MAX, f64::MIN), |r, p| (r.0.min(p.0), r.1.max(p.0)));
    let yr = points.iter().fold((f64::MAX, f64::MIN), |r, p| (r.0.min(p.1), r.1.max(p.1)));
    let (xr, yr) = if points.is_empty() { ((0.0, 1.0), (0.0, 1.0)) } else { (xr, yr) };
    let mut ax = Axes::new(w, h, xr, yr, true);
    for &(x, y, c) in points {
        let (px, py) = ax.px(x, y);
        ax.canvas.dot(px, py, 2, c);
    }
    ax.canvas.img
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

    #[test]
    fn ticks_are_round() {
        let (t, s) = ticks(0.3, 9.7, 5);
        assert_eq!(s, 2.0);
        assert_eq!(t, [2.0, 4.0, 6.0, 8.0]);
    }
}
