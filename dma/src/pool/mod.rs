//! The pool: device-visible buffers whose allocation awaits capacity instead of failing.
//!
//! # Shape
//! A [`Pool`] holds chunks of DMA memory ([`crate::memory::Chunk`]) that one
//! [`DeviceView`] has made device-visible (one IOMMU mapping per chunk). Buffers are carved
//! from chunks by a buddy allocator ([`buddy`]) in power-of-two sizes from 512 B to
//! `max_buffer` (2 MiB by default), naturally aligned within their chunk. Chunks must sit at
//! device addresses aligned to at least 4 KiB (checked; the VFIO view aligns them to 2 MiB), so
//! a buffer of 4 KiB or more is 4 KiB aligned (NVMe PRPs need that), and a buffer of size 2^k
//! never crosses a 2^k boundary of the device address space up to the chunk's alignment.
//! Power-of-two rounding wastes up to half a buffer in the worst case (a 2.1 KiB request takes
//! 4 KiB); storage and network sizes cluster on powers of two, and it buys O(1) per-core caches
//! and natural alignment. [`PoolStats::in_use_bytes`] counts the rounded sizes.
//!
//! # Paths
//! - **Hot path** (`cache`): the calling CPU's cache of free blocks, one uncontended
//!   spinlock; the buffer's reference to the pool comes from the same cache (no shared
//!   reference count is touched per buffer).
//! - **Slow path**: the shared [`arena`] under one mutex (`global`), refilling caches in
//!   batches. Never held across a system call.
//! - **Waiting** ([`Pool::alloc`], [`Pool::map`]): when the arena has nothing (or only the
//!   reserve) left, the request joins the [`WaitQueue`] (FIFO, size-aware, with an aging bound,
//!   see [`crate::wait`]), the grower is woken, and the future parks. Released space goes to
//!   the oldest waiter it fits. A dropped future loses nothing: a grant it never took goes back
//!   and to the next waiter. While anyone waits, newcomers queue behind them (no barging) and
//!   releases bypass the per-core caches so waiters see the space. A released block whose
//!   size is what the first waiter offered space wants goes to it as it is (no buddy free and
//!   allocation in between: `Shared::give_back_one`).
//! - **Pre-zeroed blocks**: the grower zeroes released blocks in the per-core caches ahead of
//!   time, within a budget, while the pool is idle enough, and marks them
//!   (`Block::zeroed`); requests that hand the device a zero block (`alloc`,
//!   `FromDevice` maps) take a marked block first and skip their zeroing pass, so a bounced
//!   read does one pass over the memory (the copy out), not two. Requests that overwrite
//!   their block take an unmarked one first. [`PoolStats::prezero_hits`] and
//!   [`PoolStats::prezero_misses`] count how often it worked.
//! - **Immediate path** ([`Pool::try_alloc`], [`Pool::try_map`]): for pollers and completion
//!   reapers, which must never wait. Cache, then the arena including the **reserve**
//!   (`reserve_bytes` kept back from awaitable requests), then, if enabled, a **transient** chunk
//!   made just for this burst and given back as soon as it is idle, then
//!   [`PoolError::Exhausted`] with the pool's state (and, when the pool could not grow, the
//!   typed cause: [`PoolError::growth_cause`]). It never waits for a lock held across a
//!   system call.
//! - **Grower** (`grower`): a dedicated thread (mmap, hugepage faults and VFIO ioctls block:
//!   never on an async worker) that grows by whole chunks when free space falls below the low
//!   watermark or anyone waits, up to `max_bytes`; after a failure retries with a bounded
//!   exponential backoff (1 ms, doubling, at most 1 s; reset by a success); and gives back
//!   chunks idle for `shrink_delay` when enough would stay free (hysteresis), never below the
//!   prefill.
//!
//! # When growth fails (the growth-failure rule)
//! Growth can fail for as long as its cause lasts (no free hugepages, the VFIO or vhost-user
//! mapping limit, `RLIMIT_MEMLOCK`). A waiter must not wait for it forever, nor fail on a
//! stale failure while growth may work, so every growth attempt has an id, each waiter notes
//! how many attempts had begun when it queued, and an attempt that begins later is *on its
//! behalf* (it is sized by every byte waiting when it begins). A failed attempt wakes every
//! waiter; below the cap, a waiter ends with [`PoolError::GrowthFailed`], carrying the
//! failure's typed cause, when the latest attempt to finish failed and:
//! - [`AtCap::Fail`]: that attempt was on its behalf, or it has waited `grow_after` while the
//!   grower is still backing off from earlier failures;
//! - [`AtCap::Wait`]: it has waited `growth_failure_wait` (for released space meanwhile), and
//!   that attempt was on its behalf or the grower is backing off.
//!
//! So a waiter ends within its bound: `grow_after` (Fail) or `growth_failure_wait` (Wait),
//! plus at most one backoff (≤ 1 s) and one attempt, when growth keeps failing. A backoff is
//! never cut short (waiters past their bound end instead of forcing attempts), so callers
//! that retry at once cannot make the grower hammer a failing system call. Any success
//! clears the failure, and later waits are served by growth again. At the cap, growth is not
//! what a waiter waits for and `at_cap` decides.
//!
//! # The reaper rule
//! A task that reaps completions for a device must use only the immediate path. If it awaited
//! its own pool, it could wait for space that only its own reaping would free: a deadlock.
//!
//! # Security
//! Every buffer handed out is zeroed, or fully overwritten by the caller's data for this
//! mapping, before its device address is returned: a device never sees another mapping's bytes.
//! A block counts as zeroed without a pass on the hot path only if it carries the pre-zeroed
//! mark, which only the grower sets, right after zeroing a block it took out of a cache's list
//! of free blocks (owned by it alone: no buffer, no device address), and which every buffer
//! clears as it takes its block: a block a caller or device may have written never carries it
//! (loom model (j) and the `prezero_props` property test).

pub mod arena;
pub mod buddy;
mod buf;
mod cache;
mod config;
mod error;
mod grower;
mod mapping;
mod stats;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

pub use buf::DmaBuf;
pub use config::{AtCap, PoolConfig, Throttle, MAX_GROWTH_THREADS, MIN_BUFFER};
pub use error::PoolError;
pub use grower::MaintainReport;
pub use mapping::{Direction, MapFuture, Mapping, UserBuf};
pub use stats::{PoolStats, WaitBucket, WaitPercentiles, LONG_WAIT, WAIT_BUCKET_BOUNDS_NS};

use crate::memory::Chunk;
use crate::share::DeviceView;
use crate::sync::{Arc, AtomicUsize, Mutex, Ordering};
use crate::wait::{LazyNow, Ticket, WaitQueue, WakeList};

use arena::{Arena, Block};
use buddy::Buddy;
use cache::{Caches, CoreCache, CREDITS_BATCH, CREDITS_MAX};
use stats::{Counters, WaitTimes};

