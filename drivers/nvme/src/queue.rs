//! A submission/completion queue pair: rings in pool memory, command slots, doorbells,
//! timeouts.
//!
//! # Shape
//! - The **SQ** is a ring of 64-byte entries in one pool buffer. [`QueuePair::submit`] copies a
//!   command into the slot at the tail, advances the tail and rings the SQ tail doorbell. One
//!   slot is always left empty (a full ring would look empty to the device), so a queue of `n`
//!   entries has depth `n - 1`.
//! - The **CQ** is a [`CompletionRing`]; [`QueuePair::poll`] drains it, validates every entry
//!   ([`crate::completion::validate`]), and rings the CQ head doorbell once per batch.
//!   **Bounded drain**: one poll takes at most one ring's worth of entries (entries − 1, the
//!   most a well-behaved device can have posted since the last doorbell) and stops at the
//!   first entry that fails validation. A device that keeps posting entries with the
//!   expected phase therefore cannot pin the poller (or, on the admin queue, the admin lock):
//!   a bad entry leads to the reset at once; good ones wait for the next poll, so the timeout
//!   scan and the reset are always reached.
//! - **Slots**: command ID `c` (0..depth) is slot `c`. A slot holds what must outlive the
//!   command: the caller's user data, the data buffer (so no one can touch or free memory the
//!   device is using) and the PRP list. Free IDs are a stack (LIFO: a recently used slot is
//!   warm in cache).
//!
//! - **PRP list pages** are kept per slot: the first command of a slot that needs a list takes
//!   one 4 KiB page from the pool and the slot keeps it, so later commands just rewrite it (no
//!   allocation, no zeroing on the I/O path). Only transfers beyond 2 MiB, which need a chained
//!   list, allocate a list per command.
//! - **SGLs** (an I/O queue whose controller supports them, [`QueuePair::set_sgl`]): a
//!   contiguous buffer is one Data Block descriptor in the command itself (no list at all);
//!   a scatter list of ranges ([`QueuePair::submit_ranges`]) puts its descriptors in the same
//!   per-slot page (it holds a PRP list or an SGL segment, whichever the slot's command needs),
//!   and only more than 256 descriptors allocate a longer segment per command.
//!
//! # The hot path and the clock
//! `submit` and `poll` read no clock and no register: a command records the queue's
//! **timeout epoch** instead of a timestamp. Every [`SCAN_EVERY`] polls (and on
//! [`QueuePair::poll_checked`]) the queue reads the clock; when a quarter of the timeout has
//! passed since the epoch last advanced it advances the epoch, reads CSTS (fatal status) and
//! fails the queue if some command was submitted at least [`TIMEOUT_EPOCHS`] epochs ago. Each
//! advance needs a quarter timeout of real time, so such a command has been outstanding for at
//! least four full quarters — the timeout — and is never failed early; it is caught at the
//! latest about 1.25 timeouts plus one scan period after submission, provided the owner polls.
//!
//! # Failure handling (and why buffers are never freed under a live device)
//! A command outstanding longer than the timeout, CSTS.CFS, or a completion entry that breaks
//! the protocol make the queue reset the controller ([`Hw::reset`]): bus mastering is switched
//! off first (from then on the device cannot touch memory), then CC.EN is cleared. Only then
//! are the outstanding commands failed with [`NvmeError::ControllerReset`] and their buffers
//! handed back. Other queues of the same controller notice the reset through the controller's
//! generation counter on their next `poll`/`submit` and fail their own commands the same way.
//!
//! # Dropping a queue (the drop guard)
//! An I/O queue created on a controller is *attached* to it. Dropping it — whoever drops it:
//! [`crate::IoQueue`], the async reaper, a runtime shutting down with the async handles, a
//! failed `AsyncQueue::new` — first takes it off the controller (Delete I/O SQ, then CQ); if
//! the controller will not confirm, it is reset (bus mastering off) instead. Only then do the
//! rings, list pages and in-flight buffers go back to the pool, and the queue ID is freed. A
//! queue of an older generation (the controller was reset since) just frees its memory.
//!
//! # Locking
//! None inside: a `QueuePair` is owned by one thread (`&mut self`); the async queue puts it in a
//! mutex. Doorbell writes go straight to the BAR; they are per-queue registers.

use std::mem::ManuallyDrop;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidepool::data::DmaData;
use tidepool::pool::DmaBuf;

use crate::completion::{validate, CompletionRing, Expected};
use crate::controller::Hw;
use crate::doorbell::Doorbell;
use crate::error::NvmeError;
use crate::prp::{pages_touched, write_one_page_list, Prp, ENTRIES_PER_LIST_PAGE};
use crate::sgl::{self, Sgl, SglError, SglSupport, DESCRIPTORS_PER_SEGMENT_PAGE};
use crate::spec::{Command, Status, PAGE_BYTES, SQ_ENTRY_BYTES};

/// The queue reads the clock for its health check once every this many polls (or on
/// [`QueuePair::poll_checked`]): keeps the hot path off the clock.
pub const SCAN_EVERY: u32 = 64;

