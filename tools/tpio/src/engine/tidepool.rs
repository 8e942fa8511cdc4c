//! `ioengine=tidepool`: Tidepool's userspace NVMe driver (`tidepool-nvme`) on a controller bound
//! to vfio-pci, named by its PCI address (`--filename=0000:00:04.0`), namespace 1.
//!
//! # The loop
//! One [`IoQueue`] per job clone (so `numjobs=N` drives N NVMe I/O queues of one controller),
//! `iodepth` commands deep, with deferred doorbells: `queue` writes the command into the
//! submission ring, `commit` rings the SQ tail doorbell once for the whole batch, and `reap(min)`
//! polls until `min` commands have completed:
//! - `--completion=poll` (default): spins on [`IoQueue::poll`]; no system call and no interrupt
//!   on the I/O path, and no `PAUSE` between polls (a poll is one load of the next completion's
//!   phase bit, as SPDK's poll loop is). A `PAUSE` per empty poll cost 16–27 % of the IOPS at
//!   4 KiB in the QEMU VM (BENCHMARKS.md, session 7): under TCG each `PAUSE` leaves the
//!   translated code and takes QEMU's big lock, which the emulated controller needs; under KVM
//!   a tight `PAUSE` loop triggers pause-loop exits. `TPIO_POLL_PAUSE=1` in the environment puts
//!   it back, for that comparison.
//! - `--completion=interrupt`: the queue's CQ raises its MSI-X vector
//!   ([`Controller::create_interrupt_io_queue`]); when a poll finds too little, the thread
//!   sleeps on the vector's eventfd ([`IoQueue::wait_interrupt`]) and polls again. A wait that
//!   times out ([`INTERRUPT_WAIT`]) runs the driver's health check ([`IoQueue::poll_checked`]),
//!   so a device that stops interrupting still meets the command timeout.
//!
//! # Where the data lives: `--dma=`
//! Every I/O goes through the driver's public API with one [`DmaData`]: the engine builds no
//! command, no PRP and no SGL, and keeps no table of in-flight memory beside the driver's.
//! Each slot owns its memory while idle, and the harness copies in and out of it only then
//! ([`Engine::fill_slot`], [`Engine::read_slot`]: a slot in flight is refused); queueing moves
//! the memory into the command and the completion gives it back.
//!
//! | mode | slot memory | per I/O |
//! |---|---|---|
//! | `bounce` (default) | a page-aligned [`PageBuf`] | [`DmaPolicy::Bounce`]: a pool buffer from the immediate path, filled from the slot (write) or zeroed (read); a read is copied back into the slot on completion |
//! | `map-per-io` | a [`PageBuf`] | [`DmaPolicy::Direct`]: [`DirectMapper`] (no cache), one `VFIO_IOMMU_MAP_DMA` before, one unmap after |
//! | `zero-copy` | a pool [`DmaBuf`] | nothing: the slot *is* device-visible memory |
//! | `auto` | a [`PageBuf`] | [`DmaPolicy::Auto`]: bounce below the threshold, map from it on; the threshold is `--dma-threshold` or measured at prepare with [`DmaPolicy::calibrate`] |
//!
//! The choice is the library's ([`DmaPolicy::prepare`]); the data completes exactly once
//! ([`DmaData::complete`]) when the driver hands it back.
//!
//! # Why in-flight memory is never released early
//! - A slot's memory is inside its command's [`DmaData`], held by the driver's in-flight slot,
//!   until [`IoQueue::poll`] returns that command; only then is it completed (copy-out or
//!   unmap) and given back to the slot.
//! - On `close`/drop the engine first polls until nothing is outstanding. If polling fails (the
//!   controller was reset), the driver has already switched bus mastering off before failing the
//!   commands, so the device can no longer touch the memory.
//!
//! # Sharing the controller between clones
//! A VFIO group can be opened once per process, so `numjobs` clones of a job share one
//! [`Controller`] (and its pool) through a process-wide registry keyed by PCI address; each clone
//! creates its own I/O queue. The first clone's pool options win. The controller is shut down
//! when the last clone closes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use tidepool::data::{Calibration, Completed, DataKind, DmaData, DmaPolicy, HostMemory, PageBuf};
use tidepool::pool::{Direction, DmaBuf, Pool, PoolConfig};
use tidepool::share::direct::DirectMapper;
use tidepool_nvme::{
    Controller, ControllerConfig, DataPointer, Done, IoQueue, Namespace, NvmeError,
};

