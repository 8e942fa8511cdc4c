//! [`BlockDevice`]: asynchronous block I/O over vhost-user, every byte bounced through the pool.
//!
//! # Limits from the backend's config
//! Config fields count only when their feature bit was negotiated (`size_max`, `seg_max`,
//! `blk_size`, `num_queues`, the discard / write-zeroes maxima; see [`Connection::size_max`]
//! and friends). From them and the options, [`BlockDevice::start`] derives once how many bytes
//! a data descriptor and a request may carry (`io_limits`): every request's chain then fits
//! the queue and the negotiated limits, and longer calls are split. A configuration under
//! which not even one block fits a request (tiny `size_max` × `seg_max`, a queue too small,
//! a malformed `blk_size`) is refused by `start` with [`Error::Config`], before any
//! ring exists, rather than failing or hanging on the first I/O: a caller who asked for a
//! queue of 4 learns at once that it cannot work, instead of finding out in production.
//!
//! # Data path
//! A request (`read_at`, `write_at`, `flush`, `discard`, `write_zeroes`) is at most
//! [`BlockDevice::max_io_bytes`] long (longer calls are split and issued in order). For each:
//! 1. One pool buffer is taken for the data, awaiting capacity if the pool has none (the
//!    pool's point). Writes copy the caller's private bytes in; read buffers are zeroed by the
//!    pool, so the backend never sees stale data. The 16-byte request header and the status
//!    byte live in a per-queue table in the ring's own pool buffer, one 32-byte slot per
//!    possible head descriptor, so a request holds exactly one awaited buffer: two awaited
//!    allocations per request could deadlock a small pool (every task holding its data buffer
//!    while waiting for a header buffer). The status byte is preset to 0xFF, so a backend that
//!    completes a request without writing it yields an error, not a false success.
//! 2. The queue's descriptor budget (a semaphore of `queue_size` permits) is awaited for the
//!    chain's descriptors; the chain is published in the avail ring and the backend kicked
//!    (unless `used.flags` says NO_NOTIFY).
//! 3. The **request's buffers now belong to the queue** (its in-flight table), not to the
//!    caller's future: a cancelled or timed-out call can never return memory to the pool
//!    while the backend may still write it. They go back to the pool only when the completion
//!    is reaped, or when the backend is known to be gone.
//! 4. A reaper task per queue (woken by the call eventfd, or busy-polling in
//!    [`CompletionMode::Poll`] mode) takes used entries, validated as untrusted input by the
//!    shared split ring ([`tidepool_virtqueue`], re-exported as [`crate::ring`]), reads the status byte once by copy, and hands the buffers back to the
//!    waiting call, which copies read data out exactly once into the caller's memory.
//!
//! # Failure
//! - A backend that breaks the ring protocol ([`crate::RingError`]) or whose connection drops
//!   (checked every `liveness_interval` without blocking, and on every control exchange) fails
//!   the device: every outstanding and later request gets [`Error::Disconnected`] or
//!   [`Error::Backend`], descriptor waiters are woken, and the buffers return to the pool.
//!   On a disconnect, completions the backend published before it went (used entries not
//!   yet reaped, e.g. because it died before signalling) are delivered first: their I/O
//!   happened, and failing them would report a done write as failed.
//! - A request that does not complete within `io_timeout` returns [`Error::IoTimeout`]. The
//!   deadline covers each of its waits (pool capacity, free descriptors, the completion): a
//!   backend that stops completing fills the queue and the pool, and later requests must not
//!   wait forever for either. Once published, a timed-out request's buffers stay with the
//!   queue until the backend completes it or goes away.
//!
//! # Locking
//! Per queue, one mutex (`state`) guards the ring and its in-flight table; it is held only for
//! ring bookkeeping and never across an await or a system call (the kick is written after it
//! is released). Completions are delivered after it is released.

use std::future::Future;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::eventfd::{EfdFlags, EventFd};
use tidepool::pool::{DmaBuf, Pool};
use tokio::io::unix::AsyncFd;
use tokio::sync::{oneshot, Notify, Semaphore};
use tokio::task::JoinHandle;

use crate::connection::Connection;
use crate::control::Reply;
use crate::protocol::{blk, features, Request, Writer, VRING_NOFD_MASK};
use crate::view::UADDR_OFFSET;
use crate::Error;
use tidepool_virtqueue::{Desc, Layout, RingError, SplitRing};

