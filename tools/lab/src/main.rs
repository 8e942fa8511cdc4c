//! `tplab`: the policy lab's command line (see the `tidepool_lab` crate doc).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tidepool_lab::report::{report, report_traces, ReportOptions};
use tidepool_lab::run::RunOptions;
use tidepool_lab::trace::Trace;
use tidepool_lab::workload;

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
        Cmd::Generate { out, seed, scale } => (|| {
            std::fs::create_dir_all(&out)
                .map_err(|e| format!("creating {}: {e}", out.display()))?;
            for name in workload::WORKLOADS {
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
            let name = trace
                .file_stem()
                .map_or("trace".into(), |s| s.to_string_lossy().into_owned());
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
