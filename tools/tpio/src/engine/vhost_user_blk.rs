//! `ioengine=vhost-user-blk`: Tidepool's vhost-user-blk frontend (`tidepool-vhost-user-blk`),
//! the confidential data plane, against a backend's unix socket (`--filename=/run/vhost.sock`,
//! e.g. `qemu-storage-daemon --export type=vhost-user-blk,addr.type=unix,addr.path=...`).
//!
//! # What is measured
//! Exactly the driver's public path: slots are **private** memory (a page-aligned [`PageBuf`]
//! each, owned by the slot while idle and by its request's task while in flight), and every
//! I/O goes through [`BlockDevice::read_at`] / [`BlockDevice::write_at`], which bounce the bytes
//! through a Tidepool pool whose chunks are the only memory shared with the backend (a
//! [`VhostUserView`]). The pool is sized by `--pool-min/--pool-max/--pool-chunk` as for
//! `ioengine=tidepool`; 2 MiB hugepages are used when free, 4 KiB pages otherwise.
//!
//! # Driving an async device from tpio's synchronous loop
//! The device is async (tokio). Its runtime is a **current-thread** runtime owned by the
//! engine's backend (below), so in the common one-job case every step (submission, the reaper
//! task, completion) runs on the job's own thread with no cross-thread hand-off:
//! - `queue` checks the request and remembers it;
//! - `commit` spawns one task per queued request (it copies nothing: the task itself calls
//!   `read_at`/`write_at` on the slot's bytes) and lets the runtime run them once, so they
//!   reach the ring and the backend is kicked;
//! - `reap(min)` drives the runtime (`block_on`) until `min` completions arrived on the
//!   engine's channel, then takes every other one already there.
//!
//! The runtime advances only inside `commit`/`reap`; that is fine because tpio calls `reap`
//! whenever it has nothing else to do. As a consequence tpio's `slat` (queue to end of
//! `commit`) includes the driver's submission work (pool allocation, the bounce copy of a
//! write, publishing on the ring and the kick), and `clat` the rest, as with a real device. `--completion=poll` (the default) makes the driver's
//! reaper busy-poll the used ring inside `reap`; `--completion=interrupt` makes it sleep on
//! the call eventfd (the thread then sleeps in epoll).
//!
//! # Sharing between clones and jobs: one device, one queue per clone of the first job
//! `qemu-storage-daemon` serves one frontend per socket at a time, and tpio opens the engines
//! of every job and clone before running any. So all engines on the same socket share one
//! backend (connection, pool, [`BlockDevice`], runtime) through a process-wide registry keyed by
//! the socket's canonical path; the first engine's options (pool, completion, queue count and
//! size) win. The device gets `numjobs` queues (capped by what the backend offers) and the
//! driver spreads requests over them round robin. Each clone's thread calls `block_on` on the
//! shared current-thread runtime; tokio lets one of them drive the scheduler at a time and
//! hands the driver over when that one's future is done, so every clone's tasks progress
//! while any clone waits. With several clones, completions of one clone may therefore be
//! reaped by another clone's thread (then woken through the channel).
//!
//! # Why slot memory is never released under an I/O
//! A request's task owns its slot's memory (moved into it at `commit`) and hands it back in
//! its report; the slot table holds it only while the slot is idle, and `fill_slot`/`read_slot` refuse a
//! slot whose memory is away, so the harness can only reach memory that exists and that no task
//! uses. `close`/drop wait for every task to report (each finishes: the driver fails a request
//! after its `io_timeout`, or at once when the backend disconnects). No `unsafe` here.

use std::collections::HashMap;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use tidepool::data::PageBuf;
use tidepool::pool::Pool;
use tidepool::share::DeviceView;
use tidepool_vhost_user_blk::{
    BlockDevice, CompletionMode as VhostCompletionMode, ConnectOptions, Connection, DeviceOptions,
    Error as VhostError, VhostUserView, ViewOptions,
};
use tokio::runtime::Runtime;
use tokio::sync::mpsc;