/// How the device waits for completions: a mode chosen once in [`DeviceOptions`], not a
/// completion itself.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub enum CompletionMode {
    /// The backend signals the call eventfd; the reaper sleeps on it (the default).
    #[default]
    Interrupt,
    /// The reaper busy-polls the used ring while requests are outstanding (lower latency,
    /// burns a core); the backend is asked not to signal (`VRING_AVAIL_F_NO_INTERRUPT`).
    Poll,
}

/// How [`BlockDevice::start`] sets up the queues.
#[derive(Clone, Debug)]
pub struct DeviceOptions {
    /// Queues wanted (capped by what the backend offers). Default 1.
    pub queues: u16,
    /// Descriptors per queue, a power of two (each request takes 2 + data segments).
    /// Default 256.
    pub queue_size: u16,
    /// Interrupt or polling completion.
    pub completion: CompletionMode,
    /// A request not completed after this fails with [`Error::IoTimeout`]; it bounds every
    /// wait of the request (pool space, free descriptors, completion) together, per request
    /// (a call split into several requests gets it for each). Default 5 s.
    pub io_timeout: Duration,
    /// How often the connection is checked for a hang-up. Default 20 ms.
    pub liveness_interval: Duration,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions {
            queues: 1,
            queue_size: 256,
            completion: CompletionMode::Interrupt,
            io_timeout: Duration::from_secs(5),
            liveness_interval: Duration::from_millis(20),
        }
    }
}

/// Bytes per header slot: the 16-byte header at 0, the status byte at 16.
const HDR_SLOT: usize = 32;
/// Offset of the status byte in a header slot.
const STATUS_AT: usize = 16;
/// Status preset before publishing: not a valid virtio-blk status.
const STATUS_UNSET: u8 = 0xFF;

/// Bytes of one DISCARD / WRITE_ZEROES segment (`struct virtio_blk_discard_write_zeroes`).
const RANGE_SEG: usize = 16;

/// What every request respects, derived once by [`io_limits`] from the negotiated config and
/// the options.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
struct Limits {
    /// Most bytes in one data descriptor.
    seg_bytes: usize,
    /// Most bytes in one read or write request, a multiple of `block_size`.
    max_io: usize,
    /// The logical block size.
    block_size: u32,
}

/// How [`Error::Config`] starts when the backend's config leaves no usable request.
const UNUSABLE: &str = "the backend's configuration makes I/O impossible: ";

/// The request limits for a queue of `queue_size` descriptors over pool buffers of at most
/// `max_buffer` bytes, or [`Error::Config`] if no request could be built.
///
/// Only config fields whose feature bit was negotiated count ([`Connection::size_max`] and
/// friends). A `size_max` of 0 means no limit (`qemu-storage-daemon` 7.2 and 10.0 offer
/// VIRTIO_BLK_F_SIZE_MAX with 0); a `seg_max` of 0 is taken as 1, as Linux does. A request
/// gets at most `min(seg_max, queue_size - 2)` data descriptors (one each for the header and
/// the status byte), each at most `size_max` bytes, so the largest request is that product,
/// capped by the pool's largest buffer and rounded down to whole blocks. Longer calls are
/// split into requests of that size. If it is less than one block, nothing can be done and
/// the configuration is refused rather than panicking or hanging later. A DISCARD /
/// WRITE_ZEROES segment (16 bytes) then fits too: `size_max × segments ≥ 512 ≥ 16`.
fn io_limits(conn: &Connection, queue_size: u16, max_buffer: usize) -> Result<Limits, Error> {
    let block_size = match conn.blk_size() {
        None => blk::SECTOR as u32,
        Some(b) if b.is_power_of_two() && u64::from(b) >= blk::SECTOR => b,
        Some(b) => {
            return Err(Error::Config(format!(
                "{UNUSABLE}blk_size {b} (VIRTIO_BLK_F_BLK_SIZE) is not a power of two of at \
                 least 512 B"
            )))
        }
    };
    let (seg_bytes, seg_text) = match conn.size_max() {
        None => (u32::MAX as usize, "size_max not negotiated".to_string()),
        Some(0) => (u32::MAX as usize, "size_max 0: no limit".to_string()),
        Some(s) => (s as usize, format!("size_max {s}")),
    };
    let data_descs = queue_size as usize - 2;
    let (device_segs, segs_text) = match conn.seg_max() {
        None => (usize::MAX, "seg_max not negotiated".to_string()),
        Some(n) => (n.max(1) as usize, format!("seg_max {n}")),
    };
    let segs = device_segs.min(data_descs);
    let most = max_buffer.min(seg_bytes.saturating_mul(segs));
    let max_io = most / block_size as usize * block_size as usize;
    if max_io < block_size as usize {
        let block = block_size as usize;
        let needed = block.div_ceil(seg_bytes);
        let hint = if max_buffer < block {
            format!("the pool's max_buffer must be at least {block} B")
        } else if needed <= device_segs {
            let qs = (needed + 2).next_power_of_two().max(4);
            format!("a queue_size of at least {qs} would allow one block")
        } else {
            "the backend's limits allow no block at all".to_string()
        };
        return Err(Error::Config(format!(
            "{UNUSABLE}a request could carry at most {most} B ({seg_text}; {segs} data segments \
             per request: {segs_text}, queue_size {queue_size} leaves {data_descs}; pool buffers \
             of at most {max_buffer} B), less than one {block} B block; {hint}"
        )));
    }
    debug_assert!(RANGE_SEG.div_ceil(seg_bytes) <= segs);
    Ok(Limits {
        seg_bytes,
        max_io,
        block_size,
    })
}