/// A command submitted this many timeout epochs (quarter timeouts) ago has timed out.
pub const TIMEOUT_EPOCHS: u32 = 5;

/// A command that finished (or was failed), with what the caller handed in.
#[derive(Debug)]
pub struct Done<T> {
    /// The command ID it ran under (free again now).
    pub cid: u16,
    /// The caller's data, as given to `submit`.
    pub user: T,
    /// The command's data, given back once the device is done with it: call
    /// [`DmaData::complete`] to copy a bounced read out and get the memory back.
    pub data: Option<DmaData>,
    /// DW0 of the completion on success, or why it failed.
    pub result: Result<u32, NvmeError>,
}

/// How a command ended, as [`QueuePair::poll_each`] hands it to its sink: the completion's
/// DW0, status and opcode packed in one word, or the error that failed it (boxed: the cold
/// paths). The sink makes the [`Done::result`] with [`Outcome::into_result`] where it stores
/// it.
///
/// Two scalars, so it travels in two registers. A `Result<u32, NvmeError>` (64 bytes) made in
/// `poll_each`, or an enum of the same parts, is built in memory field by field and then read
/// back whole with wide loads by the sink: a store-forwarding stall on every completion, the
/// largest single cost of the poll in `perf annotate` of `nvme_emu`'s inline QD 1.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// DW0 (bits 0-31), the status field (32-47) and the opcode (48-55) of a completion.
    completed: u64,
    /// Why it failed without a completion (a reset, a timeout); `completed` is 0 then.
    failed: Option<Box<NvmeError>>,
}

impl Outcome {
    /// The device completed the command: DW0, its status, and its opcode (for the error).
    #[inline(always)]
    fn completed(dw0: u32, status: Status, opcode: u8) -> Outcome {
        Outcome {
            completed: u64::from(dw0) | u64::from(status.0) << 32 | u64::from(opcode) << 48,
            failed: None,
        }
    }

    /// The command failed without a completion.
    fn failed(error: NvmeError) -> Outcome {
        Outcome {
            completed: 0,
            failed: Some(Box::new(error)),
        }
    }

    /// DW0 on success, else why it failed.
    #[inline(always)]
    pub(crate) fn into_result(self) -> Result<u32, NvmeError> {
        if let Some(e) = self.failed {
            return Err(*e);
        }
        let status = Status((self.completed >> 32) as u16);
        if status.is_success() {
            Ok(self.completed as u32)
        } else {
            Err(NvmeError::Command {
                opcode: (self.completed >> 48) as u8,
                status,
            })
        }
    }
}

/// Where the cold paths (a reset failing every outstanding command) hand finished commands:
/// command ID, user data, data, outcome.
type Sink<'a, T> = dyn FnMut(u16, T, Option<DmaData>, Outcome) + 'a;

/// A sink that appends each finished command to `out` as a [`Done`].
fn push_to<T>(out: &mut Vec<Done<T>>) -> impl FnMut(u16, T, Option<DmaData>, Outcome) + '_ {
    move |cid, user, data, outcome| {
        push_with(out, || Done {
            cid,
            user,
            data,
            result: outcome.into_result(),
        })
    }
}

/// Appends what `make` builds to `out`, making room first so that nothing can run between
/// building the value and storing it: the compiler can then build it in its slot. (`Vec::push`
/// takes the value built on the stack before its capacity check, which may grow the vector,
/// and then copies it over with wide loads of fields just stored one by one: a
/// store-forwarding stall, one of the three that together took ~45 % of the poll's samples in
/// `perf annotate` of `nvme_emu`'s inline QD 1, for a 128-byte [`Done`].)
#[inline(always)]
pub(crate) fn push_with<T>(out: &mut Vec<T>, make: impl FnOnce() -> T) {
    out.reserve(1);
    out.spare_capacity_mut()[0].write(make());
    // SAFETY: `reserve(1)` made room for one more element, and that slot was just written.
    unsafe { out.set_len(out.len() + 1) };
}

/// A submission that was refused, giving the caller's things back.
#[derive(Debug)]
pub struct SubmitError<T> {
    /// Why.
    pub error: NvmeError,
    /// The user data.
    pub user: T,
    /// The data, untouched by the device.
    pub data: Option<DmaData>,
}

/// How a submission's data lies in its buffer.
#[derive(Copy, Clone, Debug)]
enum Layout<'a> {
    /// The first `n` bytes (capped at the buffer's capacity).
    Contiguous(usize),
    /// These byte ranges, in order.
    Ranges(&'a [Range<usize>]),
}

/// A command's things while it is in flight, taken out of its [`Slot`] when it ends.
#[derive(Debug)]
struct Inflight<T> {
    data: Option<DmaData>,
    /// A chained PRP list (transfers beyond 2 MiB) or an SGL segment of more than 256
    /// descriptors); one-page lists live in `prp_pages`.
    _prp_chain: Option<DmaBuf>,
    user: T,
    opcode: u8,
}