use super::{
    fill_page, idle_slot, idle_slot_ref, read_page, target_label, Engine, EngineError, Geometry,
    IoCompletion, IoDirection, IoRequest,
};
use crate::options::{CompletionMode, DmaMode, JobSpec, NvmeDataPointer, PoolSettings};

/// The namespace the engine works on.
const NSID: u32 = 1;

/// Rounds of [`DmaPolicy::calibrate`] per size for `--dma=auto` without `--dma-threshold`.
const CALIBRATION_ROUNDS: usize = 15;

/// `TPIO_POLL_PAUSE` is set: a `PAUSE` after each empty poll (see the module doc). Read once.
static POLL_PAUSE: std::sync::LazyLock<bool> =
    std::sync::LazyLock::new(|| std::env::var_os("TPIO_POLL_PAUSE").is_some());

/// The longest `--completion=interrupt` sleeps before polling with the health check.
const INTERRUPT_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// Controllers open in this process, by PCI address (see the module doc).
fn registry() -> &'static Mutex<HashMap<String, Weak<Controller>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<String, Weak<Controller>>>> = OnceLock::new();
    REGISTRY.get_or_init(Mutex::default)
}

/// Returns the open controller at `bdf`, opening it with `cfg` if no clone holds it.
///
/// Locking: holds the registry mutex across the open, so two clones never open the same group.
fn shared_controller(bdf: &str, cfg: ControllerConfig) -> Result<Arc<Controller>, NvmeError> {
    let mut map = registry().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(ctrl) = map.get(bdf).and_then(Weak::upgrade) {
        return Ok(ctrl);
    }
    let ctrl = Arc::new(Controller::open(bdf, cfg)?);
    map.insert(bdf.to_string(), Arc::downgrade(&ctrl));
    Ok(ctrl)
}

/// Whether `name` looks like a PCI address `DDDD:BB:DD.F` (hex digits).
fn is_pci_address(name: &str) -> bool {
    let bytes = name.as_bytes();
    bytes.len() == 12
        && bytes.iter().enumerate().all(|(i, b)| match i {
            4 | 7 => *b == b':',
            10 => *b == b'.',
            _ => b.is_ascii_hexdigit(),
        })
}

/// The pool configuration from `--pool-min/--pool-max/--pool-chunk` (defaults: the pool's own).
/// The prefill (`--pool-min`, or the default) is rounded up to whole chunks; the watermarks follow the chunk size so that the
/// pool's own validation (which names any remaining problem) accepts them.
pub(super) fn pool_config(settings: &PoolSettings) -> PoolConfig {
    let mut cfg = PoolConfig::default();
    if let Some(chunk) = settings.chunk {
        cfg.chunk_bytes = chunk as usize;
        cfg.max_buffer = cfg.max_buffer.min(cfg.chunk_bytes.max(4096));
        cfg.high_watermark = cfg.low_watermark + 2 * cfg.chunk_bytes;
    }
    let chunk = cfg.chunk_bytes.max(1);
    let min = settings.min.map_or(cfg.prefill_bytes, |min| min as usize);
    cfg.prefill_bytes = min.div_ceil(chunk) * chunk;
    if let Some(max) = settings.max {
        cfg.max_bytes = max as usize;
        cfg.reserve_bytes = cfg.reserve_bytes.min(cfg.max_bytes / 2);
    }
    cfg
}

/// An engine error from a driver error at `what`.
fn nvme_error(what: &'static str, error: NvmeError) -> EngineError {
    EngineError::Setup {
        what,
        source: std::io::Error::other(error.to_string()),
    }
}

/// How slots reach the device, resolved at prepare (`auto` becomes a threshold).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotKind {
    /// Slots are pool buffers, handed to the device as they are.
    ZeroCopy,
    /// Slots are caller memory, bounced or mapped as the library's policy chooses.
    Caller(DmaPolicy),
}

/// A slot's memory while idle. `None` in the slot table while its command is in flight (the
/// memory is inside the command's [`DmaData`]).
#[derive(Debug)]
enum SlotMemory {
    /// Private, page-aligned memory (bounce, map-per-io, auto).
    Host(PageBuf),
    /// A pool buffer (zero-copy).
    Pool(DmaBuf),
}

/// Counters of the paths taken, for the report.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
struct PathCounts {
    bounced: u64,
    mapped: u64,
    zero_copy: u64,
}

