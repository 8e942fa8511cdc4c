//! Reports in fio's two layouts: the human-readable summary and the JSON document.
//!
//! Both are rendered from the same [`DirectionReport`] values, computed once per clone and
//! direction, so they always carry the same numbers: the human text only rounds them for display.
//! JSON field names are fio's (`fio version`, `jobs[].jobname`, `jobs[].read.iops`,
//! `jobs[].read.clat_ns.percentile["99.000000"]`, ...), so fio tooling parses the output. Fields
//! fio derives from periodic samples (`bw_min`, `iops_mean`, ...) are not produced. tpio adds
//! `jobs[].verify` and, when the engine reports it, `jobs[].tidepool`.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::runner::CloneResult;
use crate::stats::{DirectionStats, LatencySummary};

/// The `fio version` string tpio writes.
pub const VERSION: &str = concat!("tpio-", env!("CARGO_PKG_VERSION"));

/// One direction's numbers as both reports show them.
#[derive(Debug, Clone, PartialEq)]
pub struct DirectionReport {
    /// Bytes moved.
    pub io_bytes: u64,
    /// I/Os completed.
    pub total_ios: u64,
    /// Measurement time in ms (rounded).
    pub runtime_ms: u64,
    /// I/Os per second over the exact runtime.
    pub iops: f64,
    /// Bytes per second.
    pub bw_bytes: u64,
    /// Submission latency.
    pub slat: LatencySummary,
    /// Completion latency.
    pub clat: LatencySummary,
    /// Total latency.
    pub lat: LatencySummary,
}

impl DirectionReport {
    /// Computes the report of `stats` measured over `runtime`.
    pub fn new(stats: &DirectionStats, runtime: Duration) -> Self {
        let seconds = runtime.as_secs_f64();
        let (iops, bw_bytes) = if seconds > 0.0 && stats.total_ios > 0 {
            (
                stats.total_ios as f64 / seconds,
                (stats.io_bytes as f64 / seconds) as u64,
            )
        } else {
            (0.0, 0)
        };
        DirectionReport {
            io_bytes: stats.io_bytes,
            total_ios: stats.total_ios,
            runtime_ms: if stats.total_ios > 0 {
                runtime.as_millis() as u64
            } else {
                0
            },
            iops,
            bw_bytes,
            slat: stats.slat.summary(),
            clat: stats.clat.summary(),
            lat: stats.lat.summary(),
        }
    }
}

/// Read and write reports of a clone.
fn direction_reports(result: &CloneResult) -> (DirectionReport, DirectionReport) {
    (
        DirectionReport::new(&result.read, result.read_runtime),
        DirectionReport::new(&result.write, result.write_runtime),
    )
}

/// fio's key for a percentile: six decimals.
pub fn percentile_key(percentile: f64) -> String {
    format!("{percentile:.6}")
}

/// A latency object: `{min, max, mean, stddev, N[, percentile]}`.
fn latency_json(summary: &LatencySummary) -> Value {
    let mut object = Map::new();
    object.insert("min".into(), json!(summary.min));
    object.insert("max".into(), json!(summary.max));
    object.insert("mean".into(), json!(summary.mean));
    object.insert("stddev".into(), json!(summary.stddev));
    object.insert("N".into(), json!(summary.count));
    if let Some(percentiles) = &summary.percentiles {
        let map: Map<String, Value> = percentiles
            .iter()
            .map(|(p, value)| (percentile_key(*p), json!(value)))
            .collect();
        object.insert("percentile".into(), Value::Object(map));
    }
    Value::Object(object)
}

/// A direction object in fio's layout.
fn direction_json(report: &DirectionReport) -> Value {
    json!({
        "io_bytes": report.io_bytes,
        "io_kbytes": report.io_bytes / 1024,
        "bw_bytes": report.bw_bytes,
        "bw": report.bw_bytes / 1024,
        "iops": report.iops,
        "runtime": report.runtime_ms,
        "total_ios": report.total_ios,
        "short_ios": 0,
        "drop_ios": 0,
        "slat_ns": latency_json(&report.slat),
        "clat_ns": latency_json(&report.clat),
        "lat_ns": latency_json(&report.lat),
    })
}

/// CPU use of a clone as a percentage of its wall time.
fn cpu_percent(cpu: Duration, elapsed: Duration) -> f64 {
    if elapsed.is_zero() {
        0.0
    } else {
        100.0 * cpu.as_secs_f64() / elapsed.as_secs_f64()
    }
}

