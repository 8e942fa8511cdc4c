//! Reports in fio's two layouts: the human-readable summary and the JSON document.
//!
//! Both are rendered from the same [`DirectionReport`] values, computed once per clone and
//! direction, so they always carry the same numbers: the human text only rounds them for display.
//! JSON field names are fio's (`fio version`, `jobs[].jobname`, `jobs[].read.iops`,
//! `jobs[].read.clat_ns.percentile["99.000000"]`, ...), so fio tooling parses the output; every key
//! of a fio 3.33 report is present with the same JSON type (tests/fidelity.rs). tpio takes no
//! periodic samples, so fio's sample fields (`bw_min`, `iops_mean`, ...) describe one sample that
//! spans the whole runtime. With `group_reporting` a reporting group is one summed job. tpio adds
//! `jobs[].job_start` (as newer fio does), `jobs[].verify` and, when the engine reports it,
//! `jobs[].tidepool`; `disk_util` is always empty.

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
pub fn direction_reports(result: &CloneResult) -> (DirectionReport, DirectionReport) {
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

/// A job as reported: one clone, or with `group_reporting` a whole group summed.
#[derive(Debug, Clone)]
pub struct ReportedJob {
    /// The (merged) numbers.
    pub result: CloneResult,
    /// Clones summed into it.
    pub jobs: u32,
    /// Its direction reports (read, write).
    pub read: DirectionReport,
    /// Write report.
    pub write: DirectionReport,
}

/// Adds `other` into `into` (group reporting): counts and samples summed, runtimes the longest.
fn merge_result(into: &mut CloneResult, other: &CloneResult) {
    into.read.merge(&other.read);
    into.write.merge(&other.write);
    into.read_runtime = into.read_runtime.max(other.read_runtime);
    into.write_runtime = into.write_runtime.max(other.write_runtime);
    into.elapsed = into.elapsed.max(other.elapsed);
    into.started_at = into.started_at.min(other.started_at);
    into.user_cpu += other.user_cpu;
    into.system_cpu += other.system_cpu;
    if into.error == 0 && other.error != 0 {
        into.error = other.error;
        into.error_message = other.error_message.clone();
    }
    into.verify.checked += other.verify.checked;
    into.verify.mismatches += other.verify.mismatches;
    into.verify
        .bad_blocks
        .extend(other.verify.bad_blocks.iter().cloned());
    for (mine, theirs) in [
        (&mut into.depth_buckets, &other.depth_buckets),
        (&mut into.submit_buckets, &other.submit_buckets),
        (&mut into.complete_buckets, &other.complete_buckets),
    ] {
        for (a, b) in mine.iter_mut().zip(theirs) {
            *a += b;
        }
    }
    into.ctx += other.ctx;
    into.faults.0 += other.faults.0;
    into.faults.1 += other.faults.1;
}

/// The jobs as fio reports them: each clone on its own, except that a reporting group with
/// `group_reporting` set becomes one job (named after its first job) summing all its clones.
pub fn reported_jobs(results: &[CloneResult]) -> Vec<ReportedJob> {
    let mut jobs: Vec<ReportedJob> = Vec::new();
    let mut merged_group: Option<u32> = None;
    for result in results {
        let grouped = results
            .iter()
            .any(|other| other.groupid == result.groupid && other.spec.group_reporting);
        if grouped && merged_group == Some(result.groupid) {
            if let Some(last) = jobs.last_mut() {
                merge_result(&mut last.result, result);
                last.jobs += 1;
            }
            continue;
        }
        merged_group = grouped.then_some(result.groupid);
        jobs.push(ReportedJob {
            result: result.clone(),
            jobs: 1,
            read: DirectionReport::new(&DirectionStats::default(), Duration::ZERO),
            write: DirectionReport::new(&DirectionStats::default(), Duration::ZERO),
        });
    }
    for job in &mut jobs {
        let (read, write) = direction_reports(&job.result);
        job.read = read;
        job.write = write;
    }
    jobs
}

/// A direction object in fio's layout. tpio takes no periodic bandwidth/IOPS samples: the
/// `bw_*`/`iops_*` sample fields describe one sample spanning the whole runtime (`*_samples` 1,
/// deviation 0), or zeros when the direction did nothing. `group_bw` is the group's bandwidth in
/// this direction, for `bw_agg`.
fn direction_json(
    report: &DirectionReport,
    stats: &DirectionStats,
    group_bw: u64,
    bins: bool,
) -> Value {
    let active = report.total_ios > 0;
    let kib = report.bw_bytes / 1024;
    let mut clat = latency_json(&report.clat);
    if !active {
        if let Some(object) = clat.as_object_mut() {
            object.remove("percentile");
        }
    } else if bins {
        let map: Map<String, Value> = stats
            .clat
            .bins()
            .into_iter()
            .map(|(value, count)| (value.to_string(), json!(count)))
            .collect();
        clat["bins"] = Value::Object(map);
    }
    let mut lat = latency_json(&report.lat);
    if let Some(object) = lat.as_object_mut() {
        object.remove("percentile");
    }
    json!({
        "io_bytes": report.io_bytes,
        "io_kbytes": report.io_bytes / 1024,
        "bw_bytes": report.bw_bytes,
        "bw": kib,
        "iops": report.iops,
        "runtime": report.runtime_ms,
        "total_ios": report.total_ios,
        "short_ios": 0,
        "drop_ios": 0,
        "slat_ns": latency_json(&report.slat),
        "clat_ns": clat,
        "lat_ns": lat,
        "bw_min": kib,
        "bw_max": kib,
        "bw_agg": if group_bw > 0 { 100.0 * report.bw_bytes as f64 / group_bw as f64 } else { 0.0 },
        "bw_mean": kib as f64,
        "bw_dev": 0.0,
        "bw_samples": u64::from(active),
        "iops_min": report.iops.round() as u64,
        "iops_max": report.iops.round() as u64,
        "iops_mean": report.iops,
        "iops_stddev": 0.0,
        "iops_samples": u64::from(active),
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

/// Options as fio echoes them: an object of strings, in the order given (a later repeat wins).
fn options_json(options: &[(String, String)]) -> Value {
    let mut map = Map::new();
    for (key, value) in options {
        map.insert(key.clone(), json!(value));
    }
    Value::Object(map)
}

/// `counts` as percentages of their sum under fio's `keys`.
fn percent_map(keys: &[&str], counts: &[u64]) -> Value {
    let total: u64 = counts.iter().sum();
    let map: Map<String, Value> = keys
        .iter()
        .zip(counts)
        .map(|(key, count)| {
            let percent = if total == 0 {
                0.0
            } else {
                100.0 * *count as f64 / total as f64
            };
            (key.to_string(), json!(percent))
        })
        .collect();
    Value::Object(map)
}

/// fio's latency bucket edges: `latency_ns`/`latency_us` upper bounds, then `latency_ms`'s.
const LAT_EDGES: [u64; 10] = [2, 4, 10, 20, 50, 100, 250, 500, 750, 1000];
const LAT_MS_EDGES: [u64; 11] = [2, 4, 10, 20, 50, 100, 250, 500, 750, 1000, 2000];

/// (fio key, percent) pairs of one latency map.
type Buckets = Vec<(String, f64)>;

/// The share of I/Os (reads and writes) whose total latency falls in each of fio's buckets:
/// (ns map, us map, ms map) with fio's keys.
fn latency_buckets(result: &CloneResult) -> (Buckets, Buckets, Buckets) {
    let mut lat = result.read.lat.clone();
    lat.merge(&result.write.lat);
    let total = lat.count();
    let share = |low: u64, high: u64| {
        if total == 0 {
            0.0
        } else {
            100.0 * lat.count_between(low, high) as f64 / total as f64
        }
    };
    let series = |edges: &[u64], scale: u64, start: u64| {
        let mut low = start;
        edges
            .iter()
            .map(|edge| {
                let high = edge * scale;
                let value = share(low, high);
                low = high + 1;
                (edge.to_string(), value)
            })
            .collect::<Vec<_>>()
    };
    let ns = series(&LAT_EDGES, 1, 0);
    let us = series(&LAT_EDGES, 1_000, 1_001);
    let mut ms = series(&LAT_MS_EDGES, 1_000_000, 1_000_001);
    ms.push((">=2000".into(), share(2_000_000_001, u64::MAX)));
    (ns, us, ms)
}

/// A list of (key, value) as a JSON object.
fn pairs_json(pairs: &[(String, f64)]) -> Value {
    Value::Object(pairs.iter().map(|(k, v)| (k.clone(), json!(v))).collect())
}

/// fio's `time` field: the local time in C's `ctime` layout, without the newline.
pub fn ctime(seconds: u64) -> String {
    let time = seconds as libc::time_t;
    let mut tm = std::mem::MaybeUninit::<libc::tm>::zeroed();
    let mut buffer = [0u8; 64];
    // SAFETY: localtime_r fills the tm we own; strftime writes at most buffer.len() bytes into
    // our buffer and returns how many; the format is a NUL-terminated literal.
    let written = unsafe {
        if libc::localtime_r(&time, tm.as_mut_ptr()).is_null() {
            return String::new();
        }
        libc::strftime(
            buffer.as_mut_ptr().cast(),
            buffer.len(),
            c"%a %b %e %H:%M:%S %Y".as_ptr(),
            tm.as_ptr(),
        )
    };
    String::from_utf8_lossy(&buffer[..written]).into_owned()
}

/// The whole JSON document; `plus` adds fio's json+ `clat_ns.bins`.
pub fn render_json(results: &[CloneResult], plus: bool) -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let reported = reported_jobs(results);
    let group_bw = |group: u32, read: bool| -> u64 {
        reported
            .iter()
            .filter(|job| job.result.groupid == group)
            .map(|job| {
                if read {
                    job.read.bw_bytes
                } else {
                    job.write.bw_bytes
                }
            })
            .sum()
    };
    let jobs: Vec<Value> = reported
        .iter()
        .map(|job| {
            let result = &job.result;
            let empty_stats = DirectionStats::default();
            let empty = DirectionReport::new(&empty_stats, Duration::ZERO);
            let zero_lat = json!({"min": 0, "max": 0, "mean": 0.0, "stddev": 0.0, "N": 0});
            let (ns, us, ms) = latency_buckets(result);
            let started = result
                .started_at
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            let mut object = json!({
                "jobname": result.spec.name,
                "groupid": result.groupid,
                "job_start": started.as_millis() as u64,
                "error": result.error,
                "eta": 0,
                "elapsed": result.elapsed.as_secs_f64().round() as u64,
                "job options": options_json(&result.spec.given_options),
                "read": direction_json(&job.read, &result.read, group_bw(result.groupid, true), plus),
                "write": direction_json(&job.write, &result.write, group_bw(result.groupid, false), plus),
                "trim": direction_json(&empty, &empty_stats, 0, false),
                "sync": {"total_ios": 0, "lat_ns": zero_lat},
                "job_runtime": result.elapsed.as_millis() as u64,
                "usr_cpu": cpu_percent(result.user_cpu, result.elapsed),
                "sys_cpu": cpu_percent(result.system_cpu, result.elapsed),
                "ctx": result.ctx,
                "majf": result.faults.0,
                "minf": result.faults.1,
                "iodepth_level": percent_map(&["1", "2", "4", "8", "16", "32", ">=64"], &result.depth_buckets),
                "iodepth_submit": percent_map(&["0", "4", "8", "16", "32", "64", ">=64"], &result.submit_buckets),
                "iodepth_complete": percent_map(&["0", "4", "8", "16", "32", "64", ">=64"], &result.complete_buckets),
                "latency_ns": pairs_json(&ns),
                "latency_us": pairs_json(&us),
                "latency_ms": pairs_json(&ms),
                "latency_depth": result.spec.iodepth,
                "latency_target": 0,
                "latency_percentile": 100.0,
                "latency_window": 0,
                "verify": result.verify,
            });
            if let Some(message) = &result.error_message {
                object["error_message"] = json!(message);
            }
            if let Some(stats) = &result.engine_stats {
                object["tidepool"] = stats.clone();
            }
            object
        })
        .collect();
    let mut document = Map::new();
    document.insert("fio version".into(), json!(VERSION));
    document.insert("timestamp".into(), json!(now.as_secs()));
    document.insert("timestamp_ms".into(), json!(now.as_millis() as u64));
    document.insert("time".into(), json!(ctime(now.as_secs())));
    if let Some(first) = results
        .iter()
        .find(|result| !result.spec.global_options.is_empty())
    {
        document.insert(
            "global options".into(),
            options_json(&first.spec.global_options),
        );
    }
    document.insert("jobs".into(), Value::Array(jobs));
    document.insert("disk_util".into(), json!([]));
    Value::Object(document)
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

/// fio's `per cent` cells: `key=value%` for the non-zero ones (all when every one is zero).
fn percent_cells(pairs: &[(String, f64)], keep_zero: bool) -> String {
    pairs
        .iter()
        .filter(|(_, value)| keep_zero || *value > 0.0)
        .map(|(key, value)| format!("{key}={value:.1}%"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `counts` as (fio key, percent) pairs.
fn percent_pairs(keys: &[&str], counts: &[u64]) -> Vec<(String, f64)> {
    let total: u64 = counts.iter().sum();
    keys.iter()
        .zip(counts)
        .map(|(key, count)| {
            let percent = if total == 0 {
                0.0
            } else {
                100.0 * *count as f64 / total as f64
            };
            (key.to_string(), percent)
        })
        .collect()
}

/// fio's human-readable summary, laid out as fio's (`name: (groupid=G, jobs=N): err= E: pid=P:
/// DATE`, direction blocks, `lat (unit)`, `cpu`, `IO depths`, then `Run status group G`).
pub fn render_normal(results: &[CloneResult]) -> String {
    let mut out = String::new();
    let pid = std::process::id();
    let reported = reported_jobs(results);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let date = ctime(now.as_secs());
    for job in &reported {
        let result = &job.result;
        let _ = writeln!(
            out,
            "{}: (groupid={}, jobs={}): err={:>2}: pid={pid}: {date}",
            result.spec.name, result.groupid, job.jobs, result.error
        );
        if let Some(message) = &result.error_message {
            let _ = writeln!(out, "  error: {message}");
        }
        for (name, report) in [("read", &job.read), ("write", &job.write)] {
            if report.total_ios == 0 {
                continue;
            }
            direction_text(&mut out, name, report);
            let kib = report.bw_bytes as f64 / 1024.0;
            let group: u64 = reported
                .iter()
                .filter(|other| other.result.groupid == result.groupid)
                .map(|other| {
                    if name == "read" {
                        other.read.bw_bytes
                    } else {
                        other.write.bw_bytes
                    }
                })
                .sum();
            let per = if group > 0 {
                100.0 * report.bw_bytes as f64 / group as f64
            } else {
                0.0
            };
            let _ = writeln!(
                out,
                "   bw (  KiB/s): min={:>5}, max={:>5}, per={per:.2}%, avg={kib:.2}, stdev=0.00, samples=1",
                kib.round() as u64,
                kib.round() as u64
            );
            let _ = writeln!(
                out,
                "   iops        : min={:>5}, max={:>5}, avg={:.2}, stdev=0.00, samples=1",
                report.iops.round() as u64,
                report.iops.round() as u64,
                report.iops
            );
        }
        let (ns, us, ms) = latency_buckets(result);
        for (unit, pairs) in [("nsec", &ns), ("usec", &us), ("msec", &ms)] {
            let cells = percent_cells(pairs, false);
            if !cells.is_empty() {
                let _ = writeln!(out, "  lat ({unit})   : {cells}");
            }
        }
        let _ = writeln!(
            out,
            "  cpu          : usr={:.2}%, sys={:.2}%, ctx={}, majf={}, minf={}",
            cpu_percent(result.user_cpu, result.elapsed),
            cpu_percent(result.system_cpu, result.elapsed),
            result.ctx,
            result.faults.0,
            result.faults.1
        );
        let _ = writeln!(
            out,
            "  IO depths    : {}",
            percent_cells(
                &percent_pairs(
                    &["1", "2", "4", "8", "16", "32", ">=64"],
                    &result.depth_buckets
                ),
                true
            )
        );
        let batch_keys = ["0", "4", "8", "16", "32", "64", ">=64"];
        let _ = writeln!(
            out,
            "     submit    : {}",
            percent_cells(&percent_pairs(&batch_keys, &result.submit_buckets), true)
        );
        let _ = writeln!(
            out,
            "     complete  : {}",
            percent_cells(&percent_pairs(&batch_keys, &result.complete_buckets), true)
        );
        let _ = writeln!(
            out,
            "     issued rwts: total={},{},0,0 short=0,0,0,0 dropped=0,0,0,0",
            job.read.total_ios, job.write.total_ios
        );
        let _ = writeln!(
            out,
            "     latency   : target=0, window=0, percentile=100.00%, depth={}",
            result.spec.iodepth
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
    let mut groups: Vec<u32> = reported.iter().map(|job| job.result.groupid).collect();
    groups.dedup();
    for group in groups {
        let _ = writeln!(out, "Run status group {group} (all jobs):");
        for (label, pick) in [("READ", true), ("WRITE", false)] {
            let reports: Vec<&DirectionReport> = reported
                .iter()
                .filter(|job| job.result.groupid == group)
                .map(|job| if pick { &job.read } else { &job.write })
                .filter(|report| report.total_ios > 0)
                .collect();
            if reports.is_empty() {
                continue;
            }
            let bytes: u64 = reports.iter().map(|report| report.io_bytes).sum();
            let bw: u64 = reports.iter().map(|report| report.bw_bytes).sum();
            let bw_min = reports
                .iter()
                .map(|report| report.bw_bytes)
                .min()
                .unwrap_or(0);
            let bw_max = reports
                .iter()
                .map(|report| report.bw_bytes)
                .max()
                .unwrap_or(0);
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
            let binary = |value: u64| {
                scaled(
                    value as f64,
                    1024.0,
                    &["B/s", "KiB/s", "MiB/s", "GiB/s", "TiB/s"],
                )
            };
            let decimal = |value: u64| {
                scaled(
                    value as f64,
                    1000.0,
                    &["B/s", "kB/s", "MB/s", "GB/s", "TB/s"],
                )
            };
            let _ = writeln!(
                out,
                "{label:>7}: bw={} ({}), {}-{} ({}-{}), io={} ({}), run={run_min}-{run_max}msec",
                binary(bw),
                decimal(bw),
                binary(bw_min),
                binary(bw_max),
                decimal(bw_min),
                decimal(bw_max),
                scaled(bytes as f64, 1024.0, &["B", "KiB", "MiB", "GiB", "TiB"]),
                scaled(bytes as f64, 1000.0, &["B", "kB", "MB", "GB", "TB"]),
            );
        }
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
