//! The report: every built-in workload under every policy, one table (markdown + JSON) and
//! plots.
//!
//! Order per workload: `tidepool` first (its peak sizes the `throttle` pool), then the
//! `static` search, then `dynamic` and `throttle`. For `multi`, each policy also runs the fast
//! device's requests alone, for the head-of-line ratio.
//!
//! **The static search.** The smallest static pool (in whole chunks) with no failed map: start
//! from the trace's ideal peak ([`crate::workload::ideal_peak_bytes`], a lower bound), double
//! until a probe has no failure, then bisect between the last failing and the first clean
//! size. A probe stops releasing requests at its first failure, so failing probes are short.
//! The clean run at the size found is the one reported.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::metrics::{compute, Metrics};
use crate::plot;
use crate::policy::{Base, Policy};
use crate::run::{run, MapResult, RunError, RunOptions, RunResult};
use crate::trace::Trace;
use crate::workload;
use tidepool::pool::PoolConfig;

const MIB: f64 = (1 << 20) as f64;

/// Report settings.
#[derive(Clone, Debug)]
pub struct ReportOptions {
    /// Output directory.
    pub out: PathBuf,
    /// Workload seed.
    pub seed: u64,
    /// Workload length factor (1.0 for the published numbers).
    pub scale: f64,
    /// Back chunks with 2 MiB hugepages (falls back to 4 KiB pages when none are free).
    pub hugepages: bool,
    /// Workloads to run (built-in names).
    pub workloads: Vec<String>,
    /// How each run goes.
    pub run: RunOptions,
}

/// One policy's results on one workload.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PolicyResult {
    /// The policy.
    pub policy: Policy,
    /// Size of a fixed pool (`static`, `throttle`), bytes.
    pub fixed_bytes: Option<u64>,
    /// The numbers.
    pub metrics: Metrics,
    /// (s, MiB) capacity, thinned to 10 ms, for plots.
    #[serde(skip)]
    pub memory_series: Vec<(f64, f64)>,
    /// (µs, fraction) map-latency CDF points, for plots.
    #[serde(skip)]
    pub latency_cdf: Vec<(f64, f64)>,
}

/// The fast device alone vs sharing the pool with the slow one.
#[derive(Clone, Debug, serde::Serialize)]
pub struct HeadOfLine {
    /// The policy.
    pub policy: Policy,
    /// Fast device's achieved MB/s alone.
    pub alone_mbps: f64,
    /// Fast device's achieved MB/s sharing the pool.
    pub shared_mbps: f64,
    /// shared / alone.
    pub ratio: f64,
}

/// One workload's results.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WorkloadResult {
    /// Workload name.
    pub name: String,
    /// What it models.
    pub description: String,
    /// Requests in its trace.
    pub requests: u64,
    /// Peak bytes mapped if every map succeeded at once (lower bound for any pool).
    pub ideal_peak_bytes: u64,
    /// Static search probes: (pool bytes, clean).
    pub static_probes: Vec<(u64, bool)>,
    /// Per policy.
    pub policies: Vec<PolicyResult>,
    /// Head-of-line ratios (`multi` only).
    pub head_of_line: Vec<HeadOfLine>,
    /// (s, req/s) offered rate in 10 ms bins, for plots.
    #[serde(skip)]
    pub rate_series: Vec<(f64, f64)>,
}

/// The whole report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    /// The command that made it.
    pub command: String,
    /// Seed.
    pub seed: u64,
    /// Length factor.
    pub scale: f64,
    /// Page size used.
    pub pages: String,
    /// What the devices were, in words.
    pub devices: String,
    /// What the latency columns measure.
    pub latency: String,
    /// Per workload.
    pub workloads: Vec<WorkloadResult>,
    /// The targets and whether they were met.
    pub targets: Vec<Target>,
}

/// A target of the issue and its outcome.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Target {
    /// What is asked.
    pub what: String,
    /// The measured value, in words.
    pub measured: String,
    /// Met?
    pub met: bool,
}