use super::{
    fill_page, idle_slot, idle_slot_ref, read_page, target_label, Engine, EngineError, Geometry,
    IoCompletion, IoDirection, IoRequest,
};
use crate::options::{CompletionMode, JobSpec};

/// Largest virtqueue `qemu-storage-daemon` (libvhost-user) accepts.
const MAX_QUEUE_SIZE: u32 = 1024;

/// Smallest virtqueue the engine asks for.
const MIN_QUEUE_SIZE: u32 = 64;

/// What `--filename` must be, for error messages.
const FILENAME_HINT: &str = "ioengine=vhost-user-blk takes the unix socket of a vhost-user-blk \
     backend, e.g. qemu-storage-daemon --export type=vhost-user-blk,id=exp0,node-name=disk0,\
     addr.type=unix,addr.path=/tmp/vhost.sock,writable=on and --filename=/tmp/vhost.sock";

/// One connection to a backend and everything built on it, shared by all engines on the
/// socket (module doc). Field order is drop order: the device is shut down (explicitly, in
/// `Drop`) before the runtime its tasks live on goes.
struct Backend {
    /// `None` only while `Drop` shuts it down.
    device: Option<Arc<BlockDevice>>,
    view: Arc<VhostUserView>,
    runtime: Runtime,
    socket: PathBuf,
    completion: CompletionMode,
    queue_size: u16,
}

/// Backends open in this process, by canonical socket path.
fn registry() -> &'static Mutex<HashMap<PathBuf, Weak<Backend>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<PathBuf, Weak<Backend>>>> = OnceLock::new();
    REGISTRY.get_or_init(Mutex::default)
}

/// Returns the backend on `socket`, connecting with the options of `spec` if no engine holds
/// one.
///
/// Locking: holds the registry mutex across the connect, so two engines never open two
/// connections to the same socket (the second would not be served).
fn shared_backend(socket: &Path, spec: &JobSpec) -> Result<Arc<Backend>, EngineError> {
    let mut map = registry().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(backend) = map.get(socket).and_then(Weak::upgrade) {
        return Ok(backend);
    }
    let backend = Arc::new(Backend::connect(socket, spec)?);
    map.insert(socket.to_path_buf(), Arc::downgrade(&backend));
    Ok(backend)
}

/// An engine error for a failure talking to the backend at setup.
fn open_error(socket: &Path, error: impl std::fmt::Display) -> EngineError {
    EngineError::Open {
        path: socket.display().to_string(),
        source: std::io::Error::other(error.to_string()),
    }
}

/// The virtqueue size for `spec`: room for every clone's `iodepth` requests of the largest
/// block size split into `segment`-byte descriptors (plus header and status), spread over
/// `queues`, as a power of two in `MIN_QUEUE_SIZE..=MAX_QUEUE_SIZE`. Too small only throttles
/// (the driver waits for descriptors); it never fails a request.
fn queue_size_for(spec: &JobSpec, segment: u64, queues: u32) -> u16 {
    let segment = segment.max(512);
    let per_request = 2 + spec.block_sizes.max().div_ceil(segment);
    let total = per_request
        .saturating_mul(u64::from(spec.iodepth))
        .saturating_mul(u64::from(spec.numjobs));
    let per_queue = total.div_ceil(u64::from(queues.max(1)));
    let size = per_queue
        .clamp(u64::from(MIN_QUEUE_SIZE), u64::from(MAX_QUEUE_SIZE))
        .next_power_of_two()
        .min(u64::from(MAX_QUEUE_SIZE));
    size as u16
}

