//! [`SlotRing`]: an io_uring whose requests read into and write from buffers the ring itself
//! owns (one slot each), with a safe interface. tpio's `ioengine=io_uring` is built on it.
//!
//! # Set up as fio's io_uring engine sets up its ring
//! fio 3.33 creates its ring with `IORING_SETUP_CQSIZE` (CQ as deep as the job),
//! `IORING_SETUP_COOP_TASKRUN` and `IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN`,
//! dropping them in that order when the kernel refuses one (`EINVAL`, older kernels), and passes
//! `IORING_ENTER_GETEVENTS` on every `io_uring_enter`, submissions included. [`SlotRing`] does the
//! same. It matters on a CPU-bound device: without `DEFER_TASKRUN` or `COOP_TASKRUN` every
//! completion is task work queued with `TWA_SIGNAL`, which interrupts the submitting thread with
//! an IPI when it is running (a VM exit on both sides in a guest); with them the completions
//! wait in the ring's own list and are posted in one go by the next `io_uring_enter` that asks
//! for events, which also means a submission finds the completions that arrived meanwhile.
//! Registered buffers (`READ_FIXED`/`WRITE_FIXED`) and a registered file are fio's
//! `fixedbufs` and `registerfiles`, off by default there; [`RingOptions`] chooses them here.
//!
//! `DEFER_TASKRUN` binds the ring to the thread that created it: only that thread may enter it
//! (the kernel answers `EEXIST` to others). tpio creates, drives and closes a ring on its
//! clone's thread.
//!
//! # Why this module has `unsafe`, and why its interface is safe
//! The kernel reads and writes a request's buffer asynchronously, after `push` returned, so the
//! `io-uring` crate marks buffer registration and entry submission `unsafe`: the caller must
//! keep the memory alive and untouched until the request completes. This type keeps that
//! promise itself, so nothing outside it needs `unsafe`:
//! - the buffers are its own [`SlotRegion`], registered once (when registered) and unmapped only
//!   after the ring (field order), and the ring is dropped only after every request completed
//!   ([`Drop`] waits for them);
//! - a slot is marked in flight from [`SlotRing::push`] until its completion is reaped, and
//!   [`SlotRing::fill`] and [`SlotRing::read`] refuse a slot in flight, as does `push`;
//! - entries name only the ring's own slots, within their length.
//!
//! If waiting fails at drop (the kernel refused `io_uring_enter`), the ring's file is closed
//! anyway; the kernel keeps the pages of requests still in flight pinned until they end
//! (registered buffers for the ring's life, plain ones for the request's), so the memory they
//! target stays valid for them.

use std::fs::File;
use std::os::fd::AsRawFd;

use io_uring::{opcode, squeue, types, IoUring};

use crate::engine::region::SlotRegion;
use crate::engine::{EngineError, IoCompletion, IoDirection};

/// fio's `IORING_ENTER_GETEVENTS`, passed on every enter (see the module doc).
const GETEVENTS: u32 = 1 << 0; // linux/io_uring.h: IORING_ENTER_GETEVENTS

/// The choices fio's io_uring engine offers as options, with fio's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RingOptions {
    /// fio's `fixedbufs`: register the slot buffers once (`READ_FIXED`/`WRITE_FIXED`), so the
    /// kernel does not pin and unpin a buffer's pages per request.
    pub fixed_buffers: bool,
    /// fio's `registerfiles`: register the file once, so requests name it by index.
    pub fixed_file: bool,
}

/// The setup flags a ring got, fio's first, without those the kernel refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingFlags {
    /// `IORING_SETUP_COOP_TASKRUN`.
    pub coop_taskrun: bool,
    /// `IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN`.
    pub defer_taskrun: bool,
    /// `IORING_SETUP_CQSIZE` (CQ entries = SQ entries).
    pub cq_size: bool,
}

/// An io_uring with `slots` buffers of `slot_bytes` (its own), on one file.
pub struct SlotRing {
    /// Dropped first: closing the ring ends the kernel's use of the buffers.
    ring: IoUring,
    region: SlotRegion,
    /// Each slot's (address, length). Addresses, not pointers: the ring is `Send`.
    buffers: Vec<(usize, usize)>,
    in_flight: Vec<bool>,
    outstanding: usize,
    /// The file: its raw descriptor, or index 0 of the registered files.
    file: FileRef,
    fixed_buffers: bool,
    flags: RingFlags,
}

