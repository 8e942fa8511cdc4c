//! The engine seam: what tpio asks of anything that moves bytes to and from a block target.
//!
//! An engine is driven by one job thread through a polled submission/completion loop:
//!
//! ```text
//! open (engine-specific constructor, see [`open_engine`])
//! geometry()                         capacity and logical block size, checked against the job
//! prepare(slots, slot_bytes)         allocate/register `slots` buffers of `slot_bytes` each
//! loop {
//!     queue(IoRequest) ...           up to `slots` requests in flight, each naming its slot
//!     commit()                       make the queued requests visible to the device (syscall/doorbell)
//!     reap(min, &mut completions)    wait for at least `min` completions, return all that are ready
//! }
//! close()
//! ```
//!
//! Buffers belong to the engine (so it can register them with io_uring, or carve them from DMA pool
//! memory, or keep them in ordinary memory and bounce) and are addressed by slot number. The harness
//! touches a slot's bytes only by copying in ([`Engine::fill_slot`]) and out
//! ([`Engine::read_slot`]), and an engine refuses both for a slot in flight (between the `queue`
//! naming it and the `reap` returning it): the rule for memory a device may write, enforced by
//! the engine that knows, not assumed of the harness. No engine holds a reference into memory a
//! device may be writing, and this directory has no `unsafe`.
//!
//! An engine is used by one thread at a time (`Send`, not `Sync`); `numjobs` clones each open their own.

use ::tidepool::data::PageBuf;

use crate::options::{EngineKind, JobSpec};

pub mod io_uring;
pub mod null;
pub mod region;
pub mod tidepool;
pub mod vhost_user_blk;

/// An engine failed; the message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The target does not exist or cannot be opened.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The target.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The target is smaller than the job's region.
    #[error("{path} is {capacity} bytes, smaller than the region the job needs (offset {offset} + size {size}): grow the file or lower --size/--offset")]
    TooSmall {
        /// The target.
        path: String,
        /// Its size.
        capacity: u64,
        /// Region start.
        offset: u64,
        /// Region size.
        size: u64,
    },
    /// The engine is not available in this build or on this machine.
    #[error("ioengine={0} is not available: {1}")]
    Unavailable(&'static str, String),
    /// Setting the engine up failed (ring creation, buffer registration, memory).
    #[error("{what} failed: {source}")]
    Setup {
        /// Which step.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// Submitting or reaping failed as a whole (not one I/O: that is an [`IoCompletion`] result).
    #[error("{what} failed: {source}")]
    Io {
        /// Which step.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The harness broke the protocol (slot out of range or already in flight, request too large).
    #[error("engine misuse: {0}")]
    Misuse(String),
}

/// What an engine knows about its target after opening it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes addressable from offset 0.
    pub capacity: u64,
    /// Offsets and lengths must be multiples of this (512 for a regular file, the LBA size of a device).
    pub logical_block_size: u32,
}

/// Read or write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoDirection {
    /// Device to buffer.
    Read,
    /// Buffer to device.
    Write,
}

/// One I/O to queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoRequest {
    /// Which buffer slot holds (write) or receives (read) the data; `< slots` given to `prepare`.
    pub slot: u32,
    /// Direction.
    pub direction: IoDirection,
    /// Byte offset on the target; a multiple of the logical block size.
    pub offset: u64,
    /// Bytes; a multiple of the logical block size, at most `slot_bytes`.
    pub len: u32,
}

/// One finished I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoCompletion {
    /// The slot of the request (free again once returned).
    pub slot: u32,
    /// Bytes moved, or the errno the device/kernel reported.
    pub result: Result<u32, i32>,
}

/// How the harness batches an engine's submissions and completions: fio's `iodepth_batch`
/// (`iodepth_batch_submit`) and `iodepth_batch_complete_max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// Commit after this many queued requests (the rest of a round is committed at its end).
    pub submit: usize,
    /// Take at most this many completions before refilling their slots; completions reaped
    /// beyond it wait for the next round, as in the engine's completion queue.
    pub complete: usize,
}

impl Batching {
    /// fio's defaults (`iodepth_batch=1`, `iodepth_batch_complete_max` = its minimum, 1): one
    /// request per commit, each freed slot refilled before the next completion is taken, so the
    /// queue is kept as full as the device allows.
    pub const FIO_DEFAULT: Batching = Batching {
        submit: 1,
        complete: 1,
    };

    /// Every free slot queued and committed at once, every ready completion taken at once: one
    /// doorbell per round, for engines whose commit is costly (a device register write).
    pub const WHOLE: Batching = Batching {
        submit: usize::MAX,
        complete: usize::MAX,
    };
}

/// A block I/O engine driven by one job thread. See the module doc for the call order.
pub trait Engine: Send {
    /// The `ioengine=` name, for reports.
    fn name(&self) -> &'static str;

    /// Capacity and logical block size of the opened target.
    fn geometry(&self) -> Geometry;

    /// Allocates (and registers, where the engine can) `slots` buffers of `slot_bytes` each.
    /// Called once, before the first `queue`. `slot_bytes` is a multiple of the logical block size.
    fn prepare(&mut self, slots: u32, slot_bytes: u32) -> Result<(), EngineError>;