/// A pool of device-visible DMA buffers. Cheap to clone (all clones share one pool).
///
/// ```no_run
/// # async fn demo() -> Result<(), tidepool::pool::PoolError> {
/// use std::sync::Arc;
/// use tidepool::pool::{Direction, Pool, PoolConfig};
/// use tidepool::share::identity::Identity;
///
/// let pool = Pool::new(Arc::new(Identity::new()), PoolConfig::default())?;
/// let data = vec![7u8; 4096];
/// let mapping = pool.map(&data[..], Direction::ToDevice).await?;
/// let iova = mapping.device_addr(); // put this in a command for the device
/// # let _ = iova;
/// mapping.unmap();
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Pool {
    shared: Arc<Shared>,
    /// Shared by every clone of this handle; the last one to go closes the per-CPU caches'
    /// credits (see [`Handle`]).
    _handle: Arc<Handle>,
}

/// What all clones of a [`Pool`] handle share. Dropping it (the last handle is gone) breaks the
/// reference cycle the caches' credits make: see [`cache::CoreCache::credits`]. Buffers still
/// alive keep the pool until they are released.
#[derive(Debug)]
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        // Dropped outside every cache lock; our own reference keeps the pool alive meanwhile.
        drop(self.shared.caches.close());
    }
}

/// A block taken from the pool and the reference to the pool that the buffer made from it will
/// own (from the CPU's cache credits on the hot path, a plain clone elsewhere).
#[derive(Debug)]
pub(crate) struct Claim {
    pub block: Block,
    pub pool: Arc<Shared>,
}

/// Everything the pool's handles, buffers and grower share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub cfg: PoolConfig,
    /// std's `Arc` in every build (under loom too): the view is not part of the pool's
    /// synchronisation, and `Pool::new` keeps one signature for the loom models and the rest
    /// of the crate's tests.
    pub view: std::sync::Arc<dyn DeviceView>,
    pub caches: Caches,
    /// The arena, the waiter queue and the grower's bookkeeping. The only lock of the slow path.
    pub global: Mutex<Global>,
    /// A mirror of `global.queue.waiting()`, written under `global`, read without it on the hot
    /// path to decide whether releases must go to waiters. A stale read is harmless: a release
    /// that misses a brand-new waiter lands in a cache, and the grower's drain or forced growth
    /// (after `grow_after`) bounds how long that waiter can be left behind it.
    pub waiting: AtomicUsize,
    pub counters: Counters,
    pub grower: Arc<grower::Signal>,
}

/// What a waiter is granted: a block, and when (the end of its wait, for the wait-time
/// histogram: the waiter needs no clock read of its own to take it).
#[derive(Debug)]
pub(crate) struct Grant {
    pub block: Block,
    pub at: Instant,
}

/// State behind [`Shared::global`].
#[derive(Debug)]
pub(crate) struct Global {
    pub arena: Arena,
    pub queue: WaitQueue<Grant>,
    /// Waiters with a deadline (timeouts, `AtCap::Fail`, the growth-failure bound):
    /// (deadline, waiter id) → waker. The grower wakes them when the deadline passes so that
    /// they can give up.
    pub deadlines: std::collections::BTreeMap<(Instant, u64), std::task::Waker>,
    /// The next waiter id.
    pub next_waiter_id: u64,
    /// Growth attempts and whether the latest failed.
    pub growth: grower::GrowthRecord,
    /// Bytes the grower is making right now (not yet in the arena), counted against the cap.
    pub growing_bytes: u64,
    /// Allocated bytes when the grower last looked, and when: the rate at which demand rises
    /// (see `grower`, "Grow").
    pub allocated_seen: u64,
    pub seen_at: Instant,
    /// How long the latest growth attempt took, from its start to its last chunk.
    pub last_growth_took: Duration,
    /// Transient chunks that went idle, for the grower to unshare and free.
    pub retired: Vec<u32>,
    /// When the pool last grew (shrinking waits `shrink_delay` after it).
    pub last_grow: Option<Instant>,
    /// Growth failed: don't try again before this (see [`grower`]).
    pub backoff_until: Option<Instant>,
    /// The backoff after the next failure.
    pub backoff: Duration,
    /// [`Throttle`] in force: awaitable requests wait.
    pub throttled: bool,
    /// The decaying recent peak of allocated bytes (see `PoolConfig::peak_half_life`), and
    /// when it was last decayed.
    pub recent_peak: f64,
    pub peak_updated: Instant,
    /// Bytes handed out minus bytes taken back by the slow paths, which hold this lock anyway
    /// (a waiter's grant, arena allocations, releases that go to the arena); the per-CPU
    /// caches count the fast path's. [`PoolStats::in_use_bytes`] is the sum.
    pub in_use: i64,
    /// Requests wanting a zero block that the slow paths served (never pre-zeroed).
    pub zero_misses: u64,
    /// Completed waits (count, total, histogram).
    pub wait_times: WaitTimes,
}

/// Which path a request came from, for the reserve rule.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Caller {
    /// May wait: must leave the reserve alone.
    Awaitable,
    /// Must not wait: may use the reserve.
    Immediate,
}

impl Pool {
    /// Makes a pool over `view`, prefilling `cfg.prefill_bytes` (made and shared now, blocking)
    /// and starting the grower thread unless `cfg.background` is off.
    ///
    /// Fails with the configuration's, the memory's or the view's error, or with
    /// [`PoolError::GrowerSpawn`] if the grower thread cannot be started; everything made
    /// so far is unshared and freed first.
    pub fn new(view: std::sync::Arc<dyn DeviceView>, cfg: PoolConfig) -> Result<Pool, PoolError> {
        #[cfg(not(loom))]
        let start = |shared: &Arc<Shared>| grower::spawn(shared, &mut grower::spawn_thread);
        #[cfg(loom)]
        let start = grower::spawn;
        Pool::build(view, cfg, start)
    }

    /// [`Pool::new`] with the grower started by `start` (tests inject a failing spawn).
    fn build(
        view: std::sync::Arc<dyn DeviceView>,
        cfg: PoolConfig,
        start: impl FnOnce(&Arc<Shared>) -> Result<(), PoolError>,
    ) -> Result<Pool, PoolError> {
        cfg.validate()?;
        let shared = Arc::new(Shared {
            caches: Caches::new(
                PoolConfig::min_order(),
                cfg.max_order(),
                if cfg.throttle.is_some() {
                    0
                } else {
                    cfg.cache_bytes_per_class
                },
            ),
            global: Mutex::new(Global {
                arena: Arena::default(),
                queue: WaitQueue::new(cfg.fairness),
                deadlines: Default::default(),
                next_waiter_id: 0,
                growth: Default::default(),
                growing_bytes: 0,
                allocated_seen: 0,
                seen_at: Instant::now(),
                last_growth_took: Duration::ZERO,
                retired: Vec::new(),
                last_grow: None,
                backoff_until: None,
                backoff: grower::MIN_BACKOFF,
                throttled: false,
                recent_peak: 0.0,
                peak_updated: Instant::now(),
                in_use: 0,
                zero_misses: 0,
                wait_times: WaitTimes::new(cfg.histogram_max_ns),
            }),
            waiting: AtomicUsize::new(0),
            counters: Counters::new(),
            grower: Arc::new(grower::Signal::default()),
            view,
            cfg,
        });
        for _ in 0..shared.cfg.prefill_bytes / shared.cfg.chunk_bytes {
            let (chunk, dev, buddy) = shared.make_chunk(shared.cfg.chunk_bytes)?;
            let mut g = shared.global.lock().unwrap();
            g.arena.insert(chunk, dev, buddy, false);
            shared.publish_capacity(&g);
        }
        if shared.cfg.background {
            // On failure `shared` is dropped here, unsharing and freeing the prefill.
            start(&shared)?;
        }
        Ok(Pool {
            _handle: Arc::new(Handle {
                shared: shared.clone(),
            }),
            shared,
        })
    }

