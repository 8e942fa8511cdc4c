//! `ioengine=tidepool`: Tidepool's userspace NVMe driver (`tidepool-nvme`) on a controller bound
//! to vfio-pci, named by its PCI address (`--filename=0000:00:04.0`), namespace 1.
//!
//! # The loop
//! One polled [`IoQueue`] per job clone, `iodepth` commands deep, with deferred doorbells:
//! `queue` writes the command into the submission ring, `commit` rings the SQ tail doorbell once
//! for the whole batch, and `reap(min)` spins on [`IoQueue::poll`] until `min` commands have
//! completed. No system call and no interrupt on the I/O path (`--completion=interrupt`, the MSI-X
//! driven async queue, is not wired into this engine yet and is refused with a clear message).
//!
//! # Where the data lives: `--dma=`
//! The harness reads and writes a slot's bytes through [`SlotBuffer`] only while the slot is idle
//! (see [`super`]). What the device is given for a slot depends on the DMA mode:
//!
//! | mode | slot memory | per I/O |
//! |---|---|---|
//! | `bounce` (default) | private anonymous memory | [`Pool::try_map`]: a pre-mapped pool buffer, filled from the slot (write) or zeroed (read); on completion a read is copied back into the slot |
//! | `map-per-io` | private, page aligned | [`DirectMapper::map`] (no cache): one `VFIO_IOMMU_MAP_DMA` before, one unmap after |
//! | `zero-copy` | a pool [`DmaBuf`] per slot | nothing: the slot *is* device-visible memory |
//! | `auto` | private, page aligned | [`DmaPolicy::choose`] by size: bounce below the threshold, map from it on; the threshold is `--dma-threshold` or measured at prepare with [`DmaPolicy::calibrate`] |
//!
//! For `bounce` and `map-per-io` the engine builds the command's PRPs itself ([`Prp::build`], a
//! PRP list from the pool's immediate path when more than two pages are touched) and submits it
//! with [`IoQueue::submit_raw`] without a data buffer; the mapping and the PRP list are kept in
//! the slot until the completion arrives, so no memory the device may still use is unmapped or
//! freed. `zero-copy` hands the slot's [`DmaBuf`] to the queue, which gives it back in the
//! completion.
//!
//! # Why in-flight memory is never released early
//! - Every mapping (bounce or direct) and PRP list of a command lives in its slot's [`InFlight`]
//!   until [`IoQueue::poll`] returns that command; only then is it unmapped (a bounce read copies
//!   out exactly once, in [`Mapping::unmap`]) and dropped.
//! - On `close`/drop the engine first polls until nothing is outstanding. If polling fails (the
//!   controller was reset), the driver has already switched bus mastering off before failing the
//!   commands, so the device can no longer touch the memory.
//! - Fields are declared so that the queue is dropped (deleting it on the controller) before the
//!   in-flight state, the private slot memory, the mapper and the controller.
//!
//! # Sharing the controller between clones
//! A VFIO group can be opened once per process, so `numjobs` clones of a job share one
//! [`Controller`] (and its pool) through a process-wide registry keyed by PCI address; each clone
//! creates its own I/O queue. The first clone's pool options win. The controller is shut down
//! when the last clone closes.

use std::collections::HashMap;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use tidepool::policy::{Calibration, DmaPolicy as PoolPolicy, Path};
use tidepool::pool::{Direction, DmaBuf, Mapping, Pool, PoolConfig, UserBuf};
use tidepool::share::direct::{DirectMapper, DirectMapping};
use tidepool_nvme::prp::Prp;
use tidepool_nvme::spec::{Command, IoOpcode};
use tidepool_nvme::{Controller, ControllerConfig, Done, IoQueue, Namespace, NvmeError};

use super::region::SlotRegion;
use super::{
    target_label, Engine, EngineError, Geometry, IoCompletion, IoDirection, IoRequest, SlotBuffer,
};
use crate::options::{CompletionMode, DmaPolicy, JobSpec, PoolSettings};

/// The namespace the engine works on.
const NSID: u32 = 1;