    /// Copies `data` into the start of idle slot `slot` (a write's payload). A slot in flight,
    /// out of range, or too small for `data` is the harness's misuse.
    fn fill_slot(&mut self, slot: u32, data: &[u8]) -> Result<(), EngineError>;

    /// Copies the start of idle slot `slot` into `out` (a completed read). Same refusals as
    /// [`Engine::fill_slot`].
    fn read_slot(&self, slot: u32, out: &mut [u8]) -> Result<(), EngineError>;

    /// Queues one request; it may not reach the device before `commit`. The slot must be idle.
    fn queue(&mut self, request: IoRequest) -> Result<(), EngineError>;

    /// Hands every queued request to the device.
    fn commit(&mut self) -> Result<(), EngineError>;

    /// Waits until at least `min` requests have completed (0: do not wait), then appends every
    /// completion that is ready to `out`. Never returns more completions than requests committed.
    fn reap(&mut self, min: usize, out: &mut Vec<IoCompletion>) -> Result<(), EngineError>;

    /// Releases the target and buffers. No request may be in flight.
    fn close(&mut self) -> Result<(), EngineError>;

    /// How the harness should batch this engine's commits and completions.
    fn batching(&self) -> Batching {
        Batching::WHOLE
    }

    /// Engine-specific statistics for the JSON report's `tidepool` object (pool use, waits, ...).
    fn stats(&self) -> Option<serde_json::Value> {
        None
    }

    /// The DMA pool this engine's I/O goes through, if it has one: a shared handle whose
    /// `stats()` `--stats-interval` reads from its own thread while the job runs.
    fn pool(&self) -> Option<::tidepool::pool::Pool> {
        None
    }
}

/// Opens the engine a job asks for on the job's target, checking the target covers the job's region.
///
/// `ioengine=tidepool` takes the controller's PCI address as `spec.filename` and its DMA and
/// pool settings from `spec.pool` (see [`tidepool::TidepoolEngine`]). `ioengine=vhost-user-blk`
/// takes a backend's unix socket and the same pool settings (see
/// [`vhost_user_blk::VhostUserBlkEngine`]).
pub fn open_engine(spec: &JobSpec) -> Result<Box<dyn Engine>, EngineError> {
    let engine: Box<dyn Engine> = match spec.ioengine {
        EngineKind::IoUring => Box::new(io_uring::IoUringEngine::open(spec)?),
        EngineKind::Null => Box::new(null::NullEngine::new(spec)),
        EngineKind::Tidepool => Box::new(tidepool::TidepoolEngine::open(spec)?),
        EngineKind::VhostUserBlk => Box::new(vhost_user_blk::VhostUserBlkEngine::open(spec)?),
    };
    let capacity = engine.geometry().capacity;
    if let Some(size) = spec.size {
        if spec
            .offset
            .checked_add(size)
            .is_none_or(|end| end > capacity)
        {
            return Err(EngineError::TooSmall {
                path: target_label(spec),
                capacity,
                offset: spec.offset,
                size,
            });
        }
    }
    Ok(engine)
}

/// How a job's target is named in messages.
pub fn target_label(spec: &JobSpec) -> String {
    spec.filename
        .as_ref()
        .map(|path| path.display().to_string())
        .unwrap_or_else(|| "(null)".into())
}

/// Idle slot `slot` of an engine whose slot table holds `None` while a slot is in flight; a
/// slot in flight or out of range is the harness's misuse.
pub(crate) fn idle_slot<T>(slots: &mut [Option<T>], slot: u32) -> Result<&mut T, EngineError> {
    match slots.get_mut(slot as usize) {
        Some(Some(memory)) => Ok(memory),
        Some(None) => Err(EngineError::Misuse(format!("slot {slot} is in flight"))),
        None => Err(EngineError::Misuse(format!("slot {slot} out of range"))),
    }
}

/// [`idle_slot`], read-only.
pub(crate) fn idle_slot_ref<T>(slots: &[Option<T>], slot: u32) -> Result<&T, EngineError> {
    match slots.get(slot as usize) {
        Some(Some(memory)) => Ok(memory),
        Some(None) => Err(EngineError::Misuse(format!("slot {slot} is in flight"))),
        None => Err(EngineError::Misuse(format!("slot {slot} out of range"))),
    }
}

/// Copies `data` into slot `slot`'s private page, which becomes `data.len()` long.
pub(crate) fn fill_page(page: &mut PageBuf, slot: u32, data: &[u8]) -> Result<(), EngineError> {
    if !page.set_len(data.len()) {
        return Err(EngineError::Misuse(format!(
            "slot {slot}: {} bytes do not fit",
            data.len()
        )));
    }
    page.as_mut_slice().copy_from_slice(data);
    Ok(())
}

/// Copies the start of slot `slot`'s private page into `out`.
pub(crate) fn read_page(page: &PageBuf, slot: u32, out: &mut [u8]) -> Result<(), EngineError> {
    let bytes = page.as_slice().get(..out.len()).ok_or_else(|| {
        EngineError::Misuse(format!("slot {slot} holds fewer than {} bytes", out.len()))
    })?;
    out.copy_from_slice(bytes);
    Ok(())
}
