//! `ioengine=io_uring`: Linux io_uring with registered buffers (READ_FIXED/WRITE_FIXED) and a
//! registered (fixed) file, on a regular file or a block device, optionally with O_DIRECT.
//!
//! The ring has as many entries as the job has slots, so the submission queue can never be full
//! when the harness queues (it never has more than `slots` requests outstanding). `commit` is one
//! `io_uring_enter` that submits everything queued; `reap(min)` drains the completion queue and only
//! enters the kernel (`submit_and_wait`) when fewer than `min` completions are ready. That is the
//! same two-syscall loop as fio's io_uring engine with its default batching.
//!
//! The slot buffers are registered once in `prepare`, so the kernel pins them for the ring's life.
//! Field order matters: the ring is dropped (closing it waits for in-flight requests) before the
//! buffer region is unmapped, and `Drop` reaps anything still in flight first.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};

use io_uring::{opcode, squeue, types, IoUring};

use super::region::SlotRegion;
use super::{target_label, Engine, EngineError, Geometry, IoCompletion, IoDirection, IoRequest};
use crate::options::{JobSpec, SECTOR};

/// `BLKGETSIZE64`: a block device's size in bytes (`_IOR(0x12, 114, size_t)`).
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `BLKSSZGET`: a block device's logical sector size (`_IO(0x12, 104)`).
const BLKSSZGET: libc::c_ulong = 0x1268;

/// An open target and, after `prepare`, its ring and registered buffers.
pub struct IoUringEngine {
    ring: Option<IoUring>,
    region: Option<SlotRegion>,
    /// The registered slots' (address, length), from the region, for the submission entries.
    /// Addresses, not pointers, so the engine stays `Send`.
    buffers: Vec<(usize, usize)>,
    file: File,
    geometry: Geometry,
    in_flight: Vec<bool>,
    outstanding: usize,
}

impl IoUringEngine {
    /// Opens `spec.filename` (read-write if the job writes, O_DIRECT if `--direct=1`) and reads
    /// its geometry. The file must already exist: tpio never creates or extends targets.
    pub fn open(spec: &JobSpec) -> Result<Self, EngineError> {
        let path = spec
            .filename
            .as_ref()
            .ok_or_else(|| EngineError::Misuse("ioengine=io_uring needs --filename".into()))?;
        let mut options = OpenOptions::new();
        options.read(true).write(spec.writes());
        if spec.direct {
            options.custom_flags(libc::O_DIRECT);
        }
        let open_error = |source| EngineError::Open {
            path: target_label(spec),
            source,
        };
        let file = options.open(path).map_err(open_error)?;
        let metadata = file.metadata().map_err(open_error)?;
        let geometry = if metadata.file_type().is_block_device() {
            block_device_geometry(&file).map_err(open_error)?
        } else if metadata.is_file() {
            Geometry {
                capacity: metadata.len(),
                logical_block_size: SECTOR as u32,
            }
        } else {
            return Err(open_error(io::Error::other(
                "not a regular file or block device",
            )));
        };
        Ok(IoUringEngine {
            ring: None,
            region: None,
            buffers: Vec::new(),
            file,
            geometry,
            in_flight: Vec::new(),
            outstanding: 0,
        })
    }

    /// The ring, or a misuse error before `prepare`.
    /// A misuse error unless `slot` exists and is not in flight.
    fn check_idle(&self, slot: u32) -> Result<(), EngineError> {
        match self.in_flight.get(slot as usize) {
            Some(false) => Ok(()),
            Some(true) => Err(EngineError::Misuse(format!("slot {slot} is in flight"))),
            None => Err(EngineError::Misuse(format!("slot {slot} out of range"))),
        }
    }

    fn ring(&mut self) -> Result<&mut IoUring, EngineError> {
        self.ring
            .as_mut()
            .ok_or_else(|| EngineError::Misuse("I/O before prepare".into()))
    }

    /// Waits for and discards every outstanding completion (used by close and drop).
    fn drain(&mut self) -> Result<(), EngineError> {
        let mut sink = Vec::new();
        while self.outstanding > 0 {
            sink.clear();
            self.reap(1, &mut sink)?;
        }
        Ok(())
    }
}

/// Reads size and logical sector size of an open block device.
fn block_device_geometry(file: &File) -> io::Result<Geometry> {
    let mut capacity: u64 = 0;
    let mut sector: libc::c_int = 0;
    // SAFETY: both ioctls write one value of the pointed-to type into memory we own.
    let (size_rc, sector_rc) = unsafe {
        (
            libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut capacity as *mut u64),
            libc::ioctl(file.as_raw_fd(), BLKSSZGET, &mut sector as *mut libc::c_int),
        )
    };
    if size_rc < 0 || sector_rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let logical_block_size = u32::try_from(sector)
        .ok()
        .filter(|size| *size >= SECTOR as u32)
        .unwrap_or(SECTOR as u32);
    Ok(Geometry {
        capacity,
        logical_block_size,
    })
}