/// Runs one policy on a trace and computes its metrics.
pub fn run_policy(
    trace: &Trace,
    base: &Base,
    policy: Policy,
    fixed: usize,
    opts: &RunOptions,
) -> Result<(RunResult, Metrics), RunError> {
    let r = run(trace, base.config(policy, fixed), opts)?;
    let m = compute(trace, &r);
    Ok((r, m))
}

/// What the static search found.
#[derive(Debug)]
pub struct StaticFound {
    /// The clean run at the size found (or the cap's run if even the cap failed).
    pub run: RunResult,
    /// Its metrics.
    pub metrics: Metrics,
    /// The pool size found, bytes.
    pub size_bytes: u64,
    /// Every probe: (pool bytes, clean).
    pub probes: Vec<(u64, bool)>,
}

/// The static search of the module doc, on the device model.
pub fn static_search(
    trace: &Trace,
    base: &Base,
    opts: &RunOptions,
) -> Result<StaticFound, RunError> {
    static_search_with(trace, base, |config, stop_on_failure| {
        let o = RunOptions {
            stop_on_failure,
            ..opts.clone()
        };
        run(trace, config, &o)
    })
}

/// The static search of the module doc, with `replay(config, stop_on_failure)` running one
/// probe (the device model, or a real device).
pub fn static_search_with<E>(
    trace: &Trace,
    base: &Base,
    mut replay: impl FnMut(PoolConfig, bool) -> Result<RunResult, E>,
) -> Result<StaticFound, E> {
    let chunk = base.chunk_bytes as u64;
    let cap_chunks = (base.cap_bytes as u64 / chunk).max(1);
    let mut probes = Vec::new();
    let mut try_size =
        |chunks: u64, probes: &mut Vec<(u64, bool)>| -> Result<Option<(RunResult, Metrics)>, E> {
            let r = replay(base.config(Policy::Static, (chunks * chunk) as usize), true)?;
            let m = compute(trace, &r);
            let clean = r.outcomes.iter().all(|o| o.result != MapResult::Failed)
                && r.outcomes.len() == trace.requests.len();
            probes.push((chunks * chunk, clean));
            Ok(clean.then_some((r, m)))
        };
    let mut lo = 0u64; // largest known-failing size, in chunks
    let mut hi = workload::ideal_peak_bytes(trace).div_ceil(chunk).max(1);
    let mut best = loop {
        match try_size(hi, &mut probes)? {
            Some(run) => break run,
            None if hi >= cap_chunks => {
                // Even the cap fails: report the cap's run as is.
                let r = replay(base.config(Policy::Static, (hi * chunk) as usize), false)?;
                let m = compute(trace, &r);
                return Ok(StaticFound {
                    run: r,
                    metrics: m,
                    size_bytes: hi * chunk,
                    probes,
                });
            }
            None => {
                lo = hi;
                hi = (hi * 2).min(cap_chunks);
            }
        }
    };
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        match try_size(mid, &mut probes)? {
            Some(run) => {
                best = run;
                hi = mid;
            }
            None => lo = mid,
        }
    }
    Ok(StaticFound {
        run: best.0,
        metrics: best.1,
        size_bytes: hi * chunk,
        probes,
    })
}

/// (s, MiB) capacity series thinned to one point per 10 ms (the max in each bin, so peaks
/// stay visible).
fn memory_series(r: &RunResult) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = Vec::new();
    let mut bin = u64::MAX;
    for s in &r.samples {
        let b = s.t_us / 10_000;
        let v = s.capacity_bytes as f64 / MIB;
        if b == bin {
            if let Some(last) = out.last_mut() {
                last.1 = last.1.max(v);
            }
        } else {
            bin = b;
            out.push((b as f64 / 100.0, v));
        }
    }
    out
}

