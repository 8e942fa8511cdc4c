//! [`FixedRing`]: an io_uring whose requests use registered (fixed) buffers that the ring
//! itself owns, with a safe interface. tpio's `ioengine=io_uring` is built on it.
//!
//! # Why this module has `unsafe`, and why its interface is safe
//! The kernel reads and writes a fixed buffer asynchronously, after `push` returned, so the
//! `io-uring` crate marks buffer registration and entry submission `unsafe`: the caller must
//! keep the memory alive and untouched until the request completes. This type keeps that
//! promise itself, so nothing outside it needs `unsafe`:
//! - the buffers are its own [`SlotRegion`], registered once and unmapped only after the ring
//!   (field order), and the ring is dropped only after every request completed ([`Drop`]
//!   waits for them);
//! - a slot is marked in flight from [`FixedRing::push`] until its completion is reaped, and
//!   [`FixedRing::fill`] and [`FixedRing::read`] refuse a slot in flight, as does `push`;
//! - entries name only the ring's own slots, within their length.
//!
//! If waiting fails at drop (the kernel refused `io_uring_enter`), the ring's file is closed
//! anyway; the kernel keeps the registered pages pinned until its requests end, so the memory
//! they target stays valid for them.

use std::fs::File;
use std::os::fd::AsRawFd;

use io_uring::{opcode, types, IoUring};

use crate::engine::region::SlotRegion;
use crate::engine::{EngineError, IoCompletion, IoDirection};

/// An io_uring with `slots` registered buffers of `slot_bytes`, on one registered file.
pub struct FixedRing {
    /// Dropped first: closing the ring ends the kernel's use of the buffers.
    ring: IoUring,
    region: SlotRegion,
    /// Each slot's (address, length) as registered. Addresses, not pointers: the ring is `Send`.
    buffers: Vec<(usize, usize)>,
    in_flight: Vec<bool>,
    outstanding: usize,
}

impl std::fmt::Debug for FixedRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FixedRing")
            .field("slots", &self.region.slots())
            .field("slot_bytes", &self.region.slot_bytes())
            .field("outstanding", &self.outstanding)
            .finish()
    }
}

impl FixedRing {
    /// A ring of `slots` entries (rounded up to a power of two) over `file`, with `slots`
    /// zeroed, page-aligned buffers of `slot_bytes` registered as fixed buffers 0..slots.
    pub fn new(file: &File, slots: u32, slot_bytes: u32) -> Result<FixedRing, EngineError> {
        if slots == 0 || slots > 16384 {
            return Err(EngineError::Misuse(format!(
                "{slots} slots: io_uring registers 1..=16384 buffers"
            )));
        }
        let ring =
            IoUring::new(slots.next_power_of_two()).map_err(|source| EngineError::Setup {
                what: "io_uring setup",
                source,
            })?;
        ring.submitter()
            .register_files(&[file.as_raw_fd()])
            .map_err(|source| EngineError::Setup {
                what: "io_uring file registration",
                source,
            })?;
        let mut region = SlotRegion::new(slots, slot_bytes)?;
        let iovecs = region.iovecs();
        // SAFETY: the iovecs describe `region`'s mapping, which this value owns and drops only
        // after the ring (field order); see the module doc.
        unsafe { ring.submitter().register_buffers(&iovecs) }.map_err(|source| {
            EngineError::Setup {
                what: "io_uring buffer registration (raise `ulimit -l` if this says ENOMEM)",
                source,
            }
        })?;
        let buffers = iovecs
            .iter()
            .map(|iovec| (iovec.iov_base as usize, iovec.iov_len))
            .collect();
        Ok(FixedRing {
            ring,
            region,
            buffers,
            in_flight: vec![false; slots as usize],
            outstanding: 0,
        })
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

    /// Queues a fixed-buffer read into (or write from) the first `len` bytes of idle `slot` at
    /// byte `offset` of the file; [`FixedRing::submit`] hands it to the kernel.
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
        let ptr = address as *mut u8;
        // Slot numbers are < 16384 (checked in `new`), so they fit the u16 buffer index.
        let index = slot as u16;
        let file = types::Fixed(0);
        let entry = match direction {
            IoDirection::Read => opcode::ReadFixed::new(file, ptr, len, index)
                .offset(offset)
                .build(),
            IoDirection::Write => opcode::WriteFixed::new(file, ptr, len, index)
                .offset(offset)
                .build(),
        }
        .user_data(u64::from(slot));
        // SAFETY: the entry names registered buffer `index`, the ring's own slot, within its
        // length; the slot is marked in flight below, so nothing touches it until its
        // completion is reaped, and the ring outlives the request (module doc).
        unsafe { self.ring.submission().push(&entry) }.map_err(|_| {
            EngineError::Misuse("submission queue full: more requests than slots".into())
        })?;
        self.in_flight[slot as usize] = true;
        self.outstanding += 1;
        Ok(())
    }

    /// Hands every queued entry to the kernel.
    pub fn submit(&mut self) -> Result<(), EngineError> {
        while !self.ring.submission().is_empty() {
            match self.ring.submit() {
                Ok(_) => {}
                Err(error) if error.raw_os_error() == Some(libc::EINTR) => {}
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

    /// Submits what is queued and waits until at least `want` completions are ready.
    pub fn submit_and_wait(&mut self, want: usize) -> Result<(), EngineError> {
        match self.ring.submit_and_wait(want) {
            Ok(_) => Ok(()),
            Err(error) if error.raw_os_error() == Some(libc::EINTR) => Ok(()),
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

impl Drop for FixedRing {
    /// Waits for in-flight requests before the buffers they use are unmapped.
    fn drop(&mut self) {
        if self.outstanding > 0 {
            if let Err(error) = self.drain() {
                // The kernel keeps the registered pages pinned until its requests end.
                tracing::warn!(%error, "io_uring: in-flight requests not drained at close");
            }
        }
    }
}