/// Rounds of [`DmaPolicy::calibrate`] per size for `--dma=auto` without `--dma-threshold`.
const CALIBRATION_ROUNDS: usize = 15;

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

/// The DMA mode resolved at prepare (`auto` becomes a threshold).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Bounce every I/O through a pool buffer.
    Bounce,
    /// Map the slot's private memory for every I/O.
    MapPerIo,
    /// Slots are pool buffers.
    ZeroCopy,
    /// Bounce below `threshold` bytes, map from it on.
    Auto {
        /// First size that is mapped.
        threshold: usize,
    },
}

/// What a slot holds while its command is in flight. Dropping it releases the memory the device
/// used, so it is dropped only once the command completed (module doc).
#[derive(Debug)]
enum InFlight {
    /// Nothing in flight.
    Idle,
    /// A bounce mapping of the slot's private memory, and the PRP list for it.
    Bounce {
        mapping: Mapping<'static>,
        _prp_list: Option<DmaBuf>,
    },
    /// A direct IOMMU mapping of the slot's private memory, and the PRP list for it.
    Direct {
        mapping: DirectMapping<'static>,
        _prp_list: Option<DmaBuf>,
    },
    /// The slot's pool buffer is with the queue.
    ZeroCopy,
}

/// Counters of the paths taken, for the report.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
struct PathCounts {
    bounced: u64,
    mapped: u64,
    zero_copy: u64,
}

/// An open controller and, after `prepare`, its queue and slots. Field order is drop order; see
/// the module doc.
pub struct TidepoolEngine {
    queue: Option<IoQueue<u32>>,
    in_flight: Vec<InFlight>,
    /// Zero-copy slot buffers while idle (`None` while with the queue).
    pool_slots: Vec<Option<DmaBuf>>,
    /// Each slot's first byte (private memory or the pool buffer), fixed from prepare to close.
    slot_ptrs: Vec<NonNull<u8>>,
    /// The length of each slot's current (or last) request.
    request_lens: Vec<u32>,
    slot_bytes: usize,
    private: Option<SlotRegion>,
    mapper: Option<DirectMapper>,
    ctrl: Arc<Controller>,
    ns: Namespace,
    bdf: String,
    requested: DmaPolicy,
    threshold: Option<u64>,
    mode: Mode,
    calibration: Option<Calibration>,
    counts: PathCounts,
    outstanding: usize,
    done: Vec<Done<u32>>,
    final_stats: Option<serde_json::Value>,
}