impl PathCounts {
    fn count(&mut self, kind: DataKind) {
        match kind {
            DataKind::Bounce => self.bounced += 1,
            DataKind::Direct => self.mapped += 1,
            DataKind::Owned => self.zero_copy += 1,
        }
    }
}

/// An open controller and, after `prepare`, its queue and slots. Field order is drop order; see
/// the module doc.
pub struct TidepoolEngine {
    queue: Option<IoQueue<u32>>,
    /// Each slot's memory while idle; `None` while its command is in flight.
    slots: Vec<Option<SlotMemory>>,
    /// The length of each slot's current (or last) request.
    request_lens: Vec<u32>,
    slot_bytes: usize,
    mapper: Option<DirectMapper>,
    ctrl: Arc<Controller>,
    ns: Namespace,
    bdf: String,
    requested: DmaMode,
    threshold: Option<u64>,
    /// `--completion`: spin on the CQ, or sleep on its MSI-X vector.
    completion: CompletionMode,
    /// Sleeps on the MSI-X eventfd that an interrupt ended (`--completion=interrupt`).
    interrupt_waits: u64,
    kind: SlotKind,
    calibration: Option<Calibration>,
    counts: PathCounts,
    /// Completions reaped by this clone's queue.
    completed: u64,
    /// The queue's statistics, kept when `close` drops the queue.
    queue_stats: Option<serde_json::Value>,
    outstanding: usize,
    done: Vec<Done<u32>>,
    final_stats: Option<serde_json::Value>,
}

impl TidepoolEngine {
    /// Opens (or shares, see the module doc) the controller at `spec.filename` and reads
    /// namespace 1's geometry.
    pub fn open(spec: &JobSpec) -> Result<Self, EngineError> {
        let bdf = spec
            .filename
            .as_ref()
            .and_then(|p| p.to_str())
            .filter(|name| is_pci_address(name))
            .ok_or_else(|| EngineError::Open {
                path: target_label(spec),
                source: std::io::Error::other(
                    "ioengine=tidepool takes the PCI address of an NVMe controller bound to \
                     vfio-pci, e.g. --filename=0000:00:04.0",
                ),
            })?
            .to_string();
        let cfg = ControllerConfig {
            // Engines of every job are opened up front and share the controller, so ask for as
            // many queues as QEMU and most controllers offer; the controller grants what it has.
            io_queues: 64,
            // Polled queues raise no interrupts (IEN = 0), but QEMU's NVMe refuses Create I/O
            // CQ with a non-zero vector while MSI-X is disabled, and the driver names vector
            // `qid` even for polled queues: so MSI-X stays enabled (a driver fix is pending).
            interrupts: true,
            pool: pool_config(&spec.pool),
            data_pointer: match spec.pool.data_pointer {
                NvmeDataPointer::Auto => DataPointer::Auto,
                NvmeDataPointer::Prp => DataPointer::Prp,
                NvmeDataPointer::Sgl => DataPointer::Sgl,
            },
            ..ControllerConfig::default()
        };
        let ctrl = shared_controller(&bdf, cfg).map_err(|e| EngineError::Open {
            path: bdf.clone(),
            source: std::io::Error::other(format!(
                "{e} (is it bound to vfio-pci, are hugepages reserved and hugetlbfs mounted, \
                 and do --pool-min/--pool-max/--pool-chunk fit?)"
            )),
        })?;
        let ns = ctrl
            .namespace(NSID)
            .map_err(|e| nvme_error("namespace 1", e))?;
        Ok(TidepoolEngine {
            queue: None,
            slots: Vec::new(),
            request_lens: Vec::new(),
            slot_bytes: 0,
            mapper: None,
            ctrl,
            ns,
            bdf,
            requested: spec.pool.dma,
            threshold: spec.pool.dma_threshold,
            completion: spec.pool.completion,
            interrupt_waits: 0,
            kind: SlotKind::Caller(DmaPolicy::Bounce),
            calibration: None,
            counts: PathCounts::default(),
            completed: 0,
            queue_stats: None,
            outstanding: 0,
            done: Vec::new(),
            final_stats: None,
        })
    }

    /// The pool the controller uses.
    fn pool(&self) -> &Pool {
        self.ctrl.pool()
    }

