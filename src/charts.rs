//! Labelled charts through `plotters` (bitmap backend), drawn with DejaVu Sans compiled into
//! the binary (`assets/fonts/`, Bitstream Vera licence): no system font library is consulted,
//! so a binary copied to a bare machine draws the same text. Also the captions and row labels
//! that make the image grids of `image_out` explain themselves.

use anyhow::{anyhow, Result};
use image::{Rgb, RgbImage};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::Color as _;

use crate::image_out::Color;

/// DejaVu Sans Book, the one font every chart uses.
pub const FONT_TTF: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");
/// The family name the font is registered under (plotters' default for tick labels too).
pub const FAMILY: &str = "sans-serif";

/// Registers the embedded font with plotters (once per process).
pub fn init_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let ok = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT_TTF).is_ok();
        assert!(ok, "the embedded font does not parse");
    });
}

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing failed: {e}")
}

fn rgb(c: Color) -> RGBColor {
    RGBColor(c[0], c[1], c[2])
}

/// Draws on a white `w`×`h` canvas and returns it as an image.
fn canvas(w: u32, h: u32, draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> Result<()>) -> Result<RgbImage> {
    init_font();
    let mut buf = vec![255u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        draw(&root)?;
        root.present().map_err(err)?;
    }
    Ok(RgbImage::from_raw(w, h, buf).expect("buffer has w·h·3 bytes"))
}

/// One named line of a chart.
#[derive(Clone, Debug)]
pub struct Line {
    /// Its name in the legend (the legend is drawn when a panel has more than one line).
    pub label: String,
    /// (x, y) in data units, drawn in order; non-finite y (and, on a log axis, y ≤ 0) are
    /// left out. Up to 60 points also get a dot each.
    pub points: Vec<(f64, f64)>,
    /// Line and dot colour.
    pub color: Color,
    /// Dashed instead of solid (the test curve beside the training one).
    pub dashed: bool,
}

/// One panel: its own title, axis titles (with units) and lines.
#[derive(Clone, Debug)]
pub struct Panel {
    /// Shown above the panel.
    pub title: String,
    /// The x axis title, with its unit ("epoch").
    pub x_desc: String,
    /// The y axis title, with its unit ("nats per image").
    pub y_desc: String,
    /// The series; the axes are fitted to all of them.
    pub lines: Vec<Line>,
}

/// The data range of `v`, padded by 5% (a unit interval around a single value); for a log
/// axis, the positive values widened by a factor.
fn range(v: impl Iterator<Item = f64>, log: bool) -> (f64, f64) {
    let (lo, hi) = v
        .filter(|x| x.is_finite() && (!log || *x > 0.0))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |r, x| (r.0.min(x), r.1.max(x)));
    if lo > hi {
        return if log { (0.1, 10.0) } else { (0.0, 1.0) };
    }
    if log {
        return (lo / 1.15, hi * 1.15);
    }
    if hi - lo < 1e-12 {
        return (lo - 0.5, hi + 0.5);
    }
    let m = 0.05 * (hi - lo);
    (lo - m, hi + m)
}

/// Key points for a log axis over [lo, hi]: about six round values in the range when it
/// spans less than a factor 10, else 1, 2, 3 and 5 times each power of ten.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let round = |v: f64| {
        let m = 10f64.powf(v.abs().log10().floor() - 8.0);
        (v / m).round() * m
    };
    if hi / lo < 10.0 {
        let raw = (hi - lo) / 6.0;
        let mag = 10f64.powf(raw.log10().floor());
        let step = [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag);
        let mut t = (lo / step).ceil() * step;
        let mut v = vec![];
        while t <= hi {
            v.push(round(t));
            t += step;
        }
        return v;
    }
    let mut v = vec![];
    for k in lo.log10().floor() as i32..=hi.log10().ceil() as i32 {
        for m in [1.0, 2.0, 3.0, 5.0] {
            let t = round(m * 10f64.powi(k));
            if t >= lo && t <= hi {
                v.push(t);
            }
        }
    }
    v
}