/// What the reaper hands back to the caller: the data buffer and the status read once.
#[derive(Debug)]
struct Done {
    data: Option<DmaBuf>,
    status: u8,
}

/// One outstanding request in a queue's table. Owns the data buffer while the backend may
/// touch it.
#[derive(Debug)]
struct Inflight {
    reply: oneshot::Sender<Result<Done, Error>>,
    data: Option<DmaBuf>,
    descriptors: u32,
}

/// Why the device stopped working.
#[derive(Clone, Debug)]
enum Failure {
    Disconnected(String),
    Misbehaved(RingError),
}

impl Failure {
    fn error(&self) -> Error {
        match self {
            Failure::Disconnected(s) => Error::Disconnected(s.clone()),
            Failure::Misbehaved(e) => Error::Backend(e.clone()),
        }
    }
}

/// A queue's ring and, as each chain's token, the request it carries (the in-flight table:
/// the ring holds a request's buffers and reply channel from `add` until its completion is
/// popped or the ring is abandoned).
#[derive(Debug)]
struct QueueState {
    ring: SplitRing<Inflight>,
    failed: Option<Failure>,
}

/// One virtqueue: ring, in-flight table, descriptor budget, eventfds.
#[derive(Debug)]
struct Queue {
    state: Mutex<QueueState>,
    /// Free descriptors, as permits. Closed when the device fails.
    descriptors: Semaphore,
    kick: EventFd,
    /// Wakes the polling reaper when work arrives.
    work: Notify,
    /// The ring's memory (a pool buffer in a shared region), followed by the header table at
    /// `hdr_at`. Declared after `state`, whose ring points into it.
    ring_mem: DmaBuf,
    /// Offset of the header table (one [`HDR_SLOT`] per descriptor index) in `ring_mem`.
    hdr_at: usize,
}

impl Queue {
    /// Copies `bytes` into the header table at byte `at` of `ring_mem`. Call with `state`
    /// held, for the slot of a head that is free (no request of the backend's uses it).
    fn write_header_slot(&self, at: usize, bytes: &[u8]) {
        assert!(
            at >= self.hdr_at && at + bytes.len() <= self.ring_mem.capacity(),
            "header slot out of the ring buffer"
        );
        // SAFETY: in bounds (checked above) of the queue's own pool buffer; the slot belongs
        // to a free head, which no published descriptor points at, and `state` serialises
        // writers; `bytes` is private memory that does not overlap it.
        unsafe { tidepool::copy::copy_to_device(bytes, self.ring_mem.as_ptr().add(at)) }
    }

    /// Takes every valid completion off the used ring and delivers it; on a protocol
    /// violation fails the whole device. Returns completions delivered. Takes `state`, then
    /// (released) sends replies.
    fn reap(&self, dev: &Shared) -> usize {
        let (n, violation) = self.take_completions();
        if let Some(e) = violation {
            dev.fail(Failure::Misbehaved(e));
        }
        n
    }

    /// Takes every valid completion off the used ring and delivers it. Returns how many, and
    /// the protocol violation that stopped it, if any. Does nothing once the queue has failed
    /// (its ring was abandoned). Takes `state`, then (released) sends replies.
    fn take_completions(&self) -> (usize, Option<RingError>) {
        let mut done = Vec::new();
        let mut violation = None;
        {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if st.failed.is_some() {
                return (0, None);
            }
            loop {
                match st.ring.pop_used() {
                    Ok(Some(u)) => done.push((u.head, u.token)),
                    Ok(None) => break,
                    Err(e) => {
                        violation = Some(e);
                        break;
                    }
                }
            }
        }
        let n = done.len();
        let mut permits = 0;
        for (head, f) in done {
            permits += f.descriptors as usize;
            let mut status = [STATUS_UNSET; 1];
            // Read once, by copy: the backend may still scribble on it.
            let at = self.hdr_at + head as usize * HDR_SLOT + STATUS_AT;
            let status = match self.ring_mem.read_at(at, &mut status) {
                Ok(()) => status[0],
                Err(_) => STATUS_UNSET,
            };
            let _ = f.reply.send(Ok(Done {
                data: f.data,
                status,
            }));
        }
        self.descriptors.add_permits(permits);
        (n, violation)
    }