    /// Resolves `--dma` (calibrating for `auto` without a threshold, with `slots` buffers in
    /// flight as in the loop) and makes the mapper the mapping modes need.
    fn resolve_kind(&mut self, slots: u32) -> Result<(), EngineError> {
        if matches!(self.requested, DmaMode::MapPerIo | DmaMode::Auto) {
            self.mapper = Some(DirectMapper::new(Arc::clone(self.pool().view()), 0));
        }
        self.kind = match self.requested {
            DmaMode::Bounce => SlotKind::Caller(DmaPolicy::Bounce),
            DmaMode::MapPerIo => SlotKind::Caller(DmaPolicy::Direct),
            DmaMode::ZeroCopy => SlotKind::ZeroCopy,
            DmaMode::Auto => match self.threshold {
                Some(threshold) => SlotKind::Caller(DmaPolicy::Auto {
                    threshold: threshold as usize,
                }),
                None => {
                    let mapper = self.mapper.as_ref().ok_or_else(|| {
                        EngineError::Misuse("auto mode without a direct mapper".into())
                    })?;
                    let max = self.slot_bytes.next_power_of_two().max(4096);
                    let calibration = DmaPolicy::calibrate(
                        self.pool(),
                        mapper,
                        max,
                        CALIBRATION_ROUNDS,
                        slots as usize,
                    )
                    .map_err(|e| EngineError::Setup {
                        what: "DMA policy calibration (give --dma-threshold to skip it)",
                        source: std::io::Error::other(e.to_string()),
                    })?;
                    let policy = calibration.policy;
                    self.calibration = Some(calibration);
                    SlotKind::Caller(policy)
                }
            },
        };
        Ok(())
    }

    /// Turns slot `slot`'s idle memory into the [`DmaData`] of a `len`-byte transfer in
    /// `direction`, as the slot kind says. On failure the memory goes back to the slot.
    fn data_for(
        &mut self,
        slot: usize,
        len: usize,
        direction: IoDirection,
    ) -> Result<DmaData, EngineError> {
        let dir = match direction {
            IoDirection::Write => Direction::ToDevice,
            IoDirection::Read => Direction::FromDevice,
        };
        let memory = self.slots[slot]
            .take()
            .ok_or_else(|| EngineError::Misuse(format!("slot {slot} is in flight")))?;
        match (memory, self.kind) {
            (SlotMemory::Pool(mut buf), _) => match buf.set_len(len) {
                Ok(()) => Ok(DmaData::owned(buf)),
                Err(e) => {
                    self.slots[slot] = Some(SlotMemory::Pool(buf));
                    Err(EngineError::Misuse(e.to_string()))
                }
            },
            (SlotMemory::Host(mut page), SlotKind::Caller(policy)) => {
                if !page.set_len(len) {
                    self.slots[slot] = Some(SlotMemory::Host(page));
                    return Err(EngineError::Misuse(format!(
                        "{len} bytes do not fit slot {slot}"
                    )));
                }
                match policy.prepare(self.ctrl.pool(), self.mapper.as_ref(), page, dir) {
                    Ok(data) => Ok(data),
                    Err(refused) => {
                        self.return_memory(slot, Completed::Memory(refused.memory));
                        Err(EngineError::Io {
                            what: "DMA data for the slot (raise --pool-max or lower --iodepth)",
                            source: std::io::Error::other(refused.error.to_string()),
                        })
                    }
                }
            }
            (SlotMemory::Host(page), SlotKind::ZeroCopy) => {
                self.slots[slot] = Some(SlotMemory::Host(page));
                Err(EngineError::Misuse(
                    "host memory in a zero-copy slot".into(),
                ))
            }
        }
    }

    /// Gives completed memory back to its slot. Memory that did not come back as the slot's
    /// own (a direct mapping that could not be undone is leaked by the library, never reused)
    /// leaves the slot unusable: `false`.
    fn return_memory(&mut self, slot: usize, completed: Completed) -> bool {
        let memory = match completed {
            Completed::Buf(buf) => SlotMemory::Pool(buf),
            Completed::Memory(HostMemory::Page(page)) => SlotMemory::Host(page),
            Completed::Memory(_) => return false,
        };
        if let Some(s) = self.slots.get_mut(slot) {
            *s = Some(memory);
        }
        true
    }