/// One command ID's slot: its [`Inflight`] fields, stored and taken one by one (in use while
/// `user` is `Some`).
///
/// Field by field, because the whole entry moved in or out at once is copied with 16-byte
/// loads of fields just stored one by one, a store-forwarding stall per command: building an
/// `Option<Inflight>` and assigning it stalled on its last 16 bytes (the user data, epoch and
/// opcode), ~30 % of `submit_layout`'s samples in `perf annotate` of `nvme_emu`'s inline QD 1,
/// and `take()` of one, then handing its `data` on, stalled in the poll the same way.
#[derive(Debug)]
struct Slot<T> {
    data: Option<DmaData>,
    prp_chain: Option<DmaBuf>,
    user: Option<T>,
    /// The timeout epoch the command was submitted in.
    epoch: u32,
    opcode: u8,
}

impl<T> Slot<T> {
    fn empty() -> Slot<T> {
        Slot {
            data: None,
            prp_chain: None,
            user: None,
            epoch: 0,
            opcode: 0,
        }
    }

    /// Whether a command is in flight under this slot's ID.
    #[inline]
    fn in_use(&self) -> bool {
        self.user.is_some()
    }

    /// Takes the command's things out, leaving the slot free.
    #[inline]
    fn take(&mut self) -> Option<Inflight<T>> {
        let user = self.user.take()?;
        Some(Inflight {
            data: self.data.take(),
            _prp_chain: self.prp_chain.take(),
            user,
            opcode: self.opcode,
        })
    }
}

/// Doorbell and fault-injection counters of one queue.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueCounters {
    /// SQ tail doorbell register writes.
    pub sq_doorbell_writes: u64,
    /// SQ tail updates that needed no register write (shadow doorbells).
    pub sq_doorbells_avoided: u64,
    /// CQ head doorbell register writes.
    pub cq_doorbell_writes: u64,
    /// CQ head updates that needed no register write (shadow doorbells).
    pub cq_doorbells_avoided: u64,
    /// Completions consumed and dropped by fault injection (feature `fault-injection`).
    pub completions_dropped: u64,
    /// Entries taken from the completion ring (valid or not).
    pub entries_consumed: u64,
}

/// One SQ/CQ pair (admin queue 0 or an I/O queue), polled by its owner.
#[derive(Debug)]
pub struct QueuePair<T> {
    hw: Arc<Hw>,
    /// The controller generation this queue belongs to; a reset bumps the controller's.
    generation: u64,
    qid: u16,
    /// The rings: dropped in `Drop`, or leaked if the controller is quarantined.
    sq: ManuallyDrop<DmaBuf>,
    sq_entries: u16,
    sq_tail: u16,
    sq_head: u16,
    cq: ManuallyDrop<CompletionRing>,
    sq_doorbell: Doorbell,
    cq_doorbell: Doorbell,
    slots: Vec<Slot<T>>,
    /// Per slot, the list page it keeps once a command of it needed one: a PRP list or an SGL
    /// segment (one command per slot at a time, so one page serves both).
    prp_pages: Vec<Option<DmaBuf>>,
    /// `Some` when I/O data is described with SGLs (the controller's SGL support, for its
    /// alignment rule); `None` for PRPs.
    sgl: Option<SglSupport>,
    free: Vec<u16>,
    timeout: Duration,
    /// The current timeout epoch and when it began.
    epoch: u32,
    epoch_start: Instant,
    /// Polls since the last clock read.
    polls_since_scan: u32,
    /// Completions still to drop (fault injection).
    drop_completions: u32,
    completions_dropped: u64,
    /// Entries taken from the completion ring.
    entries_consumed: u64,
    /// Hold SQ tail doorbells until `ring_sq` or the next `poll` (batching).
    defer_doorbell: bool,
    /// The SQ tail was advanced but not yet rung.
    sq_unrung: bool,
    /// Set once the queue can no longer be used.
    dead: Option<&'static str>,
    /// The controller an I/O queue was created on ([`QueuePair::attach`]): dropping the queue
    /// takes it off the controller first. `None` for the admin queue and for rings not (yet)
    /// on the controller.
    owner: Option<Arc<crate::controller::Shared>>,
}

