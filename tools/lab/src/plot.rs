//! PNG plots with plotters' bitmap backend (pure Rust: no cairo, no fontconfig).
//!
//! Text needs a TrueType font, loaded at run time with ab_glyph from the first of
//! `$TPLAB_FONT` and a few standard DejaVu/Liberation paths (Debian: `fonts-dejavu-core`).
//! Without one, the plots are still drawn, without any text, and the report says so.

use std::path::Path;

use plotters::coord::CoordTranslate;
use plotters::drawing::DrawingAreaErrorKind;
use plotters::prelude::*;

use crate::policy::Policy;

/// One policy's line on a plot.
pub struct Line<'a> {
    /// The policy.
    pub policy: Policy,
    /// (x, y) points.
    pub points: &'a [(f64, f64)],
}

/// Registers a font for text; returns whether one was found.
pub fn load_font() -> bool {
    let mut candidates: Vec<String> = std::env::var("TPLAB_FONT").into_iter().collect();
    candidates.extend(
        [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/TTF/DejaVuSans.ttf",
            "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
        ]
        .map(String::from),
    );
    for path in candidates {
        if let Ok(bytes) = std::fs::read(&path) {
            // plotters keeps the font for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
    }
    false
}

fn color(p: Policy) -> RGBColor {
    match p {
        Policy::Static => RGBColor(200, 30, 30),
        Policy::Dynamic => RGBColor(30, 80, 220),
        Policy::Throttle => RGBColor(190, 120, 0),
        Policy::Tidepool => RGBColor(0, 150, 60),
    }
}

fn max_of(points: impl Iterator<Item = f64>) -> f64 {
    points.fold(0.0, f64::max)
}

/// Memory over time (MiB, one line per policy) under the request rate (req/s).
pub fn memory_over_time(
    path: &Path,
    title: &str,
    rate: &[(f64, f64)],
    lines: &[Line<'_>],
    text: bool,
) -> Result<(), String> {
    let e = |e: &dyn std::fmt::Display| format!("plotting {}: {e}", path.display());
    let root = BitMapBackend::new(path, (1200, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let (top, bottom) = root.split_vertically(260);
    let tmax = max_of(
        rate.iter()
            .map(|p| p.0)
            .chain(lines.iter().flat_map(|l| l.points.iter().map(|p| p.0))),
    )
    .max(0.001);
    let rmax = max_of(rate.iter().map(|p| p.1)).max(1.0) * 1.05;
    let mut b = ChartBuilder::on(&top);
    b.margin(10);
    if text {
        b.caption(format!("{title}: offered request rate"), ("sans-serif", 20))
            .x_label_area_size(30)
            .y_label_area_size(80);
    }
    let mut c = b
        .build_cartesian_2d(0f64..tmax, 0f64..rmax)
        .map_err(|x| e(&x))?;
    let mut mesh = c.configure_mesh();
    if text {
        mesh.y_desc("req/s (10 ms bins)");
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|x| e(&x))?;
    c.draw_series(LineSeries::new(rate.iter().copied(), &BLACK))
        .map_err(|x| e(&x))?;

    let mmax = max_of(lines.iter().flat_map(|l| l.points.iter().map(|p| p.1))).max(1.0) * 1.1;
    let mut b = ChartBuilder::on(&bottom);
    b.margin(10);
    if text {
        b.caption(
            format!("{title}: pool memory (capacity_bytes, sampled every 1 ms)"),
            ("sans-serif", 20),
        )
        .x_label_area_size(40)
        .y_label_area_size(80);
    }
    let mut c = b
        .build_cartesian_2d(0f64..tmax, 0f64..mmax)
        .map_err(|x| e(&x))?;
    let mut mesh = c.configure_mesh();
    if text {
        mesh.x_desc("time (s)").y_desc("MiB");
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|x| e(&x))?;
    for l in lines {
        let points = l.points.iter().copied();
        labelled_line(&mut c, points, color(l.policy), l.policy.name(), text).map_err(|x| e(&x))?;
    }
    legend(&mut c, None, text).map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))
}

/// Draws `points` as a 2 px line in `col`; with `text`, names it `name` in the legend.
pub(crate) fn labelled_line<DB, CT>(
    c: &mut ChartContext<'_, DB, CT>,
    points: impl IntoIterator<Item = (f64, f64)>,
    col: RGBColor,
    name: &str,
    text: bool,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>>
where
    DB: DrawingBackend,
    CT: CoordTranslate<From = (f64, f64)>,
{
    let s = c.draw_series(LineSeries::new(points, col.stroke_width(2)))?;
    if text {
        s.label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(2)));
    }
    Ok(())
}

/// With `text`, the legend of the labelled lines: at `position` (plotters' default when
/// `None`), on a translucent white box with a black border.
pub(crate) fn legend<'a, DB, CT>(
    c: &mut ChartContext<'a, DB, CT>,
    position: Option<SeriesLabelPosition>,
    text: bool,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>>
where
    DB: DrawingBackend + 'a,
    CT: CoordTranslate,
{
    if !text {
        return Ok(());
    }
    let mut labels = c.configure_series_labels();
    if let Some(position) = position {
        labels.position(position);
    }
    labels
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
}

/// CDFs of map latency (µs, log scale), one line per policy; points are (µs, fraction).
pub fn latency_cdf(path: &Path, title: &str, lines: &[Line<'_>], text: bool) -> Result<(), String> {
    let e = |e: &dyn std::fmt::Display| format!("plotting {}: {e}", path.display());
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let xmax = max_of(lines.iter().flat_map(|l| l.points.iter().map(|p| p.0))).max(10.0) * 1.5;
    let xmin = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.0))
        .fold(f64::INFINITY, f64::min)
        .clamp(0.01, 1.0);
    let mut b = ChartBuilder::on(&root);
    b.margin(10);
    if text {
        b.caption(
            format!("{title}: map latency CDF (lab-measured, successful maps)"),
            ("sans-serif", 20),
        )
        .x_label_area_size(40)
        .y_label_area_size(60);
    }
    let mut c = b
        .build_cartesian_2d((xmin..xmax).log_scale(), 0f64..1.001)
        .map_err(|x| e(&x))?;
    let mut mesh = c.configure_mesh();
    if text {
        mesh.x_desc("map latency (µs, log)")
            .y_desc("fraction of maps ≤ x");
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|x| e(&x))?;
    for l in lines {
        let points = l.points.iter().map(|&(x, y)| (x.max(xmin), y));
        labelled_line(&mut c, points, color(l.policy), l.policy.name(), text).map_err(|x| e(&x))?;
    }
    legend(&mut c, Some(SeriesLabelPosition::LowerRight), text).map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))
}

