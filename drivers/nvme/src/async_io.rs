//! Async I/O on tokio: `queue.read(&ns, lba, &mut buf).await`, completions driven by MSI-X.
//!
//! # How it works
//! - The queue pair sits in a mutex shared by every task using the queue. Submitting takes the
//!   lock for the time of writing one SQ entry and ringing the doorbell.
//! - A **reaper** task owns the queue's MSI-X eventfd (registered with tokio through
//!   `AsyncFd`). It waits for the interrupt (or a timer, for timeouts), clears the eventfd
//!   *before* reaping (so an interrupt for an entry posted after our reap is never lost), polls
//!   the queue, and sends each result to its waiting task through a oneshot channel. With
//!   `spin` set it first polls for that long before sleeping again (cheaper than an interrupt
//!   round trip at high rates).
//! - Capacity is awaited, never failed: a task waits for a queue slot (a semaphore of `depth`
//!   permits, the permit travels with the command and is released when the reaper drops the
//!   completed command) and for pool memory (`pool.alloc(..).await`, the pool's fair, bounded
//!   wait). The **reaper never awaits the pool** (it only frees): the pool's reaper rule.
//!
//! # Why the bounce buffer is owned, not a borrowed `Mapping`
//! A future can be dropped at any `.await`. If the device were still writing into a buffer the
//! future owned, dropping it would hand memory to the pool while DMA is in flight. So the
//! command's [`DmaBuf`] lives in the queue slot until the device completes it; a cancelled
//! future just stops waiting, and the reaper frees the buffer afterwards. (A
//! `tidepool::pool::Mapping` borrows the caller's memory, so it cannot outlive the future.)

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tidepool::pool::DmaBuf;
use tokio::io::unix::AsyncFd;
use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit, Semaphore};
use vmm_sys_util::eventfd::EventFd;

use crate::controller::Controller;
use crate::error::NvmeError;
use crate::io::Namespace;
use crate::queue::{Done, QueuePair};
use crate::spec::{Command, IoOpcode};

/// What travels with an async command: where to send the result, and its queue slot permit.
#[derive(Debug)]
pub(crate) struct Waiter {
    reply: oneshot::Sender<(Result<u32, NvmeError>, Option<DmaBuf>)>,
    _permit: OwnedSemaphorePermit,
}

/// How an [`AsyncQueue`] waits for completions.
#[derive(Copy, Clone, Debug)]
pub struct AsyncConfig {
    /// Poll this long after each batch before sleeping on the interrupt (0: interrupts only).
    pub spin: Duration,
    /// Wake at least this often to check timeouts and CSTS even without interrupts.
    pub tick: Duration,
}

impl Default for AsyncConfig {
    fn default() -> Self {
        AsyncConfig {
            spin: Duration::from_micros(20),
            tick: Duration::from_millis(100),
        }
    }
}

/// State shared by the handle, the submitting tasks and the reaper.
#[derive(Debug)]
struct Inner {
    ctrl: Controller,
    qp: Mutex<Option<QueuePair<Waiter>>>,
    slots: Arc<Semaphore>,
    stop: Notify,
}

/// An interrupt-driven I/O queue for tokio. Cheap to clone; share it among many tasks.
///
/// Dropping the last handle stops the reaper, which deletes the queue.
///
/// ```no_run
/// # async fn demo(ctrl: tidepool_nvme::Controller) -> Result<(), tidepool_nvme::NvmeError> {
/// use tidepool_nvme::{AsyncConfig, AsyncQueue};
/// let q = AsyncQueue::new(&ctrl, 128, AsyncConfig::default())?;
/// let ns = ctrl.namespace(1)?;
/// let mut buf = vec![0u8; 8192];
/// q.read(&ns, 0, &mut buf).await?;
/// q.write(&ns, 16, &buf).await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct AsyncQueue {
    inner: Arc<Inner>,
    _handle: Arc<StopOnDrop>,
}

/// Tells the reaper to stop when the last [`AsyncQueue`] handle goes.
#[derive(Debug)]
struct StopOnDrop(Arc<Inner>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop.notify_one();
    }
}

