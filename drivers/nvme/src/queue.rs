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
//! - **Slots**: command ID `c` (0..depth) is slot `c`. A slot holds what must outlive the
//!   command: the caller's user data, the data buffer (so no one can touch or free memory the
//!   device is using) and the PRP list. Free IDs are a stack (LIFO: a recently used slot is
//!   warm in cache).
//!
//! # Failure handling (and why buffers are never freed under a live device)
//! A command outstanding longer than the timeout, CSTS.CFS, or a completion entry that breaks
//! the protocol make the queue reset the controller ([`Hw::reset`]): bus mastering is switched
//! off first (from then on the device cannot touch memory), then CC.EN is cleared. Only then
//! are the outstanding commands failed with [`NvmeError::ControllerReset`] and their buffers
//! handed back. Other queues of the same controller notice the reset through the controller's
//! generation counter on their next `poll`/`submit` and fail their own commands the same way.
//!
//! # Locking
//! None inside: a `QueuePair` is owned by one thread (`&mut self`); the async queue puts it in a
//! mutex. Doorbell writes go straight to the BAR; they are per-queue registers.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidepool::pool::DmaBuf;

use crate::completion::{validate, CompletionRing, Expected};
use crate::controller::Hw;
use crate::error::NvmeError;
use crate::prp::Prp;
use crate::spec::{Command, SQ_ENTRY_BYTES};

/// A poll that reaps something reads the clock for the timeout scan only every this many
/// polls (a poll that finds nothing always does): keeps the hot path off the clock.
const SCAN_EVERY: u32 = 64;

/// A command that finished (or was failed), with what the caller handed in.
#[derive(Debug)]
pub struct Done<T> {
    /// The command ID it ran under (free again now).
    pub cid: u16,
    /// The caller's data, as given to `submit`.
    pub user: T,
    /// The data buffer, given back.
    pub data: Option<DmaBuf>,
    /// DW0 of the completion on success, or why it failed.
    pub result: Result<u32, NvmeError>,
}

/// A submission that was refused, giving the caller's things back.
#[derive(Debug)]
pub struct SubmitError<T> {
    /// Why.
    pub error: NvmeError,
    /// The user data.
    pub user: T,
    /// The data buffer.
    pub data: Option<DmaBuf>,
}

/// What a slot keeps while its command is in flight.
#[derive(Debug)]
struct Inflight<T> {
    user: T,
    opcode: u8,
    data: Option<DmaBuf>,
    _prp_list: Option<DmaBuf>,
    since: Instant,
}