    /// Submits `request` with its slot's memory as the command's data. On failure the slot
    /// stays idle with its memory.
    fn submit(&mut self, request: IoRequest) -> Result<(), EngineError> {
        let slot = request.slot as usize;
        let len = request.len as usize;
        // The harness aligns requests to the logical block; the driver checks the rest.
        let (lba, aligned) = self.ns.block_of(request.offset);
        if !aligned {
            return Err(EngineError::Misuse(format!(
                "request {request:?} does not start on a block"
            )));
        }
        let data = self.data_for(slot, len, request.direction)?;
        let kind = data.kind();
        let queue = self
            .queue
            .as_mut()
            .ok_or_else(|| EngineError::Misuse("I/O before prepare".into()))?;
        let submitted = match request.direction {
            IoDirection::Read => queue.submit_read(&self.ns, lba, data, request.slot),
            IoDirection::Write => queue.submit_write(&self.ns, lba, data, request.slot),
        };
        match submitted {
            Ok(_) => {
                self.counts.count(kind);
                Ok(())
            }
            Err(e) => {
                if let Some(data) = e.data {
                    self.return_memory(slot, data.complete());
                }
                Err(EngineError::Io {
                    what: "NVMe submit",
                    source: std::io::Error::other(e.error.to_string()),
                })
            }
        }
    }

    /// Finishes one completed command: completes its data (a bounced read is copied back into
    /// the slot, exactly once; a direct mapping is unmapped), gives the memory back to the slot
    /// and converts the status. A successful NVMe read or write moves exactly the blocks it
    /// named (no short transfers), so success reports the request's length.
    fn finish(&mut self, done: Done<u32>) -> IoCompletion {
        let slot = done.user;
        let len = self.request_lens.get(slot as usize).copied().unwrap_or(0);
        let mut result = done.result.map(|_| len).map_err(|_| libc::EIO);
        let returned = done
            .data
            .is_some_and(|data| self.return_memory(slot as usize, data.complete()));
        if !returned {
            result = Err(libc::EIO);
        }
        IoCompletion { slot, result }
    }

    /// `--completion=interrupt`: sleeps until the queue's MSI-X vector fires or
    /// [`INTERRUPT_WAIT`] passes; `true` if it fired.
    fn wait_interrupt(&mut self) -> Result<bool, EngineError> {
        let queue = self
            .queue
            .as_mut()
            .ok_or_else(|| EngineError::Misuse("reap before prepare".into()))?;
        let fired = queue
            .wait_interrupt(INTERRUPT_WAIT)
            .map_err(|e| EngineError::Io {
                what: "waiting for the NVMe queue's interrupt",
                source: std::io::Error::other(e.to_string()),
            })?;
        self.interrupt_waits += u64::from(fired);
        Ok(fired)
    }

    /// Polls until nothing is outstanding, dropping the completions (close and drop).
    fn drain(&mut self) -> Result<(), EngineError> {
        let mut sink = Vec::new();
        while self.outstanding > 0 {
            sink.clear();
            self.reap(1, &mut sink)?;
        }
        Ok(())
    }

    /// This clone's I/O queue: its ID, depth, completion mode, completions and doorbell
    /// counters (the per-queue statistics of a `numjobs` run).
    fn queue_snapshot(&self) -> Option<serde_json::Value> {
        let queue = self.queue.as_ref()?;
        let c = queue.counters();
        Some(serde_json::json!({
            "qid": queue.qid(),
            "depth": queue.depth(),
            "completion": match self.completion {
                CompletionMode::Poll => "poll",
                CompletionMode::Interrupt => "interrupt",
            },
            "completions": self.completed,
            "interrupt_wakes": self.interrupt_waits,
            "sq_doorbell_writes": c.sq_doorbell_writes,
            "sq_doorbells_avoided": c.sq_doorbells_avoided,
            "cq_doorbell_writes": c.cq_doorbell_writes,
            "cq_doorbells_avoided": c.cq_doorbells_avoided,
        }))
    }

    /// Statistics for the report: the queue's, the pool's, the paths taken, the mapper's and
    /// calibration.
    fn snapshot(&self) -> serde_json::Value {
        let pool = serde_json::to_value(self.ctrl.pool_stats()).unwrap_or_default();
        let mut out = serde_json::json!({
            "controller": self.bdf,
            "dma": dma_name(self.requested),
            "paths": self.counts,
            "pool": pool,
        });
        if let Some(queue) = self.queue_snapshot().or_else(|| self.queue_stats.clone()) {
            out["queue"] = queue;
        }
        if self.requested == DmaMode::Auto {
            out["dma_threshold"] = match self.kind {
                SlotKind::Caller(DmaPolicy::Auto { threshold }) => serde_json::json!(threshold),
                SlotKind::Caller(DmaPolicy::Direct) => serde_json::json!(0),
                _ => serde_json::Value::Null,
            };
        }
        if let Some(mapper) = &self.mapper {
            out["direct"] = serde_json::to_value(mapper.stats()).unwrap_or_default();
        }
        if let Some(calibration) = &self.calibration {
            out["calibration"] = serde_json::json!(calibration
                .points
                .iter()
                .map(|p| serde_json::json!({
                    "size": p.size,
                    "bounce_ns": p.bounce.as_nanos() as u64,
                    "direct_ns": p.direct.as_nanos() as u64,
                }))
                .collect::<Vec<_>>());
        }
        out
    }
}

