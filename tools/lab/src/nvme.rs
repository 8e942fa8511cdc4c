//! Real-device replay through the NVMe driver: a trace through `tidepool-nvme`'s async queue on
//! a controller bound to vfio-pci, under each policy.
//!
//! The pool is the controller's own (`ControllerConfig::pool`, made from the policy's
//! configuration), on the controller's VFIO DMA view: each chunk the pool grows by is mapped in
//! the IOMMU (VFIO_IOMMU_MAP_DMA or the iommufd IOAS), and shrinking unmaps it, so growth pays
//! the real map. The device is real: in the test VM, QEMU's emulated NVMe controller behind the
//! emulated IOMMU (`tools/vm/run`; the VM test `lab_nvme_replay`). Nothing is modelled except
//! arrivals.
//!
//! The request loop is [`crate::replay`]'s: each request, at its arrival time, is an
//! `AsyncQueue::read` / `write` of a private buffer of its size (rounded up to the namespace's
//! block) that walks namespace 1. That call takes a queue slot, allocates from the pool
//! (awaiting capacity: the pool's fair, bounded wait), copies, submits, awaits the MSI-X
//! completion and copies out. The controller is opened afresh for every run (every policy
//! and every probe of the static search), so each starts from an empty pool; its admin and
//! I/O rings live in the pool too.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tidepool::pool::{Pool, PoolConfig};
use tidepool_nvme::{AsyncConfig, AsyncQueue, Controller, ControllerConfig, Namespace, NvmeError};

use crate::policy::Base;
use crate::replay::{self, BlockTarget};
use crate::report::{report_traces_with, run_workload_with, Described, Report, ReportOptions};
use crate::run::{RunOptions, RunResult};
use crate::trace::Trace;
use crate::workload;

/// What `tplab nvme-replay` (and the VM test `lab_nvme_replay`) runs.
#[derive(Clone, Debug)]
pub struct NvmeReportOptions {
    /// The controller and queue.
    pub nvme: NvmeOptions,
    /// Output directory (results.md, results.json, plots).
    pub out: PathBuf,
    /// Built-in workloads to replay.
    pub workloads: Vec<String>,
    /// Captured or generated CSV traces to replay as well.
    pub traces: Vec<PathBuf>,
    /// Workload seed.
    pub seed: u64,
    /// Workload length factor.
    pub scale: f64,
    /// Back chunks with 2 MiB hugepages (4 KiB pages when none are free).
    pub hugepages: bool,
}

/// Replays each workload under every policy through the controller and writes the same
/// report as `tplab report` (with I/O latency instead of map latency). `command` is recorded
/// in the report.
pub fn report(opts: &NvmeReportOptions, command: String) -> Result<Report, String> {
    let named = workload::named_traces(&opts.workloads, &opts.traces, opts.seed, opts.scale)?;
    let ropts = ReportOptions {
        out: opts.out.clone(),
        seed: opts.seed,
        scale: opts.scale,
        hugepages: opts.hugepages,
        workloads: named.iter().map(|n| n.0.clone()).collect(),
        run: RunOptions::default(),
    };
    let how = Described {
        devices: format!(
            "Devices are **real**: the NVMe driver's async queue (MSI-X) on controller {} \
             through VFIO, opened afresh per run; the pool is the controller's (chunks are \
             IOMMU mappings).",
            opts.nvme.name
        ),
        latency: "I/O (pool wait + device)".into(),
    };
    report_traces_with(&ropts, named, command, how, |name, trace| {
        let base = Base::for_trace(trace.max_size(), opts.hugepages);
        run_workload_with(name, trace, base, |t, config, stop| {
            replay(t, config, &opts.nvme, stop)
        })
    })
}

/// Opens the controller with a configuration (the pool's comes from the policy).
pub type OpenController =
    Arc<dyn Fn(ControllerConfig) -> Result<Controller, NvmeError> + Send + Sync>;

