//! CoCo scale: Linux's confidential-VM bounce buffer against Tidepool on the same load.
//!
//! A confidential VM (SEV, TDX) bounces all device I/O through swiotlb, and Linux sizes it at
//! boot: 6 % of guest memory, at most 1 GiB (`mem_encrypt` setup: `swiotlb_adjust_size`), fixed
//! for the VM's life, failing maps when full. [`swiotlb_bytes`] is that rule. The comparison
//! runs the `coco` workload ([`crate::workload`]: four bursty disks and two NICs on one pool)
//! on the device model under:
//! - `swiotlb` for each VM size: a static pool of that size (maps fail when full);
//! - `static (searched)`: the smallest static pool with no failed map on this load;
//! - `tidepool`: the lab's default tidepool policy.
//!
//! Memory saved is the swiotlb size minus tidepool's time-averaged memory.

use std::fmt::Write as _;

use crate::metrics::{compute, Metrics};
use crate::policy::{Base, Policy};
use crate::report::static_search;
use crate::run::{run, RunError, RunOptions};
use crate::trace::Trace;

const MIB: f64 = (1 << 20) as f64;

/// Linux's swiotlb size for a confidential VM of `vm_bytes`: 6 %, at most 1 GiB.
pub fn swiotlb_bytes(vm_bytes: u64) -> u64 {
    (vm_bytes * 6 / 100).min(1 << 30)
}

/// One row of the comparison.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CocoRow {
    /// What ran.
    pub what: String,
    /// Fixed pool size, bytes (none for tidepool).
    pub fixed_bytes: Option<u64>,
    /// The numbers.
    pub metrics: Metrics,
}

/// Runs the comparison of the module doc for each VM size (GiB).
pub fn compare(trace: &Trace, vm_gib: &[u64], opts: &RunOptions) -> Result<Vec<CocoRow>, RunError> {
    let base = Base::for_trace(trace.max_size(), false);
    let mut rows = Vec::new();
    let log = |r: &CocoRow| {
        eprintln!(
            "  {:28} avg {:7.1} MiB peak {:7.1} MiB failed {} p99 {:9.1} us lag p99 {} us",
            r.what,
            r.metrics.avg_bytes / MIB,
            r.metrics.peak_bytes as f64 / MIB,
            r.metrics.failed_awaitable + r.metrics.failed_immediate,
            r.metrics.map_latency.p99_us,
            r.metrics.arrival_lag_p99_us
        )
    };
    for &gib in vm_gib {
        let size = swiotlb_bytes(gib << 30) as usize;
        let mut cfg = base.config(Policy::Static, size);
        // The swiotlb is fixed whatever the lab's cap for growing pools.
        cfg.max_bytes = cfg.prefill_bytes;
        let r = run(trace, cfg.clone(), opts)?;
        let row = CocoRow {
            what: format!("swiotlb, {gib} GiB VM ({} MiB)", cfg.max_bytes >> 20),
            fixed_bytes: Some(cfg.max_bytes as u64),
            metrics: compute(trace, &r),
        };
        log(&row);
        rows.push(row);
    }
    let found = static_search(trace, &base, opts)?;
    let row = CocoRow {
        what: format!("static (searched, {} MiB)", found.size_bytes >> 20),
        fixed_bytes: Some(found.size_bytes),
        metrics: found.metrics,
    };
    log(&row);
    rows.push(row);
    let r = run(trace, base.config(Policy::Tidepool, 0), opts)?;
    let row = CocoRow {
        what: "tidepool (lab default)".into(),
        fixed_bytes: None,
        metrics: compute(trace, &r),
    };
    log(&row);
    rows.push(row);
    Ok(rows)
}

/// The comparison as markdown, with memory saved against each swiotlb row.
pub fn markdown(rows: &[CocoRow], command: &str, workload: &str, requests: usize) -> String {
    let mut s = format!(
        "Command: `{command}`  \n`{workload}` workload, {requests} requests; 4 KiB pages; device model.\n\n\
         | pool | fixed MiB | avg MiB | peak MiB | failed maps | map p50 / p99 / p99.9 µs | waits | arrival lag p99 µs |\n\
         |---|---|---|---|---|---|---|---|\n"
    );
    for r in rows {
        let m = &r.metrics;
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} | {:.1} | {} | {:.1} / {:.1} / {:.1} | {} | {} |",
            r.what,
            r.fixed_bytes.map_or("-".into(), |b| (b >> 20).to_string()),
            m.avg_bytes / MIB,
            m.peak_bytes as f64 / MIB,
            m.failed_awaitable + m.failed_immediate,
            m.map_latency.p50_us,
            m.map_latency.p99_us,
            m.map_latency.p999_us,
            m.pool_wait.count,
            m.arrival_lag_p99_us
        );
    }
    if let Some(t) = rows.iter().find(|r| r.fixed_bytes.is_none()) {
        s.push('\n');
        for r in rows.iter().filter(|r| r.what.starts_with("swiotlb")) {
            let fixed = r.fixed_bytes.unwrap_or(0) as f64;
            let _ = writeln!(
                s,
                "- against {}: tidepool averages {:.1} MiB, {:.0} MiB less ({:.1} % of it; 1/{:.0})",
                r.what,
                t.metrics.avg_bytes / MIB,
                (fixed - t.metrics.avg_bytes) / MIB,
                100.0 * t.metrics.avg_bytes / fixed.max(1.0),
                fixed / t.metrics.avg_bytes.max(1.0)
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_swiotlb_rule_is_six_percent_capped_at_one_gib() {
        assert_eq!(swiotlb_bytes(4 << 30), (4u64 << 30) * 6 / 100);
        assert_eq!(swiotlb_bytes(16 << 30), 1_030_792_151);
        assert_eq!(swiotlb_bytes(64 << 30), 1 << 30);
    }
}