/// The options of a job as fio lists them under `job options`.
fn job_options(result: &CloneResult) -> Value {
    let spec = &result.spec;
    let mut options = Map::new();
    options.insert("name".into(), json!(spec.name));
    options.insert("rw".into(), json!(format!("{:?}", spec.rw).to_lowercase()));
    match spec.block_sizes {
        crate::options::BlockSizes::Fixed(bs) => options.insert("bs".into(), json!(bs.to_string())),
        crate::options::BlockSizes::Range { min, max } => {
            options.insert("bsrange".into(), json!(format!("{min}-{max}")))
        }
    };
    options.insert("iodepth".into(), json!(spec.iodepth.to_string()));
    options.insert("ioengine".into(), json!(result.engine));
    options.insert("direct".into(), json!(u8::from(spec.direct).to_string()));
    if let Some(filename) = &spec.filename {
        options.insert("filename".into(), json!(filename.display().to_string()));
    }
    Value::Object(options)
}

/// The whole JSON document.
pub fn render_json(results: &[CloneResult]) -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let jobs: Vec<Value> = results
        .iter()
        .map(|result| {
            let (read, write) = direction_reports(result);
            let empty = DirectionReport::new(&DirectionStats::default(), Duration::ZERO);
            let mut job = json!({
                "jobname": result.spec.name,
                "groupid": 0,
                "error": result.error,
                "eta": 0,
                "elapsed": result.elapsed.as_secs(),
                "job options": job_options(result),
                "read": direction_json(&read),
                "write": direction_json(&write),
                "trim": direction_json(&empty),
                "job_runtime": result.elapsed.as_millis() as u64,
                "usr_cpu": cpu_percent(result.user_cpu, result.elapsed),
                "sys_cpu": cpu_percent(result.system_cpu, result.elapsed),
                "verify": result.verify,
            });
            if let Some(message) = &result.error_message {
                job["error_message"] = json!(message);
            }
            if let Some(stats) = &result.engine_stats {
                job["tidepool"] = stats.clone();
            }
            job
        })
        .collect();
    json!({
        "fio version": VERSION,
        "timestamp": now.as_secs(),
        "timestamp_ms": now.as_millis() as u64,
        "jobs": jobs,
        "disk_util": [],
    })
}

/// The unit of a `lat` line, by fio's rule (stat.c `display_lat`): scale nanoseconds down to
/// usec (or msec) only when min, max, mean and stddev all exceed 1000 of the smaller unit.
/// Returns (name, ns per unit).
pub fn latency_unit(summary: &LatencySummary) -> (&'static str, u64) {
    let all_above = |per: u64| {
        let per_f = per as f64;
        summary.min / per > 1000
            && summary.max / per > 1000
            && summary.mean / per_f > 1000.0
            && summary.stddev / per_f > 1000.0
    };
    if all_above(1_000) {
        ("msec", 1_000_000)
    } else if all_above(1) {
        ("usec", 1_000)
    } else {
        ("nsec", 1)
    }
}

/// The unit of a percentile block, by fio's rule (stat.c `show_clat_percentiles`).
pub fn percentile_unit(min_ns: u64, max_ns: u64) -> (&'static str, u64) {
    if min_ns > 2_000_000 && max_ns > 99_999_999 {
        ("msec", 1_000_000)
    } else if min_ns > 2_000 && max_ns > 99_999 {
        ("usec", 1_000)
    } else {
        ("nsec", 1)
    }
}

/// `value_ns` in `unit_ns` units, truncated as fio prints integers.
pub fn in_unit(value_ns: u64, unit_ns: u64) -> u64 {
    value_ns / unit_ns
}

/// IOPS as fio prints them: up to 4 significant digits with k/M suffixes.
pub fn format_iops(iops: f64) -> String {
    if iops < 10_000.0 {
        format!("{iops:.0}")
    } else if iops < 10_000_000.0 {
        let thousands = iops / 1000.0;
        if thousands < 100.0 {
            format!("{thousands:.1}k")
        } else {
            format!("{thousands:.0}k")
        }
    } else {
        format!("{:.2}M", iops / 1e6)
    }
}

/// A quantity scaled by `base` into `units` until it is below 10000, 4 significant digits at most.
fn scaled(mut value: f64, base: f64, units: &[&str]) -> String {
    let mut unit = 0;
    while value >= 10_000.0 && unit + 1 < units.len() {
        value /= base;
        unit += 1;
    }
    let digits = if value >= 100.0 {
        0
    } else if value >= 10.0 {
        1
    } else {
        2
    };
    format!("{value:.digits$}{}", units[unit])
}

/// One `slat/clat/lat (unit): min=, max=, avg=, stdev=` line.
fn latency_line(out: &mut String, label: &str, summary: &LatencySummary) {
    let (unit, per) = latency_unit(summary);
    let _ = writeln!(
        out,
        "    {label:>4} ({unit}): min={}, max={}, avg={:.2}, stdev={:.2}",
        in_unit(summary.min, per),
        in_unit(summary.max, per),
        summary.mean / per as f64,
        summary.stddev / per as f64
    );
}