/// Which controller, and how deep its queue is.
#[derive(Clone)]
pub struct NvmeOptions {
    /// The controller, for reports: its PCI address.
    pub name: String,
    /// How to open it (afresh for every run).
    pub open: OpenController,
    /// The I/O queue's depth (capped at what the controller allows). The trace's own queue
    /// depths are enforced before this one.
    pub queue_depth: u32,
}

impl NvmeOptions {
    /// The controller at `bdf`, bound to vfio-pci.
    pub fn vfio(bdf: &str, queue_depth: u32) -> NvmeOptions {
        let at = bdf.to_string();
        NvmeOptions {
            name: bdf.to_string(),
            open: Arc::new(move |cfg| Controller::open(&at, cfg)),
            queue_depth,
        }
    }
}

impl std::fmt::Debug for NvmeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmeOptions")
            .field("name", &self.name)
            .field("queue_depth", &self.queue_depth)
            .finish_non_exhaustive()
    }
}

/// Replays `trace` through a freshly opened controller whose pool is made from `config` (see
/// the module doc). `stop_on_failure` stops releasing arrivals at the first failed I/O (the
/// static search's probes).
pub fn replay(
    trace: &Trace,
    config: PoolConfig,
    opts: &NvmeOptions,
    stop_on_failure: bool,
) -> Result<RunResult, String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("tplab-nvme")
        .build()
        .map_err(|e| format!("starting the tokio runtime: {e}"))?;
    let (mut result, pool, ctrl) =
        rt.block_on(replay_on(trace, config, opts.clone(), stop_on_failure))?;
    // The runtime's end ends the queue's reaper, whose queue pair is then deleted on the
    // controller (blocking admin commands) before its rings go back to the pool; then the
    // controller itself is closed. Only then is the pool's final state read: in use must be 0.
    drop(rt);
    drop(ctrl);
    result.stats = pool.stats();
    Ok(result)
}

async fn replay_on(
    trace: &Trace,
    config: PoolConfig,
    opts: NvmeOptions,
    stop_on_failure: bool,
) -> Result<(RunResult, Pool, Controller), String> {
    let cfg = ControllerConfig {
        pool: config.clone(),
        interrupts: true,
        io_queues: 1,
        ..ControllerConfig::default()
    };
    let open = opts.open.clone();
    let ctrl = tokio::task::spawn_blocking(move || open(cfg))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("opening NVMe controller {}: {e}", opts.name))?;
    let ns = ctrl
        .namespace(1)
        .map_err(|e| format!("namespace 1 of {}: {e}", opts.name))?;
    let depth = opts.queue_depth.clamp(1, ctrl.max_queue_depth());
    let queue = AsyncQueue::new(
        &ctrl,
        depth,
        AsyncConfig {
            spin: Duration::from_micros(20),
            ..AsyncConfig::default()
        },
    )
    .map_err(|e| format!("creating the async I/O queue: {e}"))?;
    let pool = ctrl.pool().clone();
    let target = Arc::new(NvmeTarget { queue, ns });
    let result = replay::replay_requests(trace, config, &pool, target, stop_on_failure).await?;
    Ok((result, pool, ctrl))
}

/// Namespace 1 of the controller, through one async queue.
struct NvmeTarget {
    queue: AsyncQueue,
    ns: Namespace,
}

impl BlockTarget for NvmeTarget {
    fn span_bytes(&self) -> u64 {
        self.ns.bytes()
    }

    fn block_bytes(&self) -> usize {
        self.ns.block_bytes() as usize
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        let (lba, aligned) = self.ns.block_of(offset);
        if !aligned {
            return Err(format!("offset {offset} is not on a block"));
        }
        self.queue
            .read(&self.ns, lba, buf)
            .await
            .map_err(|e| e.to_string())
    }

    async fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), String> {
        let (lba, aligned) = self.ns.block_of(offset);
        if !aligned {
            return Err(format!("offset {offset} is not on a block"));
        }
        self.queue
            .write(&self.ns, lba, buf)
            .await
            .map_err(|e| e.to_string())
    }
}
