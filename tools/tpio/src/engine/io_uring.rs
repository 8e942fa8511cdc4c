//! `ioengine=io_uring`: Linux io_uring on a regular file or a block device, optionally with
//! O_DIRECT, doing per I/O what fio's io_uring engine does with its defaults.
//!
//! The ring has as many entries as the job has slots, so the submission queue can never be full
//! when the harness queues (it never has more than `slots` requests outstanding), and is set up
//! with fio's flags (`DEFER_TASKRUN` and the rest, see [`crate::uring`]). `commit` is one
//! `io_uring_enter(GETEVENTS)` that submits everything queued and posts the completions that
//! arrived; `reap(min)` drains the completion queue and only enters the kernel when fewer than
//! `min` completions are ready. The engine asks the harness for fio's default batching
//! ([`Batching::FIO_DEFAULT`]: commit each I/O, take one completion at a time and refill its slot
//! at once), so the device sees the stream fio gives it: a queue kept full one request at a time,
//! not a batch that drains and refills in a convoy (BENCHMARKS.md, "tpio vs fio").
//!
//! Buffers and file are plain by default, as fio's (`fixedbufs=0`, `registerfiles=0`: the kernel
//! pins a buffer's pages per request); `--fixedbufs` and `--registerfiles` register them once.
//! The ring and its buffers are one [`SlotRing`], which keeps the kernel's rules for memory in
//! flight (and holds this engine's only `unsafe`, outside this directory).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};

use super::{target_label, Batching, Engine, EngineError, Geometry, IoCompletion, IoRequest};
use crate::blockdev::geometry as block_device_geometry;
use crate::options::{JobSpec, SECTOR};
use crate::uring::{RingOptions, SlotRing};

/// An open target and, after `prepare`, its ring and registered buffers.
pub struct IoUringEngine {
    /// The ring and its registered slot buffers, from `prepare` to `close`. Dropped before
    /// the file (field order), after draining its requests.
    ring: Option<SlotRing>,
    file: File,
    geometry: Geometry,
    options: RingOptions,
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
            let (capacity, sector) = block_device_geometry(&file).map_err(open_error)?;
            Geometry {
                capacity,
                logical_block_size: sector.max(SECTOR as u32),
            }
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
            file,
            geometry,
            options: RingOptions {
                fixed_buffers: spec.fixedbufs,
                fixed_file: spec.registerfiles,
            },
        })
    }

    /// The ring, or a misuse error before `prepare`.
    fn ring(&mut self) -> Result<&mut SlotRing, EngineError> {
        self.ring
            .as_mut()
            .ok_or_else(|| EngineError::Misuse("I/O before prepare".into()))
    }
}

impl Engine for IoUringEngine {
    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn prepare(&mut self, slots: u32, slot_bytes: u32) -> Result<(), EngineError> {
        self.ring = Some(SlotRing::new(&self.file, slots, slot_bytes, self.options)?);
        Ok(())
    }

    fn fill_slot(&mut self, slot: u32, data: &[u8]) -> Result<(), EngineError> {
        self.ring()?.fill(slot, data)
    }

    fn read_slot(&self, slot: u32, out: &mut [u8]) -> Result<(), EngineError> {
        self.ring
            .as_ref()
            .ok_or_else(|| EngineError::Misuse("read_slot before prepare".into()))?
            .read(slot, out)
    }

    fn queue(&mut self, request: IoRequest) -> Result<(), EngineError> {
        self.ring()?
            .push(request.slot, request.direction, request.offset, request.len)
    }

    fn commit(&mut self) -> Result<(), EngineError> {
        self.ring()?.submit()
    }

    fn reap(&mut self, min: usize, out: &mut Vec<IoCompletion>) -> Result<(), EngineError> {
        let ring = self.ring()?;
        let min = min.min(ring.outstanding());
        let mut got = ring.completions(out);
        if got == 0 && min == 0 && ring.outstanding() > 0 {
            // With DEFER_TASKRUN completions are posted only by an enter that asks for events.
            ring.submit_and_wait(0)?;
            ring.completions(out);
            return Ok(());
        }
        while got < min {
            ring.submit_and_wait(min - got)?;
            got += ring.completions(out);
        }
        Ok(())
    }

    fn batching(&self) -> Batching {
        Batching::FIO_DEFAULT
    }

    fn close(&mut self) -> Result<(), EngineError> {
        let drained = match self.ring.as_mut() {
            Some(ring) => ring.drain(),
            None => Ok(()),
        };
        self.ring = None;
        drained
    }
}