/// The `clat percentiles` block, four per line.
fn percentile_block(out: &mut String, label: &str, summary: &LatencySummary) {
    let Some(percentiles) = &summary.percentiles else {
        return;
    };
    let smallest = percentiles
        .iter()
        .map(|(_, value)| *value)
        .min()
        .unwrap_or(0);
    let largest = percentiles
        .iter()
        .map(|(_, value)| *value)
        .max()
        .unwrap_or(0);
    let (unit, per) = percentile_unit(smallest, largest);
    let _ = writeln!(out, "    {label} percentiles ({unit}):");
    for row in percentiles.chunks(4) {
        let cells: Vec<String> = row
            .iter()
            .map(|(p, value)| format!("{p:>5.2}th=[{:>5}]", in_unit(*value, per)))
            .collect();
        let _ = writeln!(out, "     | {}", cells.join(", "));
    }
}

/// The human block for one direction.
fn direction_text(out: &mut String, name: &str, report: &DirectionReport) {
    let _ = writeln!(
        out,
        "  {name}: IOPS={}, BW={} ({})({}/{}msec)",
        format_iops(report.iops),
        scaled(
            report.bw_bytes as f64,
            1024.0,
            &["B/s", "KiB/s", "MiB/s", "GiB/s", "TiB/s"]
        ),
        scaled(
            report.bw_bytes as f64,
            1000.0,
            &["B/s", "kB/s", "MB/s", "GB/s", "TB/s"]
        ),
        scaled(
            report.io_bytes as f64,
            1024.0,
            &["B", "KiB", "MiB", "GiB", "TiB"]
        ),
        report.runtime_ms
    );
    latency_line(out, "slat", &report.slat);
    latency_line(out, "clat", &report.clat);
    latency_line(out, "lat", &report.lat);
    percentile_block(out, "clat", &report.clat);
}

/// One human line from the tidepool engine's statistics object: the DMA mode and the paths it
/// took, the pool's capacity, peak use, growth and waits, and the direct mapper's calls. Fields
/// that are missing are left out (the JSON report has everything).
pub fn engine_stats_line(stats: &Value) -> String {
    let number = |value: &Value, key: &str| value.get(key).and_then(Value::as_u64);
    let mib = |bytes: u64| format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20));
    let mut parts = Vec::new();
    if let Some(dma) = stats.get("dma").and_then(Value::as_str) {
        let mut part = format!("dma={dma}");
        if let Some(threshold) = stats.get("dma_threshold") {
            match threshold.as_u64() {
                Some(bytes) => part.push_str(&format!(" (map from {} KiB)", bytes / 1024)),
                None => part.push_str(" (always bounce)"),
            }
        }
        parts.push(part);
    }
    if let Some(paths) = stats.get("paths") {
        parts.push(format!(
            "bounced={} mapped={} zero-copy={}",
            number(paths, "bounced").unwrap_or(0),
            number(paths, "mapped").unwrap_or(0),
            number(paths, "zero_copy").unwrap_or(0)
        ));
    }
    if let Some(pool) = stats.get("pool") {
        parts.push(format!(
            "pool: capacity {}, peak {}, in use {}, chunks {}, grows {}, waits {}, immediate failures {}",
            mib(number(pool, "capacity_bytes").unwrap_or(0)),
            mib(number(pool, "peak_allocated_bytes").unwrap_or(0)),
            mib(number(pool, "in_use_bytes").unwrap_or(0)),
            number(pool, "chunks").unwrap_or(0),
            number(pool, "grows").unwrap_or(0),
            number(pool, "waits").unwrap_or(0),
            number(pool, "immediate_failures").unwrap_or(0)
        ));
    }
    if let Some(direct) = stats.get("direct") {
        parts.push(format!(
            "iommu maps={} unmaps={}",
            number(direct, "maps").unwrap_or(0),
            number(direct, "unmaps").unwrap_or(0)
        ));
    }
    if parts.is_empty() {
        stats.to_string()
    } else {
        parts.join("; ")
    }
}