/// How requests name the file.
#[derive(Debug, Clone, Copy)]
enum FileRef {
    /// The open file's descriptor (the caller keeps the file open for the ring's life).
    Plain(i32),
    /// Registered file 0.
    Registered,
}

impl std::fmt::Debug for SlotRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotRing")
            .field("slots", &self.region.slots())
            .field("slot_bytes", &self.region.slot_bytes())
            .field("outstanding", &self.outstanding)
            .field("file", &self.file)
            .field("fixed_buffers", &self.fixed_buffers)
            .field("flags", &self.flags)
            .finish()
    }
}

/// A ring of `entries` with fio's setup flags, dropping `DEFER_TASKRUN` (with
/// `SINGLE_ISSUER`), then `COOP_TASKRUN`, then `CQSIZE` while the kernel answers `EINVAL`.
fn setup_like_fio(entries: u32) -> std::io::Result<(IoUring, RingFlags)> {
    let mut flags = RingFlags {
        coop_taskrun: true,
        defer_taskrun: true,
        cq_size: true,
    };
    loop {
        let mut builder = IoUring::builder();
        if flags.cq_size {
            builder.setup_cqsize(entries);
        }
        if flags.coop_taskrun {
            builder.setup_coop_taskrun();
        }
        if flags.defer_taskrun {
            builder.setup_single_issuer().setup_defer_taskrun();
        }
        match builder.build(entries) {
            Ok(ring) => return Ok((ring, flags)),
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                if flags.defer_taskrun {
                    flags.defer_taskrun = false;
                } else if flags.coop_taskrun {
                    flags.coop_taskrun = false;
                } else if flags.cq_size {
                    flags.cq_size = false;
                } else {
                    return Err(error);
                }
            }
            Err(error) => return Err(error),
        }
    }
}

impl SlotRing {
    /// A ring of `slots` entries (rounded up to a power of two) over `file`, set up as fio's
    /// (module doc), with `slots` zeroed, page-aligned buffers of `slot_bytes`, registered as
    /// fixed buffers 0..slots if `options.fixed_buffers`, and `file` registered if
    /// `options.fixed_file`. The caller keeps `file` open for the ring's life. The calling
    /// thread is the only one that may use the ring (module doc).
    pub fn new(
        file: &File,
        slots: u32,
        slot_bytes: u32,
        options: RingOptions,
    ) -> Result<SlotRing, EngineError> {
        if slots == 0 || slots > 16384 {
            return Err(EngineError::Misuse(format!(
                "{slots} slots: io_uring takes 1..=16384 buffers"
            )));
        }
        let (ring, flags) =
            setup_like_fio(slots.next_power_of_two()).map_err(|source| EngineError::Setup {
                what: "io_uring setup",
                source,
            })?;
        let file = if options.fixed_file {
            ring.submitter()
                .register_files(&[file.as_raw_fd()])
                .map_err(|source| EngineError::Setup {
                    what: "io_uring file registration",
                    source,
                })?;
            FileRef::Registered
        } else {
            FileRef::Plain(file.as_raw_fd())
        };
        let mut region = SlotRegion::new(slots, slot_bytes)?;
        let iovecs = region.iovecs();
        if options.fixed_buffers {
            // SAFETY: the iovecs describe `region`'s mapping, which this value owns and drops
            // only after the ring (field order); see the module doc.
            unsafe { ring.submitter().register_buffers(&iovecs) }.map_err(|source| {
                EngineError::Setup {
                    what: "io_uring buffer registration (raise `ulimit -l` if this says ENOMEM)",
                    source,
                }
            })?;
        }
        let buffers = iovecs
            .iter()
            .map(|iovec| (iovec.iov_base as usize, iovec.iov_len))
            .collect();
        Ok(SlotRing {
            ring,
            region,
            buffers,
            in_flight: vec![false; slots as usize],
            outstanding: 0,
            file,
            fixed_buffers: options.fixed_buffers,
            flags,
        })
    }

    /// The setup flags the kernel accepted.
    pub fn flags(&self) -> RingFlags {
        self.flags
    }

    /// Requests pushed and not yet reaped.
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// A misuse error unless `slot` exists and is not in flight.
    fn check_idle(&self, slot: u32) -> Result<(), EngineError> {
        match self.in_flight.get(slot as usize) {
            Some(false) => Ok(()),
            Some(true) => Err(EngineError::Misuse(format!("slot {slot} is in flight"))),
            None => Err(EngineError::Misuse(format!("slot {slot} out of range"))),
        }
    }

