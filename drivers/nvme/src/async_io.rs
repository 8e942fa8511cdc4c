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
//!   completed command) and then for pool memory (`pool.alloc(..).await`, the pool's fair,
//!   bounded wait). Slot first: a request waiting behind a full queue holds no pool memory, so
//!   the pool holds what the device can use (at most `depth` transfers), not the backlog; a
//!   slot holder waiting for memory cannot block the in-flight commands whose completions free
//!   it. The **reaper never awaits the pool** (it only frees): the pool's reaper rule.
//!
//! # Why the bounce buffer is owned, not a borrowed `Mapping`
//! A future can be dropped at any `.await`. If the device were still writing into a buffer the
//! future owned, dropping it would hand memory to the pool while DMA is in flight. So the
//! command's [`DmaData`] lives in the queue slot until the device completes it; a cancelled
//! future just stops waiting, and the reaper frees the buffer afterwards. (A
//! `tidepool::pool::Mapping` borrows the caller's memory, so it cannot outlive the future.)

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tidepool::data::DmaData;
use tidepool::pool::DmaBuf;
use tokio::io::unix::AsyncFd;
use tokio::sync::{oneshot, watch, Notify, OwnedSemaphorePermit, Semaphore};
use vmm_sys_util::eventfd::EventFd;

use crate::controller::Controller;
use crate::error::NvmeError;
use crate::io::Namespace;
use crate::queue::{Done, QueuePair};
use crate::spec::{Command, IoOpcode};

/// What travels with an async command: where to send the result, and its queue slot permit.
#[derive(Debug)]
pub(crate) struct Waiter {
    reply: oneshot::Sender<(Result<u32, NvmeError>, Option<DmaData>)>,
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

/// How the reaper was woken, and what it delivered: evidence that MSI-X drives the queue.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct WakeCounts {
    /// Wake-ups by the MSI-X eventfd.
    pub interrupt_wakes: u64,
    /// Interrupts signalled (the eventfd counter summed; one wake may collect several).
    pub interrupts: u64,
    /// Wake-ups by the timer tick ([`AsyncConfig::tick`]).
    pub timer_wakes: u64,
    /// Completions delivered after an interrupt wake (its reap and the spin after it).
    pub completions_after_interrupt: u64,
    /// Completions delivered after a timer wake.
    pub completions_after_timer: u64,
}

/// The reaper's counters (atomics: read by any handle).
#[derive(Debug, Default)]
struct Counters {
    interrupt_wakes: AtomicU64,
    interrupts: AtomicU64,
    timer_wakes: AtomicU64,
    completions_after_interrupt: AtomicU64,
    completions_after_timer: AtomicU64,
}

/// State shared by the handle, the submitting tasks and the reaper.
#[derive(Debug)]
struct Inner {
    ctrl: Controller,
    qp: Mutex<Option<QueuePair<Waiter>>>,
    slots: Arc<Semaphore>,
    stop: Notify,
    counters: Counters,
}