/// (µs, fraction) CDF of successful maps' latency, at most ~500 points.
fn latency_cdf(r: &RunResult) -> Vec<(f64, f64)> {
    let mut v: Vec<u64> = r
        .outcomes
        .iter()
        .filter(|o| o.result != MapResult::Failed)
        .map(|o| o.map_ns)
        .collect();
    v.sort_unstable();
    let n = v.len();
    if n == 0 {
        return Vec::new();
    }
    let step = (n / 500).max(1);
    let mut out: Vec<(f64, f64)> = (0..n)
        .step_by(step)
        .map(|i| (v[i] as f64 / 1000.0, (i + 1) as f64 / n as f64))
        .collect();
    out.push((v[n - 1] as f64 / 1000.0, 1.0));
    out
}

/// (s, req/s) offered rate in 10 ms bins.
fn rate_series(trace: &Trace) -> Vec<(f64, f64)> {
    let bins = (trace.span_us() / 10_000 + 1) as usize;
    let mut counts = vec![0u64; bins];
    for r in &trace.requests {
        counts[(r.time_us / 10_000) as usize] += 1;
    }
    counts
        .iter()
        .enumerate()
        .map(|(i, c)| (i as f64 / 100.0, *c as f64 * 100.0))
        .collect()
}

fn result(policy: Policy, fixed: Option<u64>, r: &RunResult, m: Metrics) -> PolicyResult {
    PolicyResult {
        policy,
        fixed_bytes: fixed,
        metrics: m,
        memory_series: memory_series(r),
        latency_cdf: latency_cdf(r),
    }
}

/// Runs every policy on `trace` (see the module doc) on the device model, logging progress
/// to stderr.
pub fn run_workload(
    name: &str,
    trace: &Trace,
    hugepages: bool,
    opts: &RunOptions,
) -> Result<WorkloadResult, RunError> {
    let base = Base::for_trace(trace.max_size(), hugepages);
    run_workload_with(name, trace, base, |t, config, stop_on_failure| {
        let o = RunOptions {
            stop_on_failure,
            ..opts.clone()
        };
        run(t, config, &o)
    })
}

/// Runs every policy on `trace` (see the module doc) with `replay(trace, config,
/// stop_on_failure)` running one replay (the device model or a real device).
pub fn run_workload_with<E>(
    name: &str,
    trace: &Trace,
    base: Base,
    mut replay: impl FnMut(&Trace, PoolConfig, bool) -> Result<RunResult, E>,
) -> Result<WorkloadResult, E> {
    let log = |what: &str, m: &Metrics| {
        eprintln!(
            "  {name:8} {what:9} peak {:6.1} MiB avg {:6.1} MiB fail {}/{} map p99 {:8.1} us ({:.1} s)",
            m.peak_bytes as f64 / MIB,
            m.avg_bytes / MIB,
            m.failed_awaitable,
            m.failed_immediate,
            m.map_latency.p99_us,
            m.elapsed_s
        )
    };
    let mut one = |t: &Trace, policy: Policy, fixed: usize| -> Result<(RunResult, Metrics), E> {
        let r = replay(t, base.config(policy, fixed), false)?;
        let m = compute(t, &r);
        Ok((r, m))
    };
    let mut policies = Vec::new();
    let (r, m) = one(trace, Policy::Tidepool, 0)?;
    log("tidepool", &m);
    let tidepool_peak = m.peak_bytes;
    let tidepool = result(Policy::Tidepool, None, &r, m);
    drop(r);

    let found = static_search_with(trace, &base, |config, stop| replay(trace, config, stop))?;
    log("static", &found.metrics);
    let probes = found.probes;
    policies.push(result(
        Policy::Static,
        Some(found.size_bytes),
        &found.run,
        found.metrics,
    ));
    drop(found.run);
    let mut one = |t: &Trace, policy: Policy, fixed: usize| -> Result<(RunResult, Metrics), E> {
        let r = replay(t, base.config(policy, fixed), false)?;
        let m = compute(t, &r);
        Ok((r, m))
    };

    let (r, m) = one(trace, Policy::Dynamic, 0)?;
    log("dynamic", &m);
    policies.push(result(Policy::Dynamic, None, &r, m));
    drop(r);

    let throttle_bytes = (tidepool_peak as usize).max(base.chunk_bytes);
    let (r, m) = one(trace, Policy::Throttle, throttle_bytes)?;
    log("throttle", &m);
    let throttle_fixed = r.config.max_bytes as u64;
    policies.push(result(Policy::Throttle, Some(throttle_fixed), &r, m));
    drop(r);
    policies.push(tidepool);

    let mut head_of_line = Vec::new();
    if trace.devices.len() > 1 && name == "multi" {
        let fast = trace.devices.len() - 1;
        let alone = trace.only_device(fast);
        for p in &policies {
            let fixed = p.fixed_bytes.unwrap_or(0) as usize;
            let (_, m) = one(&alone, p.policy, fixed)?;
            let alone_mbps = m.devices.iter().map(|d| d.achieved_mbps).sum::<f64>();
            let shared_mbps = p.metrics.devices.get(fast).map_or(0.0, |d| d.achieved_mbps);
            eprintln!(
                "  {name:8} {:9} fast device alone {alone_mbps:.1} MB/s, shared {shared_mbps:.1} MB/s",
                p.policy.name()
            );
            head_of_line.push(HeadOfLine {
                policy: p.policy,
                alone_mbps,
                shared_mbps,
                ratio: if alone_mbps > 0.0 {
                    shared_mbps / alone_mbps
                } else {
                    0.0
                },
            });
        }
    }
    Ok(WorkloadResult {
        name: name.to_string(),
        description: workload::describe(name).to_string(),
        requests: trace.requests.len() as u64,
        ideal_peak_bytes: workload::ideal_peak_bytes(trace),
        static_probes: probes,
        policies,
        head_of_line,
        rate_series: rate_series(trace),
    })
}