impl<T> QueuePair<T> {
    /// Makes the rings for queue `qid` with `entries` slots each (2..=4096), zeroed, from the
    /// pool's immediate path. The caller creates the queue on the controller afterwards (or
    /// programs ASQ/ACQ for the admin queue).
    pub(crate) fn new(
        hw: Arc<Hw>,
        qid: u16,
        entries: u16,
        timeout: Duration,
    ) -> Result<QueuePair<T>, NvmeError> {
        let bytes = |entry: usize| (usize::from(entries) * entry).max(4096);
        let sq = hw.pool.try_alloc(bytes(SQ_ENTRY_BYTES))?;
        let cq_buf = hw.pool.try_alloc(bytes(crate::spec::CQ_ENTRY_BYTES))?;
        let cq = CompletionRing::new(cq_buf, entries)
            .ok_or_else(|| NvmeError::Unsupported(format!("queue of {entries} entries")))?;
        let depth = entries - 1;
        let mut sq_doorbell = Doorbell::new(hw.regs.doorbell_offset(qid, false));
        let mut cq_doorbell = Doorbell::new(hw.regs.doorbell_offset(qid, true));
        if qid != 0 && hw.shadow_doorbells_on() {
            let first = hw.regs.doorbell_offset(0, false);
            sq_doorbell.use_shadow(first, false);
            cq_doorbell.use_shadow(first, false);
            if let (Some(sb), Some(sq), Some(cq)) = (
                hw.shadow(),
                sq_doorbell.shadow_entry(),
                cq_doorbell.shadow_entry(),
            ) {
                sb.reset_entries(sq, cq);
            }
        }
        Ok(QueuePair {
            generation: hw.generation(),
            sq_doorbell,
            cq_doorbell,
            hw,
            qid,
            sq: ManuallyDrop::new(sq),
            sq_entries: entries,
            sq_tail: 0,
            sq_head: 0,
            cq: ManuallyDrop::new(cq),
            slots: (0..depth).map(|_| Slot::empty()).collect(),
            prp_pages: (0..depth).map(|_| None).collect(),
            sgl: None,
            free: (0..depth).rev().collect(),
            timeout,
            epoch: 0,
            epoch_start: Instant::now(),
            polls_since_scan: 0,
            drop_completions: 0,
            completions_dropped: 0,
            entries_consumed: 0,
            defer_doorbell: false,
            sq_unrung: false,
            dead: None,
            owner: None,
        })
    }

    /// The queue ID.
    pub fn qid(&self) -> u16 {
        self.qid
    }

    /// Commands that can be outstanding at once (entries - 1).
    pub fn depth(&self) -> u16 {
        self.sq_entries - 1
    }

    /// Commands outstanding now.
    pub fn outstanding(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Doorbell and fault-injection counters.
    pub fn counters(&self) -> QueueCounters {
        QueueCounters {
            sq_doorbell_writes: self.sq_doorbell.writes,
            sq_doorbells_avoided: self.sq_doorbell.avoided,
            cq_doorbell_writes: self.cq_doorbell.writes,
            cq_doorbells_avoided: self.cq_doorbell.avoided,
            completions_dropped: self.completions_dropped,
            entries_consumed: self.entries_consumed,
        }
    }

    /// Describes the data of later commands with SGLs (`Some`, the controller's support, which
    /// must say SGLs are supported) or PRPs (`None`). Commands in flight keep what they were
    /// submitted with. Never for the admin queue: over PCIe admin commands must use PRPs.
    pub(crate) fn set_sgl(&mut self, support: Option<SglSupport>) {
        self.sgl = support.filter(|s| s.supported() && self.qid != 0);
    }

    /// Does this queue describe data with SGLs (else PRPs)?
    pub fn uses_sgl(&self) -> bool {
        self.sgl.is_some()
    }

    /// Switches this (admin) queue's doorbells to "shadow entry and register" once Doorbell
    /// Buffer Config succeeded.
    pub(crate) fn shadow_admin_doorbells(&mut self) {
        let first = self.hw.regs.doorbell_offset(0, false);
        self.sq_doorbell.use_shadow(first, true);
        self.cq_doorbell.use_shadow(first, true);
    }

    /// Fault injection: the next `n` completions are consumed from the ring but never
    /// delivered, as if the device had lost them; their commands stay outstanding until the
    /// timeout fails them. For tests of the timeout and reset paths.
    #[cfg(feature = "fault-injection")]
    pub(crate) fn drop_next_completions(&mut self, n: u32) {
        self.drop_completions = n;
    }

    /// Device address of the SQ ring.
    pub(crate) fn sq_addr(&self) -> u64 {
        self.sq.device_addr().0
    }

    /// Device address of the CQ ring.
    pub(crate) fn cq_addr(&self) -> u64 {
        self.cq.device_addr()
    }

    /// Records that the queue now exists on `owner`'s controller: from here on, dropping it
    /// deletes it there (or resets the controller) before its memory is freed, and frees its ID.
    pub(crate) fn attach(&mut self, owner: Arc<crate::controller::Shared>) {
        self.owner = Some(owner);
    }

    /// Plays the device: writes `bytes` into the CQ ring at byte `at` (fuzzing, tests).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn device_write_cq(&mut self, at: usize, bytes: &[u8]) {
        self.cq.device_write(at, bytes);
    }

    /// The controller generation the queue was made in.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// Is the queue still on the controller generation it was created in?
    pub(crate) fn is_current(&self) -> bool {
        self.dead.is_none() && self.generation == self.hw.generation()
    }

    /// Places `cmd` in the SQ and rings the doorbell. `data` (if any) is the command's data
    /// buffer: the first `data_len` bytes are described by PRPs (a list is taken from the pool's
    /// immediate path when more than two pages are touched). The buffer and `user` come back in
    /// the [`Done`] from [`QueuePair::poll`].
    ///
    /// Never waits. On error everything is handed back in the [`SubmitError`].
    pub fn submit(
        &mut self,
        cmd: Command,
        data: Option<DmaData>,
        data_len: usize,
        user: T,
    ) -> Result<u16, SubmitError<T>> {
        self.submit_layout(cmd, data, Layout::Contiguous(data_len), user)
    }