    /// The pool's configuration.
    pub fn config(&self) -> &PoolConfig {
        &self.shared.cfg
    }

    /// The device view the pool shares its chunks through.
    pub fn view(&self) -> &std::sync::Arc<dyn DeviceView> {
        &self.shared.view
    }

    /// The DMA address space of this pool's buffers ([`DeviceView::domain`] of its view).
    pub fn domain(&self) -> crate::share::DomainId {
        self.shared.view.domain()
    }

    /// An owned, zeroed device-visible buffer of at least `len` bytes, waiting for capacity if
    /// there is none. Cancel-safe: dropping the future at any point loses nothing.
    pub fn alloc(&self, len: usize) -> Alloc<'_> {
        Alloc::new(self, len, None, true)
    }

    /// As [`Pool::alloc`], failing with [`PoolError::Timeout`] after `timeout`.
    pub fn alloc_timeout(&self, len: usize, timeout: Duration) -> Alloc<'_> {
        Alloc::new(self, len, Some(timeout), true)
    }

    /// An owned buffer holding a copy of `src` (the rest of its block zeroed), waiting for
    /// capacity if there is none: the owned form of `map(src, ToDevice)`.
    ///
    /// Drivers whose requests may be cancelled while the device still uses the buffer need
    /// this form: the buffer can be parked with the in-flight command instead of borrowing the
    /// caller's memory. Read the device's answer back with [`DmaBuf::read_at`] (one copy).
    pub fn alloc_from<'p, 's>(&'p self, src: &'s [u8]) -> AllocFrom<'p, 's> {
        AllocFrom {
            alloc: Alloc::new(self, src.len(), None, false),
            src,
        }
    }

    /// The immediate-path [`Pool::alloc_from`]: never waits.
    #[inline(always)]
    pub fn try_alloc_from(&self, src: &[u8]) -> Result<DmaBuf, PoolError> {
        let order = self.check_len(src.len())?;
        let claim = Shared::alloc_immediate(&self.shared, order, src.len(), false)?;
        Ok(DmaBuf::new_filled(claim, src))
    }

    /// An owned, zeroed buffer now, or an error: never waits (the immediate path). Uses the
    /// per-core cache, the arena *and its reserve*, then a transient chunk if enabled.
    #[inline(always)]
    pub fn try_alloc(&self, len: usize) -> Result<DmaBuf, PoolError> {
        let order = self.check_len(len)?;
        let claim = Shared::alloc_immediate(&self.shared, order, len, true)?;
        Ok(DmaBuf::new_zeroed(claim, len))
    }

    /// A snapshot of the pool's state and history.
    pub fn stats(&self) -> PoolStats {
        self.shared.stats()
    }

    /// Runs one step of the grower's work on the calling thread: retire idle transient chunks,
    /// expire deadlines, grow if needed, shrink if allowed. The background thread calls this;
    /// with `background: false` (tests, models) the caller does. Blocks while growing.
    pub fn maintain(&self) -> MaintainReport {
        self.shared.maintain(Instant::now())
    }

    /// Validates a length and returns its size class.
    #[inline]
    fn check_len(&self, len: usize) -> Result<u32, PoolError> {
        if len == 0 || len > self.shared.cfg.max_buffer {
            return Err(self.bad_len(len));
        }
        Ok(self.shared.cfg.order_for(len))
    }

    /// The error for a length [`Pool::check_len`] refused.
    #[cold]
    fn bad_len(&self, len: usize) -> PoolError {
        if len == 0 {
            PoolError::ZeroLength
        } else {
            PoolError::TooLarge {
                len,
                max: self.shared.cfg.max_buffer,
            }
        }
    }
}

impl Shared {
    /// Makes a chunk of `len` bytes and shares it. Blocks; holds no lock.
    fn make_chunk(&self, len: usize) -> Result<(Chunk, crate::DeviceAddr, Buddy), PoolError> {
        let chunk = Chunk::new(len, &self.cfg.memory)?;
        let dev = self.view.share(&chunk.region())?;
        if dev.0 % crate::pool::buf::DEVICE_PAGE as u64 != 0 {
            let _ = self.view.unshare(&chunk.region(), dev);
            return Err(PoolError::Misaligned {
                addr: dev.0 as usize,
                align: crate::pool::buf::DEVICE_PAGE,
            });
        }
        let end = dev.0.checked_add(len as u64 - 1);
        if end.is_none_or(|e| e > self.cfg.dma_mask) {
            let _ = self.view.unshare(&chunk.region(), dev);
            return Err(PoolError::AboveDmaMask {
                addr: dev.0,
                len,
                mask: self.cfg.dma_mask,
            });
        }
        // Growth chunks are whole max_buffers (validated); a transient chunk may be one smaller
        // block, a power of two or whole pages: its top order is what its length allows.
        let max_order = self
            .cfg
            .max_order()
            .min(len.trailing_zeros())
            .max(PoolConfig::min_order());
        let buddy = Buddy::new(len as u64, PoolConfig::min_order(), max_order).expect(
            "a chunk is whole blocks of its top order (growth: max_buffers; transient: its block)",
        );
        Ok((chunk, dev, buddy))
    }

    /// Whether another chunk fits under the cap (chunks being made count as made: their
    /// outcome decides). Call with `global` held.
    fn can_grow(&self, g: &Global) -> bool {
        g.arena.capacity_bytes + self.cfg.chunk_bytes as u64 <= self.cfg.max_bytes as u64
    }

    /// The growth-failure rule (module doc): if the waiter that queued at `since`, after
    /// `attempts_before` growth attempts had begun, must now end because the pool cannot grow,
    /// the cause and how many attempts failed in a row. Call with `global` held.
    fn growth_failed_for(
        &self,
        g: &Global,
        since: Instant,
        attempts_before: u64,
        now: Instant,
    ) -> Option<(std::sync::Arc<PoolError>, u64)> {
        let failure = g.growth.failing.as_ref()?;
        if !self.can_grow(g) {
            // At the cap growth is not what the waiter waits for: `at_cap` decides.
            return None;
        }
        let on_its_behalf = failure.attempt > attempts_before;
        let backing_off = g.backoff_until.is_some_and(|t| t > now);
        let waited = now.saturating_duration_since(since);
        let ends = match self.cfg.at_cap {
            AtCap::Fail => on_its_behalf || (backing_off && waited >= self.cfg.grow_after),
            AtCap::Wait => waited >= self.cfg.growth_failure_wait && (on_its_behalf || backing_off),
        };
        ends.then(|| (failure.cause.clone(), failure.failures))
    }