impl Backend {
    /// Connects to `socket`, builds the pool on a [`VhostUserView`] of the connection and
    /// starts the device on a fresh current-thread runtime. Blocks (each control exchange is
    /// bounded by the driver's 2 s timeout).
    fn connect(socket: &Path, spec: &JobSpec) -> Result<Backend, EngineError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| EngineError::Setup {
                what: "tokio runtime for the vhost-user-blk engine",
                source,
            })?;
        let conn = Connection::connect(socket, &ConnectOptions::default())
            .map_err(|e| open_error(socket, format!("{e} ({FILENAME_HINT})")))?;
        let view = Arc::new(VhostUserView::new(conn.clone(), ViewOptions::new()));
        let mut pool_cfg = super::tidepool::pool_config(&spec.pool);
        // Hugepages when free, else 4 KiB pages: the backend maps memfds of either kind.
        pool_cfg.memory.allow_small_pages = true;
        let pool = Pool::new(view.clone(), pool_cfg).map_err(|e| {
            conn.close();
            open_error(
                socket,
                format!(
                    "pool on the vhost-user view: {e} (check --pool-min/--pool-max/--pool-chunk)"
                ),
            )
        })?;
        let queues = u16::try_from(spec.numjobs).unwrap_or(u16::MAX).max(1);
        let offered = u32::from(conn.max_queues.min(conn.config.num_queues.max(1)).max(1));
        // size_max counts only when negotiated, and 0 means no limit (qemu-storage-daemon).
        let segment = match conn.size_max() {
            None | Some(0) => spec.block_sizes.max(),
            Some(max) => u64::from(max),
        };
        let queue_size = queue_size_for(spec, segment, u32::from(queues).min(offered));
        let completion = match spec.pool.completion {
            CompletionMode::Poll => VhostCompletionMode::Poll,
            CompletionMode::Interrupt => VhostCompletionMode::Interrupt,
        };
        let opts = DeviceOptions {
            queues,
            queue_size,
            completion,
            ..DeviceOptions::default()
        };
        let device = runtime
            .block_on(BlockDevice::start(conn, pool, opts))
            .map_err(|e| open_error(socket, format!("starting the device: {e}")))?;
        Ok(Backend {
            device: Some(Arc::new(device)),
            view,
            runtime,
            socket: socket.to_path_buf(),
            completion: spec.pool.completion,
            queue_size,
        })
    }

    /// The device (present from `connect` until `Drop`).
    fn device(&self) -> Result<&Arc<BlockDevice>, EngineError> {
        self.device
            .as_ref()
            .ok_or_else(|| EngineError::Misuse("the vhost-user-blk device is shut down".into()))
    }
}

impl Drop for Backend {
    /// Lets outstanding requests finish (the driver bounds the wait by its I/O timeout), then
    /// closes the connection; every pool buffer is back in the pool before the pool goes.
    fn drop(&mut self) {
        if let Some(device) = self.device.take() {
            match Arc::try_unwrap(device) {
                Ok(device) => self.runtime.block_on(device.shutdown()),
                // A task still holds it (only if an engine was leaked mid-I/O): dropping the
                // last handle closes the connection and fails what is outstanding.
                Err(device) => drop(device),
            }
        }
    }
}

/// The errno tpio reports for a driver error.
fn errno_of(error: &VhostError) -> i32 {
    match error {
        VhostError::Device { .. } => libc::EIO,
        VhostError::IoTimeout { .. } | VhostError::ControlTimeout { .. } => libc::ETIMEDOUT,
        VhostError::Disconnected(_) | VhostError::Connect { .. } => libc::ENOTCONN,
        VhostError::Backend(_) | VhostError::Protocol(_) => libc::EPROTO,
        VhostError::Unaligned { .. } | VhostError::OutOfRange { .. } | VhostError::Config(_) => {
            libc::EINVAL
        }
        VhostError::Unsupported(_) | VhostError::MissingFeature { .. } => libc::EOPNOTSUPP,
        VhostError::Pool(_) => libc::ENOMEM,
        VhostError::Rejected { .. } | VhostError::Io { .. } => libc::EIO,
    }
}

/// One finished task's report, with the slot's memory back.
struct Finished {
    completion: IoCompletion,
    memory: PageBuf,
    /// The driver's message for a failed request.
    error: Option<String>,
}