    /// Like [`QueuePair::submit`], but the command's data is the byte `ranges` of `data`, in
    /// order (a scatter/gather list inside one pool buffer, at any byte offsets the
    /// controller's SGL alignment allows). On an SGL queue each range becomes one Data Block
    /// descriptor; on a PRP queue adjacent ranges are merged and must form one contiguous,
    /// 4-byte aligned run ([`SglError::NeedsSgl`] otherwise).
    pub fn submit_ranges(
        &mut self,
        cmd: Command,
        data: DmaData,
        ranges: &[Range<usize>],
        user: T,
    ) -> Result<u16, SubmitError<T>> {
        self.submit_layout(cmd, Some(data), Layout::Ranges(ranges), user)
    }

    /// The common submission path of [`QueuePair::submit`] and [`QueuePair::submit_ranges`].
    fn submit_layout(
        &mut self,
        mut cmd: Command,
        data: Option<DmaData>,
        layout: Layout<'_>,
        user: T,
    ) -> Result<u16, SubmitError<T>> {
        let refuse = |error, user, data| Err(SubmitError { error, user, data });
        if let Some(why) = self.dead {
            let error = match self.hw.check_usable() {
                Err(quarantined) => quarantined,
                Ok(()) => NvmeError::QueueGone { qid: self.qid, why },
            };
            return refuse(error, user, data);
        }
        if self.generation != self.hw.generation() {
            let error = match self.hw.check_usable() {
                Err(quarantined) => quarantined,
                Ok(()) => NvmeError::ControllerReset {
                    reason: self.hw.reset_reason(),
                },
            };
            return refuse(error, user, data);
        }
        let Some(&cid) = self.free.last() else {
            let error = NvmeError::QueueFull {
                qid: self.qid,
                depth: self.depth(),
            };
            return refuse(error, user, data);
        };
        let mut prp_chain = None;
        if let Some(buf) = &data {
            // A buffer of another DMA domain has an address that means other memory here.
            if buf.domain() != self.hw.domain {
                let error = NvmeError::ForeignBuffer {
                    buffer: buf.domain(),
                    device: self.hw.domain,
                };
                return refuse(error, user, data);
            }
            match self.describe_data(cid, &mut cmd, buf, layout) {
                Ok(chain) => prp_chain = chain,
                Err(e) => return refuse(e, user, data),
            }
        }
        cmd.cid = cid;
        self.store_entry(&cmd);
        self.free.pop();
        let slot = &mut self.slots[usize::from(cid)];
        slot.data = data;
        slot.prp_chain = prp_chain;
        slot.epoch = self.epoch;
        slot.opcode = cmd.opcode;
        slot.user = Some(user);
        self.sq_tail = (self.sq_tail + 1) % self.sq_entries;
        self.sq_unrung = true;
        if !self.defer_doorbell {
            if let Err(e) = self.ring_sq() {
                // The BAR refused a store at our own doorbell offset: a driver bug; report it.
                return Err(self.unsubmit(cid, e));
            }
        }
        Ok(cid)
    }

    /// Fills `cmd`'s data pointer for the data of `buf` laid out as `layout`, for slot `cid`:
    /// PRPs or SGLs as the queue is set. Returns the list buffer the command must keep when
    /// the slot's own page was not enough (a chained PRP list or SGL segment list).
    fn describe_data(
        &mut self,
        cid: u16,
        cmd: &mut Command,
        buf: &DmaData,
        layout: Layout<'_>,
    ) -> Result<Option<DmaBuf>, NvmeError> {
        let base = buf.device_addr().0;
        let (prp_addr, prp_len) = match (layout, self.sgl) {
            (Layout::Contiguous(len), None) => (base, len.min(buf.capacity())),
            (Layout::Contiguous(len), Some(support)) => {
                let len = len.min(buf.capacity());
                cmd.set_sgl1(sgl::contiguous(base, len, support.dword_aligned())?);
                return Ok(None);
            }
            (Layout::Ranges(ranges), None) => {
                sgl::check_ranges(ranges, buf.capacity())?;
                match sgl::merge_adjacent(ranges).as_slice() {
                    [run] => (base + run.start as u64, run.end - run.start),
                    runs => return Err(SglError::NeedsSgl { ranges: runs.len() }.into()),
                }
            }
            (Layout::Ranges(ranges), Some(support)) => {
                let data = sgl::data_blocks(base, buf.capacity(), ranges, support.dword_aligned())?;
                if data.len() <= DESCRIPTORS_PER_SEGMENT_PAGE {
                    if let [one] = data.as_slice() {
                        cmd.set_sgl1(*one);
                        return Ok(None);
                    }
                    let page = &mut self.prp_pages[usize::from(cid)];
                    if page.is_none() {
                        *page = Some(self.hw.pool.try_alloc(PAGE_BYTES)?);
                    }
                    if let Some(page) = page.as_mut() {
                        cmd.set_sgl1(sgl::write_one_page_segment(page, &data)?);
                        return Ok(None);
                    }
                }
                let pool = &self.hw.pool;
                let built = Sgl::build(&data, |n| pool.try_alloc(n))?;
                cmd.set_sgl1(built.sgl1);
                return Ok(built.list);
            }
        };
        let (prp1, prp2, chain) = self.data_pointer(cid, prp_addr, prp_len)?;
        cmd.prp1 = prp1;
        cmd.prp2 = prp2;
        Ok(chain)
    }