/// One SQ/CQ pair (admin queue 0 or an I/O queue), polled by its owner.
#[derive(Debug)]
pub struct QueuePair<T> {
    hw: Arc<Hw>,
    /// The controller generation this queue belongs to; a reset bumps the controller's.
    generation: u64,
    qid: u16,
    sq: DmaBuf,
    sq_entries: u16,
    sq_tail: u16,
    sq_head: u16,
    cq: CompletionRing,
    sq_doorbell: usize,
    cq_doorbell: usize,
    slots: Vec<Option<Inflight<T>>>,
    free: Vec<u16>,
    timeout: Duration,
    last_scan: Instant,
    /// Polls since the last clock read (the clock is read every `SCAN_EVERY` polls, or when a
    /// poll finds nothing).
    polls_since_scan: u32,
    /// Hold SQ tail doorbells until `ring_sq` or the next `poll` (batching).
    defer_doorbell: bool,
    /// The SQ tail was advanced but not yet rung.
    sq_unrung: bool,
    /// Set once the queue can no longer be used.
    dead: Option<&'static str>,
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
        Ok(QueuePair {
            generation: hw.generation(),
            sq_doorbell: hw.regs.doorbell_offset(qid, false),
            cq_doorbell: hw.regs.doorbell_offset(qid, true),
            hw,
            qid,
            sq,
            sq_entries: entries,
            sq_tail: 0,
            sq_head: 0,
            cq,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth).rev().collect(),
            timeout,
            last_scan: Instant::now(),
            polls_since_scan: 0,
            defer_doorbell: false,
            sq_unrung: false,
            dead: None,
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

    /// Device address of the SQ ring.
    pub(crate) fn sq_addr(&self) -> u64 {
        self.sq.device_addr().0
    }

    /// Device address of the CQ ring.
    pub(crate) fn cq_addr(&self) -> u64 {
        self.cq.device_addr()
    }

    /// Marks the queue unusable (deleted); later submits fail with [`NvmeError::QueueGone`].
    pub(crate) fn mark_dead(&mut self, why: &'static str) {
        self.dead = Some(why);
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
        mut cmd: Command,
        data: Option<DmaBuf>,
        data_len: usize,
        user: T,
    ) -> Result<u16, SubmitError<T>> {
        let refuse = |error, user, data| Err(SubmitError { error, user, data });
        if let Some(why) = self.dead {
            return refuse(NvmeError::QueueGone { qid: self.qid, why }, user, data);
        }
        if self.generation != self.hw.generation() {
            let error = NvmeError::ControllerReset {
                reason: self.hw.reset_reason(),
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
        let mut prp_list = None;
        if let Some(buf) = &data {
            let len = data_len.min(buf.capacity());
            let pool = &self.hw.pool;
            match Prp::build(buf.device_addr().0, len, |n| pool.try_alloc(n)) {
                Ok(prp) => {
                    cmd.prp1 = prp.prp1;
                    cmd.prp2 = prp.prp2;
                    prp_list = prp.list;
                }
                Err(e) => return refuse(e.into(), user, data),
            }
        }
        cmd.cid = cid;
        let at = usize::from(self.sq_tail) * SQ_ENTRY_BYTES;
        if let Err(e) = self.sq.write_at(at, &cmd.to_bytes()) {
            return refuse(e.into(), user, data);
        }
        self.free.pop();
        self.slots[usize::from(cid)] = Some(Inflight {
            user,
            opcode: cmd.opcode,
            data,
            _prp_list: prp_list,
            since: Instant::now(),
        });
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
        // The entries (and PRP lists) must be visible before the doorbell; SeqCst is a full
        // fence, which also orders any non-temporal stores the copy routine used.
        fence(Ordering::SeqCst);
        self.hw.regs.ring(self.sq_doorbell, self.sq_tail)?;
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
        if self.generation != self.hw.generation() {
            return Err(self.fail_all_after_reset(out));
        }
        self.ring_sq()?;
        let before = out.len();
        let mut bad = None;
        let mut moved = false;
        while let Some(posted) = self.cq.take_posted() {
            moved = true;
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
                slots[usize::from(cid)].is_some()
            }) {
                Ok(c) => {
                    self.sq_head = c.sq_head;
                    let Some(inflight) = self.slots[usize::from(c.cid)].take() else {
                        unreachable!("validate checked the slot is outstanding")
                    };
                    self.free.push(c.cid);
                    let result = if c.status.is_success() {
                        Ok(c.result)
                    } else {
                        Err(NvmeError::Command {
                            opcode: inflight.opcode,
                            status: c.status,
                        })
                    };
                    out.push(Done {
                        cid: c.cid,
                        user: inflight.user,
                        data: inflight.data,
                        result,
                    });
                }
                Err(e) => {
                    bad.get_or_insert(e);
                }
            }
        }
        if moved {
            self.hw.regs.ring(self.cq_doorbell, self.cq.head())?;
        }
        if let Some(e) = bad {
            self.hw
                .reset(self.generation, format!("queue {}: {e}", self.qid));
            self.fail_all_after_reset(out);
            return Err(NvmeError::BadCompletion(e));
        }
        let reaped = out.len() - before;
        self.polls_since_scan += 1;
        if self.outstanding() > 0 && (reaped == 0 || self.polls_since_scan >= SCAN_EVERY) {
            self.polls_since_scan = 0;
            self.scan(out)?;
        }
        Ok(reaped)
    }

    /// The periodic health check: CSTS.CFS and the oldest command's age.
    fn scan(&mut self, out: &mut Vec<Done<T>>) -> Result<(), NvmeError> {
        let now = Instant::now();
        if now.duration_since(self.last_scan) < (self.timeout / 4).max(Duration::from_millis(1)) {
            return Ok(());
        }
        self.last_scan = now;
        let csts = self.hw.regs.csts()?;
        if csts.fatal() {
            self.hw.reset(
                self.generation,
                format!("CSTS.CFS set (CSTS = {:#x})", csts.0),
            );
            self.fail_all_after_reset(out);
            return Err(NvmeError::ControllerFatal { csts: csts.0 });
        }
        let oldest = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(cid, s)| s.as_ref().map(|s| (cid as u16, s.opcode, s.since)))
            .min_by_key(|&(_, _, since)| since);
        if let Some((cid, opcode, since)) = oldest {
            if now.duration_since(since) > self.timeout {
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
    /// mastering off), so handing the buffers back is safe. Marks the queue dead.
    fn fail_all_after_reset(&mut self, out: &mut Vec<Done<T>>) -> NvmeError {
        let reason = self.hw.reset_reason();
        for (cid, slot) in self.slots.iter_mut().enumerate() {
            if let Some(i) = slot.take() {
                self.free.push(cid as u16);
                let result = Err(NvmeError::ControllerReset {
                    reason: reason.clone(),
                });
                out.push(Done {
                    cid: cid as u16,
                    user: i.user,
                    data: i.data,
                    result,
                });
            }
        }
        self.dead = Some("the controller was reset");
        NvmeError::ControllerReset { reason }
    }

    /// Submits `cmd` and polls until it completes or fails: for the admin queue and setup.
    /// Sleeps briefly between polls after a short spin.
    pub(crate) fn run(
        &mut self,
        cmd: Command,
        data: Option<DmaBuf>,
        data_len: usize,
    ) -> Result<(u32, Option<DmaBuf>), NvmeError>
    where
        T: Default,
    {
        let cid = self
            .submit(cmd, data, data_len, T::default())
            .map_err(|e| e.error)?;
        let mut out = Vec::new();
        let mut spins = 0u32;
        loop {
            self.poll(&mut out)?;
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