    /// When a waiter that queued at `since` must next be woken to check whether it ends (its
    /// timeout, the `AtCap::Fail` recheck, the growth-failure bound), given its current
    /// deadline `armed`. Always in the future, so a woken waiter cannot make the grower spin.
    /// Call with `global` held.
    fn next_deadline(
        &self,
        g: &Global,
        timeout: Option<Duration>,
        since: Instant,
        now: Instant,
        armed: Option<Instant>,
    ) -> Option<Instant> {
        let cfg = &self.cfg;
        let mut at: Option<Instant> = None;
        let mut consider = |t: Instant| {
            if t > now {
                at = Some(at.map_or(t, |a| a.min(t)));
            }
        };
        if let Some(t) = timeout {
            consider(since + t);
        }
        if cfg.at_cap == AtCap::Fail {
            // At since + grow_after, then every grow_after (at least 1 ms) while growth goes
            // on: is the pool at its cap yet?
            let first = since + cfg.grow_after;
            consider(if first > now {
                first
            } else {
                armed
                    .filter(|&a| a > now)
                    .unwrap_or(now + cfg.grow_after.max(Duration::from_millis(1)))
            });
        }
        if g.growth.failing.is_some() {
            let bound = match cfg.at_cap {
                AtCap::Fail => cfg.grow_after,
                AtCap::Wait => cfg.growth_failure_wait,
            };
            consider(since + bound);
        }
        at
    }

    /// The grower's latest failure, if growth is failing below the cap: why the immediate
    /// path has nothing. Takes the pool lock.
    fn growth_failure(&self) -> Option<std::sync::Arc<PoolError>> {
        let g = self.global.lock().unwrap();
        let f = g.growth.failing.as_ref()?;
        self.can_grow(&g).then(|| f.cause.clone())
    }

    /// Copies the arena's capacity figures to the stats. Call with `global` held.
    fn publish_capacity(&self, g: &Global) {
        let c = &self.counters;
        c.capacity_bytes
            .store(g.arena.capacity_bytes, Ordering::Relaxed);
        c.chunks.store(g.arena.chunks, Ordering::Relaxed);
        // Only writers hold the pool lock, so a plain load tells whether the peak moved: no
        // read-modify-write on every release and dispatch.
        if g.arena.allocated_bytes > c.peak_allocated_bytes.load(Ordering::Relaxed) {
            c.peak_allocated_bytes
                .store(g.arena.allocated_bytes, Ordering::Relaxed);
        }
    }

    /// Hot path: a block from this CPU's cache, with a pool reference from the same cache's
    /// credits (topped up with a batch of clones when it has none). Awaitable callers skip it
    /// while anyone waits (no barging past the queue). Takes the cache lock.
    ///
    /// `want_zero` (the caller hands the device a zero block: `alloc`, `FromDevice`) takes a
    /// pre-zeroed block first and counts the hit or miss; other callers overwrite the block
    /// and take a released one first, leaving the zeroed ones for those who need them.
    #[inline(always)]
    fn alloc_cached(
        this: &Arc<Self>,
        order: u32,
        caller: Caller,
        want_zero: bool,
    ) -> Option<Claim> {
        if caller == Caller::Awaitable && this.waiting.load(Ordering::Relaxed) > 0 {
            return None;
        }
        if this.caches.limit(order) == 0 {
            return None;
        }
        let mut c = this.caches.local();
        let class = this.caches.class(order);
        let block = if want_zero {
            match c.zeroed[class].pop() {
                Some(b) => {
                    c.zero_hits += 1;
                    b
                }
                None => {
                    let b = c.classes[class].pop()?;
                    c.zero_misses += 1;
                    b
                }
            }
        } else {
            match c.classes[class].pop() {
                Some(b) => b,
                None => c.zeroed[class].pop()?,
            }
        };
        c.in_use += block.size() as i64;
        let pool = match c.credits.pop() {
            Some(p) => p,
            None => Shared::top_up_credits(this, &mut c),
        };
        Some(Claim { block, pool })
    }

    /// A cache ran out of credits: one reference for the caller and a batch more for the cache.
    #[cold]
    #[inline(never)]
    fn top_up_credits(this: &Arc<Self>, cache: &mut CoreCache) -> Arc<Shared> {
        // Allocating needs a pool handle, so the caches are open; should that ever change, a
        // closed cache must not take credits (they would keep the pool alive forever).
        if !cache.closed {
            cache
                .credits
                .extend((1..CREDITS_BATCH).map(|_| Arc::clone(this)));
        }
        Arc::clone(this)
    }

    /// Slow path: a block from the arena under the pool lock, refilling this CPU's cache on
    /// the way. Awaitable callers must leave `reserve_bytes` free and may not pass waiters.
    /// Returns None if the caller must wait (or, immediate, try something else).
    fn alloc_arena(&self, g: &mut Global, order: u32, caller: Caller) -> Option<Block> {
        let size = 1u64 << order;
        let block = match caller {
            Caller::Awaitable => {
                if g.queue.has_waiters()
                    || g.throttled
                    || g.arena.free_bytes < size + self.cfg.reserve_bytes as u64
                {
                    return None;
                }
                let b = g.arena.alloc(order, false)?;
                self.update_throttle(g);
                b
            }
            Caller::Immediate => {
                let before = g.arena.free_bytes;
                let b = g.arena.alloc(order, true)?;
                if before < size + self.cfg.reserve_bytes as u64 {
                    Counters::bump(&self.counters.reserve_allocs);
                }
                b
            }
        };
        self.publish_capacity(g);
        if g.arena.free_bytes < self.cfg.low_watermark as u64 {
            self.grower.wake();
        }
        Some(block)
    }

    /// Refills this CPU's cache with half its limit of `order` blocks, if the arena has room
    /// above the reserve and nobody waits. Takes the pool lock, then (after releasing it) the
    /// cache lock.
    fn refill(&self, order: u32) {
        let want = self.caches.limit(order) / 2;
        if want == 0 {
            return;
        }
        let mut got = Vec::with_capacity(want);
        {
            let mut g = self.global.lock().unwrap();
            let room = g
                .arena
                .free_bytes
                .saturating_sub(self.cfg.reserve_bytes as u64 + self.cfg.low_watermark as u64);
            let n = want.min((room >> order) as usize);
            if n == 0 || g.queue.has_waiters() {
                return;
            }
            g.arena.alloc_batch(order, n, &mut got);
            self.publish_capacity(&g);
        }
        Counters::bump(&self.counters.cache_refills);
        let mut c = self.caches.local();
        let class = self.caches.class(order);
        c.classes[class].extend(got);
    }

