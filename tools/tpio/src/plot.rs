//! `tpio plot A.json B.json ... -o out.png`: IOPS bars and completion-latency percentile lines
//! (log scale) side by side, one bar and one line per job, labelled `file:jobname` (just `file` when
//! the file's name contains the job's).
//!
//! Rendering uses plotters' bitmap backend (PNG) or SVG backend (`-o x.svg`) with the `ab_glyph`
//! text renderer, which needs no fontconfig or freetype: it takes a TrueType file's bytes. tpio loads
//! one at run time from `--font` or a few common paths (Debian's fonts-dejavu-core first), so the
//! build needs no system library and the binary carries no font.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::Parser;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use serde_json::Value;

use crate::cli::CliError;
use crate::report::percentile_key;
use crate::stats::PERCENTILES;

/// Fonts tried when `--font` is not given.
const FONT_CANDIDATES: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// `tpio plot` options.
#[derive(Debug, Parser)]
#[command(
    name = "tpio plot",
    about = "Plot IOPS and latency percentiles of tpio/fio JSON results"
)]
pub struct PlotArgs {
    /// JSON result files (tpio or fio --output-format=json).
    #[arg(required = true, value_name = "JSON")]
    pub inputs: Vec<PathBuf>,
    /// Output image: .png or .svg.
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
    /// A TrueType font for the labels.
    #[arg(long, value_name = "TTF")]
    pub font: Option<PathBuf>,
    /// Image width in pixels.
    #[arg(long, default_value_t = 1400)]
    pub width: u32,
    /// Image height in pixels.
    #[arg(long, default_value_t = 600)]
    pub height: u32,
}

/// One job's plotted values.
#[derive(Debug, Clone, PartialEq)]
pub struct PlotSeries {
    /// `file:jobname`.
    pub label: String,
    /// Read + write IOPS.
    pub iops: f64,
    /// (percentile, clat in ns) of the direction that did I/O (reads first).
    pub percentiles: Vec<(f64, u64)>,
}

/// Extracts the series of every job in a fio/tpio JSON document.
pub fn series_from_json(file_label: &str, document: &Value) -> Result<Vec<PlotSeries>, String> {
    let jobs = document["jobs"]
        .as_array()
        .ok_or("no `jobs` array: not fio/tpio JSON")?;
    Ok(jobs
        .iter()
        .enumerate()
        .map(|(index, job)| {
            let name = job["jobname"].as_str().unwrap_or("job");
            let iops = job["read"]["iops"].as_f64().unwrap_or(0.0)
                + job["write"]["iops"].as_f64().unwrap_or(0.0);
            let direction = if job["read"]["total_ios"].as_u64().unwrap_or(0) > 0 {
                "read"
            } else {
                "write"
            };
            let table = &job[direction]["clat_ns"]["percentile"];
            let percentiles = PERCENTILES
                .iter()
                .filter_map(|p| table[percentile_key(*p)].as_u64().map(|value| (*p, value)))
                .collect();
            let label = if jobs.len() > 1 {
                format!("{file_label}:{name}#{index}")
            } else if file_label.contains(name) {
                // `dma-bounce-4k.json` holding job `bounce-4k`: the file name says it all.
                file_label.to_string()
            } else {
                format!("{file_label}:{name}")
            };
            PlotSeries {
                label,
                iops,
                percentiles,
            }
        })
        .collect())
}

/// Loads a font and registers it as plotters' `sans-serif`.
fn load_font(explicit: Option<&Path>) -> Result<(), String> {
    let candidates: Vec<PathBuf> = match explicit {
        Some(path) => vec![path.to_path_buf()],
        None => FONT_CANDIDATES.iter().map(PathBuf::from).collect(),
    };
    for path in &candidates {
        if let Ok(bytes) = std::fs::read(path) {
            // plotters keeps fonts for the process's life: leaking one font file once is intended.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            return register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| format!("{} is not a TrueType font", path.display()));
        }
    }
    Err(
        "no TrueType font found: pass --font PATH (e.g. DejaVuSans.ttf from fonts-dejavu-core)"
            .into(),
    )
}

