//! NVM I/O: namespaces, and the polled I/O queue with both a zero-copy submit/poll API (for
//! benchmarks and engines at any queue depth) and simple blocking `read`/`write` helpers.
//!
//! # Two ways to submit
//! - **Any DMA data**: [`IoQueue::submit_read`] / [`IoQueue::submit_write`] take a
//!   [`DmaData`] by value (a pool [`DmaBuf`] for zero copy, or caller memory bounced or mapped
//!   directly as [`tidepool::data::DmaPolicy::prepare`] chooses), so nobody can touch it while
//!   the device does; [`IoQueue::poll`] hands it back in the [`Done`] with the caller's user
//!   data, to [`DmaData::complete`]. Data of another DMA domain is refused with
//!   [`NvmeError::ForeignBuffer`]. One command each: the data must not exceed
//!   [`Namespace::max_transfer`] (else [`NvmeError::TooLarge`]).
//! - **Caller memory**: [`IoQueue::read`] / [`IoQueue::write`] bounce through pool buffers
//!   taken with the immediate `try_alloc` (a poller never waits), split the request into
//!   commands of at most `max_transfer` bytes (MDTS, and the pool's largest buffer), keep up
//!   to the queue's depth of them in flight, and poll until all are done.
//!
//! - **Scatter/gather in one buffer**: [`IoQueue::submit_read_ranges`] /
//!   [`IoQueue::submit_write_ranges`] move the bytes of several ranges of one pool buffer
//!   (at any byte offset the controller's SGLs allow) as one command; they need SGLs unless
//!   the ranges form one contiguous run.
//!
//! Each queue describes data with PRPs or SGLs ([`IoQueue::data_pointer`]); the controller's
//! [`crate::ControllerConfig::data_pointer`] picks for new queues, and
//! [`IoQueue::set_data_pointer`] switches one queue.
//!
//! Completions of the caller's own zero-copy commands that arrive while a blocking helper
//! polls are kept and returned by the next [`IoQueue::poll`].

use std::collections::VecDeque;
use std::ops::Range;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout};
use vmm_sys_util::eventfd::EventFd;

use tidepool::data::DmaData;
use tidepool::pool::DmaBuf;

use crate::controller::{Controller, DataPointer};
use crate::error::NvmeError;
use crate::queue::{Done, QueuePair, SubmitError};
use crate::spec::{dsm_range_bytes, Command, IdentifyNamespace, IoOpcode};

/// An active namespace's geometry. Plain data: copy it to every task that needs it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    nsid: u32,
    block_bytes: u32,
    blocks: u64,
    max_transfer: usize,
}

impl Namespace {
    /// Builds the geometry from Identify Namespace; `None` if its LBA format is unusable or
    /// its size in bytes (NSZE × block size, device-written) does not fit a `u64`.
    /// `max_transfer` is the most bytes one command may move.
    pub fn from_identify(
        nsid: u32,
        id: &IdentifyNamespace,
        max_transfer: usize,
    ) -> Option<Namespace> {
        let block_bytes = id.block_bytes()?;
        // Checked once here so that `bytes()` never overflows.
        id.nsze.checked_mul(u64::from(block_bytes))?;
        let max_transfer = max_transfer / block_bytes as usize * block_bytes as usize;
        (max_transfer > 0).then_some(Namespace {
            nsid,
            block_bytes,
            blocks: id.nsze,
            max_transfer,
        })
    }

    /// The namespace ID.
    pub fn nsid(&self) -> u32 {
        self.nsid
    }

    /// Bytes per logical block (a power of two).
    pub fn block_bytes(&self) -> u32 {
        self.block_bytes
    }

    /// The block holding byte `offset` of the namespace, and whether `offset` is where it
    /// starts: a shift, not a division.
    pub fn block_of(&self, offset: u64) -> (u64, bool) {
        let shift = self.block_bytes.trailing_zeros();
        (
            offset >> shift,
            offset & (u64::from(self.block_bytes) - 1) == 0,
        )
    }

    /// Size in logical blocks.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Size in bytes (cannot overflow: [`Namespace::from_identify`] refuses such sizes).
    pub fn bytes(&self) -> u64 {
        self.blocks.saturating_mul(u64::from(self.block_bytes))
    }

    /// The most bytes one command may move (a whole number of blocks).
    pub fn max_transfer(&self) -> usize {
        self.max_transfer
    }

