//! `tplab tune`: a few tidepool knob sets, and the static pool for reference, on one trace,
//! each run `repeat` times in alternating order (A B C, then C B A, …) so that the host's load
//! drifts over all of them alike; medians and every round reported, with the load average
//! at each run. For narrowing a frontier found by `tplab sweep` on a noisy host, where one
//! run per point cannot rank points a few µs or a MiB apart.

use std::fmt::Write as _;

use crate::metrics::compute;
use crate::policy::{Base, Knobs, Policy};
use crate::report::static_search;
use crate::run::{run, RunError, RunOptions};
use crate::trace::Trace;

const MIB: f64 = (1 << 20) as f64;

/// One run of one configuration.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TuneRun {
    /// Time-averaged memory, MiB.
    pub avg_mib: f64,
    /// Peak memory, MiB.
    pub peak_mib: f64,
    /// p99 map latency, µs.
    pub p99_us: f64,
    /// p99.9 map latency, µs.
    pub p999_us: f64,
    /// Failed maps.
    pub failed: u64,
    /// Maps that waited in the pool.
    pub waits: u64,
    /// How late arrivals were released (p99, µs).
    pub lag_p99_us: u64,
    /// The 1-minute load average when the run started.
    pub load1: f64,
}

/// One configuration's runs.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TuneRow {
    /// `static size=NM` or the tidepool knobs' label.
    pub label: String,
    /// Every run, in round order.
    pub runs: Vec<TuneRun>,
}

/// The 1-minute load average (NaN if unreadable).
pub fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Runs the static pool of `static_bytes` (found by the static search when `None`) and each
/// of `knobs` on tidepool, `repeat` rounds (see the module doc). Row 0 is static.
pub fn tune(
    trace: &Trace,
    hugepages: bool,
    knobs: &[Knobs],
    static_bytes: Option<u64>,
    repeat: usize,
    opts: &RunOptions,
    samples_dir: Option<&std::path::Path>,
) -> Result<Vec<TuneRow>, RunError> {
    let base = Base::for_trace(trace.max_size(), hugepages);
    let static_bytes = match static_bytes {
        Some(b) => b,
        None => static_search(trace, &base, opts)?.size_bytes,
    };
    let mut configs = vec![(
        format!("static size={}M", static_bytes >> 20),
        base.config(Policy::Static, static_bytes as usize),
    )];
    for k in knobs {
        configs.push((k.label(), k.apply(base.config(Policy::Tidepool, 0))));
    }
    let mut rows: Vec<TuneRow> = configs
        .iter()
        .map(|(label, _)| TuneRow {
            label: label.clone(),
            runs: Vec::new(),
        })
        .collect();
    for round in 0..repeat {
        let order: Vec<usize> = if round % 2 == 0 {
            (0..configs.len()).collect()
        } else {
            (0..configs.len()).rev().collect()
        };
        for i in order {
            let load = load1();
            let r = run(trace, configs[i].1.clone(), opts)?;
            let m = compute(trace, &r);
            if let Some(dir) = samples_dir {
                // t_us,capacity,in_use,waiters per sample: for looking at one run closely.
                let mut csv = String::from("t_us,capacity_bytes,in_use_bytes,waiters\n");
                for x in &r.samples {
                    let _ = writeln!(
                        csv,
                        "{},{},{},{}",
                        x.t_us, x.capacity_bytes, x.in_use_bytes, x.waiters
                    );
                }
                let name = format!("samples_{i}_round{round}.csv");
                if let Err(e) = std::fs::write(dir.join(&name), csv) {
                    eprintln!("  writing {name}: {e}");
                }
            }
            let one = TuneRun {
                avg_mib: m.avg_bytes / MIB,
                peak_mib: m.peak_bytes as f64 / MIB,
                p99_us: m.map_latency.p99_us,
                p999_us: m.map_latency.p999_us,
                failed: m.failed_awaitable + m.failed_immediate,
                waits: m.pool_wait.count,
                lag_p99_us: m.arrival_lag_p99_us,
                load1: load,
            };
            eprintln!(
                "  round {round} {:45} avg {:6.2} MiB p99 {:9.1} us p99.9 {:9.1} us failed {} waits {} lag {} us load {:.1}",
                rows[i].label, one.avg_mib, one.p99_us, one.p999_us, one.failed, one.waits,
                one.lag_p99_us, one.load1
            );
            rows[i].runs.push(one);
        }
    }
    Ok(rows)
}

fn median(v: impl Iterator<Item = f64>) -> f64 {
    crate::growth::median(&v.collect::<Vec<_>>())
}

/// The rows as a markdown table: medians, then every run; each tidepool row's median average
/// against static's and its median p99 against static's.
pub fn markdown(rows: &[TuneRow], command: &str, workload: &str) -> String {
    let mut s = format!(
        "Command: `{command}`  \nWorkload `{workload}`. Medians of the rounds; every round in \
         brackets (load average at its start in the last column).\n\n\
         | configuration | avg MiB | static avg / avg | p99 µs | p99 / static's | p99.9 µs | failed (sum) | waits | avg per round | p99 per round | load per round |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n"
    );
    let Some(stat) = rows.first() else {
        return s;
    };
    let s_avg = median(stat.runs.iter().map(|r| r.avg_mib));
    let s_p99 = median(stat.runs.iter().map(|r| r.p99_us));
    let list = |v: Vec<f64>, d: usize| {
        v.iter()
            .map(|x| format!("{x:.d$}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for row in rows {
        let avg = median(row.runs.iter().map(|r| r.avg_mib));
        let p99 = median(row.runs.iter().map(|r| r.p99_us));
        let _ = writeln!(
            s,
            "| {} | {:.2} | {:.2} | {:.1} | {:.2} | {:.0} | {} | {:.0} | [{}] | [{}] | [{}] |",
            row.label,
            avg,
            s_avg / avg,
            p99,
            p99 / s_p99,
            median(row.runs.iter().map(|r| r.p999_us)),
            row.runs.iter().map(|r| r.failed).sum::<u64>(),
            median(row.runs.iter().map(|r| r.waits as f64)),
            list(row.runs.iter().map(|r| r.avg_mib).collect(), 2),
            list(row.runs.iter().map(|r| r.p99_us).collect(), 1),
            list(row.runs.iter().map(|r| r.load1).collect(), 1),
        );
    }
    s
}