/// Checks the targets against the results.
pub fn targets(workloads: &[WorkloadResult]) -> Vec<Target> {
    let mut out = Vec::new();
    let find = |w: &WorkloadResult, p: Policy| w.policies.iter().find(|r| r.policy == p).cloned();
    if let Some(w) = workloads.iter().find(|w| w.name == "bursty") {
        if let (Some(t), Some(s)) = (find(w, Policy::Tidepool), find(w, Policy::Static)) {
            let (t, s) = (&t.metrics, &s.metrics);
            out.push(Target {
                what: "bursty: tidepool has 0 failed awaitable and 0 failed immediate maps".into(),
                measured: format!(
                    "{} awaitable, {} immediate",
                    t.failed_awaitable, t.failed_immediate
                ),
                met: t.failed_awaitable == 0 && t.failed_immediate == 0,
            });
            out.push(Target {
                what:
                    "bursty: tidepool time-averaged memory <= 1/4 of the search-sized static pool's"
                        .into(),
                measured: format!(
                    "{:.2} MiB vs {:.2} MiB = 1/{:.1}",
                    t.avg_bytes / MIB,
                    s.avg_bytes / MIB,
                    s.avg_bytes / t.avg_bytes.max(1.0)
                ),
                met: t.avg_bytes * 4.0 <= s.avg_bytes,
            });
            out.push(Target {
                what: "bursty: tidepool map latency p99 <= 2x static's map latency p99".into(),
                measured: format!(
                    "{:.1} us vs {:.1} us = {:.2}x",
                    t.map_latency.p99_us,
                    s.map_latency.p99_us,
                    t.map_latency.p99_us / s.map_latency.p99_us.max(0.001)
                ),
                met: t.map_latency.p99_us <= 2.0 * s.map_latency.p99_us,
            });
        }
    }
    let failed: Vec<String> = workloads
        .iter()
        .filter_map(|w| {
            let t = w.policies.iter().find(|p| p.policy == Policy::Tidepool)?;
            let n = t.metrics.failed_awaitable + t.metrics.failed_immediate;
            Some(format!("{} {n}", w.name))
        })
        .collect();
    if !failed.is_empty() {
        out.push(Target {
            what: "tidepool: 0 failed maps on every workload".into(),
            measured: failed.join(", "),
            met: failed.iter().all(|f| f.ends_with(" 0")),
        });
    }
    if let Some(w) = workloads.iter().find(|w| w.name == "multi") {
        if let Some(h) = w.head_of_line.iter().find(|h| h.policy == Policy::Tidepool) {
            out.push(Target {
                what: "multi: fast device under tidepool >= 80% of its throughput alone".into(),
                measured: format!(
                    "{:.1} MB/s shared vs {:.1} MB/s alone = {:.0}%",
                    h.shared_mbps,
                    h.alone_mbps,
                    100.0 * h.ratio
                ),
                met: h.ratio >= 0.8,
            });
        }
    }
    out
}