    /// Checks that `len` bytes at `lba` are whole blocks inside the namespace; returns the
    /// block count.
    #[inline]
    pub fn check(&self, lba: u64, len: usize) -> Result<u64, NvmeError> {
        let block = self.block_bytes;
        // Block sizes are powers of two (2^LBADS): masks and shifts, not divisions, on the
        // I/O path.
        if len == 0 || len & (block as usize - 1) != 0 {
            return Err(NvmeError::NotBlockMultiple { len, block });
        }
        let blocks = (len >> block.trailing_zeros()) as u64;
        self.check_blocks(lba, blocks)?;
        Ok(blocks)
    }

    /// Checks that `blocks` blocks at `lba` lie inside the namespace.
    pub fn check_blocks(&self, lba: u64, blocks: u64) -> Result<(), NvmeError> {
        match lba.checked_add(blocks) {
            Some(end) if end <= self.blocks && blocks > 0 => Ok(()),
            end => Err(NvmeError::LbaOutOfRange {
                nsid: self.nsid,
                lba,
                end: end.unwrap_or(u64::MAX),
                capacity: self.blocks,
            }),
        }
    }

    /// A read or write command for one transfer of `len` bytes at `lba`, checked.
    #[inline]
    pub(crate) fn rw_command(
        &self,
        opcode: IoOpcode,
        lba: u64,
        len: usize,
    ) -> Result<Command, NvmeError> {
        if len > self.max_transfer {
            return Err(NvmeError::TooLarge {
                len,
                max: self.max_transfer,
            });
        }
        let blocks = self.check(lba, len)?;
        Ok(Command::read_write(opcode, self.nsid, lba, blocks as u32))
    }
}

/// What the queue's own blocking helpers tag their commands with.
#[derive(Debug)]
pub(crate) enum Tag<T> {
    /// A caller's command: their user data.
    User(T),
    /// A blocking helper's chunk: its byte offset in the caller's buffer.
    Chunk { offset: usize },
}

/// A polled I/O queue pair. Owned by one thread (`&mut self`); pin that thread and call
/// [`IoQueue::poll`] in a loop for the lowest latency.
///
/// Dropping it deletes the queue on the controller (blocking admin commands); outstanding
/// commands are aborted and their buffers freed once the controller confirmed.
#[derive(Debug)]
pub struct IoQueue<T> {
    ctrl: Controller,
    qp: Option<QueuePair<Tag<T>>>,
    /// User completions seen by a blocking helper, for the next `poll`.
    stash: VecDeque<Done<T>>,
    /// The CQ's MSI-X eventfd, for a queue made by [`Controller::create_interrupt_io_queue`].
    interrupt: Option<EventFd>,
}

impl<T> IoQueue<T> {
    pub(crate) fn new(ctrl: Controller, qp: QueuePair<Tag<T>>) -> IoQueue<T> {
        IoQueue {
            ctrl,
            qp: Some(qp),
            stash: VecDeque::new(),
            interrupt: None,
        }
    }

    /// A queue whose CQ raises the MSI-X vector behind `interrupt`.
    pub(crate) fn with_interrupt(
        ctrl: Controller,
        qp: QueuePair<Tag<T>>,
        interrupt: EventFd,
    ) -> IoQueue<T> {
        let mut queue = IoQueue::new(ctrl, qp);
        queue.interrupt = Some(interrupt);
        queue
    }

    /// Whether the CQ raises an interrupt ([`Controller::create_interrupt_io_queue`]).
    pub fn has_interrupt(&self) -> bool {
        self.interrupt.is_some()
    }