    /// PRP1, PRP2 and (beyond 2 MiB only) a chained list buffer for `len` bytes at `addr`,
    /// for slot `cid`: one- and two-page transfers need no list; up to 513 pages use the
    /// slot's kept list page (taken from the pool's immediate path the first time).
    fn data_pointer(
        &mut self,
        cid: u16,
        addr: u64,
        len: usize,
    ) -> Result<(u64, u64, Option<DmaBuf>), NvmeError> {
        let pages = pages_touched(addr, len);
        if (3..=ENTRIES_PER_LIST_PAGE + 1).contains(&pages) && addr % 4 == 0 {
            let page = &mut self.prp_pages[usize::from(cid)];
            if page.is_none() {
                *page = Some(self.hw.pool.try_alloc(PAGE_BYTES)?);
            }
            if let Some(page) = page.as_mut() {
                let prp2 = write_one_page_list(page, addr, len)?;
                return Ok((addr, prp2, None));
            }
        }
        let pool = &self.hw.pool;
        let prp = Prp::build(addr, len, |n| pool.try_alloc(n))?;
        Ok((prp.prp1, prp.prp2, prp.list))
    }

    /// Stores `cmd` into the SQ slot at the tail: eight volatile 64-bit stores (the ring is
    /// device-visible memory; no reference to it is formed).
    fn store_entry(&mut self, cmd: &Command) {
        let words = cmd.to_words();
        let at = usize::from(self.sq_tail) * SQ_ENTRY_BYTES;
        let base = self.sq.as_ptr().wrapping_add(at).cast::<u64>();
        for (i, w) in words.iter().enumerate() {
            // SAFETY: `sq_tail < sq_entries` and the ring buffer holds `sq_entries * 64` bytes
            // (checked in `new`), so `at + 64 <= capacity`; the buffer is page aligned, so the
            // pointer is 8-byte aligned; the slot is free (the device consumed it: the ring
            // never holds more than depth = entries - 1 commands).
            unsafe { base.add(i).write_volatile(w.to_le()) };
        }
    }

    /// Holds SQ doorbells (`true`) until [`QueuePair::ring_sq`] or the next
    /// [`QueuePair::poll`], so a batch of submissions costs one doorbell write.
    pub fn set_defer_doorbell(&mut self, defer: bool) {
        self.defer_doorbell = defer;
    }

    /// Publishes every submitted command to the device (one SQ tail doorbell write), if any
    /// is unpublished.
    pub fn ring_sq(&mut self) -> Result<(), NvmeError> {
        if !self.sq_unrung {
            return Ok(());
        }
        // The entries (and PRP lists) must be visible before the doorbell: store → store.
        publish_stores();
        self.sq_doorbell
            .ring(&self.hw.regs, self.hw.shadow(), self.sq_tail)?;
        self.sq_unrung = false;
        Ok(())
    }

    /// Takes back a command whose doorbell could not be rung (only on a BAR access error).
    fn unsubmit(&mut self, cid: u16, error: NvmeError) -> SubmitError<T> {
        self.sq_tail = (self.sq_tail + self.sq_entries - 1) % self.sq_entries;
        self.free.push(cid);
        match self.slots[usize::from(cid)].take() {
            Some(i) => SubmitError {
                error,
                user: i.user,
                data: i.data,
            },
            None => unreachable!("slot {cid} was filled just before"),
        }
    }

    /// Reaps completions into `out` and returns how many were added.
    ///
    /// First publishes deferred submissions. Also, while commands are outstanding and a scan
    /// is due (every quarter timeout), checks
    /// CSTS.CFS and command ages. On a fatal status, a timeout or a bad completion entry it
    /// resets the controller, fails every outstanding command into `out`
    /// ([`NvmeError::ControllerReset`]), and returns the cause as the error. If another queue
    /// reset the controller, the same happens with [`NvmeError::ControllerReset`].
    pub fn poll(&mut self, out: &mut Vec<Done<T>>) -> Result<usize, NvmeError> {
        self.poll_each(false, &mut push_to(out))
    }

    /// [`QueuePair::poll`], and the health check (clock, CSTS, command ages) now rather than
    /// every [`SCAN_EVERY`] polls: for owners that poll rarely (a timer tick).
    pub fn poll_checked(&mut self, out: &mut Vec<Done<T>>) -> Result<usize, NvmeError> {
        self.poll_each(true, &mut push_to(out))
    }