/// The `--dma` value as written on the command line.
fn dma_name(mode: DmaMode) -> &'static str {
    match mode {
        DmaMode::Bounce => "bounce",
        DmaMode::MapPerIo => "map-per-io",
        DmaMode::ZeroCopy => "zero-copy",
        DmaMode::Auto => "auto",
    }
}

impl Engine for TidepoolEngine {
    fn name(&self) -> &'static str {
        "tidepool"
    }

    fn geometry(&self) -> Geometry {
        Geometry {
            capacity: self.ns.bytes(),
            logical_block_size: self.ns.block_bytes(),
        }
    }

    fn prepare(&mut self, slots: u32, slot_bytes: u32) -> Result<(), EngineError> {
        let max_depth = self.ctrl.max_queue_depth();
        if slots == 0 || slots > max_depth {
            return Err(EngineError::Misuse(format!(
                "iodepth={slots}: the controller's queues allow 1..={max_depth}"
            )));
        }
        if slot_bytes as usize > self.ns.max_transfer() {
            return Err(EngineError::Misuse(format!(
                "bs={slot_bytes}: the controller moves at most {} bytes per command (MDTS); \
                 lower --bs",
                self.ns.max_transfer()
            )));
        }
        self.slot_bytes = slot_bytes as usize;
        self.resolve_kind(slots)?;
        for _ in 0..slots {
            let memory = if self.kind == SlotKind::ZeroCopy {
                let buf = self.pool().try_alloc(self.slot_bytes).map_err(|e| {
                    EngineError::Setup {
                        what: "zero-copy slot buffers from the pool (raise --pool-min/--pool-max)",
                        source: std::io::Error::other(e.to_string()),
                    }
                })?;
                SlotMemory::Pool(buf)
            } else {
                SlotMemory::Host(PageBuf::zeroed(self.slot_bytes))
            };
            self.slots.push(Some(memory));
        }
        self.request_lens = vec![0; slots as usize];
        let queue = match self.completion {
            CompletionMode::Poll => self.ctrl.create_io_queue::<u32>(slots),
            CompletionMode::Interrupt => self.ctrl.create_interrupt_io_queue::<u32>(slots),
        };
        let mut queue = queue.map_err(|e| nvme_error("NVMe I/O queue creation", e))?;
        queue.defer_doorbells(true);
        self.queue = Some(queue);
        Ok(())
    }

    fn fill_slot(&mut self, slot: u32, data: &[u8]) -> Result<(), EngineError> {
        match idle_slot(&mut self.slots, slot)? {
            SlotMemory::Pool(buf) => buf
                .set_len(data.len())
                .and_then(|()| buf.write_at(0, data))
                .map_err(|e| EngineError::Misuse(format!("slot {slot}: {e}"))),
            SlotMemory::Host(page) => fill_page(page, slot, data),
        }
    }

    fn read_slot(&self, slot: u32, out: &mut [u8]) -> Result<(), EngineError> {
        match idle_slot_ref(&self.slots, slot)? {
            SlotMemory::Pool(buf) => buf
                .read_at(0, out)
                .map_err(|e| EngineError::Misuse(format!("slot {slot}: {e}"))),
            SlotMemory::Host(page) => read_page(page, slot, out),
        }
    }

    fn queue(&mut self, request: IoRequest) -> Result<(), EngineError> {
        let idle = matches!(self.slots.get(request.slot as usize), Some(Some(_)));
        if !idle || request.len as usize > self.slot_bytes || request.len == 0 {
            return Err(EngineError::Misuse(format!(
                "request {request:?} names a busy or unknown slot, or exceeds its {} bytes",
                self.slot_bytes
            )));
        }
        self.submit(request)?;
        self.request_lens[request.slot as usize] = request.len;
        self.outstanding += 1;
        Ok(())
    }

    fn commit(&mut self) -> Result<(), EngineError> {
        let queue = self
            .queue
            .as_mut()
            .ok_or_else(|| EngineError::Misuse("commit before prepare".into()))?;
        queue.ring_doorbell().map_err(|e| EngineError::Io {
            what: "NVMe SQ doorbell",
            source: std::io::Error::other(e.to_string()),
        })
    }

    fn reap(&mut self, min: usize, out: &mut Vec<IoCompletion>) -> Result<(), EngineError> {
        let min = min.min(self.outstanding);
        let mut got = 0;
        let mut done = std::mem::take(&mut self.done);
        // After an interrupt wait that timed out, the next poll runs the health check.
        let mut check = false;
        loop {
            done.clear();
            let polled = match self.queue.as_mut() {
                Some(queue) if check => queue.poll_checked(&mut done),
                Some(queue) => queue.poll(&mut done),
                None => return Err(EngineError::Misuse("reap before prepare".into())),
            };
            for completion in done.drain(..) {
                let completion = self.finish(completion);
                out.push(completion);
                self.completed += 1;
                self.outstanding = self.outstanding.saturating_sub(1);
                got += 1;
            }
            if let Err(error) = polled {
                self.done = done;
                return Err(EngineError::Io {
                    what: "NVMe poll (the controller was reset)",
                    source: std::io::Error::other(error.to_string()),
                });
            }
            if got >= min {
                self.done = done;
                return Ok(());
            }
            if self.completion == CompletionMode::Interrupt {
                match self.wait_interrupt() {
                    Ok(fired) => check = !fired,
                    Err(error) => {
                        self.done = done;
                        return Err(error);
                    }
                }
            } else if *POLL_PAUSE {
                std::hint::spin_loop();
            }
        }
    }

    fn close(&mut self) -> Result<(), EngineError> {
        let drained = if self.queue.is_some() {
            self.drain()
        } else {
            Ok(())
        };
        self.queue_stats = self.queue_snapshot();
        self.queue = None;
        self.slots.clear();
        // After the queue and slot buffers went back: `in_use_bytes` then shows only what the
        // controller itself keeps (the admin queue).
        self.final_stats = Some(self.snapshot());
        drained
    }

    fn stats(&self) -> Option<serde_json::Value> {
        Some(self.final_stats.clone().unwrap_or_else(|| self.snapshot()))
    }

    /// The controller's pool, for `--stats-interval`.
    fn pool(&self) -> Option<Pool> {
        Some(self.ctrl.pool().clone())
    }
}