/// Registers the slots of `region` as the ring's fixed buffers, slot `i` as buffer index `i`.
fn register_region(ring: &IoUring, region: &mut SlotRegion) -> Result<(), EngineError> {
    let iovecs = region.iovecs();
    // SAFETY: the iovecs describe the region's mapping, which outlives the ring: the engine drops
    // the ring before the region (field order, `close`).
    unsafe { ring.submitter().register_buffers(&iovecs) }.map_err(|source| EngineError::Setup {
        what: "io_uring buffer registration (raise `ulimit -l` if this says ENOMEM)",
        source,
    })
}

/// Pushes one entry; the caller guarantees room (ring entries >= slots >= outstanding requests).
fn push_entry(ring: &mut IoUring, entry: &squeue::Entry) -> Result<(), EngineError> {
    // SAFETY: the entry's buffer is a registered slot that stays mapped until the request completes
    // (the harness does not reuse a slot in flight; the engine drains before unmapping).
    unsafe { ring.submission().push(entry) }
        .map_err(|_| EngineError::Misuse("submission queue full: more requests than slots".into()))
}

impl Engine for IoUringEngine {
    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn prepare(&mut self, slots: u32, slot_bytes: u32) -> Result<(), EngineError> {
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
            .register_files(&[self.file.as_raw_fd()])
            .map_err(|source| EngineError::Setup {
                what: "io_uring file registration",
                source,
            })?;
        let mut region = SlotRegion::new(slots, slot_bytes)?;
        register_region(&ring, &mut region)?;
        self.buffers = region
            .iovecs()
            .iter()
            .map(|iovec| (iovec.iov_base as usize, iovec.iov_len))
            .collect();
        self.ring = Some(ring);
        self.region = Some(region);
        self.in_flight = vec![false; slots as usize];
        Ok(())
    }

    fn fill_slot(&mut self, slot: u32, data: &[u8]) -> Result<(), EngineError> {
        self.check_idle(slot)?;
        self.region
            .as_mut()
            .ok_or_else(|| EngineError::Misuse("fill_slot before prepare".into()))?
            .fill(slot, data)
    }

    fn read_slot(&self, slot: u32, out: &mut [u8]) -> Result<(), EngineError> {
        self.check_idle(slot)?;
        self.region
            .as_ref()
            .ok_or_else(|| EngineError::Misuse("read_slot before prepare".into()))?
            .read(slot, out)
    }

    fn queue(&mut self, request: IoRequest) -> Result<(), EngineError> {
        self.check_idle(request.slot)?;
        let (address, len) = self
            .buffers
            .get(request.slot as usize)
            .copied()
            .ok_or_else(|| EngineError::Misuse("queue before prepare".into()))?;
        if request.len as usize > len {
            return Err(EngineError::Misuse(format!(
                "request {request:?} exceeds its slot's {len} bytes"
            )));
        }
        let buffer_ptr = address as *mut u8;
        // Slot numbers are < 16384 (checked in prepare), so they fit the u16 buffer index.
        let buf_index = request.slot as u16;
        let fixed_file = types::Fixed(0);
        let entry = match request.direction {
            IoDirection::Read => {
                opcode::ReadFixed::new(fixed_file, buffer_ptr, request.len, buf_index)
                    .offset(request.offset)
                    .build()
            }
            IoDirection::Write => {
                opcode::WriteFixed::new(fixed_file, buffer_ptr, request.len, buf_index)
                    .offset(request.offset)
                    .build()
            }
        }
        .user_data(u64::from(request.slot));
        push_entry(self.ring()?, &entry)?;
        self.in_flight[request.slot as usize] = true;
        self.outstanding += 1;
        Ok(())
    }

    fn commit(&mut self) -> Result<(), EngineError> {
        let ring = self.ring()?;
        while !ring.submission().is_empty() {
            match ring.submit() {
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

    fn reap(&mut self, min: usize, out: &mut Vec<IoCompletion>) -> Result<(), EngineError> {
        let min = min.min(self.outstanding);
        let mut got = 0;
        loop {
            let start = out.len();
            for cqe in self.ring()?.completion() {
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
            got += reaped;
            if got >= min {
                return Ok(());
            }
            match self.ring()?.submit_and_wait(min - got) {
                Ok(_) => {}
                Err(error) if error.raw_os_error() == Some(libc::EINTR) => {}
                Err(source) => {
                    return Err(EngineError::Io {
                        what: "io_uring wait",
                        source,
                    })
                }
            }
        }
    }

    fn close(&mut self) -> Result<(), EngineError> {
        if self.ring.is_some() {
            self.drain()?;
        }
        self.ring = None;
        self.region = None;
        Ok(())
    }
}

impl Drop for IoUringEngine {
    /// Waits for in-flight requests before the buffers they use are unmapped.
    fn drop(&mut self) {
        if self.ring.is_some() && self.outstanding > 0 {
            // Best effort: on failure the ring's own teardown still waits for its requests.
            let _ = self.drain();
        }
    }
}
