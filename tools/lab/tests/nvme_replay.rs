//! The NVMe replay (`tidepool_lab::nvme`) on the host, against the emulated NVMe controller
//! (`tidepool-emu`: MSI-X through eventfds, reads and writes only through the DMA view): the
//! same code path the VM test `lab_nvme_replay` runs on QEMU's controller through VFIO.

use std::sync::Arc;

use tidepool_emu::{EmuNvme, EmuNvmeConfig};
use tidepool_lab::nvme::{replay, NvmeOptions};
use tidepool_lab::policy::{Base, Policy};
use tidepool_lab::run::MapResult;
use tidepool_lab::workload;
use tidepool_nvme::Controller;

fn emulated(queue_depth: u32) -> NvmeOptions {
    NvmeOptions {
        name: "emulated".into(),
        open: Arc::new(|cfg| {
            let dev = EmuNvme::new(EmuNvmeConfig {
                namespace_bytes: 64 << 20,
                ..EmuNvmeConfig::default()
            })
            .expect("emulated controller");
            Controller::with_device(Arc::new(dev), cfg)
        }),
        queue_depth,
    }
}

/// A short bursty trace through a Tidepool pool that starts small: every request completes
/// (maps wait, they do not fail), the pool grew past its prefill to serve the burst, and
/// once the queue and controller are gone nothing is in use.
#[test]
fn a_bursty_trace_completes_on_a_growing_pool_without_failures() {
    let trace = workload::generate("bursty", 1, 0.05).expect("bursty");
    let base = Base::for_trace(trace.max_size(), false);
    let config = base.config(Policy::Tidepool, 0);
    let prefill = config.prefill_bytes as u64;
    let r = replay(&trace, config, &emulated(64), false).expect("replay");
    assert!(!r.stopped_early);
    assert_eq!(
        r.outcomes.len(),
        trace.requests.len(),
        "every request released"
    );
    let failed = r
        .outcomes
        .iter()
        .filter(|o| o.result == MapResult::Failed)
        .count();
    assert_eq!(failed, 0, "no I/O failed");
    let peak = r
        .samples
        .iter()
        .map(|s| s.capacity_bytes)
        .max()
        .unwrap_or(0);
    assert!(
        peak > prefill,
        "the pool grew: peak {peak} B, prefill {prefill} B"
    );
    assert_eq!(
        r.stats.in_use_bytes, 0,
        "queue and controller gave everything back"
    );
}

/// A controller that cannot be opened is one clear error naming it, not a panic.
#[test]
fn a_controller_that_fails_to_open_is_reported() {
    let trace = workload::generate("bursty", 1, 0.01).expect("bursty");
    let base = Base::for_trace(trace.max_size(), false);
    let opts = NvmeOptions {
        name: "0000:ff:00.0".into(),
        open: Arc::new(|cfg| Controller::open("0000:ff:00.0", cfg)),
        queue_depth: 8,
    };
    let err = replay(&trace, base.config(Policy::Tidepool, 0), &opts, false).unwrap_err();
    assert!(
        err.contains("opening NVMe controller 0000:ff:00.0"),
        "{err}"
    );
}