/// One job clone's engine on a (shared) vhost-user-blk backend. Field order is drop order.
pub struct VhostUserBlkEngine {
    /// Requests queued since the last commit, each with its slot's memory.
    pending: Vec<(IoRequest, PageBuf)>,
    /// Each slot's private memory while idle; `None` while its request is queued or in
    /// flight (the memory is then owned by the request's task).
    slots: Vec<Option<PageBuf>>,
    slot_bytes: usize,
    done_tx: mpsc::UnboundedSender<Finished>,
    done_rx: mpsc::UnboundedReceiver<Finished>,
    outstanding: usize,
    completed: u64,
    failed: u64,
    last_error: Option<String>,
    final_stats: Option<serde_json::Value>,
    capacity: u64,
    block_size: u32,
    backend: Arc<Backend>,
}

impl VhostUserBlkEngine {
    /// Connects to (or shares, see the module doc) the backend on the socket `spec.filename`.
    /// A missing path, a path that is not a socket, or a peer that does not speak vhost-user
    /// is an [`EngineError::Open`] naming the socket.
    pub fn open(spec: &JobSpec) -> Result<Self, EngineError> {
        let path = spec.filename.as_ref().ok_or_else(|| EngineError::Open {
            path: target_label(spec),
            source: std::io::Error::other(FILENAME_HINT),
        })?;
        let metadata = std::fs::metadata(path).map_err(|source| EngineError::Open {
            path: path.display().to_string(),
            source: std::io::Error::new(source.kind(), format!("{source} ({FILENAME_HINT})")),
        })?;
        if !metadata.file_type().is_socket() {
            return Err(open_error(
                path,
                format!("not a unix socket ({FILENAME_HINT})"),
            ));
        }
        let socket = std::fs::canonicalize(path).map_err(|source| EngineError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let backend = shared_backend(&socket, spec)?;
        let device = backend.device()?;
        let (capacity, block_size) = (device.capacity(), device.block_size());
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Ok(VhostUserBlkEngine {
            pending: Vec::new(),
            slots: Vec::new(),
            slot_bytes: 0,
            done_tx,
            done_rx,
            outstanding: 0,
            completed: 0,
            failed: 0,
            last_error: None,
            final_stats: None,
            capacity,
            block_size,
            backend,
        })
    }

    /// Spawns the task that performs `request` on the backend's runtime with the slot's
    /// `memory`, which the task owns until it reports. The task reports on the engine's channel
    /// exactly once, whatever happens; on an error here the memory comes back.
    fn spawn(&self, request: IoRequest, mut memory: PageBuf) -> Result<(), (EngineError, PageBuf)> {
        let device = match self.backend.device() {
            Ok(d) => Arc::clone(d),
            Err(e) => return Err((e, memory)),
        };
        let done = self.done_tx.clone();
        self.backend.runtime.spawn(async move {
            let buf = &mut memory.as_mut_slice()[..request.len as usize];
            let result = match request.direction {
                IoDirection::Read => device.read_at(request.offset, buf).await,
                IoDirection::Write => device.write_at(request.offset, buf).await,
            };
            let (result, error) = match result {
                Ok(()) => (Ok(request.len), None),
                Err(e) => (Err(errno_of(&e)), Some(e.to_string())),
            };
            // The receiver lives as long as the engine, which waits for every task.
            let _ = done.send(Finished {
                completion: IoCompletion {
                    slot: request.slot,
                    result,
                },
                memory,
                error,
            });
        });
        Ok(())
    }

    /// Records one report and appends its completion to `out`.
    fn take(&mut self, finished: Finished, out: &mut Vec<IoCompletion>) {
        let slot = finished.completion.slot as usize;
        if let Some(idle) = self.slots.get_mut(slot) {
            *idle = Some(finished.memory);
        }
        self.outstanding = self.outstanding.saturating_sub(1);
        self.completed += 1;
        if let Some(error) = finished.error {
            self.failed += 1;
            self.last_error = Some(error);
        }
        out.push(finished.completion);
    }

    /// Waits for every spawned task to report, dropping the completions (close and drop).
    fn drain(&mut self) -> Result<(), EngineError> {
        self.pending.clear();
        let mut sink = Vec::new();
        while self.outstanding > 0 {
            sink.clear();
            self.reap(1, &mut sink)?;
        }
        Ok(())
    }

    /// Statistics for the report's `tidepool` object: the socket, the device's shape, the
    /// (shared) pool's statistics, the regions shared with the backend, and request counts.
    fn snapshot(&self) -> serde_json::Value {
        let backend = &self.backend;
        let usage = backend.view.usage();
        let mut out = serde_json::json!({
            "socket": backend.socket.display().to_string(),
            "completion": match backend.completion {
                CompletionMode::Poll => "poll",
                CompletionMode::Interrupt => "interrupt",
            },
            "queue_size": backend.queue_size,
            "regions": usage.mappings,
            "region_limit": usage.mapping_limit,
            "shared_bytes": usage.bytes,
            "requests": self.completed,
            "failed_requests": self.failed,
        });
        if let Some(device) = &backend.device {
            out["queues"] = serde_json::json!(device.queues());
            out["max_io_bytes"] = serde_json::json!(device.max_io_bytes());
            out["pool"] = serde_json::to_value(device.pool().stats()).unwrap_or_default();
        }
        if let Some(error) = &self.last_error {
            out["last_error"] = serde_json::json!(error);
        }
        out
    }
}

impl Engine for VhostUserBlkEngine {
    fn name(&self) -> &'static str {
        "vhost-user-blk"
    }

