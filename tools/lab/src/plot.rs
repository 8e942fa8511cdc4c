//! PNG plots with plotters' bitmap backend (pure Rust: no cairo, no fontconfig).
//!
//! Text needs a TrueType font, loaded at run time with ab_glyph from the first of
//! `$TPLAB_FONT` and a few standard DejaVu/Liberation paths (Debian: `fonts-dejavu-core`).
//! Without one, the plots are still drawn, without any text, and the report says so.

use std::path::Path;

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
        let col = color(l.policy);
        let s = c
            .draw_series(LineSeries::new(
                l.points.iter().copied(),
                col.stroke_width(2),
            ))
            .map_err(|x| e(&x))?;
        if text {
            s.label(l.policy.name()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(2))
            });
        }
    }
    if text {
        c.configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))
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
        let col = color(l.policy);
        let s = c
            .draw_series(LineSeries::new(
                l.points.iter().map(|&(x, y)| (x.max(xmin), y)),
                col.stroke_width(2),
            ))
            .map_err(|x| e(&x))?;
        if text {
            s.label(l.policy.name()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(2))
            });
        }
    }
    if text {
        c.configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|x| e(&x))?;
    }
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
            let s = c
                .draw_series(LineSeries::new(front, col.stroke_width(2)))
                .map_err(|x| e(&x))?;
            if text {
                s.label(policy.name()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(2))
                });
            }
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
        if text {
            c.configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(|x| e(&x))?;
        }
    }
    root.present().map_err(|x| e(&x))
}