    /// Sleeps until the queue's MSI-X vector fires or `timeout` passes; `true` if it fired.
    /// Publishes deferred submissions first. Reaping stays [`IoQueue::poll`]'s: poll, and when
    /// that found too little, wait, then poll again. No completion is missed between the two:
    /// an interrupt raised after the poll stays counted in the eventfd until this wait
    /// consumes it (at worst one wake-up finds nothing new). Call [`IoQueue::poll_checked`]
    /// after a wait that timed out, so a device that never interrupts is still caught by the
    /// command timeout. [`NvmeError::Unsupported`] on a polled queue.
    pub fn wait_interrupt(&mut self, timeout: Duration) -> Result<bool, NvmeError> {
        self.qp().ring_sq()?;
        let Some(fd) = &self.interrupt else {
            return Err(NvmeError::Unsupported(
                "wait_interrupt on a polled queue: create it with create_interrupt_io_queue".into(),
            ));
        };
        let ms = u16::try_from(timeout.as_millis().max(1)).unwrap_or(u16::MAX);
        // SAFETY: the descriptor is owned by `self.interrupt`, which outlives this borrow (it
        // ends with this function, and the field is not changed meanwhile).
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) };
        let mut fds = [PollFd::new(borrowed, PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => Ok(false),
            Ok(_) => {
                // Readable: the read returns at once and resets the counter to 0.
                fd.read().map_err(|source| NvmeError::Os {
                    what: "reading the queue's MSI-X eventfd",
                    source,
                })?;
                Ok(true)
            }
            Err(errno) => Err(NvmeError::Os {
                what: "waiting on the queue's MSI-X eventfd",
                source: std::io::Error::from(errno),
            }),
        }
    }

    fn qp(&mut self) -> &mut QueuePair<Tag<T>> {
        self.qp.as_mut().expect("queue present until drop")
    }

    /// The queue ID.
    pub fn qid(&self) -> u16 {
        self.qp.as_ref().map_or(0, QueuePair::qid)
    }

    /// Commands that may be outstanding at once.
    pub fn depth(&self) -> u16 {
        self.qp.as_ref().map_or(0, QueuePair::depth)
    }

    /// Commands outstanding now.
    pub fn outstanding(&self) -> usize {
        self.qp.as_ref().map_or(0, QueuePair::outstanding)
    }

    /// Batch submissions: with `true`, `submit_*` only queue commands and the SQ doorbell is
    /// rung once by the next [`IoQueue::poll`] or [`IoQueue::ring_doorbell`] (what a QD>1
    /// engine wants: one MMIO write per batch). The blocking helpers work either way.
    pub fn defer_doorbells(&mut self, defer: bool) {
        self.qp().set_defer_doorbell(defer);
    }

    /// How this queue describes data now: [`DataPointer::Prp`] or [`DataPointer::Sgl`].
    pub fn data_pointer(&self) -> DataPointer {
        match self.qp.as_ref().is_some_and(QueuePair::uses_sgl) {
            true => DataPointer::Sgl,
            false => DataPointer::Prp,
        }
    }

    /// Switches how later commands describe their data (`Auto`: SGLs if the controller
    /// supports them), returning the resolved choice. Commands in flight are unaffected.
    /// [`crate::sgl::SglError::Unsupported`] if SGLs are demanded and the controller has none.
    pub fn set_data_pointer(&mut self, choice: DataPointer) -> Result<DataPointer, NvmeError> {
        let support = self.ctrl.sgl_support();
        let resolved = choice.resolve(support)?;
        self.qp()
            .set_sgl((resolved == DataPointer::Sgl).then_some(support));
        Ok(resolved)
    }

    /// Doorbell counters (register writes made and, with shadow doorbells, avoided) and
    /// fault-injection counters.
    pub fn counters(&self) -> crate::QueueCounters {
        self.qp
            .as_ref()
            .map_or_else(Default::default, QueuePair::counters)
    }

    /// Fault injection (feature `fault-injection`): the next `n` completions are consumed
    /// but never delivered, as if the device had lost them. Their commands stay outstanding
    /// until the command timeout resets the controller and fails them.
    #[cfg(feature = "fault-injection")]
    pub fn drop_next_completions(&mut self, n: u32) {
        self.qp().drop_next_completions(n);
    }

    /// [`IoQueue::poll`] plus the health check now (clock, CSTS.CFS, command timeouts),
    /// which `poll` does only every [`crate::queue::SCAN_EVERY`] polls: call it from a
    /// loop that polls rarely, so timeouts are still noticed.
    pub fn poll_checked(&mut self, out: &mut Vec<Done<T>>) -> Result<usize, NvmeError> {
        self.poll_with(out, true)
    }

    /// Publishes deferred submissions now.
    pub fn ring_doorbell(&mut self) -> Result<(), NvmeError> {
        self.qp().ring_sq()
    }

    /// The controller.
    pub fn controller(&self) -> &Controller {
        &self.ctrl
    }

    /// Submits a read of `data.len()` bytes at `lba` into `data` (a [`DmaBuf`] converts:
    /// zero copy). Returns the command ID; the data comes back with `user` from
    /// [`IoQueue::poll`].
    #[inline]
    pub fn submit_read(
        &mut self,
        ns: &Namespace,
        lba: u64,
        data: impl Into<DmaData>,
        user: T,
    ) -> Result<u16, SubmitError<T>> {
        self.submit_rw(ns, IoOpcode::Read, lba, data.into(), user)
    }

    /// Submits a write of `data.len()` bytes from `data` at `lba`.
    #[inline]
    pub fn submit_write(
        &mut self,
        ns: &Namespace,
        lba: u64,
        data: impl Into<DmaData>,
        user: T,
    ) -> Result<u16, SubmitError<T>> {
        self.submit_rw(ns, IoOpcode::Write, lba, data.into(), user)
    }

    /// Submits a read of `lba..` into the byte `ranges` of `buf`, in order (scatter): the
    /// ranges' total must be whole blocks and at most [`Namespace::max_transfer`]. With SGLs
    /// every range is a Data Block descriptor (byte offsets allowed unless the controller wants
    /// dword alignment); with PRPs the ranges must join into one contiguous 4-byte-aligned run.
    /// The buffer comes back with `user` from [`IoQueue::poll`].
    ///
    /// ```no_run
    /// # use tidepool_nvme::{Controller, ControllerConfig, DataPointer};
    /// # let ctrl = Controller::open("0000:00:04.0", ControllerConfig::default())?;
    /// # let ns = ctrl.namespace(1)?;
    /// let mut q = ctrl.create_io_queue::<()>(8)?;
    /// q.set_data_pointer(DataPointer::Sgl)?;
    /// let buf = ctrl.pool().try_alloc(8192)?;
    /// // One 4 KiB block, landing as two halves at odd offsets of the buffer.
    /// q.submit_read_ranges(&ns, 0, buf, &[3..2051, 5001..7049], ()).map_err(|e| e.error)?;
    /// # Ok::<(), tidepool_nvme::NvmeError>(())
    /// ```
    pub fn submit_read_ranges(
        &mut self,
        ns: &Namespace,
        lba: u64,
        buf: impl Into<DmaData>,
        ranges: &[Range<usize>],
        user: T,
    ) -> Result<u16, SubmitError<T>> {
        self.submit_rw_ranges(ns, IoOpcode::Read, lba, buf.into(), ranges, user)
    }

    /// Submits a write at `lba` of the byte `ranges` of `buf`, in order (gather); see
    /// [`IoQueue::submit_read_ranges`].
    pub fn submit_write_ranges(
        &mut self,
        ns: &Namespace,
        lba: u64,
        buf: impl Into<DmaData>,
        ranges: &[Range<usize>],
        user: T,
    ) -> Result<u16, SubmitError<T>> {
        self.submit_rw_ranges(ns, IoOpcode::Write, lba, buf.into(), ranges, user)
    }

    fn submit_rw_ranges(
        &mut self,
        ns: &Namespace,
        op: IoOpcode,
        lba: u64,
        buf: DmaData,
        ranges: &[Range<usize>],
        user: T,
    ) -> Result<u16, SubmitError<T>> {
        let cmd = crate::sgl::check_ranges(ranges, buf.capacity())
            .map_err(NvmeError::from)
            .and_then(|len| ns.rw_command(op, lba, len));
        match cmd {
            Ok(cmd) => self
                .qp()
                .submit_ranges(cmd, buf, ranges, Tag::User(user))
                .map_err(untag),
            Err(error) => Err(SubmitError {
                error,
                user,
                data: Some(buf),
            }),
        }
    }

    #[inline]
    fn submit_rw(
        &mut self,
        ns: &Namespace,
        op: IoOpcode,
        lba: u64,
        buf: DmaData,
        user: T,
    ) -> Result<u16, SubmitError<T>> {
        let len = buf.len();
        match ns.rw_command(op, lba, len) {
            Ok(cmd) => self.submit_tagged(cmd, Some(buf), len, user),
            Err(error) => Err(SubmitError {
                error,
                user,
                data: Some(buf),
            }),
        }
    }

    /// Submits Flush.
    pub fn submit_flush(&mut self, ns: &Namespace, user: T) -> Result<u16, SubmitError<T>> {
        self.submit_tagged(Command::io(IoOpcode::Flush, ns.nsid()), None, 0, user)
    }

    /// Submits Write Zeroes of `blocks` (1..=65536) at `lba`.
    pub fn submit_write_zeroes(
        &mut self,
        ns: &Namespace,
        lba: u64,
        blocks: u32,
        user: T,
    ) -> Result<u16, SubmitError<T>> {
        if let Err(error) = check_nlb(ns, lba, blocks) {
            return Err(SubmitError {
                error,
                user,
                data: None,
            });
        }
        self.submit_tagged(Command::write_zeroes(ns.nsid(), lba, blocks), None, 0, user)
    }

    /// Submits Dataset Management / deallocate (TRIM) of `blocks` at `lba`.
    pub fn submit_deallocate(
        &mut self,
        ns: &Namespace,
        lba: u64,
        blocks: u32,
        user: T,
    ) -> Result<u16, SubmitError<T>> {
        let range = ns.check_blocks(lba, u64::from(blocks)).and_then(|()| {
            Ok(self
                .ctrl
                .pool()
                .try_alloc_from(&dsm_range_bytes(lba, blocks))?)
        });
        match range {
            Ok(b) => {
                let cmd = Command::deallocate(ns.nsid(), 1, 0);
                self.submit_tagged(cmd, Some(b.into()), 16, user)
            }
            Err(error) => Err(SubmitError {
                error,
                user,
                data: None,
            }),
        }
    }

    #[inline]
    fn submit_tagged(
        &mut self,
        cmd: Command,
        data: Option<DmaData>,
        data_len: usize,
        user: T,
    ) -> Result<u16, SubmitError<T>> {
        self.qp()
            .submit(cmd, data, data_len, Tag::User(user))
            .map_err(untag)
    }

    /// Moves finished commands into `out` (appending); returns how many. Never blocks. An
    /// error means the controller was reset (see [`QueuePair::poll`]); the failed commands are
    /// in `out` all the same.
    #[inline]
    pub fn poll(&mut self, out: &mut Vec<Done<T>>) -> Result<usize, NvmeError> {
        self.poll_with(out, false)
    }

    fn poll_with(&mut self, out: &mut Vec<Done<T>>, check: bool) -> Result<usize, NvmeError> {
        let before = out.len();
        if !self.stash.is_empty() {
            out.extend(self.stash.drain(..));
        }
        let qp = self.qp.as_mut().expect("queue present until drop");
        // A blocking helper's chunk can only be here if the helper returned early (its error
        // went to its caller): its buffer is the device's no more and just goes back.
        let r = qp.poll_each(check, &mut |cid, tag, data, outcome| {
            if let Tag::User(user) = tag {
                crate::queue::push_with(out, || Done {
                    cid,
                    user,
                    data,
                    result: outcome.into_result(),
                });
            }
        });
        r.map(|_| out.len() - before)
    }

    /// Reads `dst.len()` bytes at `lba` into `dst`, blocking (polling) until done. Splits into
    /// commands of at most [`Namespace::max_transfer`] and bounces through the pool.
    pub fn read(&mut self, ns: &Namespace, lba: u64, dst: &mut [u8]) -> Result<(), NvmeError> {
        ns.check(lba, dst.len())?;
        self.blocking(ns, IoOpcode::Read, lba, dst.len(), None, |off, buf| {
            buf.read_at(0, &mut dst[off..off + buf.len()])
        })
    }

    /// Writes `src` at `lba`, blocking (polling) until done; splits like [`IoQueue::read`].
    pub fn write(&mut self, ns: &Namespace, lba: u64, src: &[u8]) -> Result<(), NvmeError> {
        ns.check(lba, src.len())?;
        self.blocking(
            ns,
            IoOpcode::Write,
            lba,
            src.len(),
            Some(src),
            |_, _| Ok(()),
        )
    }

    /// Flushes the namespace's volatile write cache, blocking.
    pub fn flush(&mut self, ns: &Namespace) -> Result<(), NvmeError> {
        let cmd = Command::io(IoOpcode::Flush, ns.nsid());
        self.run_one(cmd, None, 0)
    }

    /// Writes zeroes over `blocks` blocks at `lba`, blocking (split at 65536 blocks).
    pub fn write_zeroes(&mut self, ns: &Namespace, lba: u64, blocks: u64) -> Result<(), NvmeError> {
        ns.check_blocks(lba, blocks)?;
        let mut done = 0;
        while done < blocks {
            let n = (blocks - done).min(1 << 16) as u32;
            self.run_one(Command::write_zeroes(ns.nsid(), lba + done, n), None, 0)?;
            done += u64::from(n);
        }
        Ok(())
    }

    /// Deallocates (TRIMs) `blocks` blocks at `lba`, blocking (one range per 2^32 - 1 blocks).
    pub fn deallocate(&mut self, ns: &Namespace, lba: u64, blocks: u64) -> Result<(), NvmeError> {
        ns.check_blocks(lba, blocks)?;
        let mut done = 0;
        while done < blocks {
            let n = (blocks - done).min(u64::from(u32::MAX)) as u32;
            let b = self
                .ctrl
                .pool()
                .try_alloc_from(&dsm_range_bytes(lba + done, n))?;
            self.run_one(Command::deallocate(ns.nsid(), 1, 0), Some(b.into()), 16)?;
            done += u64::from(n);
        }
        Ok(())
    }

    /// Runs one internal command to completion.
    fn run_one(
        &mut self,
        cmd: Command,
        data: Option<DmaData>,
        len: usize,
    ) -> Result<(), NvmeError> {
        let cid = self
            .qp()
            .submit(cmd, data, len, Tag::Chunk { offset: 0 })
            .map_err(|e| e.error)?;
        loop {
            let mut done = self.poll_internal()?;
            if let Some(i) = done.iter().position(|d| d.cid == cid) {
                return done.swap_remove(i).result.map(|_| ());
            }
        }
    }

    /// The blocking split/bounce engine: a write's chunks are taken from the pool already
    /// filled from `src` (one pass: the pool's `try_alloc_from`), a read's zeroed;
    /// `drain(offset, buf)` consumes a read's chunk after it completed.
    fn blocking(
        &mut self,
        ns: &Namespace,
        op: IoOpcode,
        lba: u64,
        len: usize,
        src: Option<&[u8]>,
        mut drain: impl FnMut(usize, &DmaBuf) -> Result<(), tidepool::pool::PoolError>,
    ) -> Result<(), NvmeError> {
        let chunk = ns.max_transfer();
        let block = ns.block_bytes() as usize;
        let mut next = 0usize;
        let mut in_flight = 0usize;
        let mut first_error = None;
        while next < len || in_flight > 0 {
            // Keep the queue as full as the pool and the queue allow.
            while next < len
                && first_error.is_none()
                && self.qp().outstanding() < usize::from(self.depth())
            {
                let n = chunk.min(len - next);
                let pool = self.ctrl.pool();
                let chunk_buf = match src {
                    Some(src) => pool.try_alloc_from(&src[next..next + n]),
                    None => pool.try_alloc(n),
                };
                let submitted = chunk_buf.map_err(NvmeError::from).and_then(|buf| {
                    let cmd = ns.rw_command(op, lba + (next / block) as u64, n)?;
                    self.qp()
                        .submit(cmd, Some(buf.into()), n, Tag::Chunk { offset: next })
                        .map_err(|e| e.error)
                });
                match submitted {
                    Ok(_) => {
                        in_flight += 1;
                        next += n;
                    }
                    // Pool momentarily empty with our own commands in flight: reap first.
                    Err(NvmeError::Pool(_)) if in_flight > 0 => break,
                    Err(e) => {
                        first_error = Some(e);
                        break;
                    }
                }
            }
            if in_flight == 0 {
                break;
            }
            for d in self.poll_internal()? {
                in_flight -= 1;
                let (Tag::Chunk { offset }, Some(buf)) =
                    (d.user, d.data.and_then(DmaData::into_buf))
                else {
                    continue;
                };
                match d.result {
                    Ok(_) => {
                        if let Err(e) = drain(offset, &buf) {
                            first_error.get_or_insert(e.into());
                        }
                    }
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Polls once, stashing user completions, returning the helper's own.
    fn poll_internal(&mut self) -> Result<Vec<Done<Tag<T>>>, NvmeError> {
        let qp = self.qp.as_mut().expect("queue present until drop");
        let stash = &mut self.stash;
        let mut own = Vec::new();
        let r = qp.poll_each(false, &mut |cid, tag, data, outcome| match tag {
            Tag::User(user) => stash.push_back(Done {
                cid,
                user,
                data,
                result: outcome.into_result(),
            }),
            Tag::Chunk { offset } => own.push(Done {
                cid,
                user: Tag::Chunk { offset },
                data,
                result: outcome.into_result(),
            }),
        });
        match r {
            Ok(_) => Ok(own),
            // Our chunks were failed into `own`; the caller sees the cause.
            Err(e) if own.is_empty() => Err(e),
            Err(_) => Ok(own),
        }
    }
}

fn untag<T>(e: SubmitError<Tag<T>>) -> SubmitError<T> {
    SubmitError {
        error: e.error,
        user: match e.user {
            Tag::User(u) => u,
            Tag::Chunk { .. } => unreachable!("submitted as a user command"),
        },
        data: e.data,
    }
}

/// Checks a Write Zeroes range: 1..=65536 blocks inside the namespace.
fn check_nlb(ns: &Namespace, lba: u64, blocks: u32) -> Result<(), NvmeError> {
    if blocks == 0 || blocks > 1 << 16 {
        return Err(NvmeError::TooLarge {
            len: blocks as usize * ns.block_bytes() as usize,
            max: (1 << 16) * ns.block_bytes() as usize,
        });
    }
    ns.check_blocks(lba, u64::from(blocks))
}

impl<T> Drop for IoQueue<T> {
    fn drop(&mut self) {
        if let Some(qp) = self.qp.take() {
            self.ctrl.delete_queue_pair(qp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns() -> Namespace {
        Namespace {
            nsid: 1,
            block_bytes: 512,
            blocks: 1000,
            max_transfer: 128 << 10,
        }
    }

    #[test]
    fn namespace_checks_range_and_block_multiples() {
        let ns = ns();
        assert_eq!(ns.check(0, 4096).unwrap(), 8);
        assert!(matches!(
            ns.check(0, 100),
            Err(NvmeError::NotBlockMultiple {
                len: 100,
                block: 512
            })
        ));
        assert!(matches!(
            ns.check(0, 0),
            Err(NvmeError::NotBlockMultiple { .. })
        ));
        assert!(matches!(
            ns.check(999, 1024),
            Err(NvmeError::LbaOutOfRange {
                lba: 999,
                end: 1001,
                ..
            })
        ));
        assert!(ns.check(999, 512).is_ok());
        assert!(matches!(
            ns.check(u64::MAX, 512),
            Err(NvmeError::LbaOutOfRange { .. })
        ));
        assert!(matches!(
            ns.rw_command(IoOpcode::Read, 0, 256 << 10),
            Err(NvmeError::TooLarge { .. })
        ));
        let c = ns.rw_command(IoOpcode::Write, 10, 2048).unwrap();
        assert_eq!((c.opcode, c.cdw10, c.cdw12), (0x01, 10, 3));
        assert_eq!(ns.block_of(0), (0, true));
        assert_eq!(ns.block_of(5 * 512), (5, true));
        assert_eq!(ns.block_of(5 * 512 + 1), (5, false));
        assert_eq!(ns.block_of(u64::MAX), (u64::MAX >> 9, false));
    }

    #[test]
    fn a_namespace_whose_size_in_bytes_overflows_is_refused() {
        // A forged Identify Namespace: NSZE = u64::MAX blocks of 4 KiB.
        let mut p = vec![0u8; 4096];
        p[0..8].copy_from_slice(&u64::MAX.to_le_bytes());
        p[128..132].copy_from_slice(&(12u32 << 16).to_le_bytes());
        let id = IdentifyNamespace::parse(&p);
        assert!(Namespace::from_identify(1, &id, 1 << 20).is_none());
        // The largest size that fits is accepted, and its byte size is exact.
        p[0..8].copy_from_slice(&(u64::MAX >> 12).to_le_bytes());
        let id = IdentifyNamespace::parse(&p);
        let ns = Namespace::from_identify(1, &id, 1 << 20).unwrap();
        assert_eq!(ns.bytes(), (u64::MAX >> 12) << 12);
    }

    #[test]
    fn namespace_from_identify_rounds_max_transfer_to_blocks() {
        let mut p = vec![0u8; 4096];
        p[0..8].copy_from_slice(&100u64.to_le_bytes());
        p[128..132].copy_from_slice(&(12u32 << 16).to_le_bytes());
        let id = IdentifyNamespace::parse(&p);
        let ns = Namespace::from_identify(1, &id, 10_000).unwrap();
        assert_eq!(ns.max_transfer(), 8192);
        assert!(Namespace::from_identify(1, &id, 100).is_none());
    }
}
