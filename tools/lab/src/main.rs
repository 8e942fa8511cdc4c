//! `tplab`: the policy lab's command line (see the `tidepool_lab` crate doc).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tidepool_lab::report::{report, report_traces, ReportOptions};
use tidepool_lab::run::RunOptions;
use tidepool_lab::trace::Trace;
use tidepool_lab::{capture, demo, sweep, workload};

/// Tidepool's policy lab: static swiotlb vs SWIOTLB_DYNAMIC vs throttling vs Tidepool, on the
/// real pool with an in-process device model.
#[derive(Parser)]
#[command(name = "tplab", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run every built-in workload under every policy; write results.md, results.json and plots.
    Report {
        /// Output directory.
        #[arg(long, default_value = "target/lab")]
        out: PathBuf,
        /// Workload seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Workload length factor (1.0 = the published lengths).
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// Back chunks with 2 MiB hugepages (falls back to locked 4 KiB pages).
        #[arg(long)]
        hugepages: bool,
        /// Only these workloads (repeatable); default all.
        #[arg(long = "workload")]
        workloads: Vec<String>,
    },
    /// Frontier sweep: each policy over its own knobs, per workload; writes sweep.md,
    /// sweep.json and frontier_NAME.png (memory vs p99 / p99.9 map latency).
    Sweep {
        /// Output directory.
        #[arg(long, default_value = "target/lab-sweep")]
        out: PathBuf,
        /// Workload seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Workload length factor.
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// Back chunks with 2 MiB hugepages (falls back to locked 4 KiB pages).
        #[arg(long)]
        hugepages: bool,
        /// Built-in workloads (repeatable); default steady, bursty, network, multi.
        #[arg(long = "workload")]
        workloads: Vec<String>,
        /// CSV traces to sweep as well (repeatable).
        #[arg(long = "trace")]
        traces: Vec<PathBuf>,
    },
    /// Convert a captured block I/O trace (ftrace / perf script block_rq_issue +
    /// block_rq_complete, or blkparse D/C lines) into a CSV trace for `replay`.
    Convert {
        /// The capture (text).
        capture: PathBuf,
        /// The CSV trace to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// The demo: one bursty load on a pool that starts at 2 MiB and grows (tidepool) and on a
    /// fixed 2 MiB pool whose maps fail when full; prints a timeline, saves a plot.
    Demo {
        /// Output directory (demo_timeline.png, demo.json).
        #[arg(long, default_value = "target/lab-demo")]
        out: PathBuf,
        /// Load seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Write the built-in workloads as CSV traces (the replay format).
    Generate {
        /// Output directory.
        #[arg(long, default_value = "target/lab/traces")]
        out: PathBuf,
        /// Workload seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Workload length factor.
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
    },
    /// Replay a CSV trace (time_us,size,direction,hold_us,may_wait[,device]) under every policy.
    Replay {
        /// The trace file.
        trace: PathBuf,
        /// Output directory.
        #[arg(long, default_value = "target/lab-replay")]
        out: PathBuf,
        /// Back chunks with 2 MiB hugepages.
        #[arg(long)]
        hugepages: bool,
    },
}

/// A trace file's name without its extension, for reports.
fn stem(path: &std::path::Path) -> String {
    path.file_stem()
        .map_or("trace".into(), |s| s.to_string_lossy().into_owned())
}

fn main() -> ExitCode {
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let result = match Cli::parse().cmd {
        Cmd::Report {
            out,
            seed,
            scale,
            hugepages,
            workloads,
        } => {
            let workloads = if workloads.is_empty() {
                workload::WORKLOADS.map(String::from).to_vec()
            } else {
                workloads
            };
            let opts = ReportOptions {
                out: out.clone(),
                seed,
                scale,
                hugepages,
                workloads,
                run: RunOptions::default(),
            };
            report(&opts, command).map(|_| out)
        }
        Cmd::Sweep {
            out,
            seed,
            scale,
            hugepages,
            workloads,
            traces,
        } => (|| {
            let mut named = Vec::new();
            let builtin = if workloads.is_empty() && traces.is_empty() {
                workload::WORKLOADS.map(String::from).to_vec()
            } else {
                workloads
            };
            for name in builtin {
                let t = workload::generate(&name, seed, scale).ok_or_else(|| {
                    format!(
                        "unknown workload {name:?}; built-in: {:?}",
                        workload::ALL_WORKLOADS
                    )
                })?;
                named.push((name, t));
            }
            for path in traces {
                let t = Trace::load(&path).map_err(|e| e.to_string())?;
                named.push((stem(&path), t));
            }
            let (_, choice) =
                sweep::sweep(&out, named, hugepages, &RunOptions::default(), command)?;
            eprintln!(
                "default chosen: {} ({})",
                choice.chosen.as_deref().unwrap_or("none"),
                choice.why
            );
            Ok(out.clone())
        })(),
        Cmd::Convert { capture, out } => (|| {
            let text = std::fs::read_to_string(&capture)
                .map_err(|e| format!("reading {}: {e}", capture.display()))?;
            let (t, stats) = capture::convert(&text).map_err(|e| e.to_string())?;
            t.save(&out).map_err(|e| e.to_string())?;
            eprintln!(
                "wrote {}: {} requests on {} device(s), {:.1} s; {stats:?}",
                out.display(),
                t.requests.len(),
                t.devices.len(),
                t.span_us() as f64 / 1e6
            );
            Ok(out.clone())
        })(),
        Cmd::Demo { out, seed } => (|| {
            let r = demo::run_demo(&out, seed)?;
            if r.story_holds {
                Ok(out.clone())
            } else {
                Err(format!(
                    "the demo's story did not hold this time (see the timeline above and {})",
                    out.join("demo.json").display()
                ))
            }
        })(),
        Cmd::Generate { out, seed, scale } => (|| {
            std::fs::create_dir_all(&out)
                .map_err(|e| format!("creating {}: {e}", out.display()))?;
            for name in workload::ALL_WORKLOADS {
                let t = workload::generate(name, seed, scale).expect("built-in workload");
                let path = out.join(format!("{name}.csv"));
                t.save(&path).map_err(|e| e.to_string())?;
                eprintln!("wrote {} ({} requests)", path.display(), t.requests.len());
            }
            Ok(out.clone())
        })(),
        Cmd::Replay {
            trace,
            out,
            hugepages,
        } => (|| {
            let t = Trace::load(&trace).map_err(|e| e.to_string())?;
            let name = stem(&trace);
            let opts = ReportOptions {
                out: out.clone(),
                seed: 0,
                scale: 1.0,
                hugepages,
                workloads: vec![name.clone()],
                run: RunOptions::default(),
            };
            report_traces(&opts, vec![(name, t)], command).map(|_| out.clone())
        })(),
    };
    match result {
        Ok(out) => {
            eprintln!("done: see {}", out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tplab: {e}");
            ExitCode::FAILURE
        }
    }
}