/// Draws both panels on `root`.
fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    series: &[PlotSeries],
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let error = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(error)?;
    let (left, right) = root.split_horizontally(root.dim_in_pixel().0 / 2);
    let max_iops = series.iter().map(|s| s.iops).fold(0.0, f64::max).max(1.0) * 1.1;
    let count = series.len() as u32;
    let mut bars = ChartBuilder::on(&left)
        .caption("IOPS", ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(
            (0u32..count.saturating_sub(1)).into_segmented(),
            0f64..max_iops,
        )
        .map_err(error)?;
    bars.configure_mesh()
        .disable_x_mesh()
        .x_labels(series.len().max(1))
        .x_label_formatter(&|value| match value {
            SegmentValue::CenterOf(index) => series
                .get(*index as usize)
                .map(|s| s.label.clone())
                .unwrap_or_default(),
            _ => String::new(),
        })
        .y_label_formatter(&|value| crate::report::format_iops(*value))
        .draw()
        .map_err(error)?;
    bars.draw_series(series.iter().enumerate().map(|(index, s)| {
        let index = index as u32;
        let color = Palette99::pick(index as usize).filled();
        let mut bar = Rectangle::new(
            [
                (SegmentValue::Exact(index), 0.0),
                (SegmentValue::Exact(index + 1), s.iops),
            ],
            color,
        );
        bar.set_margin(0, 0, 8, 8);
        bar
    }))
    .map_err(error)?;

    let values = series
        .iter()
        .flat_map(|s| s.percentiles.iter().map(|(_, ns)| *ns as f64 / 1000.0));
    let (low, high) = values.fold((f64::MAX, 0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (low, high) = if high <= 0.0 {
        (0.1, 10.0)
    } else {
        ((low.max(0.01)) / 1.5, high * 1.5)
    };
    let mut lines = ChartBuilder::on(&right)
        .caption(
            "completion latency percentiles (usec, log)",
            ("sans-serif", 24),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0usize..PERCENTILES.len() - 1, (low..high).log_scale())
        .map_err(error)?;
    lines
        .configure_mesh()
        .x_labels(PERCENTILES.len())
        .x_label_formatter(&|index| {
            PERCENTILES
                .get(*index)
                .map(|p| format!("{p}"))
                .unwrap_or_default()
        })
        .x_desc("percentile")
        .draw()
        .map_err(error)?;
    for (index, s) in series.iter().enumerate() {
        let color = Palette99::pick(index);
        let points: Vec<(usize, f64)> = s
            .percentiles
            .iter()
            .filter_map(|(p, ns)| {
                PERCENTILES
                    .iter()
                    .position(|q| q == p)
                    .map(|at| (at, (*ns as f64 / 1000.0).max(low)))
            })
            .collect();
        lines
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(error)?
            .label(s.label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    lines
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(error)?;
    root.present().map_err(error)
}

/// `tpio plot ...` (`args[0]` is "plot").
pub fn run(args: &[OsString]) -> Result<(), CliError> {
    let plot = PlotArgs::try_parse_from(args).map_err(|error| match error.kind() {
        clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
            CliError::Info(error.to_string())
        }
        _ => CliError::Usage(error.to_string().trim_end().to_string()),
    })?;
    let mut series = Vec::new();
    for input in &plot.inputs {
        let text = std::fs::read_to_string(input)
            .map_err(|error| CliError::Plot(format!("cannot read {}: {error}", input.display())))?;
        let document: Value = serde_json::from_str(&text)
            .map_err(|error| CliError::Plot(format!("{} is not JSON: {error}", input.display())))?;
        let label = input
            .file_stem()
            .map(|stem| stem.to_string_lossy().into_owned())
            .unwrap_or_default();
        series.extend(
            series_from_json(&label, &document)
                .map_err(|error| CliError::Plot(format!("{}: {error}", input.display())))?,
        );
    }
    load_font(plot.font.as_deref()).map_err(CliError::Plot)?;
    let size = (plot.width.max(400), plot.height.max(300));
    let is_svg = plot
        .output
        .extension()
        .is_some_and(|ext| ext.eq_ignore_ascii_case("svg"));
    let result = if is_svg {
        draw(
            &SVGBackend::new(&plot.output, size).into_drawing_area(),
            &series,
        )
    } else {
        draw(
            &BitMapBackend::new(&plot.output, size).into_drawing_area(),
            &series,
        )
    };
    result.map_err(|error| CliError::Plot(format!("drawing {}: {error}", plot.output.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_drop_a_job_name_the_file_name_already_holds() {
        let one =
            |name: &str| serde_json::json!({"jobs": [{"jobname": name, "read": {"iops": 5.0}}]});
        let label = |file: &str, doc: &Value| {
            series_from_json(file, doc).expect("series")[0]
                .label
                .clone()
        };
        assert_eq!(label("dma-bounce-4k", &one("bounce-4k")), "dma-bounce-4k");
        assert_eq!(label("run1", &one("randread")), "run1:randread");
        let two = serde_json::json!({"jobs": [{"jobname": "a"}, {"jobname": "a"}]});
        assert_eq!(
            series_from_json("xa", &two).expect("series")[1].label,
            "xa:a#1"
        );
        assert_eq!(
            series_from_json("x", &one("y")).expect("series")[0].iops,
            5.0
        );
    }
}