impl Drop for TidepoolEngine {
    /// Waits for in-flight commands before their memory is released (module doc).
    fn drop(&mut self) {
        if self.queue.is_some() && self.outstanding > 0 {
            // Best effort: if polling fails the controller was reset, bus mastering is off and
            // the device can no longer touch the memory.
            let _ = self.drain();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_addresses_are_recognised() {
        assert!(is_pci_address("0000:00:04.0"));
        assert!(is_pci_address("0000:af:1f.7"));
        assert!(!is_pci_address("/dev/nvme0n1"));
        assert!(!is_pci_address("0000:00:04"));
        assert!(!is_pci_address("0000-00:04.0"));
        assert!(!is_pci_address("000g:00:04.0"));
    }

    #[test]
    fn pool_options_make_a_valid_pool_config() {
        let settings = |min, max, chunk| PoolSettings {
            dma: DmaMode::Bounce,
            dma_threshold: None,
            min,
            max,
            chunk,
            completion: CompletionMode::Poll,
            data_pointer: NvmeDataPointer::Auto,
        };
        let cfg = pool_config(&settings(Some(5 << 20), Some(256 << 20), Some(4 << 20)));
        assert_eq!(cfg.chunk_bytes, 4 << 20);
        assert_eq!(cfg.prefill_bytes, 8 << 20, "rounded up to whole chunks");
        assert_eq!(cfg.max_bytes, 256 << 20);
        assert!(cfg.validate().is_ok(), "{:?}", cfg.validate());
        let cfg = pool_config(&settings(None, None, Some(64 << 20)));
        assert!(cfg.validate().is_ok(), "{:?}", cfg.validate());
        let cfg = pool_config(&settings(None, Some(1 << 20), None));
        assert!(
            cfg.validate().is_err(),
            "a cap below one chunk is refused by the pool"
        );
    }
}