    /// [`QueuePair::poll`] (`check`: [`QueuePair::poll_checked`]) handing each finished
    /// command to `sink` as it is reaped, as the parts of a [`Done`] (command ID, user data,
    /// data, result), so a caller that wraps or filters completions (the [`crate::IoQueue`])
    /// builds its own in place: no intermediate vector and no intermediate struct, whose
    /// field-by-field stores a whole-struct move reads back at once (a store-forwarding stall
    /// per completion). Returns how many completions the ring delivered (commands failed by a
    /// reset are handed to `sink` too, and the error says why).
    #[inline]
    pub(crate) fn poll_each<F: FnMut(u16, T, Option<DmaData>, Outcome)>(
        &mut self,
        check: bool,
        sink: &mut F,
    ) -> Result<usize, NvmeError> {
        if self.generation != self.hw.generation() {
            return Err(self.fail_all_after_reset(sink));
        }
        self.ring_sq()?;
        let mut reaped = 0usize;
        let mut bad = None;
        let mut moved = false;
        // At most one ring's worth per poll (a device that keeps posting cannot pin the
        // poller), and nothing after a bad entry (the queue is about to be reset).
        let limit = self.cq.entries() - 1;
        let mut taken = 0u16;
        while taken < limit {
            let Some(posted) = self.cq.take_posted() else {
                break;
            };
            taken += 1;
            moved = true;
            self.entries_consumed += 1;
            let expected = Expected {
                phase: posted.phase,
                slot: posted.slot,
                sq_id: self.qid,
                sq_entries: self.sq_entries,
                sq_head: self.sq_head,
                sq_tail: self.sq_tail,
                depth: self.depth(),
            };
            let slots = &self.slots;
            match validate(&posted.raw, &expected, |cid| {
                slots[usize::from(cid)].in_use()
            }) {
                Ok(c) if self.drop_completions > 0 => {
                    // Fault injection: consumed, never delivered; the command stays outstanding.
                    self.sq_head = c.sq_head;
                    self.drop_completions -= 1;
                    self.completions_dropped += 1;
                }
                Ok(c) => {
                    self.sq_head = c.sq_head;
                    let Some(inflight) = self.slots[usize::from(c.cid)].take() else {
                        unreachable!("validate checked the slot is outstanding")
                    };
                    self.free.push(c.cid);
                    let outcome = Outcome::completed(c.result, c.status, inflight.opcode);
                    reaped += 1;
                    sink(c.cid, inflight.user, inflight.data, outcome);
                }
                Err(e) => {
                    bad = Some(e);
                    break;
                }
            }
        }
        if moved {
            self.cq_doorbell
                .ring(&self.hw.regs, self.hw.shadow(), self.cq.head())?;
        }
        if let Some(e) = bad {
            self.hw
                .reset(self.generation, format!("queue {}: {e}", self.qid));
            self.fail_all_after_reset(sink);
            return Err(NvmeError::BadCompletion(e));
        }
        self.polls_since_scan += 1;
        if check || self.polls_since_scan >= SCAN_EVERY {
            self.polls_since_scan = 0;
            self.scan(sink)?;
        }
        Ok(reaped)
    }

    /// The health check: advances the timeout epoch when a quarter timeout has passed, and
    /// then checks CSTS.CFS and whether a command is [`TIMEOUT_EPOCHS`] epochs old.
    fn scan(&mut self, out: &mut Sink<'_, T>) -> Result<(), NvmeError> {
        let now = Instant::now();
        let quarter = (self.timeout / 4).max(Duration::from_millis(1));
        if now.duration_since(self.epoch_start) < quarter {
            return Ok(());
        }
        self.epoch = self.epoch.wrapping_add(1);
        self.epoch_start = now;
        if self.outstanding() == 0 {
            return Ok(());
        }
        let csts = self.hw.regs.csts()?;
        if csts.fatal() {
            self.hw.reset(
                self.generation,
                format!("CSTS.CFS set (CSTS = {:#x})", csts.0),
            );
            self.fail_all_after_reset(out);
            return Err(NvmeError::ControllerFatal { csts: csts.0 });
        }
        let epoch = self.epoch;
        let oldest = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.in_use())
            .map(|(cid, s)| (cid as u16, s.opcode, s.epoch))
            .max_by_key(|&(_, _, e)| epoch.wrapping_sub(e));
        if let Some((cid, opcode, e)) = oldest {
            if epoch.wrapping_sub(e) >= TIMEOUT_EPOCHS {
                let error = NvmeError::CommandTimeout {
                    opcode,
                    cid,
                    after: self.timeout,
                };
                self.hw
                    .reset(self.generation, format!("queue {}: {error}", self.qid));
                self.fail_all_after_reset(out);
                return Err(error);
            }
        }
        Ok(())
    }

    /// Fails every outstanding command into `out`. Only after the controller was reset (bus
    /// mastering off, or the function reset), so handing the buffers back is safe. If the
    /// reset could not stop the device ([`Hw::quarantined`]), the data is leaked instead and
    /// the commands fail with [`NvmeError::DmaQuarantined`], without data. Marks the queue
    /// dead.
    fn fail_all_after_reset(&mut self, out: &mut Sink<'_, T>) -> NvmeError {
        let reason = self.hw.reset_reason();
        let quarantined = self.hw.quarantined().is_some();
        for (cid, slot) in self.slots.iter_mut().enumerate() {
            if let Some(i) = slot.take() {
                self.free.push(cid as u16);
                let (result, data) = if quarantined {
                    // The device may still write these: never reuse them.
                    std::mem::forget(i.data);
                    std::mem::forget(i._prp_chain);
                    let e = NvmeError::DmaQuarantined {
                        reason: reason.clone(),
                    };
                    (e, None)
                } else {
                    let e = NvmeError::ControllerReset {
                        reason: reason.clone(),
                    };
                    (e, i.data)
                };
                out(cid as u16, i.user, data, Outcome::failed(result));
            }
        }
        self.dead = Some("the controller was reset");
        match self.hw.check_usable() {
            Err(quarantined) => quarantined,
            Ok(()) => NvmeError::ControllerReset { reason },
        }
    }

    /// Submits `cmd` and polls until it completes or fails: for the admin queue and setup.
    /// Sleeps briefly between polls after a short spin.
    pub(crate) fn run(
        &mut self,
        cmd: Command,
        data: Option<DmaData>,
        data_len: usize,
    ) -> Result<(u32, Option<DmaData>), NvmeError>
    where
        T: Default,
    {
        let cid = self
            .submit(cmd, data, data_len, T::default())
            .map_err(|e| e.error)?;
        let mut out = Vec::new();
        let mut spins = 0u32;
        loop {
            if spins > 64 {
                self.poll_checked(&mut out)?;
            } else {
                self.poll(&mut out)?;
            }
            if let Some(i) = out.iter().position(|d| d.cid == cid) {
                let done = out.swap_remove(i);
                return done.result.map(|r| (r, done.data));
            }
            spins += 1;
            if spins > 64 {
                std::thread::sleep(Duration::from_micros(50));
            } else {
                std::hint::spin_loop();
            }
        }
    }
}