/// The report as markdown.
pub fn markdown(rep: &Report, plots_have_text: bool) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "Command: `{}`  ", rep.command);
    let _ = writeln!(
        s,
        "Seed {}, length factor {}, {} pages. {}\n",
        rep.seed, rep.scale, rep.pages, rep.devices
    );
    for w in &rep.workloads {
        let _ = writeln!(
            s,
            "### {} — {}\n\n{} requests; ideal peak mapped {:.1} MiB; static search probes: {}\n",
            w.name,
            w.description,
            w.requests,
            w.ideal_peak_bytes as f64 / MIB,
            w.static_probes
                .iter()
                .map(|(b, ok)| format!("{}{}", b >> 20, if *ok { "✓" } else { "✗" }))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let _ = writeln!(
            s,
            "| policy | fixed MiB | peak MiB | avg MiB | failed await | failed immed | {} p50 / p99 / p99.9 µs | pool waits (p99 µs) | grow / shrink / transient | offered → achieved MB/s | arrival lag p99 µs |\n\
             |---|---|---|---|---|---|---|---|---|---|---|",
            rep.latency
        );
        for p in &w.policies {
            let m = &p.metrics;
            let _ = writeln!(
                s,
                "| {} | {} | {:.1} | {:.2} | {} | {} | {:.1} / {:.1} / {:.1} | {} ({:.1}) | {} / {} / {} | {:.1} → {:.1} | {} |",
                p.policy.name(),
                p.fixed_bytes.map_or("-".into(), |b| format!("{}", b >> 20)),
                m.peak_bytes as f64 / MIB,
                m.avg_bytes / MIB,
                m.failed_awaitable,
                m.failed_immediate,
                m.map_latency.p50_us,
                m.map_latency.p99_us,
                m.map_latency.p999_us,
                m.pool_wait.count,
                m.pool_wait.p99_ns as f64 / 1000.0,
                m.grows,
                m.shrinks,
                m.transient_chunks,
                m.offered_mbps,
                m.achieved_mbps,
                m.arrival_lag_p99_us,
            );
        }
        if !w.head_of_line.is_empty() {
            s.push_str("\nHead of line (fast device):\n\n| policy | alone MB/s | shared MB/s | shared/alone |\n|---|---|---|---|\n");
            for h in &w.head_of_line {
                let _ = writeln!(
                    s,
                    "| {} | {:.1} | {:.1} | {:.0}% |",
                    h.policy.name(),
                    h.alone_mbps,
                    h.shared_mbps,
                    100.0 * h.ratio
                );
            }
        }
        let _ = writeln!(
            s,
            "\nPlots: `memory_{0}.png`, `latency_cdf_{0}.png`\n",
            w.name
        );
    }
    if !rep.targets.is_empty() {
        s.push_str("### Targets\n\n| target | measured | met |\n|---|---|---|\n");
        for t in &rep.targets {
            let _ = writeln!(
                s,
                "| {} | {} | {} |",
                t.what,
                t.measured,
                if t.met { "yes" } else { "**no**" }
            );
        }
    }
    if !plots_have_text {
        s.push_str("\nNo TrueType font was found, so the plots have no text (set TPLAB_FONT).\n");
    }
    s
}