    /// One awaitable attempt without waiting: cache, then arena. Counts the block as in use.
    fn alloc_now(this: &Arc<Self>, order: u32, want_zero: bool) -> Option<Claim> {
        if let Some(c) = Shared::alloc_cached(this, order, Caller::Awaitable, want_zero) {
            return Some(c);
        }
        let b = {
            let mut g = this.global.lock().unwrap();
            let b = this.alloc_arena(&mut g, order, Caller::Awaitable)?;
            Shared::count_alloc(&mut g, &b, want_zero);
            b
        };
        this.refill(order);
        Some(Shared::claim(this, b))
    }

    /// `block` with a new reference to the pool (the slow paths' claim).
    fn claim(this: &Arc<Self>, block: Block) -> Claim {
        Claim {
            block,
            pool: Arc::clone(this),
        }
    }

    /// The immediate path: cache, arena with reserve, transient chunk, error.
    #[inline(always)]
    fn alloc_immediate(
        this: &Arc<Self>,
        order: u32,
        len: usize,
        want_zero: bool,
    ) -> Result<Claim, PoolError> {
        match Shared::alloc_cached(this, order, Caller::Immediate, want_zero) {
            Some(c) => Ok(c),
            None => Shared::alloc_immediate_slow(this, order, len, want_zero),
        }
    }

    /// [`Shared::alloc_immediate`] after a cache miss: arena with reserve, other CPUs' caches,
    /// transient chunk, error. Takes the pool lock (never held across a system call).
    #[inline(never)]
    fn alloc_immediate_slow(
        this: &Arc<Self>,
        order: u32,
        len: usize,
        want_zero: bool,
    ) -> Result<Claim, PoolError> {
        let take = || {
            let mut g = this.global.lock().unwrap();
            let b = this.alloc_arena(&mut g, order, Caller::Immediate)?;
            Shared::count_alloc(&mut g, &b, want_zero);
            Some(b)
        };
        let mut got = take();
        // Free blocks may sit in other CPUs' caches: bring them back before giving up.
        if got.is_none() && this.drain_caches() > 0 {
            got = take();
        }
        if let Some(b) = got {
            if this.waiting.load(Ordering::Relaxed) == 0 {
                this.refill(order);
            }
            return Ok(Shared::claim(this, b));
        }
        this.grower.wake();
        let (mut why, mut cause) = match this.alloc_transient(order, want_zero) {
            Ok(b) => {
                return Ok(Shared::claim(this, b));
            }
            Err(e) => e,
        };
        if cause.is_none() {
            // The grower could not make room either: that is the reason to report.
            cause = this.growth_failure();
            if let Some(c) = &cause {
                why = format!("{why}; growing the pool failed: {c}");
            }
        }
        Counters::bump(&this.counters.immediate_failures);
        Err(PoolError::Exhausted {
            len,
            why,
            stats: Box::new(this.stats()),
            cause,
        })
    }

    /// Makes a transient chunk big enough for one block of `order` (a whole number of pages),
    /// outside any lock, inserts it and allocates from it. On failure, why, and the error
    /// that made the chunk fail, if that was it.
    fn alloc_transient(
        &self,
        order: u32,
        want_zero: bool,
    ) -> Result<Block, (String, Option<std::sync::Arc<PoolError>>)> {
        if !self.cfg.transient {
            return Err((
                "pool and reserve empty, transient chunks disabled".into(),
                None,
            ));
        }
        // Sized to the request (its block, in whole pages), not to `max_buffer`: a transient
        // chunk serves the one caller that found the pool empty.
        let page = self.cfg.memory.page_size.bytes();
        let len = (1usize << order).div_ceil(page) * page;
        {
            let mut g = self.global.lock().unwrap();
            if g.arena.capacity_bytes + g.growing_bytes + len as u64 > self.cfg.max_bytes as u64 {
                return Err((
                    format!(
                        "pool and reserve empty, and a {len} B transient chunk would pass the cap"
                    ),
                    None,
                ));
            }
            g.growing_bytes += len as u64;
        }
        let made = self.make_chunk(len);
        let mut g = self.global.lock().unwrap();
        g.growing_bytes -= len as u64;
        let (chunk, dev, buddy) =
            made.map_err(|e| (format!("transient chunk failed: {e}"), Some(e.into())))?;
        let slot = g.arena.insert(chunk, dev, buddy, true);
        Counters::bump(&self.counters.transient_allocs);
        // Other immediate callers may have raced into the new chunk; it still has room for us
        // unless it was filled, in which case any transient chunk with room will do.
        let b = g
            .arena
            .alloc(order, true)
            .ok_or_else(|| ("transient chunk taken by others".to_string(), None));
        match &b {
            Ok(b) => Shared::count_alloc(&mut g, b, want_zero),
            Err(_) => g.retired.push(slot),
        }
        self.publish_capacity(&g);
        b
    }

    /// Counts `block`, taken outside the caches (never pre-zeroed), as in use, and as a
    /// pre-zeroing miss if the caller wanted a zero block. Call with the pool lock held.
    #[inline]
    fn count_alloc(g: &mut Global, block: &Block, want_zero: bool) {
        g.in_use += block.size() as i64;
        g.zero_misses += u64::from(want_zero);
    }

    /// Gives a buffer's block and pool reference back: the block to this CPU's cache when
    /// nobody waits and the cache has room, else to the arena, handing it (or what it
    /// coalesces into) to waiters; the pool reference to the cache's credits unless the caches
    /// are closed. Takes the cache lock, then (after releasing it) the pool lock if blocks go
    /// to the arena.
    ///
    /// The block is moved out of `*block` only where it is stored: in the fast path, under
    /// the cache lock. Reading it there rather than on entry keeps its words out of
    /// registers (and off the stack) across the lookups before the lock, and the lock's
    /// compare-and-swap has drained the store buffer by then, so the copy's wide loads
    /// cannot wait on a store to the buffer that is still being forwarded (a 16-byte load of
    /// a block just written word by word stalled ~12 cycles in `perf annotate`).
    ///
    /// # Safety
    /// `block` is valid and aligned until this returns, and this call moves the block out of
    /// it: the caller never uses or drops `*block` again (`Block` has no destructor).
    #[inline(always)]
    pub(crate) unsafe fn release(block: *const Block, pool: Arc<Shared>) {
        // SAFETY: valid until we return (caller); only read through this reference.
        let b = unsafe { &*block };
        debug_assert!(!b.zeroed(), "a released block may have been written");
        // SAFETY: `this` is used only while `pool` is still ours, or while we hold the local
        // cache's lock with `pool` among that (open) cache's credits. A credit leaves a cache
        // only under its lock: taken by an allocation (which holds a pool handle) or by
        // `Caches::close` (whose caller holds a reference of its own), so the pool outlives our
        // last access through `this`, the release of the cache lock.
        let this: &Shared = unsafe { &*Arc::as_ptr(&pool) };
        let order = b.order();
        let limit = this.caches.limit(order);
        // The fast path: a cacheable block with room for it in this CPU's cache, open caches,
        // nobody waiting.
        let cacheable = !b.transient() && limit > 0 && this.waiting.load(Ordering::Relaxed) == 0;
        if cacheable {
            let mut c = this.caches.local();
            let class = this.caches.class(order);
            if !c.closed && c.classes[class].len() + c.zeroed[class].len() < limit {
                c.in_use -= b.size() as i64;
                // SAFETY: moved out exactly once, here (the caller's contract).
                c.classes[class].push(unsafe { std::ptr::read(block) });
                if c.credits.len() < CREDITS_MAX {
                    c.credits.push(pool);
                    return;
                }
                // Enough credits here (buffers move from CPUs that allocate to one that
                // releases): give this reference back to the shared count.
                drop(c);
                drop(pool);
                return;
            }
        }
        // SAFETY: moved out exactly once, here (the caller's contract; the fast path returned).
        pool.release_slow(unsafe { std::ptr::read(block) }, cacheable);
    }