    /// Fails every outstanding request of this queue with `why` and closes its descriptor
    /// budget. Takes `state`.
    fn fail(&self, why: &Failure) {
        let taken: Vec<Inflight> = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if st.failed.is_none() {
                st.failed = Some(why.clone());
            }
            st.ring.abandon_all().into_iter().map(|(_, f)| f).collect()
        };
        self.descriptors.close();
        for f in taken {
            let _ = f.reply.send(Err(why.error()));
        }
        self.work.notify_one();
    }
}

/// State shared by the device handle and its tasks.
#[derive(Debug)]
struct Shared {
    conn: Arc<Connection>,
    queues: Vec<Arc<Queue>>,
    failed: Mutex<Option<Failure>>,
}

impl Shared {
    /// Marks the device failed (first cause wins), closes the connection if the backend
    /// misbehaved, and fails every queue's outstanding requests.
    fn fail(&self, why: Failure) {
        let why = {
            let mut f = self.failed.lock().unwrap_or_else(|p| p.into_inner());
            if f.is_none() {
                match &why {
                    Failure::Disconnected(reason) => {
                        tracing::warn!(%reason, "vhost-user-blk backend disconnected: failing outstanding requests")
                    }
                    Failure::Misbehaved(error) => {
                        tracing::error!(%error, "vhost-user-blk backend broke the virtqueue protocol: closing the connection")
                    }
                }
            }
            f.get_or_insert(why).clone()
        };
        if matches!(why, Failure::Misbehaved(_)) {
            self.conn
                .control
                .close("the backend broke the virtqueue protocol");
        }
        for q in &self.queues {
            if matches!(why, Failure::Disconnected(_)) {
                // Completions the backend published before it went are real: deliver them
                // (validated as ever); only what it never completed fails. A violation found
                // now changes nothing: the device is failing anyway.
                let _ = q.take_completions();
            }
            q.fail(&why);
        }
    }

    fn failure(&self) -> Option<Error> {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(Failure::error)
    }
}

/// What a request does.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes { unmap: bool },
}

impl Op {
    fn type_code(self) -> u32 {
        match self {
            Op::Read => blk::T_IN,
            Op::Write => blk::T_OUT,
            Op::Flush => blk::T_FLUSH,
            Op::Discard => blk::T_DISCARD,
            Op::WriteZeroes { .. } => blk::T_WRITE_ZEROES,
        }
    }
}

/// A virtio-blk device behind a vhost-user backend, whose only shared memory is a
/// [`Pool`] built on a [`crate::VhostUserView`] of the same connection.
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use tidepool::pool::{Pool, PoolConfig};
/// use tidepool_vhost_user_blk::*;
///
/// let conn = tokio::task::spawn_blocking(|| {
///     Connection::connect("/tmp/vhost.sock".as_ref(), &ConnectOptions::default())
/// }).await??;
/// let view = Arc::new(VhostUserView::new(conn.clone(), ViewOptions::new()));
/// let pool = Pool::new(view, PoolConfig::default())?;
/// let dev = BlockDevice::start(conn, pool, DeviceOptions::default()).await?;
/// dev.write_at(0, &[1u8; 4096]).await?;
/// let mut back = [0u8; 4096];
/// dev.read_at(0, &mut back).await?;
/// dev.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct BlockDevice {
    shared: Arc<Shared>,
    pool: Pool,
    opts: DeviceOptions,
    next_queue: AtomicUsize,
    limits: Limits,
    tasks: Vec<JoinHandle<()>>,
}

/// What one queue's setup hands to the blocking control thread.
struct VringSetup {
    index: u32,
    size: u32,
    desc: u64,
    avail: u64,
    used: u64,
    kick: OwnedFd,
    call: OwnedFd,
}