// SAFETY: the raw slot pointers point into memory this engine owns (its private region or its
// pool buffers); moving the engine to another thread moves that ownership with it. Everything
// else is `Send` (the driver's queue, mappings and pool handles).
unsafe impl Send for TidepoolEngine {}

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
        if spec.pool.completion == CompletionMode::Interrupt {
            return Err(EngineError::Unavailable(
                "tidepool",
                "--completion=interrupt is not supported by the tpio engine yet (the driver's \
                 MSI-X AsyncQueue is async-only); use --completion=poll"
                    .into(),
            ));
        }
        let cfg = ControllerConfig {
            // Engines of every job are opened up front and share the controller, so ask for as
            // many queues as QEMU and most controllers offer; the controller grants what it has.
            io_queues: 64,
            // Polled queues raise no interrupts (IEN = 0), but QEMU's NVMe refuses Create I/O
            // CQ with a non-zero vector while MSI-X is disabled, and the driver names vector
            // `qid` even for polled queues: so MSI-X stays enabled (a driver fix is pending).
            interrupts: true,
            pool: pool_config(&spec.pool),
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
            in_flight: Vec::new(),
            pool_slots: Vec::new(),
            slot_ptrs: Vec::new(),
            request_lens: Vec::new(),
            slot_bytes: 0,
            private: None,
            mapper: None,
            ctrl,
            ns,
            bdf,
            requested: spec.pool.dma,
            threshold: spec.pool.dma_threshold,
            mode: Mode::Bounce,
            calibration: None,
            counts: PathCounts::default(),
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
    fn resolve_mode(&mut self, slots: u32) -> Result<(), EngineError> {
        let needs_mapper = matches!(self.requested, DmaPolicy::MapPerIo | DmaPolicy::Auto);
        if needs_mapper {
            self.mapper = Some(DirectMapper::new(Arc::clone(self.pool().view()), 0));
        }
        self.mode = match self.requested {
            DmaPolicy::Bounce => Mode::Bounce,
            DmaPolicy::MapPerIo => Mode::MapPerIo,
            DmaPolicy::ZeroCopy => Mode::ZeroCopy,
            DmaPolicy::Auto => match self.threshold {
                Some(threshold) => Mode::Auto {
                    threshold: threshold as usize,
                },
                None => {
                    let mapper = self.mapper.as_ref().ok_or_else(|| {
                        EngineError::Misuse("auto mode without a direct mapper".into())
                    })?;
                    let max = self.slot_bytes.next_power_of_two().max(4096);
                    let calibration = PoolPolicy::calibrate(
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
                    let mode = match calibration.policy {
                        PoolPolicy::Auto { threshold } => Mode::Auto { threshold },
                        PoolPolicy::Direct => Mode::MapPerIo,
                        PoolPolicy::Bounce => Mode::Auto {
                            threshold: usize::MAX,
                        },
                    };
                    self.calibration = Some(calibration);
                    mode
                }
            },
        };
        Ok(())
    }

    /// Makes the command of `request` with the slot's data described per the DMA mode and
    /// submits it. On failure the slot stays idle and everything taken is released.
    fn submit(&mut self, request: IoRequest) -> Result<(), EngineError> {
        let slot = request.slot as usize;
        let len = request.len as usize;
        let block = u64::from(self.ns.block_bytes());
        let lba = request.offset / block;
        let blocks = self
            .ns
            .check(lba, len)
            .map_err(|e| EngineError::Misuse(format!("request {request:?}: {e}")))?;
        let opcode = match request.direction {
            IoDirection::Read => IoOpcode::Read,
            IoDirection::Write => IoOpcode::Write,
        };
        let mut cmd = Command::read_write(opcode, NSID, lba, blocks as u32);
        let path = match self.mode {
            Mode::Bounce => Path::Bounce,
            Mode::MapPerIo => Path::Direct,
            Mode::ZeroCopy => {
                return self.submit_zero_copy(cmd, request);
            }
            Mode::Auto { threshold } => {
                PoolPolicy::Auto { threshold }.choose(len, self.slot_ptrs[slot].as_ptr() as usize)
            }
        };
        let ptr = self.slot_ptrs[slot].as_ptr();
        let (device_addr, state) = match path {
            Path::Bounce => {
                let mapping = bounce_map(self.pool(), ptr, len, request.direction)?;
                (mapping.device_addr().0, BounceOrDirect::Bounce(mapping))
            }
            Path::Direct => {
                let mapper = self
                    .mapper
                    .as_ref()
                    .ok_or_else(|| EngineError::Misuse("direct path without a mapper".into()))?;
                // SAFETY: the slot's private memory is page aligned (SlotRegion), stays mapped
                // until the engine is closed (after every command completed, module doc), and
                // the harness does not touch a slot while its request is in flight.
                let mapping = unsafe { mapper.map(ptr, len) }.map_err(|e| EngineError::Io {
                    what: "IOMMU map of the slot (map-per-io)",
                    source: std::io::Error::other(e.to_string()),
                })?;
                (mapping.device_addr().0, BounceOrDirect::Direct(mapping))
            }
        };
        let pool = self.ctrl.pool().clone();
        let prp =
            Prp::build(device_addr, len, |n| pool.try_alloc(n)).map_err(|e| EngineError::Io {
                what: "PRP list allocation (raise --pool-max)",
                source: std::io::Error::other(e.to_string()),
            })?;
        cmd.prp1 = prp.prp1;
        cmd.prp2 = prp.prp2;
        let queue = self
            .queue
            .as_mut()
            .ok_or_else(|| EngineError::Misuse("I/O before prepare".into()))?;
        queue
            .submit_raw(cmd, None, 0, request.slot)
            .map_err(|e| EngineError::Io {
                what: "NVMe submit",
                source: std::io::Error::other(e.error.to_string()),
            })?;
        self.in_flight[slot] = match state {
            BounceOrDirect::Bounce(mapping) => {
                self.counts.bounced += 1;
                InFlight::Bounce {
                    mapping,
                    _prp_list: prp.list,
                }
            }
            BounceOrDirect::Direct(mapping) => {
                self.counts.mapped += 1;
                InFlight::Direct {
                    mapping,
                    _prp_list: prp.list,
                }
            }
        };
        Ok(())
    }

    /// Submits `request` with the slot's own pool buffer as the data (zero copy).
    fn submit_zero_copy(&mut self, cmd: Command, request: IoRequest) -> Result<(), EngineError> {
        let slot = request.slot as usize;
        let buf = self.pool_slots[slot]
            .take()
            .ok_or_else(|| EngineError::Misuse(format!("slot {slot} is in flight")))?;
        let queue = self
            .queue
            .as_mut()
            .ok_or_else(|| EngineError::Misuse("I/O before prepare".into()))?;
        match queue.submit_raw(cmd, Some(buf), request.len as usize, request.slot) {
            Ok(_) => {
                self.counts.zero_copy += 1;
                self.in_flight[slot] = InFlight::ZeroCopy;
                Ok(())
            }
            Err(e) => {
                self.pool_slots[slot] = e.data;
                Err(EngineError::Io {
                    what: "NVMe submit",
                    source: std::io::Error::other(e.error.to_string()),
                })
            }
        }
    }

    /// Finishes one completed command: copies a bounced read back into the slot (exactly once),
    /// unmaps a direct mapping, returns a zero-copy buffer to its slot, and converts the status.
    /// A successful NVMe read or write moves exactly the blocks it named (no short transfers),
    /// so success reports the request's length.
    fn finish(&mut self, done: Done<u32>) -> IoCompletion {
        let slot = done.user;
        let state = self
            .in_flight
            .get_mut(slot as usize)
            .map(|s| std::mem::replace(s, InFlight::Idle))
            .unwrap_or(InFlight::Idle);
        let len = self.request_lens.get(slot as usize).copied().unwrap_or(0);
        let mut result = done.result.map(|_| len).map_err(|_| libc::EIO);
        match state {
            InFlight::Bounce { mapping, .. } => {
                if result.is_ok() {
                    mapping.unmap();
                }
                // A failed read is abandoned: dropping the mapping copies nothing out.
            }
            InFlight::Direct { mapping, .. } => {
                if mapping.unmap().is_err() {
                    result = Err(libc::EIO);
                }
            }
            InFlight::ZeroCopy => {
                if let Some(slot_buf) = self.pool_slots.get_mut(slot as usize) {
                    *slot_buf = done.data;
                }
            }
            InFlight::Idle => {}
        }
        IoCompletion { slot, result }
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

    /// Statistics for the report: the pool's, the paths taken, the mapper's and calibration.
    fn snapshot(&self) -> serde_json::Value {
        let pool = serde_json::to_value(self.ctrl.pool_stats()).unwrap_or_default();
        let mut out = serde_json::json!({
            "controller": self.bdf,
            "dma": dma_name(self.requested),
            "paths": self.counts,
            "pool": pool,
        });
        if let Mode::Auto { threshold } = self.mode {
            out["dma_threshold"] = if threshold == usize::MAX {
                serde_json::Value::Null
            } else {
                serde_json::json!(threshold)
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

/// A fresh mapping of either kind, before it is stored in the slot.
enum BounceOrDirect {
    Bounce(Mapping<'static>),
    Direct(DirectMapping<'static>),
}

/// Bounce-maps `len` bytes of the slot at `ptr` through the pool's immediate path: a write's
/// bytes are copied in now, a read gets a zeroed buffer that `Mapping::unmap` copies out.
fn bounce_map(
    pool: &Pool,
    ptr: *mut u8,
    len: usize,
    direction: IoDirection,
) -> Result<Mapping<'static>, EngineError> {
    // SAFETY: `ptr..ptr+len` lies in the engine's private slot region, which outlives every
    // mapping (mappings are dropped when their command completes, and close/drop drain before
    // the region goes). While the mapping lives, the harness does not touch the slot (the engine
    // protocol), so this is the only reference to those bytes.
    let user: UserBuf<'static> = unsafe {
        match direction {
            IoDirection::Write => UserBuf::Shared(std::slice::from_raw_parts(ptr, len)),
            IoDirection::Read => UserBuf::Exclusive(std::slice::from_raw_parts_mut(ptr, len)),
        }
    };
    let dir = match direction {
        IoDirection::Write => Direction::ToDevice,
        IoDirection::Read => Direction::FromDevice,
    };
    pool.try_map(user, dir).map_err(|e| EngineError::Io {
        what: "bounce buffer from the pool (raise --pool-max or lower --iodepth)",
        source: std::io::Error::other(e.to_string()),
    })
}

/// The `--dma` value as written on the command line.
fn dma_name(policy: DmaPolicy) -> &'static str {
    match policy {
        DmaPolicy::Bounce => "bounce",
        DmaPolicy::MapPerIo => "map-per-io",
        DmaPolicy::ZeroCopy => "zero-copy",
        DmaPolicy::Auto => "auto",
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
        self.resolve_mode(slots)?;
        if self.mode == Mode::ZeroCopy {
            for _ in 0..slots {
                let buf = self.pool().try_alloc(self.slot_bytes).map_err(|e| {
                    EngineError::Setup {
                        what: "zero-copy slot buffers from the pool (raise --pool-min/--pool-max)",
                        source: std::io::Error::other(e.to_string()),
                    }
                })?;
                let ptr = NonNull::new(buf.as_ptr())
                    .ok_or_else(|| EngineError::Misuse("pool buffer at null".into()))?;
                self.slot_ptrs.push(ptr);
                self.pool_slots.push(Some(buf));
            }
        } else {
            let region = SlotRegion::new(slots, slot_bytes)?;
            for slot in 0..slots {
                self.slot_ptrs.push(region.slot(slot)?.ptr);
            }
            self.private = Some(region);
        }
        self.in_flight = (0..slots).map(|_| InFlight::Idle).collect();
        self.request_lens = vec![0; slots as usize];
        let mut queue = self
            .ctrl
            .create_io_queue::<u32>(slots)
            .map_err(|e| nvme_error("NVMe I/O queue creation", e))?;
        queue.defer_doorbells(true);
        self.queue = Some(queue);
        Ok(())
    }

    fn slot_buffer(&self, slot: u32) -> Result<SlotBuffer, EngineError> {
        SlotBuffer::of(&self.slot_ptrs, self.slot_bytes, slot)
    }

    fn queue(&mut self, request: IoRequest) -> Result<(), EngineError> {
        let idle = matches!(
            self.in_flight.get(request.slot as usize),
            Some(InFlight::Idle)
        );
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
        loop {
            done.clear();
            let polled = match self.queue.as_mut() {
                Some(queue) => queue.poll(&mut done),
                None => return Err(EngineError::Misuse("reap before prepare".into())),
            };
            for completion in done.drain(..) {
                let completion = self.finish(completion);
                out.push(completion);
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
            std::hint::spin_loop();
        }
    }

    fn close(&mut self) -> Result<(), EngineError> {
        let drained = if self.queue.is_some() {
            self.drain()
        } else {
            Ok(())
        };
        self.queue = None;
        self.in_flight.clear();
        self.pool_slots.clear();
        self.slot_ptrs.clear();
        self.private = None;
        // After the queue and slot buffers went back: `in_use_bytes` then shows only what the
        // controller itself keeps (the admin queue).
        self.final_stats = Some(self.snapshot());
        drained
    }

    fn stats(&self) -> Option<serde_json::Value> {
        Some(self.final_stats.clone().unwrap_or_else(|| self.snapshot()))
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
            dma: DmaPolicy::Bounce,
            dma_threshold: None,
            min,
            max,
            chunk,
            completion: CompletionMode::Poll,
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