/// Raises the top of a y range so that `rows` legend lines fit above the data.
fn headroom(r: (f64, f64), rows: usize, log: bool) -> (f64, f64) {
    if rows < 2 {
        return r;
    }
    let frac = ((rows * 20 + 24) as f64 / 330.0).min(0.6);
    if log {
        let (a, b) = (r.0.ln(), r.1.ln());
        (r.0, (a + (b - a) / (1.0 - frac)).exp())
    } else {
        (r.0, r.0 + (r.1 - r.0) / (1.0 - frac))
    }
}

/// A tick label with as few decimals as the axis span needs (about eight ticks per axis).
fn tick(v: f64, span: f64) -> String {
    let decimals = (-(span.max(1e-9) / 8.0).log10().floor()).clamp(0.0, 6.0) as usize;
    let s = format!("{v:.decimals$}");
    // No "-0".
    if s.trim_start_matches('-').chars().all(|c| c == '0' || c == '.') {
        s.trim_start_matches('-').to_string()
    } else {
        s
    }
}

macro_rules! draw_lines {
    ($chart:ident, $panel:expr, $xr:expr, $yr:expr, $log:expr) => {{
        let (xspan, yspan) = ($xr.1 - $xr.0, $yr.1 - $yr.0);
        let integer_x = $panel.lines.iter().all(|l| l.points.iter().all(|p| p.0.fract() == 0.0));
        let xfmt = move |x: &f64| if integer_x { format!("{}", x.round()) } else { tick(*x, xspan) };
        let yfmt = move |y: &f64| if $log { format!("{}", y) } else { tick(*y, yspan) };
        $chart
            .configure_mesh()
            .x_desc($panel.x_desc.as_str())
            .y_desc($panel.y_desc.as_str())
            .x_labels(if integer_x { (xspan.round() as usize + 1).min(10) } else { 8 })
            .y_labels(8)
            .x_label_formatter(&xfmt)
            .y_label_formatter(&yfmt)
            .label_style((FAMILY, 14))
            .axis_desc_style((FAMILY, 16))
            .light_line_style(TRANSPARENT)
            .bold_line_style(RGBColor(215, 215, 215))
            .draw()
            .map_err(err)?;
        for l in &$panel.lines {
            let pts: Vec<(f64, f64)> =
                l.points.iter().copied().filter(|p| p.1.is_finite() && (!$log || p.1 > 0.0)).collect();
            let c = rgb(l.color);
            let style = c.stroke_width(2);
            let anno = if l.dashed {
                $chart.draw_series(DashedLineSeries::new(pts.clone(), 8, 5, style)).map_err(err)?
            } else {
                $chart.draw_series(LineSeries::new(pts.clone(), style)).map_err(err)?
            };
            let dashed = l.dashed;
            anno.label(l.label.as_str()).legend(move |(x, y)| {
                let gap = if dashed { 6 } else { 0 };
                EmptyElement::at((x, y))
                    + PathElement::new(vec![(0, 0), (10 - gap / 2, 0)], c.stroke_width(2))
                    + PathElement::new(vec![(10 + gap / 2, 0), (20, 0)], c.stroke_width(2))
            });
            if pts.len() <= 60 {
                $chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled()))).map_err(err)?;
            }
        }
        if $panel.lines.len() > 1 {
            $chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.3))
                .label_font((FAMILY, 14))
                .draw()
                .map_err(err)?;
        }
    }};
}