/// The frontier plot: time-averaged memory (MiB) against p99 (left) and p99.9 (right) map
/// latency (µs, log), one colour per policy; configurations with failed maps are crosses,
/// clean ones dots, and each policy's frontier (on that panel's percentile) is joined by a
/// line.
pub fn frontier(
    path: &Path,
    title: &str,
    points: &[crate::sweep::SweepPoint],
    text: bool,
) -> Result<(), String> {
    let e = |e: &dyn std::fmt::Display| format!("plotting {}: {e}", path.display());
    let root = BitMapBackend::new(path, (1400, 650)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let (left, right) = root.split_horizontally(700);
    type Pick = fn(&crate::sweep::SweepPoint) -> f64;
    let panels: [(
        &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
        &str,
        Pick,
    ); 2] = [
        (&left, "p99", |p| p.p99_us),
        (&right, "p99.9", |p| p.p999_us),
    ];
    let ymax = max_of(points.iter().map(|p| p.avg_mib)).max(1.0) * 1.1;
    for (area, which, pick) in panels {
        let xs = points.iter().map(pick).filter(|x| *x > 0.0);
        let xmin = xs.clone().fold(f64::INFINITY, f64::min).clamp(0.1, 1e9) / 1.5;
        let xmax = max_of(xs).max(xmin * 10.0) * 1.5;
        let mut b = ChartBuilder::on(area);
        b.margin(10);
        if text {
            b.caption(
                format!("{title}: avg memory vs {which} map latency (x = failed maps)"),
                ("sans-serif", 18),
            )
            .x_label_area_size(40)
            .y_label_area_size(60);
        }
        let mut c = b
            .build_cartesian_2d((xmin..xmax).log_scale(), 0f64..ymax)
            .map_err(|x| e(&x))?;
        let mut mesh = c.configure_mesh();
        if text {
            mesh.x_desc(format!("{which} map latency (µs, log)"))
                .y_desc("time-averaged MiB");
        } else {
            mesh.x_labels(0).y_labels(0);
        }
        mesh.draw().map_err(|x| e(&x))?;
        for policy in Policy::ALL {
            let col = color(policy);
            let mine: Vec<&crate::sweep::SweepPoint> =
                points.iter().filter(|p| p.policy == policy).collect();
            let at = |p: &crate::sweep::SweepPoint| (pick(p).max(xmin), p.avg_mib);
            // This panel's own frontier (memory against this percentile), clean points only.
            let clean: Vec<&&crate::sweep::SweepPoint> =
                mine.iter().filter(|p| p.failed == 0).collect();
            let mut front: Vec<(f64, f64)> = clean
                .iter()
                .filter(|p| {
                    !clean.iter().any(|q| {
                        q.avg_mib <= p.avg_mib
                            && pick(q) <= pick(p)
                            && (q.avg_mib < p.avg_mib || pick(q) < pick(p))
                    })
                })
                .map(|p| at(p))
                .collect();
            front.sort_by(|a, b| a.0.total_cmp(&b.0));
            labelled_line(&mut c, front, col, policy.name(), text).map_err(|x| e(&x))?;
            c.draw_series(
                mine.iter()
                    .filter(|p| p.failed == 0)
                    .map(|p| Circle::new(at(p), 5, col.filled())),
            )
            .map_err(|x| e(&x))?;
            c.draw_series(
                mine.iter()
                    .filter(|p| p.failed > 0)
                    .map(|p| Cross::new(at(p), 7, col.stroke_width(3))),
            )
            .map_err(|x| e(&x))?;
        }
        legend(&mut c, Some(SeriesLabelPosition::UpperRight), text).map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))
}
