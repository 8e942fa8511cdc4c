//! # lab_nvme_replay: the policy lab's traces through the NVMe driver on a real controller
//!
//! The policy-lab issue's real-device replay on NVMe (`tidepool_lab::nvme`): the `bursty` and
//! `multi` workloads, each under the four policies (a search-sized static pool, Linux's
//! SWIOTLB_DYNAMIC, the throttling RFC, Tidepool), replayed through `tidepool-nvme`'s async
//! queue on QEMU's NVMe controller behind the emulated IOMMU. The controller is opened afresh
//! per run with its pool made from the policy, so growth and shrinking pay the real IOMMU
//! map and unmap.
//!
//! First the namespace is written once end to end: the image behind QEMU's controller is a
//! sparse host file, and the first run through it would pay the host's block allocation
//! (the first policy measured would look slower for it).
//!
//! Prints the lab's markdown table between `LAB-RESULTS-BEGIN` and `LAB-RESULTS-END` (the
//! host cuts it out of the log), and fails if a Tidepool run failed an I/O (the thesis: maps
//! wait, they do not fail).
//!
//! Usage: `lab_nvme_replay [SCALE]` (workload length factor, default 0.5: TCG runs the
//! guest's side slowly, and the static search replays each workload several times).
//! `tools/vm/run --test-timeout 1500 lab_nvme_replay`

use std::path::PathBuf;
use std::process::ExitCode;

use tidepool_lab::nvme::{report, NvmeOptions, NvmeReportOptions};
use tidepool_lab::policy::Policy;
use tidepool_nvme::{Controller, ControllerConfig};
use tidepool_vmtests::HarnessEnv;

fn main() -> ExitCode {
    match run() {
        Ok(()) => {
            println!("lab_nvme_replay: PASS");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("lab_nvme_replay: FAIL: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let env = HarnessEnv::from_env().map_err(|e| e.to_string())?;
    let bdf = env
        .vfio_nvme_bdfs
        .first()
        .ok_or("no NVMe controller bound to vfio-pci")?
        .clone();
    let scale = match std::env::args().nth(1) {
        Some(s) => s
            .parse::<f64>()
            .ok()
            .filter(|s| *s > 0.0)
            .ok_or_else(|| format!("SCALE {s:?} is not a positive number"))?,
        None => 0.5,
    };
    warm_up(&bdf)?;
    let opts = NvmeReportOptions {
        nvme: NvmeOptions::vfio(&bdf, 256),
        out: PathBuf::from("/tmp/lab-nvme"),
        workloads: vec!["bursty".into(), "multi".into()],
        traces: Vec::new(),
        seed: 1,
        scale,
        hugepages: true,
    };
    let command = format!("lab_nvme_replay {scale} (tools/vm/run, VM test)");
    let rep = report(&opts, command)?;
    let md = std::fs::read_to_string(opts.out.join("results.md"))
        .map_err(|e| format!("reading the report: {e}"))?;
    println!("LAB-RESULTS-BEGIN");
    println!("{md}");
    println!("LAB-RESULTS-END");
    let mut problems = Vec::new();
    for w in &rep.workloads {
        for p in &w.policies {
            let m = &p.metrics;
            if p.policy == Policy::Tidepool && m.failed_awaitable + m.failed_immediate > 0 {
                problems.push(format!(
                    "{}: tidepool failed {} I/Os",
                    w.name,
                    m.failed_awaitable + m.failed_immediate
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// Writes namespace 1 of `bdf` once, end to end (see the module doc).
fn warm_up(bdf: &str) -> Result<(), String> {
    let cfg = ControllerConfig {
        interrupts: false,
        ..ControllerConfig::default()
    };
    let ctrl = Controller::open(bdf, cfg).map_err(|e| format!("opening {bdf}: {e}"))?;
    let ns = ctrl.namespace(1).map_err(|e| e.to_string())?;
    let mut q = ctrl
        .create_io_queue::<()>(8)
        .map_err(|e| format!("I/O queue: {e}"))?;
    let chunk = vec![0u8; 1 << 20];
    let block = u64::from(ns.block_bytes());
    let mut at = 0u64;
    while at < ns.bytes() {
        let n = (ns.bytes() - at).min(chunk.len() as u64) as usize;
        q.write(&ns, at / block, &chunk[..n])
            .map_err(|e| format!("warm-up write at {at}: {e}"))?;
        at += n as u64;
    }
    println!("warm-up: wrote {} MiB", ns.bytes() >> 20);
    Ok(())
}