/// Panels side by side under one title; `log_y` puts every y axis on a log scale.
pub fn line_chart(title: &str, panels: &[Panel], log_y: bool, w: u32, h: u32) -> Result<RgbImage> {
    canvas(w, h, |root| {
        root.fill(&WHITE).map_err(err)?;
        let root = root.titled(title, (FAMILY, 22)).map_err(err)?;
        let areas = root.split_evenly((1, panels.len().max(1)));
        for (p, area) in panels.iter().zip(&areas) {
            let xr = range(p.lines.iter().flat_map(|l| l.points.iter().map(|q| q.0)), false);
            let yr = range(p.lines.iter().flat_map(|l| l.points.iter().map(|q| q.1)), log_y);
            let yr = headroom(yr, p.lines.len(), log_y);
            let mut b = ChartBuilder::on(area);
            b.caption(&p.title, (FAMILY, 17)).margin(12).x_label_area_size(48).y_label_area_size(72);
            if log_y {
                let mut chart = b
                    .build_cartesian_2d(xr.0..xr.1, (yr.0..yr.1).log_scale().with_key_points(log_ticks(yr.0, yr.1)))
                    .map_err(err)?;
                draw_lines!(chart, p, xr, yr, true);
            } else {
                let mut chart = b.build_cartesian_2d(xr.0..xr.1, yr.0..yr.1).map_err(err)?;
                draw_lines!(chart, p, xr, yr, false);
            }
        }
        Ok(())
    })
}