/// fio's human-readable summary of all clones.
pub fn render_normal(results: &[CloneResult]) -> String {
    let mut out = String::new();
    let pid = std::process::id();
    for result in results {
        let (read, write) = direction_reports(result);
        let _ = writeln!(
            out,
            "{}: (groupid=0, jobs=1): err={:>2}: pid={pid}: clone={} ioengine={}",
            result.spec.name, result.error, result.clone, result.engine
        );
        if let Some(message) = &result.error_message {
            let _ = writeln!(out, "  error: {message}");
        }
        if read.total_ios > 0 {
            direction_text(&mut out, "read", &read);
        }
        if write.total_ios > 0 {
            direction_text(&mut out, "write", &write);
        }
        let _ = writeln!(
            out,
            "  cpu          : usr={:.2}%, sys={:.2}%",
            cpu_percent(result.user_cpu, result.elapsed),
            cpu_percent(result.system_cpu, result.elapsed)
        );
        if result.verify.checked > 0 || result.verify.mismatches > 0 {
            let _ = writeln!(
                out,
                "  verify: {} blocks checked, {} mismatches",
                result.verify.checked, result.verify.mismatches
            );
            for mismatch in &result.verify.bad_blocks {
                let _ = writeln!(out, "    bad {mismatch}");
            }
        }
        if let Some(stats) = &result.engine_stats {
            let _ = writeln!(out, "  tidepool: {}", engine_stats_line(stats));
        }
        out.push('\n');
    }
    out.push_str("Run status group 0 (all jobs):\n");
    for (label, pick) in [("READ", true), ("WRITE", false)] {
        let reports: Vec<DirectionReport> = results
            .iter()
            .map(|result| {
                let (read, write) = direction_reports(result);
                if pick {
                    read
                } else {
                    write
                }
            })
            .filter(|report| report.total_ios > 0)
            .collect();
        if reports.is_empty() {
            continue;
        }
        let bytes: u64 = reports.iter().map(|report| report.io_bytes).sum();
        let bw: u64 = reports.iter().map(|report| report.bw_bytes).sum();
        let run_min = reports
            .iter()
            .map(|report| report.runtime_ms)
            .min()
            .unwrap_or(0);
        let run_max = reports
            .iter()
            .map(|report| report.runtime_ms)
            .max()
            .unwrap_or(0);
        let _ = writeln!(
            out,
            "{label:>7}: bw={} ({}), io={}, run={run_min}-{run_max}msec",
            scaled(
                bw as f64,
                1024.0,
                &["B/s", "KiB/s", "MiB/s", "GiB/s", "TiB/s"]
            ),
            scaled(bw as f64, 1000.0, &["B/s", "kB/s", "MB/s", "GB/s", "TB/s"]),
            scaled(bytes as f64, 1024.0, &["B", "KiB", "MiB", "GiB", "TiB"]),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_stats_line_summarises_the_tidepool_object() {
        let stats = json!({
            "dma": "auto",
            "dma_threshold": 65536,
            "paths": {"bounced": 10, "mapped": 5, "zero_copy": 0},
            "pool": {"capacity_bytes": 16u64 << 20, "peak_allocated_bytes": 1u64 << 20,
                     "in_use_bytes": 0, "chunks": 1, "grows": 0, "waits": 2, "immediate_failures": 0},
            "direct": {"maps": 5, "unmaps": 5},
        });
        assert_eq!(
            engine_stats_line(&stats),
            "dma=auto (map from 64 KiB); bounced=10 mapped=5 zero-copy=0; pool: capacity 16.0 MiB, \
             peak 1.0 MiB, in use 0.0 MiB, chunks 1, grows 0, waits 2, immediate failures 0; \
             iommu maps=5 unmaps=5"
        );
        assert_eq!(engine_stats_line(&json!({"x": 1})), "{\"x\":1}");
    }

    #[test]
    fn iops_formatting_like_fio() {
        assert_eq!(format_iops(912.4), "912");
        assert_eq!(format_iops(9123.0), "9123");
        assert_eq!(format_iops(85_231.0), "85.2k");
        assert_eq!(format_iops(125_400.0), "125k");
        assert_eq!(format_iops(12_500_000.0), "12.50M");
    }

    #[test]
    fn units_and_rounding() {
        assert_eq!(percentile_unit(1_000, 50_000), ("nsec", 1));
        assert_eq!(percentile_unit(2_001, 100_000), ("usec", 1000));
        assert_eq!(percentile_unit(2_000_001, 100_000_000), ("msec", 1_000_000));
        let summary = |min, max, mean, stddev| LatencySummary {
            min,
            max,
            mean,
            stddev,
            count: 2,
            percentiles: None,
        };
        assert_eq!(
            latency_unit(&summary(1_001, 90_000, 5_000.0, 2_000.0)).0,
            "usec"
        );
        assert_eq!(
            latency_unit(&summary(1_001, 90_000, 5_000.0, 900.0)).0,
            "nsec"
        );
        assert_eq!(
            latency_unit(&summary(2_000_000, 9_000_000, 5e6, 2e6)).0,
            "msec"
        );
        assert_eq!(in_unit(1_999, 1000), 1);
        assert_eq!(percentile_key(99.95), "99.950000");
    }
}