/// An interrupt-driven I/O queue for tokio. Cheap to clone; share it among many tasks.
///
/// Dropping the last handle stops the reaper, which deletes the queue. If the runtime shuts
/// down first (the reaper never runs again), the queue pair's own drop guard deletes the queue
/// on the controller (or resets it) when the last handle goes, before any of its memory is
/// freed. The reaper holds a [`Controller`] handle until it is done, so the controller (and
/// its device) outlive the last `AsyncQueue` by that long: [`AsyncQueue::close`] waits for it,
/// for a caller that drops the controller and opens the device again (a VFIO cdev is bound once
/// at a time).
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
    /// Becomes `true` when the reaper has deleted the queue and dropped its controller handle.
    reaper_done: watch::Receiver<bool>,
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
            });
        // On failure `qp` drops here: its drop guard deletes the queue on the controller
        // (blocking admin commands) and frees its ID before the rings go back to the pool.
        let afd = afd?;
        let inner = Arc::new(Inner {
            ctrl: ctrl.clone(),
            qp: Mutex::new(Some(qp)),
            slots: Arc::new(Semaphore::new(depth)),
            stop: Notify::new(),
            counters: Counters::default(),
        });
        let (done_tx, reaper_done) = watch::channel(false);
        tokio::spawn(reaper(inner.clone(), afd, cfg, done_tx));
        Ok(AsyncQueue {
            _handle: Arc::new(StopOnDrop(inner.clone())),
            inner,
            reaper_done,
        })
    }

    /// Drops this handle and waits until every other handle is gone too and the reaper has
    /// deleted the queue and let go of its [`Controller`] handle. After it returns, dropping
    /// the caller's own `Controller` closes the device. Returns at once if the reaper's runtime
    /// has shut down (the queue pair's drop guard deleted the queue then).
    pub async fn close(self) {
        let mut done = self.reaper_done.clone();
        drop(self);
        // Err: the reaper's task is gone without finishing (its runtime shut down), and with
        // it the controller handle it held.
        let _ = done.wait_for(|finished| *finished).await;
    }

    /// How the reaper has been woken so far (interrupts against timer ticks).
    pub fn wake_counts(&self) -> WakeCounts {
        let c = &self.inner.counters;
        WakeCounts {
            interrupt_wakes: c.interrupt_wakes.load(Ordering::Relaxed),
            interrupts: c.interrupts.load(Ordering::Relaxed),
            timer_wakes: c.timer_wakes.load(Ordering::Relaxed),
            completions_after_interrupt: c.completions_after_interrupt.load(Ordering::Relaxed),
            completions_after_timer: c.completions_after_timer.load(Ordering::Relaxed),
        }
    }

    /// Commands in flight on the device now.
    pub fn outstanding(&self) -> usize {
        lock(&self.inner.qp)
            .as_ref()
            .map_or(0, QueuePair::outstanding)
    }

    /// Reads `dst.len()` bytes at `lba`. Splits at [`Namespace::max_transfer`]; waits for
    /// queue slots and pool memory rather than failing. Each command first waits for its queue
    /// slot and only then for its bounce buffer, so a request queued behind a full queue holds
    /// no pool memory: the pool holds what the device can use, not the backlog.
    pub async fn read(&self, ns: &Namespace, lba: u64, dst: &mut [u8]) -> Result<(), NvmeError> {
        ns.check(lba, dst.len())?;
        let block = ns.block_bytes() as usize;
        for (i, part) in dst.chunks_mut(ns.max_transfer()).enumerate() {
            let at = lba + (i * ns.max_transfer() / block) as u64;
            let cmd = ns.rw_command(IoOpcode::Read, at, part.len())?;
            let slot = self.slot().await?;
            let buf = self.inner.ctrl.pool().alloc(part.len()).await?;
            let (result, buf) = self
                .submit_and_wait(slot, cmd, Some(buf.into()), part.len())
                .await;
            result?;
            if let Some(buf) = buf.and_then(DmaData::into_buf) {
                buf.read_at(0, part)?;
            }
        }
        Ok(())
    }

    /// Writes `src` at `lba`; splits and waits like [`AsyncQueue::read`] (queue slot first,
    /// then the buffer).
    pub async fn write(&self, ns: &Namespace, lba: u64, src: &[u8]) -> Result<(), NvmeError> {
        ns.check(lba, src.len())?;
        let block = ns.block_bytes() as usize;
        for (i, part) in src.chunks(ns.max_transfer()).enumerate() {
            let at = lba + (i * ns.max_transfer() / block) as u64;
            let cmd = ns.rw_command(IoOpcode::Write, at, part.len())?;
            let slot = self.slot().await?;
            let buf = self.inner.ctrl.pool().alloc_from(part).await?;
            self.submit_and_wait(slot, cmd, Some(buf.into()), part.len())
                .await
                .0?;
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
        let (r, buf) = self.run(cmd, Some(buf.into()), len).await;
        r?;
        buf.and_then(DmaData::into_buf)
            .ok_or_else(|| NvmeError::Unsupported("buffer not returned".into()))
    }

    /// Reads `data.len()` bytes at `lba` into `data` (owned: a pool buffer, or caller memory
    /// bounced or mapped as [`tidepool::data::DmaPolicy::prepare_wait`] chose) and gives the
    /// data back with the result; [`DmaData::complete`] then copies a bounce out. If this
    /// future is dropped, the data stays with the command until the device is done with it.
    /// One command: at most [`Namespace::max_transfer`] bytes.
    pub async fn read_data(
        &self,
        ns: &Namespace,
        lba: u64,
        data: DmaData,
    ) -> (Result<(), NvmeError>, Option<DmaData>) {
        self.rw_data(ns, IoOpcode::Read, lba, data).await
    }

    /// Writes `data` at `lba`; see [`AsyncQueue::read_data`].
    pub async fn write_data(
        &self,
        ns: &Namespace,
        lba: u64,
        data: DmaData,
    ) -> (Result<(), NvmeError>, Option<DmaData>) {
        self.rw_data(ns, IoOpcode::Write, lba, data).await
    }

    async fn rw_data(
        &self,
        ns: &Namespace,
        op: IoOpcode,
        lba: u64,
        data: DmaData,
    ) -> (Result<(), NvmeError>, Option<DmaData>) {
        let len = data.len();
        let cmd = match ns.rw_command(op, lba, len) {
            Ok(cmd) => cmd,
            Err(e) => return (Err(e), Some(data)),
        };
        let (r, data) = self.run(cmd, Some(data), len).await;
        (r.map(|_| ()), data)
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
        data: Option<DmaData>,
        len: usize,
    ) -> (Result<u32, NvmeError>, Option<DmaData>) {
        match self.slot().await {
            Ok(permit) => self.submit_and_wait(permit, cmd, data, len).await,
            Err(e) => (Err(e), data),
        }
    }

    /// Waits for a free queue slot.
    async fn slot(&self) -> Result<OwnedSemaphorePermit, NvmeError> {
        self.inner
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| NvmeError::QueueGone {
                qid: 0,
                why: "closed",
            })
    }

    /// Submits one command in the queue slot `permit` holds and awaits its completion.
    async fn submit_and_wait(
        &self,
        permit: OwnedSemaphorePermit,
        cmd: Command,
        data: Option<DmaData>,
        len: usize,
    ) -> (Result<u32, NvmeError>, Option<DmaData>) {
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

/// Reads the eventfd's counter to zero, returning it; `WouldBlock` means it already was (0).
fn clear_eventfd(fd: &EventFd) -> io::Result<u64> {
    match fd.read() {
        Ok(n) => Ok(n),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
        Err(e) => Err(e),
    }
}

/// Polls the queue once (with the health check if `check`) and delivers results, counting
/// them in `delivered` first (so a task woken by its result already sees itself counted).
/// Returns `None` when the queue is gone.
fn reap(
    inner: &Inner,
    out: &mut Vec<Done<Waiter>>,
    check: bool,
    delivered: &AtomicU64,
) -> Option<()> {
    {
        let mut guard = lock(&inner.qp);
        let qp = guard.as_mut()?;
        // An error has already failed every command into `out`; deliver them below.
        let _ = if check {
            qp.poll_checked(out)
        } else {
            qp.poll(out)
        };
    }
    delivered.fetch_add(out.len() as u64, Ordering::Relaxed);
    for d in out.drain(..) {
        // The receiver may be gone (cancelled future): the buffer and permit drop here.
        let _ = d.user.reply.send((d.result, d.data));
    }
    Some(())
}

/// Why the reaper woke.
#[derive(Copy, Clone, PartialEq, Eq)]
enum Wake {
    Interrupt,
    Timer,
}

/// The reaper task: interrupt → clear → poll → deliver; optional spin; timer for timeouts.
async fn reaper(
    inner: Arc<Inner>,
    afd: AsyncFd<EventFd>,
    cfg: AsyncConfig,
    done: watch::Sender<bool>,
) {
    let mut out = Vec::new();
    let c = &inner.counters;
    loop {
        let wake = tokio::select! {
            _ = inner.stop.notified() => break,
            ready = afd.readable() => {
                if let Ok(mut guard) = ready {
                    match clear_eventfd(afd.get_ref()) {
                        Ok(n) if n > 0 => {
                            c.interrupts.fetch_add(n, Ordering::Relaxed);
                        }
                        _ => guard.clear_ready(),
                    }
                }
                c.interrupt_wakes.fetch_add(1, Ordering::Relaxed);
                Wake::Interrupt
            }
            _ = tokio::time::sleep(cfg.tick) => {
                c.timer_wakes.fetch_add(1, Ordering::Relaxed);
                Wake::Timer
            }
        };
        let counter = match wake {
            Wake::Interrupt => &c.completions_after_interrupt,
            Wake::Timer => &c.completions_after_timer,
        };
        // A timer wake is the time to check timeouts and CSTS: nothing else may poll.
        if reap(&inner, &mut out, wake == Wake::Timer, counter).is_none() {
            break;
        }
        if !cfg.spin.is_zero() {
            let until = Instant::now() + cfg.spin;
            while Instant::now() < until {
                tokio::task::yield_now().await;
                reap(&inner, &mut out, false, counter);
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
    // The last controller handle of the queue's: after this, `close` may return.
    drop(inner);
    done.send_replace(true);
}