/// Generates the built-in workloads named in `opts` and reports on them (see
/// [`report_traces`]).
pub fn report(opts: &ReportOptions, command: String) -> Result<Report, String> {
    let mut traces = Vec::new();
    for name in &opts.workloads {
        let trace = workload::generate(name, opts.seed, opts.scale).ok_or_else(|| {
            format!(
                "unknown workload {name:?}; built-in: {:?}",
                workload::ALL_WORKLOADS
            )
        })?;
        traces.push((name.clone(), trace));
    }
    report_traces(opts, traces, command)
}

/// Runs every policy on each trace and writes into `opts.out`: `results.md`,
/// `results.json`, `traces/NAME.csv` and the plots `memory_NAME.png`,
/// `latency_cdf_NAME.png`.
pub fn report_traces(
    opts: &ReportOptions,
    traces: Vec<(String, Trace)>,
    command: String,
) -> Result<Report, String> {
    let how = Described {
        devices: "Devices are the lab's in-process **device model** (a timer that holds each \
                  mapping for the trace's service time), not hardware; the pool is the real \
                  `tidepool::pool::Pool` on the `Identity` view."
            .into(),
        latency: "map".into(),
    };
    report_traces_with(opts, traces, command, how, |name, trace| {
        run_workload(name, trace, opts.hugepages, &opts.run).map_err(|e| e.to_string())
    })
}

/// How a report's runs were made, for its text.
pub struct Described {
    /// The devices, in words.
    pub devices: String,
    /// What the latency columns measure (`map`, `I/O`).
    pub latency: String,
}

/// [`report_traces`] with `run_one(name, trace)` producing each workload's results.
pub fn report_traces_with(
    opts: &ReportOptions,
    traces: Vec<(String, Trace)>,
    command: String,
    how: Described,
    mut run_one: impl FnMut(&str, &Trace) -> Result<WorkloadResult, String>,
) -> Result<Report, String> {
    let out: &Path = &opts.out;
    std::fs::create_dir_all(out.join("traces"))
        .map_err(|e| format!("creating {}: {e}", out.display()))?;
    let text = plot::load_font();
    let mut workloads = Vec::new();
    for (name, trace) in &traces {
        trace
            .save(&out.join("traces").join(format!("{name}.csv")))
            .map_err(|e| e.to_string())?;
        eprintln!("{name}: {} requests", trace.requests.len());
        let w = run_one(name, trace)?;
        let lines = |f: fn(&PolicyResult) -> &[(f64, f64)]| {
            w.policies
                .iter()
                .map(|p| plot::Line {
                    policy: p.policy,
                    points: f(p),
                })
                .collect::<Vec<_>>()
        };
        plot::memory_over_time(
            &out.join(format!("memory_{name}.png")),
            name,
            &w.rate_series,
            &lines(|p| &p.memory_series),
            text,
        )?;
        plot::latency_cdf(
            &out.join(format!("latency_cdf_{name}.png")),
            name,
            &lines(|p| &p.latency_cdf),
            text,
        )?;
        workloads.push(w);
    }
    let rep = Report {
        command,
        seed: opts.seed,
        scale: opts.scale,
        pages: if opts.hugepages {
            "2 MiB huge (4 KiB fallback)"
        } else {
            "4 KiB locked"
        }
        .into(),
        devices: how.devices,
        latency: how.latency,
        targets: targets(&workloads),
        workloads,
    };
    let json = serde_json::to_string_pretty(&rep).map_err(|e| e.to_string())?;
    std::fs::write(out.join("results.json"), json).map_err(|e| e.to_string())?;
    std::fs::write(out.join("results.md"), markdown(&rep, text)).map_err(|e| e.to_string())?;
    Ok(rep)
}