    /// Copies `data` into the start of idle `slot`.
    pub fn fill(&mut self, slot: u32, data: &[u8]) -> Result<(), EngineError> {
        self.check_idle(slot)?;
        self.region.fill(slot, data)
    }

    /// Copies the start of idle `slot` into `out`.
    pub fn read(&self, slot: u32, out: &mut [u8]) -> Result<(), EngineError> {
        self.check_idle(slot)?;
        self.region.read(slot, out)
    }

    /// Queues a read into (or write from) the first `len` bytes of idle `slot` at byte `offset`
    /// of the file; [`SlotRing::submit`] hands it to the kernel.
    pub fn push(
        &mut self,
        slot: u32,
        direction: IoDirection,
        offset: u64,
        len: u32,
    ) -> Result<(), EngineError> {
        self.check_idle(slot)?;
        let (address, capacity) = self.buffers[slot as usize];
        if len as usize > capacity {
            return Err(EngineError::Misuse(format!(
                "{len} bytes exceed slot {slot}'s {capacity}"
            )));
        }
        let entry = self.entry(slot, address as *mut u8, direction, offset, len);
        // SAFETY: the entry names the ring's own slot (registered buffer `slot` when buffers
        // are registered), within its length; the slot is marked in flight below, so nothing
        // touches it until its completion is reaped, and the buffer outlives the request
        // (module doc).
        unsafe { self.ring.submission().push(&entry) }.map_err(|_| {
            EngineError::Misuse("submission queue full: more requests than slots".into())
        })?;
        self.in_flight[slot as usize] = true;
        self.outstanding += 1;
        Ok(())
    }

    /// The entry for one request on `slot`'s buffer at `buffer`.
    fn entry(
        &self,
        slot: u32,
        buffer: *mut u8,
        direction: IoDirection,
        offset: u64,
        len: u32,
    ) -> squeue::Entry {
        // Slot numbers are < 16384 (checked in `new`), so they fit the u16 buffer index.
        let index = slot as u16;
        macro_rules! build {
            ($file:expr) => {
                match (direction, self.fixed_buffers) {
                    (IoDirection::Read, true) => opcode::ReadFixed::new($file, buffer, len, index)
                        .offset(offset)
                        .build(),
                    (IoDirection::Write, true) => {
                        opcode::WriteFixed::new($file, buffer, len, index)
                            .offset(offset)
                            .build()
                    }
                    (IoDirection::Read, false) => {
                        opcode::Read::new($file, buffer, len).offset(offset).build()
                    }
                    (IoDirection::Write, false) => opcode::Write::new($file, buffer, len)
                        .offset(offset)
                        .build(),
                }
            };
        }
        match self.file {
            FileRef::Plain(fd) => build!(types::Fd(fd)),
            FileRef::Registered => build!(types::Fixed(0)),
        }
        .user_data(u64::from(slot))
    }