    fn geometry(&self) -> Geometry {
        Geometry {
            capacity: self.capacity,
            logical_block_size: self.block_size,
        }
    }

    fn prepare(&mut self, slots: u32, slot_bytes: u32) -> Result<(), EngineError> {
        if slots == 0 {
            return Err(EngineError::Misuse("iodepth=0".into()));
        }
        self.slots = (0..slots)
            .map(|_| Some(PageBuf::zeroed(slot_bytes as usize)))
            .collect();
        self.slot_bytes = slot_bytes as usize;
        Ok(())
    }

    /// Only while the slot is idle (its memory is here, not with a task).
    fn fill_slot(&mut self, slot: u32, data: &[u8]) -> Result<(), EngineError> {
        fill_page(idle_slot(&mut self.slots, slot)?, slot, data)
    }

    fn read_slot(&self, slot: u32, out: &mut [u8]) -> Result<(), EngineError> {
        read_page(idle_slot_ref(&self.slots, slot)?, slot, out)
    }

    fn queue(&mut self, request: IoRequest) -> Result<(), EngineError> {
        let fits = request.len as usize <= self.slot_bytes && request.len != 0;
        let memory = match self.slots.get_mut(request.slot as usize) {
            Some(idle) if fits => idle.take(),
            _ => None,
        };
        let Some(memory) = memory else {
            return Err(EngineError::Misuse(format!(
                "request {request:?} names a busy or unknown slot, or exceeds its {} bytes",
                self.slot_bytes
            )));
        };
        self.pending.push((request, memory));
        Ok(())
    }