/// Registers one vring with the backend. Blocks (bounded by the control timeout).
fn send_vring(conn: &Connection, v: &VringSetup) -> Result<(), Error> {
    let c = &conn.control;
    let state = |n: u32| Writer::default().u32(v.index).u32(n).0;
    c.call(Request::SetVringNum, &state(v.size), &[], Reply::Ack)?;
    c.call(Request::SetVringBase, &state(0), &[], Reply::Ack)?;
    let addr = Writer::default()
        .u32(v.index)
        .u32(0)
        .u64(v.desc)
        .u64(v.used)
        .u64(v.avail)
        .u64(0)
        .0;
    c.call(Request::SetVringAddr, &addr, &[], Reply::Ack)?;
    let idx = Writer::default().u64(v.index as u64 & !VRING_NOFD_MASK).0;
    c.call(Request::SetVringCall, &idx, &[v.call.as_fd()], Reply::Ack)?;
    c.call(Request::SetVringKick, &idx, &[v.kick.as_fd()], Reply::Ack)?;
    c.call(Request::SetVringEnable, &state(1), &[], Reply::Ack)?;
    Ok(())
}

fn eventfd() -> Result<EventFd, Error> {
    EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).map_err(|e| Error::Io {
        what: "eventfd",
        source: e.into(),
    })
}

fn dup(fd: &EventFd) -> Result<OwnedFd, Error> {
    fd.as_fd().try_clone_to_owned().map_err(|source| Error::Io {
        what: "dup of an eventfd",
        source,
    })
}

impl BlockDevice {
    /// Sets up `opts.queues` virtqueues in `pool` memory, registers them with the backend and
    /// starts the reapers and the liveness watchdog. `pool` must be built on a
    /// [`crate::VhostUserView`] of `conn` (its rings must lie in regions the backend knows).
    /// Must be called within a tokio runtime with the `net` driver (I/O) enabled.
    pub async fn start(
        conn: Arc<Connection>,
        pool: Pool,
        opts: DeviceOptions,
    ) -> Result<BlockDevice, Error> {
        let qs = opts.queue_size;
        if !(4..=tidepool_virtqueue::MAX_QUEUE_SIZE).contains(&qs) || !qs.is_power_of_two() {
            return Err(Error::Config(format!(
                "queue_size {qs} must be a power of two between 4 and 32768"
            )));
        }
        if pool.domain() != conn.domain() {
            return Err(Error::Config(format!(
                "the pool shares through a {} view of another address space ({}); build it on \
                 a VhostUserView of this connection",
                pool.view().kind(),
                pool.domain()
            )));
        }
        let limits = io_limits(&conn, qs, pool.config().max_buffer)?;
        let offered = conn
            .num_queues()
            .map_or(1, |n| conn.max_queues.min(n.max(1)));
        let nq = opts.queues.clamp(1, offered.max(1));
        let layout = Layout::new(qs);
        let hdr_at = layout.total.next_multiple_of(HDR_SLOT);
        let mut queues = Vec::new();
        let mut calls = Vec::new();
        let mut setups = Vec::new();
        for i in 0..nq {
            let mem = pool.alloc(hdr_at + qs as usize * HDR_SLOT).await?;
            // SAFETY: `mem` is a fresh, zeroed pool buffer of at least `layout.total` bytes,
            // naturally aligned (≥ 16), kept alive by the queue (`ring_mem`, declared after
            // `state`) as long as the ring; its first `layout.total` bytes are touched in this
            // process only through the ring (the header table after them is the queue's).
            let mut ring = unsafe { SplitRing::new(mem.as_ptr(), i, qs) }?;
            if opts.completion == CompletionMode::Poll {
                ring.set_no_interrupt(true);
            }
            let (kick, call) = (eventfd()?, eventfd()?);
            let base = mem.device_addr().0 + UADDR_OFFSET;
            setups.push(VringSetup {
                index: i as u32,
                size: qs as u32,
                desc: base + layout.desc as u64,
                avail: base + layout.avail as u64,
                used: base + layout.used as u64,
                kick: dup(&kick)?,
                call: dup(&call)?,
            });
            calls.push(call);
            queues.push(Arc::new(Queue {
                state: Mutex::new(QueueState { ring, failed: None }),
                descriptors: Semaphore::new(qs as usize),
                kick,
                work: Notify::new(),
                ring_mem: mem,
                hdr_at,
            }));
        }
        let c = conn.clone();
        let setup = tokio::task::spawn_blocking(move || -> Result<(), Error> {
            for v in &setups {
                send_vring(&c, v)?;
            }
            c.probe()
        })
        .await
        .map_err(|e| Error::Config(format!("vring setup thread failed: {e}")))
        .and_then(|r| r);
        if let Err(e) = setup {
            // The backend may know some rings whose memory is about to go back to the pool:
            // disconnect it first.
            conn.close();
            return Err(e);
        }

        let shared = Arc::new(Shared {
            conn: conn.clone(),
            queues,
            failed: Mutex::new(None),
        });
        let mut tasks = Vec::new();
        for (q, call) in shared.queues.iter().zip(calls) {
            let (q, s) = (q.clone(), shared.clone());
            tasks.push(match opts.completion {
                CompletionMode::Interrupt => {
                    // SAFETY: the AsyncFd takes ownership of the eventfd, so the fd stays open
                    // and the same for the AsyncFd's whole life.
                    let afd = unsafe { AsyncFd::register(call) }.map_err(|e| Error::Io {
                        what: "registering the call eventfd with tokio",
                        source: e.into(),
                    })?;
                    tokio::spawn(reap_on_interrupt(q, s, afd))
                }
                CompletionMode::Poll => tokio::spawn(reap_by_polling(q, s)),
            });
        }
        tasks.push(tokio::spawn(watch_liveness(
            shared.clone(),
            opts.liveness_interval,
        )));
        Ok(BlockDevice {
            shared,
            pool,
            opts,
            next_queue: AtomicUsize::new(0),
            limits,
            tasks,
        })
    }