/// Orders every store made so far before any later store: the SQ entries and PRP lists before
/// the doorbell (an MMIO write, or a shadow doorbell entry the controller may read at any time).
/// On x86_64 only stores that bypass the store order need it (non-temporal and fast-string
/// stores; ordinary stores to write-back memory are seen in program order, and an uncached MMIO
/// write after them too), so an `sfence` is enough: `mfence` also drains the store buffer for
/// later loads, which a doorbell does not need (QD 1 in the `nvme_emu` bench, BENCHMARKS.md).
/// Elsewhere a full fence.
#[inline(always)]
fn publish_stores() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SFENCE has no operands and no effect but ordering stores; SSE is in x86_64's
    // baseline.
    unsafe {
        core::arch::x86_64::_mm_sfence()
    };
    #[cfg(not(target_arch = "x86_64"))]
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
}

impl<T> Drop for QueuePair<T> {
    /// The drop guard. An I/O queue still on its controller (attached, not deleted, no reset
    /// since) is first deleted there, or the controller is reset if it will not delete it
    /// ([`crate::controller::Shared::release_queue`], blocking admin commands), and its ID is
    /// freed; only then are the rings, the kept list pages and whatever is still in the slots
    /// freed: the device can no longer reach them. If the controller is quarantined (a reset
    /// could not stop its DMA) all of it is leaked instead.
    fn drop(&mut self) {
        if let Some(owner) = self.owner.take() {
            let current = self.is_current();
            owner.release_queue(self.qid, self.generation, current);
        }
        if self.hw.quarantined().is_some() {
            tracing::warn!(
                qid = self.qid,
                "leaking a quarantined queue's rings, lists and in-flight data"
            );
            std::mem::forget(std::mem::take(&mut self.slots));
            std::mem::forget(std::mem::take(&mut self.prp_pages));
            // The rings stay in their ManuallyDrop wrappers: never dropped, never reused.
            return;
        }
        // SAFETY: `sq` and `cq` are dropped exactly once, here, and never used after: this is
        // `drop`, and nothing below touches them.
        unsafe {
            ManuallyDrop::drop(&mut self.sq);
            ManuallyDrop::drop(&mut self.cq);
        }
    }
}

#[cfg(test)]
mod outcome_tests {
    use super::*;

    #[test]
    fn outcomes_give_back_exactly_what_was_packed() {
        assert_eq!(
            Outcome::completed(u32::MAX, Status(0), 0xff)
                .into_result()
                .unwrap(),
            u32::MAX
        );
        // Every status bit (DNR and More included) and the opcode survive the packing.
        let status = Status(0xffff);
        match Outcome::completed(7, status, 0x81).into_result() {
            Err(NvmeError::Command { opcode, status: s }) => {
                assert_eq!((opcode, s), (0x81, status));
            }
            other => panic!("{other:?}"),
        }
        match Outcome::failed(NvmeError::ControllerFatal { csts: 3 }).into_result() {
            Err(NvmeError::ControllerFatal { csts: 3 }) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(std::mem::size_of::<Outcome>(), 16);
    }
}