    /// Hands every queued entry to the kernel, with `GETEVENTS` as fio does: with
    /// `DEFER_TASKRUN` that also posts the completions that arrived since the last enter.
    pub fn submit(&mut self) -> Result<(), EngineError> {
        while !self.ring.submission().is_empty() {
            let queued = self.ring.submission().len() as u32;
            // SAFETY: no argument pointer (`None`); the queued entries were checked by `push`.
            let entered = unsafe {
                self.ring
                    .submitter()
                    .enter::<()>(queued, 0, GETEVENTS, None)
            };
            match entered {
                Ok(_) => {}
                Err(error) if matches!(error.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => {
                    // EAGAIN: no memory for requests now; what completed frees some (fio too).
                }
                Err(source) => {
                    return Err(EngineError::Io {
                        what: "io_uring submit",
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    /// Appends every completion that is ready to `out` (the slot is the user data), marking
    /// their slots idle; returns how many.
    pub fn completions(&mut self, out: &mut Vec<IoCompletion>) -> usize {
        let start = out.len();
        for cqe in self.ring.completion() {
            let slot = cqe.user_data() as u32;
            let result = if cqe.result() < 0 {
                Err(-cqe.result())
            } else {
                Ok(cqe.result() as u32)
            };
            out.push(IoCompletion { slot, result });
        }
        for completion in &out[start..] {
            if let Some(flag) = self.in_flight.get_mut(completion.slot as usize) {
                *flag = false;
            }
        }
        let reaped = out.len() - start;
        self.outstanding = self.outstanding.saturating_sub(reaped);
        reaped
    }

    /// Submits what is queued and waits until at least `want` completions are ready (0: posts
    /// the completions that arrived, without waiting).
    pub fn submit_and_wait(&mut self, want: usize) -> Result<(), EngineError> {
        let queued = self.ring.submission().len() as u32;
        let want = u32::try_from(want).unwrap_or(u32::MAX);
        // SAFETY: no argument pointer (`None`); the queued entries were checked by `push`.
        let entered = unsafe {
            self.ring
                .submitter()
                .enter::<()>(queued, want, GETEVENTS, None)
        };
        match entered {
            Ok(_) => Ok(()),
            Err(error) if matches!(error.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => {
                Ok(())
            }
            Err(source) => Err(EngineError::Io {
                what: "io_uring wait",
                source,
            }),
        }
    }

    /// Waits for and discards every outstanding completion.
    pub fn drain(&mut self) -> Result<(), EngineError> {
        let mut sink = Vec::new();
        while self.outstanding > 0 {
            sink.clear();
            if self.completions(&mut sink) == 0 {
                self.submit_and_wait(1)?;
            }
        }
        Ok(())
    }
}

impl Drop for SlotRing {
    /// Waits for in-flight requests before the buffers they use are unmapped.
    fn drop(&mut self) {
        if self.outstanding > 0 {
            if let Err(error) = self.drain() {
                // The kernel keeps the pages of requests in flight pinned until they end.
                tracing::warn!(%error, "io_uring: in-flight requests not drained at close");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a pattern from slot 0 and reads it back into slot 1 through a ring with `options`.
    fn round_trip(options: RingOptions) {
        let file = tempfile::tempfile().unwrap();
        file.set_len(1 << 20).unwrap();
        let mut ring = SlotRing::new(&file, 2, 4096, options).unwrap();
        let pattern: Vec<u8> = (0..4096).map(|i| (i * 7 % 251) as u8).collect();
        ring.fill(0, &pattern).unwrap();
        ring.push(0, IoDirection::Write, 8192, 4096).unwrap();
        assert!(
            ring.fill(0, &pattern).is_err(),
            "a slot in flight is refused"
        );
        ring.submit().unwrap();
        let mut done = Vec::new();
        while ring.completions(&mut done) == 0 {
            ring.submit_and_wait(1).unwrap();
        }
        assert_eq!(done[0].slot, 0);
        assert_eq!(done[0].result, Ok(4096));
        ring.push(1, IoDirection::Read, 8192, 4096).unwrap();
        ring.submit().unwrap();
        // Posting without waiting (want 0) must eventually show the completion, also when
        // DEFER_TASKRUN keeps completions back until an enter asks for events.
        done.clear();
        while ring.completions(&mut done) == 0 {
            ring.submit_and_wait(0).unwrap();
        }
        assert_eq!(done[0].slot, 1);
        assert_eq!(done[0].result, Ok(4096));
        assert_eq!(ring.outstanding(), 0);
        let mut back = vec![0u8; 4096];
        ring.read(1, &mut back).unwrap();
        assert_eq!(back, pattern);
    }

    #[test]
    fn plain_buffers_and_file_move_the_bytes_as_fio_does_by_default() {
        round_trip(RingOptions::default());
    }

    #[test]
    fn registered_buffers_and_file_move_the_same_bytes() {
        round_trip(RingOptions {
            fixed_buffers: true,
            fixed_file: true,
        });
        round_trip(RingOptions {
            fixed_buffers: true,
            fixed_file: false,
        });
        round_trip(RingOptions {
            fixed_buffers: false,
            fixed_file: true,
        });
    }

    #[test]
    fn the_ring_gets_fios_flags_where_the_kernel_has_them() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(4096).unwrap();
        let ring = SlotRing::new(&file, 4, 4096, RingOptions::default()).unwrap();
        let flags = ring.flags();
        // DEFER_TASKRUN is 6.1, COOP_TASKRUN 5.19, CQSIZE 5.5: a kernel that has the newer
        // one has the older ones (the fallback drops them newest first).
        assert!(!flags.defer_taskrun || flags.coop_taskrun);
        assert!(!flags.coop_taskrun || flags.cq_size);
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut numbers = release.split(|c: char| !c.is_ascii_digit());
        let major: u32 = numbers.next().and_then(|n| n.parse().ok()).unwrap_or(0);
        let minor: u32 = numbers.next().and_then(|n| n.parse().ok()).unwrap_or(0);
        if (major, minor) >= (6, 1) {
            assert!(flags.defer_taskrun, "kernel {release} has DEFER_TASKRUN");
        }
    }
}