    /// [`Shared::release`] when the fast path cannot take the block: not `cacheable` (a
    /// transient block, an uncached class, a waiter), a full cache, or closed caches. The caller
    /// keeps its reference to the pool (`self`) across the pool lock.
    #[inline(never)]
    fn release_slow(&self, block: Block, cacheable: bool) {
        let size = block.size() as i64;
        let order = block.order();
        if !cacheable {
            // A waiter's hand-off takes this path: no vector, no cache lock (the block is
            // counted out under the pool lock), and the block may go straight to the waiter.
            self.give_back_one(block);
            return;
        }
        let mut back = Vec::new();
        {
            let mut c = self.caches.local();
            c.in_use -= size;
            {
                let class = self.caches.class(order);
                let limit = self.caches.limit(order);
                c.classes[class].push(block);
                let held = c.classes[class].len() + c.zeroed[class].len();
                if held > limit {
                    // Give back released blocks first: zeroed ones are worth keeping.
                    let keep = (limit / 2).saturating_sub(c.zeroed[class].len());
                    let list = &mut c.classes[class];
                    back.extend(list.drain(keep.min(list.len())..));
                }
            }
        }
        if !back.is_empty() {
            self.give_back(back);
        }
    }

    /// Frees `block` into the arena; a transient chunk it leaves idle is queued for the grower
    /// to retire. Returns whether one was (wake the grower then). Call with the pool lock held.
    fn free_locked(g: &mut Global, block: Block, now: &mut LazyNow) -> bool {
        match g.arena.free(block, now) {
            Some(slot) => {
                g.retired.push(slot);
                true
            }
            None => false,
        }
    }

    /// Returns one block to the pool and serves waiters: if the first waiter offered space
    /// wants exactly this block's size, it is handed over as it is (no buddy free and
    /// allocation); otherwise it is freed into the arena first, as [`Shared::give_back`]
    /// does. Counts the block out of the bytes in use. Takes the pool lock; wakes after
    /// releasing it. Reads the clock only if a chunk goes idle, a waiter is served (the
    /// grant's time, for the wait histogram) or a waiter that does not fit may have aged.
    #[inline(never)]
    fn give_back_one(&self, block: Block) {
        let mut wakes = WakeList::new();
        {
            let mut g = self.global.lock().unwrap();
            let mut now = LazyNow::new();
            g.in_use -= block.size() as i64;
            // The throttle is judged on the arena's counts before the walk: keep the plain
            // free-then-dispatch order there.
            if block.transient() || !g.queue.has_waiters() || self.cfg.throttle.is_some() {
                let retired = Shared::free_locked(&mut g, block, &mut now);
                self.dispatch_with(&mut g, &mut now, &mut wakes, None);
                if retired {
                    self.grower.wake();
                }
            } else {
                self.dispatch_with(&mut g, &mut now, &mut wakes, Some(block));
            }
        }
        wakes.wake_all();
    }

    /// Returns blocks to the arena and serves waiters. Takes the pool lock; wakes after
    /// releasing it.
    #[inline(never)]
    fn give_back(&self, blocks: Vec<Block>) {
        let mut wakes = WakeList::new();
        {
            let mut g = self.global.lock().unwrap();
            let mut now = LazyNow::new();
            let mut retired = false;
            for b in blocks {
                retired |= Shared::free_locked(&mut g, b, &mut now);
            }
            self.dispatch_with(&mut g, &mut now, &mut wakes, None);
            if retired {
                self.grower.wake();
            }
        }
        wakes.wake_all();
    }

    /// Sets or clears [`Global::throttled`] from the allocated share of capacity (only with a
    /// [`Throttle`] configured). Call with the pool lock held.
    fn update_throttle(&self, g: &mut Global) {
        if let Some(t) = self.cfg.throttle {
            let share =
                100.0 * g.arena.allocated_bytes as f64 / g.arena.capacity_bytes.max(1) as f64;
            if share > t.high_percent {
                g.throttled = true;
            } else if share < t.low_percent {
                g.throttled = false;
            }
        }
    }

    /// Hands free space to waiters in the queue's fair order, keeping the reserve (and the
    /// throttle, if configured), and refreshes [`Shared::waiting`]. Call with the pool lock
    /// held; wake `wakes` after releasing it.
    fn dispatch(&self, g: &mut Global, now: Instant, wakes: &mut WakeList) {
        self.dispatch_with(g, &mut LazyNow::at(now), wakes, None);
    }

    /// [`Shared::dispatch`] with a just-released, non-transient block still out of the arena
    /// (`fresh`): the first waiter offered space gets it as it is if it wants exactly its size
    /// and the arena alone keeps the reserve (what freeing then allocating it would have
    /// checked); otherwise the block is freed into the arena before anything else is
    /// allocated, so the walk sees the same space as after a plain free.
    fn dispatch_with(
        &self,
        g: &mut Global,
        now: &mut LazyNow,
        wakes: &mut WakeList,
        mut fresh: Option<Block>,
    ) {
        debug_assert!(fresh.as_ref().is_none_or(|b| !b.transient()));
        let reserve = self.cfg.reserve_bytes as u64;
        self.update_throttle(g);
        let throttle = self.cfg.throttle;
        let Global {
            arena,
            queue,
            throttled,
            ..
        } = g;
        if !queue.has_waiters() {
            if let Some(b) = fresh {
                // Non-transient: never retires a chunk.
                arena.free(b, now);
                self.publish_capacity(g);
            }
            // Keep the hot path's mirror right after the last waiter left (cancel, timeout).
            self.waiting.store(0, Ordering::Relaxed);
            return;
        }
        queue.dispatch_lazy(now, wakes, |size, now| {
            let b = match fresh.take() {
                Some(b)
                    if b.size() as u64 == size && !*throttled && arena.free_bytes >= reserve =>
                {
                    // Handed over as it is: the arena's counts are what a free then an
                    // allocation of it would leave.
                    b
                }
                other => {
                    if let Some(b) = other {
                        arena.free(b, now);
                    }
                    if *throttled || arena.free_bytes < size + reserve {
                        return None;
                    }
                    arena.alloc(size.trailing_zeros(), false)?
                }
            };
            if let Some(t) = throttle {
                let share =
                    100.0 * arena.allocated_bytes as f64 / arena.capacity_bytes.max(1) as f64;
                *throttled = share > t.high_percent;
            }
            Some(Grant {
                block: b,
                at: now.get(),
            })
        });
        if let Some(b) = fresh {
            // No waiter was offered space (a starving barrier ahead wants more): free it.
            arena.free(b, now);
        }
        self.waiting.store(queue.waiting(), Ordering::Relaxed);
        self.publish_capacity(g);
    }