/// Locks, ignoring poisoning (the queue's state is consistent between statements).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl AsyncQueue {
    /// Creates an interrupt-driven queue of `depth` and spawns its reaper on the current
    /// tokio runtime (must be called inside one).
    pub fn new(ctrl: &Controller, depth: u32, cfg: AsyncConfig) -> Result<AsyncQueue, NvmeError> {
        let (qp, fd) = ctrl.create_interrupt_queue::<Waiter>(depth)?;
        let depth = usize::from(qp.depth());
        // SAFETY: `EventFd` owns its fd and returns that same fd from `as_raw_fd` until it is
        // dropped, which happens only when the AsyncFd (which owns it) is dropped.
        let afd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|e| NvmeError::Os {
                what: "registering the MSI-X eventfd with tokio",
                source: e.into(),
            })?;
        let inner = Arc::new(Inner {
            ctrl: ctrl.clone(),
            qp: Mutex::new(Some(qp)),
            slots: Arc::new(Semaphore::new(depth)),
            stop: Notify::new(),
        });
        tokio::spawn(reaper(inner.clone(), afd, cfg));
        Ok(AsyncQueue {
            _handle: Arc::new(StopOnDrop(inner.clone())),
            inner,
        })
    }

    /// Reads `dst.len()` bytes at `lba`. Splits at [`Namespace::max_transfer`]; waits for
    /// queue slots and pool memory rather than failing.
    pub async fn read(&self, ns: &Namespace, lba: u64, dst: &mut [u8]) -> Result<(), NvmeError> {
        ns.check(lba, dst.len())?;
        let block = ns.block_bytes() as usize;
        for (i, part) in dst.chunks_mut(ns.max_transfer()).enumerate() {
            let at = lba + (i * ns.max_transfer() / block) as u64;
            let buf = self.inner.ctrl.pool().alloc(part.len()).await?;
            let cmd = ns.rw_command(IoOpcode::Read, at, part.len())?;
            let (result, buf) = self.run(cmd, Some(buf), part.len()).await;
            result?;
            if let Some(buf) = buf {
                buf.read_at(0, part)?;
            }
        }
        Ok(())
    }

    /// Writes `src` at `lba`; splits and waits like [`AsyncQueue::read`].
    pub async fn write(&self, ns: &Namespace, lba: u64, src: &[u8]) -> Result<(), NvmeError> {
        ns.check(lba, src.len())?;
        let block = ns.block_bytes() as usize;
        for (i, part) in src.chunks(ns.max_transfer()).enumerate() {
            let at = lba + (i * ns.max_transfer() / block) as u64;
            let mut buf = self.inner.ctrl.pool().alloc(part.len()).await?;
            buf.write_at(0, part)?;
            let cmd = ns.rw_command(IoOpcode::Write, at, part.len())?;
            self.run(cmd, Some(buf), part.len()).await.0?;
        }
        Ok(())
    }

    /// Reads into a pool buffer (zero copy), returning it.
    pub async fn read_buf(
        &self,
        ns: &Namespace,
        lba: u64,
        buf: DmaBuf,
    ) -> Result<DmaBuf, NvmeError> {
        let cmd = ns.rw_command(IoOpcode::Read, lba, buf.len())?;
        let len = buf.len();
        let (r, buf) = self.run(cmd, Some(buf), len).await;
        r?;
        buf.ok_or_else(|| NvmeError::Unsupported("buffer not returned".into()))
    }

    /// Flushes the volatile write cache.
    pub async fn flush(&self, ns: &Namespace) -> Result<(), NvmeError> {
        self.run(Command::io(IoOpcode::Flush, ns.nsid()), None, 0)
            .await
            .0
            .map(|_| ())
    }

    /// Submits one command once a slot is free and awaits its completion.
    async fn run(
        &self,
        cmd: Command,
        data: Option<DmaBuf>,
        len: usize,
    ) -> (Result<u32, NvmeError>, Option<DmaBuf>) {
        let permit = match self.inner.slots.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => {
                return (
                    Err(NvmeError::QueueGone {
                        qid: 0,
                        why: "closed",
                    }),
                    data,
                )
            }
        };
        let (tx, rx) = oneshot::channel();
        let waiter = Waiter {
            reply: tx,
            _permit: permit,
        };
        {
            let mut guard = lock(&self.inner.qp);
            let Some(qp) = guard.as_mut() else {
                return (
                    Err(NvmeError::QueueGone {
                        qid: 0,
                        why: "deleted",
                    }),
                    data,
                );
            };
            if let Err(e) = qp.submit(cmd, data, len, waiter) {
                return (Err(e.error), e.data);
            }
        }
        match rx.await {
            Ok(r) => r,
            Err(_) => (
                Err(NvmeError::QueueGone {
                    qid: 0,
                    why: "the reaper stopped",
                }),
                None,
            ),
        }
    }
}

/// Reads the eventfd's counter to zero; `WouldBlock` means it already was.
fn clear_eventfd(fd: &EventFd) -> io::Result<bool> {
    match fd.read() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e),
    }
}

/// Polls the queue once and delivers results; false when the queue is gone.
fn reap(inner: &Inner, out: &mut Vec<Done<Waiter>>) -> bool {
    {
        let mut guard = lock(&inner.qp);
        let Some(qp) = guard.as_mut() else {
            return false;
        };
        // An error has already failed every command into `out`; deliver them below.
        let _ = qp.poll(out);
    }
    for d in out.drain(..) {
        // The receiver may be gone (cancelled future): the buffer and permit drop here.
        let _ = d.user.reply.send((d.result, d.data));
    }
    true
}

/// The reaper task: interrupt → clear → poll → deliver; optional spin; timer for timeouts.
async fn reaper(inner: Arc<Inner>, afd: AsyncFd<EventFd>, cfg: AsyncConfig) {
    let mut out = Vec::new();
    loop {
        tokio::select! {
            _ = inner.stop.notified() => break,
            ready = afd.readable() => {
                if let Ok(mut guard) = ready {
                    if !matches!(clear_eventfd(afd.get_ref()), Ok(true)) {
                        guard.clear_ready();
                    }
                }
            }
            _ = tokio::time::sleep(cfg.tick) => {}
        }
        if !reap(&inner, &mut out) {
            break;
        }
        if !cfg.spin.is_zero() {
            let until = Instant::now() + cfg.spin;
            while Instant::now() < until {
                tokio::task::yield_now().await;
                reap(&inner, &mut out);
            }
        }
    }
    // Last handle gone: delete the queue (blocking admin commands, once).
    let qp = lock(&inner.qp).take();
    if let Some(qp) = qp {
        let ctrl = inner.ctrl.clone();
        let _ = tokio::task::spawn_blocking(move || ctrl.delete_queue_pair(qp)).await;
    }
    drop(afd);
}