/// A scatter of `points` (x, y, class index into `classes`) with a legend naming each
/// class's colour beside the plot (none when there is a single class).
#[allow(clippy::too_many_arguments)]
pub fn scatter_chart(
    title: &str,
    x_desc: &str,
    y_desc: &str,
    points: &[(f64, f64, usize)],
    classes: &[(String, Color)],
    legend_title: &str,
    w: u32,
    h: u32,
) -> Result<RgbImage> {
    canvas(w, h, |root| {
        root.fill(&WHITE).map_err(err)?;
        let root = root.titled(title, (FAMILY, 22)).map_err(err)?;
        let legend_w = if classes.len() > 1 { 170 } else { 0 };
        let (plot, legend) = root.split_horizontally(w as i32 - legend_w);
        let xr = range(points.iter().map(|p| p.0), false);
        let yr = range(points.iter().map(|p| p.1), false);
        let mut chart = ChartBuilder::on(&plot)
            .margin(12)
            .x_label_area_size(48)
            .y_label_area_size(72)
            .build_cartesian_2d(xr.0..xr.1, yr.0..yr.1)
            .map_err(err)?;
        let (xspan, yspan) = (xr.1 - xr.0, yr.1 - yr.0);
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .x_label_formatter(&|x| tick(*x, xspan))
            .y_label_formatter(&|y| tick(*y, yspan))
            .label_style((FAMILY, 14))
            .axis_desc_style((FAMILY, 16))
            .light_line_style(TRANSPARENT)
            .bold_line_style(RGBColor(215, 215, 215))
            .draw()
            .map_err(err)?;
        let alpha = if points.len() > 3000 { 0.55 } else { 0.8 };
        chart
            .draw_series(points.iter().map(|&(x, y, k)| {
                let c = classes.get(k).map_or([0, 0, 0], |c| c.1);
                Circle::new((x, y), 2, rgb(c).mix(alpha).filled())
            }))
            .map_err(err)?;
        if classes.len() > 1 {
            let top = 40;
            legend
                .draw_text(legend_title, &TextStyle::from((FAMILY, 17).into_font()).color(&BLACK), (14, top))
                .map_err(err)?;
            for (i, (name, c)) in classes.iter().enumerate() {
                let y = top + 32 + 26 * i as i32;
                legend.draw(&Circle::new((22, y), 7, rgb(*c).filled())).map_err(err)?;
                let style = TextStyle::from((FAMILY, 16).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
                legend.draw_text(name, &style, (36, y)).map_err(err)?;
            }
        }
        Ok(())
    })
}

/// One panel of stacked bars: each bar (a category on the x axis) stacks one segment per part.
#[derive(Clone, Debug)]
pub struct BarPanel {
    /// Shown above the panel.
    pub title: String,
    /// The y axis title, with its unit.
    pub y_desc: String,
    /// The bars' names, left to right.
    pub bars: Vec<String>,
    /// The parts, bottom to top: (name in the legend, colour, one value per bar).
    pub parts: Vec<(String, Color, Vec<f64>)>,
}

/// Panels of stacked bars side by side under one title, each with its legend to the right.
pub fn stacked_bar_chart(title: &str, panels: &[BarPanel], w: u32, h: u32) -> Result<RgbImage> {
    canvas(w, h, |root| {
        root.fill(&WHITE).map_err(err)?;
        let root = root.titled(title, (FAMILY, 22)).map_err(err)?;
        let areas = root.split_evenly((1, panels.len().max(1)));
        for (p, area) in panels.iter().zip(&areas) {
            let legend_w = 250;
            let (plot, legend) = area.split_horizontally(area.dim_in_pixel().0 as i32 - legend_w);
            let n = p.bars.len();
            let top = (0..n)
                .map(|i| p.parts.iter().map(|part| part.2.get(i).copied().unwrap_or(0.0).max(0.0)).sum::<f64>())
                .fold(0.0, f64::max);
            let top = if top > 0.0 { top * 1.08 } else { 1.0 };
            let mut chart = ChartBuilder::on(&plot)
                .caption(&p.title, (FAMILY, 17))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(72)
                .build_cartesian_2d(-0.5..n as f64 - 0.5, 0.0..top)
                .map_err(err)?;
            let bars = p.bars.clone();
            let xfmt = move |x: &f64| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 {
                    bars.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            };
            chart
                .configure_mesh()
                .y_desc(p.y_desc.as_str())
                .x_labels(n + 1)
                .x_label_formatter(&xfmt)
                .y_label_formatter(&|y| tick(*y, top))
                .label_style((FAMILY, 14))
                .axis_desc_style((FAMILY, 16))
                .disable_x_mesh()
                .light_line_style(TRANSPARENT)
                .bold_line_style(RGBColor(215, 215, 215))
                .draw()
                .map_err(err)?;
            let mut base = vec![0.0; n];
            for (_, color, values) in &p.parts {
                chart
                    .draw_series((0..n).map(|i| {
                        let v = values.get(i).copied().unwrap_or(0.0).max(0.0);
                        let r = Rectangle::new(
                            [(i as f64 - 0.35, base[i]), (i as f64 + 0.35, base[i] + v)],
                            rgb(*color).filled(),
                        );
                        base[i] += v;
                        r
                    }))
                    .map_err(err)?;
            }
            let top_px = 48;
            for (k, (name, color, _)) in p.parts.iter().enumerate().rev() {
                let y = top_px + 24 * (p.parts.len() - 1 - k) as i32;
                legend.draw(&Rectangle::new([(6, y - 7), (20, y + 7)], rgb(*color).filled())).map_err(err)?;
                let style = TextStyle::from((FAMILY, 14).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
                legend.draw_text(name, &style, (26, y)).map_err(err)?;
            }
        }
        Ok(())
    })
}

/// Height of one caption line of an annotated grid, in pixels.
pub const CAPTION_LINE: u32 = 20;
/// Narrowest annotated grid, so that a caption line fits.
pub const MIN_WIDTH: u32 = 480;
/// Width of the row-label column, when there are row labels.
pub const LABEL_WIDTH: u32 = 70;

/// Pixel size of [`annotate_grid`]'s result for a `gw`×`gh` grid.
pub fn annotated_size(gw: u32, gh: u32, above: usize, below: usize, row_labels: bool) -> (u32, u32) {
    let left = if row_labels { LABEL_WIDTH } else { 0 };
    let band = |n: usize| if n == 0 { 0 } else { n as u32 * CAPTION_LINE + 6 };
    ((left + gw).max(MIN_WIDTH), band(above) + gh + band(below))
}

/// An image grid on white with caption lines centred above and below it and, at its left,
/// labels for rows (text, row centre in grid pixels).
pub fn annotate_grid(grid: &RgbImage, above: &[&str], below: &[&str], row_labels: &[(&str, u32)]) -> Result<RgbImage> {
    let (gw, gh) = grid.dimensions();
    let (w, h) = annotated_size(gw, gh, above.len(), below.len(), !row_labels.is_empty());
    let left = if row_labels.is_empty() { 0 } else { LABEL_WIDTH };
    let x0 = left.max((w - gw) / 2);
    let y0 = if above.is_empty() { 0 } else { above.len() as u32 * CAPTION_LINE + 6 };
    let mut img = canvas(w, h, |root| {
        root.fill(&WHITE).map_err(err)?;
        let centred = TextStyle::from((FAMILY, 14).into_font()).pos(Pos::new(HPos::Center, VPos::Center));
        for (i, t) in above.iter().enumerate() {
            let y = 3 + i as u32 * CAPTION_LINE + CAPTION_LINE / 2;
            root.draw_text(t, &centred, ((w / 2) as i32, y as i32)).map_err(err)?;
        }
        for (i, t) in below.iter().enumerate() {
            let y = y0 + gh + 3 + i as u32 * CAPTION_LINE + CAPTION_LINE / 2;
            root.draw_text(t, &centred, ((w / 2) as i32, y as i32)).map_err(err)?;
        }
        let right = TextStyle::from((FAMILY, 14).into_font()).pos(Pos::new(HPos::Right, VPos::Center));
        for (t, yc) in row_labels {
            root.draw_text(t, &right, (x0 as i32 - 6, (y0 + yc) as i32)).map_err(err)?;
        }
        Ok(())
    })?;
    for (x, y, p) in grid.enumerate_pixels() {
        img.put_pixel(x0 + x, y0 + y, Rgb(p.0));
    }
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pixels that are neither white nor one of the given colours: text and axes.
    fn dark_pixels(img: &RgbImage) -> usize {
        img.pixels().filter(|p| p.0.iter().all(|&v| v < 100)).count()
    }

    #[test]
    fn charts_draw_text_with_the_embedded_font() {
        // Text only: a caption on an empty canvas draws dark pixels, whatever fonts the
        // system has (the font comes from the binary).
        let img =
            annotate_grid(&RgbImage::from_pixel(10, 10, Rgb([255, 255, 255])), &["Hello, axes"], &[], &[]).unwrap();
        assert_eq!(img.dimensions(), annotated_size(10, 10, 1, 0, false));
        assert!(dark_pixels(&img) > 100, "caption drew {} dark pixels", dark_pixels(&img));
    }

    #[test]
    fn line_chart_has_its_size_and_ink() {
        let line = |label: &str, k: f64, dashed| Line {
            label: label.into(),
            points: (1..=10).map(|e| (e as f64, 100.0 + k / e as f64)).collect(),
            color: [31, 119, 180],
            dashed,
        };
        let p = Panel {
            title: "loss".into(),
            x_desc: "epoch".into(),
            y_desc: "nats per image".into(),
            lines: vec![line("train", 50.0, false), line("test", 40.0, true)],
        };
        for log in [false, true] {
            let img = line_chart("a title", &[p.clone(), p.clone()], log, 900, 400).unwrap();
            assert_eq!(img.dimensions(), (900, 400));
            assert!(dark_pixels(&img) > 2000);
        }
    }

    #[test]
    fn log_ticks_are_round_and_inside() {
        assert_eq!(log_ticks(95.0, 170.0), [100.0, 120.0, 140.0, 160.0]);
        assert_eq!(log_ticks(2.5, 45.0), [3.0, 5.0, 10.0, 20.0, 30.0]);
    }

    #[test]
    fn scatter_has_a_legend_column() {
        let pts: Vec<(f64, f64, usize)> = (0..200).map(|i| ((i % 17) as f64, (i % 13) as f64, i % 3)).collect();
        let classes: Vec<(String, Color)> = (0..3).map(|k| (format!("class {k}"), [200, 30 * k as u8, 0])).collect();
        let img = scatter_chart("t", "x", "y", &pts, &classes, "class", 700, 500).unwrap();
        assert_eq!(img.dimensions(), (700, 500));
        // The legend's swatches are in the right-hand column.
        assert!((530..700).any(|x| (0..500).any(|y| img.get_pixel(x, y).0 == [200, 60, 0])));
    }
}