    /// Moves every CPU's cached blocks back to the arena (before a request waits or fails,
    /// before shrinking, and when waiters have waited `grow_after`). Takes each cache lock in
    /// turn, then the pool lock.
    /// Returns how many blocks came back.
    pub(crate) fn drain_caches(&self) -> usize {
        let mut back = Vec::new();
        for c in self.caches.each() {
            let mut c = c.lock();
            let c = &mut *c;
            for class in c.classes.iter_mut().chain(c.zeroed.iter_mut()) {
                back.append(class);
            }
        }
        let n = back.len();
        if n > 0 {
            self.give_back(back);
        }
        n
    }

    /// Bytes in use, pre-zeroing hits and misses: the sums of every CPU's counts (the fast
    /// path's; the slow paths count in [`Global`]).
    fn cache_counts(&self) -> (i64, u64, u64) {
        let (mut in_use, mut hits, mut misses) = (0i64, 0u64, 0u64);
        for c in self.caches.each() {
            let c = c.lock();
            in_use += c.in_use;
            hits += c.zero_hits;
            misses += c.zero_misses;
        }
        (in_use, hits, misses)
    }

    fn stats(&self) -> PoolStats {
        let c = &self.counters;
        let r = |a: &crate::sync::AtomicU64| a.load(Ordering::Relaxed);
        let (waiters, waiting_bytes, wait, slow_in_use, slow_zero_misses) = {
            let g = self.global.lock().unwrap();
            (
                g.queue.waiting() as u64,
                g.queue.waiting_bytes(),
                g.wait_times.percentiles(),
                g.in_use,
                g.zero_misses,
            )
        };
        let (in_use, prezero_hits, prezero_misses) = self.cache_counts();
        PoolStats {
            capacity_bytes: r(&c.capacity_bytes),
            // The caches' sum and the slow paths' may each be off while a buffer moves
            // between them, never their total (once every release has returned).
            in_use_bytes: (in_use + slow_in_use).max(0) as u64,
            peak_allocated_bytes: r(&c.peak_allocated_bytes),
            chunks: r(&c.chunks),
            waiters,
            waiting_bytes,
            waits: wait.count,
            timeouts: r(&c.timeouts),
            grows: r(&c.grows),
            sync_grows: r(&c.sync_grows),
            shrinks: r(&c.shrinks),
            growth_failures: r(&c.growth_failures),
            last_growth_error: c.last_growth_error.lock().unwrap().clone(),
            transient_allocs: r(&c.transient_allocs),
            reserve_allocs: r(&c.reserve_allocs),
            immediate_failures: r(&c.immediate_failures),
            cache_refills: r(&c.cache_refills),
            prezero_hits,
            prezero_misses: prezero_misses + slow_zero_misses,
            prezeroed_bytes: r(&c.prezeroed_bytes),
            wait,
            mappings: self.view.usage(),
        }
    }
}

impl Drop for Shared {
    /// Last handle gone (no pool clone, buffer or grower reference left): stop the grower and
    /// unshare every chunk before its memory is unmapped.
    fn drop(&mut self) {
        self.grower.shutdown();
        let slots = self.global.get_mut().unwrap().arena.drain_all();
        for s in slots {
            if let Err(e) = self.view.unshare(&s.chunk.region(), s.dev) {
                // The memory is about to be unmapped while the device may still reach it: the
                // view refused, so leak the chunk rather than free memory a device can write.
                tracing::error!(error = %e, "unsharing a chunk at teardown failed; leaking it");
                std::mem::forget(s.chunk);
            }
        }
    }
}

/// The future of [`Pool::alloc`]: resolves to a zeroed [`DmaBuf`].
///
/// Cancel-safe: dropping it while queued removes the request; dropping it after space was
/// granted but before it was polled gives the space back to the next waiter.
#[must_use = "futures do nothing unless awaited"]
#[derive(Debug)]
pub struct Alloc<'p> {
    pool: &'p Pool,
    len: usize,
    timeout: Option<Duration>,
    /// The result must be a zero block (prefer a pre-zeroed one).
    want_zero: bool,
    state: AllocState,
}

#[derive(Debug)]
enum AllocState {
    Start,
    Queued {
        ticket: Ticket,
        since: Instant,
        /// Keys this waiter in `Global::deadlines`. (A failed growth wakes every waiter
        /// through the wakers the queue keeps: [`WaitQueue::wakers`].)
        id: u64,
        /// Growth attempts begun before it queued: later ones were made on its behalf.
        attempts_before: u64,
        /// Its entry in `Global::deadlines`, if any.
        deadline: Option<Instant>,
    },
    Done,
}