    /// Device capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.shared.conn.capacity_bytes()
    }

    /// The device's logical block size: `blk_size` if VIRTIO_BLK_F_BLK_SIZE was negotiated,
    /// else 512. Offsets and lengths must be multiples of 512 B; the backend may refuse ones
    /// that are not multiples of this.
    pub fn block_size(&self) -> u32 {
        self.limits.block_size
    }

    /// Queues in use.
    pub fn queues(&self) -> usize {
        self.shared.queues.len()
    }

    /// The largest single read or write request (a multiple of [`BlockDevice::block_size`]);
    /// longer calls are split. The module doc says how it follows from the backend's config.
    pub fn max_io_bytes(&self) -> usize {
        self.limits.max_io
    }

    /// The pool every byte is bounced through.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The connection.
    pub fn connection(&self) -> &Arc<Connection> {
        &self.shared.conn
    }

    /// Requests outstanding in all queues (timed-out ones the backend never completed
    /// included).
    pub fn outstanding(&self) -> usize {
        self.shared
            .queues
            .iter()
            .map(|q| {
                q.state
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .ring
                    .outstanding()
            })
            .sum()
    }

    /// Reads `buf.len()` bytes at byte `offset` into `buf` (private memory: the data is
    /// bounced through the pool and copied out once). Offset and length must be multiples of
    /// 512. Cancel-safe.
    pub async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.check_range(offset, buf.len() as u64)?;
        let mut at = 0;
        for piece in buf.chunks_mut(self.limits.max_io) {
            let (len, sector) = (piece.len(), (offset + at) / blk::SECTOR);
            let done = self
                .bounded(async {
                    let data = self.pool.alloc(len).await?;
                    self.submit(Op::Read, sector, Some(data)).await
                })
                .await?;
            let data = done.data.as_ref().expect("read requests carry data");
            data.read_at(0, piece)?;
            at += piece.len() as u64;
        }
        Ok(())
    }

    /// Writes `buf` at byte `offset` (copied into pool buffers before the backend sees it).
    /// Offset and length must be multiples of 512. Cancel-safe.
    pub async fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), Error> {
        self.check_range(offset, buf.len() as u64)?;
        let mut at = 0;
        for piece in buf.chunks(self.limits.max_io) {
            let sector = (offset + at) / blk::SECTOR;
            self.bounded(async {
                let mut data = self.pool.alloc(piece.len()).await?;
                data.write_at(0, piece)?;
                self.submit(Op::Write, sector, Some(data)).await
            })
            .await?;
            at += piece.len() as u64;
        }
        Ok(())
    }

    /// Flushes the backend's write cache (needs VIRTIO_BLK_F_FLUSH).
    pub async fn flush(&self) -> Result<(), Error> {
        self.require(features::BLK_FLUSH, "VIRTIO_BLK_F_FLUSH (flush)")?;
        self.bounded(self.submit(Op::Flush, 0, None))
            .await
            .map(|_| ())
    }

    /// Discards `len` bytes at `offset` (needs VIRTIO_BLK_F_DISCARD), in requests of at most
    /// `max_discard_sectors` (0 means no limit, as in Linux).
    pub async fn discard(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.require(features::BLK_DISCARD, "VIRTIO_BLK_F_DISCARD (discard)")?;
        let max = self.shared.conn.max_discard_sectors();
        self.ranged(Op::Discard, offset, len, max).await
    }

    /// Writes zeroes over `len` bytes at `offset`, deallocating if `unmap` and the backend
    /// allows it (needs VIRTIO_BLK_F_WRITE_ZEROES), in requests of at most
    /// `max_write_zeroes_sectors` (0 means no limit, as in Linux).
    pub async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), Error> {
        self.require(
            features::BLK_WRITE_ZEROES,
            "VIRTIO_BLK_F_WRITE_ZEROES (write zeroes)",
        )?;
        let max = self.shared.conn.max_write_zeroes_sectors();
        self.ranged(Op::WriteZeroes { unmap }, offset, len, max)
            .await
    }

    /// Waits (at most `io_timeout`) for outstanding requests, then closes the connection and
    /// stops the tasks. Requests still outstanding then fail with [`Error::Disconnected`].
    /// On return every pool buffer the device held (rings included) is back in the pool.
    pub async fn shutdown(mut self) {
        let deadline = tokio::time::Instant::now() + self.opts.io_timeout;
        while self.outstanding() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Await the stopped tasks so that the rings' pool buffers are free on return.
        for t in self.stop() {
            let _ = t.await;
        }
    }

    /// Closes the connection, fails whatever is outstanding, aborts the tasks and returns
    /// their handles. Idempotent.
    fn stop(&mut self) -> Vec<JoinHandle<()>> {
        self.shared.conn.close();
        self.shared
            .fail(Failure::Disconnected("the device was shut down".into()));
        for t in &self.tasks {
            t.abort();
        }
        std::mem::take(&mut self.tasks)
    }

    fn require(&self, bit: u64, name: &'static str) -> Result<(), Error> {
        if self.shared.conn.has_feature(bit) {
            Ok(())
        } else {
            Err(Error::Unsupported(name))
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), Error> {
        if offset % blk::SECTOR != 0 || len % blk::SECTOR != 0 {
            return Err(Error::Unaligned { offset, len });
        }
        let cap = self.capacity();
        if offset.checked_add(len).is_none_or(|end| end > cap) {
            return Err(Error::OutOfRange {
                offset,
                len,
                capacity: cap,
            });
        }
        Ok(())
    }

    /// DISCARD / WRITE_ZEROES over a range, split by the device's per-request maximum
    /// (`None` or 0: no limit but the field's width).
    async fn ranged(
        &self,
        op: Op,
        offset: u64,
        len: u64,
        max_sectors: Option<u32>,
    ) -> Result<(), Error> {
        self.check_range(offset, len)?;
        let max = u64::from(max_sectors.filter(|&m| m > 0).unwrap_or(u32::MAX));
        let (mut sector, end) = (offset / blk::SECTOR, (offset + len) / blk::SECTOR);
        while sector < end {
            let n = (end - sector).min(max);
            let flags = match op {
                Op::WriteZeroes { unmap: true } => blk::WZ_UNMAP,
                _ => 0,
            };
            let seg = Writer::default().u64(sector).u32(n as u32).u32(flags).0;
            debug_assert_eq!(seg.len(), RANGE_SEG);
            self.bounded(async {
                let mut data = self.pool.alloc(seg.len()).await?;
                data.write_at(0, &seg)?;
                self.submit(op, 0, Some(data)).await
            })
            .await?;
            sector += n;
        }
        Ok(())
    }

    /// Runs one request's whole life (waiting for pool space, for free descriptors, for the
    /// completion) within `io_timeout`. Cancelling `f` at any point is safe: before the
    /// request is published nothing is held; after, its buffers belong to the queue.
    async fn bounded<T>(&self, f: impl Future<Output = Result<T, Error>>) -> Result<T, Error> {
        let timeout = self.opts.io_timeout;
        tokio::time::timeout(timeout, f)
            .await
            .unwrap_or(Err(Error::IoTimeout { timeout }))
    }

    /// Issues one request and awaits its completion, without a deadline of its own: callers
    /// run it within [`BlockDevice::bounded`]. `data` is the request's data buffer, already
    /// filled for requests the device reads.
    async fn submit(&self, op: Op, sector: u64, data: Option<DmaBuf>) -> Result<Done, Error> {
        if let Some(e) = self.shared.failure() {
            return Err(e);
        }
        let header = Writer::default().u32(op.type_code()).u32(0).u64(sector).0;
        let nq = self.shared.queues.len();
        let q = &self.shared.queues[self.next_queue.fetch_add(1, Ordering::Relaxed) % nq];
        let mut chain = vec![Desc {
            addr: 0, // the header slot's address, known once the head is (below)
            len: header.len() as u32,
            device_writes: false,
        }];
        if let Some(d) = &data {
            let seg = self.limits.seg_bytes;
            let base = d.device_addr().0;
            let mut at = 0;
            while at < d.len() {
                let n = seg.min(d.len() - at);
                chain.push(Desc {
                    addr: base + at as u64,
                    len: n as u32,
                    device_writes: op == Op::Read,
                });
                at += n;
            }
        }
        chain.push(Desc {
            addr: 0,
            len: 1,
            device_writes: true,
        });
        if chain.len() > self.opts.queue_size as usize {
            // `io_limits` makes this impossible; waiting for more permits than the queue has
            // would never end.
            return Err(Error::Config(format!(
                "{UNUSABLE}a request of {} descriptors cannot fit a queue of {}",
                chain.len(),
                self.opts.queue_size
            )));
        }
        let permit = q
            .descriptors
            .acquire_many(chain.len() as u32)
            .await
            .map_err(|_| self.failure_or_closed())?;
        let (tx, rx) = oneshot::channel();
        let kick = {
            let mut st = q.state.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(f) = &st.failed {
                return Err(f.error());
            }
            let Some(head) = st.ring.next_head() else {
                return Err(RingError::Full {
                    wanted: chain.len(),
                    free: 0,
                }
                .into());
            };
            let slot = q.hdr_at + head as usize * HDR_SLOT;
            let slot_addr = q.ring_mem.device_addr().0 + slot as u64;
            q.write_header_slot(slot, &header);
            q.write_header_slot(slot + STATUS_AT, &[STATUS_UNSET]);
            let last = chain.len() - 1;
            chain[0].addr = slot_addr;
            chain[last].addr = slot_addr + STATUS_AT as u64;
            let request = Inflight {
                reply: tx,
                data,
                descriptors: chain.len() as u32,
            };
            // On an error the request (never published) is dropped with its buffer.
            let added = st.ring.add(&chain, request).map_err(|(e, _)| e)?;
            debug_assert_eq!(added, head);
            permit.forget();
            // One request, one publish: no batching here.
            st.ring.publish();
            st.ring.needs_kick()
        };
        if kick {
            if let Err(e) = q.kick.write(1) {
                if e != nix::errno::Errno::EAGAIN {
                    self.shared.fail(Failure::Disconnected(format!(
                        "kicking the backend failed: {e}"
                    )));
                }
            }
        }
        if self.opts.completion == CompletionMode::Poll {
            q.work.notify_one();
        }
        let done = match rx.await {
            Ok(r) => r?,
            Err(_) => return Err(self.failure_or_closed()),
        };
        match done.status {
            blk::S_OK => Ok(done),
            blk::S_UNSUPP => Err(Error::Unsupported("the backend refused this request type")),
            s => Err(Error::Device { status: s }),
        }
    }

    fn failure_or_closed(&self) -> Error {
        self.shared
            .failure()
            .unwrap_or_else(|| Error::Disconnected("the device was shut down".into()))
    }
}