    fn commit(&mut self) -> Result<(), EngineError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut pending = std::mem::take(&mut self.pending).into_iter();
        while let Some((request, memory)) = pending.next() {
            if let Err((error, memory)) = self.spawn(request, memory) {
                // Not spawned: this and the later requests never reach the device; their
                // slots get their memory back.
                self.slots[request.slot as usize] = Some(memory);
                for (request, memory) in pending {
                    self.slots[request.slot as usize] = Some(memory);
                }
                return Err(error);
            }
            self.outstanding += 1;
        }
        // Run the new tasks until they wait for the backend: their requests are on the ring
        // and the backend was kicked.
        self.backend.runtime.block_on(tokio::task::yield_now());
        Ok(())
    }

    fn reap(&mut self, min: usize, out: &mut Vec<IoCompletion>) -> Result<(), EngineError> {
        let min = min.min(self.outstanding);
        let mut got = 0;
        if min == 0 {
            // Give the tasks one turn so that a polling caller sees progress.
            self.backend.runtime.block_on(tokio::task::yield_now());
        }
        loop {
            while let Ok(finished) = self.done_rx.try_recv() {
                self.take(finished, out);
                got += 1;
            }
            if got >= min {
                return Ok(());
            }
            let next = self.backend.runtime.block_on(self.done_rx.recv());
            match next {
                Some(finished) => {
                    self.take(finished, out);
                    got += 1;
                }
                // Unreachable while the engine holds a sender; reported, not panicked on.
                None => {
                    return Err(EngineError::Io {
                        what: "vhost-user-blk completion channel",
                        source: std::io::Error::other("closed with requests outstanding"),
                    })
                }
            }
        }
    }

    fn close(&mut self) -> Result<(), EngineError> {
        let drained = self.drain();
        self.final_stats = Some(self.snapshot());
        self.slots.clear();
        drained
    }

    fn stats(&self) -> Option<serde_json::Value> {
        Some(self.final_stats.clone().unwrap_or_else(|| self.snapshot()))
    }

    fn pool(&self) -> Option<Pool> {
        self.backend
            .device
            .as_ref()
            .map(|device| device.pool().clone())
    }
}

impl Drop for VhostUserBlkEngine {
    /// Waits for the tasks still running (module doc); best effort, as it cannot fail.
    fn drop(&mut self) {
        if self.outstanding > 0 {
            let _ = self.drain();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::JobSpec;

    /// The job `tpio --ioengine=vhost-user-blk --filename=SOCK --bs=BS ...` describes.
    fn spec_with(bs: u64, iodepth: u32, numjobs: u32) -> JobSpec {
        let argv: Vec<std::ffi::OsString> = [
            "tpio".to_string(),
            "--name=t".into(),
            "--ioengine=vhost-user-blk".into(),
            "--filename=/nonexistent/tpio-vhost.sock".into(),
            format!("--bs={bs}"),
            format!("--iodepth={iodepth}"),
            format!("--numjobs={numjobs}"),
        ]
        .into_iter()
        .map(Into::into)
        .collect();
        let (mut specs, _) = crate::cli::parse(&argv).expect("valid options");
        specs.remove(0)
    }

    #[test]
    fn queue_size_fits_every_request_in_flight() {
        // 4 KiB at QD32: 3 descriptors each, 96 → 128.
        assert_eq!(queue_size_for(&spec_with(4096, 32, 1), 65536, 1), 128);
        // 128 KiB in 64 KiB segments at QD32: 4 each, 128.
        assert_eq!(queue_size_for(&spec_with(128 << 10, 32, 1), 65536, 1), 128);
        // Small jobs still get the minimum; huge ones are capped at the backend's limit.
        assert_eq!(queue_size_for(&spec_with(4096, 1, 1), 65536, 1), 64);
        assert_eq!(queue_size_for(&spec_with(1 << 20, 256, 4), 4096, 2), 1024);
        // Two clones over two queues need what one clone needs on one.
        assert_eq!(
            queue_size_for(&spec_with(4096, 32, 2), 65536, 2),
            queue_size_for(&spec_with(4096, 32, 1), 65536, 1)
        );
    }

    #[test]
    fn missing_socket_is_an_open_error() {
        let spec = spec_with(4096, 1, 1);
        match VhostUserBlkEngine::open(&spec) {
            Err(EngineError::Open { path, source }) => {
                assert_eq!(path, "/nonexistent/tpio-vhost.sock");
                assert!(source.to_string().contains("vhost-user-blk"), "{source}");
            }
            Err(other) => panic!("wrong error: {other}"),
            Ok(_) => panic!("opened a missing socket"),
        }
    }
}