impl<'p> Alloc<'p> {
    fn new(pool: &'p Pool, len: usize, timeout: Option<Duration>, want_zero: bool) -> Alloc<'p> {
        Alloc {
            pool,
            len,
            timeout,
            want_zero,
            state: AllocState::Start,
        }
    }

    /// The block behind the future's result, without zeroing (map paths overwrite it).
    fn poll_block(&mut self, cx: &mut Context<'_>) -> Poll<Result<Claim, PoolError>> {
        let shared = &self.pool.shared;
        match self.state {
            AllocState::Done => panic!("Alloc polled after completion"),
            AllocState::Start => {
                let order = match self.pool.check_len(self.len) {
                    Ok(o) => o,
                    Err(e) => {
                        self.state = AllocState::Done;
                        return Poll::Ready(Err(e));
                    }
                };
                if !shared.cfg.waiting {
                    self.state = AllocState::Done;
                    return Poll::Ready(Shared::alloc_immediate(
                        shared,
                        order,
                        self.len,
                        self.want_zero,
                    ));
                }
                if let Some(c) = Shared::alloc_now(shared, order, self.want_zero) {
                    self.state = AllocState::Done;
                    return Poll::Ready(Ok(c));
                }
                // Before queueing: free blocks may sit in other CPUs' caches.
                shared.drain_caches();
                let now = Instant::now();
                let mut g = shared.global.lock().unwrap();
                // Recheck under the lock: space may have come back since alloc_now looked.
                if let Some(b) = shared.alloc_arena(&mut g, order, Caller::Awaitable) {
                    Shared::count_alloc(&mut g, &b, self.want_zero);
                    drop(g);
                    self.state = AllocState::Done;
                    return Poll::Ready(Ok(Shared::claim(shared, b)));
                }
                let ticket = g.queue.enqueue(1u64 << order, now, cx.waker());
                shared.waiting.store(g.queue.waiting(), Ordering::Relaxed);
                let id = g.next_waiter_id;
                g.next_waiter_id += 1;
                let attempts_before = g.growth.attempts;
                let deadline = shared.next_deadline(&g, self.timeout, now, now, None);
                if let Some(at) = deadline {
                    g.deadlines.insert((at, id), cx.waker().clone());
                }
                drop(g);
                shared.grower.wake();
                self.state = AllocState::Queued {
                    ticket,
                    since: now,
                    id,
                    attempts_before,
                    deadline,
                };
                Poll::Pending
            }
            AllocState::Queued {
                ticket,
                since,
                id,
                attempts_before,
                deadline,
            } => {
                let mut g = shared.global.lock().unwrap();
                let polled = match g.queue.poll(ticket, cx.waker()) {
                    Poll::Ready(Ok(grant)) => {
                        // Served. The queue was walked, and the hot path's waiter count
                        // refreshed, when the grant was made: nothing else changes here but
                        // the counts, kept under this lock.
                        if let Some(at) = deadline {
                            g.deadlines.remove(&(at, id));
                        }
                        Shared::count_alloc(&mut g, &grant.block, self.want_zero);
                        let waited = grant.at.saturating_duration_since(since);
                        let long = g.wait_times.record(waited);
                        drop(g);
                        if long {
                            stats::log_long_wait(waited);
                        }
                        self.state = AllocState::Done;
                        return Poll::Ready(Ok(Shared::claim(shared, grant.block)));
                    }
                    other => other,
                };
                let now = Instant::now();
                let waited = now.saturating_duration_since(since);
                let outcome = match polled {
                    Poll::Ready(Ok(b)) => Some(Ok(b)),
                    Poll::Ready(Err(e)) => {
                        // Our own ticket, polled only while queued: cannot happen. Report it
                        // rather than panic in a driver's I/O path.
                        Some(Err(PoolError::Internal(e.to_string())))
                    }
                    Poll::Pending if self.timeout.is_some_and(|t| waited >= t) => {
                        Some(Err(PoolError::Timeout {
                            len: self.len,
                            waited,
                        }))
                    }
                    Poll::Pending
                        if shared.cfg.at_cap == AtCap::Fail
                            && waited >= shared.cfg.grow_after
                            && !shared.can_grow(&g) =>
                    {
                        Some(Err(PoolError::AtCap {
                            len: self.len,
                            cap: shared.cfg.max_bytes,
                        }))
                    }
                    Poll::Pending => shared
                        .growth_failed_for(&g, since, attempts_before, now)
                        .map(|(cause, failures)| {
                            Err(PoolError::GrowthFailed {
                                len: self.len,
                                waited,
                                failures,
                                cause,
                            })
                        }),
                };
                let Some(outcome) = outcome else {
                    // Keep waiting: keep the wakers current (the queue's, in `poll` above) and
                    // the deadline due.
                    let at = shared.next_deadline(&g, self.timeout, since, now, deadline);
                    if at != deadline {
                        if let Some(old) = deadline {
                            g.deadlines.remove(&(old, id));
                        }
                        if let Some(at) = at {
                            g.deadlines.insert((at, id), cx.waker().clone());
                        }
                        self.state = AllocState::Queued {
                            ticket,
                            since,
                            id,
                            attempts_before,
                            deadline: at,
                        };
                    } else if let Some(w) = at.and_then(|at| g.deadlines.get_mut(&(at, id))) {
                        if !w.will_wake(cx.waker()) {
                            *w = cx.waker().clone();
                        }
                    }
                    return Poll::Pending;
                };
                if let Some(at) = deadline {
                    g.deadlines.remove(&(at, id));
                }
                let outcome = match outcome {
                    Ok(grant) => Ok(grant.block),
                    Err(e) => {
                        // Giving up: a grant may have arrived since the poll above; take it.
                        match g.queue.cancel(ticket) {
                            Some(grant) => Ok(grant.block),
                            None => Err(e),
                        }
                    }
                };
                let mut wakes = WakeList::new();
                // The head may have changed: others may now be served (and the hot path's
                // waiter count is refreshed).
                shared.dispatch(&mut g, now, &mut wakes);
                let long = match &outcome {
                    Ok(b) => {
                        Shared::count_alloc(&mut g, b, self.want_zero);
                        g.wait_times.record(now - since)
                    }
                    Err(_) => false,
                };
                drop(g);
                wakes.wake_all();
                if long {
                    stats::log_long_wait(now - since);
                }
                self.state = AllocState::Done;
                match outcome {
                    Ok(b) => Poll::Ready(Ok(Shared::claim(shared, b))),
                    Err(e) => {
                        if matches!(e, PoolError::Timeout { .. }) {
                            Counters::bump(&shared.counters.timeouts);
                            tracing::warn!(
                                waited_ms = (now - since).as_millis() as u64,
                                error = %e,
                                "a request for pool capacity timed out"
                            );
                        }
                        Poll::Ready(Err(e))
                    }
                }
            }
        }
    }
}

impl Future for Alloc<'_> {
    type Output = Result<DmaBuf, PoolError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let len = self.len;
        match self.poll_block(cx) {
            Poll::Ready(Ok(c)) => Poll::Ready(Ok(DmaBuf::new_zeroed(c, len))),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The future of [`Pool::alloc_from`]: resolves to a [`DmaBuf`] holding a copy of the source.
/// Cancel-safe like [`Alloc`].
#[must_use = "futures do nothing unless awaited"]
#[derive(Debug)]
pub struct AllocFrom<'p, 's> {
    alloc: Alloc<'p>,
    src: &'s [u8],
}

impl Future for AllocFrom<'_, '_> {
    type Output = Result<DmaBuf, PoolError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let src = self.src;
        match self.alloc.poll_block(cx) {
            Poll::Ready(Ok(c)) => Poll::Ready(Ok(DmaBuf::new_filled(c, src))),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for Alloc<'_> {
    /// Cancellation: leave the queue, giving back a grant that was never taken.
    fn drop(&mut self) {
        if let AllocState::Queued {
            ticket,
            id,
            deadline,
            ..
        } = self.state
        {
            let shared = &self.pool.shared;
            let mut wakes = WakeList::new();
            {
                let mut g = shared.global.lock().unwrap();
                if let Some(at) = deadline {
                    g.deadlines.remove(&(at, id));
                }
                let mut now = LazyNow::new();
                let retired = g
                    .queue
                    .cancel(ticket)
                    .is_some_and(|grant| Shared::free_locked(&mut g, grant.block, &mut now));
                shared.dispatch_with(&mut g, &mut now, &mut wakes, None);
                if retired {
                    shared.grower.wake();
                }
            }
            wakes.wake_all();
        }
    }
}

// The unit tests run on std's primitives; the loom models need loom's (`--cfg loom`).
#[cfg(all(test, not(loom)))]
pub(crate) mod tests;

#[cfg(all(test, not(loom)))]
mod growth_tests;

#[cfg(all(test, loom))]
mod loom_tests;