impl Drop for BlockDevice {
    /// Closes the connection and fails outstanding requests (their buffers return to the
    /// pool: the backend drops its regions on disconnect). Use [`BlockDevice::shutdown`] to
    /// let outstanding requests finish first.
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Reaper, interrupt mode: sleeps on the call eventfd, drains the used ring after each signal.
/// Exits when the device fails.
async fn reap_on_interrupt(q: Arc<Queue>, dev: Arc<Shared>, call: AsyncFd<EventFd>) {
    loop {
        let Ok(mut ready) = call.readable().await else {
            dev.fail(Failure::Disconnected("the call eventfd failed".into()));
            return;
        };
        // Reset the counter before draining, so a signal for a later completion re-arms us.
        let _ = ready.try_io(|fd| fd.get_ref().read().map_err(io::Error::from));
        q.reap(&dev);
        if dev.failure().is_some() {
            return;
        }
    }
}

/// Reaper, polling mode: polls the used ring while requests are outstanding, sleeps on
/// `work` when none are. Exits when the device fails.
async fn reap_by_polling(q: Arc<Queue>, dev: Arc<Shared>) {
    loop {
        let n = q.reap(&dev);
        if dev.failure().is_some() {
            return;
        }
        let idle = q
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ring
            .outstanding()
            == 0;
        if idle {
            q.work.notified().await;
        } else if n == 0 {
            tokio::task::yield_now().await;
        }
    }
}

/// Watchdog: checks the connection for a hang-up every `every`; fails the device when it is
/// gone, so outstanding requests error out instead of waiting for their timeout.
async fn watch_liveness(dev: Arc<Shared>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        if dev.failure().is_some() {
            return;
        }
        if dev.conn.control.peer_hung_up() {
            let why = match dev.conn.control.dead_error() {
                Error::Disconnected(s) => s,
                e => e.to_string(),
            };
            dev.fail(Failure::Disconnected(why));
            return;
        }
    }
}
